"""Launchers: the sbatch scripts, launch/submit.py (submitit) and launch/torchrun.sh.

The `slurm` tests run real jobs on a one-node SLURM cluster on localhost (tests/slurm_cluster.py installs
Debian's slurm-wlm + munge when root and apt are available, and skips otherwise): a tiny 2-process gloo run
through `sbatch --wait slurm/pretrain_tiny.sh`, the same through submitit, a preemption drill for each
(signal mid-run -> checkpoint -> requeue -> resume), and both launchers on two (emulated) nodes with one
process each. Every run has the same data-parallel layout (2 ranks), so every loss trajectory must equal the
uninterrupted single-node run's, bit for bit.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch import submit as S  # noqa: E402

# Small enough for 2 CPU cores: ~0.3 s a step with 2 gloo processes.
STEPS = 30
TINY = ["model.num_hidden_layers=2", "data.seq_len=64", "train.global_batch=4", f"train.steps={STEPS}",
        "checkpoint.every=10", "tracking.enabled=false"]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh")) + [ROOT / "launch" / "torchrun.sh"]


# ------------------------------------------------------------------------------------------------ helpers
def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return rows


def last_step(run_dir: Path) -> int:
    rows = read_metrics(run_dir)
    return rows[-1]["step"] if rows else 0


def wait_until(pred, timeout: float, what: str, period: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(period)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def run(cmd, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=timeout, **kw)


def release_requeued(cluster, job_id: str, timeout: float = 120) -> None:
    """Wait for the requeue, then lift SLURM's ~2 minute hold on requeued jobs (BeginTime) to save time.
    Not at once: slurmd rejects a relaunch within the second its previous credential was revoked."""
    wait_until(lambda: int(cluster.job_field(job_id, "Restarts") or 0) >= 1, timeout, f"job {job_id} requeued")
    time.sleep(3)

    def started_or_released():
        if cluster.job_field(job_id, "JobState") != "PENDING":
            return True
        if cluster.job_field(job_id, "Reason") == "BeginTime":
            run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=30)
            return False
        return cluster.job_field(job_id, "Reason") not in ("BeginTime",)

    wait_until(started_or_released, timeout, f"job {job_id} eligible again", period=1)


def assert_same_trajectory(rows: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), [r["step"] for r in rows]
    got = [r["loss"] for r in rows]
    want = [r["loss"] for r in reference]
    assert got[-1] == want[-1], f"final loss {got[-1]!r} != uninterrupted run's {want[-1]!r}"
    assert got == want


# -------------------------------------------------------------------------------------- quick, no cluster
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_parse(script):
    r = run(["bash", "-n", str(script)], timeout=30)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", ["tiny", "150m", "350m", "1b", "3b"])
def test_batch_script_header(name):
    text = (ROOT / "slurm" / f"pretrain_{name}.sh").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert sbatch["ntasks-per-node"] == "1"
    assert "requeue" in sbatch
    assert re.fullmatch(r"B:USR1@\d+", sbatch["signal"])
    assert sbatch["output"] == "logs/%x-%j.out" and sbatch["open-mode"] == "append"
    device, config = re.search(r"^cx_run (gpu|cpu) (\S+) \"\$@\"$", text, re.M).groups()
    assert (ROOT / config).exists()
    if name == "tiny":
        assert device == "cpu" and "gpus-per-node" not in sbatch
    else:
        assert device == "gpu" and sbatch["gpus-per-node"] == "8"


def test_nvlink_multicast_forced_off():
    common = (ROOT / "slurm" / "common.sh").read_text()
    assert "export NCCL_NVLS_ENABLE=0" in common
    assert not re.search(r"NCCL_NVLS_ENABLE=[1-9]", common + (ROOT / "launch" / "submit.py").read_text())


def test_sweep_expansion():
    grid = S.sweep_grid(["optim.lr=1e-3,3e-4", "train.seed=1,2,3"])
    assert grid == [{"optim.lr": lr, "train.seed": s} for lr in ("1e-3", "3e-4") for s in ("1", "2", "3")]
    runs = S.expand_runs("runs/tiny", ["train.steps=5"], ["optim.lr=1e-3,3e-4", "train.seed=1,2"])
    assert runs == [
        ["train.steps=5", "optim.lr=1e-3", "train.seed=1", "train.run_dir=runs/tiny-lr1e-3-seed1"],
        ["train.steps=5", "optim.lr=1e-3", "train.seed=2", "train.run_dir=runs/tiny-lr1e-3-seed2"],
        ["train.steps=5", "optim.lr=3e-4", "train.seed=1", "train.run_dir=runs/tiny-lr3e-4-seed1"],
        ["train.steps=5", "optim.lr=3e-4", "train.seed=2", "train.run_dir=runs/tiny-lr3e-4-seed2"],
    ]
    # an explicit run_dir is the base of the suffixes; no sweep leaves the overrides alone
    assert S.expand_runs("runs/tiny", ["train.run_dir=/x/r"], ["train.seed=7"]) == [
        ["train.run_dir=/x/r-seed7", "train.seed=7"]]
    assert S.expand_runs("runs/tiny", ["train.steps=5"], []) == [["train.steps=5"]]
    assert len({r[-1] for r in S.expand_runs("r", [], ["optim.lr=1,2", "model.lr=1,2"])}) == 4
    for bad in (["lr=1,2"], ["optim.lr="], ["optim.lr=1,1"], ["optim.lr=1", "optim.lr=2"]):
        with pytest.raises(ValueError):
            S.sweep_grid(bad)


def test_parse_time():
    assert [S.parse_time(t) for t in ("90", "30:00", "4:00:00", "1-12:00:00", "0:30:30")] == [90, 30, 240, 2160, 31]


def test_submit_dry_run_checks_every_run(capsys):
    assert S.main(["configs/tiny.yaml", "train.steps=5", "--nproc-per-node", "2", "--sweep", "train.seed=1,2",
                   "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "train.run_dir=runs/tiny-seed1" in out and "train.run_dir=runs/tiny-seed2" in out
    # a bad value in one sweep point is refused before anything is submitted
    assert S.main(["configs/tiny.yaml", "--nproc-per-node", "2", "--sweep", "parallel.tp=1,3", "--dry-run"]) == 2
    assert "parallel.tp=3" in capsys.readouterr().err


def test_batch_script_rejects_bad_config_before_starting(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = run(["bash", "slurm/pretrain_tiny.sh", "parallel.tp=3", f"train.run_dir={tmp_path}/r"], env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "parallel.tp=3" in r.stderr and not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_sh_stop_and_resume(tmp_path):
    """launch/torchrun.sh, 2 CPU processes: USR1 -> checkpoint -> exit 99; the same command resumes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(NPROC="2", COMPLEXITY_DEVICE="cpu")
    run_dir = tmp_path / "run"
    cmd = ["launch/torchrun.sh", "configs/tiny.yaml", *TINY[:3], "train.steps=12", "checkpoint.every=100",
           "tracking.enabled=false", f"train.run_dir={run_dir}"]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: last_step(run_dir) >= 3 or proc.poll() is not None, 300, "step 3")
            proc.send_signal(signal.SIGUSR1)
            assert proc.wait(timeout=300) == 99, (tmp_path / "first.log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    stopped = last_step(run_dir)
    assert 3 <= stopped < 12
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    r = run(cmd, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 13))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000012"


