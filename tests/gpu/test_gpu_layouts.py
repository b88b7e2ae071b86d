"""On a 2-GPU machine (NCCL): every model-parallel layout of the training loop against one GPU, and a real
SIGUSR1 preemption of a TP2 run (skipped with fewer than 2 GPUs).

    python -m pytest -q -s tests/gpu/test_gpu_layouts.py

The tiny test model in bf16: the losses of the first steps equal one GPU's within bf16 tolerance (the
fp32/gloo suite, tests/test_parallel_train.py, proves 1e-5). The launches run once and serve all tests.
"""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (run on the 2-GPU machine)")

from test_train import ROOT, dataset, metrics, run, train_cmd  # noqa: E402,F401  (dataset is a fixture)

STEPS = 8
COMMON = ["model.mu_router=straight_through", "train.precision=bf16", "parallel.zero_stage=1",
          f"train.steps={STEPS}", "checkpoint.enabled=false", "train.global_batch=8"]


def _te_ok() -> bool:
    from complexity_dist.parallel.te_backend import te_problem
    return te_problem() is None


LAYOUTS = {
    "dp2_zero3": ["parallel.zero_stage=3"],
    # the data-parallel reduction inside backward, on DeepSpeed's reduction stream (parallel.overlap_grad_reduce)
    "dp2_grad_overlap": ["parallel.zero_stage=2", "parallel.overlap_grad_reduce=true",
                         "parallel.grad_bucket_size=20000", "train.micro_batch=1"],
    "tp2": ["parallel.tp=2"],
    "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=2"],
    # ZeRO 1 (partial gradients summed once per step) and the overlapped attention projections on NCCL
    "tp2_sp_overlap": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.tp_comm_overlap=true",
                       "parallel.zero_stage=1"],
    # whole experts on each TP rank (parallel.expert_tensor_parallel=false), their gradients summed over TP
    "tp2_sp_etp1": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.expert_tensor_parallel=false",
                    "parallel.zero_stage=1"],
    "tp2_megatron": ["parallel.tp=2", "model.linear_backend=megatron"],
    "tp2_te": ["parallel.tp=2", "model.linear_backend=te"],
    "tp2_sp_te": ["parallel.tp=2", "parallel.sequence_parallel=true", "model.linear_backend=te"],
    "ep2": ["parallel.ep=2"],
    "pp2": ["parallel.pp=2"],
    # compiled layers around the collectives' autograd Functions (complexity_dist/parallel/comm.py: torch 2.11
    # lost their outputs' gradients when compiled); gradients are checked exactly on CPU (tests/test_tensor_parallel.py,
    # tests/test_expert_parallel.py), this is the NCCL run of the same code
    "tp2_sp_compiled": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=2",
                        "train.compile=true"],
    "ep2_compiled": ["parallel.ep=2", "train.compile=true"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset):  # noqa: F811
    root = tmp_path_factory.mktemp("gpu-layouts")
    run(train_cmd(root / "ref", dataset, *COMMON, nproc=1))
    return root


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_equals_one_gpu(runs, dataset, name):  # noqa: F811
    if "te" in name.split("_") and not _te_ok():
        pytest.skip("Transformer Engine is not installed")
    run(train_cmd(runs / name, dataset, *COMMON, *LAYOUTS[name], nproc=2))
    got, want = metrics(runs / name), metrics(runs / "ref")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    g = torch.tensor([r["loss"] for r in got[:4]])
    w = torch.tensor([r["loss"] for r in want[:4]])
    print(f"\n{name}: losses {g.tolist()} vs one GPU {w.tolist()}; max rel {((g - w).abs() / w).max():.2e}")
    torch.testing.assert_close(g, w, rtol=2e-2, atol=0.0)
    assert got[-1]["loss"] < got[0]["loss"]


def _workers(parent: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    kids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def test_sigusr1_preemption_of_tp2_resumes_exactly(tmp_path, dataset):  # noqa: F811
    """SIGUSR1 to every worker (what `scancel --signal=USR1 --full` or sbatch --signal does) mid-run: the
    step finishes, a checkpoint is saved, the run exits with the requeue code; the resumed run's losses
    equal the uninterrupted run's."""
    common = ["model.mu_router=straight_through", "train.precision=bf16", "parallel.tp=2", "parallel.zero_stage=1",
              "train.steps=40",
              "checkpoint.every=1000", "train.global_batch=8", "model.num_hidden_layers=8"]
    run(train_cmd(tmp_path / "full", dataset, *common, nproc=2))
    cmd = train_cmd(tmp_path / "split", dataset, *common, nproc=2)
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "split/metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    workers = _workers(proc.pid)
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    saved = (tmp_path / "split/checkpoints/latest").read_text().strip()
    stopped_at = int(saved.split("_")[1])
    assert 5 <= stopped_at < 40, (saved, out[-2000:])
    resumed = run(train_cmd(tmp_path / "split", dataset, *common, nproc=2), check=False)
    errors = [line for line in (resumed.stdout + resumed.stderr).splitlines() if "error" in line.lower()]
    assert resumed.returncode == 0, "\n".join(errors[:20]) + "\n--- first run:\n" + out[-3000:]
    full, split = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 41))
    after = slice(stopped_at, 40)
    full_l, split_l = [r["loss"] for r in full[after]], [r["loss"] for r in split[after]]
    print(f"\nTP2 SIGUSR1 at step {stopped_at} (exit {proc.returncode}): resumed losses equal uninterrupted: "
          f"{full_l == split_l}; max diff {max(abs(a - b) for a, b in zip(full_l, split_l)):.2e}")
    torch.testing.assert_close(torch.tensor(split_l), torch.tensor(full_l), rtol=1e-2, atol=1e-2)
