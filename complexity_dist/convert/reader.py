"""Reading a training checkpoint tensor by tensor, whatever the layout that wrote it.

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
offset) it is made of. Tensor, pipeline and expert parallel layouts plug in as further planners in
`LAYOUT_PLANNERS` (their fragments come from several model-parallel ranks' files); until then they are refused.
"""
from __future__ import annotations

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

OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")
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


@dataclass
class Plan:
    shapes: dict[str, torch.Size]
    fragments: dict[str, list[Fragment]]
    module_file: Path | None = None  # checked against (ZeRO 1/2): the module's copy of each weight
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
    optim = {int(m.group(1)): step_dir / f.name for f in step_dir.iterdir() if (m := OPTIM_FILE.fullmatch(f.name))}
    world = len(optim)
    if sorted(optim) != list(range(world)) or world == 0:
        raise ConvertError(f"{step_dir} has optimizer files for ranks {sorted(optim)}: expected ranks 0..N-1")
    first = _field(_load(optim[0]), "optimizer_state_dict", optim[0])
    count = _field(first, "partition_count", optim[0])
    count = max(count) if isinstance(count, list) else count
    if count != world:
        raise ConvertError(f"{optim[0]} was written by {count} data-parallel ranks but {step_dir} holds {world} "
                           f"optimizer files")
    shapes: dict[str, torch.Size] = {}
    frags: dict[str, list[Fragment]] = {}
    if zero in (1, 2):
        parts = [t.numel() for t in _field(first, "single_partition_of_fp32_groups", optim[0])]
        pads = first.get("param_alignment_paddings") or [[0] * len(g) for g in groups]
        for g, params in enumerate(groups):
            off, P = 0, parts[g]
            for (name, shape), pad in zip(params.items(), pads[g]):
                n = math.prod(shape)
                shapes[name], frags[name] = torch.Size(shape), []
                for r in range(world):
                    lo, hi = max(off, r * P), min(off + n, (r + 1) * P)
                    if lo < hi:
                        frags[name].append(Fragment(optim[r], g, lo - r * P, hi - lo, lo - off))
                off += n + pad
            if off > P * world:
                raise ConvertError(f"{optim[0]}: group {g} holds {P * world} values over {world} ranks, its "
                                   f"parameters need {off}; the optimizer files do not match {model_file}")
        sizes = parts
        key = "single_partition_of_fp32_groups"
        state_keys = ("base_optimizer_state", "state")
        module_file = model_file
    else:
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
        key = "fp32_flat_groups"
        state_keys = ("optimizer_state_dict", "state")
        module_file = None
    plan = Plan(shapes, frags, module_file, key, state_keys=state_keys)
    plan.group_sizes = {f: sizes for f in optim.values()}
    return plan


def _zero0_optimizer_index(step_dir: Path) -> dict[str, int]:
    """ZeRO 0 keeps torch's optimizer state_dict, which numbers the parameters in the order of the optimizer's
    groups. That order is a function of the model config (deepspeed_engine.param_groups), so it is rebuilt on
    the meta device (no memory, no weights)."""
    from complexity_dist.model import ComplexityForCausalLM
    from complexity_dist.parallel.deepspeed_engine import no_weight_decay

    saved = Checkpointer.inspect(None, step_dir)
    with torch.device("meta"):
        model = ComplexityForCausalLM(model_config_of(saved))
    named = list(model.named_parameters())
    order = [n for n, p in named if not no_weight_decay(n, p)] + [n for n, p in named if no_weight_decay(n, p)]
    return {n: i for i, n in enumerate(order)}


def _refuse_model_parallel(step_dir: Path, parallel: dict) -> Plan:
    sizes = ", ".join(f"{k}={parallel.get(k, 1)}" for k in ("tp", "pp", "ep"))
    raise ConvertError(f"{step_dir} was written with parallel {sizes}: reading tensor/pipeline/expert-parallel "
                       f"checkpoints is not wired into convert yet (only data parallel, ZeRO 0-3)")


# (parallel config) -> planner; the first whose predicate holds plans the read
LAYOUT_PLANNERS: list[tuple[Callable[[dict], bool], Callable[[Path, dict], Plan]]] = [
    (lambda p: all(int(p.get(k, 1)) == 1 for k in ("tp", "pp", "ep")),
     lambda d, p: _data_parallel_plan(d, int(p.get("zero_stage", 0)))),
    (lambda p: True, _refuse_model_parallel),
]


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
        out = {n: torch.zeros(self.plan.shapes[n].numel(), dtype=torch.float32) for n in unique}
        by_file: dict[Path, list[tuple[str, Fragment]]] = {}
        for n in unique:
            for f in self.plan.fragments[n]:
                by_file.setdefault(f.file, []).append((n, f))
        for path, items in by_file.items():  # one file open at a time
            obj = _load(path)
            if items[0][1].group < 0 and state is None:
                module = _field(obj, "module", path)
                for n, f in items:
                    out[n].copy_(_field(module, n, path).reshape(-1).float())
            elif items[0][1].group < 0:  # ZeRO 0: torch's optimizer state_dict, by parameter index
                states = _field(_field(obj, "optimizer", path), "state", path)
                for n, f in items:
                    if n not in self.plan.optim_index:
                        raise ConvertError(f"{path}: {n!r} is not a parameter the optimizer holds")
                    s = states.get(self.plan.optim_index[n])
                    if s is not None:
                        out[n].copy_(_field(s, state, path).reshape(-1).float())
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
                    out[n][f.dst:f.dst + f.length].copy_(flat[f.group][f.src:f.src + f.length])
            del obj
        if self.plan.module_file is not None and state is None:
            module = _field(_load(self.plan.module_file), "module", self.plan.module_file)
            for n in unique:
                ref = _field(module, n, self.plan.module_file)
                if not torch.equal(out[n].to(ref.dtype), ref.reshape(-1)):
                    raise ConvertError(f"{self.plan.module_file}: {n} differs from the fp32 master weights in the "
                                       f"optimizer files; the checkpoint's files do not belong together")
            del module
        for n in names:
            yield n, out[n].view(self.plan.shapes[n])
