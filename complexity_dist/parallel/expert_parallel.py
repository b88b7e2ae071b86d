"""Expert parallelism by token id: expert e lives on rank e mod ep of the EP group.

`apply_expert_parallel(model, ep_group)` keeps, in every TokenRoutedMLP, only this rank's experts
(r, r+ep, r+2ep, ... in that order) and replaces the instance's `compute_experts` (the seam in
complexity_dist/model/experts.py): tokens are sorted by destination rank, travel by an autograd-aware
all-to-all (comm.all_to_all; its backward sends the gradients back), run through the local experts with
the module's own `expert_forward` (bf16 or FP8 grouped GEMMs), and travel back into their original order.

The all-to-all needs, on every rank, how many rows each rank sends it: a small all-to-all of counts and a
host sync. The base route is token_id % E, so the plan (sort order + split sizes) of the base route is
built once per micro-batch, keyed on the ids tensor, and reused by every layer whose mu override moved no
token. Whether a layer's override moved a token is agreed by a one-number all-reduce: split sizes must
match on every rank, so a rank whose own tokens did not move must still rebuild when another rank's did.
Under tensor x sequence parallel, parallelize applies EP first, so the pre-hook here remembers the full
micro-batch's ids before TP's pre-hook hands the router this rank's slice, and TP's wrapper gathers the
slices' tokens back into one process's (batch, seq) order before calling this compute: ids, tokens and the
cache key are then exactly those of TP x EP without SP.

Gradients: the all-to-all backward already sums, into each expert's weights, the contributions of every
EP rank's tokens. What is left is the data-parallel sum: expert weights over the expert-data-parallel group
(the ranks holding the same experts), everything else over the full data-parallel group. DeepSpeed learns
which is which from `mark_expert_parameters` and `register_expert_groups` (see their docstrings).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MethodType

import torch
import torch.distributed as dist
from torch import nn

from complexity_dist.model.experts import TokenRoutedMLP
from complexity_dist.parallel.comm import all_to_all, group_rank, group_size

EXPERT_GROUP_NAME = "ep_size_{ep}"  # DeepSpeed's own naming of expert groups (deepspeed/moe/layer.py)


def local_experts(num_experts: int, ep: int, rank: int) -> list[int]:
    """Global indices of the experts EP rank `rank` holds, in the order of its parameter rows."""
    return list(range(rank, num_experts, ep))


@dataclass
class RoutePlan:
    """How one micro-batch's tokens travel. Rows are sorted by (destination rank, local expert), so each
    received block is already grouped by local expert and its expert ids follow from the counts alone."""
    order: torch.Tensor          # [T] token positions in sending order
    inverse: torch.Tensor        # [T] position of each token in `order`
    send_splits: list[int]       # rows sent to each EP rank
    recv_splits: list[int]       # rows received from each EP rank
    recv_local: torch.Tensor     # [R] local expert index of each received row


def build_plan(expert: torch.Tensor, num_experts: int, group) -> RoutePlan:
    """expert: [T] global expert per token (the same call on every rank of `group`: it communicates)."""
    ep = group_size(group)
    per_rank = num_experts // ep
    # expert e -> rank e % ep, local row e // ep; key = rank-major position in a [ep, per_rank] table
    key = torch.remainder(expert, ep) * per_rank + torch.div(expert, ep, rounding_mode="floor")
    order = torch.argsort(key, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(key, minlength=num_experts)
    if ep == 1:
        recv_counts = counts
    else:
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=group)  # equal splits: per_rank counts per rank
    splits = torch.stack([counts.view(ep, per_rank).sum(1), recv_counts.view(ep, per_rank).sum(1)]).tolist()
    local_ids = torch.arange(per_rank, device=expert.device).repeat(ep)
    recv_local = local_ids.repeat_interleave(recv_counts, output_size=sum(splits[1]))
    return RoutePlan(order, inverse, splits[0], splits[1], recv_local)


class PlanCache:
    """The base-route plan of the current micro-batch, shared by all layers of one model.

    Keyed on the ids tensor's identity and version counter (an in-place refill of a reused batch buffer
    bumps the version), so a new micro-batch always rebuilds. `builds` counts every plan built, base or
    override, so tests (and profiles) can see how often the count exchange ran."""

    def __init__(self, speculative: bool = False):
        self._key: tuple | None = None
        self._plan: RoutePlan | None = None
        self.builds = 0
        # speculative routing (see apply_expert_parallel): the layers' summed count of tokens the override moved,
        # checked once after the model's forward; and the micro-batch (ids key) that must run checked. A running
        # sum, not a list: dynamo guards a list's length, which made every compiled layer a graph of its own
        self.speculative = speculative
        self.unchecked_moves: torch.Tensor | None = None
        self.rerunning = False
        self.checked_key: tuple | None = None

    def checked(self, token_ids: torch.Tensor) -> bool:
        """Whether a layer checks its own routing: always when not speculative; in the forward that reruns a
        micro-batch whose speculative forward moved tokens, and in that micro-batch's checkpointed recompute
        (its ids remembered by `rerun_of`, which the rerun calls first)."""
        if not self.speculative:
            return True
        key = self.checked_key
        return key is not None and key[0] is token_ids and key[1] == token_ids._version

    def rerun_of(self, token_ids: torch.Tensor) -> None:
        """Remember the micro-batch being rerun, so that its checkpointed recompute runs checked as well."""
        self.checked_key = (token_ids, token_ids._version)

    def base_plan(self, token_ids: torch.Tensor, num_experts: int, group) -> RoutePlan:
        key = (token_ids, token_ids._version)
        if self._key is None or self._key[0] is not key[0] or self._key[1] != key[1]:
            self._plan = self.build(torch.remainder(token_ids.reshape(-1), num_experts), num_experts, group)
            self._key = key
        return self._plan

    def build(self, expert: torch.Tensor, num_experts: int, group) -> RoutePlan:
        self.builds += 1
        return build_plan(expert, num_experts, group)


def _remember_token_ids(module: TokenRoutedMLP, args, kwargs):
    # compute_experts sees only (x, expert); the ids it needs for the base route come from forward's args
    module._ep_token_ids = kwargs["token_ids"] if "token_ids" in kwargs else args[1]


def _expert_parallel_compute(self: TokenRoutedMLP, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    group, cache, E = self._ep_group, self._ep_cache, self.num_experts
    base = torch.remainder(self._ep_token_ids.reshape(-1), E)
    moved = (expert != base).sum()
    if cache.rerunning:
        cache.rerun_of(self._ep_token_ids)
    if not cache.checked(self._ep_token_ids):
        # speculative: route by token id now, no host sync; the model's forward hook checks the counts once
        cache.unchecked_moves = moved if cache.unchecked_moves is None else cache.unchecked_moves + moved
        plan = cache.base_plan(self._ep_token_ids, E, group)
    else:
        if group_size(group) > 1:
            dist.all_reduce(moved, group=group)  # every rank must take the same branch: split sizes must match
        plan = cache.base_plan(self._ep_token_ids, E, group) if int(moved) == 0 else cache.build(expert, E, group)
    received = all_to_all(x.index_select(0, plan.order), group, plan.send_splits, plan.recv_splits)
    y = self.expert_forward(received, plan.recv_local, self.gate_up_proj, self.down_proj)
    if received.requires_grad and not y.requires_grad:
        # nothing received: keep the return all-to-all in the graph, or this rank would skip its backward
        # collective while the others wait for it
        y = received * 0
    return all_to_all(y, group, plan.recv_splits, plan.send_splits).index_select(0, plan.inverse)


def expert_modules(model: nn.Module) -> list[TokenRoutedMLP]:
    return [m for m in model.modules() if isinstance(m, TokenRoutedMLP)]


def _verify_speculative_routing(cache: PlanCache, group):
    """The model's forward hook under speculative routing: one all-reduce and one host sync per forward decide
    whether any layer's mu override moved a token on any rank; if so the forward runs again with every layer
    checking its own routing (and so does that micro-batch's checkpointed recompute), and its output replaces
    the speculative one, whose graph is dropped unused."""
    def hook(model, args, kwargs, output):
        moved, cache.unchecked_moves = cache.unchecked_moves, None
        if moved is None:
            return output
        if group_size(group) > 1:
            dist.all_reduce(moved, group=group)
        if int(moved) == 0:
            return output
        cache.rerunning = True
        try:
            return model(*args, **kwargs)
        finally:
            cache.rerunning = False
    return hook


def apply_expert_parallel(model: nn.Module, ep_group, speculative: bool = False) -> PlanCache:
    """Shard every TokenRoutedMLP of `model` (built identically on every rank) over `ep_group` in place.
    Returns the plan cache the layers share. Parameter names are unchanged; gate_up_proj/down_proj hold
    this rank's experts `local_experts(E, ep, rank)` as rows (recorded on the module as `local_experts`).

    `speculative` (the model's own forward must run, so not under pipeline parallel): every layer routes by
    the base plan without waiting to learn whether its mu override moved a token, and a forward hook on
    `model` checks all layers at once (see _verify_speculative_routing): one host sync per forward instead of
    one per layer."""
    ep, rank = group_size(ep_group), group_rank(ep_group)
    cache = PlanCache(speculative)
    if speculative:
        # counts left by a checkpointed recompute (it runs after the check) must not reach the next check
        model.register_forward_pre_hook(lambda module, args: setattr(cache, "unchecked_moves", None))
        model.register_forward_hook(_verify_speculative_routing(cache, ep_group), with_kwargs=True)
    for module in expert_modules(model):
        E = module.num_experts
        if E % ep:
            raise ValueError(f"expert parallel size {ep} does not divide num_experts={E}")
        rows = local_experts(E, ep, rank)
        index = torch.tensor(rows, device=module.gate_up_proj.device)
        with torch.no_grad():
            module.gate_up_proj = nn.Parameter(module.gate_up_proj.index_select(0, index).clone())
            module.down_proj = nn.Parameter(module.down_proj.index_select(0, index).clone())
        module.local_experts = rows
        module._ep_group, module._ep_cache = ep_group, cache
        module.register_forward_pre_hook(_remember_token_ids, with_kwargs=True)
        module.compute_experts = MethodType(_expert_parallel_compute, module)
    return cache


def routed_override_fraction(model: nn.Module) -> float:
    """Mean over layers of the share of tokens that the mu override sent away from token_id % E, in each
    layer's last forward (this rank's tokens). nan before any forward."""
    fracs = [m.routed_override_frac for m in expert_modules(model) if m.routed_override_frac is not None]
    return float(torch.stack(fracs).float().mean()) if fracs else float("nan")


def mark_expert_parameters(model: nn.Module, group_name: str) -> list[nn.Parameter]:
    """Mark the expert weights the way DeepSpeed's MoE does (deepspeed/moe/experts.py): `allreduce=False`
    makes `deepspeed.moe.utils.is_moe_param` true, and `group_name` names the expert-data-parallel group
    (in deepspeed.utils.groups) that their gradients are reduced and ZeRO-partitioned over. The router
    (mu_router) stays an ordinary replicated parameter. Returns the marked parameters."""
    marked = []
    for module in expert_modules(model):
        for p in (module.gate_up_proj, module.down_proj):
            p.allreduce = False
            p.group_name = group_name
            marked.append(p)
    return marked


def register_expert_groups(group_name: str, ep_group, expert_dp_group) -> None:
    """Hand our EP and expert-data-parallel groups to DeepSpeed under `group_name`, so that its expert
    gradient reduction, ZeRO partitioning and parameter broadcast use exactly the ranks that hold the same
    experts (megatron-core's order), instead of groups DeepSpeed would derive itself."""
    from deepspeed.utils import groups

    groups._EXPERT_PARALLEL_GROUP[group_name] = ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[group_name] = dist.get_process_group_ranks(ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP[group_name] = expert_dp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[group_name] = dist.get_process_group_ranks(expert_dp_group)


def enable_deepspeed_expert_reduction(model: nn.Module, ep_group, expert_dp_group) -> str:
    """Everything DeepSpeed's ZeRO 0-2 engine needs to reduce expert gradients over `expert_dp_group` and
    the rest over the data-parallel group; call after `apply_expert_parallel`, before `deepspeed.initialize`,
    and build the optimizer from `split_expert_param_groups`. Returns the expert group name.

    DeepSpeed switches its expert paths on (`engine.has_moe_layers`) only when the module tree contains a
    `deepspeed.moe.layer.MoE`; marked parameters without one fail (ZeRO 0: KeyError on the group name,
    ZeRO 1/2: no expert process group). So a parameter-free MoE subclass is attached as a marker: it adds no
    state_dict key and never runs. ZeRO 3 refuses native MoE layers, so EP x ZeRO 3 needs another route."""
    from deepspeed.moe.layer import MoE  # late import: deepspeed picks its accelerator at import time

    class _ExpertParallelMarker(MoE):
        def __init__(self, num_experts: int, ep: int, group_name: str):
            nn.Module.__init__(self)  # none of MoE's own gate and experts
            self.num_experts, self.ep_size, self.num_local_experts = num_experts, ep, num_experts // ep
            self.expert_group_name = group_name

        def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
            pass  # our groups are registered below; DeepSpeed must not derive its own

        def forward(self, *args, **kwargs):
            raise RuntimeError("the expert-parallel marker is not a layer")

    ep = group_size(ep_group)
    group_name = EXPERT_GROUP_NAME.format(ep=ep)
    mark_expert_parameters(model, group_name)
    register_expert_groups(group_name, ep_group, expert_dp_group)
    model.add_module("_deepspeed_expert_marker", _ExpertParallelMarker(expert_modules(model)[0].num_experts, ep,
                                                                        group_name))
    return group_name


def split_expert_param_groups(param_groups: list[dict], group_name: str) -> list[dict]:
    """Optimizer groups with the expert parameters moved into their own groups marked `moe: True` and
    named `group_name`: what DeepSpeed's ZeRO 1/2 optimizer requires to partition them over the
    expert-data-parallel group (stage_1_and_2.py `_configure_moe_settings`)."""
    out = []
    for i, g in enumerate(param_groups):
        shared = [p for p in g["params"] if getattr(p, "allreduce", True)]
        experts = [p for p in g["params"] if not getattr(p, "allreduce", True)]
        out.append({**g, "params": shared, "name": g.get("name", f"group{i}")})
        if experts:
            out.append({**g, "params": experts, "name": group_name, "moe": True})
    return out
