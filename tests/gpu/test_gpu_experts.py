"""On the GPU machine: the experts' grouped-GEMM path (complexity_dist/model/experts.py) at the 1.5b preset's
expert shape, bf16 (skipped without CUDA).

    python -m pytest -q -s tests/gpu/test_gpu_experts.py

Checks values and gradients against an fp32 reference, no host sync, one compiled graph (fullgraph) that
survives a change of routing, and prints fwd+bwd milliseconds of the old per-expert loop and the new path.
"""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")

from complexity_dist.model import experts  # noqa: E402
from complexity_dist.model.experts import grouped_expert_forward  # noqa: E402

T, H, I, E = 16384, 2048, 1408, 4  # configs/pretrain_1b.yaml: micro batch 8 x 2048, I = 5632 / 4


def loop_baseline(x, expert, gate_up, down):
    """The implementation this replaced (bincount().tolist() host sync, a Python loop over experts, index_copy):
    kept here only to time against."""
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=gate_up.shape[0]).tolist()
    outs = []
    for e, chunk in enumerate(torch.split(x.index_select(0, order), counts)):
        if chunk.shape[0] == 0:
            continue
        gate, up = (chunk @ gate_up[e]).chunk(2, dim=-1)
        outs.append((F.silu(gate) * up) @ down[e])
    return torch.zeros_like(x).index_copy(0, order, torch.cat(outs))


def fp32_reference(x, expert, gate_up, down):
    """Each expert applied to the tokens routed to it, in fp32, written without sorting or offsets."""
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        mask = (expert == e).unsqueeze(1)
        gate, up = (x @ gate_up[e]).chunk(2, dim=-1)
        out = out + mask * ((F.silu(gate) * up) @ down[e])
    return out


