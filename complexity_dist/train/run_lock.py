"""One training run per run directory: `<run_dir>/.lock`, held with `flock` by global rank 0 for the whole run.

Two trainers on one `train.run_dir` would interleave checkpoints and metrics rows, so the second one refuses
(exit 2) and names the holder (pid, host, SLURM job, since when), which rank 0 writes into the lock file.
There is no stale lock to clean up: the kernel (or, on a cluster file system, the lock server) drops a
`flock` when the last file descriptor of its holder closes, which includes the process dying by SIGKILL.
What that relies on per file system is in docs/cluster.md ("One run per run directory").

A file system without `flock` support fails loudly (exit 2, naming the mount and the fix) instead of
running unlocked; `train.run_lock=false` turns the lock off for such a file system.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

from complexity_dist.config import ConfigError

LOCK_NAME = ".lock"

# errnos of "this file system (or its mount options) cannot do flock": NFS without a lock manager (ENOLCK),
# FUSE and others (EOPNOTSUPP/ENOTSUP), Lustre mounted with neither -o flock nor -o localflock (ENOSYS)
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_HELD = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}

# Descriptors of locks held by this process. A forked child (DataLoader workers) would share the locked
# file description and keep the lock alive after the trainer dies, so children close their copies.
_held_fds: set[int] = set()


def _close_in_child() -> None:
    for fd in _held_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunDirError(ConfigError):
    """`train.run_dir` cannot be used: not a directory, not writable, in use by another run, or unlockable."""


def check_run_dir(run_dir: str | Path) -> None:
    """The run directory is (or can be created as) a directory this process can write, before anything runs."""
    path = Path(run_dir)
    if os.path.lexists(path) and not path.is_dir():
        raise RunDirError(f"train.run_dir={run_dir} exists and is not a directory; "
                          f"remove it or choose another train.run_dir")
    existing = path
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"train.run_dir={run_dir} cannot be created: {existing} is a file, not a directory")
    # a real write, not os.access: root, ACLs, read-only mounts and NFS root squash all answer honestly here
    try:
        fd, probe = tempfile.mkstemp(prefix=".complexity-dist-write-test-", dir=existing)
    except OSError as e:
        what = "" if existing == path else f" (its nearest existing folder {existing} is not writable)"
        raise RunDirError(f"train.run_dir={run_dir} is not writable{what}: {e.strerror}; "
                          f"fix its permissions or choose another train.run_dir") from None
    os.close(fd)
    os.unlink(probe)


def _open(path: Path, flags: int, run_dir: str | Path) -> int:
    try:
        return os.open(path, flags, 0o644)
    except PermissionError as e:
        raise RunDirError(f"cannot open the lock file {path} of train.run_dir={run_dir} for writing: "
                          f"{e.strerror}; fix its permissions") from None


def _unsupported(run_dir: str | Path, path: Path, err: OSError) -> RunDirError:
    return RunDirError(
        f"cannot lock {path}: the file system of train.run_dir={run_dir} does not support flock "
        f"({errno.errorcode.get(err.errno, err.errno)}: {err.strerror}). The lock keeps two runs from writing "
        f"one run directory; mount it with flock support (Lustre: -o flock; NFS: a lock manager, not "
        f"local_lock=flock; see docs/cluster.md) or, if you make sure yourself that one run uses it at a "
        f"time, set train.run_lock=false")


def _holder_text(path: Path) -> str:
    """What the holder wrote into the lock file, as words for the refusal message."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process (it has not written its pid yet)"
    text = f"pid {info['pid']} on host {info.get('host', '?')}"
    if info.get("slurm_job"):
        text += f", SLURM job {info['slurm_job']}"
    text += f", since {info.get('since', '?')}"
    if info.get("host") == socket.gethostname() and not _alive(int(info["pid"])):
        text += ("; that process has exited, but a child it forked may hold the lock for a moment more: "
                 "retry in a few seconds")
    return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refused(run_dir: str | Path, path: Path) -> RunDirError:
    return RunDirError(f"train.run_dir={run_dir} is in use by another training run ({_holder_text(path)}; "
                       f"lock {path}). Wait for it to finish or stop it, or choose another train.run_dir")


class RunLock:
    """An exclusive, non-blocking flock on `<run_dir>/.lock`. acquire() raises RunDirError when refused."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = run_dir
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        check_run_dir(self.run_dir)
        Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        # never unlinked: removing a lock file lets two processes lock two different inodes of one name
        fd = _open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self.run_dir)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in _HELD:
                raise _refused(self.run_dir, self.path) from None
            if e.errno in _UNSUPPORTED:
                raise _unsupported(self.run_dir, self.path, e) from None
            raise
        self._fd = fd
        _held_fds.add(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "slurm_job": os.environ.get("SLURM_JOB_ID", "")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _held_fds.discard(fd)
        try:
            os.ftruncate(fd, 0)  # no holder left to name
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def probe_run_lock(run_dir: str | Path) -> None:
    """Raise RunDirError if a run holds `run_dir` (or its file system cannot lock); takes nothing.
    For launchers (`complexity-dist info --preflight`), so a queued job on a busy run_dir fails early."""
    path = Path(run_dir) / LOCK_NAME
    try:
        # read-write: NFS emulates flock with byte-range locks, and an exclusive one needs a writable fd
        fd = _open(path, os.O_RDWR | os.O_CLOEXEC, run_dir)
    except (FileNotFoundError, NotADirectoryError):
        return  # no run ever locked it (check_run_dir reports a run_dir that is a file)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as e:
        if e.errno in _HELD:
            raise _refused(run_dir, path) from None
        if e.errno in _UNSUPPORTED:
            raise _unsupported(run_dir, path, e) from None
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path, enabled: bool) -> Iterator[RunLock | None]:
    """Hold the run directory's lock for the block when `enabled` (global rank 0 with train.run_lock)."""
    if not enabled:
        yield None
        return
    with RunLock(run_dir) as lock:
        yield lock
