"""Checkpoints under <run_dir>/checkpoints/: DeepSpeed's sharded state plus the trainer's own state.

Nothing half-written is ever taken for a checkpoint: every rank writes into `.tmp-step_N`, the ranks agree
that all writes succeeded, rank 0 adds `manifest.json` (every file and its size), renames the folder to
`step_N` and only then rewrites `latest` (atomically, by rename). A crash at any point leaves the previous
`latest` pointing at a complete checkpoint; a full disk removes the partial folder and stops the run.

Checkpoint files are data, never code: every `.pt` file is read with `torch.load(weights_only=True)`, which
builds tensors and plain containers only, plus the few harmless DeepSpeed types listed in DEEPSPEED_GLOBALS.
A file that asks for anything else (a pickled `__reduce__` payload, say) is refused before it is read.
"""
from __future__ import annotations

import errno
import importlib
import json
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from complexity_dist.config import Config, ConfigError
from complexity_dist.redact import redact_tree
from complexity_dist.train.faults import NoSpaceLeft

TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.json"
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_NAME = re.compile(r"step_\d{8}")
RANK_FILE = re.compile(r"rank_\d{5}\.pt")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

# The only non-container types DeepSpeed 0.19.8 writes into its checkpoints (ZeRO 0-3, fp32 and bf16;
# found with torch.serialization.get_unsafe_globals_in_checkpoint on real checkpoints). All three are plain
# records rebuilt from their attributes; none runs code when unpickled.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
)
# Rank files written before the RNG state was stored as lists held numpy's MT19937 state as an ndarray.
LEGACY_RANK_GLOBALS = (
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray",
    "numpy.dtype", "numpy.dtypes.UInt32DType",
)


class CheckpointMismatch(ConfigError):
    """A checkpoint that cannot continue this run (another model, another layout, refused content)."""


class DamagedCheckpoint(Exception):
    """A checkpoint folder with a missing, truncated or unreadable file (the message names it)."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- RNG state as tensors and plain containers (loadable with weights_only=True) ------------------------

def rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": list(mt), "gauss": gauss},
             "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    else:  # a rank file of an earlier version: random.getstate() as pickled
        random.setstate(tuple(py))
    if isinstance(npy, dict):
        np.random.set_state((npy["name"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"],
                             npy["has_gauss"], npy["cached_gaussian"]))
    else:
        np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- reading .pt files without running code ---------------------------------------------------------------

def _allowed_for(path: Path) -> tuple[str, ...]:
    return LEGACY_RANK_GLOBALS if RANK_FILE.fullmatch(path.name) else DEEPSPEED_GLOBALS


def _resolve(names: tuple[str, ...]) -> list:
    """(object, name) pairs for torch's safe_globals; names whose module is not importable are skipped."""
    out = []
    for name in names:
        module, attr = name.rsplit(".", 1)
        try:
            with warnings.catch_warnings():  # numpy 2 warns on its numpy.core alias
                warnings.simplefilter("ignore")
                obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        out.append((obj, name))
    return out


def _refused(path: Path, what: str) -> CheckpointMismatch:
    return CheckpointMismatch(
        f"{path} asks to unpickle {what}, which no checkpoint written by complexity-dist contains; refusing "
        f"to load it (the file may have been tampered with: unpickling it could run code). Resume from a "
        f"checkpoint you trust (remove this step_* folder), or start over with a new train.run_dir")


