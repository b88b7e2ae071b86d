"""Resuming a checkpoint under another layout (ZeRO stage 0-3, data-parallel size, tensor-parallel size tp,
expert-parallel size ep), optimizer state included; a pipeline-parallel checkpoint (pp > 1, ZeRO 1, with or
without tp) resumes under any of those with pp = 1, and any checkpoint resumes under pp > 1 (ZeRO 1): each
stage sets the parameters it holds, found by identity in the single-process model its stage is built from
(complexity_dist/parallel/pipeline.py), the tied embedding on the first and the last stage alike.

Design decision: our own resharding, not DeepSpeed's universal checkpoint. `ds_to_universal` converts
through files it reads with torch.load(weights_only=False), while every checkpoint read here goes through
`complexity_dist.train.checkpoint.safe_load` (nothing read can run code). It would also write a second copy
of the checkpoint. Instead:
1. complexity_dist/convert/reader.py (the reader `convert to-hf` uses) assembles each parameter's full fp32
   master weight and Adam moments (`exp_avg`, `exp_avg_sq`) from whatever layout wrote them (ZeRO 0-3 data
   parallel; ZeRO 1/2 with tp/ep, ZeRO 1 with pp (and tp): pieces from every model-parallel rank's files),
   plus Adam's step count;
2. the engine of the new layout is built as usual; its optimizer state is created empty-but-present (torch's
   AdamW creates it lazily at the first step), then every parameter is set, one at a time: the full tensor is
   cut to this rank's piece of the new layout (`_local_piece`: expert rows e mod ep, then the tensor-parallel
   slice of tensor_parallel.shard_of) and set through DeepSpeed's state APIs:
   `deepspeed.utils.safe_set_full_fp32_param` / `safe_set_full_optimizer_state`
   for ZeRO 1/2 (each rank copies the fragment its partition owns), ZeRO 3's partition of the optimizer's
   flat fp32 group (the stage-3 `set_full_hp_param` assumes numel divisible by the world size, so the slice
   is taken here), and the module (low-precision or fp32 copy the forward uses) through
   `deepspeed.zero.GatheredParameters` under ZeRO 3. ZeRO 0 has no partition: the torch optimizer's
   per-parameter state is set directly.
3. the trainer state: step, tokens, skips (trainer_state.json); the data position from rank 0's loader state,
   which is the global sample position and the same on every rank (complexity_dist/data/loader.py), so it
   continues under any data-parallel size whose micro_batch * dp divides it (always, for a fixed
   train.global_batch); RNG: new rank r takes old rank r's RNG state when the old run had that rank, and
   keeps the seeded state otherwise. Per-rank RNG cannot carry over a world-size change; the model has no
   dropout and the data order is a function of (seed, sample position), so no random draw enters the math.

Each rank reads every parameter in full (CPU memory: one reader batch, complexity_dist/convert/reader.py
DEFAULT_BUDGET, plus one parameter) and keeps its piece.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from complexity_dist.config import Config
from complexity_dist.train.checkpoint import CheckpointMismatch, SavedRun, safe_load, set_rng_state

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def is_data_parallel(parallel: dict) -> bool:
    return all(int(parallel.get(k, 1)) == 1 for k in ("tp", "pp", "ep"))


def needs_reshard(saved: SavedRun, cfg: Config, world_size: int) -> bool:
    """True when the checkpoint's ZeRO stage, data-parallel size or tensor/expert/pipeline-parallel layout differs
    from this run's (check_compatible has refused a checkpoint of another model)."""
    old = saved.config["parallel"]
    return (int(old.get("zero_stage", 0)) != cfg.parallel.zero_stage
            or int(saved.trainer_state["world_size"]) != world_size
            or any(int(old.get(k, 1)) != getattr(cfg.parallel, k) for k in ("tp", "pp", "ep")))


def open_reader(saved: SavedRun):
    """The checkpoint's reader; raises ConvertError (a ConfigError, exit 2) naming a file that cannot be
    planned from. Called in preflight, before any process group exists."""
    from complexity_dist.convert.reader import CheckpointReader
    return CheckpointReader(saved)


def _zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if engine.zero_optimization() else 0


def _create_adam_state(engine, step: int) -> None:
    """Creates Adam's state where the next step will use it: torch's AdamW keeps a present state as is, and
    ZeRO 1/2 link their per-parameter fragments to it. Values are filled per parameter afterwards."""
    zero = _zero_stage(engine)
    opt = engine.optimizer
    if zero in (1, 2):
        flats = opt.single_partition_of_fp32_groups
    elif zero == 3:
        flats = opt.fp32_partitioned_groups_flat
    else:
        flats = [p for g in opt.param_groups for p in g["params"]]
    base = opt.optimizer if zero > 0 else opt
    for flat in flats:
        base.state[flat] = {"step": torch.tensor(float(step), dtype=torch.float32),
                            **{k: torch.zeros_like(flat, memory_format=torch.preserve_format) for k in ADAM_STATES}}
    if zero in (1, 2):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()  # points each parameter's fragment at the state above


