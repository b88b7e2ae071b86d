"""Activation checkpointing of one decoder layer: none | selective | full (train.activation_checkpointing).

`full` keeps only the layer's inputs and recomputes the whole layer in backward. `selective` is torch's
selective activation checkpointing: the outputs of the expensive ops (GEMMs, attention, out-of-place
collectives) are kept from the forward, and only the cheap elementwise work between them (RMSNorm, RoPE,
INL dynamics tail, SwiGLU activation, routing) is recomputed. Both wrap the same DecoderLayer math
(complexity_dist/model/model.py); nothing here is a second copy of it.
"""
from __future__ import annotations

import functools

from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "selective", "full")

# Ops whose outputs `selective` keeps, by schema name (matched by name so that ops of a backend that is not
# loaded, e.g. the functional collectives, need no import here).
SAVED_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "aten::_scaled_mm",
    "complexity_dist::fp8_grouped_mm",  # the FP8 experts' GEMM (complexity_dist/parallel/fp8.py)
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    # out-of-place collectives: saving them also spares the communication in backward. The in-place ones
    # of torch.distributed (c10d::allreduce_, ..., what complexity_dist/parallel/comm.py calls) are left to
    # recompute: a cached result would not land in the buffer that the caller reads after the call.
    "_c10d_functional::all_reduce", "_c10d_functional::reduce_scatter_tensor",
    "_c10d_functional::all_gather_into_tensor", "_c10d_functional::all_to_all_single",
})


def _selective_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    name = getattr(getattr(func, "_schema", None), "name", None)
    # MUST_SAVE: the compiler's partitioner may not trade these back for recomputation
    return CheckpointPolicy.MUST_SAVE if name in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_selective_context = functools.partial(create_selective_checkpoint_contexts, _selective_policy)


def run_checkpointed(mode: str, fn, *args):
    """fn(*args) under `mode`'s activation checkpointing (`none`: a plain call)."""
    if mode == "none":
        return fn(*args)
    if mode == "full":
        return checkpoint(fn, *args, use_reentrant=False)
    if mode == "selective":
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_selective_context)
    raise ValueError(f"activation checkpointing {mode!r} is not one of {', '.join(MODES)}")
