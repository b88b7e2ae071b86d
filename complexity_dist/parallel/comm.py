"""Autograd-aware collectives: the few communication operators every parallel layout is built from.

Each is a torch.autograd.Function whose backward is the collective's adjoint, so a layout is "the model's
math plus these calls at the right places":

    copy_to(x, group)            forward identity,          backward all-reduce (sum)
    reduce_from(x, group)        forward all-reduce (sum),  backward identity
    gather_from(x, group, dim)   forward all-gather on dim, backward keep this rank's slice
    scatter_to(x, group, dim)    forward keep this rank's slice, backward all-gather on dim
    reduce_scatter_to(x, group, dim)  forward reduce-scatter on dim, backward all-gather on dim
    gather_to_full(x, group, dim)     forward all-gather on dim, backward reduce-scatter on dim
    all_to_all(x, group, send_splits, recv_splits)  rows of x travel; backward sends them back

With a group of one process every operator is the identity (no communication). `group=None` means the
same (a single process), not torch.distributed's default world group: pass the group explicitly.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from complexity_dist.torch_compat import function_output


def group_size(group) -> int:
    """Processes in `group`; None is a world of one (not torch.distributed's default group)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def all_gather_cat(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """The ranks' x concatenated along `dim`, rank order. One all-gather into one buffer [n, *x.shape]; moving
    its rank axis next to `dim` is free when only size-1 dimensions precede `dim` (then the ranks' pieces are
    already contiguous blocks of the result) and one copy otherwise (sequence parallel's [B, S/tp, H] with B > 1)."""
    n = group_size(group)
    x = x.contiguous()
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))  # the shape gloo requires; NCCL takes any of this size
    dist.all_gather_into_tensor(out, x, group=group)
    return out.view(n, *x.shape).movedim(0, dim).reshape(*x.shape[:dim], n * x.shape[dim], *x.shape[dim + 1:])


def _splits(x: torch.Tensor, group, dim: int) -> int:
    """The group size, after checking that `dim` of x splits evenly over it."""
    n = group_size(group)
    if x.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {n} ranks")
    return n


def _slice(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return x.chunk(_splits(x, group, dim), dim=dim)[group_rank(group)].contiguous()


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Sum over the ranks, keep this rank's slice of `dim` (half the bytes of an all-reduce on two ranks)."""
    n = _splits(x, group, dim)
    d = x.shape[dim] // n
    # the collective scatters contiguous blocks: block j = rank j's slice of `dim` (a view, no copy, when only
    # size-1 dimensions precede `dim`)
    blocks = x.reshape(*x.shape[:dim], n, d, *x.shape[dim + 1:]).movedim(dim, 0).contiguous()
    out = x.new_empty((*x.shape[:dim], d, *x.shape[dim + 1:]))
    dist.reduce_scatter_tensor(out, blocks.view(n * out.shape[0], *out.shape[1:]), group=group)
    return out


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return function_output(_all_reduce(x, group))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _along_dim(name: str, fwd, bwd):
    """An autograd Function that runs the collective `fwd(x, group, dim)` forward and its adjoint
    `bwd(grad, group, dim)` backward: the four operators on a dimension differ only in this pair."""
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return function_output(fwd(x, group, dim))

    def backward(ctx, grad):
        return bwd(grad, ctx.group, ctx.dim), None, None

    # built by name so that the grad_fn reads e.g. _GatherFromBackward in graphs and profiles
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                    "backward": staticmethod(backward)})


_GatherFrom = _along_dim("_GatherFrom", all_gather_cat, _slice)
_ScatterTo = _along_dim("_ScatterTo", _slice, all_gather_cat)
_ReduceScatterTo = _along_dim("_ReduceScatterTo", _reduce_scatter, all_gather_cat)
_GatherToFull = _along_dim("_GatherToFull", all_gather_cat, _reduce_scatter)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, send_splits, recv_splits):
        ctx.group, ctx.send_splits, ctx.recv_splits = group, send_splits, recv_splits
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_splits, input_split_sizes=send_splits,
                               group=group)
        return function_output(out)

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.send_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), output_split_sizes=ctx.send_splits,
                               input_split_sizes=ctx.recv_splits, group=ctx.group)
        return back, None, None, None


def copy_to(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyTo.apply(x, group)


def reduce_from(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFrom.apply(x, group)


def gather_from(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherFrom.apply(x, group, dim)


def scatter_to(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return x if group_size(group) == 1 else _ScatterTo.apply(x, group, dim)


def reduce_scatter_to(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceScatterTo.apply(x, group, dim)


def gather_to_full(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherToFull.apply(x, group, dim)


def all_to_all(x: torch.Tensor, group, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
    """Rows x[sum(send_splits[:j]) : ...] go to rank j of `group`; returns the rows received, rank by rank."""
    return x if group_size(group) == 1 else _AllToAll.apply(x, group, list(send_splits), list(recv_splits))
