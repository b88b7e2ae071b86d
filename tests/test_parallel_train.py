"""Model parallelism in the training loop, proven equal to one process: `complexity-dist train` under
torchrun with gloo on CPU, a tiny fp32 model, against a 1-process run on the same global batch.

Every launch writes its full weights (gathered from the shards by rank 0) at the start and after every step
(COMPLEXITY_DIST_DUMP_WEIGHTS); the launches run once per module and serve several tests:

    ref        1 process, ZeRO 1                      the reference (5 steps)
    ref0       1 process, ZeRO 1, router_base_margin 0 the reference with the mu override moving tokens
    tp2        TP2, ZeRO 1 (5 steps)                  parity; the uninterrupted twin of tp2_split
    tp2_split  TP2, ZeRO 1, preempted at 3, resumed   bit-exact resume under TP
    tp2_sp     TP2 + sequence parallel, ZeRO 1, 4 micro-batches   parity
    tp2_sp_etp1  the same with whole experts on each TP rank (parallel.expert_tensor_parallel=false): parity,
               its checkpoint read back
    ep2        EP2 (dp 2), ZeRO 1                     parity
    ep2_moved  EP2 (dp 2), ZeRO 2, margin 0           parity with tokens moved by the override; MLflow metric
    tp2ep2     4 processes: TP2 x EP2 (dp 2), ZeRO 1, preempted at 3 and resumed: parity, expert rows survive
    tp2ep2_sp  4 processes: TP2 x EP2 + sequence parallel, ZeRO 2, margin 0, speculative routing: parity with ref0
    tp2ep2_sp_etp1  the same with whole experts on each TP rank, dispatched from each rank's own tokens
    ref_hard_compiled / tp2_sp_hard_compiled   1 process / TP2 + SP with the overlapped attention projections,
                                               compiled layers, hard routing, ZeRO 2
    ep2_hard_compiled                     EP2, compiled layers, hard routing, ZeRO 2: a new routing plan (and row
                                          counts) every micro-batch inside compiled layers
    ref_bf16 / tp2_sp_bf16 / ep2_bf16   bf16 (fp32 gradient sums), 3 steps: 1 process / TP2 + SP over 4
                                        micro-batches / EP2: parity within bf16 rounding
    dp2_bf16 / dp2_bf16_grad_overlap    DP2, ZeRO 2, bf16, 2 micro-batches a rank, each one's gradient reduction
                                        after its backward / inside it in small buckets (parallel.overlap_grad_reduce):
                                        bit-equal
    ep2_grad_overlap / tp2_sp_grad_overlap   the overlapped reduction with EP2 and TP2 + SP (ZeRO 2): parity

All runs but the *_hard_compiled pair: mu_router straight_through (so the router trains too) and weight decay 0, so a parameter that moved
got a gradient (Adam moves nothing with zero gradients and zero moments).
"""
import json
from pathlib import Path

import pytest
import torch

from test_train import ROOT, dataset, metrics, run, train_cmd  # noqa: F401  (dataset is a fixture)

STEPS = 5
COMMON = ["model.mu_router=straight_through", "optim.weight_decay=0", "train.precision=fp32",
          "parallel.zero_stage=1", f"train.steps={STEPS}", "checkpoint.every=100", "data.val_shards=1",
          "train.eval_every=3", "train.eval_batches=1"]
# losses and gradient norms: 1e-5 relative. Weights after several AdamW steps: AdamW divides by sqrt(v), so an
# element with a near-zero gradient moves by ~lr whatever the last bits of that gradient; differences of
# summation order (all-reduce vs one GEMM) show as ~1e-6 absolute there. atol 1e-5 is 1/300 of one step.
LOSS_TOL = dict(rtol=1e-5, atol=0.0)
WEIGHT_TOL = dict(rtol=1e-5, atol=1e-5)