# ------------------------------------------------------------------------------------------ on the cluster
@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory):  # noqa: F811
    """The uninterrupted run: `sbatch --wait slurm/pretrain_tiny.sh` (2 gloo processes)."""
    work = tmp_path_factory.mktemp("sbatch")
    run_dir = work / "run"
    env = dict(os.environ, COMPLEXITY_LOG_DIR=str(work / "logs"))
    t0 = time.time()
    r = run(["sbatch", "--wait", "--parsable", f"--output={work}/%x-%j.out", "slurm/pretrain_tiny.sh",
             *TINY, f"train.run_dir={run_dir}"], env=env, timeout=600)
    seconds = time.time() - t0
    job_id = r.stdout.strip().split(";")[0]
    logs = "\n".join(p.read_text() for p in work.glob("*.out"))
    return {"rc": r.returncode, "stderr": r.stderr, "run_dir": run_dir, "job_id": job_id, "log": logs,
            "work": work, "seconds": seconds, "metrics": read_metrics(run_dir)}


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_sbatch_tiny_run(reference):
    assert reference["rc"] == 0, reference["stderr"] + reference["log"][-4000:]
    print(f"sbatch --wait took {reference['seconds']:.0f} s")
    run_dir = reference["run_dir"]
    assert [m["step"] for m in reference["metrics"]] == list(range(1, STEPS + 1))
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_{s:08d}" for s in (10, 20, 30)]
    log = reference["log"]
    assert "attempt 1 on 1 node(s)" in log and "training finished" in log
    # per-rank logs of both processes
    assert len(list((reference["work"] / "logs").glob(f"cx-tiny-{reference['job_id']}/*/attempt_0/[01]/stdout.log"))) == 2


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_sbatch_preempt_requeue_resume(slurm_cluster, reference, tmp_path):  # noqa: F811
    assert reference["rc"] == 0, "the reference run failed"
    run_dir = tmp_path / "run"
    env = dict(os.environ, COMPLEXITY_LOG_DIR=str(tmp_path / "logs"))
    r = run(["sbatch", "--parsable", f"--output={tmp_path}/%x-%j.out", "slurm/pretrain_tiny.sh", *TINY,
             f"train.run_dir={run_dir}"], env=env)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    wait_until(lambda: last_step(run_dir) >= 5, 300, "step 5 of the run")
    # what `#SBATCH --signal=B:USR1@60` does before the time limit, now
    assert run(["scancel", "--signal=USR1", "--batch", job_id]).returncode == 0
    release_requeued(slurm_cluster, job_id)
    slurm_cluster.wait_gone(job_id, 300)
    log = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert slurm_cluster.job_field(job_id, "JobState") == "COMPLETED", log[-4000:]
    stopped = int(re.search(r"preempted by signal \d+: saved step (\d+)", log).group(1))
    assert 5 <= stopped < STEPS and stopped % 10 != 0  # saved on the signal, not on the schedule
    assert f"checkpoints/step_{stopped:08d}" in log
    assert "requeueing job" in log and "attempt 2 on 1 node(s)" in log and "training finished" in log
    assert_same_trajectory(read_metrics(run_dir), reference["metrics"])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_submitit_two_process_run(slurm_cluster, reference, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    r = run([sys.executable, "-m", "launch.submit", "configs/tiny.yaml", *TINY, f"train.run_dir={run_dir}",
             "--nproc-per-node", "2", "--time", "20", "--wait", "--folder", str(tmp_path / "submitit")],
            timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    result = json.loads(re.search(r"^run 0 \(job \d+\): (\{.*\})$", r.stdout, re.M).group(1))
    assert result["exit_code"] == 0 and result["attempt"] == 0 and result["step"] == STEPS
    assert result["run_dir"] == str(run_dir)
    assert result["loss"] == reference["metrics"][-1]["loss"]  # same 2-process layout as the sbatch run
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_submitit_preempt_checkpoint_requeue(slurm_cluster, reference, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    args = S.build_parser().parse_args(["configs/tiny.yaml", *TINY, f"train.run_dir={run_dir}",
                                        "--nproc-per-node", "2", "--time", "20",
                                        "--folder", str(tmp_path / "submitit")])
    jobs, params = S.plan(args)
    [job] = S.submit(jobs, S.make_executor(args, params))
    wait_until(lambda: last_step(run_dir) >= 5, 300, "step 5 of the run")
    # what SLURM sends before the time limit (--signal=USR2@180) or on preemption, now
    assert run(["scancel", "--signal=USR2", job.job_id]).returncode == 0
    release_requeued(slurm_cluster, job.job_id)
    results = S.wait_for(job)
    assert [r["rank"] for r in results] == [0, 1]
    result = results[0]
    assert result["attempt"] == 1, result  # the pickle TrainJob.checkpoint() returned ran the second time
    assert result["step"] == STEPS and result["exit_code"] == 0
    assert_same_trajectory(read_metrics(run_dir), reference["metrics"])
    err = Path(job.paths.stderr).read_text() + Path(job.paths.stdout).read_text()
    assert "asking the trainer to checkpoint" in err
    stopped = int(re.search(r"preempted by signal \d+: saved step (\d+)", err).group(1))
    assert 5 <= stopped < STEPS


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_sbatch_two_nodes(slurm_multinode_cluster, reference, tmp_path):  # noqa: F811
    """One srun task per node, torchrun's c10d rendezvous on the first node, one process per node."""
    cluster = slurm_multinode_cluster
    run_dir = tmp_path / "run"
    env = {**os.environ, **cluster.env, "MASTER_ADDR": "127.0.0.1",  # n1/n2 do not resolve here
           "NPROC_PER_NODE": "1", "COMPLEXITY_LOG_DIR": str(tmp_path / "logs")}
    r = run(["sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", f"--output={tmp_path}/%x-%j.out",
             "slurm/pretrain_tiny.sh", *TINY, f"train.run_dir={run_dir}"], env=env)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    cluster.wait_gone(job_id, 400)
    log = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert cluster.job_field(job_id, "JobState") == "COMPLETED", log[-4000:]
    assert "attempt 1 on 2 node(s) [n[1-2]]: 1 cpu process(es)/node" in log
    assert_same_trajectory(read_metrics(run_dir), reference["metrics"])
    # one torchrun agent per node, each with its own per-rank log folder
    assert len(list((tmp_path / "logs").glob(f"cx-tiny-{job_id}/*/attempt_0/0/stdout.log"))) == 2


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_submitit_two_nodes(slurm_multinode_cluster, reference, tmp_path, monkeypatch):  # noqa: F811
    """One submitit task per node (--nodes 2 --nproc-per-node 1): RANK/MASTER_* from JobEnvironment."""
    monkeypatch.setenv("SLURM_CONF", slurm_multinode_cluster.env["SLURM_CONF"])
    monkeypatch.setenv("COMPLEXITY_MASTER_ADDR", "127.0.0.1")  # n1 does not resolve here
    run_dir = tmp_path / "run"
    args = S.build_parser().parse_args(["configs/tiny.yaml", *TINY, f"train.run_dir={run_dir}", "--nodes", "2",
                                        "--nproc-per-node", "1", "--cpus-per-task", "1", "--time", "20",
                                        "--folder", str(tmp_path / "submitit")])
    jobs, params = S.plan(args)
    [job] = S.submit(jobs, S.make_executor(args, params))
    results = S.wait_for(job)
    assert [r["rank"] for r in results] == [0, 1]
    assert results[0]["step"] == STEPS and results[0]["loss"] == reference["metrics"][-1]["loss"]
    assert_same_trajectory(read_metrics(run_dir), reference["metrics"])
    assert "nodes=2" in (Path(job.paths.submission_file).read_text().replace("--nodes=", "nodes="))
