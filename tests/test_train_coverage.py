"""What users run, exercised in CI with few launches: one process ZeRO-0 (the reference), two processes
ZeRO-1 and ZeRO-3 (the GPU presets use ZeRO-1), selective activation checkpointing (alone and compiled),
`complexity-dist smoke`.
Every launch evaluates held-out shards, so the same runs check validation loss across dp sizes; plus the
schedule and the weight-decay groups against hand-computed values."""
import math
import sys

import pytest
import torch
from test_train import ROOT, dataset, metrics, run, train_cmd  # noqa: F401 (dataset is a fixture)

from complexity_dist.config import load_config
from complexity_dist.data import ShardIndex

STEPS, EVAL_EVERY = 6, 3
# the last shard is held out and evaluated at steps 3 and 6 (3 global batches of 4 samples each time)
COMMON = [f"train.steps={STEPS}", "data.val_shards=1", f"train.eval_every={EVAL_EVERY}", "train.eval_batches=3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset):  # noqa: F811
    """One process, ZeRO-0, micro-batch 4: what the other layouts must reproduce."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = run(train_cmd(run_dir, dataset, *COMMON, "parallel.zero_stage=0"))
    return run_dir, proc


@pytest.fixture(scope="module")
def zero1(tmp_path_factory, dataset):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("z1") / "run"
    # steps 4-5 under torch.profiler on both ranks: the losses below must not notice
    run(train_cmd(run_dir, dataset, *COMMON, "parallel.zero_stage=1", "checkpoint.enabled=false",
                  "train.profile_start=4", "train.profile_steps=2", nproc=2))
    return run_dir


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, dataset):  # noqa: F811
    """ZeRO-3 with micro-batch 1: gradient accumulation 2, and the evaluation forward through the
    engine's parameter-gathering hooks."""
    run_dir = tmp_path_factory.mktemp("z3") / "run"
    run(train_cmd(run_dir, dataset, *COMMON, "parallel.zero_stage=3", "train.micro_batch=1",
                  "checkpoint.enabled=false", nproc=2))
    return run_dir


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("layout", ["zero1", "zero3"])
def test_two_processes_reproduce_one_process(request, reference, layout):
    """Same global batch, same data per step: ZeRO-1/3 on 2 processes vs ZeRO-0 on 1 agree to fp32
    rounding, losses and validation losses alike."""
    ref, got = metrics(reference[0]), metrics(request.getfixturevalue(layout))
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, ref):
        assert _rel(a["loss"], b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
        assert _rel(a["lr"], b["lr"]) < 1e-12
    assert ref[-1]["loss"] < ref[0]["loss"]  # it trained
    evaluated = [(a["step"], a["val_loss"], b["val_loss"]) for a, b in zip(got, ref) if "val_loss" in b]
    assert [s for s, _, _ in evaluated] == [3, 6]
    for step, mine, theirs in evaluated:
        assert _rel(mine, theirs) < 1e-6, (step, mine, theirs)
    assert evaluated[1][2] < evaluated[0][2]  # held-out loss fell too


def test_profiled_steps_write_reports_on_every_rank(zero1):
    """train.profile_start/profile_steps: each rank writes the reports of `bench --profile` for its own part of
    the layout (here two data-parallel ranks on CPU: operators' time, and no device to wait)."""
    for rank in (0, 1):
        out = zero1 / "profile" / f"rank_{rank}"
        assert (out / "kinds.txt").read_text().startswith("CPU (operators) time over 2 steps by kind")
        assert "aten::" in (out / "top_kernels.txt").read_text()
        assert (out / "idle.txt").read_text().startswith("no device activity")
        assert (out / "trace.json.gz").stat().st_size > 0
    assert sorted(p.name for p in (zero1 / "profile").iterdir()) == ["rank_0", "rank_1"]


def test_rows_carry_validation_loss_and_peak_memory(reference, zero3):
    run_dir, proc = reference
    for rows in (metrics(run_dir), metrics(zero3)):
        for r in rows:
            assert ("val_loss" in r) == (r["step"] % EVAL_EVERY == 0), r
            if "val_loss" in r:
                assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-9)
                assert 0 < r["val_loss"] < math.log(512) + 1
        peaks = [r["peak_mem_gib"] for r in rows]
        # on CPU: the peak RSS of rank 0's process (interpreter, torch and DeepSpeed included)
        assert all(0.05 < p < 64 for p in peaks) and peaks == sorted(peaks), peaks
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith(f"step {EVAL_EVERY}/"))
    assert "| val_loss " in line and "| val_ppl " in line, line


def test_trainer_never_reads_the_heldout_shard(reference, dataset):  # noqa: F811
    """The training loader of a real run covers the training shards only: its saved state names the
    part (not the whole dataset) and an epoch of the training shards' samples."""
    run_dir, _ = reference
    state = torch.load(run_dir / f"checkpoints/step_{STEPS:08d}/rank_00000.pt", weights_only=False)["loader"]
    index = ShardIndex.load(dataset)
    assert state["samples_per_epoch"] == index.num_samples - index.shards[-1].samples
    assert state["dataset"] != index.fingerprint


