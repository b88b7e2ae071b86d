"""Input documents for prepare-data.

Accepted inputs (folders are searched recursively for these, in sorted path order):
- `.txt`: the whole file is ONE document. Files larger than PIECE_BYTES are handed to the tokenizer in
  pieces cut after a line end, so a multi-GB file neither sits in memory whole nor holds up one worker;
  the decoded text is unchanged (token boundaries at a cut may differ from a whole-file encoding).
- `.jsonl`: one JSON object per line with a string field `text`; blank lines are skipped.
Empty documents are skipped. Every document is followed by the end-of-document token.

A document reaches the tokenizer as pieces `(text, ends_document)`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from complexity_dist.data.errors import DataError

SUFFIXES = (".txt", ".jsonl")
PIECE_BYTES = 1 << 20  # text per piece of a large .txt file
CHUNK_BYTES = 1 << 20  # text per task sent to a tokenizer process

Piece = tuple[str, bool]  # (text, ends_document)


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files named directly plus the .txt/.jsonl files under named folders; order as given, folders sorted."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix in SUFFIXES and p.is_file())
            if not found:
                raise DataError(f"input folder {item} has no .txt or .jsonl files")
            files.extend(found)
        elif item.is_file():
            if item.suffix not in SUFFIXES:
                raise DataError(f"input {item} is neither .txt (one document per file) nor .jsonl "
                                f"(one {{\"text\": ...}} object per line); rename or convert it")
            files.append(item)
        else:
            raise DataError(f"input {item} does not exist")
    if not files:
        raise DataError("no input files given; pass .txt or .jsonl files or folders holding them")
    return files


def read_pieces(path: Path) -> Iterator[Piece]:
    if path.suffix == ".jsonl":
        yield from _jsonl_pieces(path)
    else:
        yield from _txt_pieces(path)


def read_all_pieces(files: Iterable[Path]) -> Iterator[Piece]:
    for path in files:
        yield from read_pieces(path)


def chunked(pieces: Iterable[Piece], chunk_bytes: int = CHUNK_BYTES) -> Iterator[list[Piece]]:
    """Group pieces into tokenizer tasks of about `chunk_bytes` characters, order kept."""
    chunk: list[Piece] = []
    size = 0
    for piece in pieces:
        chunk.append(piece)
        size += len(piece[0])
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _txt_pieces(path: Path) -> Iterator[Piece]:
    pending: list[bytes] = []
    size, cut = 0, False
    with open(path, "rb") as f:
        for line in f:  # cut only after b"\n", which is never inside a multi-byte UTF-8 character
            pending.append(line)
            size += len(line)
            if size >= PIECE_BYTES:
                yield _decode(b"".join(pending), path), False
                pending, size, cut = [], 0, True
    text = _decode(b"".join(pending), path)
    if text or cut:  # an empty last piece still closes a document that was cut
        yield text, True


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"input {path} is not UTF-8 ({e.reason} in a piece of the file); "
                        f"convert it, e.g. `iconv -f latin1 -t utf-8`") from None


def _jsonl_pieces(path: Path) -> Iterator[Piece]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{number} is not valid JSON ({e}); each line must be one "
                                f"object like {{\"text\": \"...\"}}") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{number} has no string field \"text\"; each line must be one "
                                f"object like {{\"text\": \"...\"}}")
            if text:
                yield text, True
