"""Filesystem helpers: a dataset folder appears whole or not at all, and one process prepares at a time."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Iterator

from complexity_dist.data.errors import DataError


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside `out_dir`, renamed to `out_dir` when the block ends without error.

    Readers look for `out_dir/index.json`, so a crash leaves only a `.partial` folder nobody takes
    for a dataset. The rename is atomic because both names are in the same parent folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"output folder {out_dir} already exists and is not empty; "
                        f"choose a new --out folder or delete this one")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed run with our pid
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename() cannot replace it on every platform
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
