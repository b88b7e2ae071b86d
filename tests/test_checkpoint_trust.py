"""Checkpoints as untrusted, fallible input: planted pickles, a `latest` that points elsewhere, missing or damaged
files, a full disk, and runs that would silently overwrite or skip work."""
import json
import random
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import dataset, metrics, run, train_cmd  # noqa: F401  (dataset is a fixture)

from complexity_dist.train.checkpoint import (CheckpointMismatch, Checkpointer, SavedRun, rng_state, safe_load,
                                              set_rng_state)

SECRET = "s3cret-pw"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, dataset):
    """4 steps, checkpoints at 2 and 4 (ZeRO 0, one process); tests work on copies of it."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    run(train_cmd(run_dir, dataset, "train.steps=4", "checkpoint.every=2",
                  f"tracking.uri=http://alice:{SECRET}@127.0.0.1:9/"))
    return run_dir


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory, dataset):
    """ZeRO stage 1: a checkpoint with a ZeRO optimizer file."""
    run_dir = tmp_path_factory.mktemp("zero") / "run"
    run(train_cmd(run_dir, dataset, "train.steps=2", "checkpoint.every=2", "parallel.zero_stage=1"))
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


class Payload:
    """Unpickling this creates `marker`: what an attacker's __reduce__ would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(pt_file: Path, marker: Path) -> None:
    state = torch.load(pt_file, map_location="cpu", weights_only=False)  # our own file: trusted here
    state["extra"] = Payload(marker)
    torch.save(state, pt_file)
    manifest = pt_file.parent / "manifest.json"
    if manifest.exists():  # a careful attacker fixes the sizes too
        m = json.loads(manifest.read_text())
        m["files"][pt_file.name] = pt_file.stat().st_size
        manifest.write_text(json.dumps(m))


def fails_cleanly(proc, *needles, code=2):
    assert proc.returncode == code, proc.stderr[-3000:]
    for n in needles:
        assert n in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_checkpoint_holds_data_only_and_no_credentials(base_run):
    ckpt = step_dir(base_run, 4)
    state = torch.load(ckpt / "rank_00000.pt", weights_only=True)  # no allow-list needed
    assert set(state) >= {"rng", "loader"}
    config = (ckpt / "config.json").read_text()
    assert SECRET not in config and "alice:***@127.0.0.1" in config
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["files"]["mp_rank_00_model_states.pt"] == (ckpt / "mp_rank_00_model_states.pt").stat().st_size
    assert {"rank_00000.pt", "config.json", "trainer_state.json"} <= set(manifest["files"])


