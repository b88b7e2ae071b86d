"""grouped_expert_forward (complexity_dist/model/experts.py) against a per-token reference, and its promise
to torch.compile: one graph, no graph break, no recompile when the routing changes."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from complexity_dist.model import experts
from complexity_dist.model.experts import grouped_expert_forward


def per_token_reference(x, expert, gate_up, down):
    """Each token times its own expert's weights, nothing grouped or sorted."""
    gate, up = torch.einsum("th,thj->tj", x, gate_up[expert]).chunk(2, dim=-1)
    return torch.einsum("ti,tih->th", F.silu(gate) * up, down[expert])


def make(T, H, I, E, dtype, ids=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g, dtype=dtype, requires_grad=True)
    gate_up = (torch.randn(E, H, 2 * I, generator=g, dtype=dtype) * 0.3).requires_grad_()
    down = (torch.randn(E, I, H, generator=g, dtype=dtype) * 0.3).requires_grad_()
    expert = torch.tensor(ids, dtype=torch.long) if ids is not None else torch.randint(0, E, (T,), generator=g)
    return x, expert, gate_up, down


def values_and_grads(fn, x, expert, gate_up, down):
    out = fn(x, expert, gate_up, down)
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(out.shape, generator=g, dtype=out.dtype)
    grads = torch.autograd.grad((out * weight).sum(), (x, gate_up, down))
    return (out, *grads)


