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
import json

import pytest
import torch
from test_reshard import _split_at
from test_train import dataset, metrics, run, train_cmd  # noqa: F401  (dataset is a fixture)

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


def assert_continues(resumed_dir, full_dir, first: int):
    """Steps first..STEPS of `resumed_dir` equal the uninterrupted run's: losses and gradient norms within 1e-5
    relative, final weights within 1e-5. The first resumed step needs the weights only; the next one also
    Adam's moments and step count (zeroed moments would move every element by ~lr)."""
    full, resumed = metrics(full_dir), metrics(resumed_dir)
    assert [r["step"] for r in resumed] == list(range(first, STEPS + 1))
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in resumed], dtype=torch.float64),
                                   torch.tensor([r[key] for r in full[first - 1:]], dtype=torch.float64),
                                   rtol=1e-5, atol=0, msg=lambda m: f"{key}: {m}")
    assert resumed[-1]["tokens"] == full[-1]["tokens"]
    got = torch.load(resumed_dir / f"w/step_{STEPS}.pt", map_location="cpu", weights_only=True)
    want = torch.load(full_dir / f"w/step_{STEPS}.pt", map_location="cpu", weights_only=True)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_to_hf_from_the_pipeline_checkpoint_equals_the_gathered_weights(pp2, tmp_path):
    from safetensors.torch import load_file

    from complexity_dist.convert.keys import hf_keys, source_name
    from complexity_dist.convert.reader import CheckpointReader, find_checkpoint, model_config_of

    step_dir = pp2 / f"checkpoints/step_{SAVED:08d}"
    assert {"layer_00-model_states.pt", "mp_rank_01_model_states.pt",
            "zero_pp_rank_0_mp_rank_01_optim_states.pt"} <= {f.name for f in step_dir.iterdir()}
    run([*train_cmd(tmp_path, tmp_path)[:1], "-m", "complexity_dist", "convert", "to-hf", str(step_dir),
         str(tmp_path / "hf"), "--dtype", "fp32", "--shard-size", "200KB"])
    index = json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())["weight_map"]
    hf = {}
    for f in sorted(set(index.values())):
        hf.update(load_file(tmp_path / "hf" / f))
    want = torch.load(pp2 / f"w/step_{SAVED}.pt", map_location="cpu", weights_only=True)
    saved = find_checkpoint(step_dir)
    cfg = model_config_of(saved)
    trained = [k for k in hf_keys(cfg) if k.trained]
    assert len(trained) > 30
    for k in trained:  # the export is the run's own full weights, bit for bit, from both stages' files
        assert torch.equal(hf[k.name], want[source_name(cfg, k.name)]), k.name
    # the tied embedding is stepped on both stages: the last stage's copy (not the one read) is the same
    reader = CheckpointReader(saved)
    assert [f.file.name for f in reader.plan.fragments["model.embed_tokens.weight"]] == \
        ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert {f.file.name for f in reader.plan.fragments["model.norm.weight"]} == \
        {"zero_pp_rank_0_mp_rank_01_optim_states.pt"}


def test_pipeline_checkpoint_resumes_as_data_parallel(pp2, dp):
    assert_continues(dp, pp2, SAVED + 1)


def test_data_parallel_checkpoint_resumes_under_pipeline_parallel(pp2, dp, tmp_path, dataset):  # noqa: F811
    """Into pp > 1: each stage sets the parameters it holds (the tied embedding on both), from a ZeRO-3
    checkpoint of one process."""
    back = _split_at(dp, tmp_path / "back", SAVED + 1)
    proc = run(train_cmd(back, dataset, *COMMON, *PP2, nproc=2),
               env_extra={"COMPLEXITY_DIST_DUMP_WEIGHTS": str(back / "w")})
    assert "Traceback" not in proc.stderr
    assert_continues(back, pp2, SAVED + 2)