def test_rng_state_round_trips_and_old_rank_files_still_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    new = tmp_path / "rank_00000.pt"
    torch.save({"rng": rng_state(), "loader": {"next_sample": 8}}, new)
    old = tmp_path / "rank_00001.pt"  # the format before: random/numpy states as pickled tuples and ndarrays
    torch.save({"rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state()}, "loader": {}}, old)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert torch.load(new, weights_only=True)["loader"] == {"next_sample": 8}
    for f in (new, old):
        random.seed(9), np.random.seed(9), torch.manual_seed(9)
        set_rng_state(safe_load(f)["rng"])
        assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


@pytest.mark.parametrize("victim", ["rank_00000.pt", "mp_rank_00_model_states.pt"])
def test_planted_pickle_is_refused(base_run, dataset, tmp_path, victim):
    run_dir = copy_of(base_run, tmp_path)
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    plant(step_dir(run_dir, 4) / victim, marker)
    proc = run(train_cmd(run_dir, dataset, "train.steps=6", "checkpoint.every=2"), check=False)
    fails_cleanly(proc, str(step_dir(run_dir, 4) / victim), "open", "refusing")
    assert not marker.exists()
    # the load path itself refuses too (not only the preflight scan)
    with pytest.raises(CheckpointMismatch, match="open"):
        safe_load(step_dir(run_dir, 4) / victim)
    assert not marker.exists()


def test_planted_pickle_in_zero_optimizer_file_is_refused(zero_run, dataset, tmp_path):
    run_dir = copy_of(zero_run, tmp_path)
    victim = step_dir(run_dir, 2) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "pwned"
    plant(victim, marker)
    proc = run(train_cmd(run_dir, dataset, "train.steps=4", "parallel.zero_stage=1"), check=False)
    fails_cleanly(proc, str(victim), "refusing")
    assert not marker.exists()


def test_deepspeed_reads_go_through_the_safe_loader(zero_run, tmp_path):
    """Checkpointer.load hands DeepSpeed a reader that refuses planted globals (defence behind preflight)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    run_dir = copy_of(zero_run, tmp_path)
    victim = step_dir(run_dir, 2) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "pwned"
    clean = safe_load(victim, map_location="cpu")  # ZeRO's own types pass the allow-list
    assert clean["optimizer_state_dict"]["loss_scaler"] is not None
    plant(victim, marker)

    class FakeEngine:
        checkpoint_engine = TorchCheckpointEngine()

        def load_checkpoint(self, load_dir, tag, **kw):
            return self.checkpoint_engine.load(str(Path(load_dir) / tag / victim.name), map_location="cpu"), {}

    saved = SavedRun("step_00000002", step_dir(run_dir, 2), {}, {})
    with pytest.raises(CheckpointMismatch, match=victim.name):
        Checkpointer(run_dir, 3).load(FakeEngine(), saved)
    assert not marker.exists()
    assert "load" not in vars(FakeEngine.checkpoint_engine)  # DeepSpeed's reader is restored afterwards


def test_latest_pointing_outside_is_refused(base_run, dataset, tmp_path):
    run_dir = copy_of(base_run, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(step_dir(run_dir, 4), elsewhere)
    (run_dir / "checkpoints/latest").write_text("../../elsewhere")
    proc = run(train_cmd(run_dir, dataset, "train.steps=6", "checkpoint.every=2"), check=False)
    fails_cleanly(proc, "../../elsewhere", "not a step_NNNNNNNN folder")
    (run_dir / "checkpoints/step_00000009").symlink_to(elsewhere)
    (run_dir / "checkpoints/latest").write_text("step_00000009")
    with pytest.raises(CheckpointMismatch, match="step_00000009"):
        Checkpointer(run_dir, 3).latest()


def test_missing_latest_resumes_from_newest_complete_checkpoint(base_run, dataset, tmp_path):
    run_dir = copy_of(base_run, tmp_path)
    ckpt = run_dir / "checkpoints"
    (ckpt / "latest").unlink()
    stale = ckpt / ".tmp-step_00000005"  # a crash's half-written save: never a resume point, removed
    stale.mkdir()
    (stale / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 half")
    proc = run(train_cmd(run_dir, dataset, "train.steps=6", "checkpoint.every=2"))
    assert "latest is missing" in proc.stderr and "resuming from" in proc.stderr and "step_00000004" in proc.stderr
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert (ckpt / "latest").read_text() == "step_00000006" and not stale.exists()


def test_resume_false_refuses_to_overwrite(base_run, dataset, tmp_path):
    run_dir = copy_of(base_run, tmp_path)
    before = (run_dir / "metrics.jsonl").read_text()
    proc = run(train_cmd(run_dir, dataset, "train.steps=4", "checkpoint.resume=false"), check=False)
    fails_cleanly(proc, "checkpoint.resume=false", "train.run_dir", str(run_dir / "checkpoints"))
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_damaged_latest_falls_back_to_the_previous_step(base_run, dataset, tmp_path):
    run_dir = copy_of(base_run, tmp_path)
    model = step_dir(run_dir, 4) / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    proc = run(train_cmd(run_dir, dataset, "train.steps=6", "checkpoint.every=2"))
    assert str(model) in proc.stderr and "step_00000002" in proc.stderr
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints/latest").read_text() == "step_00000006"


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-10])


def _garble(f: Path) -> None:
    f.write_text(f.read_text()[:-5])


@pytest.mark.parametrize("damage", [
    ("mp_rank_00_model_states.pt", Path.unlink), ("mp_rank_00_model_states.pt", _truncate),
    ("rank_00000.pt", Path.unlink), ("rank_00000.pt", _truncate),
    ("config.json", Path.unlink), ("config.json", _garble),
    ("trainer_state.json", Path.unlink), ("trainer_state.json", _garble)])
@pytest.mark.parametrize("manifest", [True, False])
def test_damage_is_found_before_any_process_group(base_run, tmp_path, damage, manifest):
    name, hurt = damage
    run_dir = copy_of(base_run, tmp_path)
    if not manifest:  # checkpoints of earlier versions: what can be checked still is
        for d in (step_dir(run_dir, 2), step_dir(run_dir, 4)):
            (d / "manifest.json").unlink()
        assert Checkpointer(run_dir, 3).latest().step == 4  # an intact one without manifest resumes
    hurt(step_dir(run_dir, 4) / name)
    saved = Checkpointer(run_dir, 3).latest()
    assert saved.step == 2 and any(name in n for n in saved.notes), saved.notes
    hurt(step_dir(run_dir, 2) / name)
    with pytest.raises(CheckpointMismatch, match=f"no intact checkpoint.*{name}"):
        Checkpointer(run_dir, 3).latest()


def test_all_damaged_exits_2(base_run, dataset, tmp_path):
    run_dir = copy_of(base_run, tmp_path)
    for s in (2, 4):
        (step_dir(run_dir, s) / "config.json").write_text("{")
    proc = run(train_cmd(run_dir, dataset, "train.steps=6"), check=False)
    fails_cleanly(proc, "no intact checkpoint", "config.json")


def test_steps_at_or_below_the_checkpoint(base_run, dataset, tmp_path):
    run_dir = copy_of(base_run, tmp_path)
    done = run(train_cmd(run_dir, dataset, "train.steps=4"))
    assert "already at step 4 >= train.steps=4" in done.stderr and "raise train.steps" in done.stderr
    fails_cleanly(run(train_cmd(run_dir, dataset, "train.steps=3"), check=False),
                  "already at step 4 > train.steps=3")


def test_disk_full_while_saving(base_run, dataset, tmp_path):
    run_dir = tmp_path / "run"
    common = ["train.steps=2", "checkpoint.every=1"]
    proc = run(train_cmd(run_dir, dataset, *common), env_extra={"COMPLEXITY_DIST_ENOSPC_IN_SAVE": "2"},
               check=False)
    fails_cleanly(proc, f"no space left on {run_dir / 'checkpoints'} while saving step 2",
                  "the previous checkpoint step_00000001 is intact", code=4)
    ckpt = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000001"]
    run(train_cmd(run_dir, dataset, *common))  # space freed: the same command resumes and finishes
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]


def test_disk_full_on_one_rank_stops_both_without_hanging(dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc = run(train_cmd(run_dir, dataset, "train.steps=2", "checkpoint.every=1", "parallel.zero_stage=1",
                         "train.micro_batch=1", nproc=2),
               env_extra={"COMPLEXITY_DIST_ENOSPC_IN_SAVE": "2@1"}, check=False, timeout=300)
    assert proc.returncode != 0
    assert "no space left" in proc.stderr and "rank 1:" in proc.stderr, proc.stderr[-3000:]
    assert "exitcode  : 4" in proc.stderr or "exitcode: 4" in proc.stderr.replace("  ", " "), proc.stderr[-3000:]
    ckpt = run_dir / "checkpoints"  # (ZeRO also drops its zero_to_*.py scripts there)
    assert sorted(p.name for p in ckpt.iterdir() if p.suffix != ".py") == ["latest", "step_00000001"]


def test_real_full_tmpfs(base_run, dataset, tmp_path):
    """A real ENOSPC: checkpoints on a tmpfs that holds one checkpoint and a half."""
    size = sum(f.stat().st_size for f in step_dir(base_run, 2).iterdir())
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs", str(ckpt)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        proc = run(train_cmd(run_dir, dataset, "train.steps=2", "checkpoint.every=1", "checkpoint.keep_last=3"),
                   check=False)
        fails_cleanly(proc, "no space left on", "while saving step 2", "step_00000001 is intact", code=4)
        assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000001"]
        assert Checkpointer(run_dir, 3).latest().step == 1
    finally:
        subprocess.run(["umount", str(ckpt)], check=True)