def _set_zero3_partition(opt, param, value: torch.Tensor, key: str | None) -> None:
    """This rank's piece of a ZeRO-3 parameter: elements [r*p, (r+1)*p) of the flat value (the last piece
    is shorter by the padding, which stays zero)."""
    part, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    rank = opt._get_param_partition_rank(param)
    flat = value.reshape(-1)
    lo = min(part.numel() * rank, flat.numel())
    hi = min(lo + part.numel(), flat.numel())
    part.data.zero_()
    part.data[:hi - lo].copy_(flat[lo:hi].to(part.dtype))


def _local_piece(value: torch.Tensor, param, layout) -> torch.Tensor:
    """This rank's piece of a full tensor under the engine's layout (complexity_dist/parallel/parallelize.py
    `Parallelized`): the expert rows e mod ep = its EP rank, then its tensor-parallel slice."""
    from complexity_dist.parallel.comm import group_rank, group_size
    from complexity_dist.parallel.expert_parallel import local_experts
    from complexity_dist.parallel.tensor_parallel import shard_of

    if layout is None:
        return value
    if layout.ep_group is not None and not getattr(param, "allreduce", True):
        value = value[local_experts(value.shape[0], group_size(layout.ep_group), group_rank(layout.ep_group))]
    spec = getattr(param, "tp_shard", None)
    if spec is not None:
        value = shard_of(value, group_size(layout.tp_group), group_rank(layout.tp_group), spec)
    return value


def load_resharded(engine, saved: SavedRun, reader=None, layout=None, model=None) -> dict:
    """Loads a checkpoint written under another layout into `engine`, whose model is parallelized as
    `layout` (a parallelize.Parallelized; None: data parallel); returns the rank state the trainer restores
    from (the loader's global position). Every rank calls it (ZeRO 3 gathers).
    `model`: the single-process model whose parameters the engine's module holds under other names (a
    pipeline stage: DeepSpeed's PipelineModule names them by pipe layer); the parameters are named as in
    `model`, and only those the engine holds are set (the tied embedding on both the first and the last
    stage)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from deepspeed.runtime.zero import GatheredParameters

    reader = reader or open_reader(saved)
    zero = _zero_stage(engine)
    _create_adam_state(engine, reader.optimizer_step())
    if model is None:
        params = dict(engine.module.named_parameters())
    else:  # the same Parameter objects (pipeline.py builds the stages from the model's own modules)
        held = {id(p) for p in engine.module.parameters()}
        params = {n: p for n, p in model.named_parameters() if id(p) in held}
        if len(params) != len(held):  # a stage built from other modules would silently keep its init
            raise RuntimeError(f"{len(held) - len(params)} parameters of this stage are not the model's own")
    missing = [n for n in params if n not in reader.plan.shapes]
    if missing:
        raise CheckpointMismatch(f"checkpoint {saved.path} holds no {', '.join(missing[:3])}: not a checkpoint "
                                 f"of this model")
    names = [n for n, p in params.items() if p.requires_grad]
    for key in (None, *ADAM_STATES):  # one pass per kind of state, one parameter at a time
        for name, value in reader.read(names, key):
            p = params[name]
            value = _local_piece(value, p, layout)
            shape = getattr(p, "ds_shape", p.shape)  # ZeRO 3 keeps the shape there (p itself is partitioned)
            if value.shape != shape:
                raise CheckpointMismatch(f"checkpoint {saved.path}: {name} assembles to {tuple(value.shape)} for "
                                         f"this rank, the model holds {tuple(shape)}")
            if key is None:  # the copy the forward uses, then the fp32 master
                with GatheredParameters([p], modifier_rank=0) if zero == 3 else nullcontext():
                    if zero != 3 or dist.get_rank() == 0:
                        p.data.copy_(value.view(p.shape).to(p.dtype))
            if zero == 3:
                _set_zero3_partition(engine.optimizer, p, value, key)
            elif zero in (1, 2) or hasattr(p, "_hp_mapping"):  # ZeRO 1/2, or bf16 under ZeRO 0
                if key is None:
                    safe_set_full_fp32_param(p, value.view(p.shape))
                else:
                    safe_set_full_optimizer_state(p, value.view(p.shape), key)
            elif key is not None:  # ZeRO 0, fp32: the parameter is its own master
                engine.optimizer.state[p][key].copy_(value.view(p.shape))
    # DeepSpeed's own counters, as its load_checkpoint restores them
    engine.global_steps = saved.step
    engine.global_samples = saved.step * engine.train_batch_size()
    engine.skipped_steps = int(saved.trainer_state.get("skipped_total", 0))
    old_world = int(saved.trainer_state["world_size"])
    rank = dist.get_rank()
    own = safe_load(saved.path / f"rank_{min(rank, old_world - 1):05d}.pt")
    if rank < old_world:
        set_rng_state(own["rng"])
    first = own if rank == 0 or old_world == 1 else safe_load(Path(saved.path) / "rank_00000.pt")
    return {"loader": first.get("loader")}
