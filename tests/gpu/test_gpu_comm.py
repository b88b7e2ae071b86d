"""The collectives of complexity_dist/parallel/comm.py on 2 GPUs (NCCL), where all-gather and reduce-scatter take
NCCL's in-place paths (gloo, in tests/test_comm.py, takes the list/all-reduce fallbacks): the same definitions
checked on [4, 6] (dims 0 and 1: the concatenation path) and [1, 4, 6] (dim 1 behind a batch of one: the direct
path). Skipped with fewer than 2 GPUs.

    python -m pytest -q tests/gpu/test_gpu_comm.py
"""
import pytest
import torch
import torch.distributed as dist
from spawn_util import spawn_gloo

import test_comm

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (run on the 2-GPU machine)")


def check_nccl(rank):
    test_comm.DEVICE = torch.device("cuda", rank)
    group = dist.new_group([0, 1])
    assert dist.get_backend(group) == "nccl"
    for compiled in (False, True):  # compiled: the gradients torch 2.11 lost (tests/test_comm.py)
        test_comm.check_along_dims(rank, group, (4, 6), dims=(0, 1), compiled=compiled)
        test_comm.check_along_dims(rank, group, (1, 4, 6), dims=(1, 2), compiled=compiled)
        test_comm.check_along_dims(rank, group, (2, 4, 6), dims=(1, 2), compiled=compiled)
        test_comm.check_all_to_all(rank, group, compiled=compiled)


def test_comm_operators_on_nccl():
    spawn_gloo(check_nccl, 2, backend="nccl")
