"""Resuming under another data-parallel layout (complexity_dist/train/reshard.py): weights, Adam moments, step
and data position carry over, so the next steps equal the uninterrupted run's. Also the split, resume and
export checks that test_reshard_parallel.py and test_reshard_pipeline.py share."""
import json
import shutil

import pytest
import torch
from test_train import dataset, metrics, run, train_cmd  # noqa: F401  (dataset is a fixture)

STEPS, SAVED = 6, 3
COMMON = [f"train.steps={STEPS}", f"checkpoint.every={SAVED}", "checkpoint.keep_last=5", "train.micro_batch=1"]


def _split_at(src, dst, step: int):
    """A run directory holding only `src`'s checkpoint of `step`, as if the run had stopped there."""
    tag = f"step_{step:08d}"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / tag, dst / "checkpoints" / tag)
    (dst / "checkpoints/latest").write_text(tag)
    return dst


def assert_metrics_continue(resumed_dir, full_dir, first: int, last: int, rtol: float):
    """Steps first..last of `resumed_dir` log the uninterrupted run's losses and gradient norms (within `rtol`
    relative) and end on its token count."""
    full, resumed = metrics(full_dir), metrics(resumed_dir)
    assert [r["step"] for r in resumed] == list(range(first, last + 1))
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in resumed], dtype=torch.float64),
                                   torch.tensor([r[key] for r in full[first - 1:]], dtype=torch.float64),
                                   rtol=rtol, atol=0, msg=lambda m: f"{key}: {m}")
    assert resumed[-1]["tokens"] == full[-1]["tokens"]


def assert_continues(resumed_dir, full_dir, first: int, last: int):
    """Steps first..last of `resumed_dir` equal the uninterrupted run's: losses and gradient norms within 1e-5
    relative, final weights (both runs dumped with COMPLEXITY_DIST_DUMP_WEIGHTS into w/) within 1e-5. The first
    resumed step needs the weights only; the next one also Adam's moments and step count (zeroed moments would
    move every element by ~lr, 300x the tolerance)."""
    assert_metrics_continue(resumed_dir, full_dir, first, last, rtol=1e-5)
    got = torch.load(resumed_dir / f"w/step_{last}.pt", map_location="cpu", weights_only=True)
    want = torch.load(full_dir / f"w/step_{last}.pt", map_location="cpu", weights_only=True)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")


def assert_exports_the_dumped_weights(step_dir, dumped, out):
    """`convert to-hf` of the checkpoint `step_dir` (into `out`) holds the run's own full weights at that step,
    as COMPLEXITY_DIST_DUMP_WEIGHTS wrote them to the file `dumped`, bit for bit, for every trained key."""
    from safetensors.torch import load_file

    from complexity_dist.convert.keys import hf_keys, source_name
    from complexity_dist.convert.reader import find_checkpoint, model_config_of

    run([*train_cmd(out, out)[:1], "-m", "complexity_dist", "convert", "to-hf", str(step_dir), str(out / "hf"),
         "--dtype", "fp32", "--shard-size", "200KB"])
    index = json.loads((out / "hf/model.safetensors.index.json").read_text())["weight_map"]
    hf = {}
    for f in sorted(set(index.values())):
        hf.update(load_file(out / "hf" / f))
    want = torch.load(dumped, map_location="cpu", weights_only=True)
    cfg = model_config_of(find_checkpoint(step_dir))
    trained = [k for k in hf_keys(cfg) if k.trained]
    assert len(trained) > 30
    for k in trained:
        assert torch.equal(hf[k.name], want[source_name(cfg, k.name)]), k.name


@pytest.mark.parametrize("before,after", [((1, 2), (3, 1)), ((0, 1), (2, 2))], ids=["z1x2-to-z3x1", "z0x1-to-z2x2"])
def test_resume_under_another_data_parallel_layout(tmp_path, dataset, before, after):  # noqa: F811
    (z0, n0), (z1, n1) = before, after
    run(train_cmd(tmp_path / "full", dataset, *COMMON, f"parallel.zero_stage={z0}", nproc=n0))
    split = _split_at(tmp_path / "full", tmp_path / "split", SAVED)
    proc = run(train_cmd(split, dataset, *COMMON, f"parallel.zero_stage={z1}", nproc=n1))
    assert "Traceback" not in proc.stderr
    assert_metrics_continue(split, tmp_path / "full", SAVED + 1, STEPS, rtol=1e-6)


def test_model_parallel_change_and_damaged_optimizer_file_exit_2(tmp_path, dataset):  # noqa: F811
    run(train_cmd(tmp_path / "full", dataset, *COMMON[1:], "train.steps=3", "parallel.zero_stage=1", nproc=2))
    # a checkpoint that says it was written under ep=2 but holds no expert optimizer group: refused before
    # any group exists, naming the file
    ep = _split_at(tmp_path / "full", tmp_path / "tp", SAVED)
    step_dir = ep / f"checkpoints/step_{SAVED:08d}"
    config = json.loads((step_dir / "config.json").read_text())
    config["parallel"]["ep"] = 2
    (step_dir / "config.json").write_text(json.dumps(config))
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"]["config.json"] = (step_dir / "config.json").stat().st_size
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    proc = run(train_cmd(ep, dataset, *COMMON, "parallel.zero_stage=3"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt holds no expert-parallel optimizer group" in proc.stderr, \
        proc.stderr[-3000:]
    assert "parallel.ep=2" in proc.stderr
    # a truncated optimizer partition: exit 2 naming the file
    damaged = _split_at(tmp_path / "full", tmp_path / "damaged", SAVED)
    optim = damaged / f"checkpoints/step_{SAVED:08d}/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:4096])
    proc = run(train_cmd(damaged, dataset, *COMMON, "parallel.zero_stage=3"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(optim) in proc.stderr, proc.stderr[-3000:]
