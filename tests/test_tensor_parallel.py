"""Tensor (and sequence) parallelism on 2 gloo processes equals one process: loss, logits, every gradient, and the
tokens (and their order) that the wrapped expert compute is handed; with the attention's collectives through the
hooks or overlapped with its GEMMs (parallel.tp_comm_overlap), eager and compiled (where every layer after the
first shares one graph); and with the partial gradients summed per micro-batch or once per step (deferred, as
ZeRO 0/1 engines do, and only those: the engine test at the end).

One spawn runs every layout check (a spawn costs seconds of imports); each rank compares its sharded model with
a single-process copy of the same model that it builds itself from the same seed.
"""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from conftest import assert_same_grads, tiny_overrides
from spawn_util import spawn_gloo

from complexity_dist.config import ConfigError, load_config
from complexity_dist.model import ComplexityForCausalLM
from complexity_dist.parallel.tensor_parallel import (apply_tensor_parallel, check_tensor_parallel, full_grads,
                                                     full_state_dict, gather_full)

VOCAB, SEQ = 96, 16  # vocab divisible by tp=2


def config(**extra):
    return load_config(None, tiny_overrides(**{"model.vocab_size": VOCAB, "data.seq_len": SEQ, **extra})).model


def randomized(model, seed=0, router_scale=1.0):
    """Every parameter random (norms and mu included), so no term hides at its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if p.dim() > 1 else 0.5
            if "mu_router" in name:
                scale *= router_scale
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale + (1.0 if "norm" in name else 0.0))
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    ids[0, :8] = torch.arange(8)  # every expert's base route (id % 4), on both halves of the vocabulary
    ids[1, :4] = torch.arange(VOCAB - 4, VOCAB)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    targets[1, 3] = -100
    return ids, targets


def run_case(tp_group, mu_router, sequence_parallel, router_scale=1.0, checkpointing="none", dtype=torch.float32,
             comm_overlap=True, expert_tp=True):
    torch.manual_seed(0)
    cfg = config(**{"model.mu_router": mu_router})
    ref = randomized(ComplexityForCausalLM(cfg).to(dtype), router_scale=router_scale)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    ids, targets = batch()
    moved = []  # tokens the mu override sends away from their base expert id % E, per layer
    seen = {"ref": [], "tp": []}  # what each layer's (wrapped) expert compute is handed, in the forward

    def recording(compute, key):
        def wrapped(x, expert):
            if key == "ref":
                moved.append(int((expert != ids.reshape(-1) % cfg.num_experts).sum()))
            seen[key].append((x.detach().clone(), expert.clone()))
            return compute(x, expert)
        return wrapped
    tp = copy.deepcopy(ref)
    for key, model in (("ref", ref), ("tp", tp)):
        for layer in model.model.layers:
            layer.mlp.compute_experts = recording(layer.mlp.compute_experts, key)
    # TP wraps the recorder as it wraps expert parallel's compute (complexity_dist/parallel/parallelize.py)
    tp = apply_tensor_parallel(tp, tp_group, sequence_parallel=sequence_parallel, comm_overlap=comm_overlap,
                               expert_tp=expert_tp)
    # the overlapped projections replace the attention's projection seam; the hooks leave it alone
    assert all(("project_qkv" in vars(layer.self_attn)) == (sequence_parallel and comm_overlap)
               for layer in tp.model.layers)
    ref.model.activation_checkpointing = tp.model.activation_checkpointing = checkpointing
    out_ref, out_tp = ref(ids, targets=targets), tp(ids, targets=targets)
    # the compute inside TP (with SP too) gets one process's tokens in one process's order: expert parallel's
    # plan, built from the full micro-batch's ids, relies on it. Whole experts (expert_tp=False) get this
    # rank's sequence slice of them instead
    assert len(seen["tp"]) == len(seen["ref"]) == cfg.num_hidden_layers
    r, B = dist.get_rank(tp_group), ids.shape[0]
    for (x_tp, e_tp), (x_ref, e_ref) in zip(seen["tp"], seen["ref"]):
        if not expert_tp:
            x_ref = x_ref.view(B, SEQ, -1).chunk(2, dim=1)[r].reshape(-1, x_ref.shape[-1])
            e_ref = e_ref.view(B, SEQ).chunk(2, dim=1)[r].reshape(-1)
        assert torch.equal(e_tp, e_ref)
        torch.testing.assert_close(x_tp, x_ref, **tol)
    if not expert_tp:
        assert all(layer.mlp.gate_up_proj.shape == ref.model.layers[0].mlp.gate_up_proj.shape
                   for layer in tp.model.layers)
    out_ref.loss.backward()
    out_tp.loss.backward()
    what = (f"{mu_router=} {sequence_parallel=} {router_scale=} {checkpointing=} {dtype=} {comm_overlap=} "
            f"{expert_tp=}")

    torch.testing.assert_close(out_tp.loss, out_ref.loss, **tol, msg=lambda m: f"{what} loss: {m}")
    assert out_tp.logits.shape[-1] == VOCAB // 2  # this rank's vocabulary slice only
    logits = torch.cat([torch.empty_like(out_tp.logits)] * 2, dim=-1)
    dist.all_gather(list(logits.chunk(2, dim=-1)), out_tp.logits.detach().contiguous(), group=tp_group)
    torch.testing.assert_close(logits, out_ref.logits.detach(), **tol)

    # the gathered weights are today's checkpoint: same keys, shapes and values
    full = full_state_dict(tp)
    expected = ref.state_dict()
    assert list(full) == list(expected)
    for k in expected:
        torch.testing.assert_close(full[k], expected[k], rtol=0, atol=0, msg=lambda m: f"{what} {k}: {m}")

    grads, ref_grads = full_grads(tp), {n: p.grad for n, p in ref.named_parameters()}
    assert list(grads) == list(ref_grads)
    for name, g_ref in ref_grads.items():
        if g_ref is None:  # hard routing: mu_router gets no gradient, in one process too
            assert grads[name] is None, name
            continue
        assert grads[name] is not None, f"{what}: {name} has no gradient"
        torch.testing.assert_close(grads[name], g_ref, **tol,
                                   msg=lambda m: f"{what} grad {name}: {m}")
    if mu_router == "straight_through":
        missing = [n for n, p in tp.named_parameters() if p.grad is None]
        assert not missing, f"{what}: no gradient for {missing}"
    return sum(moved)


def deferred_case(tp_group, into_grad_accum: bool = False):
    """Deferred partial sums (what ZeRO 0/1 engines use): two micro-batches accumulate unsummed on each rank,
    one sum_accumulated() then gives one process's accumulated gradients. `into_grad_accum`: as DeepSpeed's ZeRO 1
    with fp32 accumulation of a bf16 model (complexity_dist/parallel/deepspeed_engine.py), each micro-batch's
    gradient is moved into an fp32 `grad_accum` in backward, and the sum runs over those."""
    from complexity_dist.parallel.deepspeed_engine import _add_into_grad_accum

    cfg = config(**{"model.mu_router": "straight_through"})
    ref = randomized(ComplexityForCausalLM(cfg))
    tp = apply_tensor_parallel(copy.deepcopy(ref), tp_group, sequence_parallel=True)
    if into_grad_accum:
        tp.tp_partial_grads.defer("grad_accum", torch.float32)
        zero1 = SimpleNamespace(gradient_accumulation_dtype=torch.float32)
        for p in tp.parameters():
            p.grad_accum = None
            p.register_post_accumulate_grad_hook(lambda p: _add_into_grad_accum(zero1, p))
    else:
        tp.tp_partial_grads.defer()
    ids, targets = batch()
    for model in (ref, tp):
        for row in range(2):
            model(ids[row:row + 1], targets=targets[row:row + 1]).loss.backward()
    partial = [name for name, p in tp.named_parameters() if getattr(p, "tp_partial_grad", False)]
    assert len(partial) > 10 * cfg.num_hidden_layers  # with SP, every replicated parameter

    def accumulated():
        if not into_grad_accum:
            return full_grads(tp)
        assert all(p.grad is None for p in tp.parameters())
        return gather_full(tp, {n: p.grad_accum for n, p in tp.named_parameters()})
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    unsummed = accumulated()
    assert all(not torch.allclose(unsummed[n], ref_grads[n]) for n in partial if ref_grads[n].abs().sum() > 0)
    tp.tp_partial_grads.sum_accumulated()
    grads = accumulated()
    for name, g_ref in ref_grads.items():
        torch.testing.assert_close(grads[name], g_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"deferred {name}: {m}")


def compiled_layers_share_graphs(tp_group):
    """Compiled TP + SP with the overlapped projections: every layer after the first runs the same graph (layer 0
    has no mu input). A per-layer object in the traced code (a functools.partial seam did this) made one graph
    per layer, which on a 24-layer model ran past dynamo's recompile limit. Loss and every gradient equal
    eager's (torch 2.11 compiled some autograd.Functions with their output's gradient lost: an exact zero)."""
    from torch._dynamo.utils import counters

    cfg = config(**{"model.num_hidden_layers": 3})
    torch.manual_seed(0)
    ref = ComplexityForCausalLM(cfg)
    tp, eager = (apply_tensor_parallel(copy.deepcopy(ref), tp_group, sequence_parallel=True, comm_overlap=True)
                 for _ in range(2))
    tp.compile_layers()
    torch._dynamo.reset()
    counters.clear()
    ids, targets = batch()
    for _ in range(2):
        loss = tp(ids, targets=targets).loss
        loss.backward()
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    for _ in range(2):
        want = eager(ids, targets=targets).loss
        want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    assert_same_grads(tp, eager)


def check(rank):
    group = dist.new_group([0, 1])
    deferred_case(group)
    deferred_case(group, into_grad_accum=True)
    compiled_layers_share_graphs(group)
    # fp32 as training runs (within 1e-5); the random weights already move tokens with the mu override
    assert run_case(group, "hard", False) > 0
    run_case(group, "straight_through", False)
    run_case(group, "hard", True)  # SP: the attention's collectives overlap its GEMMs (tp_comm_overlap)
    run_case(group, "hard", True, comm_overlap=False)  # SP through the hooks
    run_case(group, "straight_through", True, checkpointing="selective")
    # whole experts on each rank, running its own sequence slice (parallel.expert_tensor_parallel=false)
    run_case(group, "straight_through", True, comm_overlap=False, expert_tp=False)
    # fp64 at 1e-10, so no small error can hide in fp32 rounding; large router weights move more tokens
    for sp, overlap, expert_tp in ((False, False, True), (True, True, True), (True, False, True),
                                   (True, False, False)):
        assert run_case(group, "straight_through", sp, router_scale=30.0, dtype=torch.float64,
                        comm_overlap=overlap, expert_tp=expert_tp) > 40

    # a tp that does not divide the heads is refused before anything is sharded
    bad = ComplexityForCausalLM(config(**{"model.hidden_size": 48, "model.num_attention_heads": 6,
                                          "model.num_key_value_heads": 3}))
    with pytest.raises(ConfigError, match=r"parallel.tp=2 does not divide model.num_key_value_heads=3"):
        apply_tensor_parallel(bad, group)
    assert bad.model.layers[0].self_attn.k_proj.weight.shape[0] == 24  # untouched


def test_tensor_and_sequence_parallel_equal_one_process():
    spawn_gloo(check, 2)


def test_check_names_each_number():
    cfg = config()
    check_tensor_parallel(cfg, 2)
    with pytest.raises(ConfigError) as e:
        check_tensor_parallel(cfg, 3, sequence_parallel=True, seq_len=SEQ)
    msg = str(e.value)
    assert "parallel.tp=3 does not divide model.num_attention_heads=4" in msg
    assert "model.num_key_value_heads=2" in msg
    assert "data.seq_len=16" in msg
    # whole experts: their intermediate size (12 here) need not split over tp, but they need sequence parallel
    check_tensor_parallel(cfg, 2, sequence_parallel=True, seq_len=SEQ, expert_tp=False)
    with pytest.raises(ConfigError, match="need sequence_parallel"):
        check_tensor_parallel(cfg, 2, expert_tp=False)
    odd = config(**{"model.intermediate_size": 36})  # 9 per expert: does not split over 2 ranks
    with pytest.raises(ConfigError, match="does not divide the expert intermediate size"):
        check_tensor_parallel(odd, 2)
    check_tensor_parallel(odd, 2, sequence_parallel=True, seq_len=SEQ, expert_tp=False)


class _FakeSum:
    """Stands for PartialGradSum in the engine test: records when the step's sum runs."""

    def __init__(self, calls):
        self.params, self.deferred, self.calls = [object()], False, calls

    def defer(self, accumulated_in="grad", dtype=None):
        self.deferred, self.accumulated_in, self.dtype = True, accumulated_in, dtype

    def sum_accumulated(self):
        self.calls.append("tp sum")


