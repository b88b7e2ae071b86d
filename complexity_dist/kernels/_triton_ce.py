"""Triton kernel of complexity_dist/kernels/linear_cross_entropy.py (imported only when it runs): one program
per token row, two passes over the vocabulary in blocks: an online log-sum-exp, then the gradient
(softmax - onehot) * scale written over the logits in place."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 4096


@triton.jit
def triton_ce_row(logits_ptr, stride, targets_ptr, loss_ptr, scale_ptr, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    t = tl.load(targets_ptr + row).to(tl.int64)
    valid = t != ignore_index
    m = tl.zeros([], dtype=tl.float32) - float("inf")
    s = tl.zeros([], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    x_t = tl.load(base + tl.where(valid, t, 0)).to(tl.float32)  # read before the row is overwritten
    tl.store(loss_ptr + row, tl.where(valid, lse - x_t, 0.0))
    g_scale = tl.where(valid, tl.load(scale_ptr), 0.0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)) * g_scale
        tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)


def chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                        ignore_index: int) -> torch.Tensor:
    """As chunk_loss_and_grad_torch: returns the fp32 sum of the chunk's token losses, logits become grads."""
    rows, V = logits.shape
    assert logits.stride(1) == 1
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    triton_ce_row[(rows,)](logits, logits.stride(0), targets.contiguous(), loss, scale.to(torch.float32), V,
                           ignore_index, BLOCK_V=min(BLOCK_V, triton.next_power_of_2(V)), num_warps=8)
    return loss.sum()
