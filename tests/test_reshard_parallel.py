"""Tensor- and expert-parallel checkpoints read back (complexity_dist/convert/reader.py `_zero12_plan`): exported
by `convert to-hf`, and resumed under another layout (complexity_dist/train/reshard.py), Adam moments included:
as data parallel on one process, and tensor parallel into expert parallel and back.

One 2-process launch per layout (gloo, fp32, 4 steps, a checkpoint at step 2) writes its gathered full weights
after every step (COMPLEXITY_DIST_DUMP_WEIGHTS, parallelize.full_state_dict):
    tp2   parallel.tp=2, ZeRO 1
    ep2   parallel.ep=2 (dp 2, expert-dp 1), ZeRO 2
"""
import pytest
from test_reshard import _split_at, assert_continues, assert_exports_the_dumped_weights
from test_train import ROOT, dataset, run, train_cmd  # noqa: F401  (dataset is a fixture)

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
    step_dir, dumped = runs / name / f"checkpoints/step_{SAVED:08d}", runs / name / f"w/step_{SAVED}.pt"
    assert_exports_the_dumped_weights(step_dir, dumped, tmp_path)


@pytest.mark.parametrize("case", list(RESUMES))
def test_resume_under_another_layout_continues_the_run(runs, case, tmp_path, dataset):  # noqa: F811
    name, overrides, nproc = RESUMES[case]
    split = _split_at(runs / name, tmp_path / "split", SAVED)
    proc = run(train_cmd(split, dataset, *COMMON, *overrides, nproc=nproc),
               env_extra={"COMPLEXITY_DIST_DUMP_WEIGHTS": str(split / "w")})
    assert "Traceback" not in proc.stderr
    assert_continues(split, runs / name, SAVED + 1, STEPS)
