"""Reading a training checkpoint tensor by tensor, whatever the data/tensor/expert/pipeline-parallel layout that
wrote it.

A checkpoint folder (complexity_dist/train/checkpoint.py) holds DeepSpeed's files. Every file is opened with
our `safe_load` (weights_only + allow-list) and memory-mapped, and only one file is open at a time: the
tensors asked for are gathered in batches of at most `budget` bytes, each batch in one pass over the files
(each file opened, its fragments copied, closed). Peak memory is about one batch plus one tensor, whatever
the model size.

The fp32 master weights are read where DeepSpeed keeps them (the layout of deepspeed/utils/zero_to_fp32.py):
- ZeRO 0: the module's state_dict in mp_rank_00_model_states.pt;
- ZeRO 1/2: rank r's optimizer file holds `single_partition_of_fp32_groups[g]`, the slice
  [r*P, (r+1)*P) of group g's flat buffer, in which the group's parameters lie one after the other, each
  followed by its `param_alignment_paddings` entry;
- ZeRO 3: rank r's optimizer file holds `fp32_flat_groups[g]`: for each parameter of the group in order, its
  r-th piece of ceil(numel/W) elements (the last piece zero-padded).
Under ZeRO 1/2 the module's own copy is also in mp_rank_00_model_states.pt; every master weight read is checked
against it (cast to its dtype), which catches a misread layout.

Adam's moments (`exp_avg`, `exp_avg_sq`) lie exactly like the master weights they belong to: under ZeRO 1-3 as
flat tensors of the group's partition in the base optimizer's state (`state[g][key]`), under ZeRO 0 per
parameter in the torch optimizer's state_dict (indexed in the order of the optimizer's parameter groups,
complexity_dist/parallel/deepspeed_engine.py `param_groups`). `read(names, state="exp_avg")` reads them with
the same plan; complexity_dist/train/reshard.py uses that to resume under another data-parallel layout.

A layout is a `plan`: for each parameter, the fragments (file, group, source offset, length, destination
offset, piece) it is made of, and how its pieces join into the full tensor. `LAYOUT_PLANNERS` picks the planner
from the checkpoint's config.json:
- ZeRO 1/2 under any tensor-parallel (tp) and expert-parallel (ep) size (`_zero12_plan`): each model-parallel
  rank's files hold its tensor-parallel shard (complexity_dist/parallel/tensor_parallel.py `shard_spec_of`),
  the expert groups of data-parallel rank d hold expert-parallel rank d mod ep's rows; a parameter is read as
  tp x ep pieces, joined the way parallelize.full_state_dict gathers them, one batch at a time as above (a
  joined tensor is built when it is yielded: about one batch plus one tensor still);
- pipeline parallel (pp > 1, ZeRO 1, with or without tp) by the same planner: one model-parallel rank per
  (stage, tp rank), its parameters named as DeepSpeed's PipelineModule names them (pipe layer index, local
  name: complexity_dist/parallel/pipeline.py `pipe_parameter_names`), the master weights checked against the
  per-layer `layer_XX` files; the tied embedding/lm_head, on the first and the last stage, is read from the
  first;
- ZeRO 0 and 3, data parallel only (the training loop refuses tp/ep/pp with them).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from complexity_dist.config import ModelConfig
from complexity_dist.convert.keys import ConvertError
from complexity_dist.train.checkpoint import (CheckpointMismatch, Checkpointer, DamagedCheckpoint, SavedRun,
                                              safe_load)

DEFAULT_BUDGET = 1 << 30  # bytes of fp32 gathered per pass


def find_checkpoint(path: str | Path) -> SavedRun:
    """A run directory (its `latest`), its checkpoints/ folder, or one step_N folder."""
    path = Path(path)
    try:
        if (path / "trainer_state.json").exists() or path.name.startswith("step_"):
            return Checkpointer.inspect(None, path)
        run_dir = path.parent if path.name == "checkpoints" else path
        if not (run_dir / "checkpoints").is_dir():
            raise ConvertError(f"{path} is neither a run directory (with checkpoints/) nor a checkpoint folder "
                               f"(step_N with trainer_state.json); name one of those")
        saved = Checkpointer(run_dir, keep_last=1).latest()
        if saved is None:
            raise ConvertError(f"{run_dir / 'checkpoints'} holds no checkpoint")
        return saved
    except DamagedCheckpoint as e:
        raise ConvertError(f"checkpoint damaged: {e}") from None


def model_config_of(saved: SavedRun) -> ModelConfig:
    try:
        cfg = ModelConfig(**saved.config["model"])
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise ConvertError(f"{saved.path / 'config.json'} has no valid model section ({e})") from None
    return cfg


@dataclass
class Fragment:
    file: Path
    group: int  # index of the flat group in the file (-1: the module state_dict, by name)
    src: int
    length: int
    dst: int
    piece: int = 0  # which of the parameter's pieces (Plan.pieces) it fills


@dataclass
class Plan:
    shapes: dict[str, torch.Size]
    fragments: dict[str, list[Fragment]]
    # model-parallel layouts: each parameter is read as pieces (one per tp rank and expert-parallel rank),
    # then joined; without an entry a parameter is one piece of its full shape
    pieces: dict[str, list[torch.Size]] = field(default_factory=dict)
    join: dict[str, Callable[[list[torch.Tensor]], torch.Tensor]] = field(default_factory=dict)
    # ZeRO 1/2: files holding a copy of pieces the master weights are checked against:
    # file -> [(name, piece, key of the state_dict in the file (None: the file is one), name in it)]
    checks: dict[Path, list[tuple[str, int, str | None, str]]] = field(default_factory=dict)
    flat_key: str = ""
    group_sizes: dict[Path, list[int]] = field(default_factory=dict)  # expected flat sizes, checked on read
    state_keys: tuple[str, ...] = ()  # path to the base optimizer's state dict in a flat-group file
    optim_index: dict[str, int] = field(default_factory=dict)  # ZeRO 0: name -> index in the optimizer state


def _load(path: Path):
    try:
        return safe_load(path, map_location="cpu", mmap=True)
    except CheckpointMismatch:
        raise
    except Exception as e:  # truncated zip, not a torch file
        raise ConvertError(f"{path} is unreadable ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); "
                           f"the checkpoint is damaged or not written by complexity-dist") from None


def _field(obj, key, path: Path):
    try:
        return obj[key]
    except (KeyError, TypeError, IndexError):
        raise ConvertError(f"{path} lacks {key!r}: not a DeepSpeed checkpoint file of this layout") from None


def _data_parallel_plan(step_dir: Path, zero: int) -> Plan:
    """ZeRO 0 and 3 (data parallel only; ZeRO 1/2 are `_zero12_plan`'s)."""
    model_file = step_dir / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if zero == 3
                             else "mp_rank_00_model_states.pt")
    meta = _load(model_file)
    if zero == 0:
        module = _field(meta, "module", model_file)
        shapes = {k: v.shape for k, v in module.items()}
        frags = {k: [Fragment(model_file, -1, 0, v.numel(), 0)] for k, v in module.items()}
        return Plan(shapes, frags, optim_index=_zero0_optimizer_index(step_dir))
    groups = [dict(g) for g in _field(meta, "param_shapes", model_file)]
    del meta
    optim = _optim_files(step_dir, 0)
    world = len(optim)
    first = _field(_load(optim[0]), "optimizer_state_dict", optim[0])
    count = _field(first, "partition_count", optim[0])
    count = max(count) if isinstance(count, list) else count
    if count != world:
        raise ConvertError(f"{optim[0]} was written by {count} data-parallel ranks but {step_dir} holds {world} "
                           f"optimizer files")
    shapes: dict[str, torch.Size] = {}
    frags: dict[str, list[Fragment]] = {}
    sizes = []
    for g, params in enumerate(groups):
        off = 0
        for name, shape in params.items():
            n = math.prod(shape)
            p = math.ceil(n / world)
            shapes[name], frags[name] = torch.Size(shape), []
            for r in range(world):
                length = min(p, n - r * p)
                if length > 0:
                    frags[name].append(Fragment(optim[r], g, off, length, r * p))
            off += p
        sizes.append(off)
    plan = Plan(shapes, frags, flat_key="fp32_flat_groups", state_keys=("optimizer_state_dict", "state"))
    plan.group_sizes = {f: sizes for f in optim}
    return plan


