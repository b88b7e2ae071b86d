"""Checkpoints under <run_dir>/checkpoints/: DeepSpeed's sharded state plus the trainer's own state.

Nothing half-written is ever taken for a checkpoint: every rank writes into `.tmp-step_N`, rank 0 renames
it to `step_N` once all ranks are done, and only then rewrites `latest` (atomically, by rename).
A crash at any point leaves the previous `latest` pointing at a complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from complexity_dist.config import Config, ConfigError

TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.json"


class CheckpointMismatch(ConfigError):
    """A checkpoint that cannot continue this run (another model, another layout)."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class SavedRun:
    tag: str
    path: Path
    trainer_state: dict
    config: dict


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep_last: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    @staticmethod
    def tag_for(step: int) -> str:
        return f"step_{step:08d}"

    # --- reading (safe before any process group exists) -------------------------------------------------

    def latest(self) -> SavedRun | None:
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        path = self.dir / tag
        state_file = path / TRAINER_STATE
        if not state_file.is_file():
            raise CheckpointMismatch(f"{pointer} names {tag}, but {state_file} is missing: the checkpoint "
                                     f"folder was damaged outside the trainer; point `latest` at an earlier "
                                     f"step_* folder or remove {self.dir} to start over")
        return SavedRun(tag, path, json.loads(state_file.read_text()),
                        json.loads((path / CONFIG_FILE).read_text()))

    @staticmethod
    def check_compatible(saved: SavedRun, cfg: Config, world_size: int) -> None:
        """Refuse a checkpoint of another model or layout with a message that names the differences."""
        now = cfg.to_dict()
        diffs = [f"model.{k}: checkpoint {v!r}, config {now['model'].get(k)!r}"
                 for k, v in saved.config["model"].items() if now["model"].get(k) != v]
        if diffs:
            raise CheckpointMismatch(
                f"checkpoint {saved.path} is of another model ({'; '.join(diffs)}); use the checkpoint's "
                f"model config, or a new train.run_dir to start a fresh run")
        old_world = saved.trainer_state["world_size"]
        old_zero = saved.config["parallel"]["zero_stage"]
        if old_zero != cfg.parallel.zero_stage or (old_zero > 0 and old_world != world_size):
            raise CheckpointMismatch(
                f"checkpoint {saved.path} was written with parallel.zero_stage={old_zero} on {old_world} "
                f"process(es); this run has zero_stage={cfg.parallel.zero_stage} on {world_size}. Resume with "
                f"the same layout (ZeRO optimizer shards are per rank)")

    # --- writing (all ranks) -----------------------------------------------------------------------------

    def save(self, engine, step: int, trainer_state: dict, rank_state: dict, cfg: Config,
             before_commit=None) -> Path:
        rank = dist.get_rank()
        tag = self.tag_for(step)
        tmp_tag = f".tmp-{tag}"
        tmp = self.dir / tmp_tag
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        engine.save_checkpoint(str(self.dir), tag=tmp_tag, save_latest=False)
        torch.save({"rng": rng_state(), **rank_state}, tmp / f"rank_{rank:05d}.pt")
        if rank == 0:
            _atomic_write_text(tmp / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=1))
            _atomic_write_text(tmp / TRAINER_STATE,
                               json.dumps({**trainer_state, "step": step, "world_size": dist.get_world_size()}))
        if before_commit is not None:
            before_commit(step)  # fault-injection point: everything written, nothing committed
        dist.barrier()
        final = self.dir / tag
        if rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            _atomic_write_text(self.dir / "latest", tag)  # moves last
            self._prune(keep=tag)
        dist.barrier()
        return final

    def _prune(self, keep: str) -> None:
        done = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        for old in done[:-self.keep_last]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(".tmp-step_*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, engine, saved: SavedRun) -> dict:
        """Loads engine state and this rank's RNG; returns this rank's saved extra state."""
        load_path, _ = engine.load_checkpoint(str(self.dir), tag=saved.tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointMismatch(f"DeepSpeed could not load {saved.path}")
        rank_file = saved.path / f"rank_{dist.get_rank():05d}.pt"
        rank_state = torch.load(rank_file, weights_only=False)
        set_rng_state(rank_state.pop("rng"))
        return rank_state
