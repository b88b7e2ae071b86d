"""The fused bf16 overflow check and clipping norm that build_engine gives DeepSpeed's ZeRO 1/2 optimizer
(complexity_dist/parallel/deepspeed_engine.py `fuse_grad_checks`): the same answers as DeepSpeed's own
per-tensor versions on the same gradients, and a non-finite gradient still skips the step on every rank; and
the rebind after the step that leaves parameters already in their flat buffer's slices alone. Also, for ZeRO 1-3:
a bf16 model's gradients summed over the micro-batches (and reduced over the ranks) in fp32 (`fp32_grad_accumulation`).
2 gloo processes, bf16, ZeRO 1 and 2 (and 3 for the sums), one spawn."""
import math
import os
import types

import torch
from conftest import tiny_overrides
from spawn_util import spawn_gloo

from complexity_dist.config import Layout, load_config
from complexity_dist.model import ComplexityForCausalLM
from complexity_dist.parallel.deepspeed_engine import (_any_nonfinite_grad, _grad_norm_fused,
                                                       _rebind_bit16_params_if_moved,
                                                       _unscale_and_clip_grads_on_device, build_engine)

WORLD = 2


def _engine(stage: int, world: int = WORLD, device: str = "cpu", **overrides):
    cfg = load_config(None, tiny_overrides(**{"parallel.zero_stage": stage, "train.global_batch": world,
                                              "train.micro_batch": 1, "train.precision": "bf16", **overrides}))
    torch.manual_seed(0)
    return build_engine(ComplexityForCausalLM(cfg.model).to(device), cfg, Layout.build(cfg, world), bf16=True)


def _backward(engine, rank: int, poison_rank: int | None):
    ids = torch.randint(0, 97, (1, 17), generator=torch.Generator().manual_seed(rank)).to(engine.device)
    loss = engine(ids[:, :-1], targets=ids[:, 1:]).loss
    if rank == poison_rank:
        loss = loss * float("nan")
    engine.backward(loss)


def _aliases_flat_buffer(opt, param) -> bool:
    return any(flat.data_ptr() <= param.data_ptr() < flat.data_ptr() + flat.numel() * flat.element_size()
               for flat in opt.bit16_groups_flat)


def _clipping_matches_deepspeed_without_host_reads(opt):
    """The on-device clipping scales a flat gradient (and a list of them) as DeepSpeed's does, for a norm above
    the limit (clipped), below it (unchanged) and an invalid one (-1 or inf: DeepSpeed's factor is 0), and never
    reads a tensor on the host."""
    stock = type(opt).unscale_and_clip_grads
    assert opt.clip_grad == 1.0
    for norm in (7.5, 0.25, -1.0, float("inf")):
        grad = torch.randn(1000, generator=torch.Generator().manual_seed(3))
        want, got, got_list = grad.clone(), grad.clone(), [grad[:400].clone(), grad[400:].clone()]
        stock(opt, [want], torch.tensor(norm))
        host_reads = []
        real = {name: getattr(torch.Tensor, name) for name in ("__bool__", "item", "__float__")}
        for name in real:
            setattr(torch.Tensor, name, lambda t, *a, _n=name: (host_reads.append(_n), real[_n](t, *a))[1])
        try:
            _unscale_and_clip_grads_on_device(opt, [got], torch.tensor(norm))
            _unscale_and_clip_grads_on_device(opt, [got_list], torch.tensor(norm))
        finally:
            for name, fn in real.items():
                setattr(torch.Tensor, name, fn)
        assert host_reads == [], (norm, host_reads)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        torch.testing.assert_close(torch.cat(got_list), want, rtol=1e-6, atol=0)
        assert torch.equal(want, grad) == (norm == 0.25)  # a norm under the limit leaves the gradient as it was
        assert (want.abs().sum() == 0) == (norm in (-1.0, float("inf")))  # an invalid one zeroes it, as DeepSpeed


