"""train.fp8_experts (complexity_dist/parallel/fp8.py): the experts' grouped GEMMs in FP8, on CPU.

torch's FP8 grouped GEMM (`torch._scaled_grouped_mm`) is CUDA-only; on CPU the op runs its reference (the
product of the dequantized operands). So here: the padded row plan, the FP8 numerics against an independent
product of dequantized operands, the CUDA calls' operands checked by torch's own shape/layout rules on meta
tensors at the 1.5b shapes, and compile. The model, activation checkpointing, trainer runs and layouts:
tests/test_fp8.py. The kernel against the reference on the GPU: tests/gpu/test_gpu_fp8.py."""
import pytest
import torch

from complexity_dist.config import load_config
from complexity_dist.model.experts import grouped_expert_forward, grouped_gemm_experts, padded_rows, row_plan
from complexity_dist.parallel import fp8
from complexity_dist.parallel.fp8 import EXPERT_ROW_ALIGN, FORWARD_DTYPE, fp8_expert_forward
from complexity_dist.parallel.parallelize import check_parallelize
from test_fp8 import dequantized, refused
from test_grouped_experts import CASES, compiled_counting_graphs, make, per_token_reference, values_and_grads


def group_of_rows(offs, rows):
    """Group of each row, by a Python walk over the offsets (independent of the module's searchsorted)."""
    groups, start = [], 0
    for g, end in enumerate(offs.tolist()):
        groups += [g] * (end - start)
        start = end
    return torch.tensor(groups + [len(offs)] * (rows - start))


@pytest.mark.parametrize("case", ["random", "empty experts", "one token", "all to the last expert"])
def test_row_plan_puts_each_token_in_its_experts_aligned_group(case):
    T, _, _, E, ids = CASES[case]
    expert = torch.tensor(ids) if ids is not None else torch.randint(0, E, (T,), generator=torch.Generator())
    row_token, row_keep, token_row, offs = row_plan(expert, E, EXPERT_ROW_ALIGN)
    R = padded_rows(T, E, EXPERT_ROW_ALIGN)
    assert row_token.shape == row_keep.shape == (R,) and offs.dtype == torch.int32
    assert offs[-1] == R and (offs % EXPERT_ROW_ALIGN == 0).all() and (offs.diff() >= 0).all()
    group = group_of_rows(offs, R)
    assert torch.equal(group[token_row], expert)                  # every token in its expert's group
    assert torch.equal(row_token[token_row], torch.arange(T))    # and the two maps are inverse
    assert row_keep.sum() == T and row_keep[token_row].all()
    for e in range(E):  # within a group: the tokens in their original order, packed at its start
        rows = token_row[expert == e]
        assert torch.equal(rows, torch.arange(len(rows)) + (offs[e - 1] if e else 0))


def exact_grouped_gemm(rows, weight, offs):
    """Differentiable per-group product in the inputs' dtype (the plan's reference: no kernel, no FP8)."""
    group = group_of_rows(offs, rows.shape[0])
    out = rows.new_zeros(rows.shape[0], weight.shape[-1])
    for e in range(weight.shape[0]):
        out = torch.where((group == e).unsqueeze(1), rows @ weight[e], out)
    return out


