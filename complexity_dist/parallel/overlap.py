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

Each direction is one custom operator that issues its collective asynchronously (torch.distributed, async_op),
runs the GEMMs that need no communication, then waits: opaque to the compiler, so inductor can neither hoist
the wait above those GEMMs nor move the collective after them (it does both to functional collectives in a
backward graph), and the overlap is the same in eager mode and compiled. An all-to-all moves the same bytes as
the reduce-scatter it replaces (tp - 1 chunks out, tp - 1 in); the partial sums are added on the receiving
rank. Inside, tokens are kept rank-major ([tp, B, S/tp, ...]: chunk j = rank j's sequence
slice), so the per-chunk GEMMs read contiguous blocks, and chunk results are stacked straight into [B, S, ...]
order: one copy per call, as many as the plain path makes to move the gathered ranks next to the sequence.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.distributed_c10d import _resolve_process_group

from complexity_dist.parallel.comm import group_size


def _group(group_name: str):
    group = _resolve_process_group(group_name)
    return group, dist.get_world_size(group), dist.get_rank(group)


def _others(tp: int, rank: int) -> list[int]:
    return [j for j in range(tp) if j != rank]


def _start_exchange(chunks: torch.Tensor, group, rank: int, tp: int):
    """All-to-all of [(tp-1)*B, ...]: block i goes to the i-th other rank (rank order, skipping this one).
    Returns (receive buffer, work): the blocks from the other ranks in the same order, once work.wait()."""
    rows = chunks.shape[0] // (tp - 1)
    splits = [0 if j == rank else rows for j in range(tp)]
    received = torch.empty_like(chunks)
    work = dist.all_to_all_single(received, chunks.contiguous(), output_split_sizes=splits,
                                  input_split_sizes=splits, group=group, async_op=True)
    return received, work


