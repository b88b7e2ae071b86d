"""Per-step training metrics: the `metrics.jsonl` log, throughput/MFU/ETA and the rank-0 progress line.

Steps are counted from 1: step k is the record written after the k-th optimizer step, and a checkpoint
"at step k" has seen exactly steps 1..k. Only rank 0 creates a MetricsLog or a StepPrinter (the caller's
job); Throughput is plain arithmetic and may live anywhere.
"""
from __future__ import annotations

import collections
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

METRICS_FILE = "metrics.jsonl"
REQUIRED_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "skipped")
_GIB = 2**30


def _plain(value: Any) -> Any:
    """A JSON-safe scalar: tensors/numpy scalars become Python numbers, non-finite floats become None
    (strict JSON has no NaN; a NaN loss is recorded through `skipped` instead)."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | Path) -> Iterator[dict]:
    """The records of a metrics.jsonl, skipping lines that do not parse (e.g. one cut off by a crash)."""
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                yield record


@dataclass
class SteadyThroughput:
    """A run's speed once compiled and warm (tools/scaling.sh's figures)."""
    tokens_per_s: float      # median over consecutive steps of the last two thirds
    mfu: float | None        # at that rate
    first_step: int          # the steps measured: first_step .. last_step
    last_step: int
    final_loss: float | None
    peak_mem_gib: float | None


def steady_throughput(path: str | Path) -> SteadyThroughput:
    """From a run's metrics.jsonl: the median of tokens / step_time_s between consecutive records of the last
    two thirds (the first third holds compilation and warm-up). A record's own `mfu` is of the trainer's
    smoothed rate, whose window may still hold the compile step, so it is rescaled to the median rate.
    ValueError when fewer than 3 steps were logged."""
    rows = list(read_metrics(path))
    if len(rows) < 3:
        raise ValueError(f"{path}: {len(rows)} steps logged, at least 3 needed for a steady rate")
    last = rows[len(rows) // 3:]
    rate = statistics.median((b["tokens"] - a["tokens"]) / b["step_time_s"] for a, b in zip(last, last[1:]))
    end = rows[-1]
    mfu = end["mfu"] / end["tokens_per_s"] * rate if end.get("mfu") and end.get("tokens_per_s") else None
    return SteadyThroughput(rate, mfu, last[0]["step"], end["step"], end.get("loss"), end.get("peak_mem_gib"))


class MetricsLog:
    """Appends one JSON object per step to `<run_dir>/metrics.jsonl`.

    `resume_step` is the step of the checkpoint the run starts from (0 = a fresh run). Records with a
    larger step belong to a trajectory the checkpoint never saw (steps done after it, before a crash),
    so they are dropped; otherwise the file would hold two different step 21s after a resume.
    """

    def __init__(self, run_dir: str | Path, resume_step: int = 0):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._truncate_after(resume_step)
        # line buffering + an explicit flush per record: a crash loses at most the line being written
        self._file: TextIO | None = open(self.path, "a", buffering=1)

    def _truncate_after(self, step: int) -> None:
        # rewrite to a temporary name, then rename: a crash here leaves the old file or the new, never half
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as out:
            for record in read_metrics(self.path):
                if record["step"] <= step:
                    out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> dict:
        """Append one step's record (REQUIRED_KEYS plus any extra) and return it as written."""
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise KeyError(f"metrics record for step {record.get('step')} lacks {', '.join(missing)}")
        if self._file is None:
            raise ValueError(f"{self.path} is closed")
        record = {k: _plain(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())  # once at the end, not per step
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- throughput and MFU -------------------------------------------------------------------------------

# dense (no sparsity) bf16 tensor-core peak per GPU, FLOP/s; the most specific name first
_PEAK_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),  # same compute as H100 SXM, more and faster memory
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
]


def peak_flops_per_device(device: Any = None) -> float | None:
    """Dense bf16 peak FLOP/s of one GPU, by torch.cuda.get_device_name; None on CPU or an unknown GPU
    (MFU is then reported as None, not 0.0, so no one mistakes it for a measurement)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAK_BF16:
        if key.lower() in name.lower():
            return peak
    return None


@dataclass(frozen=True)
class Rates:
    """What Throughput.update returns for one step."""

    tokens_per_s: float  # smoothed over the window
    tokens_per_s_instant: float  # this step alone
    mfu: float | None  # of the smoothed rate, in [0, 1]; None without a known peak
    eta_s: float | None  # for the steps left, at the smoothed time per step; None when not asked


class Throughput:
    """Tokens/s, MFU and ETA from (tokens, seconds) of each step.

    `tokens` are the tokens of the whole step over all data-parallel ranks; `flops_per_token` is the
    training cost (forward + backward, e.g. accounting.flops_per_token); `peak_flops` is the peak of ONE
    device and `num_devices` the devices that did the step, so MFU = tokens/s * flops_per_token /
    (peak_flops * num_devices). With peak_flops None (CPU, unknown GPU) MFU is None.

    The smoothed rate is total tokens / total seconds over the last `window` steps (a ratio of sums, so a
    slow step weighs by its time, unlike an average of per-step rates).
    """

    def __init__(self, flops_per_token: float, peak_flops: float | None, num_devices: int = 1,
                 window: int = 20):
        if num_devices < 1 or window < 1:
            raise ValueError(f"num_devices={num_devices} and window={window} must be >= 1")
        self.flops_per_token = float(flops_per_token)
        self.peak_flops = peak_flops
        self.num_devices = num_devices
        self._steps: collections.deque[tuple[float, float]] = collections.deque(maxlen=window)

    def update(self, tokens: float, seconds: float, steps_left: int | None = None) -> Rates:
        seconds = max(float(seconds), 1e-9)
        self._steps.append((float(tokens), seconds))
        window_s = sum(s for _, s in self._steps)
        rate = sum(t for t, _ in self._steps) / window_s
        eta = None if steps_left is None else max(steps_left, 0) * window_s / len(self._steps)
        return Rates(rate, tokens / seconds, self.mfu(rate), eta)

    def mfu(self, tokens_per_s: float) -> float | None:
        if not self.peak_flops:
            return None
        return tokens_per_s * self.flops_per_token / (self.peak_flops * self.num_devices)


# --- the progress line --------------------------------------------------------------------------------

def memory_gib(device: Any = None) -> float:
    """Peak GPU memory allocated by torch on `device` (a CUDA device), else this process's RSS, in GiB."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _GIB
    try:
        import psutil
        return psutil.Process().memory_info().rss / _GIB
    except ImportError:  # psutil is optional; the peak RSS from the kernel is close enough
        import resource
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / _GIB


