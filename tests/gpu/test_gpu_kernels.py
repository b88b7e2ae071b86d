"""On the GPU machine: complexity_dist/kernels/ at the 1.5b preset's sizes, bf16 (skipped without CUDA).

    python -m pytest -q -s tests/gpu/test_gpu_kernels.py

Checks values and gradients of the fused linear + cross-entropy (16384 tokens, hidden 2048, vocab 32000) and of
the fused INL dynamics against their torch references, and prints forward+backward milliseconds (CUDA events)
and peak memory of the torch path and the kernel, measured in the same run; then a small model with
model.kernels=triton, compiled layers included, against model.kernels=torch.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")

from complexity_dist.config import load_config  # noqa: E402
from complexity_dist.kernels.inl_dynamics import inl_update_torch, inl_update_triton  # noqa: E402
from complexity_dist.kernels.linear_cross_entropy import (fused_linear_cross_entropy,  # noqa: E402
                                                          linear_cross_entropy_torch)
from complexity_dist.model import ComplexityForCausalLM  # noqa: E402

T, H, V = 16384, 2048, 32000  # configs/pretrain_1b.yaml: micro batch 8 x 2048


def fwd_bwd(fn, inputs, out_grads):
    """Outputs and input gradients of fn; inputs are leaves requiring grad."""
    for x in inputs:
        x.grad = None
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, out_grads)
    return [o.detach() for o in outs], [x.grad for x in inputs]


def timed(fn, inputs, out_grads, warmup=2, reps=5):
    """(median ms of forward+backward, peak GiB above what was allocated before)."""
    for _ in range(warmup):
        fwd_bwd(fn, inputs, out_grads)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fwd_bwd(fn, inputs, out_grads)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], (torch.cuda.max_memory_allocated() - base) / 2**30


def close(got, want, rel=2e-2):
    """bf16 comparison scaled by the reference's magnitude (gradients here span orders of magnitude)."""
    torch.testing.assert_close(got.float(), want.float(), rtol=rel, atol=rel * want.float().abs().max().item())


def test_fused_linear_cross_entropy_real_size():
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(T, H, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(V, H, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (T,), device="cuda", generator=g)
    targets[::97] = -100
    one = [torch.tensor(1.0, device="cuda")]
    want, want_g = fwd_bwd(lambda h, w: linear_cross_entropy_torch(h, w, targets), [hidden, weight], one)
    got, got_g = fwd_bwd(lambda h, w: fused_linear_cross_entropy(h, w, targets), [hidden, weight], one)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    for x, y in zip(got_g, want_g):
        close(x, y)
    results = {}
    for name, fn in [("torch (full logits)", lambda h, w: linear_cross_entropy_torch(h, w, targets)),
                     ("fused, torch chunks", lambda h, w: fused_linear_cross_entropy(h, w, targets, use_triton=False)),
                     ("fused, triton", lambda h, w: fused_linear_cross_entropy(h, w, targets))]:
        results[name] = timed(fn, [hidden, weight], one)
    base_ms = results["torch (full logits)"][0]
    for name, (ms, gib) in results.items():
        print(f"\nlinear+CE {T}x{H}->{V} fwd+bwd {name:22s} {ms:8.2f} ms  x{base_ms / ms:4.2f}  peak +{gib:5.2f} GiB")


def test_fused_inl_dynamics_real_size():
    g = torch.Generator(device="cuda").manual_seed(1)
    c = (torch.randn(T, 3 * H, device="cuda", generator=g) * 3).bfloat16()
    a, v, mu = (torch.randn(T, H, device="cuda", generator=g) * s for s in (3.0, 6.0, 1.0))
    inputs = [x.bfloat16().requires_grad_() for x in (c, a, v, mu)]
    consts = (0.1, 2.0, 10.0)
    out_grads = [torch.randn(T, H, device="cuda", generator=g).bfloat16() for _ in range(2)]
    # reference in fp32 from the same bf16 inputs: the kernel computes in fp32 too
    ref_in = [x.detach().float().requires_grad_() for x in inputs]
    want, want_g = fwd_bwd(lambda *x: inl_update_torch(*x, *consts), ref_in, [o.float() for o in out_grads])
    got, got_g = fwd_bwd(lambda *x: inl_update_triton(*x, *consts), inputs, out_grads)
    for x, y in zip(got + got_g, want + want_g):
        close(x, y)
    compiled = torch.compile(inl_update_torch)
    results = {name: timed(fn, inputs, out_grads) for name, fn in [
        ("torch eager", lambda *x: inl_update_torch(*x, *consts)),
        ("torch.compile", lambda *x: compiled(*x, *consts)),
        ("triton", lambda *x: inl_update_triton(*x, *consts))]}
    base_ms = results["torch eager"][0]
    for name, (ms, gib) in results.items():
        print(f"\nINL dynamics {T}x{H} fwd+bwd {name:14s} {ms:7.3f} ms  x{base_ms / ms:4.2f}  peak +{gib:5.2f} GiB")


@pytest.mark.parametrize("compile_layers", [False, True])
def test_model_kernels_triton_matches_torch(compile_layers):
    """A small model in fp32 on the GPU: loss and every gradient of model.kernels=triton equal to torch."""
    over = ["model.hidden_size=256", "model.intermediate_size=512", "model.num_hidden_layers=2",
            "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.vocab_size=1000",
            "model.mu_router=straight_through", "data.seq_len=128"]
    models = []
    for k in ("torch", "triton"):
        torch.manual_seed(0)
        models.append(ComplexityForCausalLM(load_config(None, over + [f"model.kernels={k}"]).model).cuda())
    models[1].load_state_dict(models[0].state_dict())
    if compile_layers:
        models[1].compile_layers()
    ids = torch.randint(0, 1000, (4, 129), device="cuda")
    losses = []
    for m in models:
        loss = m(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    ref = dict(models[0].named_parameters())
    for name, p in models[1].named_parameters():
        torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-4, atol=1e-5, msg=name)
