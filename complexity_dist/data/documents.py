"""Input documents for prepare-data.

Accepted inputs (folders are searched recursively for these, in sorted path order):
- `.txt`: the whole file is ONE document, read in pieces of about PIECE_BYTES. A piece ends after the
  line end that takes it past PIECE_BYTES; a line longer than that (e.g. a file with no newlines) is cut
  before its last space, tab or line break in the second half of the piece, or, when there is none, at
  the piece size (never inside a UTF-8 character). So memory stays flat in the file size and no worker
  holds up the others; the decoded text is unchanged.
- `.jsonl`: one JSON object per line with a string field `text`; blank lines are skipped. A line is one
  JSON document, so it is held in memory while it is parsed (about 3 times its size); its text goes to
  the tokenizer in pieces cut like a long .txt line.
Empty documents are skipped. Every document is followed by the end-of-document token.

Cuts are deterministic (they depend on the bytes only). A cut before whitespace gives the same tokens
as encoding the whole document with a GPT-2-style byte-level BPE (the pre-tokenizer never joins text
across such a point); a cut at the piece size (no whitespace nearby) or after a line end may change the
tokens at that point.

A document reaches the tokenizer as pieces `(text, ends_document)`.
"""
from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from complexity_dist.data.errors import DataError

SUFFIXES = (".txt", ".jsonl")
PIECE_BYTES = 1 << 20  # text per piece of a large document
TRAIN_PIECE_CHARS = 1 << 16  # text per item given to tokenizer training (it buffers a few hundred items)
# the last of a run of whitespace (chars both Python and the tokenizers' regex engine call whitespace)
# that the text goes on after: pieces are cut before it
_CUT_BEFORE = re.compile(r"[ \t\n\r]\S+\Z")
_CUT_AFTER = re.compile(r"[ \t\n\r](?=\S)")  # the first such point from a position on
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
    decoder = codecs.getincrementaldecoder("utf-8")()  # keeps a character split between reads for the next
    pending: list[str] = []
    size, cut = 0, False  # size: bytes read into `pending`
    with open(path, "rb") as f:
        while True:
            # bounded reads: a line longer than PIECE_BYTES arrives in parts, never whole
            line = f.readline(PIECE_BYTES)
            if not line:
                break
            pending.append(_decode(decoder, line, path))
            size += len(line)
            if size < PIECE_BYTES:
                continue
            text = "".join(pending)
            if line.endswith(b"\n") or not f.peek(1):  # at a line end (or the file's end): cut here
                head, tail = text, ""
            else:  # inside an over-long line
                head, tail = split_piece(text)
            yield head, False
            pending, size, cut = [tail], len(tail.encode("utf-8")), True
    text = "".join(pending) + _decode(decoder, b"", path, final=True)
    if text or cut:  # an empty last piece still closes a document that was cut
        yield text, True


def split_piece(text: str) -> tuple[str, str]:
    """(head, tail) of an over-long piece: cut before its last whitespace when that is in the second
    half (tokenization is unchanged there, see the module docstring), else after the whole text."""
    at = _last_cut(text, max(1, len(text) // 2), len(text)) or len(text)
    return text[:at], text[at:]


def _last_cut(text: str, lo: int, hi: int) -> int | None:
    """The last i in [lo, hi) where text[i] is a space, tab or line break and text[i + 1] is no whitespace."""
    hi = lo + len(text[lo:hi].rstrip())  # a cut point is followed by text: not in trailing whitespace
    found = _CUT_BEFORE.search(text, lo, hi)
    return found.start() if found else None


def bounded_pieces(text: str, limit: int) -> Iterator[str]:
    """`text` in consecutive parts of at most about `limit` characters, cut as `split_piece` does."""
    start = 0  # offsets, not slices of the rest: a long text is not copied again for every part
    while len(text) - start > limit:
        head, _ = split_piece(text[start:start + limit])
        yield head
        start += len(head)
    if start < len(text):
        yield text[start:]


def training_texts(pieces: Iterable[Piece], limit: int | None = None) -> Iterator[str]:
    """Texts for tokenizer training, in parts of about `limit` characters (the trainer holds a few hundred
    items at once). See `whitespace_parts`: the trained tokenizer is that of the uncut text."""
    for text, _ in pieces:
        yield from whitespace_parts(text, limit)


def whitespace_parts(text: str, limit: int | None = None) -> Iterator[str]:
    """`text` in consecutive parts of about `limit` characters, cut only before the last of a run of
    whitespace that the text goes on after. A GPT-2-style byte-level pre-tokenizer splits there anyway,
    so the parts give the same pre-tokens (hence the same BPE counts and ids) as the whole text. A
    stretch without such a point is not cut (pieces are bounded by PIECE_BYTES already)."""
    limit = limit or TRAIN_PIECE_CHARS
    start = 0
    while len(text) - start > limit:
        at = _last_cut(text, start + limit // 2, start + limit)
        if at is None:
            found = _CUT_AFTER.search(text, start + limit)
            if not found:
                break
            at = found.start()
        yield text[start:at]
        start = at
    yield text[start:]


def _decode(decoder, data: bytes, path: Path, final: bool = False) -> str:
    try:
        return decoder.decode(data, final)
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
            del record, line  # only the text is needed from here on
            parts = bounded_pieces(text, PIECE_BYTES)
            part = next(parts, None)
            for following in parts:  # one part of look-ahead: the last part ends the document
                yield part, False
                part = following
            if part is not None:
                yield part, True
