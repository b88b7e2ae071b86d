"""The parallelize step (torchtitan's): the one place where the layout is applied to the plain model.

`parallelize(model, cfg, groups)` takes the single-process `ComplexityForCausalLM` (built with the same seed on
every rank) and applies, in this order:

1. expert parallel over the EP group (complexity_dist/parallel/expert_parallel.py): this rank keeps the rows
   of experts e with e mod ep = its EP rank and sends tokens to their expert's rank;
2. tensor parallel (+ sequence parallel) over the TP group (complexity_dist/parallel/tensor_parallel.py), which
   shards those rows further and wraps the expert computation in its copy/reduce, and marks every sharded
   parameter `tensor_model_parallel = True`: DeepSpeed's gradient-norm clipping (`is_model_parallel_parameter`)
   then sums sharded parameters over the model-parallel group and counts a replicated one only once;
3. tells DeepSpeed which parameters are expert parameters (reduced and ZeRO-partitioned over the
   expert-data-parallel group);
4. with model.linear_backend=te, hands the (sharded) dense projections to Transformer Engine's Linear and, with
   train.fp8, runs the decoder under FP8 autocast (complexity_dist/parallel/te_backend.py);
5. with model.linear_backend=torch and train.fp8=current, runs the large (sharded) projections as FP8 GEMMs
   and, with train.fp8_experts, the experts' grouped GEMMs too (complexity_dist/parallel/fp8.py).

It returns a `Parallelized` record that the engine and the checkpointer need: the expert group name (the
optimizer's expert param groups), the DeepSpeed mpu, and how to gather full weights on one rank.

`check_parallelize(cfg)` refuses, before any process group exists, what this loop does not run (see its
messages): pipeline parallelism other than with ZeRO 1 (and with expert parallel), tensor or expert
parallel with ZeRO 0, expert parallel with ZeRO 3, the overlapped gradient reduction other than with ZeRO 2,
and the model.linear_backend values that cannot run with
the layout or on this machine (te on CPU or without Transformer Engine; te with train.fp8 for now, as its GPU
check was inconclusive; FP8 on a GPU without it or with sizes not divisible by 16; te's FP8 with activation
checkpointing; te with selective activation checkpointing; megatron with tp=1, sequence parallel, pipeline
parallel, train.compile or train.fp8; train.fp8=delayed without te, train.fp8 with the TP comm overlap;
FP8 experts without train.fp8=current and the torch backend, or on a GPU other than sm90).

What combines, each proven equal to one process through the trainer (tests/test_parallel_train.py,
tests/test_parallel_zero3.py, tests/test_pipeline_train.py): TP (+SP) and EP with ZeRO 1 and 2, TP x EP (+SP:
the TP wrapper gathers the sequence slices' tokens back into one process's order before the EP compute, which
keeps the full micro-batch's ids that EP's pre-hook remembered before TP's sliced them), TP
with ZeRO 3 (also TP x DP with every parameter partitioned: ZeRO 3 partitions over the mpu's data-parallel
group, and a weight read outside its own module's forward, as the attention reads q_proj.weight, is gathered by
DeepSpeed's external-parameter tracking), EP x DP, PP with ZeRO 1 and TP x PP.
Compiled layers: TP2 + SP and EP2 (tests/test_parallel_train.py), and on NCCL tests/gpu/test_gpu_layouts.py.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from complexity_dist.config import Config, ConfigError


def check_parallelize(cfg: Config) -> None:
    """Raise ConfigError for a layout the training loop refuses (the layout's own arithmetic is
    config.layout_problems'). Every message names the setting and the fix."""
    p = cfg.parallel
    problems = []
    if p.pp > 1:
        # complexity_dist/parallel/pipeline.py: DeepSpeed's PipelineEngine, proven with ZeRO 1 on CPU/gloo
        if p.zero_stage != 1:
            why = ("DeepSpeed's PipelineEngine refuses ZeRO 2 and 3 (it needs whole gradients for its "
                   "per-micro-batch backward)" if p.zero_stage >= 2 else
                   "the stage-0 optimizer clips by a norm of this stage's parameters only")
            problems.append(f"parallel.pp={p.pp} with parallel.zero_stage={p.zero_stage}: {why}; use "
                            f"parallel.zero_stage=1")
        if p.ep > 1:
            problems.append(f"parallel.pp={p.pp} with parallel.ep={p.ep}: expert parallel inside pipeline stages "
                            f"is not done yet; set parallel.ep=1 (pp combines with tp and data parallelism)")
        if cfg.model.linear_backend != "torch":
            problems.append(f"parallel.pp={p.pp} with model.linear_backend={cfg.model.linear_backend!r} is not "
                            f"verified; set model.linear_backend=torch")
    if p.tp > 1 or p.ep > 1:
        what = " and ".join(x for x, on in (("parallel.tp", p.tp > 1), ("parallel.ep", p.ep > 1)) if on)
        if p.zero_stage == 0:
            problems.append(f"{what} > 1 with parallel.zero_stage=0: the stage-0 optimizer clips by a norm of "
                            f"this rank's parameters only, which is wrong for sharded weights; use "
                            f"parallel.zero_stage=1 or 2 (ZeRO 1 costs nothing extra in communication)")
    if p.ep > 1 and p.zero_stage == 3:
        # DeepSpeed switches its expert reduction on through a deepspeed.moe.layer.MoE in the module tree
        # (complexity_dist/parallel/expert_parallel.py); without one, ZeRO 3 would partition the expert rows
        # over the data-parallel group and average their gradients over it, which is wrong for them
        problems.append(f"parallel.ep={p.ep} > 1 with parallel.zero_stage=3: DeepSpeed 0.19.8's ZeRO 3 raises "
                        f"'Native DeepSpeed MoE is not supported with ZeRO Stage 3' for the MoE marker that "
                        f"makes it reduce expert gradients over the expert-data-parallel group; use "
                        f"parallel.zero_stage=1 or 2")
    if p.overlap_grad_reduce and p.pp > 1:
        problems.append(f"parallel.overlap_grad_reduce=true with parallel.pp={p.pp}: pipeline stages run ZeRO 1 "
                        f"only, and the overlapped reduction is ZeRO 2's; set parallel.overlap_grad_reduce=false")
    elif p.overlap_grad_reduce and p.zero_stage != 2:
        why = ("DeepSpeed 0.19.8's ZeRO 1 with overlap_comm sums the gradients of a step of several micro-batches "
               "wrongly (on 2 processes, 2 micro-batches each: a first gradient norm of 1.547 or 1.139 where 1.415 "
               "is right)" if p.zero_stage == 1 else "the overlapped reduction is ZeRO 2's")
        problems.append(f"parallel.overlap_grad_reduce=true with parallel.zero_stage={p.zero_stage}: {why}; use "
                        f"parallel.zero_stage=2, or parallel.overlap_grad_reduce=false")
    if p.sequence_parallel and p.tp > 1 and cfg.data.seq_len % p.tp:
        problems.append(f"parallel.sequence_parallel needs parallel.tp={p.tp} to divide data.seq_len="
                        f"{cfg.data.seq_len}")
    problems += linear_backend_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))


