"""TokenLoader: endless, resumable micro-batches of token samples for one data-parallel rank.

How the data is split. `order.SampleOrder` fixes one global sequence of samples (seeded shuffle of shards
and, within windows of a few shards, of samples; a new shuffle every epoch). Global batches are
consecutive stretches of that sequence: round k is positions [k*M*D, (k+1)*M*D) for micro_batch M and
dp_size D, and rank r's k-th micro-batch is its slice [k*M*D + r*M, k*M*D + (r+1)*M). Hence
- ranks are disjoint and together cover every sample once per epoch, for any number of shards;
- an optimizer step of global batch G = M*D*grad_accum is positions [t*G, (t+1)*G) whatever D is:
  changing the number of processes (at the same global batch) does not change the data of any step;
- the position after a batch is one integer, `next_sample`, the same on every rank: the whole state.
DataLoader workers share a rank's micro-batches round-robin (worker w makes batches k = w mod W), which
is exactly the order in which torch's DataLoader hands worker outputs back.

The price is IO: a global batch comes from a window of a few shards, so every rank (and every worker)
reads every shard and keeps its own slice. The reading rate of each worker is that of the whole job's
training tokens (e.g. 64 ranks x 30k tokens/s x 2 bytes = 4 MB/s), which local page cache and Python's
tar parsing handle easily for the small and mid-sized jobs this is for. Resuming skips whole shards by
arithmetic on the index counts; only the shards of the current window are read.

Shards are parsed with webdataset's tar iterators and checked against their sha256 when loaded; a
dataset of at most VERIFY_AT_START_BYTES is also checked whole when the loader is made.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from complexity_dist.data.errors import DataError
from complexity_dist.data.order import SampleOrder
from complexity_dist.data.shards import ShardIndex

STATE_VERSION = 1
# Datasets up to this size are hashed whole when a loader is made (well under a second), so a damaged
# shard stops the run before step 1; larger ones are checked shard by shard, when each is first read.
VERIFY_AT_START_BYTES = 256 << 20


class TokenLoader:
    """Iterate to get LongTensor micro-batches [micro_batch, seq_len + 1], forever.

    Iterating again (a new `iter(loader)`) continues after the last batch handed out.
    `state_dict()` / `load_state_dict()` save and restore that position exactly; the state is the same
    on every rank and may be loaded with another dp_size or micro_batch when micro_batch * dp_size
    divides the saved position (it does at every optimizer step of an unchanged global batch).
    """

    def __init__(self, path: str | Path, seq_len: int, micro_batch: int, dp_rank: int, dp_size: int, seed: int,
                 num_workers: int = 0, vocab_size: int | None = None, shuffle_window: int = 4,
                 pin_memory: bool = False, shards: slice | None = None):
        if micro_batch < 1:
            raise DataError(f"micro_batch={micro_batch} must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if num_workers < 0 or shuffle_window < 1:
            raise DataError(f"num_workers={num_workers} must be >= 0 and shuffle_window={shuffle_window} >= 1")
        self.index = ShardIndex.load(path).check(seq_len=seq_len, vocab_size=vocab_size)
        if shards is not None:
            self.index = _part(self.index, shards)
        if self.index.total_bytes <= VERIFY_AT_START_BYTES:
            self.index.verify()
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        self.seed, self.num_workers, self.pin_memory = seed, num_workers, pin_memory
        self.vocab_size = vocab_size  # ids in the shards must be below it (the tokenizer's size when None)
        self.order = SampleOrder([s.samples for s in self.index.shards], seed, shuffle_window)
        self._round = 0  # micro-batches this rank has handed to the caller = rounds completed

    @property
    def samples_per_round(self) -> int:
        """Samples all ranks take per micro-batch step (micro_batch * dp_size)."""
        return self.micro_batch * self.dp_size

    @property
    def next_sample(self) -> int:
        return self._round * self.samples_per_round

    @property
    def epoch(self) -> int:
        return self.next_sample // self.order.samples_per_epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        batches = _RankBatches(self.index, self.order, self.micro_batch, self.dp_rank, self.dp_size, self._round,
                               self.vocab_size)
        # batch_size=None: the dataset yields whole micro-batches, in the order workers are polled
        loader = DataLoader(batches, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)
        for batch in loader:
            if isinstance(batch, _Failure):
                raise DataError(batch.message)
            self._round += 1  # counted when handed out, so prefetched batches are not in the state
            yield batch

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "next_sample": self.next_sample, "seed": self.seed,
                "shuffle_window": self.order.window, "dataset": self.index.fingerprint,
                "epoch": self.epoch, "samples_per_epoch": self.order.samples_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; takes effect at the next `iter(loader)`."""
        ours = self.state_dict()
        for key in ("version", "seed", "shuffle_window", "dataset"):
            if state.get(key) != ours[key]:
                what = "dataset (sha256 of index.json)" if key == "dataset" else key
                raise DataError(f"the saved data-loader state has {what} {state.get(key)!r} but this loader "
                                f"has {ours[key]!r}; resume with the same data.path and seed, or start fresh")
        next_sample = int(state["next_sample"])
        if next_sample % self.samples_per_round:
            raise DataError(f"the saved data-loader state is at global sample {next_sample}, not a multiple of "
                            f"micro_batch * dp_size = {self.samples_per_round}; resume with a micro_batch and "
                            f"data-parallel size whose product divides it (the global batch of the saved run does)")
        self._round = next_sample // self.samples_per_round


