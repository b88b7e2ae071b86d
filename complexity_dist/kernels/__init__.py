"""Fused kernels, each beside the pure-torch function it replaces (selected by `model.kernels`).

- linear_cross_entropy: lm_head GEMM + cross-entropy in chunks of tokens (the full-vocabulary logits never
  exist at once), gradients computed in the forward pass; Triton for the per-chunk softmax/loss/grad.
- inl_dynamics: the elementwise tail of the INL dynamics (sigmoid/softplus/clamp/update) as one Triton
  kernel forward and one backward.

Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests). Elsewhere the
pure-torch twins run (same math), so `model.kernels=triton` never changes what is computed, only how.
Triton is imported lazily: importing this package never needs it.
"""
from __future__ import annotations

import importlib.util
import os

import torch

# Looked up once, at import (find_spec does not import triton): triton_runs_on is traced by torch.compile
# inside each decoder layer, and dynamo cannot trace find_spec on Python 3.12. The graph break that caused
# made a compiled layer under torch.utils.checkpoint (train.activation_checkpointing=selective) fall back to
# eager as a whole: half the tokens/s of the uncheckpointed layer on an H200.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take this tensor: CUDA, or anything under the interpreter."""
    if not _TRITON_INSTALLED or t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for low-precision inputs, the input's own dtype otherwise: complexity_dist.model.layers'
    rule, restated so that this package never imports the model (which imports it)."""
    return torch.promote_types(dtype, torch.float32)
