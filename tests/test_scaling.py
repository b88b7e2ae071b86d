"""tools/scaling.sh and the steady-rate arithmetic behind every scaling figure (complexity_dist/train/metrics.py
`steady_throughput`): median of the last two thirds, MFU rescaled to that rate, efficiency against one GPU.
The script runs here with a stand-in `torchrun` that writes a metrics.jsonl as a real run would."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from complexity_dist.train.metrics import steady_throughput

ROOT = Path(__file__).resolve().parents[1]


def write_metrics(path: Path, step_times: list[float], tokens_per_step: int, mfu_per_token_s: float = 1e-6,
                  cut_off_line: bool = False) -> None:
    lines, tokens = [], 0
    for i, t in enumerate(step_times, start=1):
        tokens += tokens_per_step
        # the trainer's own rate is smoothed over a window that still holds the compile step
        smoothed = tokens / sum(step_times[:i])
        lines.append(json.dumps({"step": i, "loss": 10.0 - i / 10, "tokens": tokens, "step_time_s": t,
                                 "tokens_per_s": smoothed, "mfu": smoothed * mfu_per_token_s,
                                 "peak_mem_gib": 12.5}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + ('{"step": 10, "loss": 1' if cut_off_line else ""))


def test_steady_rate_skips_the_warm_up_and_rescales_mfu(tmp_path):
    f = tmp_path / "metrics.jsonl"
    # step 1 compiles (30 s); steps 4-9 take 1.0 s except one 2.0 s outlier the median ignores
    write_metrics(f, [30.0, 3.0, 1.5, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0], tokens_per_step=1000, cut_off_line=True)
    t = steady_throughput(f)
    assert (t.first_step, t.last_step) == (4, 9)
    assert t.tokens_per_s == pytest.approx(1000.0)
    assert t.mfu == pytest.approx(1000.0 * 1e-6)  # the smoothed record said far less
    assert t.final_loss == pytest.approx(9.1) and t.peak_mem_gib == 12.5
    write_metrics(f, [30.0, 1.0], tokens_per_step=1000)
    with pytest.raises(ValueError, match="2 steps logged, at least 3"):
        steady_throughput(f)


FAKE_TORCHRUN = """#!/usr/bin/env python3
# stands in for torchrun: writes the metrics a run of the requested layout would log
import json, os, sys
args = sys.argv[1:]
nproc = int(args[args.index("--nproc-per-node") + 1])
run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("train.run_dir="))
ep = any(a == "parallel.ep=2" for a in args)
rate = 1000.0 if nproc == 1 else (1800.0 if ep else 1950.0)  # tokens/s
loss = 5.0 + (0.25 if ep else 0.0)
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    for step in range(1, 10):
        f.write(json.dumps({"step": step, "loss": loss, "tokens": 2000 * step, "step_time_s": 2000 / rate,
                            "tokens_per_s": rate, "mfu": rate / 4000, "peak_mem_gib": 3.0}) + "\\n")
"""


def run_scaling(tmp_path: Path, **env: str) -> list[str]:
    """tools/scaling.sh on configs/tiny.yaml over 2 'GPUs' with the stand-in torchrun; its printed lines."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torchrun = bin_dir / "torchrun"
    torchrun.write_text(FAKE_TORCHRUN)
    torchrun.chmod(torchrun.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "OUT": str(tmp_path / "out"), **env}
    proc = subprocess.run(["bash", str(ROOT / "tools/scaling.sh"), "configs/tiny.yaml", "2", "train.steps=9"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().splitlines()


def test_scaling_script_reports_each_layout_against_one_gpu(tmp_path):
    lines = run_scaling(tmp_path, LAYOUTS="dp;parallel.ep=2")
    assert lines[0].startswith("gpu1: 1,000 tokens/s (1,000 per GPU), MFU 25.0%, steps 4-9")
    assert lines[1].startswith("gpu2_dp: 1,950 tokens/s (975 per GPU)") and lines[1].endswith(
        "scaling 97.5% of 2 x one GPU")
    assert lines[2].startswith("gpu2_ep-2: 1,800 tokens/s (900 per GPU)") and lines[2].endswith(
        "scaling 90.0% of 2 x one GPU")


def test_scaling_script_compares_layouts_with_the_first_without_a_baseline(tmp_path):
    lines = run_scaling(tmp_path, LAYOUTS="dp;parallel.ep=2", BASELINE="none")
    assert len(lines) == 2 and not (tmp_path / "out" / "gpu1").exists()
    assert lines[0].startswith("gpu2_dp: 1,950 tokens/s (975 per GPU)") and lines[0].endswith("GiB")
    assert lines[1].startswith("gpu2_ep-2: 1,800 tokens/s (900 per GPU)") and lines[1].endswith(
        "92.3% of gpu2_dp, largest loss difference 2.50e-01")
