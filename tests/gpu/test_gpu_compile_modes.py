"""On the GPU machine: train.compile_mode (torch.compile's mode for the decoder layers).

    python -m pytest -q -s tests/gpu/test_gpu_compile_modes.py

Each mode trains the 150m preset like the default mode (same data and seed, two micro-batches per step).
Their speed comes from `complexity-dist bench CONFIG train.compile_mode=...` (README, Performance)."""
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

from test_train import metrics, run  # noqa: E402

BASE = ["train.steps=12", "train.global_batch=16", "train.micro_batch=8", "data.seq_len=256", "optim.warmup_steps=4",
        "optim.lr=5e-4", "train.precision=bf16", "train.compile=true", "checkpoint.enabled=false",
        "tracking.enabled=false", "parallel.zero_stage=1"]


@pytest.mark.parametrize("mode", ["max-autotune-no-cudagraphs"])
def test_mode_trains_like_the_default_mode(tmp_path, mode):
    rows = {}
    for name in ("default", mode):
        run([sys.executable, "-m", "complexity_dist", "train", "configs/150m.yaml", *BASE,
             f"train.compile_mode={name}", f"train.run_dir={tmp_path / name}"], timeout=900)
        rows[name] = metrics(tmp_path / name)
        print(f"\n{name}: " + " ".join(f"{r['loss']:.4f}" for r in rows[name]) +
              f" | tokens/s of the last 4 steps: {sum(r['tokens_per_s'] for r in rows[name][-4:]) / 4:,.0f}")
    for want, got in zip(rows["default"], rows[mode], strict=True):
        # the same math; other kernels (autotuned configs) may round a little differently
        assert abs(got["loss"] / want["loss"] - 1) < 5e-3, (got["step"], got["loss"], want["loss"])