def _optim_files(step_dir: Path, mp: int) -> list[Path]:
    """Model-parallel rank `mp`'s optimizer files, by data-parallel rank."""
    pattern = re.compile(rf"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_{mp:02d}_optim_states\.pt")
    optim = {int(m.group(1)): step_dir / f.name for f in step_dir.iterdir() if (m := pattern.fullmatch(f.name))}
    if sorted(optim) != list(range(len(optim))) or not optim:
        raise ConvertError(f"{step_dir} has optimizer files of model-parallel rank {mp} for data-parallel ranks "
                           f"{sorted(optim)}: expected ranks 0..N-1")
    return [optim[d] for d in range(len(optim))]


def _zero12_plan(step_dir: Path, parallel: dict) -> Plan:
    """ZeRO 1/2 under any tensor-parallel (tp) and expert-parallel (ep) size, and ZeRO 1 under pipeline
    parallel (pp, with tp; the training loop refuses ep with it).

    DeepSpeed writes, per model-parallel rank m (= tp rank: complexity_dist/parallel/groups.py; under pp
    stage * tp + tp rank, the order of its pipeline grid) and
    data-parallel rank d, `zero_pp_rank_{d}_mp_rank_{m}_optim_states.pt`, and `mp_rank_{m}_model_states.pt`
    (written by d = 0) with the group layout `param_shapes` of m's local (tensor-parallel) shapes. In rank
    (m, d)'s file, group g is the slice [i*P, (i+1)*P) of the group's flat buffer, i its rank in the group's
    partition:
    - a shared group (partition_count = dp): i = d, all dp files together hold m's shard;
    - an expert group (`moe` set, complexity_dist/parallel/expert_parallel.py; partition_count = dp/ep): the
      files d with d mod ep = k (k the expert-parallel rank, complexity_dist/config.py Layout.coords) hold
      ep rank k's expert rows, i = d // ep.
    A parameter is read as tp x ep pieces (piece k*tp + m) and joined: the tp pieces along the dimension
    tensor_parallel.shard_spec_of names, then the ep pieces row by row (row j of rank k is expert k + j*ep,
    parallelize.full_state_dict's order).
    Master weights are checked against the module copies: mp_rank_{m}'s module holds (m, k=0) pieces, and
    the trainer's rank_*.pt files (`experts`) each rank's own expert rows.
    Pipeline parallel: mp_rank_{m}'s `param_shapes` (and its optimizer groups) hold stage m // tp's parameters
    under DeepSpeed's PipelineModule names, translated to ours; its module is None, the module copies are in
    `layer_{i}[-model_{t}]-model_states.pt` per pipe layer i (and tp rank t). The tied embedding appears in
    the first and the last stage's groups with equal values (same all-reduced gradient, same Adam update);
    the first stage's copy is read, the last one's skipped."""
    from complexity_dist.parallel.tensor_parallel import shard_spec_of, unshard

    tp, ep, pp = (int(parallel.get(k, 1)) for k in ("tp", "ep", "pp"))
    full = _full_shapes(step_dir)
    pipe = _pipe_names(step_dir) if pp > 1 else None
    shapes: dict[str, torch.Size] = {}
    frags: dict[str, list[Fragment]] = {}
    pieces: dict[str, list[torch.Size]] = {}
    checks: dict[Path, list[tuple[str, int, str | None, str]]] = {}
    group_sizes: dict[Path, list[int]] = {}
    experts: set[str] = set()
    seen: set[tuple[str, int]] = set()
    dp = None
    for m in range(tp * pp):
        t = m % tp  # DeepSpeed's model-parallel rank is stage * tp + tp rank (its grid's order in one replica)
        model_file = step_dir / f"mp_rank_{m:02d}_model_states.pt"
        groups = [dict(g) for g in _field(_load(model_file), "param_shapes", model_file)]
        optim = _optim_files(step_dir, m)
        if dp is not None and len(optim) != dp:
            raise ConvertError(f"{step_dir} holds {len(optim)} optimizer files of model-parallel rank {m}, {dp} of "
                               f"rank 0: the checkpoint is incomplete")
        dp = len(optim)
        if dp % ep:
            raise ConvertError(f"{step_dir}: {dp} data-parallel optimizer files, not a multiple of parallel.ep={ep}")
        first = _field(_load(optim[0]), "optimizer_state_dict", optim[0])
        parts = [t.numel() for t in _field(first, "single_partition_of_fp32_groups", optim[0])]
        pads = first.get("param_alignment_paddings") or [[0] * len(g) for g in groups]
        counts = _field(first, "partition_count", optim[0])
        counts = counts if isinstance(counts, list) else [counts] * len(groups)
        moe = [bool(g.get("moe")) for g in _field(_field(first, "base_optimizer_state", optim[0]),
                                                  "param_groups", optim[0])]
        if not (len(parts) == len(counts) == len(moe) == len(groups)):
            raise ConvertError(f"{optim[0]} has {len(parts)} optimizer groups, {model_file} {len(groups)}: the "
                               f"files do not belong together")
        if ep > 1 and not any(moe):
            raise ConvertError(f"{optim[0]} holds no expert-parallel optimizer group, but {step_dir / 'config.json'} "
                               f"says parallel.ep={ep}: the files do not belong together")
        for f in optim:
            group_sizes[f] = parts
        for g, params in enumerate(groups):
            if moe[g] and ep == 1:
                raise ConvertError(f"{optim[0]}: group {g} holds expert-parallel parameters but config.json says "
                                   f"parallel.ep=1; the files do not belong together")
            owners = [[d for d in range(k, dp, ep)] for k in range(ep)] if moe[g] else [list(range(dp))]
            if counts[g] != len(owners[0]):
                raise ConvertError(f"{optim[0]}: group {g} is partitioned over {counts[g]} ranks, {len(owners[0])} "
                                   f"expected for parallel.ep={ep} on {dp} data-parallel ranks")
            off, P = 0, parts[g]
            for (stored, shape), pad in zip(params.items(), pads[g]):
                n = math.prod(shape)
                name = stored
                if pipe is not None:  # DeepSpeed's PipelineModule names: "<pipe layer>.<local name>"
                    if stored not in pipe:
                        raise ConvertError(f"{model_file} holds {stored!r}, which no pipe layer of this model "
                                           f"(config.json, complexity_dist/parallel/pipeline.py) has")
                    layer, local, name = pipe[stored]
                if (name, t) in seen:
                    # the tied embedding/lm_head: the first and the last stage each step a copy, with the same
                    # all-reduced gradient, so the same values; the first stage's is read
                    off += n + pad
                    continue
                seen.add((name, t))
                if name not in shapes:
                    if name not in full:
                        raise ConvertError(f"{model_file} holds {name!r}, which this model (config.json) has not")
                    if t != 0:
                        raise ConvertError(f"{model_file} holds {name!r}, which tensor-parallel rank 0 of its "
                                           f"stage has not; the files do not belong together")
                    shapes[name], frags[name] = full[name], []
                    pieces[name] = [torch.Size(shape)] * (tp * len(owners))
                    if moe[g]:
                        experts.add(name)
                elif pieces[name][0] != torch.Size(shape) or (name in experts) != moe[g]:
                    raise ConvertError(f"{model_file}: {name} {tuple(shape)} differs in shape or group from "
                                       f"model-parallel rank {m - t}'s; the files do not belong together")
                for k, ranks in enumerate(owners):
                    piece = k * tp + t
                    for i, d in enumerate(ranks):
                        lo, hi = max(off, i * P), min(off + n, (i + 1) * P)
                        if lo < hi:
                            frags[name].append(Fragment(optim[d], g, lo - i * P, hi - lo, lo - off, piece))
                    if pipe is not None:  # the module's copy is in the pipe layer's file, by its local name
                        layer_file = step_dir / (f"layer_{layer:02d}-model_{t:02d}-model_states.pt" if tp > 1
                                                 else f"layer_{layer:02d}-model_states.pt")
                        checks.setdefault(layer_file, []).append((name, piece, None, local))
                    elif k == 0:
                        checks.setdefault(model_file, []).append((name, piece, "module", name))
                    else:  # the trainer's own copy of the expert rows of global rank (tp m, dp k)
                        checks.setdefault(step_dir / f"rank_{m + tp * k:05d}.pt", []).append(
                            (name, piece, "experts", name))
                off += n + pad
            if off > P * len(owners[0]):
                raise ConvertError(f"{optim[0]}: group {g} holds {P * len(owners[0])} values over "
                                   f"{len(owners[0])} ranks, its parameters need {off}; the optimizer files do "
                                   f"not match {model_file}")
    lost = [n for n in full if n not in shapes]
    if lost:
        raise ConvertError(f"{step_dir}: no optimizer file holds {', '.join(lost[:3])}"
                           f"{', ...' if len(lost) > 3 else ''}; the checkpoint is incomplete or not of this model")
    join = {}
    for name in shapes:
        spec = shard_spec_of(name, bool(parallel.get("expert_tensor_parallel", True))) if tp > 1 else None
        local = list(full[name])
        if spec is not None:
            local[spec.dim] //= tp
        if name in experts:
            local[0] //= ep
        if list(pieces[name][0]) != local:
            raise ConvertError(f"{step_dir}: {name} is stored as pieces of {tuple(pieces[name][0])}; parallel.tp={tp}, "
                               f"ep={ep} of its full shape {tuple(full[name])} gives {tuple(local)}")
        if tp > 1 or name in experts:
            join[name] = functools.partial(_join, tp=tp, spec=spec, unshard=unshard)
    plan = Plan(shapes, frags, pieces=pieces, join=join, checks=checks,
                flat_key="single_partition_of_fp32_groups", state_keys=("base_optimizer_state", "state"))
    plan.group_sizes = group_sizes
    return plan


