"""Tokenizing document pieces on all cores, in input order.

Kept free of torch imports: tokenizer processes are spawned and import only this module's dependencies.
"""
from __future__ import annotations

import collections
import multiprocessing
import os
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer

from complexity_dist.data.documents import Piece

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

    def __call__(self, chunk: list[Piece]) -> tuple[np.ndarray, int]:
        # no special tokens from the tokenizer's post-processor: the only one we add is EOS, ourselves
        encodings = self.tokenizer.encode_batch([text for text, _ in chunk], add_special_tokens=False)
        parts, documents = [], 0
        for encoding, (_, ends_document) in zip(encodings, chunk):
            parts.append(np.asarray(encoding.ids, dtype=self.dtype))
            if ends_document:
                parts.append(self.eos)
                documents += 1
        return (np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)), documents


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