@pytest.mark.parametrize("case", [c for c in CASES if c != "no tokens"])
def test_aligned_groups_give_exactly_the_per_token_result(case):
    """Values and gradients through the padded layout (zero rows between groups, spare rows in the last one)
    equal each token times its own expert, in fp64."""
    T, H, I, E, ids = CASES[case]
    inputs = make(T, H, I, E, torch.float64, ids)

    def aligned(x, expert, gate_up, down):
        return grouped_gemm_experts(x, expert, gate_up, down, gemm=exact_grouped_gemm, row_align=EXPERT_ROW_ALIGN)

    for a, b in zip(values_and_grads(aligned, *inputs), values_and_grads(per_token_reference, *inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_grouped_gemm_is_the_product_of_its_fp8_operands(compiled):
    """Forward: E4M3 rows (one scale) x E4M3 weights (one scale per expert); backward: the E4M3 output gradient
    against the saved copies. Each equals, group by group, the fp32 product of the dequantized operands
    rounded once to bf16 (what the kernel writes)."""
    torch.manual_seed(0)
    E, K, N = 3, 32, 48
    offs = torch.tensor([16, 16, 64], dtype=torch.int32)  # the middle expert empty
    rows = torch.randn(64, K, requires_grad=True)
    weight = (torch.randn(E, K, N) * 0.05).requires_grad_()
    grad = torch.randn(64, N)
    fn = torch.compile(fp8._Fp8GroupedGemm.apply, fullgraph=True) if compiled else fp8._Fp8GroupedGemm.apply
    out = fn(rows, weight, offs)
    out.backward(grad)
    rq, wq = dequantized(rows.detach(), FORWARD_DTYPE), dequantized(weight.detach(), FORWARD_DTYPE, per_group=True)
    gq = dequantized(grad, FORWARD_DTYPE)
    bounds = [(0, 16), (16, 16), (16, 64)]
    want = torch.cat([rq[a:b] @ wq[e] for e, (a, b) in enumerate(bounds)])
    want_rows = torch.cat([gq[a:b] @ wq[e].t() for e, (a, b) in enumerate(bounds)])
    want_weight = torch.stack([rq[a:b].t() @ gq[a:b] for a, b in bounds])

    def bf16(t):
        return t.to(torch.bfloat16).float()
    torch.testing.assert_close(out.detach(), bf16(want), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rows.grad, bf16(want_rows), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weight.grad, bf16(want_weight), rtol=1e-6, atol=1e-6)
    assert weight.grad[1].abs().max() == 0  # the empty expert: an exactly zero gradient
    exact = torch.cat([rows.detach()[a:b] @ weight.detach()[e] for e, (a, b) in enumerate(bounds)])
    assert ((out.detach() - exact).norm() / exact.norm()).item() < 0.05  # FP8's error, not a wrong one


def test_fp8_experts_follow_the_bf16_experts_and_compile_to_one_graph():
    """The whole expert block (both projections, SwiGLU, the row plan) within FP8's error of the plain
    experts, and compiled: one graph for every routing, no graph break (fullgraph), the eager values."""
    T, H, I, E = 40, 32, 16, 4
    compiled, graphs = compiled_counting_graphs(fp8_expert_forward)
    for ids in [[t % E for t in range(T)], [t % 2 for t in range(T)], [3] * T]:
        inputs = make(T, H, I, E, torch.float32, ids)
        got = values_and_grads(fp8_expert_forward, *inputs)
        for a, b in zip(values_and_grads(compiled, *inputs), got):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(got, values_and_grads(grouped_expert_forward, *inputs)):
            assert ((a - b).norm() / b.norm()).item() < 0.12  # two FP8 GEMMs in a row, each ~4%
    assert len(graphs) == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("tp", [1, 2])
def test_the_kernel_calls_pass_torchs_own_checks_at_the_1_5b_shapes(tp):
    """The CUDA path's calls of torch._scaled_grouped_mm, run on meta tensors: torch's meta function applies
    the kernel's rules (E4M3 operands, row-/column-major layouts, 16-byte strides, scale shapes, int32 offsets,
    bf16 output) and gives the output shapes. H 2048, expert width 1408 (704 per rank under TP2), 4 experts,
    micro-batch 8 x 2048 tokens."""
    T, H, I, E = 8 * 2048, 2048, 1408 // tp, 4
    R = padded_rows(T, E, EXPERT_ROW_ALIGN)
    offs = torch.empty(E, dtype=torch.int32, device="meta")
    one = torch.empty((), device="meta")

    def fp8_tensor(*shape):
        return torch.empty(*shape, dtype=FORWARD_DTYPE, device="meta")
    per_expert = torch.empty(E, device="meta")
    for K, N in ((H, 2 * I), (I, H)):  # gate_up, down
        rows, weight, grad = fp8_tensor(R, K), fp8_tensor(E, K, N), fp8_tensor(R, N)
        # the operands as the autograd function passes them
        forward = fp8.grouped_mm_operands(rows, one, weight, per_expert)
        assert fp8._cuda_grouped_mm(*forward, offs, True).shape == (R, N)
        input_grad = fp8.grouped_mm_operands(grad, one, weight.transpose(-2, -1), per_expert)
        assert fp8._cuda_grouped_mm(*input_grad, offs, False).shape == (R, K)
        weight_grad = fp8.weight_grad_operands(rows, one, grad, one, E)
        assert fp8._cuda_grouped_weight_grad(*weight_grad, offs).shape == (E, K, N)
        # in the kernel's layouts already, so the kernels copy nothing more
        assert forward[2].stride(-2) == 1 and input_grad[2].stride(-2) == 1 and weight_grad[2].stride(-2) == 1
    # the saved weight serves the input gradient as it is (a view, no copy)
    w = torch.randn(E, 32, 48).to(FORWARD_DTYPE)
    assert fp8.grouped_mm_operands(w[0], torch.ones(()), w.transpose(-2, -1), torch.ones(E))[2].data_ptr() \
        == w.data_ptr()
    # the checks have teeth: a row-major second operand is refused
    with pytest.raises(RuntimeError, match="column major"):
        torch._scaled_grouped_mm(fp8_tensor(R, H), fp8_tensor(E, H, 2 * I), torch.empty(R, device="meta"),
                                 torch.empty(E, 2 * I, device="meta"), offs=offs, out_dtype=torch.bfloat16)


def tiny(*overrides):
    return load_config("configs/tiny.yaml", ["train.fp8=current", "train.fp8_experts=true", *overrides])


def test_refusals_name_the_setting():
    assert "train.fp8_experts=false" in refused("train.fp8_experts=true")
    assert "model.linear_backend=torch" in refused("train.fp8_experts=true")
    # tiny's experts are 176 wide: 88 per rank under TP2
    assert "expert intermediate size on each rank (88) divisible by 16" in refused(
        "train.fp8=current", "train.fp8_experts=true", "parallel.tp=2", "parallel.zero_stage=1")
    check_parallelize(tiny("parallel.tp=2", "parallel.zero_stage=1", "model.intermediate_size=768"))
    check_parallelize(tiny("parallel.tp=2", "parallel.zero_stage=1", "parallel.sequence_parallel=true",
                           "parallel.expert_tensor_parallel=false"))
