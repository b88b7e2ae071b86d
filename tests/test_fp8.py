"""train.fp8=current with model.linear_backend=torch (complexity_dist/parallel/fp8.py), on CPU: torch's CPU build
runs `torch._scaled_mm` with the same FP8 formats (the FP8 experts' own checks: tests/test_fp8_experts.py; the
trainer runs and layouts here run them too). The GPU checks (1.5b shapes, 200 training steps against bf16)
are tests/gpu/test_gpu_fp8.py."""
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from complexity_dist.config import ConfigError, load_config
from complexity_dist.model import ComplexityForCausalLM
from complexity_dist.model.experts import grouped_expert_forward
from complexity_dist.parallel.fp8 import (FORWARD_DTYPE, GRAD_DTYPE, Fp8Linear, fp8_expert_forward, fp8_linear,
                                          scaled_fp8)
from complexity_dist.parallel.parallelize import check_parallelize, parallelize
from test_train import dataset, metrics, run, train_cmd  # noqa: F401 (dataset: a fixture)


def dequantized(t: torch.Tensor, dtype: torch.dtype, per_group: bool = False) -> torch.Tensor:
    q, inv = scaled_fp8(t, dtype, per_group=per_group)
    return q.float() * (inv.view(-1, *[1] * (t.dim() - 1)) if per_group else inv)


def refused(*overrides) -> str:
    """The ConfigError message check_parallelize gives the tiny config with these overrides."""
    with pytest.raises(ConfigError) as e:
        check_parallelize(load_config("configs/tiny.yaml", list(overrides)))
    return str(e.value)


def test_scaling_puts_the_largest_magnitude_on_the_formats_largest_value():
    x = torch.tensor([[0.5, -3.0], [1e-3, 2.0]])
    for dtype in (FORWARD_DTYPE, GRAD_DTYPE):
        q, inv = scaled_fp8(x, dtype)
        assert q.dtype == dtype and inv.dtype == torch.float32
        assert q.float().abs().max().item() == torch.finfo(dtype).max
        torch.testing.assert_close(q.float() * inv, x, rtol=0.13, atol=1e-3)  # 2-3 mantissa bits
    q, inv = scaled_fp8(torch.zeros(3, 4), FORWARD_DTYPE)  # an all-zero tensor: zeros, a finite scale
    assert q.float().abs().max() == 0 and torch.isfinite(inv)


@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_linear_is_the_product_of_its_fp8_operands(compiled):
    """Forward: E4M3 input x E4M3 weight; backward: E5M2 output gradient against the same saved E4M3 copies.
    Each equals the fp32 product of the dequantized operands (exactly: the CPU kernel accumulates in fp32)."""
    torch.manual_seed(0)
    x = torch.randn(2, 48, 64, requires_grad=True)
    w = (torch.randn(32, 64) * 0.05).requires_grad_()
    b = torch.randn(32, requires_grad=True)
    g = torch.randn(2, 48, 32)
    fn = torch.compile(fp8_linear) if compiled else fp8_linear
    out = fn(x, w, b)
    out.backward(g)
    xq, wq = dequantized(x.detach().reshape(-1, 64), FORWARD_DTYPE), dequantized(w.detach(), FORWARD_DTYPE)
    gq = dequantized(g.reshape(-1, 32), GRAD_DTYPE)
    torch.testing.assert_close(out.detach().reshape(-1, 32), xq @ wq.t() + b.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.reshape(-1, 64), gq @ wq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, gq.t() @ xq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad, g.sum((0, 1)))
    # and it is close to the exact product: FP8's error, not a wrong one
    exact = x.detach() @ w.detach().t() + b.detach()
    assert ((out.detach() - exact).norm() / exact.norm()).item() < 0.05


@pytest.mark.parametrize("experts", [False, True], ids=["dense", "with_experts"])
def test_model_runs_its_large_projections_in_fp8_and_every_parameter_trains(experts):
    cfg = load_config("configs/tiny.yaml", ["train.fp8=current", f"train.fp8_experts={str(experts).lower()}"])
    torch.manual_seed(0)
    ref = ComplexityForCausalLM(cfg.model)
    model = copy.deepcopy(ref)
    parallelize(model, cfg, None)
    assert model.state_dict().keys() == ref.state_dict().keys()  # checkpoints as without FP8
    for layer in model.model.layers:
        assert layer.self_attn.linear is fp8_linear  # the stacked [n, mu_prev] q/k/v GEMM
        assert type(layer.self_attn.o_proj) is Fp8Linear and type(layer.dynamics.mu_proj) is Fp8Linear
        # the dynamics controller (64 features wide) stays a plain bf16 GEMM
        assert type(layer.dynamics.controller_in) is nn.Linear and type(layer.dynamics.controller_out) is nn.Linear
        # train.fp8_experts: the experts' grouped GEMMs in FP8 (tests/test_fp8_experts.py), else bf16
        assert layer.mlp.expert_forward is (fp8_expert_forward if experts else grouped_expert_forward)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 65))
    losses = {}
    for name, m in (("ref", ref), ("fp8", model)):
        losses[name] = m(ids[:, :-1], targets=ids[:, 1:]).loss
        losses[name].backward()
    torch.testing.assert_close(losses["fp8"], losses["ref"], rtol=1e-2, atol=0)
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if ref_grads[name].grad.norm() > 0:
            rel = (p.grad - ref_grads[name].grad).norm() / ref_grads[name].grad.norm()
            assert rel < 0.35, (name, rel.item())  # FP8's rounding through 6 layers, not a missing term