def make(routing: str, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, device="cuda", generator=g).to(dtype)
    gate_up = (torch.randn(E, H, 2 * I, device="cuda", generator=g) * 0.02).to(dtype)
    down = (torch.randn(E, I, H, device="cuda", generator=g) * 0.02).to(dtype)
    if routing == "balanced":
        expert = torch.randint(0, E, (T,), device="cuda", generator=g)
    else:  # "empty expert": expert E-1 gets no token, the others uneven shares
        expert = torch.randint(0, E - 1, (T,), device="cuda", generator=g)
        expert[: T // 5] = 0
    weight = torch.randn(T, H, device="cuda", generator=g).to(dtype)  # d loss / d out
    return [t.requires_grad_() for t in (x, gate_up, down)], expert, weight


def fwd_bwd(fn, params, expert, weight):
    x, gate_up, down = params
    out = fn(x, expert, gate_up, down)
    grads = torch.autograd.grad(out, params, grad_outputs=weight.to(out.dtype))
    return [out.detach(), *grads]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("routing", ["balanced", "empty expert"])
def test_grouped_path_matches_fp32_reference(routing):
    params, expert, weight = make(routing)
    if torch.cuda.get_device_capability()[0] in (9, 10):
        assert experts.use_grouped_kernel(params[0], params[1], params[2]), "grouped kernel not chosen on sm90"
    got = fwd_bwd(grouped_expert_forward, params, expert, weight)
    ref = fwd_bwd(fp32_reference, [p.detach().float().requires_grad_() for p in params], expert, weight.float())
    old = fwd_bwd(loop_baseline, params, expert, weight)
    names = ["out", "d x", "d gate_up", "d down"]
    errs = {n: (rel_err(a, r), rel_err(o, r)) for n, a, o, r in zip(names, got, old, ref)}
    print(f"\n{routing}: relative error vs fp32 (grouped, old loop): "
          + ", ".join(f"{n} {a:.2e} / {o:.2e}" for n, (a, o) in errs.items()))
    for n, (a, o) in errs.items():
        assert a < 1e-2, f"{routing} {n}: relative error {a:.2e}"
        assert a < 1.5 * o + 1e-3, f"{routing} {n}: {a:.2e} vs the old loop's {o:.2e}"
    if routing == "empty expert":  # the idle expert's gradient is exactly zero, not leftovers of a kernel
        assert got[2][E - 1].abs().max() == 0 and got[3][E - 1].abs().max() == 0


def test_weights_at_misaligned_offset():
    """A weight viewed 8 bytes into a flat buffer (as ZeRO's flat parameter buffers can place it) is copied
    to an aligned one before the grouped GEMM instead of handed to its 16-byte TMA loads."""
    params, expert, weight = make("empty expert")
    x, gate_up, down = params
    flat = torch.zeros(4 + gate_up.numel(), device="cuda", dtype=gate_up.dtype)
    flat[4:].copy_(gate_up.detach().flatten())
    shifted = flat[4:].view(gate_up.shape).requires_grad_()
    assert not experts._row_aligned(shifted)
    got = fwd_bwd(grouped_expert_forward, [x, shifted, down], expert, weight)
    want = fwd_bwd(grouped_expert_forward, params, expert, weight)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16-grouped", "fp32-blocks"])
def test_no_host_sync(dtype):
    params, expert, weight = make("empty expert", dtype)
    fwd_bwd(grouped_expert_forward, params, expert, weight)  # warm up (library handles, allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fwd_bwd(grouped_expert_forward, params, expert, weight)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_compiles_fullgraph_without_recompiling():
    torch._dynamo.reset()
    compiled = torch.compile(grouped_expert_forward, fullgraph=True)
    for i, routing in enumerate(["balanced", "empty expert"]):
        params, expert, weight = make(routing, seed=i)
        if i:  # a new routing (and an empty expert) must reuse the first graph
            torch.compiler.set_stance("fail_on_recompile")
        try:
            got = fwd_bwd(compiled, params, expert, weight)
        finally:
            torch.compiler.set_stance("default")
        want = fwd_bwd(grouped_expert_forward, params, expert, weight)
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-2
    torch._dynamo.reset()


def time_ms(fn, params, expert, weight, iters=20):
    for _ in range(3):
        fwd_bwd(fn, params, expert, weight)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fwd_bwd(fn, params, expert, weight)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def test_time_against_old_loop():
    params, expert, weight = make("balanced")
    torch._dynamo.reset()
    compiled = torch.compile(grouped_expert_forward, fullgraph=True)
    old = time_ms(loop_baseline, params, expert, weight)
    new = time_ms(grouped_expert_forward, params, expert, weight)
    new_compiled = time_ms(compiled, params, expert, weight)
    torch._dynamo.reset()
    print(f"\nexperts fwd+bwd, bf16, T={T} H={H} I={I} E={E}: old loop {old:.3f} ms, grouped {new:.3f} ms "
          f"(eager, {old / new:.2f}x), grouped compiled {new_compiled:.3f} ms ({old / new_compiled:.2f}x)")
    assert new < old * 1.1  # not slower than what it replaces


@pytest.mark.parametrize("mode", ["none", "selective"])
def test_compiled_checkpointed_layer_with_ragged_groups(mode):
    """Compiled under selective checkpointing, the weight gradients' grouped GEMMs once got a recomputed
    operand laid out with the token dimension contiguous, and the CUDA kernel asserted unless every group's
    token count was a multiple of 8 (`bench ... train.activation_checkpointing=selective` crashed). Group
    sizes here are odd on purpose; values and gradients against the fp32 reference."""
    from complexity_dist.model.checkpointing import run_checkpointed

    params, expert, weight = make("empty expert")
    expert[:3] = E - 1  # the idle expert gets 3 tokens: every group size is now odd or not a multiple of 8
    assert (torch.bincount(expert, minlength=E) % 8 != 0).any()

    def layer(x, expert, gate_up, down):  # elementwise work around the experts, as in a decoder layer
        return grouped_expert_forward(F.rms_norm(x, (H,)), expert, gate_up, down) * 2 + x

    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: run_checkpointed(mode, layer, *a))
    got = fwd_bwd(compiled, params, expert, weight)
    torch.cuda.synchronize()
    ref = fwd_bwd(lambda x, *a: fp32_reference(F.rms_norm(x, (H,)), *a) * 2 + x,
                  [p.detach().float().requires_grad_() for p in params], expert, weight.float())
    for name, a, r in zip(["out", "d x", "d gate_up", "d down"], got, ref):
        assert rel_err(a, r) < 1e-2, f"{mode} {name}: relative error {rel_err(a, r):.2e}"
    torch._dynamo.reset()
