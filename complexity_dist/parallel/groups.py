"""The process groups of a layout (TP, PP, DP, EP, expert-DP), made by megatron-core's `parallel_state`, and
the `mpu` object DeepSpeed asks for them.

megatron-core is the one place that decides which global ranks form which group (its default order
"tp-cp-ep-dp-pp"); `Layout.coords` in complexity_dist/config.py writes the same arithmetic down so that
it can be checked before any group exists, and tests/test_parallel_layout.py proves the two agree. With
tp = pp = ep = 1 the data-parallel group is the whole world and everything else is a group of one.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch.distributed as dist

from complexity_dist.config import Layout


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's groups and coordinates on each axis of the layout."""

    layout: Layout
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    ep_group: dist.ProcessGroup
    expert_dp_group: dist.ProcessGroup
    model_parallel_group: dist.ProcessGroup  # tp x pp: one replica of the model
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    expert_dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    def ranks(self, axis: str) -> list[int]:
        """Global ranks of this rank's group on `axis`, in group-rank order, as torch.distributed has them."""
        group = {"tp": self.tp_group, "pp": self.pp_group, "dp": self.dp_group, "ep": self.ep_group,
                 "expert_dp": self.expert_dp_group, "model": self.model_parallel_group}[axis]
        return dist.get_process_group_ranks(group)


def _parallel_state():
    # megatron.core's package import warns four times that Transformer Engine/Apex are missing (on CPU);
    # parallel_state needs neither
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        from megatron.core import parallel_state
    return parallel_state


def build_groups(layout: Layout, timeout_minutes: int = 30) -> ParallelGroups:
    """Create the groups of `layout` on the running default process group (every rank must call this:
    group creation is collective). The layout was validated by Layout.build, so megatron-core's own size
    checks cannot fire here."""
    ps = _parallel_state()
    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(f"the process group has {dist.get_world_size()} ranks but the layout was built for "
                           f"{layout.world_size}")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    # gloo copies of the data-parallel groups are for megatron's distributed optimizer, which we do not use
    ps.initialize_model_parallel(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
                                 expert_model_parallel_size=layout.ep,
                                 distributed_timeout_minutes=timeout_minutes, create_gloo_process_groups=False)
    return ParallelGroups(
        layout=layout,
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        expert_dp_group=ps.get_expert_data_parallel_group(),
        model_parallel_group=ps.get_model_parallel_group(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
    )


def destroy_groups() -> None:
    """Forget megatron-core's groups (before destroy_process_group, or before building another layout)."""
    _parallel_state().destroy_model_parallel()


class DeepSpeedMPU:
    """The `mpu` DeepSpeed 0.19.8 accepts (`deepspeed.initialize(mpu=...)`), answering from our groups.

    What DeepSpeed does with it: its batch arithmetic and ZeRO partitioning use the data-parallel group
    and size (without an mpu it would take the whole world as data parallel, and shard ZeRO state over TP
    replicas); gradient-norm clipping sums squared norms over the model-parallel group (tp x pp) and
    counts a parameter without the `tensor_model_parallel` attribute only where the tensor-parallel rank is
    0, so a TP-replicated norm weight is counted once (ZeRO 1/2 asks `get_tensor_model_parallel_rank`,
    ZeRO 3 and the stage-0 clip ask `get_model_parallel_rank`). Checkpoint files are named by
    `get_model_parallel_rank`, which must therefore differ between the ranks of one replica: it is the rank
    within tp x pp (as in DeepSpeed's own PipelineParallelGrid; equal to the tp rank when pp = 1).
    Deliberately absent: `get_sequence_parallel_*` and `initialize_sequence_parallel` — DeepSpeed reads
    those as Ulysses sequence parallelism, which is not what `parallel.sequence_parallel` is."""

    def __init__(self, groups: ParallelGroups):
        self.groups = groups

    # data parallel: ZeRO partitions, gradient averaging, batch-size arithmetic
    def get_data_parallel_group(self):
        return self.groups.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.groups.layout.dp

    def get_data_parallel_rank(self) -> int:
        return self.groups.dp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.groups.ranks("dp")

    # tensor parallel
    def get_tensor_model_parallel_group(self):
        return self.groups.tp_group

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.groups.layout.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return self.groups.tp_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.groups.ranks("tp")[0]

    # pipeline parallel (both spellings DeepSpeed uses)
    def get_pipeline_model_parallel_group(self):
        return self.groups.pp_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.groups.layout.pp

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.groups.pp_rank

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank

    # model parallel = one replica (tp x pp): norms summed over it, checkpoint file names
    def get_model_parallel_group(self):
        return self.groups.model_parallel_group

    def get_model_parallel_world_size(self) -> int:
        return self.groups.layout.model_parallel

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self.groups.model_parallel_group)


def deepspeed_mpu(groups: ParallelGroups | None) -> DeepSpeedMPU | None:
    """The mpu to give DeepSpeed: only when the layout has model parallelism (tp or pp > 1); for pure data
    parallel DeepSpeed's own world-wide groups are the same thing and stay untouched."""
    if groups is None or groups.layout.model_parallel == 1:
        return None
    return DeepSpeedMPU(groups)