class CountOps(TorchDispatchMode):
    def __init__(self, name):
        super().__init__()
        self.name, self.count = name, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func._schema.name == self.name
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("experts", [False, True], ids=["dense", "with_experts"])
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_recomputes_the_same_fp8_forward(mode, experts):
    """The recompute repeats the scaling from the same tensors: loss and gradients equal, bit for bit. And
    `selective` keeps the FP8 experts' grouped GEMM outputs: their backward runs only the gradient GEMMs,
    `full`'s the forward ones again too."""
    cfg = load_config("configs/tiny.yaml", ["train.fp8=current", f"train.fp8_experts={str(experts).lower()}",
                                            "model.num_hidden_layers=2"])
    torch.manual_seed(0)
    plain = ComplexityForCausalLM(cfg.model)
    parallelize(plain, cfg, None)
    checkpointed = copy.deepcopy(plain)
    checkpointed.model.activation_checkpointing = mode
    ids = torch.randint(0, cfg.model.vocab_size, (2, 33))
    grouped_gemms = []
    for m in (plain, checkpointed):
        loss = m(ids[:, :-1], targets=ids[:, 1:]).loss
        with CountOps("complexity_dist::fp8_grouped_mm") as ops:
            loss.backward()
        grouped_gemms.append(ops.count)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.equal(a.grad, b.grad), name
    per_layers = 2 * cfg.model.num_hidden_layers if experts else 0  # gate_up and down
    assert grouped_gemms == [per_layers, per_layers * (2 if mode == "full" else 1)]


def test_refusals_name_the_setting():
    assert "use train.fp8=current" in refused("train.fp8=delayed")
    assert "model.linear_backend=torch (our FP8 GEMMs) or te" in refused(
        "train.fp8=current", "model.linear_backend=megatron", "parallel.tp=2", "parallel.zero_stage=1")
    assert "set parallel.tp_comm_overlap=false" in refused(
        "train.fp8=current", "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.tp_comm_overlap=true",
        "parallel.zero_stage=1")
    assert "model.hidden_size=264 divisible by 16" in refused(
        "train.fp8=current", "model.hidden_size=264", "model.num_attention_heads=4", "model.num_key_value_heads=2")
    check_parallelize(load_config("configs/tiny.yaml", ["train.fp8=current", "train.activation_checkpointing=full"]))


def test_fp8_training_learns_and_resumes_bit_exact(tmp_path, dataset):  # noqa: F811
    """Current scaling has no state besides the weights: a run stopped and resumed continues exactly."""
    common = ["train.steps=8", "checkpoint.every=4", "train.fp8=current", "train.fp8_experts=true"]
    run(train_cmd(tmp_path / "full", dataset, *common))
    stopped = run(train_cmd(tmp_path / "split", dataset, *common), env_extra={"COMPLEXITY_DIST_PREEMPT_AT": "4"},
                  check=False)
    assert stopped.returncode != 0
    run(train_cmd(tmp_path / "split", dataset, *common))
    full, split = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 9))
    assert [r["loss"] for r in split[4:]] == [r["loss"] for r in full[4:]]
    assert full[-1]["loss"] < full[0]["loss"] - 0.5


# FP8 experts too (their width 192, 96 per TP rank: FP8 grouped GEMMs need multiples of 16)
LAYOUT_COMMON = ["train.steps=6", "checkpoint.enabled=false", "model.intermediate_size=768", "parallel.zero_stage=1"]
FP8 = ["train.fp8=current", "train.fp8_experts=true"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, dataset):  # noqa: F811
    """One process's losses in fp32 and in FP8."""
    losses = {}
    for name, extra in (("fp32", []), ("fp8", FP8)):
        run_dir = tmp_path_factory.mktemp("fp8") / name
        run(train_cmd(run_dir, dataset, *LAYOUT_COMMON, *extra))
        losses[name] = [r["loss"] for r in metrics(run_dir)]
    return losses


@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.sequence_parallel=true"], ["parallel.pp=2"],
                                    ["parallel.ep=2"]], ids=["tp2_sp", "pp2", "ep2"])
def test_parallel_layouts_in_fp8_follow_one_process(tmp_path, dataset, one_process, layout):  # noqa: F811
    """Each rank scales its own tensors (a TP shard, a data-parallel rank's micro-batch, the tokens an EP rank
    receives: other scales than one process's), so a layout's FP8 losses differ from one process's FP8 losses
    by about as much as those differ from fp32 (measured over these 6 steps: up to 2.1e-3 relative, TP2+SP 2.6e-3
    from one process's FP8). So every run is held to one process's fp32 losses, within FP8's 3e-3. Pipeline
    stages split no tensor: there the losses equal one process's FP8 losses exactly."""
    fp32, fp8 = one_process["fp32"], one_process["fp8"]
    assert len(fp32) == len(fp8) == 6
    torch.testing.assert_close(fp8, fp32, rtol=3e-3, atol=0)
    run(train_cmd(tmp_path / "run", dataset, *LAYOUT_COMMON, *FP8, *layout, nproc=2))
    losses = [r["loss"] for r in metrics(tmp_path / "run")]
    torch.testing.assert_close(losses, fp32, rtol=3e-3, atol=0)
    if layout == ["parallel.pp=2"]:
        assert losses == fp8