def _fused_adamw_applies_the_clipping_as_deepspeed(stage: int, rank: int, world: int = WORLD,
                                                    device: str = "cpu"):
    """With a fused AdamW (what ZeRO gets on GPUs) the clipping factor reaches the optimizer as its grad_scale
    instead of a multiply over the gradient: one step moves the fp32 master weights as DeepSpeed's own clipping
    followed by the same optimizer does. A tight grad_clip makes sure the step clips, and a large eps (no weight
    decay) that the update is proportional to the clipped gradient (Adam's m / sqrt(v) alone would hide its
    size)."""
    updates = []
    for ours in (True, False):
        engine = _engine(stage, world, device, **{"optim.grad_clip": 1e-3, "optim.eps": 1.0,
                                                  "optim.weight_decay": 0.0,
                                                  "optim.lr": 100.0})  # an update far above the weights' rounding
        opt = engine.optimizer
        for group in [opt.optimizer.defaults, *opt.optimizer.param_groups]:
            group["fused"] = True  # torch's fused AdamW also runs on CPU
        if not ours:
            opt.unscale_and_clip_grads = types.MethodType(type(opt).unscale_and_clip_grads, opt)
        _backward(engine, rank, poison_rank=None)
        before = [t.detach().clone() for t in opt.single_partition_of_fp32_groups]
        engine.step()
        assert engine.get_global_grad_norm() > 1e-2 and not opt.overflow  # clipped by a factor over 10
        assert (getattr(opt.optimizer, "grad_scale", None) is not None) == ours
        updates.append([t.detach() - b for t, b in zip(opt.single_partition_of_fp32_groups, before)])
    for got, want in zip(*updates):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)  # atol: a weight's fp32 rounding


MICRO_BATCHES = 16


def _micro_batch(r: int, i: int) -> torch.Tensor:
    return torch.randint(0, 97, (1, 17), generator=torch.Generator().manual_seed(1000 * r + i))


def _reference_sums(rank: int) -> dict[str, torch.Tensor]:
    """The step's gradient in fp64 from a bf16 copy of the test model: each rank's MICRO_BATCHES micro-batch
    gradients summed, averaged over the ranks. Also asserts what a bf16 sum of this rank's own gradients (DeepSpeed's
    default) is off by here, ~5e-3, so that the checks below can tell it from an fp32 sum (~1e-6)."""
    cfg = load_config(None, tiny_overrides())
    torch.manual_seed(0)
    reference = ComplexityForCausalLM(cfg.model).to(torch.bfloat16)
    exact = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in reference.named_parameters()}
    own_exact, own_bf16 = {n: e.clone() for n, e in exact.items()}, {n: e.bfloat16() for n, e in exact.items()}
    for r in range(WORLD):
        for i in range(MICRO_BATCHES):
            ids = _micro_batch(r, i)
            reference.zero_grad(set_to_none=True)
            (reference(ids[:, :-1], targets=ids[:, 1:]).loss / MICRO_BATCHES).backward()
            for n, p in reference.named_parameters():
                if p.grad is not None:
                    exact[n] += p.grad.double() / WORLD
                    if r == rank:
                        own_exact[n] += p.grad.double()
                        own_bf16[n] += p.grad
    assert _relative(own_bf16, own_exact) > 1e-3
    return exact