CASES = {
    # T, H, I, E, ids
    "random": (37, 16, 12, 4, None),
    "empty experts": (9, 8, 6, 5, [3, 0, 3, 3, 0, 0, 3, 0, 3]),   # experts 1, 2 and 4 get no token
    "one expert": (11, 8, 6, 1, None),
    "one token": (1, 8, 6, 4, [2]),
    "unsorted, reversed": (12, 8, 6, 3, [2, 2, 1, 0, 2, 1, 1, 0, 0, 2, 1, 0]),
    "all to the last expert": (7, 8, 6, 4, [3] * 7),
    "no tokens": (0, 8, 6, 4, []),
}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_per_token_reference(case, dtype):
    T, H, I, E, ids = CASES[case]
    inputs = make(T, H, I, E, dtype, ids)
    got = values_and_grads(grouped_expert_forward, *inputs)
    want = values_and_grads(per_token_reference, *inputs)
    for name, a, b in zip(["out", "d x", "d gate_up", "d down"], got, want):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{case} {name}: {m}")
    # an expert that received no token gets an exactly zero gradient (not garbage from padding)
    if ids is not None:
        for e in set(range(E)) - set(ids):
            assert got[2][e].abs().max() == 0 and got[3][e].abs().max() == 0


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
def test_grouped_kernel_path_logic_on_cpu():
    """The GPU path's sort/offsets/permutation logic, run through torch's CPU _grouped_mm (a per-group loop).
    Every group non-empty: the CPU op's own backward rejects empty groups, the CUDA kernel does not (that
    case is in tests/gpu/test_gpu_experts.py)."""
    ids = [2, 0, 1, 2, 2, 0, 3, 1, 1, 3, 0, 2, 3]
    inputs = make(len(ids), 16, 8, 4, torch.float32, ids)
    got = values_and_grads(experts.grouped_gemm_experts, *inputs)
    want = values_and_grads(per_token_reference, *inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    # forward with empty groups (experts 1 and 3 idle) is fine on CPU too
    x, expert, gate_up, down = make(6, 16, 8, 4, torch.float32, [2, 0, 2, 0, 0, 2])
    with torch.no_grad():
        torch.testing.assert_close(experts.grouped_gemm_experts(x, expert, gate_up, down),
                                   per_token_reference(x, expert, gate_up, down), **TOL[torch.float32])


def test_path_choice_needs_no_gpu():
    x, _, gate_up, down = make(8, 16, 8, 4, torch.bfloat16)
    assert not experts.use_grouped_kernel(x, gate_up, down)  # CPU tensors: the pure-torch path


def compiled_counting_graphs(fn):
    """(torch.compile(fn, fullgraph=True) that runs each graph as traced, the list of graphs it traced)."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, backend=counting_backend, fullgraph=True), graphs


def test_compiles_to_one_graph_whatever_the_routing():
    """fullgraph=True fails on a graph break (the old `.tolist()` of the counts and the per-expert `if`),
    and a second routing, with an expert left empty, must reuse the first graph (no recompile)."""
    compiled, graphs = compiled_counting_graphs(grouped_expert_forward)
    T, H, I, E = 24, 8, 6, 4
    for ids in [[t % E for t in range(T)], [t % 2 for t in range(T)], [3] * T]:
        inputs = make(T, H, I, E, torch.float32, ids)
        got = values_and_grads(compiled, *inputs)
        want = values_and_grads(per_token_reference, *inputs)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **TOL[torch.float32])
    assert len(graphs) == 1
    torch._dynamo.reset()


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
@pytest.mark.parametrize("mode", ["none", "selective"])
def test_compiled_backward_never_makes_the_token_dimension_contiguous(mode, monkeypatch):
    """The CUDA grouped GEMM asserts on the device unless every group's token count is a multiple of 8
    whenever the grouped (token) dimension of an operand is its contiguous one. Compiled under selective
    checkpointing, torch's own backward let inductor materialize the recomputed rows transposed ([K, T], T
    contiguous): `bench ... train.activation_checkpointing=selective` failed on the GPU. This runs the GPU
    path on CPU, compiled as a decoder layer is, and checks the layout of every eager grouped GEMM call
    (the backward runs eagerly inside the grouped_mm_backward op) as well as values and gradients."""
    from complexity_dist.model.checkpointing import run_checkpointed

    real = torch._grouped_mm
    calls = []

    def checked(a, b, offs=None, **kw):
        if torch.compiler.is_compiling():  # being traced: checked when the compiled code runs
            return real(a, b, offs=offs, **kw)
        grouped_dims = [(a, 0)] if b.dim() == 3 else [(a, 1), (b, 0)]  # [T, K] x [E, K, N] | [K, T] x [T, N]
        for t, d in grouped_dims:
            assert t.stride(d) != 1, f"grouped dimension contiguous: shape {tuple(t.shape)} stride {t.stride()}"
        calls.append(b.dim())
        return real(a, b, offs=offs, **kw)

    # inductor names its extern grouped-GEMM kernel after the function torch._grouped_mm holds when its module is
    # first imported, and caches compiled code on disk across processes: import it before the patch, and keep
    # code compiled around the patch out of the caches (another process's cached code would name `checked`)
    importlib.import_module("torch._inductor.kernel.mm_grouped")
    monkeypatch.setattr(torch, "_grouped_mm", checked)
    ids = [2, 0, 1, 2, 2, 0, 3, 1, 1, 3, 0, 2, 3]  # groups of 3 and 4 tokens: none a multiple of 8
    x, expert, gate_up, down = make(len(ids), 16, 8, 4, torch.bfloat16, ids)  # what compiled code accepts

    def layer(x, expert, gate_up, down):  # elementwise work around the experts, as in a decoder layer
        return experts.grouped_gemm_experts(F.rms_norm(x, (x.shape[-1],)), expert, gate_up, down) * 2 + x

    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: run_checkpointed(mode, layer, *a), fullgraph=True)
    no_disk_cache = torch._functorch.config.patch(enable_autograd_cache=False)
    with torch._inductor.config.patch(fx_graph_cache=False), no_disk_cache:
        got = values_and_grads(compiled, x, expert, gate_up, down)
    as_fp32 = [x.detach().float().requires_grad_(), expert] + [w.detach().float().requires_grad_() for w in (gate_up, down)]
    want = values_and_grads(lambda x, *a: per_token_reference(F.rms_norm(x, (x.shape[-1],)), *a) * 2 + x,
                            *as_fp32)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=5e-2)  # bf16 against fp32
    # checked: both weight gradients and at least both row gradients (compiled code looks torch._grouped_mm
    # up when it runs, so the forward's calls may be here too)
    assert calls.count(2) == 2 and calls.count(3) >= 2
    torch._dynamo.reset()