def launch(root: Path, name: str, dataset: Path, *overrides: str, nproc: int = 2, env=None, check=True,
           dump: str = "w"):
    return run(train_cmd(root / name, dataset, *COMMON, *overrides, nproc=nproc),
               env_extra={"COMPLEXITY_DIST_DUMP_WEIGHTS": str(root / name / dump), **(env or {})}, check=check)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset):  # noqa: F811
    root = tmp_path_factory.mktemp("parallel-train")
    launch(root, "ref", dataset, nproc=1)
    launch(root, "ref0", dataset, "model.router_base_margin=0", "train.steps=3", nproc=1)
    launch(root, "tp2", dataset, "parallel.tp=2")
    preempt = {"COMPLEXITY_DIST_PREEMPT_AT": "3"}
    assert launch(root, "tp2_split", dataset, "parallel.tp=2", env=preempt, check=False).returncode != 0
    launch(root, "tp2_split", dataset, "parallel.tp=2", dump="w_resumed")
    # ZeRO 1 and 4 micro-batches: the replicated parameters' partial gradients accumulate on each rank and are
    # summed over tp once per step (deferred); ZeRO 2 (tp2ep2_sp, the compiled pair) sums them in backward
    launch(root, "tp2_sp", dataset, "parallel.tp=2", "parallel.sequence_parallel=true", "train.micro_batch=1",
           "train.steps=3")
    launch(root, "tp2_sp_etp1", dataset, "parallel.tp=2", "parallel.sequence_parallel=true",
           "parallel.expert_tensor_parallel=false", "train.micro_batch=1", "train.steps=3")
    # speculative routing (one check per forward): without moved tokens, and with them (every forward reruns)
    launch(root, "ep2", dataset, "parallel.ep=2", "train.steps=3", "parallel.ep_speculative_routing=true")
    launch(root, "ep2_moved", dataset, "parallel.ep=2", "parallel.zero_stage=2", "model.router_base_margin=0",
           "train.steps=3", "tracking.enabled=true", "parallel.ep_speculative_routing=true")
    four = ["parallel.tp=2", "parallel.ep=2"]
    assert launch(root, "tp2ep2", dataset, *four, nproc=4, env=preempt, check=False).returncode != 0
    launch(root, "tp2ep2", dataset, *four, nproc=4, dump="w_resumed")
    # the base route under SP runs the same compute as tp2ep2 (the SP wrapper hands EP one process's tokens in
    # one process's order); what SP adds is routing on slices and the override's plans: margin 0 moves tokens;
    # speculative routing, so every forward reruns checked
    launch(root, "tp2ep2_sp", dataset, *four, "parallel.sequence_parallel=true", "parallel.zero_stage=2",
           "model.router_base_margin=0", "train.steps=3", "parallel.ep_speculative_routing=true", nproc=4)
    launch(root, "tp2ep2_sp_etp1", dataset, *four, "parallel.sequence_parallel=true", "parallel.zero_stage=2",
           "parallel.expert_tensor_parallel=false", "model.router_base_margin=0", "train.steps=3",
           "parallel.ep_speculative_routing=true", nproc=4)
    # compiled layers with hard routing (the presets' setting): mu_router's gradient is an exact zero, which
    # DeepSpeed's ZeRO 2 hooks and SP's reduction of replicated gradients need (None crashed them when compiled)
    hard = ["model.mu_router=hard", "train.compile=true", "parallel.zero_stage=2", "train.steps=3"]
    launch(root, "ref_hard_compiled", dataset, *hard, nproc=1)
    # with the overlapped attention projections (complexity_dist/parallel/overlap.py) compiled
    launch(root, "tp2_sp_hard_compiled", dataset, *hard, "parallel.tp=2", "parallel.sequence_parallel=true",
           "parallel.tp_comm_overlap=true")
    launch(root, "ep2_hard_compiled", dataset, *hard, "parallel.ep=2", "train.micro_batch=1")
    # bf16, where ZeRO 1 sums the micro-batches' gradients in fp32 outside .grad (grad_accum): TP + SP over 4
    # micro-batches sums its replicated parameters' partial gradients over those once per step; EP2 reduces its
    # expert groups over their own data-parallel group
    bf16 = ["train.precision=bf16", "train.steps=3"]
    launch(root, "ref_bf16", dataset, *bf16, nproc=1)
    launch(root, "tp2_sp_bf16", dataset, *bf16, "parallel.tp=2", "parallel.sequence_parallel=true",
           "train.micro_batch=1")
    launch(root, "ep2_bf16", dataset, *bf16, "parallel.ep=2")
    # ZeRO 2's data-parallel reduction inside each micro-batch's backward (DeepSpeed's overlap_comm), in buckets
    # small enough that the tiny model's gradients fill several
    overlap = ["parallel.overlap_grad_reduce=true", "parallel.grad_bucket_size=5000", "parallel.zero_stage=2",
               "train.steps=3", "train.micro_batch=1"]
    launch(root, "dp2_bf16", dataset, *bf16, "parallel.zero_stage=2", "train.micro_batch=1")
    launch(root, "dp2_bf16_grad_overlap", dataset, *bf16, *overlap)
    launch(root, "ep2_grad_overlap", dataset, *overlap, "parallel.ep=2")
    launch(root, "tp2_sp_grad_overlap", dataset, *overlap, "parallel.tp=2", "parallel.sequence_parallel=true")
    return root


