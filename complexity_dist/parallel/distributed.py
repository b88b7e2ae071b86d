"""Process-group setup from the torchrun/SLURM environment, validated before anything is allocated."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from complexity_dist.config import Config, Layout
from complexity_dist.parallel.groups import ParallelGroups, build_groups


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    layout: Layout
    # made by init_distributed from megatron-core's parallel_state; None only for a DistEnv built by hand
    groups: ParallelGroups | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        # megatron-core's rank order decides which replica a rank belongs to; without groups (a world of
        # one built by hand) every rank is its own replica
        return self.groups.dp_rank if self.groups is not None else self.rank

    @property
    def dp_group(self):
        """The data-parallel group (the whole world when tp = pp = 1); None = the default group."""
        return self.groups.dp_group if self.groups is not None else None


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; a plain `python` run is a world of one."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def check_supported(cfg: Config) -> None:
    """Refuse layouts this training loop cannot run, before any process group exists. The layout
    itself (sizes, divisibility) is Layout.build's job; this is what the loop does not do
    (complexity_dist/parallel/parallelize.py check_parallelize: pipeline parallel other than with ZeRO 1,
    tp/ep with ZeRO 0, ep with ZeRO 3, linear backends)."""
    from complexity_dist.parallel.parallelize import check_parallelize

    check_parallelize(cfg)


def init_distributed(cfg: Config) -> DistEnv:
    rank, world, local_rank = world_from_env()
    layout = cfg.layout(world)  # raises ConfigError on sizes that do not divide
    check_supported(cfg)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # DeepSpeed picks its accelerator at import time; on a CPU machine make it the CPU one
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    timeout_min = int(os.environ.get("COMPLEXITY_DIST_TIMEOUT_MIN", 30))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000) if world == 1 else "29500")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_min),
                                device_id=device if backend == "nccl" else None)
    # always, also for pure data parallel (a few small groups): dp_rank and the loss reduction come from it
    groups = build_groups(layout, timeout_min)
    return DistEnv(rank, world, local_rank, device, layout, groups)

