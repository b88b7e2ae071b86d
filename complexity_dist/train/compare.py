"""`complexity-dist compare-runs RUN_A RUN_B`: do two runs' loss curves agree within noise?

For checking that a parallel layout trains like a smaller one (same seed, same data order): the runs see the
same batch at each step, so their losses differ only by numerics (bf16 reductions in another order) unless
the layout is wrong. Steps both runs logged are cut into windows of `--window` steps; in each window the mean
of B's loss minus A's must be within `--sigmas` standard errors of the per-step loss noise, estimated from
run A itself: the spread of its step-to-step changes (differencing removes the downward trend; a change of
two independent draws has sqrt(2) times a draw's spread). Steps a run skipped (non-finite) are left out.

Exit status: 0 within noise, 1 not, 2 unusable input (missing file, fewer common steps than one window).
"""
from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from complexity_dist.config import ConfigError
from complexity_dist.train.metrics import METRICS_FILE, read_metrics


@dataclass
class Window:
    first: int
    last: int
    mean_a: float
    mean_b: float
    bound: float

    @property
    def diff(self) -> float:
        return self.mean_b - self.mean_a

    @property
    def ok(self) -> bool:
        return abs(self.diff) <= self.bound


def read_losses(run: str | Path) -> dict[int, float]:
    """step -> loss from a run directory's metrics.jsonl (or that file itself), finite losses only."""
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: pass a run directory (train.run_dir) or its {METRICS_FILE}")
    records = list(read_metrics(path))  # a line cut off by a crash is skipped, as everywhere
    if not records:
        raise ConfigError(f"{path} holds no metrics records (JSON objects with a step): is this a {METRICS_FILE}?")
    return {r["step"]: float(r["loss"]) for r in records
            if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"]) and not r.get("skipped")}


def compare(a: dict[int, float], b: dict[int, float], window: int = 20, sigmas: float = 3.0,
            from_step: int = 0) -> tuple[list[int], list[Window]]:
    """The steps both runs logged (from `from_step` on) and their windows; a trailing part shorter than a
    window joins the last window."""
    if window < 2:
        raise ConfigError(f"--window {window} must be at least 2 steps")
    steps = sorted(s for s in a.keys() & b.keys() if s >= from_step)
    if len(steps) < window:
        raise ConfigError(f"the runs share {len(steps)} logged steps from step {from_step}, fewer than one window "
                          f"of {window}: compare longer runs or lower --window")
    changes = [a[t] - a[s] for s, t in zip(steps, steps[1:])]
    noise = statistics.pstdev(changes) / math.sqrt(2)  # one step's loss noise around the trend
    cuts = list(range(0, len(steps) - window + 1, window))
    out = []
    for i, start in enumerate(cuts):
        chunk = steps[start:] if i == len(cuts) - 1 else steps[start:start + window]
        out.append(Window(chunk[0], chunk[-1], statistics.fmean(a[s] for s in chunk),
                          statistics.fmean(b[s] for s in chunk), sigmas * noise / math.sqrt(len(chunk))))
    return steps, out


def _compare_main(args: argparse.Namespace) -> int:
    a, b = read_losses(args.run_a), read_losses(args.run_b)
    steps, windows = compare(a, b, args.window, args.sigmas, args.from_step)
    worst = max(abs(b[s] - a[s]) / abs(a[s]) for s in steps)
    print(f"A {args.run_a}\nB {args.run_b}\n{len(steps)} common steps ({steps[0]}-{steps[-1]}), largest per-step "
          f"relative difference {worst:.2e}")
    print(f"{'steps':>13} {'mean loss A':>12} {'mean loss B':>12} {'B - A':>10} {'bound':>9}")
    for w in windows:
        print(f"{w.first:>6}-{w.last:<6} {w.mean_a:12.5f} {w.mean_b:12.5f} {w.diff:10.5f} {w.bound:9.5f}"
              f"{'' if w.ok else '  outside'}")
    bad = [w for w in windows if not w.ok]
    if bad:
        print(f"NOT within noise: {len(bad)} of {len(windows)} windows differ by more than {args.sigmas:g} standard "
              f"errors of the per-step loss noise")
        return 1
    print(f"within noise: every window's mean difference is under {args.sigmas:g} standard errors")
    return 0


def add_compare_parser(sub) -> None:
    p = sub.add_parser("compare-runs", help="whether two runs' loss curves agree within noise (exit 0) or not (1)")
    p.add_argument("run_a", help="reference run directory (or its metrics.jsonl)")
    p.add_argument("run_b", help="run directory to check against it")
    p.add_argument("--window", type=int, default=20, help="steps per window (default 20)")
    p.add_argument("--sigmas", type=float, default=3.0, help="allowed standard errors per window (default 3)")
    p.add_argument("--from-step", type=int, default=0, help="ignore steps before this one")
    p.set_defaults(func=_compare_main)
