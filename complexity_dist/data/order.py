"""The global sample order: one deterministic, infinite sequence of (shard, sample) pairs.

Global position p is in epoch e = p // N (N = samples in the dataset). Each epoch:
1. permutes the shards with seed (seed, e);
2. cuts that shard list into windows of `window` consecutive shards;
3. visits the windows in turn, each in its own permutation of all its samples, seed (seed, e, w) for
   window number w.
So a stretch of the order mixes `window` shards, and a reader holds at most about 2 windows of shards
in memory. Permutations sort splitmix64 hashes, so they are identical on every machine and numpy version.

The order depends only on the dataset and (seed, window): never on the number of ranks or workers.
"""
from __future__ import annotations

import numpy as np

def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic): a cheap, good integer hash."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def seeded_permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of range(n) determined by the integers `key`."""
    h = np.zeros(1, dtype=np.uint64)
    for part in key:
        h = splitmix64(h ^ np.array([part % (1 << 64)], dtype=np.uint64))
    return np.argsort(splitmix64(np.arange(n, dtype=np.uint64) ^ h), kind="stable")


class SampleOrder:
    def __init__(self, shard_samples: list[int], seed: int, window: int):
        if window < 1:
            raise ValueError(f"shuffle window {window} must be >= 1")
        self.shard_samples = np.asarray(shard_samples, dtype=np.int64)
        self.seed, self.window = int(seed), int(window)
        self.samples_per_epoch = int(self.shard_samples.sum())
        # small caches: a reader's positions only move forward, so the last few entries are all it needs
        self._epochs: dict[int, tuple] = {}
        self._windows: dict[tuple[int, int], tuple] = {}

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard numbers, sample numbers within the shard) of global `positions`."""
        positions = np.asarray(positions, dtype=np.int64)
        shards = np.empty_like(positions)
        samples = np.empty_like(positions)
        epochs, in_epoch = np.divmod(positions, self.samples_per_epoch)
        for epoch in np.unique(epochs):
            window_starts = self._epoch(int(epoch))[1]
            mask = epochs == epoch
            which = np.searchsorted(window_starts, in_epoch[mask], side="right") - 1
            shard_out, sample_out = shards[mask], samples[mask]
            for w in np.unique(which):
                members, member_starts, permutation = self._window(int(epoch), int(w))
                sel = which == w
                flat = permutation[in_epoch[mask][sel] - window_starts[w]]  # index into the window's samples
                slot = np.searchsorted(member_starts, flat, side="right") - 1
                shard_out[sel], sample_out[sel] = members[slot], flat - member_starts[slot]
            shards[mask], samples[mask] = shard_out, sample_out
        return shards, samples

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard visiting order, first in-epoch position of each window) of `epoch`."""
        if epoch not in self._epochs:
            shard_order = seeded_permutation(len(self.shard_samples), self.seed, epoch)
            sizes = [self.shard_samples[shard_order[i:i + self.window]].sum()
                     for i in range(0, len(shard_order), self.window)]
            _bounded_put(self._epochs, epoch, (shard_order, _starts(sizes)))
        return self._epochs[epoch]

    def _window(self, epoch: int, number: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shards of the window, first window-index of each, permutation of the window's samples)."""
        key = (epoch, number)
        if key not in self._windows:
            shard_order = self._epoch(epoch)[0]
            members = shard_order[number * self.window:(number + 1) * self.window]
            sizes = self.shard_samples[members]
            permutation = seeded_permutation(int(sizes.sum()), self.seed, epoch, number)
            _bounded_put(self._windows, key, (members, _starts(sizes), permutation))
        return self._windows[key]


def _starts(sizes) -> np.ndarray:
    """Where each of consecutive blocks of `sizes` begins."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def _bounded_put(cache: dict, key, value, keep: int = 4) -> None:
    if len(cache) >= keep:
        cache.pop(next(iter(cache)))  # the oldest entry
    cache[key] = value
