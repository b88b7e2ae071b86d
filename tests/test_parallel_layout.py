"""Parallel layout foundations: the layout is validated in one place before any process group exists;
megatron-core's groups equal the Layout's rank arithmetic; DeepSpeed accepts our `mpu`; `info` prints per-rank counts.

One `torch.multiprocessing.spawn` of 4 gloo processes checks every layout's groups and then the DeepSpeed
engines (test_groups_and_deepspeed_mpu_on_four_processes)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from complexity_dist.cli import main
from complexity_dist.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny.yaml")

# expected memberships on 4 ranks: axis -> the groups (megatron-core order "tp-cp-ep-dp-pp")
LAYOUTS = {
    "tp2xdp2": (["parallel.tp=2"], {"tp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]], "pp": [[0], [1], [2], [3]],
                                    "ep": [[0], [1], [2], [3]], "expert_dp": [[0, 2], [1, 3]]}),
    "tp2xpp2": (["parallel.tp=2", "parallel.pp=2"],
                {"tp": [[0, 1], [2, 3]], "pp": [[0, 2], [1, 3]], "dp": [[0], [1], [2], [3]],
                 "ep": [[0], [1], [2], [3]], "expert_dp": [[0], [1], [2], [3]]}),
    "pp2xdp2": (["parallel.pp=2"], {"tp": [[0], [1], [2], [3]], "pp": [[0, 2], [1, 3]], "dp": [[0, 1], [2, 3]],
                                    "ep": [[0], [1], [2], [3]], "expert_dp": [[0, 1], [2, 3]]}),
    # ep 2 cut from dp 4: expert-parallel neighbours, expert-data-parallel strided
    "ep2xdp4": (["parallel.ep=2"], {"tp": [[0], [1], [2], [3]], "pp": [[0], [1], [2], [3]],
                                    "dp": [[0, 1, 2, 3]], "ep": [[0, 1], [2, 3]], "expert_dp": [[0, 2], [1, 3]]}),
    "tp2xep2": (["parallel.tp=2", "parallel.ep=2"],
                {"tp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]], "pp": [[0], [1], [2], [3]],
                 "ep": [[0, 2], [1, 3]], "expert_dp": [[0], [1], [2], [3]]}),
}
AXES = ("tp", "pp", "dp", "ep", "expert_dp")


def _group_of(groups: list[list[int]], rank: int) -> list[int]:
    return next(g for g in groups if rank in g)


# --- 1. validation, before any process group ---------------------------------------------------------------

@pytest.mark.parametrize("world, overrides, needles", [
    (3, ["parallel.tp=3"], ["parallel.tp=3 does not divide model.num_attention_heads=4",
                            "parallel.tp=3 does not divide model.num_key_value_heads=2",
                            "parallel.tp=3 does not divide the expert intermediate size 176"]),
    (3, ["parallel.ep=3"], ["parallel.ep=3 does not divide model.num_experts=4"]),
    (30, ["parallel.pp=30"], ["parallel.pp=30 exceeds model.num_hidden_layers=6"]),
    (3, ["parallel.tp=2"], ["world size 3 is not a multiple of parallel.tp * parallel.pp = 2 * 1 = 2"]),
    (2, ["parallel.tp=2", "parallel.ep=2"], ["parallel.ep=2 does not divide the data-parallel size 1"]),
    (2, ["parallel.sequence_parallel=true"], ["parallel.sequence_parallel=true needs parallel.tp > 1"]),
    (4, ["parallel.tp=2", "parallel.expert_tensor_parallel=false"],
     ["parallel.expert_tensor_parallel=false with parallel.tp=2 needs parallel.sequence_parallel=true"]),
    # every violation in one message, numbered
    (4, ["parallel.tp=3", "parallel.ep=3", "parallel.pp=30"],
     ["has 6 problems", "(1) parallel.tp=3 does not divide model.num_attention_heads=4",
      "parallel.ep=3 does not divide model.num_experts=4", "parallel.pp=30 exceeds model.num_hidden_layers=6",
      "(6) world size 4 is not a multiple of parallel.tp * parallel.pp = 3 * 30 = 90"]),
])
def test_bad_layout_is_one_message_naming_the_numbers(capsys, world, overrides, needles):
    assert main(["info", TINY, "--world-size", str(world), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_train_refuses_bad_layouts_before_any_process_group(tmp_path, monkeypatch, capsys):
    import torch.distributed as dist

    def no_group(*a, **k):
        raise AssertionError("a process group was created for a layout that cannot run")
    monkeypatch.setattr(dist, "init_process_group", no_group)
    monkeypatch.setattr("complexity_dist.parallel.distributed.build_groups", no_group)
    cases = [(3, ["parallel.tp=3"], "parallel.tp=3 does not divide model.num_attention_heads=4"),
             (3, ["parallel.ep=3"], "parallel.ep=3 does not divide model.num_experts=4"),
             (30, ["parallel.pp=30"], "parallel.pp=30 exceeds model.num_hidden_layers=6"),
             (3, ["parallel.tp=2"], "world size 3 is not a multiple of parallel.tp * parallel.pp = 2 * 1 = 2"),
             # valid layouts the loop does not run (yet)
             (2, ["parallel.pp=2"], "parallel.pp=2 with parallel.zero_stage=0"),
             (2, ["parallel.pp=2", "parallel.zero_stage=2"], "DeepSpeed's PipelineEngine refuses ZeRO 2 and 3"),
             (4, ["parallel.pp=2", "parallel.ep=2", "parallel.zero_stage=1"],
              "parallel.pp=2 with parallel.ep=2"),
             (2, ["parallel.tp=2"], "parallel.tp > 1 with parallel.zero_stage=0"),
             (2, ["parallel.ep=2", "parallel.zero_stage=3"], "Native DeepSpeed MoE is not supported with ZeRO Stage 3"),
             (2, ["parallel.overlap_grad_reduce=true"],
              "parallel.overlap_grad_reduce=true with parallel.zero_stage=0: the overlapped reduction is ZeRO 2's"),
             (2, ["parallel.overlap_grad_reduce=true", "parallel.zero_stage=1"],
              "ZeRO 1 with overlap_comm sums the gradients of a step of several micro-batches wrongly"),
             (2, ["parallel.overlap_grad_reduce=true", "parallel.zero_stage=3"], "use parallel.zero_stage=2"),
             (2, ["parallel.overlap_grad_reduce=true", "parallel.zero_stage=1", "parallel.pp=2"],
              "parallel.overlap_grad_reduce=true with parallel.pp=2: pipeline stages run ZeRO 1 only"),
             (2, ["parallel.grad_bucket_size=0"], "parallel.grad_bucket_size=0 must be >= 1")]
    for world, overrides, needle in cases:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", "0")
        assert main(["train", TINY, f"train.run_dir={tmp_path}/r", "tracking.enabled=false", *overrides]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_process_exits_2_before_rendezvous(tmp_path):
    """Rank 0 of a declared world of 3 with tp=2: init_process_group would wait for the two ranks that never
    come (until the timeout), so a prompt exit 2 means no process group was attempted."""
    env = {**os.environ, "WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1", "COMPLEXITY_DIST_TIMEOUT_MIN": "5"}
    proc = subprocess.run([sys.executable, "-m", "complexity_dist.cli", "train", TINY, "parallel.tp=2",
                           f"train.run_dir={tmp_path}/r", "tracking.enabled=false"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "world size 3 is not a multiple of parallel.tp * parallel.pp = 2 * 1 = 2" in proc.stderr


def test_layout_arithmetic_and_stage_split():
    for name, (overrides, expected) in LAYOUTS.items():
        layout = load_config(None, tiny_overrides(**{"train.global_batch": 8}) + overrides).layout(4)
        for rank in range(4):
            for axis in AXES:
                assert layout.group_ranks(axis, rank) == _group_of(expected[axis], rank), (name, axis, rank)
    lay = load_config(TINY, ["parallel.pp=4", "train.global_batch=8"]).layout(4)
    assert [list(lay.stage_layers(s)) for s in range(4)] == [[0, 1], [2, 3], [4], [5]]
    # global_batch keeps its meaning: only dp divides it, tp and pp ranks of a replica see the same samples
    lay = load_config(TINY, ["parallel.tp=2", "parallel.pp=2", "train.global_batch=8", "train.micro_batch=2"]
                      ).layout(8)
    assert (lay.dp, lay.micro_batch, lay.grad_accum) == (2, 2, 2)
    assert lay.dp * lay.micro_batch * lay.grad_accum == 8
    with pytest.raises(ConfigError, match="train.global_batch=7 is not divisible by the data-parallel size 2"):
        load_config(TINY, ["parallel.tp=2", "train.global_batch=7"]).layout(4)


# --- 3. info per rank --------------------------------------------------------------------------------------

def test_info_prints_per_rank_counts_that_sum_to_the_total(capsys):
    from complexity_dist.model.accounting import model_counts, rank_parameter_counts

    assert main(["info", str(ROOT / "configs/3b.yaml"), "--world-size", "8", "parallel.tp=2", "parallel.pp=2"]) == 0
    out = capsys.readouterr().out
    assert "tp=2 pp=2 ep=1 dp=2 expert_dp=2" in out
    total = int(re.search(r"parameters \(total\):\s+([\d,]+)", out).group(1).replace(",", ""))
    stages = re.findall(r"stage (\d) \(([^)]*)\): ([\d,]+) = ([\d,]+) \+ ([\d,]+) \+ ([\d,]+)", out)
    assert len(stages) == 2, out
    assert "embedding" in stages[0][1] and "tied embedding copy" in stages[1][1] and "final norm" in stages[1][1]
    num = [[int(x.replace(",", "")) for x in s[2:]] for s in stages]
    for held, split, expert, replicated in num:
        assert held == split + expert + replicated
    tp, ep = 2, 1
    vocab, hidden = 32000, 2560
    grid = sum(tp * split + tp * ep * expert + replicated for _, split, expert, replicated in num)
    assert grid == total + vocab * hidden  # the tied embedding is held by both end stages
    assert f"= total {total:,} + the tied embedding's copy on the last stage {vocab * hidden:,}" in out
    assert re.search(r"training memory per GPU \(estimate, GiB\): weights [\d.]+", out)

    # expert parallel halves the experts a rank holds; one process holds everything
    cfg = load_config(ROOT / "configs/3b.yaml", ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2"])
    with_ep = rank_parameter_counts(cfg.model, cfg.layout(8))
    assert [c.expert * 2 for c in with_ep] == [n[2] for n in num]
    one = rank_parameter_counts(cfg.model, load_config(ROOT / "configs/3b.yaml").layout(1))
    assert len(one) == 1 and one[0].total == model_counts(cfg.model).total
    # whole experts on each TP rank: a rank holds twice the expert weights, the grid counts them once per ep rank
    whole = load_config(ROOT / "configs/3b.yaml", ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true",
                                                   "parallel.expert_tensor_parallel=false"])
    assert [c.expert for c in rank_parameter_counts(whole.model, whole.layout(8))] == [n[2] * 2 for n in num]
    assert main(["info", str(ROOT / "configs/3b.yaml"), "--world-size", "8", "parallel.tp=2", "parallel.pp=2",
                 "parallel.sequence_parallel=true", "parallel.expert_tensor_parallel=false"]) == 0
    out = capsys.readouterr().out
    assert "expert_tp=1" in out and "(tp x split + ep x experts + replicated" in out
    assert f"= total {total:,} + the tied embedding's copy" in out


# --- 2. megatron-core groups and DeepSpeed's mpu, 4 gloo processes ----------------------------------------

def _batches(cfg, dp_rank: int, steps: int):
    g = torch.Generator().manual_seed(1000 + dp_rank)
    return [torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_len + 1), generator=g) for _ in range(steps)]


def _train_two_steps(cfg, layout, mpu, dp_rank: int):
    from complexity_dist.model import ComplexityForCausalLM
    from complexity_dist.parallel.deepspeed_engine import build_engine, global_grad_norm
    from complexity_dist.train.step import optimizer_step

    torch.manual_seed(cfg.train.seed)
    engine = build_engine(ComplexityForCausalLM(cfg.model), cfg, layout, bf16=False, mpu=mpu)
    losses, norms = [], []
    for batch in _batches(cfg, dp_rank, 2):
        losses.append(optimizer_step(engine, iter([batch]), 1, 1e-2, torch.device("cpu")).item())
        norms.append(global_grad_norm(engine))
    weights = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
    return engine.dp_world_size, losses, norms, weights


def _worker(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from megatron.core import parallel_state as ps

    from complexity_dist.parallel.distributed import DistEnv, init_distributed
    from complexity_dist.parallel.groups import DeepSpeedMPU, build_groups

    def config(*overrides):
        return load_config(None, tiny_overrides(**{"train.global_batch": 8}) + list(overrides))

    env = init_distributed(config())  # pure data parallel: the groups are built too
    assert env.dp_rank == rank and env.groups.ranks("dp") == [0, 1, 2, 3]
    for name, (overrides, expected) in LAYOUTS.items():
        layout = config(*overrides).layout(world)
        groups = build_groups(layout)
        coords = layout.coords(rank)
        for axis in AXES:
            want = _group_of(expected[axis], rank)
            assert groups.ranks(axis) == want == layout.group_ranks(axis, rank), (name, axis, groups.ranks(axis))
        megatron = {"tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
                    "pp": (ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()),
                    "dp": (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),
                    "ep": (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
                    "expert_dp": (ps.get_expert_data_parallel_rank(), ps.get_expert_data_parallel_world_size())}
        sizes = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "ep": layout.ep, "expert_dp": layout.expert_dp}
        for axis in AXES:
            assert megatron[axis] == (coords[axis], sizes[axis]), (name, axis, megatron[axis], coords)
            assert getattr(groups, f"{axis}_rank") == coords[axis]
        dist_env = DistEnv(rank, world, rank, torch.device("cpu"), layout, groups)
        assert dist_env.dp_rank == coords["dp"] == _group_of(expected["dp"], rank).index(rank), name
        ps.destroy_model_parallel()

    # DeepSpeed with our mpu. Engines without it first: DeepSpeed keeps the last mpu it was given globally.
    dense = config("parallel.zero_stage=1", "optim.grad_clip=0.01", "train.global_batch=4")
    dense_layout = dense.layout(world)
    ref = _train_two_steps(dense, dense_layout, None, rank)
    tp2 = config("parallel.zero_stage=1", "optim.grad_clip=0.01", "parallel.tp=2", "train.global_batch=2")
    tp2_layout = tp2.layout(world)
    tp2_dp = tp2_layout.coords(rank)["dp"]
    # the tp2 x dp2 reference: 4 data-parallel ranks where both ranks of a tp pair see the same sequence
    ref_tp2 = _train_two_steps(dense, dense_layout, None, tp2_dp)

    mpu = DeepSpeedMPU(build_groups(dense_layout))
    got = _train_two_steps(dense, dense_layout, mpu, rank)
    assert ref[0] == got[0] == 4
    assert min(ref[2]) > 0.01  # clipping is active, so a wrong norm would change the weights
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-7)

    # tp2 x dp2 (every weight replicated over tp, as no TP plan is applied here): DeepSpeed must see dp = 2 and
    # count each replicated gradient once in the clipping norm
    groups = build_groups(tp2_layout)
    got = _train_two_steps(tp2, tp2_layout, DeepSpeedMPU(groups), tp2_dp)
    assert got[0] == 2
    torch.testing.assert_close(got[1], ref_tp2[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[2], ref_tp2[2], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[3], ref_tp2[3], rtol=1e-5, atol=1e-7)
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def test_groups_and_deepspeed_mpu_on_four_processes():
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(4, _free_port()), nprocs=4, join=True)