@torch.library.custom_op("complexity_dist::sp_gathered_mm", mutates_args=())
def _gathered_mm(x: torch.Tensor, weight: torch.Tensor, group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(F.linear(gathered x, weight) [B, S, N], the gathered x rank-major [tp, B, S/tp, K])."""
    group, tp, r = _group(group_name)
    x = x.contiguous()
    B, s, K = x.shape
    full = x.new_empty((tp * B, s, K))  # the concatenated form every backend takes
    work = dist.all_gather_into_tensor(full, x, group=group, async_op=True)
    own = F.linear(x, weight)  # meanwhile: this rank's chunk needs no communication
    work.wait()
    full = full.view(tp, B, s, K)
    out = torch.stack([own if j == r else F.linear(full[j], weight) for j in range(tp)], dim=1)
    return out.view(B, tp * s, -1), full  # [B, tp, s, N] is the sequence in order


@_gathered_mm.register_fake
def _(x, weight, group_name):
    tp = dist.get_world_size(_resolve_process_group(group_name))
    B, s, K = x.shape
    return x.new_empty((B, tp * s, weight.shape[0])), x.new_empty((tp, B, s, K))


@torch.library.custom_op("complexity_dist::sp_gathered_mm_backward", mutates_args=())
def _gathered_mm_backward(grad: torch.Tensor, full: torch.Tensor, weight: torch.Tensor, group_name: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d x [B, S/tp, K], d weight) of _gathered_mm."""
    group, tp, r = _group(group_name)
    _, B, s, K = full.shape
    N = weight.shape[0]
    grad = grad.reshape(B, tp, s, N).transpose(0, 1).contiguous()  # rank-major, like `full`
    # the other ranks' chunks of the input gradient first: their exchange overlaps what follows
    received, work = _start_exchange(torch.cat([grad[j] @ weight for j in _others(tp, r)]), group, r, tp)
    grad_x = grad[r] @ weight
    grad_w = grad.reshape(-1, N).t() @ full.reshape(-1, K)
    work.wait()
    return grad_x + received.view(tp - 1, B, s, K).sum(0), grad_w


@_gathered_mm_backward.register_fake
def _(grad, full, weight, group_name):
    return full.new_empty(full.shape[1:]), weight.new_empty(weight.shape)


@torch.library.custom_op("complexity_dist::sp_scattered_mm", mutates_args=())
def _scattered_mm(x: torch.Tensor, weight: torch.Tensor, group_name: str) -> torch.Tensor:
    """Reduce-scatter over the sequence of F.linear(x [B, S, K], weight): [B, S/tp, N]."""
    group, tp, r = _group(group_name)
    B, S, K = x.shape
    s = S // tp
    chunks = x.reshape(B, tp, s, K).transpose(0, 1)  # [tp, B, s, K] view
    # the other ranks' output chunks first: they travel while this rank's chunk computes
    received, work = _start_exchange(torch.cat([F.linear(chunks[j], weight) for j in _others(tp, r)]),
                                     group, r, tp)
    own = F.linear(chunks[r], weight)
    work.wait()
    return own + received.view(tp - 1, B, s, -1).sum(0)


@_scattered_mm.register_fake
def _(x, weight, group_name):
    tp = dist.get_world_size(_resolve_process_group(group_name))
    B, S, _ = x.shape
    return x.new_empty((B, S // tp, weight.shape[0]))


@torch.library.custom_op("complexity_dist::sp_scattered_mm_backward", mutates_args=())
def _scattered_mm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, group_name: str
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d x [B, S, K], d weight) of _scattered_mm."""
    group, tp, r = _group(group_name)
    B, S, K = x.shape
    s, N = S // tp, weight.shape[0]
    grad = grad.contiguous()
    full = grad.new_empty((tp * B, s, N))
    work = dist.all_gather_into_tensor(full, grad, group=group, async_op=True)
    chunks = x.reshape(B, tp, s, K).transpose(0, 1)  # [tp, B, s, K] view
    grad_x_own = grad @ weight                       # meanwhile: this rank's chunk
    grad_w = grad.reshape(-1, N).t() @ chunks[r].reshape(-1, K)
    work.wait()
    full = full.view(tp, B, s, N)
    grad_x = torch.stack([grad_x_own if j == r else full[j] @ weight for j in range(tp)], dim=1)
    for j in _others(tp, r):
        grad_w = grad_w + full[j].reshape(-1, N).t() @ chunks[j].reshape(-1, K)
    return grad_x.view(B, S, K), grad_w


@_scattered_mm_backward.register_fake
def _(grad, x, weight, group_name):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


class _GatheredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, group_name: str) -> torch.Tensor:
        out, full = _gathered_mm(x, weight, group_name)
        ctx.save_for_backward(full, weight)
        ctx.group_name = group_name
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full, weight = ctx.saved_tensors
        return *_gathered_mm_backward(grad, full, weight, ctx.group_name), None


class _ScatteredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, group_name: str) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.group_name = group_name
        return _scattered_mm(x, weight, group_name)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        return *_scattered_mm_backward(grad, x, weight, ctx.group_name), None


def gathered_linear(x: torch.Tensor, weight: torch.Tensor, group) -> torch.Tensor:
    """F.linear(all-gather of x [B, S/tp, K] along the sequence, weight) -> [B, S, N], the gather overlapped."""
    if group_size(group) == 1:
        return F.linear(x, weight)
    return _GatheredLinear.apply(x, weight, group.group_name)


def scattered_linear(x: torch.Tensor, weight: torch.Tensor, group) -> torch.Tensor:
    """Reduce-scatter along the sequence of F.linear(x [B, S, K], weight) -> [B, S/tp, N], overlapped."""
    if group_size(group) == 1:
        return F.linear(x, weight)
    if x.shape[1] % group_size(group):
        raise ValueError(f"sequence of {x.shape[1]} does not split over {group_size(group)} ranks")
    return _ScatteredLinear.apply(x, weight, group.group_name)
