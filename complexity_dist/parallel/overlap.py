"""Sequence-parallel GEMMs whose collective runs while part of the GEMM computes (tensor parallel with
sequence parallel, torch linear backend; `parallel.tp_comm_overlap`).

Under SP a column-parallel projection needs the whole sequence of its input, gathered from the TP ranks, and a
row-parallel one hands each rank its slice of the sequence, summed over the ranks. Done as "collective, then
GEMM" (complexity_dist/parallel/comm.py), the GPU runs the two one after the other. Split by the rank that owns
each sequence chunk, part of the GEMM needs no communication at all, so it runs while the collective travels:

    gathered_linear(x [B, S/tp, K], W [N, K]) -> [B, S, N]   all_gather(x) @ W^T
        start the all-gather; this rank's chunk x @ W^T meanwhile; then the other ranks' chunks.
        backward: the other ranks' input-gradient chunks first, sent by one all-to-all (each rank gets the
        partial sums of its own chunk) while this rank's chunk and the weight gradient compute.
    scattered_linear(x [B, S, K], W [N, K]) -> [B, S/tp, N]  reduce_scatter(x @ W^T) over the sequence
        the other ranks' output chunks first, sent by one all-to-all while this rank's chunk computes; the
        received partial sums are added to it.
        backward: start the all-gather of the output gradient; this rank's chunk of the input gradient and
        its share of the weight gradient meanwhile; then the other chunks.

The collectives are torch's functional collectives: asynchronous, waited for where their result is first
used, in eager mode and in a compiled graph alike, so program order is what overlaps them. An all-to-all moves
the same bytes as the reduce-scatter it replaces (tp - 1 chunks out, tp - 1 in), and the partial sums are added
on the receiving rank. Inside, tokens are kept rank-major ([tp, B, S/tp, ...]: chunk j = rank j's sequence
slice), so the per-chunk GEMMs read contiguous blocks, and chunk results are stacked straight into [B, S, ...]
order: one copy per call, as many as the plain path makes to move the gathered ranks next to the sequence.
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from complexity_dist.parallel.comm import group_rank, group_size

# torch renamed all_gather_tensor to all_gather_single; both gather along dim 0
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def _exchange(chunks: torch.Tensor, group, rank: int, tp: int) -> torch.Tensor:
    """All-to-all of [(tp-1)*B, ...]: block i goes to the i-th other rank (rank order, skipping this one);
    returns the blocks received from the other ranks in the same order."""
    rows = chunks.shape[0] // (tp - 1)
    splits = [0 if j == rank else rows for j in range(tp)]
    return funcol.all_to_all_single(chunks.contiguous(), splits, splits, group)


def _others(tp: int, rank: int) -> list[int]:
    return [j for j in range(tp) if j != rank]


class _GatheredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, group) -> torch.Tensor:
        tp, r = group_size(group), group_rank(group)
        x = x.contiguous()
        B, s, K = x.shape
        gathered = _all_gather(x, 0, group)  # [tp*B, s, K], in flight
        own = F.linear(x, weight)            # meanwhile: this rank's chunk needs no communication
        full = gathered.view(tp, B, s, K)    # waits for the gather
        out = torch.stack([own if j == r else F.linear(full[j], weight) for j in range(tp)], dim=1)
        ctx.save_for_backward(full, weight)
        ctx.group = group
        return out.view(B, tp * s, -1)  # [B, tp, s, N] is the sequence in order

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full, weight = ctx.saved_tensors
        group = ctx.group
        tp, r = group_size(group), group_rank(group)
        _, B, s, K = full.shape
        N = weight.shape[0]
        grad = grad.reshape(B, tp, s, N).transpose(0, 1).contiguous()  # rank-major, like `full`
        # the other ranks' chunks of the input gradient first: their exchange overlaps what follows
        received = _exchange(torch.cat([grad[j] @ weight for j in _others(tp, r)]), group, r, tp)
        grad_x = grad[r] @ weight
        grad_w = grad.reshape(-1, N).t() @ full.reshape(-1, K)
        grad_x = grad_x + received.view(tp - 1, B, s, K).sum(0)
        return grad_x, grad_w, None


class _ScatteredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, group) -> torch.Tensor:
        tp, r = group_size(group), group_rank(group)
        B, S, K = x.shape
        s = S // tp
        chunks = x.reshape(B, tp, s, K).transpose(0, 1)  # [tp, B, s, K] view
        # the other ranks' output chunks first: they travel while this rank's chunk computes
        received = _exchange(torch.cat([F.linear(chunks[j], weight) for j in _others(tp, r)]), group, r, tp)
        own = F.linear(chunks[r], weight)
        ctx.save_for_backward(x, weight)
        ctx.group = group
        return own + received.view(tp - 1, B, s, -1).sum(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        group = ctx.group
        tp, r = group_size(group), group_rank(group)
        B, S, K = x.shape
        s, N = S // tp, weight.shape[0]
        grad = grad.contiguous()
        gathered = _all_gather(grad, 0, group)                # [tp*B, s, N], in flight
        chunks = x.reshape(B, tp, s, K).transpose(0, 1)       # [tp, B, s, K] view
        grad_x_own = grad @ weight                            # meanwhile: this rank's chunk
        grad_w = grad.reshape(-1, N).t() @ chunks[r].reshape(-1, K)
        full = gathered.view(tp, B, s, N)                     # waits for the gather
        grad_x = torch.stack([grad_x_own if j == r else full[j] @ weight for j in range(tp)], dim=1)
        for j in _others(tp, r):
            grad_w = grad_w + full[j].reshape(-1, N).t() @ chunks[j].reshape(-1, K)
        return grad_x.view(B, S, K), grad_w, None


def gathered_linear(x: torch.Tensor, weight: torch.Tensor, group) -> torch.Tensor:
    """F.linear(all-gather of x [B, S/tp, K] along the sequence, weight) -> [B, S, N], the gather overlapped."""
    if group_size(group) == 1:
        return F.linear(x, weight)
    return _GatheredLinear.apply(x, weight, group)


def scattered_linear(x: torch.Tensor, weight: torch.Tensor, group) -> torch.Tensor:
    """Reduce-scatter along the sequence of F.linear(x [B, S, K], weight) -> [B, S/tp, N], overlapped."""
    if group_size(group) == 1:
        return F.linear(x, weight)
    if x.shape[1] % group_size(group):
        raise ValueError(f"sequence of {x.shape[1]} does not split over {group_size(group)} ranks")
    return _ScatteredLinear.apply(x, weight, group)
