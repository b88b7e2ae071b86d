"""model.linear_backend=megatron: megatron-core's tensor-parallel linears under the TP plan equal one process and
the torch backend (2 gloo processes, fp32), in the library and in the training loop; `te` is refused on CPU.
"""
import copy

import pytest
import torch
from spawn_util import spawn_gloo
from test_parallel_train import assert_parity, launch
from test_tensor_parallel import batch, config, randomized
from test_train import ROOT, dataset, run  # noqa: F401  (dataset is a fixture)

from complexity_dist.config import ConfigError, load_config
from complexity_dist.model import ComplexityForCausalLM
from complexity_dist.parallel.parallelize import check_parallelize
from complexity_dist.parallel.tensor_parallel import apply_tensor_parallel, full_grads, full_state_dict

TOL = dict(rtol=1e-5, atol=1e-5)


def run_case(tp_group, tie: bool, checkpointing: str):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    what = f"{tie=} {checkpointing=}"
    torch.manual_seed(0)
    cfg = config(**{"model.mu_router": "straight_through", "model.tie_word_embeddings": tie})
    ref = randomized(ComplexityForCausalLM(cfg))
    models = {"torch": apply_tensor_parallel(copy.deepcopy(ref), tp_group, backend="torch"),
              "megatron": apply_tensor_parallel(copy.deepcopy(ref), tp_group, backend="megatron")}
    meg = models["megatron"]
    assert isinstance(meg.lm_head, ColumnParallelLinear)
    assert all(isinstance(layer.self_attn.o_proj, RowParallelLinear) for layer in meg.model.layers)
    assert (meg.lm_head.weight is meg.model.embed_tokens.weight) == tie
    ids, targets = batch()
    ref.model.activation_checkpointing = checkpointing
    out_ref = ref(ids, targets=targets)
    out_ref.loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    expected = ref.state_dict()
    results = {}
    for name, model in models.items():
        model.model.activation_checkpointing = checkpointing
        out = model(ids, targets=targets)
        out.loss.backward()
        torch.testing.assert_close(out.loss, out_ref.loss, **TOL, msg=lambda m: f"{what} {name} loss: {m}")
        # today's checkpoint names and shapes, no `_extra_state` from megatron's modules
        full = full_state_dict(model)
        assert list(full) == list(expected), f"{what} {name}: {sorted(set(full) ^ set(expected))}"
        for k in expected:
            torch.testing.assert_close(full[k], expected[k], rtol=0, atol=0)
        grads = full_grads(model)
        assert list(grads) == list(ref_grads)
        for n, g_ref in ref_grads.items():
            assert grads[n] is not None, f"{what} {name}: {n} has no gradient"
            torch.testing.assert_close(grads[n], g_ref, **TOL, msg=lambda m: f"{what} {name} grad {n}: {m}")
        results[name] = (out.loss.detach(), grads)
    # the two backends compute the same shards: equal to each other, closer than to one process
    torch.testing.assert_close(results["megatron"][0], results["torch"][0], **TOL)
    for n in ref_grads:
        torch.testing.assert_close(results["megatron"][1][n], results["torch"][1][n], **TOL)
    # this rank's state_dict loads back strictly (megatron's load hook would demand `_extra_state`)
    meg.load_state_dict(meg.state_dict(), strict=True)


def check(rank):
    from megatron.core import parallel_state

    try:
        # as the trainer (complexity_dist/parallel/groups.py): megatron-core's groups exist
        parallel_state.initialize_model_parallel(2, create_gloo_process_groups=False)
        group = parallel_state.get_tensor_model_parallel_group()
        run_case(group, tie=True, checkpointing="none")
        run_case(group, tie=False, checkpointing="full")
        with pytest.raises(ConfigError, match="sequence_parallel"):
            apply_tensor_parallel(ComplexityForCausalLM(config()), group, sequence_parallel=True, backend="megatron")
    finally:
        parallel_state.destroy_model_parallel()


def test_megatron_backend_equals_one_process_and_torch_backend():
    spawn_gloo(check, 2)


def test_refusals_name_the_setting():
    def refused(*overrides):
        with pytest.raises(ConfigError) as e:
            check_parallelize(load_config(None, ["parallel.tp=2", "parallel.zero_stage=1", *overrides]))
        return str(e.value)
    assert "Transformer Engine" in refused("model.linear_backend=te")  # on CPU, or without TE / not wired
    assert "needs parallel.tp > 1" in refused("model.linear_backend=megatron", "parallel.tp=1")
    assert "torch.cuda.current_device()" in refused("model.linear_backend=megatron", "parallel.sequence_parallel=true")
    assert "train.compile=true" in refused("model.linear_backend=megatron", "train.compile=true")
    assert "or te (Transformer Engine's)" in refused("model.linear_backend=megatron", "train.fp8=current")
    # TE's FP8 is no longer refused (checked on an H200, tests/gpu/test_gpu_te.py): only TE's absence here is
    te_fp8 = refused("model.linear_backend=te", "train.fp8=delayed")
    assert "Transformer Engine" in te_fp8 and "train.fp8" not in te_fp8
    check_parallelize(load_config(None, ["parallel.tp=2", "parallel.zero_stage=1", "model.linear_backend=megatron"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_te_on_cpu_exits_2(tmp_path, dataset):  # noqa: F811
    proc = launch(tmp_path, "te", dataset, "model.linear_backend=te", nproc=1, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.linear_backend=te: Transformer Engine's linears run on CUDA GPUs only" in proc.stderr


def test_training_with_megatron_linears_equals_one_process(tmp_path, dataset):  # noqa: F811
    launch(tmp_path, "ref", dataset, "train.steps=3", nproc=1)
    launch(tmp_path, "tp2_megatron", dataset, "parallel.tp=2", "model.linear_backend=megatron", "train.steps=3")
    assert_parity(tmp_path, "tp2_megatron")
