"""Typed run configuration: YAML files plus `section.key=value` overrides, validated before anything runs.

Every error names the key, the value and what is allowed, so a bad run dies at parse time, before any
process group or GPU memory is touched.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says how."""


@dataclass
class ModelConfig:
    """Sizes and options of the Complexity v0.13 decoder (docs/architecture.md)."""

    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 704  # total over experts; each expert has intermediate_size / num_experts
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_experts: int = 4
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    dynamics_dt: float = 0.1
    dynamics_controller_hidden: int = 64
    dynamics_beta_max: float = 2.0  # the clamp that fixes the reference's late NaN; never remove it
    dynamics_velocity_clamp: float = 10.0
    mu_highway_scale: float = 0.1
    router_base_margin: float = 10.0  # logit bonus of the base expert token_id % E
    # "hard": argmax routing as the reference (mu_router gets no gradient);
    # "straight_through": same forward, expert output scaled by p_e / stopgrad(p_e) so mu_router trains.
    mu_router: str = "hard"
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 0
    # which implementation runs the projections (complexity_dist/parallel/tensor_parallel.py, te_backend.py):
    # "torch" (plain parameters and F.linear), "megatron" (megatron-core's tensor-parallel linears, needs
    # parallel.tp > 1), "te" (Transformer Engine's Linear; CUDA only)
    linear_backend: str = "torch"
    # which implementation runs the fused pieces (complexity_dist/kernels/): "torch" (plain autograd) or
    # "triton" (chunked lm_head + cross-entropy that never builds the full logits, fused INL dynamics;
    # Triton kernels on CUDA, their pure-torch twins elsewhere unless TRITON_INTERPRET=1)
    kernels: str = "torch"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def expert_intermediate_size(self) -> int:
        return self.intermediate_size // self.num_experts

    def validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "num_experts", "max_position_embeddings", "dynamics_controller_hidden",
        ]
        for name in positive:
            _require(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be > 0")
        _divides("model", "num_attention_heads", self.num_attention_heads, "hidden_size", self.hidden_size)
        _divides("model", "num_key_value_heads", self.num_key_value_heads,
                 "num_attention_heads", self.num_attention_heads)
        _divides("model", "num_experts", self.num_experts, "intermediate_size", self.intermediate_size)
        _require(self.head_dim % 2 == 0,
                 f"model.hidden_size / num_attention_heads = {self.head_dim} must be even for rotary embeddings")
        _choice("model.mu_router", self.mu_router, ("hard", "straight_through"))
        _choice("model.linear_backend", self.linear_backend, ("torch", "megatron", "te"))
        _choice("model.kernels", self.kernels, ("torch", "triton"))
        _require(self.dynamics_beta_max > 0, f"model.dynamics_beta_max={self.dynamics_beta_max} must be > 0")
        _require(self.dynamics_velocity_clamp > 0,
                 f"model.dynamics_velocity_clamp={self.dynamics_velocity_clamp} must be > 0")
        _require(self.rope_theta > 0, f"model.rope_theta={self.rope_theta} must be > 0 (the usual value is 10000)")
        _require(self.rms_norm_eps > 0, f"model.rms_norm_eps={self.rms_norm_eps} must be > 0 (e.g. 1e-6)")
        _require(self.initializer_range >= 0,
                 f"model.initializer_range={self.initializer_range} must be >= 0 (a standard deviation, e.g. 0.02)")
        # dt is the Euler step of a_next = a + dt * gate * v: at 0 the dynamics do nothing and their
        # controller gets no gradient; above 1 one step moves further than the velocity it integrates
        # (the explicit update overshoots). The reference uses 0.1.
        _require(0 < self.dynamics_dt <= 1, f"model.dynamics_dt={self.dynamics_dt} must be in (0, 1] (e.g. 0.1)")
        # the highway R sums mu over all layers before it: a scale above 1 lets it outgrow mu with depth
        _require(0 <= self.mu_highway_scale <= 1,
                 f"model.mu_highway_scale={self.mu_highway_scale} must be in [0, 1] (e.g. 0.1)")
        # a negative margin would push every token away from its base expert token_id % num_experts
        _require(self.router_base_margin >= 0,
                 f"model.router_base_margin={self.router_base_margin} must be >= 0 (e.g. 10)")


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    sequence_parallel: bool = False
    # with sequence parallel and model.linear_backend=torch: the attention's all-gather and reduce-scatter go
    # by chunks that overlap the projections' GEMMs (complexity_dist/parallel/overlap.py). Off: measured slower
    # on 2x H200 (TP2 + SP, 1.5b; README's scaling section)
    tp_comm_overlap: bool = False
    # expert parallel routes every layer by token id without a host sync and checks the mu override's moves once
    # per forward, rerunning that forward when one moved a token (complexity_dist/parallel/expert_parallel.py):
    # a gain only while the override rarely moves tokens (+2% measured for EP2 at micro-batch 8 on 2x H200
    # with none moved). Not with pipeline parallel
    ep_speculative_routing: bool = False
    # the experts under tensor parallel: true = each expert's gate_up/down split over the TP ranks (the tokens
    # gathered for them under sequence parallel); false = whole experts on every TP rank, each running its own
    # sequence slice (megatron-core's expert tensor parallel size 1): no collectives for the experts, their
    # gradients summed over TP once per step, at the memory of tp copies of the experts and their optimizer
    # state. false needs sequence_parallel when tp > 1; with ep > 1 each TP rank dispatches its own slice
    expert_tensor_parallel: bool = True
    zero_stage: int = 0
    # ZeRO 2 reduces (reduce-scatters) each micro-batch's gradients bucket by bucket inside its backward, on a
    # stream of its own, instead of after it (DeepSpeed's overlap_comm; Megatron's overlap_grad_reduce). ZeRO 2
    # only: DeepSpeed 0.19.8's ZeRO 1 with overlap_comm sums a step of several micro-batches wrongly
    overlap_grad_reduce: bool = False
    # elements per gradient-reduction bucket of ZeRO 1/2 (DeepSpeed's reduce_bucket_size, same default). With
    # overlap_grad_reduce a bucket's reduction starts when it is full, so smaller buckets overlap more (Megatron
    # uses 40M), and two buffers of this size in the reduction dtype (fp32 for bf16 training) are kept
    grad_bucket_size: int = 500_000_000
    # ZeRO 3 keeps a parameter of at most this many elements whole on every rank (DeepSpeed's
    # stage3_param_persistence_threshold, same default); 0 partitions every parameter
    zero3_persistence_threshold: int = 100_000

    def validate(self) -> None:
        for name in ("tp", "pp", "ep"):
            _require(getattr(self, name) >= 1, f"parallel.{name}={getattr(self, name)} must be >= 1")
        _require(self.grad_bucket_size >= 1, f"parallel.grad_bucket_size={self.grad_bucket_size} must be >= 1")
        _require(self.zero3_persistence_threshold >= 0,
                 f"parallel.zero3_persistence_threshold={self.zero3_persistence_threshold} must be >= 0")
        _choice("parallel.zero_stage", self.zero_stage, (0, 1, 2, 3))


@dataclass
class DataConfig:
    # a folder made by `complexity-dist prepare-data` (holds index.json); "" = the embedded corpus,
    # prepared under <run_dir>/../data-embedded on first use
    path: str = ""
    seq_len: int = 256
    num_workers: int = 0
    vocab_size: int = 0  # of the BPE trained on the embedded corpus; 0 = min(model.vocab_size, 8192)
    # held-out data for validation loss (train.eval_every): a prepared folder of its own, OR the last
    # val_shards shards of the training data's index, which are then never trained on
    val_path: str = ""
    val_shards: int = 0

    def validate(self) -> None:
        _require(self.seq_len >= 1, f"data.seq_len={self.seq_len} must be >= 1")
        _require(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be >= 0")
        _require(self.val_shards >= 0, f"data.val_shards={self.val_shards} must be >= 0 (0 = none held out)")
        _require(not (self.val_path and self.val_shards),
                 f"data.val_path={self.val_path!r} and data.val_shards={self.val_shards} both name held-out data; "
                 f"set only one")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def validate(self) -> None:
        _require(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        _require(0 <= self.min_lr <= self.lr, f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"optim.betas={self.betas} must be two numbers in [0, 1)")
        _require(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")


# torch.compile modes for the layers (train.compile_mode): only what measured to help is offered, so far the
# default. Tried and withdrawn, each with what the H200 showed (a ConfigError names it); max-autotune (Triton GEMM
# templates and CUDA graphs together) was never offered: our GEMMs are cuBLAS/CUTLASS calls near the GPU's peak
COMPILE_MODES = ("default",)
WITHDRAWN_COMPILE_MODES = {
    "reduce-overhead": "CUDA graphs: with the per-layer compiled model a later layer's graph replay overwrote "
                       "activations its backward still needed, with or without a cudagraph_mark_step_begin per "
                       "micro-batch",
    "max-autotune-no-cudagraphs": "its compile of the 150m preset's layers did not end within 4 minutes, twice, so "
                                  "no speed could be measured against the default",
}


@dataclass
class TrainConfig:
    run_dir: str = "runs/tiny"
    steps: int = 100
    seed: int = 1234
    global_batch: int = 8  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 0  # sequences per rank per forward; 0 = as large as global_batch / dp allows
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    log_every: int = 1
    max_consecutive_skips: int = 5
    # what each decoder layer keeps for backward: none (everything), selective (the outputs of GEMMs,
    # attention and collectives; the elementwise work is recomputed) or full (the layer's inputs only; the
    # whole layer is recomputed). complexity_dist/model/checkpointing.py. true/false of older configs = full/none
    activation_checkpointing: str = "none"
    compile: bool = False  # torch.compile each decoder layer (fuses the norm/dynamics/SwiGLU elementwise work)
    # torch.compile's mode for those layers (with train.compile): default, the one measured (COMPILE_MODES)
    compile_mode: str = "default"
    # FP8 GEMMs of the projections: none | current (each tensor scaled by its own amax; with
    # model.linear_backend=torch: complexity_dist/parallel/fp8.py) | delayed (amax history; te only:
    # complexity_dist/parallel/te_backend.py)
    fp8: str = "none"
    # with train.fp8=current and model.linear_backend=torch: the experts' grouped GEMMs in FP8 too (H100/H200;
    # complexity_dist/parallel/fp8.py)
    fp8_experts: bool = False
    eval_every: int = 0  # steps between validation-loss evaluations (and at the last step); 0 = never
    eval_batches: int = 10  # global batches of held-out samples per evaluation (the same samples every time)
    # one run per run_dir, enforced by rank 0 holding <run_dir>/.lock (flock); false only for a file system
    # without flock, where you make sure yourself that no two runs share the run_dir (docs/cluster.md)
    run_lock: bool = True
    # torch.profiler over steps profile_start .. profile_start + profile_steps - 1 (as printed, from 1) on every
    # rank: <run_dir>/profile/rank_<R>/ gets kinds.txt, top_kernels.txt, idle.txt and trace.json.gz, the reports
    # of `complexity-dist bench --profile` (complexity_dist/train/profiling.py). 0 steps = off
    profile_start: int = 0
    profile_steps: int = 0

    def validate(self) -> None:
        _require(self.run_dir.strip() != "", "train.run_dir is empty; set it to the run's folder, e.g. runs/tiny")
        _require(self.profile_steps >= 0, f"train.profile_steps={self.profile_steps} must be >= 0 (0 = off)")
        _require(self.profile_steps == 0 or self.profile_start >= 1,
                 f"train.profile_start={self.profile_start} must be >= 1 (the first profiled step, counted from 1 "
                 f"as printed) when train.profile_steps={self.profile_steps}")
        _require(self.steps >= 1, f"train.steps={self.steps} must be >= 1")
        _require(self.global_batch >= 1, f"train.global_batch={self.global_batch} must be >= 1")
        _require(self.micro_batch >= 0, f"train.micro_batch={self.micro_batch} must be >= 0 (0 = automatic)")
        _choice("train.precision", self.precision, ("auto", "bf16", "fp32"))
        _choice("train.fp8", self.fp8, ("none", "delayed", "current"))
        if isinstance(self.activation_checkpointing, bool):  # a TrainConfig built in Python the old way
            old = self.activation_checkpointing
            self.activation_checkpointing = _LEGACY_BOOLS["train.activation_checkpointing"][old]
        _choice("train.activation_checkpointing", self.activation_checkpointing, ("none", "selective", "full"))
        _require(self.compile_mode not in WITHDRAWN_COMPILE_MODES,
                 f"train.compile_mode={self.compile_mode} is not offered: "
                 f"{WITHDRAWN_COMPILE_MODES.get(self.compile_mode)} (H200); use train.compile_mode=default")
        _choice("train.compile_mode", self.compile_mode, COMPILE_MODES)
        _require(self.log_every >= 1, f"train.log_every={self.log_every} must be >= 1")
        _require(self.max_consecutive_skips >= 1,
                 f"train.max_consecutive_skips={self.max_consecutive_skips} must be >= 1")
        _require(self.eval_every >= 0, f"train.eval_every={self.eval_every} must be >= 0 (0 = no evaluation)")
        _require(self.eval_batches >= 1, f"train.eval_batches={self.eval_batches} must be >= 1")


@dataclass
class CheckpointConfig:
    enabled: bool = True  # false: never write checkpoints (benchmarks); a preempted run then loses its work
    every: int = 50  # steps between checkpoints; the last step is always saved
    keep_last: int = 3
    resume: bool = True  # continue from <run_dir>/checkpoints/latest when present

    def validate(self) -> None:
        _require(self.every >= 1, f"checkpoint.every={self.every} must be >= 1")
        _require(self.keep_last >= 1, f"checkpoint.keep_last={self.keep_last} must be >= 1")


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "complexity-dist"
    # "" = $MLFLOW_TRACKING_URI if set, else sqlite:///<run_dir>/mlflow.db
    uri: str = ""
    run_name: str = ""

    def validate(self) -> None:
        pass


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self, world_size: int | None = None) -> "Config":
        """Check every section, then the parallel layout: against the model alone, or, with `world_size`
        (the number of processes), completely, so that one message lists every layout violation."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        m = self.model
        _raise_layout_problems(self, world_size)
        p = self.parallel
        if self.model.kernels == "triton":
            why = (["parallel.zero_stage=3 (ZeRO 3 gathers lm_head.weight inside lm_head's forward, which the "
                    "fused loss skips); use zero_stage 0-2"] if p.zero_stage == 3 else []) + \
                  ([f"parallel.pp={p.pp} (the last pipeline stage computes the full logits, then model.loss_fn); "
                    f"use pp=1"] if p.pp > 1 else [])
            _require(not why, "model.kernels=triton is not supported with " + " and ".join(why) +
                     ", or set model.kernels=torch")
        _require(self.train.eval_every == 0 or bool(self.data.val_path) or self.data.val_shards > 0,
                 f"train.eval_every={self.train.eval_every} needs held-out data: set data.val_path to a folder "
                 f"made by `complexity-dist prepare-data`, or data.val_shards=N to hold out the last N shards")
        # MLflow's default store is sqlite:///<run_dir>/mlflow.db, a URL: there "%xx" is decoded, "?" starts
        # the query and "#" the fragment, so the database or its artifacts would land in another folder
        bad = sorted(set("%?#") & set(self.train.run_dir))
        _require(not (bad and self.tracking.enabled and not self.tracking.uri),
                 f"train.run_dir={self.train.run_dir!r} contains {' '.join(bad)}, which breaks MLflow's default "
                 f"sqlite store in the run directory; rename the folder, or set tracking.uri (or "
                 f"tracking.enabled=false)")
        _require(self.data.seq_len <= m.max_position_embeddings,
                 f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings="
                 f"{m.max_position_embeddings}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`section.key` -> value, e.g. for experiment-tracking params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def layout(self, world_size: int) -> "Layout":
        return Layout.build(self, world_size)


@dataclass(frozen=True)
class Layout:
    """How a world of processes is cut into tp x pp x dp (expert layers: tp x ep x expert-dp x pp), and how
    the global batch splits over dp.

    Rank order is megatron-core's default ("tp-cp-ep-dp-pp"; complexity_dist/parallel/groups.py builds the
    groups with it): tensor-parallel ranks are adjacent, then data-parallel, then pipeline stages,
    rank = tp_rank + tp * (dp_rank + dp * pp_rank). Expert layers re-cut each data-parallel group of size dp
    into ep x expert_dp with ep adjacent: dp_rank = ep_rank + ep * expert_dp_rank.

    `train.global_batch` is sequences per optimizer step over all data-parallel ranks under every layout:
    tp and pp ranks of one replica see the same sequences, so only dp divides it."""

    world_size: int
    tp: int
    pp: int
    ep: int
    dp: int
    micro_batch: int
    grad_accum: int
    expert_dp: int = 1
    num_layers: int = 1
    expert_tp: int = 1  # the TP ranks each expert is split over: tp, or 1 (parallel.expert_tensor_parallel=false)

    @classmethod
    def build(cls, cfg: Config, world_size: int) -> "Layout":
        p, t = cfg.parallel, cfg.train
        _require(world_size >= 1, f"world size {world_size} must be >= 1 (the number of processes)")
        _raise_layout_problems(cfg, world_size)
        dp = world_size // (p.tp * p.pp)
        per_rank = t.global_batch // dp
        micro = t.micro_batch or per_rank
        return cls(world_size, p.tp, p.pp, p.ep, dp, micro, per_rank // micro, dp // p.ep,
                   cfg.model.num_hidden_layers, p.tp if p.expert_tensor_parallel else 1)

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp

    # --- pipeline stages -------------------------------------------------------------------------------
    def stage_layers(self, stage: int) -> range:
        """Decoder layers held by pipeline stage `stage`: contiguous and balanced, the remainder of
        num_layers / pp going one each to the first stages (6 layers on 4 stages: 2, 2, 1, 1)."""
        base, extra = divmod(self.num_layers, self.pp)
        start = stage * base + min(stage, extra)
        return range(start, start + base + (1 if stage < extra else 0))

    # --- rank arithmetic (what megatron-core's groups must equal; tests/test_parallel_layout.py) ---------
    def coords(self, rank: int) -> dict[str, int]:
        """This rank's position on every axis: tp, dp, pp, ep, expert_dp."""
        tp_rank, rest = rank % self.tp, rank // self.tp
        dp_rank, pp_rank = rest % self.dp, rest // self.dp
        return {"tp": tp_rank, "dp": dp_rank, "pp": pp_rank, "ep": dp_rank % self.ep,
                "expert_dp": dp_rank // self.ep}

    def rank_of(self, tp: int, dp: int, pp: int) -> int:
        return tp + self.tp * (dp + self.dp * pp)

    def group_ranks(self, axis: str, rank: int) -> list[int]:
        """Global ranks of `rank`'s group along `axis` (tp, dp, pp, ep, expert_dp), in group-rank order."""
        c = self.coords(rank)
        if axis == "tp":
            return [self.rank_of(t, c["dp"], c["pp"]) for t in range(self.tp)]
        if axis == "dp":
            return [self.rank_of(c["tp"], d, c["pp"]) for d in range(self.dp)]
        if axis == "pp":
            return [self.rank_of(c["tp"], c["dp"], s) for s in range(self.pp)]
        if axis == "ep":
            return [self.rank_of(c["tp"], e + self.ep * c["expert_dp"], c["pp"]) for e in range(self.ep)]
        if axis == "expert_dp":
            return [self.rank_of(c["tp"], c["ep"] + self.ep * x, c["pp"]) for x in range(self.expert_dp)]
        raise ValueError(f"unknown parallel axis {axis!r}")


def layout_problems(cfg: Config, world_size: int | None = None) -> list[str]:
    """Every reason the parallel layout cannot run, each naming its numbers and the fix. Without
    `world_size` only what the model alone decides (heads, experts, layers); with it also the world split
    and the batch. The one place where tp/pp/ep/sequence_parallel are checked."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    out: list[str] = []
    if min(p.tp, p.pp, p.ep) < 1:  # ParallelConfig.validate says which; nothing below can be computed
        return out

    def divides(key: str, value: int, what: str, total: int, why: str) -> None:
        if total % value:
            out.append(f"parallel.{key}={value} does not divide {what}={total} ({why})")

    divides("tp", p.tp, "model.num_attention_heads", m.num_attention_heads, "tensor parallel splits whole heads")
    divides("tp", p.tp, "model.num_key_value_heads", m.num_key_value_heads, "tensor parallel splits whole heads")
    if p.expert_tensor_parallel and m.expert_intermediate_size % p.tp:
        out.append(f"parallel.tp={p.tp} does not divide the expert intermediate size {m.expert_intermediate_size} "
                   f"(model.intermediate_size={m.intermediate_size} / num_experts={m.num_experts}; each expert's "
                   f"gate_up/down are split by it)")
    divides("ep", p.ep, "model.num_experts", m.num_experts, "expert e lives on expert-parallel rank e mod ep")
    if p.pp > m.num_hidden_layers:
        out.append(f"parallel.pp={p.pp} exceeds model.num_hidden_layers={m.num_hidden_layers} (every pipeline "
                   f"stage needs at least one layer; stages get num_hidden_layers / pp layers, the remainder "
                   f"one each on the first stages)")
    if p.sequence_parallel and p.tp == 1:
        out.append("parallel.sequence_parallel=true needs parallel.tp > 1 (it splits the tokens over the "
                   "tensor-parallel ranks); set parallel.tp or parallel.sequence_parallel=false")
    if not p.expert_tensor_parallel and p.tp > 1:
        if not p.sequence_parallel:
            out.append(f"parallel.expert_tensor_parallel=false with parallel.tp={p.tp} needs "
                       f"parallel.sequence_parallel=true (whole experts run each TP rank's own slice of the "
                       f"tokens; without sequence parallel every TP rank holds all of them)")
    if world_size is None or world_size < 1:
        return out
    if world_size % (p.tp * p.pp):
        out.append(f"world size {world_size} is not a multiple of parallel.tp * parallel.pp = {p.tp} * {p.pp} = "
                   f"{p.tp * p.pp}; launch a multiple of {p.tp * p.pp} processes or change the layout")
        return out  # the data-parallel size below is undefined
    dp = world_size // (p.tp * p.pp)
    if dp % p.ep:
        out.append(f"parallel.ep={p.ep} does not divide the data-parallel size {dp} (world size {world_size} / "
                   f"(tp {p.tp} * pp {p.pp})); expert-parallel groups are cut from the data-parallel ranks")
    if t.global_batch % dp:
        out.append(f"train.global_batch={t.global_batch} is not divisible by the data-parallel size {dp}; "
                   f"use a multiple of {dp}")
    else:
        per_rank = t.global_batch // dp
        micro = t.micro_batch or per_rank
        if per_rank % micro:
            out.append(f"train.micro_batch={micro} does not divide the per-rank batch {per_rank} "
                       f"(train.global_batch={t.global_batch} / dp={dp}); pick a divisor of {per_rank}")
    return out


def _raise_layout_problems(cfg: Config, world_size: int | None) -> None:
    problems = layout_problems(cfg, world_size)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        where = f" on {world_size} processes" if world_size else ""
        raise ConfigError(f"parallel layout tp={cfg.parallel.tp} pp={cfg.parallel.pp} ep={cfg.parallel.ep}{where} "
                          f"has {len(problems)} problems: " +
                          "; ".join(f"({i}) {msg}" for i, msg in enumerate(problems, 1)))


# --- loading ---------------------------------------------------------------------------------------------

def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _divides(section: str, key: str, value: int, what: str, total: int) -> None:
    _require(value > 0 and total % value == 0, f"{section}.{key}={value} does not divide {what}={total}")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    _require(value in allowed, f"{key}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check (and for strings from the command line, convert) one value against its declared type."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r} is not a boolean; use true or false")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is not an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} is not a number") from None
        else:
            raise ConfigError(f"{key}={value!r} is not a number")
        if not math.isfinite(out):
            raise ConfigError(f"{key}={value!r} must be finite")
        return out
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} is not a string")
    if typ is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if isinstance(value, (list, tuple)):
            return [_coerce(f"{key}[{i}]", v, float) for i, v in enumerate(value)]
        raise ConfigError(f"{key}={value!r} is not a list, e.g. [0.9, 0.95]")
    raise TypeError(f"unsupported config type {typ} for {key}")


def _section_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


# keys that were booleans once: what true/false of an old config (or a checkpoint's config.json) now mean
_LEGACY_BOOLS = {"train.activation_checkpointing": {True: "full", False: "none"}}


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r} in {source}; sections are: {', '.join(sections)}")
    sec = getattr(cfg, section)
    types = _section_types(type(sec))
    if key not in types:
        raise ConfigError(f"unknown config key {section}.{key} in {source}; "
                          f"keys of {section} are: {', '.join(types)}")
    if isinstance(value, bool) and f"{section}.{key}" in _LEGACY_BOOLS:
        value = _LEGACY_BOOLS[f"{section}.{key}"][value]
    setattr(sec, key, _coerce(f"{section}.{key}", value, types[key]))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {seen[key]}); keep one",
                        key_node.start_mark)
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader reports it below
                pass
        return super().construct_mapping(node, deep=deep)


def parse_overrides(overrides: list[str]) -> list[tuple[str, str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.steps=100)")
        dotted, raw = item.split("=", 1)
        section, key = dotted.split(".", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        if value is None:
            value = raw
        out.append((section, key, value))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> Config:
    """Build a validated Config from an optional YAML file and `section.key=value` overrides; with
    `world_size` the parallel layout is checked for that many processes too."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; give a YAML file, e.g. configs/tiny.yaml")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
        except UnicodeDecodeError as e:
            line = e.object[:e.start].count(b"\n") + 1
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}, line {line}: "
                              f"{e.object[e.start:e.start + 1]!r}); save it as UTF-8") from None
        try:
            raw = yaml.load(text, Loader=_StrictLoader) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(e, "problem", None) or " ".join(str(e).split())
            raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must be a mapping of sections")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"section {section!r} in {path} must be a mapping of key: value")
            for key, value in values.items():
                _apply(cfg, section, key, value, str(path))
    for section, key, value in parse_overrides(overrides or []):
        _apply(cfg, section, key, value, "command-line overrides")
    return cfg.validate(world_size)


def config_from_dict(raw: dict) -> Config:
    cfg = Config()
    for section, values in raw.items():
        for key, value in values.items():
            _apply(cfg, section, key, value, "saved config")
    return cfg.validate()
