"""The default dataset: Python's own documentation (stdlib_corpus.py), prepared once per cache folder.

No download: the text ships with the interpreter. The prepared folder is keyed by (Python version,
seq_len, vocab_size), because the text differs between Python versions. Concurrent callers (e.g. every
rank of a job) are serialised by a lock file: the first prepares, the others wait and reuse its result.
"""
from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

from complexity_dist.data.errors import DataError
from complexity_dist.data.files import file_lock
from complexity_dist.data.prepare import prepare_data
from complexity_dist.data.shards import INDEX_NAME
from complexity_dist.data.stdlib_corpus import stdlib_documents, stdlib_root

MIN_TEXT = 500_000  # characters; less means the stdlib sources are missing (stripped installs)
TOKENS_PER_SHARD = 1 << 16  # small shards: ~8 of them, so shard shuffling has something to shuffle


def embedded_corpus_dir(cache_root: Path, seq_len: int, vocab_size: int, progress: bool = False,
                        num_proc: int | None = None) -> Path:
    """A prepared dataset folder of Python's documentation under `cache_root`, made on first use."""
    python = f"{platform.python_implementation().lower()}{'.'.join(map(str, sys.version_info[:3]))}"
    name = f"stdlib-docs-{python}-seq{seq_len}-vocab{vocab_size}"
    out = Path(cache_root) / name
    if (out / INDEX_NAME).is_file():  # the index appears last, with the atomic rename of the folder
        return out
    with file_lock(Path(cache_root) / f".{name}.lock"):
        if (out / INDEX_NAME).is_file():  # another process made it while we waited
            return out
        with tempfile.TemporaryDirectory(dir=cache_root, prefix=f".{name}.text-") as tmp:
            corpus = Path(tmp) / "stdlib-docs.jsonl"
            chars = _write_corpus(corpus)
            if chars < MIN_TEXT:
                raise DataError(f"found only {chars} characters of documentation in the Python standard "
                                f"library at {stdlib_root()} (is it installed without sources?); set data.path "
                                f"to a dataset made with `complexity-dist prepare-data`")
            prepare_data([corpus], out, seq_len, vocab_size=vocab_size,
                         samples_per_shard=max(1, TOKENS_PER_SHARD // (seq_len + 1)),
                         num_proc=num_proc, progress=progress)
    return out


def _write_corpus(path: Path) -> int:
    chars = 0
    with open(path, "w", encoding="utf-8") as f:
        for text in stdlib_documents():
            f.write(json.dumps({"text": text}) + "\n")
            chars += len(text)
    return chars
