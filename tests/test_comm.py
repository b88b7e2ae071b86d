"""complexity_dist/parallel/comm.py on 2 gloo processes: each operator's forward and backward against its
definition (the module docstring), computed here from every rank's input, which each rank can rebuild; eager and
compiled (torch 2.11's compile gave reduce_from, reduce_scatter_to and all_to_all zero input gradients)."""

import pytest
import torch
import torch.distributed as dist
from spawn_util import spawn_gloo

from complexity_dist.parallel import comm

WORLD = 2


DEVICE = torch.device("cpu")  # tests/gpu/test_gpu_comm.py runs the same checks on CUDA (NCCL)


def x_of(r, shape=(4, 6)):
    """Rank r's input: distinct per rank and per element."""
    n = torch.tensor(shape).prod().item()
    return ((torch.arange(n, dtype=torch.float64).reshape(shape) + 1) * (1 + r) + 0.5 * r).to(DEVICE)


def g_of(r, shape):
    """Rank r's upstream gradient."""
    n = torch.tensor(shape).prod().item()
    return (torch.linspace(-1, 1, n, dtype=torch.float64).reshape(shape) * (3 - r) + r).to(DEVICE)


def forward_backward(op, rank, shape=(4, 6), **kw):
    x = x_of(rank, shape).requires_grad_()
    y = op(x, **kw)
    y.backward(g_of(rank, y.shape))
    return y.detach(), x.grad


def check(rank, group):
    for compiled in (False, True):
        check_along_dims(rank, group, (4, 6), dims=(0, 1), compiled=compiled)
        check_all_to_all(rank, group, compiled=compiled)


def traced(op, compiled: bool):
    """op, or op through torch.compile (aot_eager: the traced autograd graph, no kernels of its own, so the
    values stay exact)."""
    return torch.compile(op, backend="aot_eager", fullgraph=True) if compiled else op


def check_along_dims(rank, group, shape, dims, compiled=False):
    xs = [x_of(r, shape) for r in range(WORLD)]

    def run(op, **kw):
        return forward_backward(traced(op, compiled), rank=rank, shape=shape, **kw)

    # copy_to: identity forward, all-reduce (sum) backward
    y, gx = run(comm.copy_to, group=group)
    assert torch.equal(y, xs[rank])
    assert torch.equal(gx, sum(g_of(r, y.shape) for r in range(WORLD)))

    # reduce_from: all-reduce forward, identity backward
    y, gx = run(comm.reduce_from, group=group)
    assert torch.equal(y, sum(xs))
    assert torch.equal(gx, g_of(rank, y.shape))

    for dim in dims:
        # gather_from: all-gather forward, this rank's slice of the gradient backward
        y, gx = run(comm.gather_from, group=group, dim=dim)
        assert torch.equal(y, torch.cat(xs, dim=dim))
        assert torch.equal(gx, g_of(rank, y.shape).chunk(WORLD, dim=dim)[rank])

        # scatter_to: this rank's slice forward, all-gather of every rank's gradient backward
        y, gx = run(comm.scatter_to, group=group, dim=dim)
        assert torch.equal(y, xs[rank].chunk(WORLD, dim=dim)[rank])
        assert torch.equal(gx, torch.cat([g_of(r, y.shape) for r in range(WORLD)], dim=dim))

        # reduce_scatter_to: slice of the sum forward, all-gather backward
        y, gx = run(comm.reduce_scatter_to, group=group, dim=dim)
        assert torch.equal(y, sum(xs).chunk(WORLD, dim=dim)[rank])
        assert torch.equal(gx, torch.cat([g_of(r, y.shape) for r in range(WORLD)], dim=dim))

        # gather_to_full: all-gather forward, slice of the summed gradient backward
        y, gx = run(comm.gather_to_full, group=group, dim=dim)
        assert torch.equal(y, torch.cat(xs, dim=dim))
        assert torch.equal(gx, sum(g_of(r, y.shape) for r in range(WORLD)).chunk(WORLD, dim=dim)[rank])

    if compiled:
        return
    # a dimension that does not split over the ranks is refused with the sizes
    with pytest.raises(ValueError, match="dimension 1 of size 5 does not split over 2 ranks"):
        comm.scatter_to(torch.zeros(2, 5), group, dim=1)
    with pytest.raises(ValueError, match="dimension 1 of size 5 does not split over 2 ranks"):
        comm.reduce_scatter_to(torch.zeros(2, 5, device=DEVICE), group, dim=1)


def check_all_to_all(rank, group, compiled=False):

    # all_to_all with uneven and empty splits: rank 0 sends 1 row to itself and 3 to rank 1, rank 1 sends 2 to
    # rank 0 and none to itself
    send = [[1, 3], [2, 0]]
    recv = [[send[s][rank] for s in range(WORLD)] for rank in range(WORLD)]
    rows = [sum(send[r]) for r in range(WORLD)]
    x = x_of(rank)[:rows[rank]].clone().requires_grad_()
    y = traced(comm.all_to_all, compiled)(x, group, send[rank], recv[rank])
    parts = [x_of(s)[:rows[s]].split(send[s]) for s in range(WORLD)]
    assert torch.equal(y.detach(), torch.cat([parts[s][rank] for s in range(WORLD)]))
    # backward: each received row's gradient returns to the rank and row it came from
    y.backward(g_of(rank, y.shape))
    back = [g_of(dest, (sum(recv[dest]), 6)).split(recv[dest])[rank] for dest in range(WORLD)]
    assert torch.equal(x.grad, torch.cat(back))
    if compiled:
        return
    # integer rows (token ids) travel too
    ids = torch.arange(4, device=DEVICE) + 10 * rank
    got = comm.all_to_all(ids[:sum(send[rank])], group, send[rank], recv[rank])
    assert got.tolist() == [i for s in range(WORLD) for i in
                            (torch.arange(4) + 10 * s)[:sum(send[s])].split(send[s])[rank].tolist()]


def check_single(rank, one):
    """A group of one process (and no group) makes every operator the identity, with no communication."""
    x = x_of(rank).requires_grad_()
    for group in (one, None):
        for op in (comm.copy_to, comm.reduce_from):
            assert op(x, group) is x
        for op in (comm.gather_from, comm.scatter_to, comm.reduce_scatter_to, comm.gather_to_full):
            assert op(x, group, 1) is x
        assert comm.all_to_all(x, group, [4], [4]) is x


def check_all(rank):
    group = dist.new_group(list(range(WORLD)))
    singles = [dist.new_group([r]) for r in range(WORLD)]  # every rank takes part in creating each
    check(rank, group)
    check_single(rank, singles[rank])


def test_comm_operators_match_their_definitions():
    spawn_gloo(check_all, WORLD)
