"""Tokenizing document pieces on all cores, in input order.

Kept free of torch imports: tokenizer processes are spawned and import only this module's dependencies.
"""
from __future__ import annotations

import collections
import json
import multiprocessing
import os
import re
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer

from complexity_dist.data.documents import Piece, whitespace_parts

_worker: "ChunkEncoder | None" = None  # the encoder of a tokenizer process


class ChunkEncoder:
    """Turns a chunk of pieces into (one token array, number of documents it ends); a document's last
    piece is followed by EOS."""

    def __init__(self, tokenizer_json: str, eos_id: int, dtype: str):
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        # text that spells a special token ("</s>" in a document) is text, not an end of document
        self.tokenizer.encode_special_tokens = True
        self.eos = np.array([eos_id], dtype=dtype)
        self.dtype = dtype
        self.split = splits_at_whitespace(tokenizer_json)

    def __call__(self, chunk: list[Piece]) -> tuple[np.ndarray, int]:
        # Encoding a text costs ~100+ bytes of memory per character while it runs; with a tokenizer whose
        # tokens never span the cut points, pieces go in small parts (same ids, bounded memory, and the
        # parts of one piece are encoded on several threads).
        texts, owner = [], []
        for number, (text, _) in enumerate(chunk):
            for part in (whitespace_parts(text) if self.split else (text,)):
                texts.append(part)
                owner.append(number)
        # no special tokens from the tokenizer's post-processor: the only one we add is EOS, ourselves
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        parts, documents = [], 0
        for i, encoding in enumerate(encodings):
            parts.append(np.asarray(encoding.ids, dtype=self.dtype))
            last_of_piece = i + 1 == len(encodings) or owner[i + 1] != owner[i]
            if last_of_piece and chunk[owner[i]][1]:
                parts.append(self.eos)
                documents += 1
        return (np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)), documents


def splits_at_whitespace(tokenizer_json: str) -> bool:
    """Whether the tokenizer is GPT-2-style byte-level (no normalizer, ByteLevel pre-tokenizer with its
    regex, no added token holding whitespace), i.e. cutting text as `whitespace_parts` does keeps its ids."""
    spec = json.loads(tokenizer_json)
    pre = spec.get("pre_tokenizer") or {}
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not any(re.search(r"\s", t.get("content", "")) for t in spec.get("added_tokens") or []))


def _start_worker(tokenizer_json: str, eos_id: int, dtype: str) -> None:
    global _worker
    # one process per core already: the tokenizer's own thread pool would only oversubscribe
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = ChunkEncoder(tokenizer_json, eos_id, dtype)


def _encode_in_worker(chunk: list[Piece]) -> tuple[np.ndarray, int]:
    return _worker(chunk)


def encode_chunks(chunks: Iterable[list[Piece]], tokenizer_json: str, eos_id: int, dtype: str,
                  num_proc: int) -> Iterator[tuple[np.ndarray, int]]:
    """(tokens, documents) of each of `chunks`, in order. `num_proc` > 1 uses that many spawned processes
    and keeps at most 2 * num_proc chunks in flight, so memory stays bounded however large the input is."""
    if num_proc <= 1:
        encoder = ChunkEncoder(tokenizer_json, eos_id, dtype)
        yield from map(encoder, chunks)
        return
    # spawn, not fork: the caller may hold threads (torch, the tokenizer's pool) that fork would copy
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_proc, initializer=_start_worker, initargs=(tokenizer_json, eos_id, dtype)) as pool:
        in_flight: collections.deque = collections.deque()
        for chunk in chunks:
            in_flight.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(in_flight) >= 2 * num_proc:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()
