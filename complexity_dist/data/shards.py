"""The on-disk dataset: WebDataset tar shards of fixed-length token samples, described by index.json.

Layout of a prepared folder:

    index.json          what the loader needs (see `ShardIndex`), written last
    tokenizer.json      the Hugging Face tokenizer that made the tokens
    shard-000000.tar    samples; each is one tar member `<9-digit sample number>.u16` (or `.u32`) holding
    shard-000001.tar    seq_len + 1 token ids as raw little-endian unsigned integers
    ...

Tar members carry fixed metadata (mtime 0, uid/gid 0, mode 0444, USTAR), so the same tokens give the
same bytes, and the sha256 of every shard is recorded in the index and checked when the shard is read
(with webdataset's tar iterators, i.e. any WebDataset pipeline can read these shards too).
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from complexity_dist.data.errors import DataError
from complexity_dist.data.files import HashingFile, sha256_of

INDEX_NAME = "index.json"
FORMAT = "complexity-dist-tokens/1"
PREPARE_HINT = "run `complexity-dist prepare-data INPUT... --out DIR --seq-len N` to make one"
REPREPARE_HINT = "restore the file or prepare the dataset again with `complexity-dist prepare-data`"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in 16 bits: half the disk and IO of uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def extension_of(dtype: np.dtype) -> str:
    return {2: "u16", 4: "u32"}[dtype.itemsize]


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


# --- writing ----------------------------------------------------------------------------------------------

class ShardWriter:
    """Cuts a stream of token arrays into samples of `sample_len` tokens and writes them as tar shards.

    Tokens that do not fill a last sample are dropped (counted in `dropped_tokens`).
    """

    def __init__(self, folder: Path, sample_len: int, dtype: np.dtype, samples_per_shard: int):
        self.folder, self.sample_len, self.dtype = Path(folder), sample_len, np.dtype(dtype)
        self.samples_per_shard = samples_per_shard
        self.shards: list[dict] = []
        self._pending: list[np.ndarray] = []  # token arrays not yet cut into samples
        self._pending_len = 0
        self._samples: list[np.ndarray] = []  # samples of the shard being filled
        self._written = 0  # samples written so far: the next sample's number (its tar key)

    def add(self, tokens: np.ndarray) -> None:
        self._pending.append(np.asarray(tokens, dtype=self.dtype))
        self._pending_len += len(tokens)
        if self._pending_len < self.sample_len:
            return
        stream = np.concatenate(self._pending)
        whole = len(stream) // self.sample_len * self.sample_len
        self._samples.extend(stream[:whole].reshape(-1, self.sample_len))
        self._pending, self._pending_len = [stream[whole:]], len(stream) - whole
        while len(self._samples) >= self.samples_per_shard:
            self._write_shard(self._samples[:self.samples_per_shard])
            del self._samples[:self.samples_per_shard]

    def finish(self) -> list[dict]:
        if self._samples:
            self._write_shard(self._samples)
            self._samples = []
        return self.shards

    @property
    def dropped_tokens(self) -> int:
        return self._pending_len

    def _write_shard(self, samples: list[np.ndarray]) -> None:
        name = shard_name(len(self.shards))
        ext = extension_of(self.dtype)
        with open(self.folder / name, "wb") as raw:
            out = HashingFile(raw)
            # plain tarfile rather than webdataset's TarWriter: every header field is pinned here (and
            # prepare-data does not import torch, which webdataset does)
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                for sample in samples:
                    data = sample.tobytes()
                    member = tarfile.TarInfo(f"{self._written:09d}.{ext}")
                    member.size, member.mtime, member.mode = len(data), 0, 0o444
                    member.uid = member.gid = 0
                    member.uname = member.gname = ""
                    tar.addfile(member, io.BytesIO(data))
                    self._written += 1
        self.shards.append({"name": name, "samples": len(samples), "bytes": out.size, "sha256": out.hexdigest()})


# --- reading ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardIndex:
    """index.json of a prepared folder, validated; `read_shard` loads (and verifies) one shard."""

    root: Path
    seq_len: int
    vocab_size: int
    dtype: str
    tokenizer: str
    tokenizer_sha256: str
    eos_token_id: int
    shards: tuple[ShardInfo, ...]
    total_tokens: int
    fingerprint: str  # sha256 of index.json: names this exact dataset in loader states

    @classmethod
    def load(cls, path: str | Path) -> "ShardIndex":
        """Read `path/index.json` (or `path` itself when it is the index file) and check the shards exist."""
        path = Path(path)
        index_file = path if path.name == INDEX_NAME and path.is_file() else path / INDEX_NAME
        if not path.exists():
            raise DataError(f"dataset folder {path} does not exist; {PREPARE_HINT}")
        if not index_file.is_file():
            raise DataError(f"{path} has no {INDEX_NAME}, so it is not a prepared dataset (or its "
                            f"preparation did not finish); {PREPARE_HINT}")
        raw = index_file.read_bytes()
        try:
            meta = json.loads(raw)
            if meta.get("format") != FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
            shards = tuple(ShardInfo(s["name"], int(s["samples"]), int(s["bytes"]), str(s["sha256"]))
                           for s in meta["shards"])
            index = cls(root=index_file.parent, seq_len=int(meta["seq_len"]), vocab_size=int(meta["vocab_size"]),
                        dtype=str(meta["dtype"]), tokenizer=str(meta["tokenizer"]),
                        tokenizer_sha256=str(meta["tokenizer_sha256"]), eos_token_id=int(meta["eos_token_id"]),
                        shards=shards, total_tokens=int(meta["total_tokens"]),
                        fingerprint=hashlib.sha256(raw).hexdigest())
            np.dtype(index.dtype)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{index_file} is not a valid dataset index ({type(e).__name__}: {e}); "
                            f"{REPREPARE_HINT}") from None
        if not shards or any(s.samples < 1 for s in shards):
            raise DataError(f"{index_file} lists no samples; prepare it again from more text or a smaller --seq-len")
        index._confined(index.tokenizer, "tokenizer")
        for shard in shards:  # a stat per shard: cheap, and a missing file is better found before step 1
            index._check_present(shard)
        return index

    def check(self, seq_len: int | None = None, vocab_size: int | None = None) -> "ShardIndex":
        """Refuse a dataset the model cannot train on; returns self."""
        if seq_len is not None and seq_len != self.seq_len:
            raise DataError(f"dataset {self.root} was prepared with seq_len={self.seq_len} but the run asks for "
                            f"seq_len={seq_len}; set data.seq_len={self.seq_len} or prepare the data again "
                            f"with --seq-len {seq_len}")
        if vocab_size is not None and self.vocab_size > vocab_size:
            raise DataError(f"the tokenizer of dataset {self.root} has {self.vocab_size} tokens but "
                            f"model.vocab_size={vocab_size}; ids past the embedding would crash: set "
                            f"model.vocab_size>={self.vocab_size} or prepare the data with a smaller tokenizer")
        return self

    @property
    def sample_len(self) -> int:
        return self.seq_len + 1

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def tokenizer_path(self) -> Path:
        return self._confined(self.tokenizer, "tokenizer")

    def shard_path(self, number: int) -> Path:
        return self.root / self.shards[number].name

    def read_shard(self, number: int) -> np.ndarray:
        """All samples of shard `number` in file order, [samples, seq_len + 1], after checking its sha256."""
        from webdataset.tariterators import group_by_keys, tar_file_expander  # imports torch: only when reading

        shard, path = self.shards[number], self.shard_path(number)
        self._check_present(shard)
        dtype = np.dtype(self.dtype).newbyteorder("<")  # shards are little-endian on every machine
        ext, sample_bytes = extension_of(dtype), self.sample_len * dtype.itemsize
        payloads = []
        try:
            with open(path, "rb") as raw:
                stream = HashingFile(raw)
                # webdataset parses the tar stream; we hash the same bytes on the way through
                for sample in group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])):
                    payloads.append(sample.get(ext))
                stream.drain()
        except Exception as e:  # tarfile and webdataset raise many types for a damaged archive
            raise DataError(f"shard {path} is not a readable tar file ({type(e).__name__}: {e}); "
                            f"{REPREPARE_HINT}") from None
        if stream.hexdigest() != shard.sha256:
            raise DataError(f"shard {path} is corrupt: its sha256 {stream.hexdigest()} differs from "
                            f"{shard.sha256} in {INDEX_NAME}; {REPREPARE_HINT}")
        if len(payloads) != shard.samples:
            raise DataError(f"shard {path} holds {len(payloads)} samples but {INDEX_NAME} says "
                            f"{shard.samples}; {REPREPARE_HINT}")
        for i, payload in enumerate(payloads):
            if payload is None or len(payload) != sample_bytes:
                size = "no" if payload is None else len(payload)
                raise DataError(f"shard {path}: sample {i} has {size} bytes of .{ext} tokens, expected "
                                f"{sample_bytes} (seq_len {self.seq_len} + 1 tokens of {dtype.name}); "
                                f"{REPREPARE_HINT}")
        return np.frombuffer(b"".join(payloads), dtype=dtype).reshape(shard.samples, self.sample_len)

    def verify(self) -> None:
        """Hash every shard now (reading the whole dataset) instead of each when it is first read."""
        for number, shard in enumerate(self.shards):
            self._check_present(shard)
            digest = sha256_of(self.shard_path(number))
            if digest != shard.sha256:
                raise DataError(f"shard {self.shard_path(number)} is corrupt: its sha256 {digest} differs from "
                                f"{shard.sha256} in {INDEX_NAME}; {REPREPARE_HINT}")

    def _confined(self, name: str, what: str) -> Path:
        """`root/name`, refused unless `name` is a plain file name whose real path is inside the folder:
        index.json is data, and must not make the loader read (or hash) files elsewhere."""
        root = self.root.resolve()
        plain = (isinstance(name, str) and name not in ("", ".", "..") and not set(name) & {"/", "\\", "\0"}
                 and not Path(name).is_absolute())
        try:
            inside = plain and (root / name).resolve().parent == root  # follows links, as open() would
        except (OSError, RuntimeError):  # a link loop
            inside = False
        if not inside:
            raise DataError(f"{self.root / INDEX_NAME}: the {what} entry {name!r} is not a file name inside "
                            f"{self.root} (no folders, '..', absolute paths or links leading out of it are "
                            f"allowed); {REPREPARE_HINT}")
        return self.root / name

    def _check_present(self, shard: ShardInfo) -> None:
        path = self._confined(shard.name, "shard")
        if not path.is_file():
            raise DataError(f"shard {path} listed in {self.root / INDEX_NAME} is missing; {REPREPARE_HINT}")
        if path.stat().st_size != shard.bytes:
            raise DataError(f"shard {path} has {path.stat().st_size} bytes but {INDEX_NAME} says {shard.bytes} "
                            f"(truncated or replaced); {REPREPARE_HINT}")
