"""Where a step's time goes: torch.profiler over chosen steps, and three reports from it.

    kinds.txt        device time by kind of kernel (GEMM, attention, communication, fused Triton/compiled, other),
                     summed over every device activity of the trace
    top_kernels.txt  the 100 kernels that took longest
    idle.txt         when the device ran nothing: by the CPU operator it was waiting on, by the length of each gap,
                     by the step's phase and by what the host was doing
    trace.json.gz    the Chrome trace (chrome://tracing, Perfetto)

`complexity-dist bench --profile DIR` profiles two extra steps of one device; `train.profile_start` /
`train.profile_steps` profile steps of a real run on every rank (<run_dir>/profile/rank_<R>/), which is how a
multi-GPU layout (TP, PP, EP) shows where its time goes. On CPU the operators' self CPU time stands in for
kernels.
"""
from __future__ import annotations

import gzip
import heapq
import json
from pathlib import Path

import torch

# kernel name fragments -> kind, first match wins (cuBLAS/cuBLASLt/CUTLASS GEMMs, flash/cuDNN attention, NCCL)
_KERNEL_KINDS = (
    ("communication", ("nccl", "gloo", "all_reduce", "allreduce", "all_gather", "reduce_scatter", "alltoall")),
    ("attention", ("flash", "fmha", "attention", "attn", "cudnn::fusion")),
    ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "wgmma", "matmul", "aten::mm", "aten::addmm", "aten::bmm",
              "grouped_mm")),
    ("fused triton / compiled", ("triton",)),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in _KERNEL_KINDS if any(p in low for p in parts)), "other")


_DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")


_HOST_EVENTS = ("cpu_op", "cuda_runtime", "cuda_driver")
_NO_OPERATOR = "(no operator: Python between operators)"
# record_function names of an optimizer step's phases (complexity_dist/train/step.py): "step/forward", ...
PHASE_PREFIX = "step/"
_NO_PHASE = "(outside the step's phases: between steps, logging, checkpointing)"


def _device_intervals(events: list[dict]) -> list[tuple[float, float]]:
    """(start, end) of every device activity of a trace (kernels, copies, fills), in time order."""
    return sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("ph") == "X" and e.get("cat") in _DEVICE_EVENTS)


def _idle_gaps(device: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The stretches between those intervals when the device ran nothing."""
    gaps, busy_until = [], device[0][1] if device else 0.0
    for start, end in device[1:]:
        if start > busy_until:
            gaps.append((busy_until, start))
        busy_until = max(busy_until, end)
    return gaps


def device_idle(events: list[dict], charge_to: str = "outermost") -> tuple[float, float, dict[str, float]]:
    """From a Chrome trace's events: (span of device activity, time the device ran nothing, that idle time by
    the host call running at the middle of each gap), all in microseconds. `charge_to` "outermost": a gap is
    charged to the outermost operator then open (the earliest-started one: aten::isfinite rather than the aten::ne
    it calls): the call the device was waiting on. "innermost": to the latest-started operator or CUDA runtime
    call (cudaLaunchKernel, cudaStreamSynchronize, ...) open then, on any thread: what the host was doing while
    the device starved. Gaps with no operator open are Python (or the profiler) between operators. "phase": to
    the phase of the optimizer step then open (forward, backward, optimizer: the PHASE_PREFIX ranges). Empty
    results without device events."""
    device = _device_intervals(events)
    if not device:
        return 0.0, 0.0, {}
    gaps = _idle_gaps(device)
    host = {"outermost": ("cpu_op",), "innermost": _HOST_EVENTS, "phase": ("user_annotation",)}[charge_to]
    ops = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("ph") == "X"
                 and e.get("cat") in host and (charge_to != "phase" or e.get("name", "").startswith(PHASE_PREFIX)))
    # heap order: earliest start first (outermost) or latest first (innermost)
    sign = -1 if charge_to == "innermost" else 1
    by_op: dict[str, float] = {}
    open_ops: list[tuple[float, float, str]] = []  # heap by sign * start: (sign * start, end, name)
    i = 0
    for a, b in gaps:  # in time order, so an operator closed before one gap is closed for every later one
        mid = (a + b) / 2
        while i < len(ops) and ops[i][0] <= mid:
            heapq.heappush(open_ops, (sign * ops[i][0], ops[i][1], ops[i][2]))
            i += 1
        while open_ops and open_ops[0][1] < mid:  # the top is closed: the next one may be open
            heapq.heappop(open_ops)
        name = open_ops[0][2] if open_ops else _NO_PHASE if charge_to == "phase" else _NO_OPERATOR
        by_op[name] = by_op.get(name, 0.0) + (b - a)
    return device[-1][1] - device[0][0], sum(b - a for a, b in gaps), by_op


# gap sizes in microseconds: below ~10 us the device waits on kernel launches (what fusion or CUDA graphs remove),
# above it on the host's own work or a synchronisation
GAP_BUCKETS_US = (2.0, 10.0, 100.0, 1000.0)


def gap_histogram(events: list[dict]) -> list[tuple[str, int, float]]:
    """(range, number of gaps, their total in microseconds) of the device's idle gaps, by GAP_BUCKETS_US."""
    edges = (0.0, *GAP_BUCKETS_US, float("inf"))
    rows = [[f"{lo:g}-{hi:g} us" if hi != float("inf") else f">{lo:g} us", 0, 0.0] for lo, hi in zip(edges, edges[1:])]
    for a, b in _idle_gaps(_device_intervals(events)):
        row = rows[next(i for i, hi in enumerate(edges[1:]) if b - a < hi)]
        row[1] += 1
        row[2] += b - a
    return [tuple(r) for r in rows]


