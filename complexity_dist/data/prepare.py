"""`prepare-data`: text files -> tokenizer + WebDataset token shards + index.json.

Steps: (1) take the user's tokenizer.json, or train a byte-level BPE on the inputs; (2) tokenize every
document on `num_proc` processes, in input order, each document followed by EOS; (3) cut the joined
stream into samples of seq_len + 1 tokens (the last partial sample is dropped) and write them as
shards; (4) write index.json. Everything goes to a temporary folder renamed to `out_dir` at the end.
The same inputs and arguments give byte-identical output, whatever `num_proc` is.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from complexity_dist.data.documents import chunked, expand_inputs, read_all_pieces, training_texts
from complexity_dist.data.encode import encode_chunks
from complexity_dist.data.errors import DataError
from complexity_dist.data.files import staging_dir
from complexity_dist.data.shards import FORMAT, INDEX_NAME, ShardIndex, ShardWriter, token_dtype
from complexity_dist.data.tokenizer import eos_id_of, load_tokenizer, special_ids_of, train_bpe, vocab_size_of

TOKENIZER_NAME = "tokenizer.json"
DEFAULT_VOCAB_SIZE = 32000  # ModelConfig.vocab_size
DEFAULT_SAMPLES_PER_SHARD = 4096  # 16 MiB a shard at seq_len 2048 and uint16


def prepare_data(inputs: list[Path], out_dir: Path, seq_len: int, tokenizer: Path | None = None,
                 vocab_size: int = DEFAULT_VOCAB_SIZE, samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
                 num_proc: int | None = None, progress: bool = False) -> ShardIndex:
    """Prepare a dataset folder from .txt/.jsonl `inputs` (see documents.py); returns its loaded index.

    `tokenizer`: a Hugging Face tokenizer.json to use as is; None trains a byte-level BPE of `vocab_size`
    entries on the inputs (</s>=0, <pad>=1, <s>=2). `num_proc`: tokenizer processes (default: all cores).
    """
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len} must be >= 1")
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard={samples_per_shard} must be >= 1")
    num_proc = max(1, num_proc or os.cpu_count() or 1)
    files = expand_inputs(inputs)
    input_bytes = sum(f.stat().st_size for f in files)
    out_dir = Path(out_dir)

    with staging_dir(out_dir) as tmp:
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
            tokenizer_bytes = Path(tokenizer).read_bytes()  # copied verbatim: its sha256 names it
        else:
            with _bar(progress, input_bytes, "training tokenizer") as bar:
                tok = train_bpe(training_texts(_counted(read_all_pieces(files), bar)), vocab_size)
            tokenizer_bytes = tok.to_str(pretty=True).encode()
        (tmp / TOKENIZER_NAME).write_bytes(tokenizer_bytes)
        eos_id = eos_id_of(tok, tokenizer or "trained on the inputs")
        vocab = vocab_size_of(tok)
        dtype = token_dtype(vocab)

        writer = ShardWriter(tmp, seq_len + 1, dtype, samples_per_shard)
        documents = 0
        with _bar(progress, input_bytes, "tokenizing") as bar:
            chunks = chunked(_counted(read_all_pieces(files), bar))
            for tokens, chunk_documents in encode_chunks(chunks, tok.to_str(), eos_id, dtype.str, num_proc):
                documents += chunk_documents
                writer.add(tokens)
        shards = writer.finish()
        if not shards:
            raise DataError(f"the inputs ({', '.join(map(str, files[:3]))}{', ...' if len(files) > 3 else ''}) "
                            f"give fewer than seq_len + 1 = {seq_len + 1} tokens; add text or lower --seq-len")
        samples = sum(s["samples"] for s in shards)
        index = {
            "format": FORMAT,
            "seq_len": seq_len,
            "sample_len": seq_len + 1,
            "dtype": dtype.name,
            "byte_order": "little",
            "vocab_size": vocab,
            "tokenizer": TOKENIZER_NAME,
            "tokenizer_sha256": hashlib.sha256(tokenizer_bytes).hexdigest(),
            "eos_token_id": eos_id,
            "special_token_ids": special_ids_of(tok),
            "num_samples": samples,
            "total_tokens": samples * (seq_len + 1),
            "dropped_tokens": writer.dropped_tokens,
            "documents": documents,
            "inputs": [f.name for f in files],
            "shards": shards,
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return ShardIndex.load(out_dir)


def _bar(enabled: bool, total: int, what: str) -> tqdm:
    return tqdm(total=total, desc=what, unit="B", unit_scale=True, disable=not enabled, file=sys.stderr)


def _counted(pieces, bar: tqdm):
    """Pass pieces through, advancing `bar` by their size (in characters: close to the file bytes)."""
    for piece in pieces:
        bar.update(min(len(piece[0]), bar.total - bar.n))
        yield piece
    bar.update(bar.total - bar.n)


# --- command line -----------------------------------------------------------------------------------------

def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".txt files (one document each), .jsonl files (field \"text\") or folders of them")
    p.add_argument("--out", required=True, type=Path, help="new folder for the shards, tokenizer and index.json")
    p.add_argument("--seq-len", required=True, type=int, help="tokens a sequence is trained on (samples hold one more)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tokenizer", type=Path, help="a Hugging Face tokenizer.json to use")
    which.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                       help=f"train a byte-level BPE of this size on the inputs (default {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _run(args: argparse.Namespace) -> int:
    try:
        index = prepare_data(args.inputs, args.out, args.seq_len, tokenizer=args.tokenizer,
                             vocab_size=args.vocab_size, samples_per_shard=args.samples_per_shard,
                             num_proc=args.workers, progress=not args.quiet)
    except DataError as e:
        print(f"complexity-dist prepare-data: {e}", file=sys.stderr)
        return 2
    print(f"{index.root}: {index.num_samples:,} samples of {index.sample_len} tokens ({index.total_tokens:,} "
          f"tokens) in {len(index.shards)} shard(s), vocab {index.vocab_size}, {index.dtype}")
    return 0


def add_prepare_data_parser(subparsers) -> argparse.ArgumentParser:
    """Register `prepare-data` on a `parser.add_subparsers()` object; the handler is set as `func`."""
    p = subparsers.add_parser("prepare-data", help="tokenize text into WebDataset shards for training",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=_run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prepare_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return _run(parser.parse_args(argv))