def _join(pieces: list[torch.Tensor], tp: int, spec, unshard) -> torch.Tensor:
    by_ep = [unshard(pieces[k * tp:(k + 1) * tp], spec) for k in range(len(pieces) // tp)]
    if len(by_ep) == 1:
        return by_ep[0]
    return torch.stack(by_ep, dim=1).reshape(-1, *by_ep[0].shape[1:])  # row j of ep rank k: expert k + j*ep


def _full_shapes(step_dir: Path) -> dict[str, torch.Size]:
    """The single-process parameter shapes of the checkpoint's model (built on the meta device: no memory)."""
    from complexity_dist.model import ComplexityForCausalLM

    with torch.device("meta"):
        model = ComplexityForCausalLM(model_config_of(Checkpointer.inspect(None, step_dir)))
    return {n: p.shape for n, p in model.named_parameters()}


def _pipe_names(step_dir: Path) -> dict[str, tuple[int, str, str]]:
    """The pipeline checkpoint's parameter names (complexity_dist/parallel/pipeline.py pipe_parameter_names),
    from the pipe layers built over the model on the meta device."""
    from complexity_dist.model import ComplexityForCausalLM
    from complexity_dist.parallel.pipeline import pipe_parameter_names

    with torch.device("meta"):
        model = ComplexityForCausalLM(model_config_of(Checkpointer.inspect(None, step_dir)))
    return pipe_parameter_names(model)


def _zero0_optimizer_index(step_dir: Path) -> dict[str, int]:
    """ZeRO 0 keeps torch's optimizer state_dict, which numbers the parameters in the order of the optimizer's
    groups. That order is a function of the model config (deepspeed_engine.param_groups), so it is rebuilt on
    the meta device (no memory, no weights)."""
    from complexity_dist.model import ComplexityForCausalLM
    from complexity_dist.parallel.deepspeed_engine import param_groups

    saved = Checkpointer.inspect(None, step_dir)
    with torch.device("meta"):
        model = ComplexityForCausalLM(model_config_of(saved))
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in param_groups(model, 0.0) for p in group["params"]]
    return {n: i for i, n in enumerate(order)}


# (parallel config) -> planner; the first whose predicate holds plans the read
LAYOUT_PLANNERS: list[tuple[Callable[[dict], bool], Callable[[Path, dict], Plan]]] = [
    (lambda p: int(p.get("zero_stage", 0)) in (1, 2), _zero12_plan),
    (lambda p: all(int(p.get(k, 1)) == 1 for k in ("tp", "ep", "pp")),
     lambda d, p: _data_parallel_plan(d, int(p.get("zero_stage", 0)))),
    (lambda p: True, lambda d, p: _refuse_zero(d, p)),
]


def _refuse_zero(step_dir: Path, parallel: dict) -> Plan:
    # the training loop refuses these layouts (complexity_dist/parallel/parallelize.py check_parallelize)
    raise ConvertError(f"{step_dir} says parallel.tp={parallel.get('tp', 1)}, ep={parallel.get('ep', 1)}, "
                       f"pp={parallel.get('pp', 1)} with "
                       f"zero_stage={parallel.get('zero_stage')}: no training run writes that layout")


class CheckpointReader:
    """Full fp32 tensors of a training checkpoint, by our state_dict names."""

    def __init__(self, saved: SavedRun, budget: int = DEFAULT_BUDGET):
        self.saved, self.budget = saved, budget
        parallel = saved.config["parallel"]
        planner = next(fn for ok, fn in LAYOUT_PLANNERS if ok(parallel))
        self.plan = planner(saved.path, parallel)

    def shape(self, name: str) -> torch.Size:
        if name not in self.plan.shapes:
            raise ConvertError(f"{self.saved.path} holds no tensor {name!r}: it is not a checkpoint of this model")
        return self.plan.shapes[name]

    def read(self, names: Iterable[str], state: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (name, fp32 tensor) in the order asked; a name may repeat. `state`: None for the master
        weights, or an optimizer state key ("exp_avg", "exp_avg_sq") for that state of each parameter (zeros
        for a parameter the optimizer holds no state for: it never stepped)."""
        batch: list[str] = []
        size = 0
        for name in names:
            n = self.shape(name).numel() * 4
            if batch and size + n > self.budget:
                yield from self._gather(batch, state)
                batch, size = [], 0
            batch.append(name)
            size += n
        if batch:
            yield from self._gather(batch, state)

    def optimizer_step(self) -> int:
        """Adam's step count (the number of applied steps: a skipped step does not count), 0 before any."""
        files = sorted({f.file for frags in self.plan.fragments.values() for f in frags})
        if not files:
            return 0
        obj = _load(files[0])
        if self.plan.optim_index:
            states = _field(_field(obj, "optimizer", files[0]), "state", files[0]).values()
        else:
            states = self._flat_states(obj, files[0]).values()
        steps = {int(s["step"]) for s in states if isinstance(s, dict) and "step" in s}
        if len(steps) > 1:
            raise ConvertError(f"{files[0]}: the optimizer's groups are at different steps {sorted(steps)}")
        return steps.pop() if steps else 0

    def _flat_states(self, obj, path: Path) -> dict:
        node = _field(obj, "optimizer_state_dict", path)
        for key in self.plan.state_keys:
            node = _field(node, key, path)
        return node

    def _gather(self, names: list[str], state: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        unique = list(dict.fromkeys(names))
        # each parameter's pieces (one unless a model-parallel layout split it), flat
        out = {n: [torch.zeros(math.prod(shape), dtype=torch.float32)
                   for shape in self.plan.pieces.get(n, [self.plan.shapes[n]])] for n in unique}
        by_file: dict[Path, list[tuple[str, Fragment]]] = {}
        for n in unique:
            for f in self.plan.fragments[n]:
                by_file.setdefault(f.file, []).append((n, f))
        for path, items in by_file.items():  # one file open at a time
            obj = _load(path)
            if items[0][1].group < 0 and state is None:
                module = _field(obj, "module", path)
                for n, f in items:
                    out[n][0].copy_(_field(module, n, path).reshape(-1).float())
            elif items[0][1].group < 0:  # ZeRO 0: torch's optimizer state_dict, by parameter index
                states = _field(_field(obj, "optimizer", path), "state", path)
                for n, f in items:
                    if n not in self.plan.optim_index:
                        raise ConvertError(f"{path}: {n!r} is not a parameter the optimizer holds")
                    s = states.get(self.plan.optim_index[n])
                    if s is not None:
                        out[n][0].copy_(_field(s, state, path).reshape(-1).float())
            else:
                if state is None:
                    flat = _field(_field(obj, "optimizer_state_dict", path), self.plan.flat_key, path)
                else:
                    states = self._flat_states(obj, path)
                    groups = sorted({f.group for _, f in items})
                    if any(g not in states for g in groups):  # no step applied yet: Adam's state is empty
                        flat = None
                    else:
                        flat = [_field(states[g], state, path) if g in groups else None
                                for g in range(max(groups) + 1)]
                if flat is None:
                    continue
                expected = self.plan.group_sizes.get(path)
                if state is None and expected is not None and [t.numel() for t in flat][:len(expected)] != expected:
                    raise ConvertError(f"{path}: flat groups of {[t.numel() for t in flat]} values, expected "
                                       f"{expected} (the files of {self.saved.path} do not belong together)")
                for n, f in items:
                    if flat[f.group].numel() < f.src + f.length:
                        raise ConvertError(f"{path}: group {f.group} of {state or self.plan.flat_key} holds "
                                           f"{flat[f.group].numel()} values, {f.src + f.length} expected (the "
                                           f"files of {self.saved.path} do not belong together)")
                    out[n][f.piece][f.dst:f.dst + f.length].copy_(flat[f.group][f.src:f.src + f.length])
            del obj
        if state is None:  # the master weights against the module's own copies (ZeRO 1/2)
            wanted = set(unique)
            for path, entries in self.plan.checks.items():
                entries = [e for e in entries if e[0] in wanted]
                if not entries:
                    continue
                obj = _load(path)
                for n, piece, key, stored in entries:
                    ref = _field(obj if key is None else _field(obj, key, path), stored, path)
                    if not torch.equal(out[n][piece].to(ref.dtype), ref.reshape(-1)):
                        raise ConvertError(f"{path}: {n} differs from the fp32 master weights in the optimizer "
                                           f"files; the checkpoint's files do not belong together")
                del obj
        for n in names:
            parts = [t.view(shape) for t, shape in zip(out[n], self.plan.pieces.get(n, [self.plan.shapes[n]]))]
            join = self.plan.join.get(n)
            yield n, join(parts) if join is not None else parts[0]
