"""Pipeline-parallel checkpoints read back (complexity_dist/convert/reader.py `_zero12_plan` with
parallel.pp > 1: DeepSpeed's per-stage ZeRO-1 optimizer files, named by its PipelineModule): exported by
`convert to-hf`, and resumed under another layout (complexity_dist/train/reshard.py), Adam moments included:
PP2 -> data parallel on one process -> PP2 again.

    pp2       2 processes, parallel.pp=2, ZeRO 1, 4 steps, a checkpoint at step 2: the uninterrupted run
    dp        pp2's step-2 checkpoint resumed on 1 process under ZeRO 3 (steps 3, 4; a checkpoint at step 3)
    back      dp's step-3 checkpoint resumed under parallel.pp=2 (step 4)

Every launch writes its gathered full weights after every step (COMPLEXITY_DIST_DUMP_WEIGHTS,
pipeline.full_state_dict under pp). The tiny model's tied embedding/lm_head lives on both stages; stage 1
holds decoder layer 1 and the final norm. gloo, fp32, micro_batch 1 (4 micro-batches a step everywhere).
"""
import pytest
from test_reshard import _split_at, assert_continues, assert_exports_the_dumped_weights
from test_train import dataset, run, train_cmd  # noqa: F401  (dataset is a fixture)

SAVED, STEPS = 2, 4
COMMON = ["model.mu_router=straight_through", "optim.weight_decay=0", "train.precision=fp32",
          "train.micro_batch=1", f"train.steps={STEPS}", f"checkpoint.every={SAVED}", "checkpoint.keep_last=5"]
PP2 = ["parallel.pp=2", "parallel.zero_stage=1"]


@pytest.fixture(scope="module")
def pp2(tmp_path_factory, dataset):  # noqa: F811
    root = tmp_path_factory.mktemp("reshard-pipeline") / "pp2"
    run(train_cmd(root, dataset, *COMMON, *PP2, nproc=2), env_extra={"COMPLEXITY_DIST_DUMP_WEIGHTS": str(root / "w")})
    return root


@pytest.fixture(scope="module")
def dp(pp2, tmp_path_factory, dataset):  # noqa: F811
    split = _split_at(pp2, tmp_path_factory.mktemp("reshard-pipeline-dp") / "dp", SAVED)
    proc = run(train_cmd(split, dataset, *COMMON, "checkpoint.every=3", "parallel.zero_stage=3"),
               env_extra={"COMPLEXITY_DIST_DUMP_WEIGHTS": str(split / "w")})
    assert "Traceback" not in proc.stderr
    return split


def test_to_hf_from_the_pipeline_checkpoint_equals_the_gathered_weights(pp2, tmp_path):
    from complexity_dist.convert.reader import CheckpointReader, find_checkpoint

    step_dir = pp2 / f"checkpoints/step_{SAVED:08d}"
    assert {"layer_00-model_states.pt", "mp_rank_01_model_states.pt",
            "zero_pp_rank_0_mp_rank_01_optim_states.pt"} <= {f.name for f in step_dir.iterdir()}
    # read from both stages' files
    assert_exports_the_dumped_weights(step_dir, pp2 / f"w/step_{SAVED}.pt", tmp_path)
    # the tied embedding is stepped on both stages: the last stage's copy (not the one read) is the same
    reader = CheckpointReader(find_checkpoint(step_dir))
    assert [f.file.name for f in reader.plan.fragments["model.embed_tokens.weight"]] == \
        ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert {f.file.name for f in reader.plan.fragments["model.norm.weight"]} == \
        {"zero_pp_rank_0_mp_rank_01_optim_states.pt"}


def test_pipeline_checkpoint_resumes_as_data_parallel(pp2, dp):
    assert_continues(dp, pp2, SAVED + 1, STEPS)


def test_data_parallel_checkpoint_resumes_under_pipeline_parallel(pp2, dp, tmp_path, dataset):  # noqa: F811
    """Into pp > 1: each stage sets the parameters it holds (the tied embedding on both), from a ZeRO-3
    checkpoint of one process."""
    back = _split_at(dp, tmp_path / "back", SAVED + 1)
    proc = run(train_cmd(back, dataset, *COMMON, *PP2, nproc=2),
               env_extra={"COMPLEXITY_DIST_DUMP_WEIGHTS": str(back / "w")})
    assert "Traceback" not in proc.stderr
    assert_continues(back, pp2, SAVED + 2, STEPS)
