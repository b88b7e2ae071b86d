"""Expert parallel (complexity_dist/parallel/expert_parallel.py) equals one process: EP2 on 2 gloo processes.

Each rank trains on its OWN batch (as under data parallel); the single-process reference runs both batches.
The DeepSpeed check steps ZeRO 1 and 2 engines with the expert parameters marked.
One spawn runs every check (a spawn costs seconds of imports on CI's 2 cores)."""
import copy
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_same_grads, free_port, tiny_overrides

from complexity_dist.config import load_config
from complexity_dist.model import ComplexityForCausalLM
from complexity_dist.parallel.expert_parallel import (apply_expert_parallel, enable_deepspeed_expert_reduction,
                                                      routed_override_fraction, split_expert_param_groups)

EP = 2
TOL = dict(rtol=1e-5, atol=1e-6)


def _batch(rank: int) -> torch.Tensor:
    return torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(100 + rank))


def _reference(override_layer: int | None) -> ComplexityForCausalLM:
    """fp32 tiny model, 4 experts, straight-through router (so mu_router gets a gradient too); every weight
    random so no term hides at its init. mu_router is zero (no token moves) except in `override_layer`,
    where large weights make the mu override move tokens away from token_id % E."""
    cfg = load_config(None, tiny_overrides(**{"model.mu_router": "straight_through"}))
    torch.manual_seed(0)
    model = ComplexityForCausalLM(cfg.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name else 0.0))
        for i, layer in enumerate(model.model.layers):
            w = layer.mlp.mu_router.weight
            w.copy_(torch.randn(w.shape, generator=g) * 3.0 if i == override_layer else torch.zeros_like(w))
    return model


def _reference_grads(model, rank):
    """Logits and loss of this rank's batch, and the gradients summed over both ranks' batches."""
    model.zero_grad()
    mine = None
    for r in range(EP):
        ids = _batch(r)
        out = model(ids, targets=ids)
        out.loss.backward()
        if r == rank:
            mine = out
    return mine.logits.detach(), mine.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_case(rank, group, override_layer, checkpointing, speculative=False):
    ref = _reference(override_layer)
    ep_model = copy.deepcopy(ref)
    cache = apply_expert_parallel(ep_model, group, speculative=speculative)
    ref_logits, ref_loss, ref_grads = _reference_grads(ref, rank)

    # layout: same names, this rank's experts r, r+2 as rows, in that order
    ep_state, ref_state = ep_model.state_dict(), ref.state_dict()
    assert list(ep_state) == list(ref_state)
    for name in ep_state:
        want = ref_state[name][rank::EP] if name.endswith(("gate_up_proj", "down_proj")) else ref_state[name]
        assert torch.equal(ep_state[name], want), name

    ep_model.model.activation_checkpointing = checkpointing
    ids = _batch(rank)
    out = ep_model(ids, targets=ids)
    torch.testing.assert_close(out.logits, ref_logits, **TOL)
    torch.testing.assert_close(out.loss, ref_loss, **TOL)
    out.loss.backward()

    grads = {}
    for name, p in ep_model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        grads[name] = p.grad.clone()
        if not name.endswith(("gate_up_proj", "down_proj")):
            dist.all_reduce(grads[name])  # the usual data-parallel sum (all reduced before any check fails)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, f"{name} got a zero gradient"
        if name.endswith(("gate_up_proj", "down_proj")):
            # the all-to-all backward already summed both ranks' tokens; the expert-data-parallel group
            # (ranks holding the same experts) is this rank alone when ep = dp = 2
            torch.testing.assert_close(grad, ref_grads[name][rank::EP], **TOL, msg=name)
        else:
            torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=name)
    return ep_model, cache


def _compiled_graphs(group, layers: int) -> int:
    """Graphs dynamo compiles for a speculative EP model of `layers` compiled layers (one forward and backward,
    no override), after checking its loss and gradients against eager."""
    from torch._dynamo.utils import counters

    cfg = load_config(None, tiny_overrides(**{"model.num_hidden_layers": layers}))
    torch.manual_seed(0)
    eager = ComplexityForCausalLM(cfg.model)
    compiled = copy.deepcopy(eager)
    for model in (eager, compiled):
        apply_expert_parallel(model, group, speculative=True)
    compiled.compile_layers()
    torch._dynamo.reset()
    counters.clear()
    ids = _batch(dist.get_rank())
    loss = compiled(ids, targets=ids).loss
    loss.backward()
    graphs = counters["stats"]["unique_graphs"]
    want = eager(ids, targets=ids).loss
    want.backward()
    torch.testing.assert_close(loss, want, **TOL)
    assert_same_grads(compiled, eager)
    return graphs


