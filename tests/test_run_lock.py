"""One run per run directory: `<run_dir>/.lock` (complexity_dist/train/run_lock.py)."""
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_train import ROOT, SMALL, dataset, metrics, run, train_cmd  # noqa: F401 (dataset is a fixture)

from complexity_dist.cli import main
from complexity_dist.train.run_lock import LOCK_NAME, RunDirError, RunLock, probe_run_lock


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_a_second_run_is_refused_and_a_killed_run_leaves_no_stale_lock(tmp_path, dataset, capsys):
    run_dir = tmp_path / "run"
    # DataLoader workers (forked while the lock is held) must not keep the lock after the trainer dies
    common = ["checkpoint.every=2", "data.num_workers=1"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(train_cmd(run_dir, dataset, "train.steps=100000", *common), stdout=log,
                             stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300
        while not ((run_dir / "checkpoints/latest").exists() and len(metrics(run_dir)) >= 3):
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)

        second = run(train_cmd(run_dir, dataset, "train.steps=100000", *common), check=False, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        line = _one_line(second.stderr)
        for needle in ("run directory error", f"train.run_dir={run_dir} is in use", f"pid {first.pid}",
                       f"host {socket.gethostname()}", "since "):
            assert needle in line, line

        # what the SLURM launchers run before torchrun: a queued job on a busy run_dir fails there
        assert main(["info", str(ROOT / "configs/tiny.yaml"), "--preflight", *SMALL, f"train.run_dir={run_dir}",
                     f"data.path={dataset}"]) == 2
        assert f"pid {first.pid}" in _one_line(capsys.readouterr().err)

        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        log.close()
    probe_run_lock(run_dir)  # free at once, though the killed trainer's loader worker may still be exiting
    saved = int((run_dir / "checkpoints/latest").read_text().strip().split("_")[1])
    run(train_cmd(run_dir, dataset, f"train.steps={saved + 2}", *common))
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, saved + 3))
    assert (run_dir / LOCK_NAME).read_text() == ""  # released at the end: no holder left to name


def test_lock_is_exclusive_and_names_its_holder(tmp_path):
    lock = RunLock(tmp_path / "run").acquire()  # creates the run directory
    try:
        for attempt in (lambda: RunLock(tmp_path / "run").acquire(), lambda: probe_run_lock(tmp_path / "run")):
            with pytest.raises(RunDirError, match=rf"in use by another training run \(pid {os.getpid()} on host "
                                                  rf"{socket.gethostname()}.*since "):
                attempt()
    finally:
        lock.release()
    probe_run_lock(tmp_path / "run")
    RunLock(tmp_path / "run").acquire().release()


def test_a_forked_child_does_not_keep_the_lock_alive(tmp_path):
    """The holder forks a child (as DataLoader workers are forked) and dies by SIGKILL: the lock is free
    while the child still lives."""
    script = (
        "import os, signal, sys, time\n"
        "from complexity_dist.train.run_lock import RunLock\n"
        f"RunLock({str(tmp_path)!r}).acquire()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    null = os.open(os.devnull, os.O_RDWR); os.dup2(null, 1); os.dup2(null, 2)  # let the pipes end\n"
        "    time.sleep(60); os._exit(0)\n"
        "print(pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child = int(proc.stdout.strip())
    try:
        os.kill(child, 0)  # still alive
        probe_run_lock(tmp_path)
        RunLock(tmp_path).acquire().release()
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_file_system_without_flock_is_refused_clearly(tmp_path, monkeypatch, capsys, code):
    def no_flock(fd, op):
        raise OSError(code, os.strerror(code))

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_NAME).write_text("")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(RunDirError, match=rf"does not support flock \({errno.errorcode[code]}.*"
                                          r"train.run_lock=false"):
        RunLock(tmp_path / "run").acquire()
    args = ["info", str(ROOT / "configs/tiny.yaml"), "--preflight", f"train.run_dir={tmp_path / 'run'}",
            "tracking.enabled=false"]
    assert main(args) == 2
    assert "does not support flock" in _one_line(capsys.readouterr().err)
    assert main([*args, "train.run_lock=false"]) == 0  # the documented way out