def _relative(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    err = sum(float((got[n].double() - w).pow(2).sum()) for n, w in want.items())
    return math.sqrt(err / sum(float(w.pow(2).sum()) for w in want.values()))


def _sums_micro_batches_in_fp32(stage: int, rank: int, exact: dict[str, torch.Tensor]):
    """The gradient that reaches the optimizer at the accumulation boundary is the fp32 sum of the micro-batches'
    bf16 gradients (deepspeed_engine.fp32_grad_accumulation), averaged over the ranks in fp32: recovered from one
    AdamW step whose update is the gradient itself (eps = lr = 1e6: lr * g / (|g| + eps) = g to 1e-6), and
    compared with `exact` (_reference_sums)."""
    from deepspeed.utils import safe_get_full_fp32_param

    engine = _engine(stage, **{"train.global_batch": WORLD * MICRO_BATCHES, "optim.grad_clip": 0.0,
                               "optim.eps": 1e6, "optim.lr": 1e6, "optim.weight_decay": 0.0})
    params = dict(engine.module.named_parameters())
    before = {n: safe_get_full_fp32_param(p).clone() for n, p in params.items()}
    for i in range(MICRO_BATCHES):
        ids = _micro_batch(rank, i)
        engine.backward(engine(ids[:, :-1], targets=ids[:, 1:]).loss)
        engine.step()
    assert engine.global_steps == 1 and not getattr(engine.optimizer, "overflow", False)
    update = {n: before[n] - safe_get_full_fp32_param(p) for n, p in params.items()}
    assert _relative(update, exact) < 1e-5, (stage, _relative(update, exact))


def _check(rank):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))  # what DeepSpeed reads
    exact = _reference_sums(rank)
    for stage in (1, 2, 3):
        _sums_micro_batches_in_fp32(stage, rank, exact)
    for stage in (1, 2):
        engine = _engine(stage)
        opt = engine.optimizer
        assert opt.has_overflow_partitioned_grads_serial.__func__ is _any_nonfinite_grad
        assert opt.get_grad_norm_direct.__func__ is _grad_norm_fused
        assert opt._update_model_bit16_weights.__func__ is _rebind_bit16_params_if_moved
        assert opt.unscale_and_clip_grads.__func__ is _unscale_and_clip_grads_on_device
        assert not engine.tput_timer.config.enabled  # its device syncs at every micro-batch are off
        _clipping_matches_deepspeed_without_host_reads(opt)
        _fused_adamw_applies_the_clipping_as_deepspeed(stage, rank)
        stock = type(opt).has_overflow_partitioned_grads_serial
        stock_norm = type(opt).get_grad_norm_direct

        def norms(norm):  # one value per parameter group, both ranks' partitions summed
            return [float(norm(opt, opt.averaged_gradients[i], opt.params_in_partition[i]))
                    for i in range(len(opt.bit16_groups))]

        # finite gradients: both checks say no overflow, both norms agree, and the step is taken
        _backward(engine, rank, poison_rank=None)
        assert not bool(_any_nonfinite_grad(opt)) and not bool(stock(opt))
        fused, want = norms(_grad_norm_fused), norms(stock_norm)
        assert all(w > 0 for w in want)
        torch.testing.assert_close(fused, want, rtol=1e-6, atol=0)  # fp32 sums against DeepSpeed's fp64
        before = [p.detach().clone() for p in engine.module.parameters()]
        rebinds = []
        stock_rebind = type(opt)._update_model_bit16_weights
        type(opt)._update_model_bit16_weights = lambda self, i: (rebinds.append(i), stock_rebind(self, i))[1]
        try:
            engine.step()
            assert not opt.overflow and math.isfinite(engine.get_global_grad_norm())
            assert any(not torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
            # the step's updated weights reached the model without DeepSpeed's rebind: its parameters are
            # still the slices of the flat buffers that the all-gather wrote
            assert rebinds == []
            assert all(_aliases_flat_buffer(opt, p) for p in engine.module.parameters())
            # a parameter moved off its slice (as a load may do) is rebound, with its up-to-date value
            moved = next(engine.module.parameters())
            moved.data = torch.zeros_like(moved)
            opt._update_model_bit16_weights(0)
            assert rebinds == [0] and _aliases_flat_buffer(opt, moved) and moved.abs().sum() > 0
        finally:
            type(opt)._update_model_bit16_weights = stock_rebind

        # one infinity in one rank's partition: both checks see it there, the other rank's partition
        # is clean, and has_overflow (all-reduced) says overflow on both ranks
        _backward(engine, rank, poison_rank=None)
        grads = [g for group in opt.averaged_gradients.values() for g in group if g is not None]
        if rank == 1:
            grads[len(grads) // 2].view(-1)[0] = float("inf")
        assert bool(_any_nonfinite_grad(opt)) == bool(stock(opt)) == (rank == 1)
        assert opt.has_overflow() is True
        # the group holding the infinity: -1 (DeepSpeed's mark of a non-finite norm) on both ranks, both ways
        fused, want = norms(_grad_norm_fused), norms(stock_norm)
        assert -1.0 in fused
        torch.testing.assert_close(fused, want, rtol=1e-6, atol=0)
        opt.zero_grad(set_to_none=True)

        # a NaN loss on rank 0 only: the step is skipped on both ranks, weights untouched
        _backward(engine, rank, poison_rank=0)
        before = [p.detach().clone() for p in engine.module.parameters()]
        engine.step()
        assert opt.overflow
        assert all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))


def test_fused_overflow_check_matches_deepspeed_and_skips():
    spawn_gloo(_check, WORLD)