class _FakeEngine:
    """The DeepSpeed engine methods defer_tp_partial_grads relies on, and its reduction that records the order."""

    def __init__(self, calls, partitions_gradients=False, optimizer=None):
        self.calls, self.boundary, self.partitions, self.optimizer = calls, False, partitions_gradients, optimizer

    def zero_optimization_partition_gradients(self):
        return self.partitions

    def is_gradient_accumulation_boundary(self):
        return self.boundary

    def allreduce_gradients(self, bucket_size=0):
        self.calls.append("dp reduce" if self.boundary else "no reduce")


def test_partial_sums_deferred_only_where_the_engine_reduces_at_the_boundary():
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from complexity_dist.parallel.deepspeed_engine import defer_tp_partial_grads

    calls = []
    model = torch.nn.Module()
    model.tp_partial_grads = _FakeSum(calls)
    engine = _FakeEngine(calls)  # ZeRO 0/1: DeepSpeed reduces at the accumulation boundary only
    assert defer_tp_partial_grads(engine, model) and model.tp_partial_grads.deferred
    engine.allreduce_gradients()  # a micro-batch inside the accumulation: nothing summed yet
    engine.boundary = True
    engine.allreduce_gradients()  # the last one: the TP sum comes first, then the data-parallel reduction
    assert calls == ["no reduce", "tp sum", "dp reduce"]
    assert model.tp_partial_grads.accumulated_in == "grad"
    # ZeRO 1 summing a bf16 model's gradients in fp32 moves them into `grad_accum` in backward: summed there
    zero1_fp32 = SimpleNamespace(use_grad_accum_attribute=True, gradient_accumulation_dtype=torch.float32)
    model.tp_partial_grads = _FakeSum([])
    assert defer_tp_partial_grads(_FakeEngine([], optimizer=zero1_fp32), model)
    assert (model.tp_partial_grads.accumulated_in, model.tp_partial_grads.dtype) == ("grad_accum", torch.float32)
    # ZeRO 2/3 reduce inside backward, and DeepSpeed's bf16 optimizer copies gradients out in backward: the
    # per-parameter hooks must keep summing there
    for engine in (_FakeEngine([], partitions_gradients=True),
                   _FakeEngine([], optimizer=object.__new__(BF16_Optimizer))):
        model.tp_partial_grads = _FakeSum([])
        assert not defer_tp_partial_grads(engine, model) and not model.tp_partial_grads.deferred
    assert not defer_tp_partial_grads(_FakeEngine([]), torch.nn.Module())  # no tensor parallelism