def safe_load(path: str | Path, map_location=None, mmap: bool = False) -> Any:
    """torch.load that builds tensors, plain containers and the allow-listed types only; anything else
    raises CheckpointMismatch naming the file and the refused global. `mmap=True` maps the tensors' storage
    instead of reading it (what `convert` uses to stream a large file)."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_resolve(_allowed_for(path))):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL (\S+) was not an allowed global", str(e)) or \
            re.search(r"but got (<class '[^']+'>|\S+)", str(e))
        raise _refused(path, m.group(1) if m else "a type outside the allow-list") from None


def refused_globals(path: Path) -> list[str]:
    """The globals a .pt file would import that are outside the allow-list; found by reading the pickle's
    opcodes only (nothing is executed)."""
    found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    allowed = set(_allowed_for(path))
    return sorted(g for g in found if g not in allowed)


def _write_torch(obj: Any, path: Path) -> None:
    """torch.save through a Python file, fsynced. torch's zip writer turns a failed write into a RuntimeError
    without errno; the writer below keeps the OSError (ENOSPC, EDQUOT, ...) so it can be told apart."""
    class Writer:
        error: OSError | None = None

        def __init__(self, f):
            self.f = f

        def write(self, data):
            try:
                return self.f.write(data)
            except OSError as e:
                self.error = e
                raise

        def flush(self):
            self.f.flush()

    with open(path, "wb") as f:
        writer = Writer(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise
        f.flush()
        os.fsync(f.fileno())


@dataclass
class SavedRun:
    tag: str
    path: Path
    trainer_state: dict
    config: dict
    notes: list[str] = field(default_factory=list)  # what the search for a checkpoint found on the way

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"])


class _GuardedWrites:
    """Routes DeepSpeed's checkpoint writes through `_write_torch` and remembers the first OSError instead of
    raising it: DeepSpeed's save_checkpoint has collectives after its writes, so a rank that raised out of
    it would leave the others waiting forever. The ranks compare notes after it returns."""

    def __init__(self, in_write: Callable[[Path], None] | None):
        self.in_write = in_write
        self.error: OSError | None = None

    def write(self, obj: Any, path) -> None:
        if self.error is not None:
            return  # the disk is full (or broken): do not spend minutes writing the rest
        try:
            if self.in_write is not None:
                self.in_write(Path(path))
            _write_torch(obj, Path(path))
        except OSError as e:
            self.error = e

    @contextmanager
    def around(self, engine):
        ce = engine.checkpoint_engine
        had_save = "save" in vars(ce)
        ce.save = lambda state_dict, path: self.write(state_dict, path)
        copy_script = getattr(engine, "_copy_recovery_script", None)  # zero_to_fp32.py, rank 0, ZeRO > 0
        if copy_script is not None:
            engine._copy_recovery_script = lambda save_path: self._guard(copy_script, save_path)
        try:
            yield self
        finally:
            if not had_save:
                del ce.save
            if copy_script is not None:
                del engine._copy_recovery_script

    def _guard(self, fn, *args) -> None:
        if self.error is not None:
            return
        try:
            fn(*args)
        except OSError as e:
            self.error = e


@contextmanager
def _safe_deepspeed_reads(engine):
    """DeepSpeed 0.19.8 reads its files with torch.load(weights_only=False) through engine.checkpoint_engine;
    for the duration of a load, that reader is replaced by `safe_load`."""
    ce = engine.checkpoint_engine
    had_load = "load" in vars(ce)
    original = ce.load
    ce.load = lambda path, map_location=None: safe_load(path, map_location=map_location)
    try:
        yield
    finally:
        if had_load:
            ce.load = original
        else:
            del ce.load


@contextmanager
def _without_deepspeed_expert_files(engine):
    """Expert parallel (complexity_dist/parallel/expert_parallel.py) shows DeepSpeed a parameter-free MoE
    marker, so DeepSpeed writes no per-expert files (its format assumes contiguous expert blocks; ours are
    e mod ep) and must not look for them on load. Each rank's expert rows are in its own rank file instead
    (the trainer restores them after this load; ZeRO 1/2 also restore them from each rank's optimizer
    partition)."""
    if not getattr(engine, "has_moe_layers", False):
        yield
        return
    cls = type(engine)
    for klass in cls.__mro__:
        if "load_moe_state_dict" in klass.__dict__:
            owner, original = klass, klass.__dict__["load_moe_state_dict"]
            break
    owner.load_moe_state_dict = staticmethod(lambda *args, **kwargs: None)
    try:
        yield
    finally:
        owner.load_moe_state_dict = original


def _agree(code: int) -> int:
    """The largest of every rank's `code` (0 = all well)."""
    on_gpu = "nccl" in str(dist.get_backend()) and torch.cuda.is_available()
    flag = torch.tensor([code], dtype=torch.int32,
                        device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


_OK, _FULL, _BROKEN = 0, 1, 2


def _code(error: OSError | None) -> int:
    if error is None:
        return _OK
    return _FULL if error.errno in NO_SPACE else _BROKEN


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep_last: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    @staticmethod
    def tag_for(step: int) -> str:
        return f"step_{step:08d}"

    # --- reading (safe before any process group exists) -------------------------------------------------

    def step_folders(self) -> list[Path]:
        """step_NNNNNNNN folders, newest first (`.tmp-step_*` leftovers of a crash are not checkpoints)."""
        return sorted((p for p in self.dir.glob("step_*") if STEP_NAME.fullmatch(p.name) and p.is_dir()),
                      key=lambda p: p.name, reverse=True)

    def latest(self) -> SavedRun | None:
        """The checkpoint to resume from: the one `latest` names, or the newest intact one before it when that
        one is damaged; without `latest`, the newest intact step_* folder. None when there is none at all.
        Raises CheckpointMismatch for a `latest` that points elsewhere, refused file content, or when every
        checkpoint is damaged (starting over would overwrite them)."""
        pointer = self.dir / LATEST
        folders = self.step_folders()
        notes: list[str] = []
        if pointer.is_file():
            tag = pointer.read_text().strip()
            if not STEP_NAME.fullmatch(tag) or (self.dir / tag).resolve().parent != self.dir.resolve():
                raise CheckpointMismatch(
                    f"{pointer} names {tag!r}, which is not a step_NNNNNNNN folder inside {self.dir}; refusing "
                    f"to follow it. Write the name of one of the step_* folders there, or delete {pointer} "
                    f"to resume from the newest complete checkpoint")
            candidates = [self.dir / tag] + [p for p in folders if p.name < tag]
        elif folders:
            notes.append(f"{pointer} is missing: resuming from the newest complete checkpoint in {self.dir}")
            candidates = folders
        else:
            return None
        problems = []
        for path in candidates:
            try:
                saved = self.inspect(path)
            except DamagedCheckpoint as e:
                problems.append(str(e))
                notes.append(f"checkpoint {path.name} is damaged ({e}); trying an earlier one")
                continue
            if path != candidates[0] or not pointer.is_file():
                notes.append(f"resuming from {path} (step {saved.step})")
            saved.notes = notes
            return saved
        raise CheckpointMismatch(
            f"no intact checkpoint in {self.dir}: {'; '.join(problems)}. Restore the damaged files, or start "
            f"over with a new train.run_dir (or delete {self.dir})")

    def inspect(self, path: Path) -> SavedRun:
        """Checks a step folder without loading its tensors: refused content raises CheckpointMismatch (never
        fall back past tampering); missing, truncated or unreadable files raise DamagedCheckpoint.
        Sizes are compared with manifest.json (when there is one: checkpoints of earlier versions have none);
        reading whole files for checksums would cost minutes on a multi-GB checkpoint."""
        if not path.is_dir():
            raise DamagedCheckpoint(f"{path} is missing")
        pt_files = sorted(path.glob("*.pt"))
        for f in pt_files:
            try:
                refused = refused_globals(f)
            except Exception as e:  # a truncated zip or a file that is not a checkpoint
                raise DamagedCheckpoint(f"{f} is unreadable ({_short(e)})") from None
            if refused:
                raise _refused(f, ", ".join(refused))
        trainer_state = _read_json(path / TRAINER_STATE, ("step", "world_size", "tokens_seen", "skipped_total"))
        config = _read_json(path / CONFIG_FILE, ("model", "parallel"))
        manifest_file = path / MANIFEST
        if manifest_file.exists():
            manifest = _read_json(manifest_file, ("files",))
            for name, size in manifest["files"].items():
                f = path / name
                if not f.is_file():
                    raise DamagedCheckpoint(f"{f} is missing")
                if f.stat().st_size != size:
                    raise DamagedCheckpoint(f"{f} has {f.stat().st_size} bytes, {size} when it was written")
        world = int(trainer_state["world_size"])
        names = {f.name for f in pt_files}
        expected = [f"rank_{r:05d}.pt" for r in range(world)]
        # DeepSpeed names its files by model-parallel rank (tp x pp; one replica's ranks) and data-parallel rank
        parallel = config["parallel"]
        model_parallel = int(parallel.get("tp", 1)) * int(parallel.get("pp", 1))
        dp = max(world // model_parallel, 1)
        for m in range(model_parallel):
            if not ({f"mp_rank_{m:02d}_model_states.pt", f"zero_pp_rank_0_mp_rank_{m:02d}_model_states.pt"} & names):
                expected.append(f"mp_rank_{m:02d}_model_states.pt")
            if int(parallel.get("zero_stage", 0)) > 0:
                for r in range(dp):
                    if not any(n.endswith(f"zero_pp_rank_{r}_mp_rank_{m:02d}_optim_states.pt") for n in names):
                        expected.append(f"zero_pp_rank_{r}_mp_rank_{m:02d}_optim_states.pt")
        if int(parallel.get("pp", 1)) > 1:
            # DeepSpeed's pipeline checkpoint: one file per pipe layer (complexity_dist/parallel/pipeline.py):
            # embedding, decoder layers, final norm, and the untied lm_head (the tied head is the embedding's)
            pipe_layers = int(config["model"]["num_hidden_layers"]) + 2 + \
                (0 if config["model"].get("tie_word_embeddings", True) else 1)
            # (with tp > 1 one per layer and tensor-parallel rank: DeepSpeed's "-model_XX" in the name)
            tp = int(parallel.get("tp", 1))
            expected += [f"layer_{i:02d}-model_{m:02d}-model_states.pt" if tp > 1 else f"layer_{i:02d}-model_states.pt"
                         for i in range(pipe_layers) for m in range(tp)]
        for name in expected:
            if name not in names:
                raise DamagedCheckpoint(f"{path / name} is missing")
        return SavedRun(path.name, path, trainer_state, config)

    def refuse_overwrite(self) -> None:
        """checkpoint.resume=false on a run_dir that holds checkpoints: starting at step 1 would overwrite them
        (and metrics.jsonl), so the user chooses explicitly."""
        found = [p.name for p in self.step_folders()] + ([LATEST] if (self.dir / LATEST).exists() else [])
        if found:
            raise CheckpointMismatch(
                f"checkpoint.resume=false, but {self.dir} holds checkpoints ({', '.join(found[:3])}"
                f"{', ...' if len(found) > 3 else ''}) that a fresh run would overwrite. To start over, use a new "
                f"train.run_dir or delete {self.dir}; to continue, set checkpoint.resume=true")

    @staticmethod
    def check_compatible(saved: SavedRun, cfg: Config, world_size: int) -> None:
        """Refuse a checkpoint of another model with a message that names the differences (layouts reshard)."""
        now = cfg.to_dict()
        diffs = [f"model.{k}: checkpoint {v!r}, config {now['model'].get(k)!r}"
                 for k, v in saved.config["model"].items() if now["model"].get(k) != v]
        if diffs:
            raise CheckpointMismatch(
                f"checkpoint {saved.path} is of another model ({'; '.join(diffs)}); use the checkpoint's "
                f"model config, or a new train.run_dir to start a fresh run")
        # any layout (ZeRO stage, process count, tp, ep, pp) resumes under any other the training loop runs
        # (complexity_dist/train/reshard.py)

    # --- writing (all ranks) -----------------------------------------------------------------------------

    def save(self, engine, step: int, trainer_state: dict, rank_state: dict, cfg: Config,
             before_commit=None, in_write: Callable[[Path], None] | None = None) -> Path:
        """Writes step N on every rank. On a full disk (ENOSPC/EDQUOT on any rank) every rank raises
        NoSpaceLeft after the partial folder is removed; `latest` and the previous checkpoint are untouched."""
        rank = dist.get_rank()
        tag = self.tag_for(step)
        tmp_tag = f".tmp-{tag}"
        tmp = self.dir / tmp_tag
        final = self.dir / tag
        previous = (self.dir / LATEST).read_text().strip() if (self.dir / LATEST).is_file() else None
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-step_*"):  # a crash's leftovers: only one save runs at a time
                shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()
        guard = _GuardedWrites(in_write)
        error: OSError | None = None
        try:
            with guard.around(engine):
                engine.save_checkpoint(str(self.dir), tag=tmp_tag, save_latest=False)
            error = guard.error
            if error is None:
                rank_file = tmp / f"rank_{rank:05d}.pt"
                if in_write is not None:
                    in_write(rank_file)
                _write_torch({"rng": rng_state(), **rank_state}, rank_file)
            if error is None and rank == 0:
                _atomic_write_text(tmp / CONFIG_FILE, json.dumps(redact_tree(cfg.to_dict()), indent=1))
                _atomic_write_text(tmp / TRAINER_STATE,
                                   json.dumps({**trainer_state, "step": step, "world_size": dist.get_world_size()}))
        except OSError as e:
            error = error or e
        if before_commit is not None:
            before_commit(step)  # fault-injection point: everything written, nothing committed
        # every rank is past its writes here: a failure anywhere stops all of them at the same point
        self._settle(_agree(_code(error)), error, step, previous, tmp)
        committed = False
        if rank == 0:
            try:
                files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
                _atomic_write_text(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=0))
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                _fsync_dir(self.dir)
                committed = True
                _atomic_write_text(self.dir / LATEST, tag)  # moves last
            except OSError as e:
                error = e
                # `latest` still names the previous step: drop the new folder so no stale newer step lingers
                shutil.rmtree(final if committed else tmp, ignore_errors=True)
            else:
                self._prune(keep=tag)
        self._settle(_agree(_code(error)), error, step, previous, tmp)
        return final

    def _settle(self, code: int, error: OSError | None, step: int, previous: str | None, tmp: Path) -> None:
        """After the ranks agreed on `code`: nothing to do when 0; else remove the partial folder and raise."""
        if code == _OK:
            return
        reasons: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(reasons, None if error is None else f"rank {dist.get_rank()}: {error}")
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        detail = "; ".join(r for r in reasons if r)
        if code == _FULL:
            kept = (f"the previous checkpoint {previous} is intact" if previous
                    else "no earlier checkpoint exists")
            raise NoSpaceLeft(f"no space left on {self.dir} while saving step {step}: {detail}; {kept}. Free "
                              f"space (or lower checkpoint.keep_last) and run the same command again to resume")
        if error is not None:
            raise error
        raise RuntimeError(f"saving step {step} failed on another rank ({detail}); {tmp} was removed")

    def _prune(self, keep: str) -> None:
        done = sorted(self.step_folders())
        for old in done[:-self.keep_last]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(".tmp-step_*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, engine, saved: SavedRun) -> dict:
        """Loads engine state and this rank's RNG; returns this rank's saved extra state."""
        with _safe_deepspeed_reads(engine), _without_deepspeed_expert_files(engine):
            load_path, _ = engine.load_checkpoint(str(self.dir), tag=saved.tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointMismatch(f"DeepSpeed could not load {saved.path}")
        rank_file = saved.path / f"rank_{dist.get_rank():05d}.pt"
        rank_state = safe_load(rank_file)
        set_rng_state(rank_state.pop("rng"))
        return rank_state


def _read_json(path: Path, keys: tuple[str, ...]) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedCheckpoint(f"{path} is not valid JSON ({_short(e)})") from None
    missing = [k for k in keys if not isinstance(value, dict) or k not in value]
    if missing:
        raise DamagedCheckpoint(f"{path} lacks {', '.join(missing)}")
    return value


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def print_notes(saved: SavedRun | None) -> None:
    """The resume search's findings, printed once (by the first process) before training starts."""
    if saved is not None and os.environ.get("RANK", "0") == "0":
        for note in saved.notes:
            print(f"complexity-dist: {note}", file=sys.stderr, flush=True)


def finished(saved: SavedRun, cfg: Config) -> int:
    """A resume whose checkpoint already reached train.steps: says so and ends (exit 0) without training."""
    if os.environ.get("RANK", "0") == "0":
        print(f"complexity-dist: checkpoint {saved.path} is already at step {saved.step} >= "
              f"train.steps={cfg.train.steps}: nothing left to train (raise train.steps to continue)",
              file=sys.stderr, flush=True)
    return 0
