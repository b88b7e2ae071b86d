"""Filesystem helpers: a dataset folder appears whole or not at all, and one process prepares at a time."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO, Iterator

from complexity_dist.data.errors import DataError


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside `out_dir`, renamed to `out_dir` when the block ends without error.

    Readers look for `out_dir/index.json`, so a crash leaves only a `.partial` folder nobody takes
    for a dataset. The rename is atomic because both names are in the same parent folder.

    The staging folder `.<name>.partial-<pid>` is flock-ed for as long as its run lives (the kernel drops
    the lock when the process dies, however it dies). Before making its own, a run deletes the partial
    folders of the same output that nobody holds: those of interrupted runs. It does so, and makes and
    locks its own, under a short lock on the parent folder, so a new folder is never seen unlocked.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"output folder {out_dir} already exists and is not empty; "
                        f"choose a new --out folder or delete this one")
    _make_parent(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    with _locked_dir(out_dir.parent, blocking=True) as parent_locked:
        if parent_locked:
            remove_stale_partials(out_dir)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed run with our pid
        tmp.mkdir()
        held = _lock_fd(tmp, blocking=True)
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename() cannot replace it on every platform
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if held is not None:
            os.close(held)


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Delete the `.<name>.partial-<pid>` folders of `out_dir` that no live run holds; returns them."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.partial-\d+")
    removed = []
    for candidate in sorted(out_dir.parent.iterdir()):
        if not pattern.fullmatch(candidate.name) or candidate.is_symlink() or not candidate.is_dir():
            continue
        with _locked_dir(candidate, blocking=False) as free:
            if free:  # nobody holds it: its run has ended without renaming it
                shutil.rmtree(candidate, ignore_errors=True)
                removed.append(candidate)
    return removed


def _make_parent(out_dir: Path) -> None:
    """Create the parent folders of `out_dir`, or say in one line why they cannot be."""
    for ancestor in out_dir.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise DataError(f"output folder {out_dir} cannot be created: {ancestor} is a file, not a "
                                f"folder; choose another --out")
            break
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"output folder {out_dir} cannot be created ({e.strerror or e}); "
                        f"choose another --out") from None


def _lock_fd(folder: Path, blocking: bool) -> int | None:
    """An open descriptor of `folder` holding an exclusive flock; None when another process holds it
    (only when not `blocking`) or the folder cannot be opened (e.g. no read permission)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def _locked_dir(folder: Path, blocking: bool) -> Iterator[bool]:
    """Hold an exclusive flock on `folder` for the block; yields whether it was taken."""
    fd = _lock_fd(folder, blocking)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock held by this process for the block; other processes wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class HashingFile:
    """Wraps a binary file: counts and sha256-hashes every byte read from or written to it."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self._account(data)
        return data

    def write(self, data) -> int:
        self._account(data)
        return self.raw.write(data)

    def drain(self) -> None:
        """Read (and hash) what is left, e.g. the tar end padding a tar reader never asks for."""
        while self.read(1 << 20):
            pass

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()

    def _account(self, data) -> None:
        self.sha256.update(data)
        self.size += len(data)


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        reader = HashingFile(f)
        reader.drain()
    return reader.hexdigest()