def peak_memory_gib(device: Any = None) -> float:
    """The peak so far, in GiB: on a CUDA device, torch.cuda.max_memory_allocated (tensors torch allocated,
    not the allocator's cache); elsewhere, the peak resident set size of this process (ru_maxrss: all of
    the process's memory, the Python interpreter and libraries included)."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _GIB
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / _GIB


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_step(record: dict, total_steps: int, mem_gib: float | None = None,
                eta_s: float | None = None) -> str:
    """`step 12/100 | loss 3.4567 | lr 3.00e-04 | gnorm 0.812 | 12,345 tok/s | mfu 41.2% | mem 1.2 GiB
    | eta 3m05s` (one line; `-` for a value that is not known, e.g. MFU on CPU), with
    `| val_loss 3.5012 | val_ppl 33.15` after the loss at steps that evaluated."""
    mfu = record.get("mfu")
    parts = [
        f"step {record['step']}/{total_steps}",
        f"loss {_num(record.get('loss'), '.4f')}",
        *([f"val_loss {_num(record.get('val_loss'), '.4f')}", f"val_ppl {_num(record.get('val_ppl'), '.2f')}"]
          if "val_loss" in record else []),
        f"lr {_num(record.get('lr'), '.2e')}",
        f"gnorm {_num(record.get('grad_norm'), '.3f')}",
        f"{_num(record.get('tokens_per_s'), ',.0f')} tok/s",
        f"mfu {'-' if mfu is None else f'{100 * mfu:.1f}%'}",
        f"mem {_num(mem_gib, '.1f')} GiB",
        f"eta {format_duration(eta_s)}",
    ]
    if record.get("skipped"):
        parts.append("SKIPPED")
    return " | ".join(parts)


class StepPrinter:
    """Rank 0's progress: a tqdm bar on a terminal, else one plain line every `log_every` steps (and at
    the last step and at skipped steps), so CI logs get a readable line per interval, not a redraw per step.
    """

    def __init__(self, total_steps: int, log_every: int = 1, start_step: int = 0, device: Any = None,
                 stream: TextIO | None = None, use_tqdm: bool | None = None):
        self.total_steps = total_steps
        self.log_every = max(1, log_every)
        self.device = device
        self.stream = stream or sys.stderr
        if use_tqdm is None:
            use_tqdm = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = None
        if use_tqdm:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, file=self.stream, dynamic_ncols=True,
                             unit="step")

    def update(self, record: dict, rates: Rates | None = None) -> str:
        """Show one step's record (as given to MetricsLog.write); returns the formatted line."""
        step = record["step"]
        mem = record.get("peak_mem_gib")
        line = format_step(record, self.total_steps, memory_gib(self.device) if mem is None else mem,
                           rates.eta_s if rates is not None else None)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            # tqdm rate-limits redraws itself (mininterval); the postfix drops the redundant step/total
            self._bar.set_postfix_str(line.split(" | ", 1)[1], refresh=False)
        elif (step % self.log_every == 0 or step == self.total_steps or record.get("skipped")
              or "val_loss" in record):  # an evaluation is always shown
            print(line, file=self.stream, flush=True)
        return line

    def message(self, text: str) -> None:
        """A line of its own (checkpoint saved, preempted, ...) that does not break the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def plot_metrics(jsonl_path: str | Path, png_path: str | Path) -> Path | None:
    """Loss (and lr) against step from a metrics.jsonl, as a PNG. Returns None when there is nothing to
    plot. Uses matplotlib's object API with the Agg canvas: no pyplot, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = [r for r in read_metrics(jsonl_path) if r.get("loss") is not None]
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(8, 6), tight_layout=True)
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    loss_ax.plot(steps, [r["loss"] for r in records], linewidth=1)
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    lr_ax.plot(steps, [r.get("lr") or 0.0 for r in records], color="tab:orange", linewidth=1)
    lr_ax.set_ylabel("lr")
    lr_ax.set_xlabel("step")
    lr_ax.grid(alpha=0.3)
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    return png_path
