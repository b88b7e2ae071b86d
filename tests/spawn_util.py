"""Run a check on N gloo (or NCCL) processes with torch.multiprocessing.spawn; the test fails with every rank's error.

Usage: `spawn_gloo(check, nprocs)` where `check(rank)` is a module-level function (the spawned processes
import it by name) that runs after the process group exists.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port


def _worker(rank, check, nprocs, port, failures, backend="gloo"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=nprocs)
    try:
        check(rank)
    except BaseException as e:
        # spawn reports only the first failing rank's traceback; the queue keeps every rank's message
        failures.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    finally:
        dist.destroy_process_group()


def spawn_gloo(check, nprocs: int, backend: str = "gloo") -> None:
    """`backend="nccl"`: one GPU per process (rank r on cuda:r), for the tests under tests/gpu."""
    failures = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(_worker, args=(check, nprocs, free_port(), failures, backend), nprocs=nprocs, join=True)
    except Exception:
        msgs = []
        while not failures.empty():
            msgs.append(failures.get())
        pytest.fail("\n".join(msgs) or "a worker failed")