def idle_report(events: list[dict], top: int = 15) -> list[str]:
    span, idle, by_op = device_idle(events)
    if not span:
        return ["no device activity in the trace (a CPU run): nothing waits"]
    lines = [f"device idle {idle / 1e3:.1f} ms of {span / 1e3:.1f} ms ({idle / span:.1%}), by the outermost CPU "
             f"operator open meanwhile:"]
    lines += [f"{t / 1e3:>10.1f} ms  {name[:120]}" for name, t in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]]
    lines += ["", f"the same idle time by the length of each gap ({len(_device_intervals(events))} device activities):"]
    lines += [f"{t / 1e3:>10.1f} ms  {n:>7} gaps of {name}" for name, n, t in gap_histogram(events)]
    by_phase = device_idle(events, charge_to="phase")[2]
    lines += ["", "the same idle time by the phase of the optimizer step open meanwhile:"]
    lines += [f"{t / 1e3:>10.1f} ms  {name}" for name, t in sorted(by_phase.items(), key=lambda kv: -kv[1])]
    inner = device_idle(events, charge_to="innermost")[2]
    lines += ["", "the same idle time by the innermost operator or CUDA runtime call open meanwhile (what the host "
                  "was doing):"]
    lines += [f"{t / 1e3:>10.1f} ms  {name[:120]}" for name, t in sorted(inner.items(), key=lambda kv: -kv[1])[:top]]
    return lines


def device_rows(events: list[dict]) -> list[tuple[str, float, int]]:
    """(kernel, memcpy or memset name, total microseconds, count) from a Chrome trace's device events: every
    activity the device ran. (The profiler's key_averages() leaves out some: on an H200 ~5% of a 1.5b step's
    device time, the optimizer's large copies among them.)"""
    by_name: dict[str, list] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in _DEVICE_EVENTS:
            row = by_name.setdefault(e["name"], [0.0, 0])
            row[0] += e["dur"]
            row[1] += 1
    return [(name, t, n) for name, (t, n) in by_name.items()]


def write_reports(prof, out: Path, steps: int, cuda: bool) -> list[str]:
    """Write the reports of a finished torch.profiler run under `out`; returns the kinds table and the head of
    the idle report (what `bench --profile` prints)."""
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / "trace.json.gz"))  # gzip: a 1.5b step is ~100 MB of JSON
    with gzip.open(out / "trace.json.gz", "rt") as f:
        events = json.load(f)["traceEvents"]
    if cuda:  # every device activity of the trace; host-side annotation ranges are not device events
        rows = device_rows(events)
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(t for _, t, _ in rows) or 1
    by_kind: dict[str, float] = {}
    for key, t, _ in rows:
        by_kind[kernel_kind(key)] = by_kind.get(kernel_kind(key), 0.0) + t
    unit = "device" if cuda else "CPU (operators)"
    kinds = [f"{unit} time over {steps} steps by kind: {total / 1e3:.1f} ms",
             *(f"{kind:<26} {t / 1e3:>10.1f} ms {t / total:>6.1%}"
               for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]))]
    top = [f"{'ms':>10} {'share':>6} {'calls':>6} {'kind':<26} kernel"]
    top += [f"{t / 1e3:>10.2f} {t / total:>6.1%} {n:>6} {kernel_kind(k):<26} {k[:140]}"
            for k, t, n in sorted(rows, key=lambda r: -r[1])[:100]]
    (out / "kinds.txt").write_text("\n".join(kinds) + "\n")
    (out / "top_kernels.txt").write_text("\n".join(top) + "\n")
    idle = idle_report(events)
    (out / "idle.txt").write_text("\n".join(idle) + "\n")
    return kinds + idle[:6]


class StepProfiler:
    """torch.profiler around steps start .. start + steps - 1 of a loop (numbered from 1): call before_step and
    after_step around each step, close() when the loop ends (a run that stops inside the window still gets
    its reports)."""

    def __init__(self, start: int, steps: int, out: Path, device: torch.device):
        self.start, self.last, self.out, self.device = start, start + steps - 1, Path(out), device
        self._prof = None

    def before_step(self, step: int) -> None:
        if step == self.start and self.last >= self.start:
            from torch.profiler import ProfilerActivity, profile

            cuda = self.device.type == "cuda"
            self._prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            self._prof.__enter__()

    def after_step(self, step: int) -> bool:
        """True when this step closed the window and the reports are written."""
        return step == self.last and self.close()

    def close(self) -> bool:
        if self._prof is None:
            return False
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        self._prof.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        write_reports(prof, self.out, self.last - self.start + 1, cuda)
        return True
