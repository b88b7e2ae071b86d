"""The training loop end to end, as users run it: `complexity-dist train` (under torchrun for 2 processes)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128",
         "model.num_hidden_layers=2", "model.num_attention_heads=4", "model.num_key_value_heads=2",
         "data.seq_len=32", "train.global_batch=4", "optim.lr=3e-3", "optim.warmup_steps=3",
         "tracking.enabled=false"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Shards prepared from text that the test writes itself (vocab 384 < model vocab 512)."""
    from complexity_dist.data.prepare import prepare_data

    src = tmp_path_factory.mktemp("text")
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial boxers".split()
    for i in range(12):
        doc = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(1200))
        (src / f"doc{i:02d}.txt").write_text(doc + "\n")
    out = tmp_path_factory.mktemp("data") / "shards"
    prepare_data(sorted(src.glob("*.txt")), out, seq_len=32, tokenizer=None, vocab_size=384,
                 samples_per_shard=64, num_proc=1, progress=False)
    return out


def launcher(nproc: int) -> list[str]:
    """The command prefix that runs a Python program on `nproc` local processes (plain python for one)."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]


def train_cmd(run_dir: Path, data: Path, *overrides: str, nproc: int = 1) -> list[str]:
    return [*launcher(nproc), "-m", "complexity_dist", "train", str(ROOT / "configs/tiny.yaml"), *SMALL,
            f"train.run_dir={run_dir}", f"data.path={data}", *overrides]


def run(cmd, env_extra=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def model_state(run_dir: Path, step: int) -> dict:
    f = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(f, map_location="cpu", weights_only=False)["module"]


def test_loss_falls_over_50_steps(tmp_path, dataset):
    run(train_cmd(tmp_path / "run", dataset, "train.steps=50", "checkpoint.every=50"))
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 51))
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "skipped"):
        assert key in rows[-1]
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_00000050"


@pytest.mark.parametrize("zero", [0, 2])
def test_resume_is_bit_exact_with_two_processes(tmp_path, dataset, zero):
    common = ["train.steps=40", "checkpoint.every=10", f"parallel.zero_stage={zero}", "train.micro_batch=1"]
    run(train_cmd(tmp_path / "full", dataset, *common, nproc=2))
    stopped = run(train_cmd(tmp_path / "split", dataset, *common, nproc=2),
                  env_extra={"COMPLEXITY_DIST_PREEMPT_AT": "20"}, check=False)
    assert stopped.returncode != 0  # exits with the requeue code (torchrun reports a failed worker)
    assert (tmp_path / "split/checkpoints/latest").read_text().strip() == "step_00000020"
    assert [r["step"] for r in metrics(tmp_path / "split")][-1] == 20
    run(train_cmd(tmp_path / "split", dataset, *common, nproc=2))
    full, split = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 41))
    assert [r["loss"] for r in split[20:]] == [r["loss"] for r in full[20:]]
    assert [r["grad_norm"] for r in split[20:]] == [r["grad_norm"] for r in full[20:]]


def test_injected_nan_is_skipped_and_leaves_weights_untouched(tmp_path, dataset):
    run(train_cmd(tmp_path / "run", dataset, "train.steps=5", "checkpoint.every=1", "checkpoint.keep_last=10"),
               env_extra={"COMPLEXITY_DIST_INJECT_NAN": "3"})
    rows = metrics(tmp_path / "run")
    assert [r["skipped"] for r in rows] == [0, 0, 1, 0, 0]
    before, after = model_state(tmp_path / "run", 2), model_state(tmp_path / "run", 3)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(model_state(tmp_path / "run", 4)["model.norm.weight"], after["model.norm.weight"])
    assert rows[-1]["skipped_total"] == 1


def test_consecutive_nans_abort_with_a_clear_message(tmp_path, dataset):
    proc = run(train_cmd(tmp_path / "run", dataset, "train.steps=10", "train.max_consecutive_skips=2"),
               env_extra={"COMPLEXITY_DIST_INJECT_NAN": "2,3,4"}, check=False)
    assert proc.returncode == 3
    assert "2 consecutive steps" in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_saves_and_the_run_continues_at_the_next_step(tmp_path, dataset):
    run_dir = tmp_path / "run"
    cmd = train_cmd(run_dir, dataset, "train.steps=100000", "checkpoint.every=100000")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 99, err[-3000:]
    saved_step = int((run_dir / "checkpoints/latest").read_text().strip().split("_")[1])
    assert saved_step >= 3 and metrics(run_dir)[-1]["step"] == saved_step
    run(train_cmd(run_dir, dataset, f"train.steps={saved_step + 2}", "checkpoint.every=100000"))
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, saved_step + 3))


def test_sigkill_while_saving_keeps_previous_latest_loadable(tmp_path, dataset):
    run_dir = tmp_path / "run"
    common = ["train.steps=6", "checkpoint.every=3"]
    killed = run(train_cmd(run_dir, dataset, *common), env_extra={"COMPLEXITY_DIST_KILL_IN_SAVE": "6"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000003"
    assert (ckpt / ".tmp-step_00000006").is_dir() and not (ckpt / "step_00000006").exists()
    run(train_cmd(run_dir, dataset, *common))  # resumes from step 3 and finishes
    assert (ckpt / "latest").read_text().strip() == "step_00000006"
    assert not (ckpt / ".tmp-step_00000006").exists()
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_unreachable_tracking_server_does_not_stop_training(tmp_path, dataset):
    proc = run(train_cmd(tmp_path / "run", dataset, "train.steps=3", "tracking.enabled=true",
                         f"tracking.uri=http://127.0.0.1:{free_port()}"))
    assert len(metrics(tmp_path / "run")) == 3
    assert "127.0.0.1" in proc.stderr + proc.stdout  # the warning names the server


def test_tracking_to_a_real_mlflow_server(tmp_path, dataset, mlflow_server):
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    run(train_cmd(run_dir, dataset, "train.steps=4", "tracking.enabled=true", f"tracking.uri={mlflow_server}",
                  "tracking.run_name=trainer-test"))
    client = MlflowClient(tracking_uri=mlflow_server)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "trainer-test"
    assert got.data.params["model.hidden_size"] == "64" and got.data.params["train.steps"] == "4"
    losses = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4]
    assert [round(m.value, 5) for m in sorted(losses, key=lambda m: m.step)] == \
        [round(r["loss"], 5) for r in metrics(run_dir)]
    artifacts = {a.path for d in ("config", "plots", "metrics") for a in client.list_artifacts(run_id, d)}
    assert {"config/resolved_config.yaml", "plots/loss_curve.png", "metrics/metrics.jsonl"} <= artifacts
    # a resumed run continues the same MLflow run
    run(train_cmd(run_dir, dataset, "train.steps=6", "tracking.enabled=true", f"tracking.uri={mlflow_server}"))
    assert (run_dir / "mlflow_run_id").read_text().strip() == run_id
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4, 5, 6]


def _fails_cleanly(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    for n in needles:
        assert n in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_bad_inputs_give_clear_errors(tmp_path, dataset):
    import shutil
    _fails_cleanly(run(train_cmd(tmp_path / "a", dataset, "train.stepz=3"), check=False),
                   "unknown config key train.stepz")
    _fails_cleanly(run(train_cmd(tmp_path / "b", dataset, "data.seq_len=64"), check=False), "seq_len", "32", "64")
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    shard = sorted(broken.glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[700:760] = b"\xff" * 60
    shard.write_bytes(bytes(data))
    _fails_cleanly(run(train_cmd(tmp_path / "c", broken, "train.steps=3"), check=False), shard.name)
    _fails_cleanly(run(train_cmd(tmp_path / "d", tmp_path / "nowhere"), check=False), "prepare-data")


def test_checkpoint_of_another_model_refuses_to_load(tmp_path, dataset):
    run(train_cmd(tmp_path / "run", dataset, "train.steps=2"))
    proc = run(train_cmd(tmp_path / "run", dataset, "train.steps=4", "model.num_hidden_layers=3"), check=False)
    _fails_cleanly(proc, "another model", "num_hidden_layers")
