"""On the GPU machine: the training loop with NCCL, bf16 and ZeRO 1/2/3 (skipped without CUDA).

    python -m pytest -q tests/gpu
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")

from test_train import SMALL, dataset, metrics, run, train_cmd  # noqa: E402,F401  (dataset is a fixture)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_resume_on_gpus_matches_uninterrupted(tmp_path, dataset, zero):  # noqa: F811
    nproc = min(2, torch.cuda.device_count())
    common = ["train.steps=20", "checkpoint.every=10", f"parallel.zero_stage={zero}", "train.micro_batch=1",
              "train.precision=bf16"]
    run(train_cmd(tmp_path / "full", dataset, *common, nproc=nproc))
    run(train_cmd(tmp_path / "split", dataset, *common, nproc=nproc),
        env_extra={"COMPLEXITY_DIST_PREEMPT_AT": "10"}, check=False)
    assert (tmp_path / "split/checkpoints/latest").read_text().strip() == "step_00000010"
    run(train_cmd(tmp_path / "split", dataset, *common, nproc=nproc))
    full, split = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 21))
    full_losses = torch.tensor([r["loss"] for r in full[10:]])
    split_losses = torch.tensor([r["loss"] for r in split[10:]])
    # GPU kernels (atomics in attention/scatter backward) are not bitwise deterministic: close, not equal
    torch.testing.assert_close(split_losses, full_losses, rtol=2e-2, atol=2e-2)
    assert full[-1]["loss"] < full[0]["loss"]
    print(f"zero {zero}: max |resumed - uninterrupted| loss = {(split_losses - full_losses).abs().max():.2e}, "
          f"exact={torch.equal(split_losses, full_losses)}")


def _fused_clipping_check(rank):
    import os

    from test_overflow_check import _fused_adamw_applies_the_clipping_as_deepspeed
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # what DeepSpeed reads
    for stage in (1, 2):
        _fused_adamw_applies_the_clipping_as_deepspeed(stage, rank, world=1, device="cuda")


def test_fused_adamw_clipping_matches_deepspeed_on_gpu():
    """ZeRO 1/2 hand the clipping factor to CUDA's fused AdamW as its grad_scale (complexity_dist/parallel/
    deepspeed_engine.py): one clipped step moves the fp32 master weights as DeepSpeed's own clipping does
    (tests/test_overflow_check.py checks the same on CPU's fused kernel)."""
    from spawn_util import spawn_gloo
    spawn_gloo(_fused_clipping_check, 1, backend="nccl")


def test_overlapped_grad_reduction_trains_as_the_reduction_after_backward(tmp_path, dataset):  # noqa: F811
    """parallel.overlap_grad_reduce (ZeRO 2) on CUDA, where DeepSpeed reduces on a stream of its own while backward
    goes on (on one GPU too: the buckets still travel through that stream): 10 steps equal the reduction after
    backward within GPU non-determinism, in buckets small enough that the test model fills several."""
    nproc = min(2, torch.cuda.device_count())
    common = ["train.steps=10", "checkpoint.enabled=false", "parallel.zero_stage=2", "train.micro_batch=1",
              "train.precision=bf16"]
    run(train_cmd(tmp_path / "after", dataset, *common, nproc=nproc))
    run(train_cmd(tmp_path / "inside", dataset, *common, "parallel.overlap_grad_reduce=true",
                  "parallel.grad_bucket_size=20000", nproc=nproc))
    after, inside = metrics(tmp_path / "after"), metrics(tmp_path / "inside")
    for key in ("loss", "grad_norm"):
        a, b = (torch.tensor([r[key] for r in rows], dtype=torch.float64) for rows in (after, inside))
        print(f"{key}: max relative difference {((b - a).abs() / a.abs()).max():.2e}")
        torch.testing.assert_close(b, a, rtol=2e-3, atol=0.0)
    assert inside[-1]["loss"] < inside[0]["loss"]