def weights(root: Path, name: str, step: int, dump: str = "w") -> dict:
    return torch.load(root / name / dump / f"step_{step}.pt", map_location="cpu", weights_only=True)


def assert_resume_bit_exact(root: Path, name: str, steps: int):
    """`{name}_split` (preempted, then resumed from its checkpoint) logs and ends exactly as the uninterrupted
    `name`: every step's loss, gradient norm and validation loss, and the final weights, bit for bit."""
    full, split = metrics(root / name), metrics(root / f"{name}_split")
    assert [r["step"] for r in split] == list(range(1, steps + 1))
    for key in ("loss", "grad_norm", "val_loss"):
        assert [r.get(key) for r in split] == [r.get(key) for r in full], key
    resumed, uninterrupted = weights(root, f"{name}_split", steps, "w_resumed"), weights(root, name, steps)
    for k in uninterrupted:
        assert torch.equal(resumed[k], uninterrupted[k]), k


def assert_parity(root: Path, name: str, ref: str = "ref", steps: int = 3):
    got, want = metrics(root / name)[:steps], metrics(root / ref)[:steps]
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in got], dtype=torch.float64),
                                   torch.tensor([r[key] for r in want], dtype=torch.float64), **LOSS_TOL,
                                   msg=lambda m: f"{name} {key}: {m}")
    torch.testing.assert_close(torch.tensor(got[2]["val_loss"]), torch.tensor(want[2]["val_loss"]), **LOSS_TOL)
    first, last = weights(root, name, 0), weights(root, name, steps)
    ref_first, ref_last = weights(root, ref, 0), weights(root, ref, steps)
    assert first.keys() == ref_first.keys() and last.keys() == ref_last.keys()
    for k in ref_first:
        assert torch.equal(first[k], ref_first[k]), f"{name}: initial {k} differs from one process"
        torch.testing.assert_close(last[k], ref_last[k], **WEIGHT_TOL, msg=lambda m: f"{name} {k}: {m}")
        # every parameter got a gradient: with weight decay 0 a parameter only moves with a gradient
        assert not torch.equal(last[k], first[k]), f"{name}: {k} never moved (no gradient)"


@pytest.mark.parametrize("name", ["tp2", "tp2_sp", "tp2_sp_etp1", "ep2", "tp2ep2"])
def test_layout_equals_one_process(runs, name):
    assert_parity(runs, name)
    # the base route only: no token moved by the mu override, on any rank, in any layer
    assert all(r["routed_override_frac"] == 0.0 for r in metrics(runs / name))