def _check_deepspeed_step(rank, group, expert_dp, stage):
    import deepspeed

    ref = _reference(override_layer=1)
    model = copy.deepcopy(ref)
    _, _, ref_grads = _reference_grads(ref, rank)
    apply_expert_parallel(model, group)
    name = enable_deepspeed_expert_reduction(model, group, expert_dp)
    marked = [p for p in model.parameters() if getattr(p, "allreduce", True) is False]
    assert len(marked) == 2 * 3 and all(p.group_name == name == "ep_size_2" for p in marked)
    assert list(model.state_dict()) == list(ref.state_dict())  # the marker adds no checkpoint key
    groups = split_expert_param_groups([{"params": list(model.parameters()), "weight_decay": 0.0}], name)
    assert [len(g["params"]) for g in groups] == [len(list(model.parameters())) - 6, 6]
    assert groups[1]["moe"] is True and groups[1]["name"] == name and "moe" not in groups[0]
    config = {"train_batch_size": EP, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": stage, "reduce_scatter": True, "contiguous_gradients": True,
                                    "overlap_comm": False}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(groups, lr=1.0), config=config,
                                      dist_init_required=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = _batch(rank)
    engine.backward(engine(ids, targets=ids).loss)
    engine.step()
    for n, p in model.named_parameters():
        want = ref_grads[n][rank::EP] if n.endswith(("gate_up_proj", "down_proj")) else ref_grads[n]
        torch.testing.assert_close(before[n] - p.detach(), want / EP, rtol=1e-4, atol=1e-6,
                                   msg=f"ZeRO {stage}: {n}")
    norm = torch.stack([g.norm() for g in ref_grads.values()]).norm() / EP
    torch.testing.assert_close(float(engine.get_global_grad_norm()), float(norm), rtol=1e-4, atol=0)


def _worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(EP))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=EP)
    try:
        group = dist.new_group([0, 1])

        # 1. no override: one plan for the micro-batch, reused by all 3 layers
        model, cache = _check_case(rank, group, override_layer=None, checkpointing="none")
        assert cache.builds == 1, cache.builds
        assert routed_override_fraction(model) == 0.0
        # a new micro-batch rebuilds once, also when it is refilled into the same tensor in place
        with torch.no_grad():
            buf = _batch(rank).clone()
            model(buf)
            buf.copy_(_batch(rank + 7))
            got = model(buf).logits
        assert cache.builds == 3, cache.builds
        with torch.no_grad():
            torch.testing.assert_close(got, _reference(None)(buf).logits, **TOL)

        # 2. layer 1's mu override moves tokens: that layer rebuilds its plan (in the forward and in the
        # checkpointed recompute), layers 0 and 2 reuse the base plan; EP still equals one process
        model, cache = _check_case(rank, group, override_layer=1, checkpointing="full")
        fracs = [float(layer.mlp.routed_override_frac) for layer in model.model.layers]
        assert fracs[0] == fracs[2] == 0.0 and 0.0 < fracs[1] < 1.0, fracs
        assert abs(routed_override_fraction(model) - fracs[1] / 3) < 1e-6
        assert cache.builds == 3, cache.builds  # base + layer 1 forward + layer 1 recompute

        # 2b. speculative routing: the same, with every layer routed by the base plan and one check per forward
        for override_layer, checkpointing in ((None, "none"), (1, "full"), (1, "none")):
            model, cache = _check_case(rank, group, override_layer, checkpointing, speculative=True)
            # no override: the base plan only; override: the speculative forward's base plan, then the rerun
            # reuses it and rebuilds layer 1's plan (and again in the checkpointed recompute)
            want = {None: 1}.get(override_layer, 3 if checkpointing == "full" else 2)
            assert cache.builds == want and cache.unchecked_moves is None, (override_layer, checkpointing, cache.builds)

        # 2c. compiled, the speculative layers share their graphs: a per-layer guard (the length of a list of
        # counts did this) compiled one graph per layer, past dynamo's recompile limit on a 24-layer model
        assert _compiled_graphs(group, 3) == _compiled_graphs(group, 5)

        # 3. DeepSpeed ZeRO 1 and 2 reduce expert grads over the expert-data-parallel group, the rest over
        # data parallel: one SGD step (lr 1) moves every weight by the mean gradient of the global batch
        expert_dp = [dist.new_group([0]), dist.new_group([1])][rank]  # ep = dp = 2: each rank alone
        for stage in (1, 2):
            _check_deepspeed_step(rank, group, expert_dp, stage)
    finally:
        dist.destroy_process_group()


def test_expert_parallel_equals_one_process():
    mp.spawn(_worker, args=(free_port(),), nprocs=EP, join=True)
