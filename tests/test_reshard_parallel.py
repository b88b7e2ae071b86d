"""Tensor- and expert-parallel checkpoints read back (complexity_dist/convert/reader.py `_zero12_plan`): exported
by `convert to-hf`, and resumed under another layout (complexity_dist/train/reshard.py), Adam moments included:
as data parallel on one process, and tensor parallel into expert parallel and back.

One 2-process launch per layout (gloo, fp32, 4 steps, a checkpoint at step 2) writes its gathered full weights
after every step (COMPLEXITY_DIST_DUMP_WEIGHTS, parallelize.full_state_dict):
    tp2   parallel.tp=2, ZeRO 1
    ep2   parallel.ep=2 (dp 2, expert-dp 1), ZeRO 2
"""
import json

import pytest
import torch
from test_reshard import _split_at
from test_train import ROOT, dataset, metrics, run, train_cmd  # noqa: F401  (dataset is a fixture)

SAVED, STEPS = 2, 4
COMMON = ["model.mu_router=straight_through", "optim.weight_decay=0", "train.precision=fp32",
          f"train.steps={STEPS}", f"checkpoint.every={SAVED}", "checkpoint.keep_last=5"]
LAYOUTS = {"tp2": ["parallel.tp=2", "parallel.zero_stage=1"], "ep2": ["parallel.ep=2", "parallel.zero_stage=2"]}
# (checkpoint of, resumed under, processes): data parallel on one process (the ZeRO 0 and ZeRO 1 setters),
# and each model-parallel layout into the other
RESUMES = {"tp2-to-dp": ("tp2", ["parallel.zero_stage=0"], 1), "ep2-to-dp": ("ep2", ["parallel.zero_stage=1"], 1),
           "tp2-to-ep2": ("tp2", LAYOUTS["ep2"], 2), "ep2-to-tp2": ("ep2", LAYOUTS["tp2"], 2)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset):  # noqa: F811
    root = tmp_path_factory.mktemp("reshard-parallel")
    for name, overrides in LAYOUTS.items():
        run(train_cmd(root / name, dataset, *COMMON, *overrides, nproc=2),
            env_extra={"COMPLEXITY_DIST_DUMP_WEIGHTS": str(root / name / "w")})
    return root


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_to_hf_equals_the_gathered_weights(runs, name, tmp_path):
    from safetensors.torch import load_file

    from complexity_dist.convert.keys import hf_keys, source_name
    from complexity_dist.convert.reader import model_config_of, find_checkpoint

    step_dir = runs / name / f"checkpoints/step_{SAVED:08d}"
    run([*train_cmd(tmp_path, tmp_path)[:1], "-m", "complexity_dist", "convert", "to-hf", str(step_dir),
         str(tmp_path / "hf"), "--dtype", "fp32", "--shard-size", "200KB"])
    index = json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())["weight_map"]
    hf = {}
    for f in sorted(set(index.values())):
        hf.update(load_file(tmp_path / "hf" / f))
    want = torch.load(runs / name / f"w/step_{SAVED}.pt", map_location="cpu", weights_only=True)
    cfg = model_config_of(find_checkpoint(step_dir))
    trained = [k for k in hf_keys(cfg) if k.trained]
    assert len(trained) > 30
    for k in trained:  # the export is the run's own full weights, bit for bit
        assert torch.equal(hf[k.name], want[source_name(cfg, k.name)]), k.name


@pytest.mark.parametrize("case", list(RESUMES))
def test_resume_under_another_layout_continues_the_run(runs, case, tmp_path, dataset):  # noqa: F811
    name, overrides, nproc = RESUMES[case]
    split = _split_at(runs / name, tmp_path / "split", SAVED)
    proc = run(train_cmd(split, dataset, *COMMON, *overrides, nproc=nproc),
               env_extra={"COMPLEXITY_DIST_DUMP_WEIGHTS": str(tmp_path / "w")})
    assert "Traceback" not in proc.stderr
    full, resumed = metrics(runs / name), metrics(split)
    assert [r["step"] for r in resumed] == list(range(SAVED + 1, STEPS + 1))
    # step 3's loss needs the weights only; step 4's loss and the final weights also need Adam's moments and
    # step count (zeroed moments move every element by ~lr at step 3, 300x the tolerance)
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in resumed], dtype=torch.float64),
                                   torch.tensor([r[key] for r in full[SAVED:]], dtype=torch.float64),
                                   rtol=1e-5, atol=0, msg=lambda m: f"{key}: {m}")
    assert resumed[-1]["tokens"] == full[-1]["tokens"]
    got = torch.load(tmp_path / f"w/step_{STEPS}.pt", map_location="cpu", weights_only=True)
    want = torch.load(runs / name / f"w/step_{STEPS}.pt", map_location="cpu", weights_only=True)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")