@pytest.mark.parametrize("name", ["tp2_sp_bf16", "ep2_bf16", "dp2_bf16"])
def test_bf16_layout_equals_one_process(runs, name):
    """bf16 with the fp32 gradient sums (complexity_dist/parallel/deepspeed_engine.py): losses and gradient norms
    equal one process's within bf16 rounding (a TP sum over the wrong attribute would leave each rank its own
    half of the replicated gradients)."""
    got, want = metrics(runs / name), metrics(runs / "ref_bf16")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3]
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in got], dtype=torch.float64),
                                   torch.tensor([r[key] for r in want], dtype=torch.float64), rtol=1e-2, atol=0.0,
                                   msg=lambda m: f"{name} {key}: {m}")


def test_overlapped_grad_reduction_equals_the_reduction_after_backward(runs):
    """parallel.overlap_grad_reduce: ZeRO 2's reduction of each micro-batch's gradients bucket by bucket as its
    backward produces them (DeepSpeed's overlap_comm) instead of after it: bit for bit the same losses, norms and
    weights (bf16, fp32 sums, 2 micro-batches a rank); and with EP2 (expert and shared groups) and TP2 + SP (after
    the TP-partial sums), one process's training."""
    after, inside = metrics(runs / "dp2_bf16"), metrics(runs / "dp2_bf16_grad_overlap")
    assert [r["step"] for r in inside] == [1, 2, 3]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in inside] == [r[key] for r in after], key
    want, got = weights(runs, "dp2_bf16", 3), weights(runs, "dp2_bf16_grad_overlap", 3)
    first = weights(runs, "dp2_bf16", 0)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert sum(not torch.equal(want[k], first[k]) for k in want) > len(want) // 2  # the steps moved the weights
    # (and dp2_bf16 is one process's training: test_bf16_layout_equals_one_process)
    assert_parity(runs, "ep2_grad_overlap")
    assert_parity(runs, "tp2_sp_grad_overlap")


@pytest.mark.parametrize("name", ["tp2_sp_hard_compiled", "ep2_hard_compiled"])
def test_compiled_layout_with_hard_routing(runs, name):
    got, want = metrics(runs / name), metrics(runs / "ref_hard_compiled")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3]
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in got]), torch.tensor([r[key] for r in want]),
                                   **LOSS_TOL, msg=lambda m: f"{key}: {m}")
    first, last = weights(runs, name, 0), weights(runs, name, 3)
    ref_last = weights(runs, "ref_hard_compiled", 3)
    for k in ref_last:
        torch.testing.assert_close(last[k], ref_last[k], **WEIGHT_TOL, msg=lambda m: f"{k}: {m}")
        # argmax routing: mu_router stays exactly as initialised, everything else trains
        assert torch.equal(last[k], first[k]) == k.endswith("mlp.mu_router.weight"), k


def test_expert_parallel_with_tokens_moved_by_the_override(runs):
    from mlflow import MlflowClient

    assert_parity(runs, "ep2_moved", ref="ref0")
    got, want = metrics(runs / "ep2_moved"), metrics(runs / "ref0")
    fracs = [r["routed_override_frac"] for r in got]
    assert all(f > 0.3 for f in fracs), fracs  # mu_router decides: most tokens leave token_id % E
    torch.testing.assert_close(torch.tensor(fracs), torch.tensor([r["routed_override_frac"] for r in want]),
                               rtol=1e-6, atol=1e-6)
    run_dir = runs / "ep2_moved"
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    history = client.get_metric_history((run_dir / "mlflow_run_id").read_text().strip(), "routed_override_frac")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(fracs)


