"""The DeepSpeed engine for data parallelism with ZeRO stages 0-3, built from our config."""
from __future__ import annotations

import contextlib
import math
import types

import torch
from torch import nn

from complexity_dist.config import Config, Layout


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights and mu get no weight decay (docs/architecture.md, "Training recipe"), nor does a
    parameter the model marks `no_weight_decay` (mu_router under hard routing: an exact zero gradient, it must
    stay as it is). The mark travels with the parameter into any wrapper (pipeline stages, shards)."""
    return param.dim() < 2 or name.endswith(".bias") or "norm" in name or name.endswith("dynamics.mu") or \
        getattr(param, "no_weight_decay", False)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ClippedSkippingAdamW(torch.optim.AdamW):
    """AdamW that clips by global norm itself and refuses a step whose gradient norm is not finite,
    leaving weights and moments untouched.

    Used with ZeRO stage 0, where DeepSpeed hands the step straight to the optimizer and reads `overflow`
    to count a skip. ZeRO stages 1-3 do the clipping and the skip themselves (an invalid norm is an
    overflow there) around a stock AdamW."""

    def __init__(self, params, max_norm: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self.overflow = False
        self.grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        # the global L2 norm before clipping (max_norm inf = measure only)
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm if self.max_norm > 0 else float("inf"))
        self.grad_norm = float(norm)
        self.overflow = not math.isfinite(self.grad_norm)
        if self.overflow:
            return None
        return super().step(closure)


def deepspeed_config(cfg: Config, layout: Layout, bf16: bool) -> dict:
    zero = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.zero_stage in (1, 2):
        zero["reduce_bucket_size"] = cfg.parallel.grad_bucket_size
    if cfg.parallel.zero_stage >= 2:
        # overlap_comm (parallel.overlap_grad_reduce, ZeRO 2 only: check_parallelize): each micro-batch's reduction
        # runs in its backward's gradient hooks, bucket by bucket on DeepSpeed's reduction stream
        zero.update({"overlap_comm": cfg.parallel.overlap_grad_reduce, "contiguous_gradients": True,
                     "reduce_scatter": True})
    if cfg.parallel.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.parallel.zero3_persistence_threshold
    pipeline = {}
    if layout.pp > 1:
        # DeepSpeed's splitting of a boundary's activations over the TP ranks (and gathering them back) is not
        # verified with our boundary (x, v, mu_prev, highway stacked: complexity_dist/parallel/pipeline.py)
        pipeline = {"pipeline": {"pipe_partitioned": False, "grad_partitioned": False}}
    return {
        **pipeline,
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        # stage 0: our optimizer clips (and reports the norm); stages 1-3: DeepSpeed's ZeRO optimizer does
        "gradient_clipping": cfg.optim.grad_clip if cfg.parallel.zero_stage > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "steps_per_print": 10 ** 9,  # we print our own progress
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (enabled by default) synchronises the device at every micro-batch's forward
        # and step: four full syncs per step of two micro-batches, each leaving the GPU idle until the host
        # catches up. We time steps ourselves (train/metrics.py, bench)
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        # fp32 sums, reduced over the data-parallel ranks in fp32 too (a bf16 reduction rounds them again)
        **({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
           if fp32_grad_accumulation(cfg, bf16) else {}),
    }


def fp32_grad_accumulation(cfg: Config, bf16: bool) -> bool:
    """Whether the engine sums a bf16 model's gradients over the micro-batches of a step in fp32, as Megatron
    does for bf16 (its main_grad): yes under ZeRO 1, 2 and 3. DeepSpeed's default sums them in the model's dtype:
    over 64 micro-batches (the 1.5b preset's step) that leaves the summed gradient ~1% off its exact value on a
    tiny model, where an fp32 sum is ~1e-8 off. ZeRO 2 and 3 take DeepSpeed's own option; ZeRO 1 also needs its
    ZeRO optimizer kept (`_zero_optimizer_for_stage1`), so only under the DeepSpeed releases that was checked
    against. ZeRO 0 (our ClippedSkippingAdamW on DeepSpeed's plain data-parallel path) keeps bf16 sums."""
    if not bf16 or cfg.parallel.zero_stage == 0:
        return False
    if cfg.parallel.zero_stage == 1:
        import deepspeed
        return deepspeed.__version__.startswith(FUSED_CHECKS_DEEPSPEED)
    return True


@contextlib.contextmanager
def _zero_optimizer_for_stage1(enabled: bool):
    """Around deepspeed.initialize: keep DeepSpeed's ZeRO 1 optimizer when the config asks for fp32 gradient
    accumulation of a bf16 model (other stages keep their optimizer anyway). DeepSpeed would swap in its
    BF16_Optimizer there (another class, with its own checkpoint layout and none of the fused checks below). Its
    ZeRO 1 optimizer has the mode itself: each gradient is added into an fp32 `grad_accum` beside the parameter
    in the backward hook, and the reduction at the boundary takes those."""
    if not enabled:
        yield
        return
    from deepspeed.runtime.constants import BFLOAT16
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION
    from deepspeed.runtime.engine import DeepSpeedEngine

    stock = DeepSpeedEngine._do_optimizer_sanity_check

    def keep_zero(engine, basic_optimizer):
        wrapper = stock(engine, basic_optimizer)
        return ZERO_OPTIMIZATION if wrapper == BFLOAT16 and engine.zero_optimization_stage() == 1 else wrapper
    DeepSpeedEngine._do_optimizer_sanity_check = keep_zero
    try:
        yield
    finally:
        DeepSpeedEngine._do_optimizer_sanity_check = stock


def _any_nonfinite_grad(self) -> torch.Tensor:
    """ZeRO 1/2's bf16 overflow check (DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial): whether
    any gradient of this rank's partition holds a NaN or an infinity, as a one-element device tensor. The
    stock check runs about seven kernels per gradient tensor, one after another (amax, amin, isfinite, ...):
    in a profile of two 1.5b-preset steps (README, Performance) the GPU sat idle behind those launches for
    294 of its 467 idle milliseconds.
    Here one multi-tensor norm covers them all: a NaN or infinity anywhere makes its tensor's norm non-finite.
    (A finite gradient whose norm exceeds the fp32 range also counts; DeepSpeed's clipping norm would be
    infinite for it too.)"""
    grads = [g for i in range(len(self.bit16_groups)) for g in (self.averaged_gradients[i] or []) if g is not None]
    if not grads:
        from deepspeed.accelerator import get_accelerator
        return torch.zeros(1, dtype=torch.bool, device=get_accelerator().current_device_name())
    return torch.stack(torch._foreach_norm(grads)).isfinite().all().logical_not().reshape(1)


def _grad_norm_fused(self, gradients, params, norm_type=2):
    """ZeRO 1/2's clipping norm of one parameter group (DeepSpeedZeroOptimizer.get_grad_norm_direct), L2 only
    (anything else goes to DeepSpeed's own): the same gradients counted (pipeline-replicated ones skipped, a
    tensor-parallel-replicated one only on model-parallel rank 0), the same sums over the data- and
    model-parallel groups and the same -1 for a non-finite result, but the per-tensor norms as one fp32
    multi-tensor norm instead of an fp64 copy and a norm kernel per tensor, launched one after another."""
    if float(norm_type) != 2.0:
        return type(self).get_grad_norm_direct(self, gradients, params, norm_type)
    import torch.distributed as dist
    from deepspeed.runtime.utils import is_model_parallel_parameter

    grads = (g for g in gradients if not getattr(g, "_zero_padding", False))
    counted = [g for g, p in zip(grads, params) if not getattr(p, "ds_pipe_replicated", False)
               and (is_model_parallel_parameter(p) or self.model_parallel_rank == 0)]
    if counted:
        norms = torch._foreach_norm(counted, 2.0, dtype=torch.float32)
        total = torch.stack(norms).double().pow(2).sum().float()
    else:
        total = torch.zeros((), dtype=torch.float32, device=self.device)
    if dist.get_world_size(group=self.dp_process_group) > 1:  # one rank: a collective of one costs host time
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.sqrt()
    # DeepSpeed's -1 for a non-finite norm, without its host syncs (mask_nan_or_inf_with_val_inplace copies a
    # host tensor in and fills with a device tensor, read back)
    return total.masked_fill_(~total.isfinite(), -1.0)


def _unscale_and_clip_grads_on_device(self, grad_groups_flat, total_norm):
    """ZeRO 1/2's clipping of one group's flat gradient (DeepSpeedZeroOptimizer.unscale_and_clip_grads), the
    same factor min(1, clip / norm) / loss_scale, without the host reading the norm: DeepSpeed checks it for
    validity with a bool() per group (two host syncs per step, in a profile of the 1.5b preset each followed by
    0.1-0.8 ms of idle GPU while the host caught up). step() already takes an invalid norm as an overflow and
    skips; for anyone else an invalid norm gives DeepSpeed's factor (0), chosen on the device.
    With a fused torch AdamW (ZeRO on GPUs) the factor is not multiplied in here: the optimizer step that
    DeepSpeed runs next divides the gradient by its `grad_scale` inside its own kernel, which saves a pass over
    the fp32 gradient partition (the multiply was 1% of a 1.5b-preset step's device time on an H200)."""
    fused = getattr(self.optimizer, "defaults", {}).get("fused", False) and \
        not getattr(self, "torch_autocast_gradscaler", None)  # (that scaler sets grad_scale itself)
    if fused:
        self.optimizer.grad_scale = None  # set again below, for the group stepped next
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    if not torch.is_tensor(total_norm):
        return type(self).unscale_and_clip_grads(self, grad_groups_flat, total_norm)
    combined_scale = torch.full_like(total_norm, self.loss_scale, dtype=torch.float32)
    if self.clip_grad > 0.0:
        valid = total_norm.isfinite() & (total_norm >= 0)
        clip_norm = torch.where(valid, total_norm, torch.full_like(total_norm, float("inf")))
        clip = ((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad
        combined_scale = torch.clamp(clip, min=1.0).float() * self.loss_scale
    if fused:
        self.optimizer.grad_scale = combined_scale
        return
    for grad in grad_groups_flat:
        for g in (grad if isinstance(grad, list) else [grad]):
            g.data.mul_(1.0 / combined_scale)


def _add_into_grad_accum(self, param):
    """ZeRO 1's fp32 gradient accumulation, per parameter in backward (DeepSpeedZeroOptimizer.
    _fill_param_grad_accum_attribute): the same sums, but the bf16 gradient added into the fp32 one by a single
    mixed-dtype kernel, where DeepSpeed first copies it to a new fp32 tensor (twice the memory traffic, and an
    allocation per parameter and micro-batch)."""
    if param.grad is None:
        return
    if param.grad_accum is None:
        param.grad_accum = param.grad.to(self.gradient_accumulation_dtype)
    else:
        param.grad_accum.add_(param.grad.view(param.grad_accum.shape))
    param.grad = None


def _reduce_tied_grads_in_grad_accum(self):
    """The pipeline engine's ReduceTiedGrads (PipelineEngine._exec_reduce_tied_grads) under ZeRO 1's fp32
    accumulation: sums the tied embedding/lm_head's gradient over the first and last stage where that mode keeps
    it, in `grad_accum`. DeepSpeed's own reads `.grad`, which that mode has emptied, and so skipped the sum
    silently (each stage then stepped its own half: a 2-stage run's first gradient norm 0.948 where one stage's
    is 1.104)."""
    import torch.distributed as dist

    for weight, group in self.module.get_tied_weights_and_groups():
        grad = weight.grad_accum if getattr(weight, "grad_accum", None) is not None else weight.grad
        if grad is not None:
            dist.all_reduce(grad, group=group)


def _rebind_bit16_params_if_moved(self, group_index):
    """ZeRO 1/2 after every step (DeepSpeedZeroOptimizer._update_model_bit16_weights): points each bit16
    parameter's .data at its slice of the group's flat buffer again, two `.data =` per parameter that the host
    runs while the GPU waits (in a profile of two 1.5b-preset steps, README Performance, 11.8 ms of the 70 ms
    the GPU sat idle). The updated weights are all-gathered into that buffer in place, so the parameters still
    are those slices: a pointer check per parameter, and DeepSpeed's rebind only when one is not (a checkpoint
    load or an offload may have moved it)."""
    flat = self.bit16_groups_flat[group_index]
    base, itemsize = flat.data_ptr(), flat.element_size()
    for p, meta, offset in zip(self.round_robin_bit16_groups[group_index], self.round_robin_bit16_meta[group_index],
                               self.round_robin_bit16_offsets[group_index]):
        if p.data_ptr() != base + offset * itemsize or p.shape != meta.shape or not p.is_contiguous():
            return type(self)._update_model_bit16_weights(self, group_index)
    return None  # (DeepSpeed's second loop rebinds each parameter to itself: its round-robin order is a permutation)


# the DeepSpeed releases whose DeepSpeedZeroOptimizer internals the replacements above were checked
# against (tests/test_overflow_check.py); under any other, DeepSpeed's own methods run
FUSED_CHECKS_DEEPSPEED = ("0.19.",)


def fuse_grad_checks(optimizer) -> bool:
    """Give a DeepSpeed ZeRO 1/2 optimizer the fused overflow check and clipping norm above, the clipping without
    host syncs, and the rebind that skips parameters already in place (in place). False
    when `optimizer` is not one (ZeRO 0 uses our ClippedSkippingAdamW, whose clip_grad_norm_ is already one
    multi-tensor norm; ZeRO 3 has its own optimizer class) or DeepSpeed is not a release they were checked
    against."""
    import deepspeed

    if not deepspeed.__version__.startswith(FUSED_CHECKS_DEEPSPEED):
        return False
    needed = ("has_overflow_partitioned_grads_serial", "get_grad_norm_direct", "averaged_gradients", "bit16_groups",
              "dp_process_group", "model_parallel_rank", "_model_parallel_all_reduce", "_update_model_bit16_weights",
              "bit16_groups_flat", "round_robin_bit16_groups", "round_robin_bit16_meta", "round_robin_bit16_offsets",
              "unscale_and_clip_grads", "clip_grad", "loss_scale")
    if not all(hasattr(optimizer, name) for name in needed):
        return False
    optimizer.has_overflow_partitioned_grads_serial = types.MethodType(_any_nonfinite_grad, optimizer)
    optimizer.get_grad_norm_direct = types.MethodType(_grad_norm_fused, optimizer)
    optimizer._update_model_bit16_weights = types.MethodType(_rebind_bit16_params_if_moved, optimizer)
    optimizer.unscale_and_clip_grads = types.MethodType(_unscale_and_clip_grads_on_device, optimizer)
    if getattr(optimizer, "use_grad_accum_attribute", False):
        optimizer._fill_param_grad_accum_attribute = types.MethodType(_add_into_grad_accum, optimizer)
    return True


def build_engine(model: nn.Module, cfg: Config, layout: Layout, bf16: bool, mpu=None,
                 expert_group_name: str | None = None):
    """Returns the DeepSpeed engine. The learning rate is set by the trainer before every step.

    `mpu` (complexity_dist/parallel/groups.py `deepspeed_mpu`): with model parallelism, the groups that
    make ZeRO partition over the data-parallel group only and clipping count TP-replicated parameters
    once; None for pure data parallelism. `expert_group_name` (complexity_dist/parallel/parallelize.py):
    with expert parallelism, the expert parameters go into their own optimizer groups, which ZeRO partitions
    over the expert-data-parallel group."""
    import deepspeed  # imported late: it picks its accelerator (CPU or CUDA) at import time

    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if expert_group_name is not None:
        from complexity_dist.parallel.expert_parallel import split_expert_param_groups
        groups = split_expert_param_groups(groups, expert_group_name)
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if cfg.parallel.zero_stage == 0:
        optimizer = ClippedSkippingAdamW(groups, max_norm=o.grad_clip, **kwargs)
    else:
        # ZeRO wraps a stock torch AdamW (it refuses unknown optimizer classes) and does clip + skip itself
        fused = next(model.parameters()).is_cuda
        optimizer = torch.optim.AdamW(groups, fused=fused, **kwargs)
    # a PipelineModule brings its own groups (DeepSpeed refuses an mpu beside it)
    with _zero_optimizer_for_stage1(fp32_grad_accumulation(cfg, bf16)):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=mpu,
                                               config=deepspeed_config(cfg, layout, bf16), dist_init_required=False)
    fuse_grad_checks(engine.optimizer)
    if getattr(engine.optimizer, "use_grad_accum_attribute", False) and hasattr(engine, "_INSTRUCTION_MAP"):
        from deepspeed.runtime.pipe.schedule import ReduceTiedGrads
        # the pipeline engine looks its instructions up in this class-level table: replaced for this engine only
        engine._INSTRUCTION_MAP = {**engine._INSTRUCTION_MAP, ReduceTiedGrads: _reduce_tied_grads_in_grad_accum}
    defer_tp_partial_grads(engine, model)
    return engine


def defer_tp_partial_grads(engine, model: nn.Module) -> bool:
    """With tensor parallelism, sum the TP-partial gradients (complexity_dist/parallel/tensor_parallel.py
    PartialGradSum) once per optimizer step, first thing in the engine's gradient reduction at the accumulation
    boundary, instead of per parameter and micro-batch in backward. Only where nothing reads a gradient before
    that point: ZeRO 0/1 without DeepSpeed's bf16 optimizer (which copies gradients into its own fp32 buffers
    in backward) and outside the pipeline engine (whose reduction takes another path). Elsewhere the hooks
    keep summing in backward. Returns whether it deferred."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.pipe.engine import PipelineEngine

    partial = getattr(model, "tp_partial_grads", None)
    if partial is None or not partial.params or isinstance(engine, PipelineEngine) \
            or engine.zero_optimization_partition_gradients() or isinstance(engine.optimizer, BF16_Optimizer):
        return False
    reduce = engine.allreduce_gradients

    def allreduce_gradients(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            partial.sum_accumulated()
        return reduce(*args, **kwargs)
    engine.allreduce_gradients = allreduce_gradients
    if getattr(engine.optimizer, "use_grad_accum_attribute", False):  # ZeRO 1 summing in fp32 (deepspeed_config)
        partial.defer("grad_accum", engine.optimizer.gradient_accumulation_dtype)
    else:
        partial.defer()
    return True


def global_grad_norm(engine) -> float:
    """The pre-clipping gradient norm of the last step (nan when unknown)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        norm = getattr(engine.optimizer, "grad_norm", None)
    return float("nan") if norm is None else float(norm)