def test_selective_activation_checkpointing_trains_like_plain(tmp_path, reference, dataset):  # noqa: F811
    """train.activation_checkpointing=selective through the whole training path: the same losses as the
    reference run, which keeps every activation (recomputing the elementwise work changes no value)."""
    run_dir = tmp_path / "run"
    run(train_cmd(run_dir, dataset, *COMMON, "parallel.zero_stage=0", "train.activation_checkpointing=selective",
                  "checkpoint.enabled=false"))
    plain, selective = metrics(reference[0]), metrics(run_dir)
    assert len(selective) == STEPS
    for a, b in zip(selective, plain):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a["step"], a["loss"], b["loss"])


def test_compile_and_activation_checkpointing_train_like_plain(tmp_path, reference, dataset):  # noqa: F811
    """Selective checkpointing compiled inside each layer (the layer's compiled forward traces the checkpoint
    and its policy, as torchtitan compiles its checkpointed blocks)."""
    run_dir = tmp_path / "run"
    run(train_cmd(run_dir, dataset, f"train.steps={STEPS}", "data.val_shards=1", "train.compile=true",
                  "train.activation_checkpointing=selective", "checkpoint.enabled=false"))
    plain, fused = metrics(reference[0]), metrics(run_dir)
    assert len(fused) == STEPS
    for a, b in zip(fused, plain):
        # the compiler fuses elementwise work (other rounding), recomputation must change nothing
        assert _rel(a["loss"], b["loss"]) < 1e-4, (a["step"], a["loss"], b["loss"])


def test_smoke_command(tmp_path):
    proc = run([sys.executable, "-m", "complexity_dist", "smoke", str(ROOT / "configs/tiny.yaml"), "model.vocab_size=512",
                "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
                "--steps", "3"])
    losses = [float(ln.split()[-1]) for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(512), rel=0.05)  # random init: about uniform over the vocab
    assert losses[-1] < losses[0]
    assert proc.stdout.splitlines()[-1].startswith("ok: ")
    bad = run([sys.executable, "-m", "complexity_dist", "smoke", str(ROOT / "configs/tiny.yaml"), "model.hidden_size=30"],
              check=False)
    assert bad.returncode == 2 and "hidden_size=30" in bad.stderr and "Traceback" not in bad.stderr


def test_lr_schedule_against_hand_computed_values():
    from complexity_dist.train.schedule import lr_at

    optim = load_config(None, ["optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=4"]).optim
    total = 14  # steps 0..13: warmup 0..3, cosine from step 4 (lr) to step 13 (min_lr)
    want = {0: 2.5e-4, 1: 5e-4, 3: 1e-3, 4: 1e-3,
            7: 1e-4 + 0.5 * 9e-4 * 1.5,  # a third of the way: cos(pi/3) = 0.5
            13: 1e-4, 20: 1e-4}
    for step, lr in want.items():
        assert lr_at(step, optim, total) == pytest.approx(lr, rel=1e-12), step
    lrs = [lr_at(s, optim, total) for s in range(4, total)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # strictly decreasing after warmup
    no_warmup = load_config(None, ["optim.lr=1e-3", "optim.min_lr=0", "optim.warmup_steps=0"]).optim
    assert [lr_at(s, no_warmup, 3) for s in range(3)] == pytest.approx([1e-3, 5e-4, 0.0], abs=1e-15)


def test_weight_decay_groups():
    from complexity_dist.model import ComplexityForCausalLM, count_parameters
    from complexity_dist.parallel.deepspeed_engine import param_groups

    cfg = load_config(None, ["model.vocab_size=97", "model.hidden_size=32", "model.intermediate_size=48",
                             "model.num_hidden_layers=2", "model.num_attention_heads=4",
                             "model.num_key_value_heads=2"])
    model = ComplexityForCausalLM(cfg.model)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    # the tied embedding / LM head is one tensor, listed once
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == count_parameters(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = {id(p): n for n, p in model.named_parameters()}
    got_no_decay = sorted(names[id(p)] for p in no_decay["params"])
    per_layer = ["dynamics.controller_in.bias", "dynamics.controller_out.bias", "dynamics.mu",
                 "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.k_norm.weight",
                 "self_attn.q_norm.weight"]
    # mu_router too: with hard routing (the default) its gradient is an exact zero and it must stay as it is
    per_layer.append("mlp.mu_router.weight")
    assert got_no_decay == sorted([f"model.layers.{i}.{n}" for i in range(2) for n in per_layer]
                                  + ["model.norm.weight"])
    trained = ComplexityForCausalLM(load_config(None, ["model.mu_router=straight_through"]).model)
    trained_decay = {id(p) for p in param_groups(trained, 0.1)[0]["params"]}
    # a trained router decays like any matrix
    assert id(trained.model.layers[1].mlp.mu_router.weight) in trained_decay
    got_decay = {names[id(p)] for p in decay["params"]}
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.gate_up_proj",
                 "model.layers.1.mlp.down_proj", "model.layers.1.dynamics.mu_proj.weight", "model.layers.1.dynamics.controller_out.weight"):
        assert name in got_decay, name