@pytest.mark.parametrize("name", ["tp2ep2_sp", "tp2ep2_sp_etp1"])
def test_tp_x_ep_with_sequence_parallel_and_tokens_moved_by_the_override(runs, name):
    assert_parity(runs, name, ref="ref0")
    # each rank's share is over its sequence slice; their mean is the share of the whole batch
    fracs = [r["routed_override_frac"] for r in metrics(runs / name)]
    assert all(f > 0.3 for f in fracs), fracs
    torch.testing.assert_close(torch.tensor(fracs), torch.tensor([r["routed_override_frac"]
                                                                  for r in metrics(runs / "ref0")]),
                               rtol=1e-6, atol=1e-6)


def test_resume_under_tensor_parallel_is_bit_exact(runs):
    assert_resume_bit_exact(runs, "tp2", STEPS)
    ckpt = runs / "tp2_split/checkpoints/step_00000003"
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= {f.name for f in ckpt.iterdir()}
    assert json.loads((ckpt / "config.json").read_text())["parallel"]["tp"] == 2


def test_expert_rows_survive_save_and_load(runs):
    """TP2 x EP2: the weights right after loading step 3 are the saved ones bit for bit (each EP rank's own
    experts, not rank 0's), and training continues equal to one process."""
    before, after = weights(runs, "tp2ep2", 3), weights(runs, "tp2ep2", 3, "w_resumed")
    for k in before:
        assert torch.equal(before[k], after[k]), k
    rows, ref = metrics(runs / "tp2ep2"), metrics(runs / "ref")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in rows]), torch.tensor([r["loss"] for r in ref]),
                               **LOSS_TOL)
    final, ref_final = weights(runs, "tp2ep2", STEPS, "w_resumed"), weights(runs, "ref", STEPS)
    for k in ref_final:
        torch.testing.assert_close(final[k], ref_final[k], **WEIGHT_TOL, msg=lambda m: f"{k}: {m}")


def test_tp_x_ep_checkpoint_reads_back_as_the_gathered_weights(runs):
    """The reader of `convert to-hf` and resharding (complexity_dist/convert/reader.py) assembles TP2 x EP2's
    step-3 checkpoint (4 model/expert pieces a tensor) into the run's own gathered weights, bit for bit."""
    from complexity_dist.convert.reader import CheckpointReader, find_checkpoint

    reader = CheckpointReader(find_checkpoint(runs / "tp2ep2/checkpoints/step_00000003"))
    want = weights(runs, "tp2ep2", 3)
    names = [k for k in want if k != "lm_head.weight"]  # tied: the embedding
    assert any(len(reader.plan.pieces[k]) == 4 for k in names)
    for name, value in reader.read(names):
        assert torch.equal(value, want[name]), name


def test_whole_expert_checkpoint_reads_back_as_the_gathered_weights(runs):
    """TP2 + SP with whole experts on each rank: the reader takes the experts whole from the checkpoint (as the
    saved config says) and the sharded projections joined, equal to the run's own gathered weights."""
    from complexity_dist.convert.reader import CheckpointReader, find_checkpoint

    reader = CheckpointReader(find_checkpoint(runs / "tp2_sp_etp1/checkpoints/step_00000003"))
    want = weights(runs, "tp2_sp_etp1", 3)
    names = [k for k in want if k != "lm_head.weight"]  # tied: the embedding
    assert any(k.endswith("gate_up_proj") for k in names)
    for name, value in reader.read(names):
        assert torch.equal(value, want[name]), name


def test_resume_into_pipeline_parallel_passes_preflight(runs, dataset):  # noqa: F811
    # (resumes into and out of pp > 1, run and compared: tests/test_reshard_pipeline.py)
    # `info --preflight` runs the 2-process run's checks in this process (what launchers do before queueing):
    # the TP2 checkpoint is planned for a PP2 resume, no refusal
    cmd = [*train_cmd(runs / "tp2_split", dataset, *COMMON, "train.steps=6", "parallel.pp=2"), "--preflight",
           "--world-size", "2"]
    proc = run([x if x != "train" else "info" for x in cmd], check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "preflight ok: resumes from" in proc.stdout, proc.stdout[-3000:]