def linear_backend_problems(cfg: Config) -> list[str]:
    """What model.linear_backend cannot do with this layout or on this machine (one message each)."""
    from complexity_dist.parallel.tensor_parallel import MEGATRON_SP_REFUSAL

    backend, p = cfg.model.linear_backend, cfg.parallel
    problems = []
    if backend == "te":
        if cfg.train.activation_checkpointing == "selective":
            problems.append("model.linear_backend=te with train.activation_checkpointing=selective: Transformer "
                            "Engine's GEMMs are its own kernels, not the aten matmuls whose outputs the selective "
                            "policy saves (complexity_dist/model/checkpointing.py), so they would be recomputed "
                            "(full's cost; not verified); use train.activation_checkpointing=full or none, or "
                            "model.linear_backend=torch")
        problems += _te_problems(cfg)
    elif backend == "torch" and cfg.train.fp8 != "none":
        problems += _torch_fp8_problems(cfg)
    elif cfg.train.fp8 != "none":
        problems.append(f"train.fp8={cfg.train.fp8} runs with model.linear_backend=torch (our FP8 GEMMs) or te "
                        f"(Transformer Engine's), not {backend!r}; set one of those or train.fp8=none")
    if cfg.train.fp8_experts and (cfg.train.fp8 == "none" or backend != "torch"):
        problems.append(f"train.fp8_experts=true runs the experts with our FP8 grouped GEMMs, which come with "
                        f"train.fp8=current and model.linear_backend=torch (not train.fp8={cfg.train.fp8}, "
                        f"model.linear_backend={backend}); set those, or train.fp8_experts=false")
    if backend == "megatron":
        if p.tp == 1:
            problems.append("model.linear_backend=megatron replaces the tensor-parallel linears and needs "
                            "parallel.tp > 1; with parallel.tp=1 use model.linear_backend=torch (the same GEMMs)")
        if p.sequence_parallel and p.tp > 1:
            problems.append(MEGATRON_SP_REFUSAL)
        if cfg.train.compile:
            problems.append("model.linear_backend=megatron with train.compile=true is not verified (megatron's "
                            "autograd functions run collectives in backward); set train.compile=false or "
                            "model.linear_backend=torch")
    return problems


