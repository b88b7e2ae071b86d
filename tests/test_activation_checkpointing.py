"""train.activation_checkpointing = none | selective | full: same loss and gradients, measured memory kept for
backward in the order none > selective > full, and the old true/false values still load. (A training run
with selective against one with none: tests/test_train_coverage.py, which reuses its reference run.)"""
import pytest
import torch
from conftest import tiny_overrides
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from complexity_dist.config import ConfigError, TrainConfig, config_from_dict, load_config
from complexity_dist.model import ComplexityForCausalLM

MODES = ("none", "selective", "full")


class _StorageCensus(TorchDispatchMode):
    """Every storage that an op of the forward creates, held weakly: what is still alive when the forward has
    returned is what the graph keeps for backward. It sees what saved_tensors_hooks cannot: selective
    checkpointing keeps its op outputs in its own cache, never packed by autograd."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.storages[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        return out

    def alive_bytes(self, skip: set[int]) -> int:
        return sum(n for ptr, (ref, n) in self.storages.items() if not ref.expired() and ptr not in skip)


def _run(mode: str):
    """(loss, gradients, bytes alive for backward by the census, bytes packed by saved_tensors_hooks), both
    de-duplicated by storage, parameters and the batch left out."""
    cfg = load_config(None, tiny_overrides(**{"model.mu_router": "straight_through"}))  # every weight gets a grad
    torch.manual_seed(0)
    model = ComplexityForCausalLM(cfg.model).train()
    model.model.activation_checkpointing = mode
    ids = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    packed: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        packed[s.data_ptr()] = s.nbytes()
        return t

    census = _StorageCensus()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), census:
        loss = model(inputs, targets=targets).loss
    # the routing metric each layer keeps (a scalar attribute, not for backward) and the loss itself
    kept = [layer.mlp.routed_override_frac for layer in model.model.layers] + [loss]
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), ids, *kept]}
    alive = census.alive_bytes(skip)
    hooked = sum(n for ptr, n in packed.items() if ptr not in skip)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, alive, hooked


def test_modes_give_the_same_loss_and_gradients_and_keep_less_memory():
    runs = {mode: _run(mode) for mode in MODES}
    loss, grads, none_bytes, none_hooked = runs["none"]
    assert all(g is not None for g in grads.values())
    for mode in ("selective", "full"):
        torch.testing.assert_close(runs[mode][0], loss, rtol=0, atol=1e-6)
        assert runs[mode][1].keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(runs[mode][1][name], g, rtol=1e-6, atol=1e-6, msg=f"{mode} {name}")
    sel_bytes, sel_hooked = runs["selective"][2:]
    full_bytes, full_hooked = runs["full"][2:]
    # where autograd holds everything (no checkpointing; full: checkpoint saves the layer inputs through
    # autograd), the census equals what saved_tensors_hooks packed: it measures the same thing
    assert none_bytes == none_hooked and full_bytes == full_hooked, (none_bytes, none_hooked, full_bytes, full_hooked)
    # selective keeps what full keeps plus its cache of GEMM/attention outputs (invisible to the hooks)
    assert sel_hooked == full_hooked and sel_bytes > sel_hooked
    assert full_bytes < sel_bytes < none_bytes, (none_bytes, sel_bytes, full_bytes)


def test_cached_decoding_never_checkpoints():
    """A forward with a KV cache runs the plain layer (its cache must be filled), even in training mode."""
    cfg = load_config(None, tiny_overrides())
    torch.manual_seed(0)
    model = ComplexityForCausalLM(cfg.model).train()
    model.model.activation_checkpointing = "selective"
    ids = torch.randint(0, cfg.model.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits[:, 5:]
        cache = model.new_cache()
        model(ids[:, :5], cache=cache)
        got = model(ids[:, 5:], cache=cache).logits  # sees the first 5 tokens only through the cache
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'partial' is not one of none, selective, full"):
        model.model.activation_checkpointing = "partial"


def test_old_boolean_values_load(tmp_path):
    """true/false of older configs and of checkpoints' config.json mean full/none."""
    for given, want in (("true", "full"), ("false", "none"), ("selective", "selective")):
        assert load_config(None, [f"train.activation_checkpointing={given}"]).train.activation_checkpointing == want
    yaml_file = tmp_path / "old.yaml"
    yaml_file.write_text("train:\n  activation_checkpointing: true\n")
    assert load_config(yaml_file).train.activation_checkpointing == "full"
    saved = load_config(None, []).to_dict()
    saved["train"]["activation_checkpointing"] = False  # as an older run wrote config.json
    assert config_from_dict(saved).train.activation_checkpointing == "none"
    t = TrainConfig(activation_checkpointing=True)
    t.validate()
    assert t.activation_checkpointing == "full"
    with pytest.raises(ConfigError, match=r"train.activation_checkpointing='partial' is not one of 'none', "
                                          r"'selective', 'full'"):
        load_config(None, ["train.activation_checkpointing=partial"])


def test_selective_with_transformer_engine_is_refused():
    from complexity_dist.parallel.parallelize import check_parallelize

    with pytest.raises(ConfigError, match="model.linear_backend=te with train.activation_checkpointing=selective: "
                                          "Transformer Engine's GEMMs"):
        check_parallelize(load_config(None, ["model.linear_backend=te", "train.activation_checkpointing=selective"]))


def test_pipeline_stage_layer_checkpoints_like_the_model():
    """A pipeline stage's DecoderLayerPipe runs the model's own layer with the configured mode (no checkpoint
    of its own): the stage boundary tuple and the gradients are those of the plain layer."""
    from complexity_dist.parallel.pipeline import DecoderLayerPipe

    cfg = load_config(None, tiny_overrides(**{"model.mu_router": "straight_through"}))
    torch.manual_seed(0)
    model = ComplexityForCausalLM(cfg.model).train()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 16, cfg.model.hidden_size, requires_grad=True)
    results = {}
    for mode in ("none", "selective"):
        pipes = [DecoderLayerPipe(model, i, mode) for i in range(2)]
        assert model.model.activation_checkpointing == mode  # set on the shared layers
        out = pipes[1](pipes[0]((x, ids)))
        grads = torch.autograd.grad(sum(t.square().sum() for t in out[:4]), [x, *model.parameters()],
                                    allow_unused=True)
        results[mode] = (out, grads)
    for a, b in zip(results["selective"][0], results["none"][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(results["selective"][1], results["none"][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_info_estimates_each_mode(root):
    """`complexity-dist info`'s activation estimate: selective between none and full (150m preset, 1 GPU and
    tp=2, where selective's sharded GEMM outputs shrink)."""
    from complexity_dist.model.accounting import training_memory_gib

    for world, extra in ((1, []), (2, ["parallel.tp=2", "parallel.zero_stage=1"])):
        acts = {mode: training_memory_gib(load_config(root / "configs/150m.yaml",
                                                      [f"train.activation_checkpointing={mode}", *extra]),
                                          world)["activations"] for mode in MODES}
        assert acts["full"] < acts["selective"] < acts["none"], (world, acts)