def _part(index: ShardIndex, shards: slice) -> ShardIndex:
    """Only the shards `index.shards[shards]` (a training/held-out split). The part gets its own
    fingerprint, so a loader state saved with another split refuses to load."""
    part = index.shards[shards]
    if not part:
        raise DataError(f"shards [{shards.start}:{shards.stop}] of {index.root} select none of its "
                        f"{len(index.shards)} shards")
    name = index.fingerprint + "".join(f":{s.name}" for s in part)
    return dataclasses.replace(index, shards=part, total_tokens=sum(s.samples for s in part) * index.sample_len,
                               fingerprint=hashlib.sha256(name.encode()).hexdigest())


class _RankBatches(IterableDataset):
    """Rank `dp_rank`'s micro-batches from round `first_round` on; in a worker, only that worker's share."""

    def __init__(self, index: ShardIndex, order: SampleOrder, micro_batch: int, dp_rank: int, dp_size: int,
                 first_round: int, vocab_size: int | None = None):
        self.index, self.order = index, order
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        self.first_round, self.vocab_size = first_round, vocab_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        shards = _ShardCache(self.index, capacity=2 * self.order.window, vocab_size=self.vocab_size)
        offsets = np.arange(self.micro_batch, dtype=np.int64)
        rnd = self.first_round + worker_id
        while True:
            try:
                batch = self._batch(rnd, shards, offsets)
            except DataError as e:
                failure = _Failure(str(e))
                break
            yield batch
            rnd += num_workers
        # A worker that raises leaves torch's DataLoader slow to shut down (seconds per worker); a worker
        # that reports the problem as data and stays healthy lets the caller raise it and stop at once.
        while True:
            yield failure

    def _batch(self, rnd: int, shards: "_ShardCache", offsets: np.ndarray) -> torch.Tensor:
        start = rnd * self.micro_batch * self.dp_size + self.dp_rank * self.micro_batch
        shard_ids, sample_ids = self.order.locate(start + offsets)
        rows = [shards.get(int(s))[i] for s, i in zip(shard_ids, sample_ids)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


class _Failure:
    """A DataError met in a worker, sent to the main process as a batch."""

    def __init__(self, message: str):
        self.message = message


class _ShardCache:
    """The last few shards read (and verified), by shard number."""

    def __init__(self, index: ShardIndex, capacity: int, vocab_size: int | None = None):
        self.index, self.capacity = index, capacity
        self.vocab_size = index.vocab_size if vocab_size is None else vocab_size
        self.shards: dict[int, np.ndarray] = {}

    def get(self, number: int) -> np.ndarray:
        if number in self.shards:
            self.shards[number] = self.shards.pop(number)  # most recently used goes last
        else:
            if len(self.shards) >= self.capacity:
                self.shards.pop(next(iter(self.shards)))
            self.shards[number] = self._checked(number, self.index.read_shard(number))
        return self.shards[number]

    def _checked(self, number: int, samples: np.ndarray) -> np.ndarray:
        # an id past the embedding is an IndexError on CPU and a device-side assert on GPU: refuse it here,
        # once per shard read (a max over the shard, cheap beside hashing it)
        largest = int(samples.max()) if samples.size else -1
        if largest >= self.vocab_size:
            raise DataError(f"shard {self.index.shard_path(number)} holds token id {largest}, but the vocab size "
                            f"is {self.vocab_size} (model.vocab_size, or the dataset's when none is given), so "
                            f"ids must be < {self.vocab_size}; prepare the data with a tokenizer of at most "
                            f"{self.vocab_size} tokens or raise model.vocab_size")
        return samples
