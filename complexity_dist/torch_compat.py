"""Workarounds for bugs of the torch releases we run on (the GPU machine's 2.11; the suite's 2.13 has none of
these), each in one place for every caller."""
from __future__ import annotations

import torch


def function_output(t: torch.Tensor) -> torch.Tensor:
    """`t` as another tensor object over the same memory (free): what an autograd.Function returns instead of the
    very tensor an op or an in-place collective inside it produced. Torch 2.11's compile lost the gradient of
    such an output (pytorch issue 180642: the backward got zeros): TP, SP and EP (complexity_dist/parallel/
    comm.py) and the FP8 experts (complexity_dist/parallel/fp8.py) trained compiled with wrong gradients."""
    return t.view_as(t)