def _fp8_size_problems(cfg: Config) -> list[str]:
    """FP8 GEMMs (cuBLASLt, for TE's and ours) need every dimension divisible by 16: the tokens of a micro-batch
    (seq_len), the hidden size, the query and key/value widths of this tensor-parallel rank."""
    m, tp = cfg.model, cfg.parallel.tp
    sizes = {"data.seq_len": cfg.data.seq_len, "model.hidden_size": m.hidden_size,
             "model.head_dim * num_attention_heads / parallel.tp": m.head_dim * m.num_attention_heads // tp,
             "model.head_dim * num_key_value_heads / parallel.tp": m.head_dim * m.num_key_value_heads // tp}
    if cfg.model.linear_backend == "te":  # te runs the dynamics controller in FP8 too
        sizes["model.dynamics_controller_hidden"] = m.dynamics_controller_hidden
    return [f"train.fp8={cfg.train.fp8}: FP8 GEMMs need {name}={value} divisible by 16"
            for name, value in sizes.items() if value % 16]


def _torch_fp8_problems(cfg: Config) -> list[str]:
    """What keeps train.fp8 with model.linear_backend=torch (complexity_dist/parallel/fp8.py) from running."""
    fp8, problems = cfg.train.fp8, []
    if fp8 != "current":
        problems.append(f"train.fp8={fp8} (scales from an amax history) is Transformer Engine's recipe; with "
                        f"model.linear_backend=torch use train.fp8=current, or set model.linear_backend=te")
    if cfg.parallel.tp_comm_overlap and cfg.parallel.tp > 1:
        problems.append("train.fp8 with parallel.tp_comm_overlap=true: the overlapped projections are their own "
                        "GEMMs, not FP8 ones; set parallel.tp_comm_overlap=false")
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        problems.append(f"train.fp8={fp8}: this GPU (compute capability {major}.{minor}) has no FP8 GEMMs (8.9+: "
                        f"H100, H200, L40S); set train.fp8=none")
    if cfg.train.fp8_experts:
        problems += _fp8_expert_problems(cfg)
    return problems + _fp8_size_problems(cfg)


def _fp8_expert_problems(cfg: Config) -> list[str]:
    """FP8 experts run torch's FP8 grouped GEMM (torch._scaled_grouped_mm): sm90 only, every operand row
    16-byte aligned (the expert width on this rank divisible by 16; the hidden size: _fp8_size_problems)."""
    problems = []
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9:
        major, minor = torch.cuda.get_device_capability()
        problems.append(f"train.fp8_experts=true: torch's FP8 grouped GEMM runs on compute capability 9.0 (H100, "
                        f"H200), not {major}.{minor}; set train.fp8_experts=false (the experts stay bf16)")
    p = cfg.parallel
    width = cfg.model.expert_intermediate_size // (p.tp if p.expert_tensor_parallel else 1)
    if width % 16:
        problems.append(f"train.fp8_experts=true: FP8 grouped GEMMs need the expert intermediate size on each "
                        f"rank ({width}) divisible by 16; change model.intermediate_size or set "
                        f"train.fp8_experts=false")
    return problems


def _te_problems(cfg: Config) -> list[str]:
    """What keeps model.linear_backend=te (and train.fp8) from running with this config on this machine."""
    from complexity_dist.parallel.te_backend import fp8_problem, te_problem

    why = te_problem()
    if why is not None:
        return ["model.linear_backend=te: " + why]
    problems = []
    fp8 = cfg.train.fp8
    if fp8 != "none":
        why = fp8_problem()
        if why is not None:
            problems.append(f"train.fp8={fp8}: {why}")
        problems += _fp8_size_problems(cfg)
        if cfg.train.activation_checkpointing != "none":
            problems.append(f"train.fp8={fp8} with train.activation_checkpointing="
                            f"{cfg.train.activation_checkpointing}: the recomputed forward would run outside FP8 "
                            f"autocast and differ from the saved one; set train.activation_checkpointing=none")
    return problems


@dataclass
class Parallelized:
    """What the rest of the loop needs to know about the applied layout."""
    tp_group: object = None
    ep_group: object = None
    expert_group_name: str | None = None  # DeepSpeed's expert group name; None without expert parallel
    mpu: object = None                    # complexity_dist.parallel.groups.DeepSpeedMPU or None

    @property
    def expert_parallel(self) -> bool:
        return self.expert_group_name is not None


def parallelize(model: nn.Module, cfg: Config, groups) -> Parallelized:
    """Apply `cfg.parallel` to `model` in place over `groups` (complexity_dist/parallel/groups.py
    ParallelGroups; None = a world of one). Call before compiling and before `build_engine`."""
    from complexity_dist.parallel.expert_parallel import apply_expert_parallel, enable_deepspeed_expert_reduction
    from complexity_dist.parallel.groups import deepspeed_mpu
    from complexity_dist.parallel.tensor_parallel import apply_tensor_parallel

    check_parallelize(cfg)
    p = cfg.parallel
    out = Parallelized(mpu=deepspeed_mpu(groups))
    if groups is None:
        _apply_te(model, cfg, None)
        _apply_fp8(model, cfg)
        return out
    # EP before TP: EP swaps in new expert parameters (this rank's rows) and replaces compute_experts; TP then
    # shards those rows and wraps the EP compute in its copy/reduce (each TP rank runs the all-to-all among
    # the ranks of its own tp rank: megatron-core's EP groups). The other order would drop the TP wrapper.
    if p.ep > 1:
        # speculation needs the whole model's forward (its hook checks the routing): not under pipeline parallel
        apply_expert_parallel(model, groups.ep_group, speculative=p.ep_speculative_routing and p.pp == 1)
        out.ep_group = groups.ep_group
    if p.tp > 1:
        # te: the torch plan's shards and hooks; _apply_te then runs the local GEMMs through TE
        apply_tensor_parallel(model, groups.tp_group, sequence_parallel=p.sequence_parallel,
                              backend="torch" if cfg.model.linear_backend == "te" else cfg.model.linear_backend,
                              comm_overlap=p.tp_comm_overlap and cfg.model.linear_backend == "torch",
                              expert_tp=p.expert_tensor_parallel)
        for param in model.parameters():
            if hasattr(param, "tp_shard"):
                param.tensor_model_parallel = True  # deepspeed.utils.is_model_parallel_parameter
        out.tp_group = groups.tp_group
    if p.ep > 1:  # marks the final (possibly TP-sharded) expert parameters
        out.expert_group_name = enable_deepspeed_expert_reduction(model, groups.ep_group, groups.expert_dp_group)
    _apply_te(model, cfg, groups)
    _apply_fp8(model, cfg)
    return out


def _apply_te(model: nn.Module, cfg: Config, groups) -> None:
    """Last: the TE linears take over the (already sharded) projections and their layout hooks."""
    if cfg.model.linear_backend != "te":
        return
    from complexity_dist.parallel.te_backend import apply_te_linears, enable_fp8

    apply_te_linears(model)
    if cfg.train.fp8 != "none":
        # every rank that holds a copy of a weight sees part of its activations: amaxes reduce over the world
        # (pp is refused with te)
        enable_fp8(model, cfg.train.fp8, dist.group.WORLD if dist.is_initialized() else None)


def _apply_fp8(model: nn.Module, cfg: Config) -> None:
    """train.fp8 with model.linear_backend=torch: the large projections (already laid out) become FP8 GEMMs."""
    if cfg.train.fp8 == "none" or cfg.model.linear_backend != "torch":
        return
    from complexity_dist.parallel.fp8 import apply_fp8

    apply_fp8(model, experts=cfg.train.fp8_experts)


# --- gathering the full model on one rank (tests, debugging) -------------------------------------------

def expert_param_names(model: nn.Module) -> list[str]:
    """Names of the expert-parallel parameters (those DeepSpeed treats as expert parameters)."""
    return [name for name, p in model.named_parameters() if not getattr(p, "allreduce", True)]


def full_state_dict(model: nn.Module, plan: Parallelized) -> dict[str, torch.Tensor]:
    """The single-process state_dict (today's names and shapes) of a parallelized model. Collective over the
    TP and EP groups: every rank calls it."""
    from complexity_dist.parallel.tensor_parallel import full_state_dict as tp_full

    with _zero3_gathered(model):
        state = tp_full(model) if plan.tp_group is not None else \
            {k: v.detach().clone() for k, v in model.state_dict().items()}
    if plan.ep_group is None:
        return state
    ep = dist.get_world_size(plan.ep_group)
    for name in expert_param_names(model):
        local = state[name].contiguous()
        parts = [torch.empty_like(local) for _ in range(ep)]
        dist.all_gather(parts, local, group=plan.ep_group)
        # rank r holds experts r, r+ep, ...: row j of rank r is expert r + j*ep
        state[name] = torch.stack(parts, dim=1).reshape(-1, *local.shape[1:])
    return state


def _zero3_gathered(model: nn.Module):
    """Under ZeRO 3 each parameter holds only its data-parallel partition (`ds_id` marks one): gather them
    whole for the duration (collective over the data-parallel group). Without ZeRO 3, nothing."""
    zero3 = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not zero3:
        return contextlib.nullcontext()
    from deepspeed.runtime.zero import GatheredParameters
    return GatheredParameters(zero3, modifier_rank=None)


def expert_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's expert rows (what DeepSpeed's model-states file, written by one data-parallel rank only,
    does not hold for the other expert-parallel ranks)."""
    params = dict(model.named_parameters())
    return {name: params[name].detach().clone() for name in expert_param_names(model)}


@torch.no_grad()
def load_expert_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    names = set(expert_param_names(model))
    if set(state) != names:
        raise ValueError(f"expert rows in the checkpoint ({sorted(state)}) do not match the model's "
                         f"({sorted(names)})")
    for name, value in state.items():
        params[name].copy_(value)
