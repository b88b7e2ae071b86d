"""Tensor parallel under ZeRO 3, and expert x data parallel on 4 processes, proven equal to one
process through `complexity-dist train` under torchrun with gloo on CPU (the method of
tests/test_parallel_train.py: full weights dumped by rank 0 at the start and after every step).

    ref         1 process, ZeRO 1                                  the reference
    ref0        1 process, ZeRO 1, router_base_margin 0            the reference with the mu override moving tokens
    tp2_z3      TP2, ZeRO 3 (dp 1)                                 parity; the uninterrupted twin of tp2_z3_split
    tp2_z3_split  the same, preempted at step 2 and resumed         bit-exact resume under TP x ZeRO 3
    tp2dp2_z3   4 processes: TP2 + sequence parallel x DP2, ZeRO 3,  parity with parameters really partitioned
                every parameter partitioned
                (parallel.zero3_persistence_threshold=0)
    ep2dp2      4 processes: EP2 x DP2, ZeRO 2, margin 0            parity with tokens moved by the override

Checked by hand the same way (not in the suite, to save CI time), all with threshold 0 and 3 steps: TP2 under
ZeRO 3 with model.linear_backend=megatron, and with an untied lm_head (against an untied one-process run):
losses and gradient norms within 1e-7 relative, weights within the tolerances of tests/test_parallel_train.py;
TP2 x DP2 under ZeRO 3 (no SP) preempted at step 2 and resumed on 4 processes: bit-exact with its uninterrupted
twin.
"""
import pytest
import torch

from test_parallel_train import assert_parity, launch, weights
from test_train import metrics, dataset  # noqa: F401  (dataset is a fixture)

STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset):  # noqa: F811
    root = tmp_path_factory.mktemp("parallel-zero3")
    steps = f"train.steps={STEPS}"
    launch(root, "ref", dataset, steps, nproc=1)
    launch(root, "ref0", dataset, steps, "model.router_base_margin=0", nproc=1)
    z3 = ["parallel.tp=2", "parallel.zero_stage=3", steps]
    launch(root, "tp2_z3", dataset, *z3)
    preempt = {"COMPLEXITY_DIST_PREEMPT_AT": "2"}
    assert launch(root, "tp2_z3_split", dataset, *z3, env=preempt, check=False).returncode != 0
    launch(root, "tp2_z3_split", dataset, *z3, dump="w_resumed")
    launch(root, "tp2dp2_z3", dataset, *z3, "parallel.sequence_parallel=true", "parallel.zero3_persistence_threshold=0",
           nproc=4)
    launch(root, "ep2dp2", dataset, "parallel.ep=2", "parallel.zero_stage=2", "model.router_base_margin=0", steps,
           nproc=4)
    return root


@pytest.mark.parametrize("name", ["tp2_z3", "tp2dp2_z3"])
def test_tensor_parallel_under_zero3_equals_one_process(runs, name):
    assert_parity(runs, name, steps=STEPS)


def test_zero3_partitions_every_parameter_over_data_parallel(runs):
    """The 4-process run partitions for real: DeepSpeed got threshold 0 (no parameter stays whole between uses,
    so every forward gathers all of them, q_proj.weight read by its parent's forward included) and a
    data-parallel world of 2, as its checkpoint records."""
    ckpt = runs / f"tp2dp2_z3/checkpoints/step_{STEPS:08d}"
    for dp in range(2):
        for tp in range(2):
            states = torch.load(ckpt / f"zero_pp_rank_{dp}_mp_rank_{tp:02d}_model_states.pt", map_location="cpu",
                                weights_only=False)
            assert states["ds_config"]["zero_optimization"]["stage3_param_persistence_threshold"] == 0
            assert states["dp_world_size"] == 2 and states["mp_world_size"] == 2


def test_resume_under_tensor_parallel_zero3_is_bit_exact(runs):
    full, split = metrics(runs / "tp2_z3"), metrics(runs / "tp2_z3_split")
    assert [r["step"] for r in split] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in split] == [r[key] for r in full], key
    saved, loaded = weights(runs, "tp2_z3_split", 2), weights(runs, "tp2_z3_split", 2, "w_resumed")
    resumed, uninterrupted = weights(runs, "tp2_z3_split", STEPS, "w_resumed"), weights(runs, "tp2_z3", STEPS)
    for k in uninterrupted:
        assert torch.equal(loaded[k], saved[k]), k
        assert torch.equal(resumed[k], uninterrupted[k]), k


def test_expert_x_data_parallel_on_4_processes_with_tokens_moved(runs):
    """EP2 x DP2: each expert lives on one rank of its EP pair and is reduced over its expert-data-parallel
    pair; the mu override moves most tokens off token_id % E, so tokens really cross ranks."""
    assert_parity(runs, "ep2dp2", ref="ref0", steps=STEPS)
    got, want = metrics(runs / "ep2dp2"), metrics(runs / "ref0")
    fracs = [r["routed_override_frac"] for r in got]
    assert all(f > 0.3 for f in fracs), fracs
    torch.testing.assert_close(torch.tensor(fracs), torch.tensor([r["routed_override_frac"] for r in want]),
                               rtol=1e-6, atol=1e-6)
