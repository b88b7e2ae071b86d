"""Data: tokenizer, shard writer (`prepare_data`), resumable shard reader (`TokenLoader`), embedded corpus.

Names are imported on first use, so that tokenizer processes (spawned by prepare_data) and the command
line do not pay for torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DataError": "complexity_dist.data.errors",
    "prepare_data": "complexity_dist.data.prepare",
    "add_prepare_data_parser": "complexity_dist.data.prepare",
    "ShardIndex": "complexity_dist.data.shards",
    "TokenLoader": "complexity_dist.data.loader",
    "embedded_corpus_dir": "complexity_dist.data.embedded",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
