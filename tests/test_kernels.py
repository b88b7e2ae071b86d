"""complexity_dist/kernels/: each kernel against the pure-torch function it replaces, values and gradients.
Without CUDA the Triton kernels run under the interpreter at tiny sizes; tests/gpu/test_gpu_kernels.py checks
real sizes and times them on a GPU.

Triton decides interpreted-or-compiled when a @triton.jit function is defined, its own library included
(tl.sigmoid, tl.max: defined when triton.language is imported, e.g. by torch._dynamo). So TRITON_INTERPRET=1
is set here before anything imports triton.language; when another test module of the session imported it
first, the Triton tests here run again in a fresh interpreter (test_triton_in_fresh_process)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and "triton.language" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from conftest import tiny_overrides  # noqa: E402

from complexity_dist import kernels  # noqa: E402
from complexity_dist.config import ConfigError, load_config  # noqa: E402
from complexity_dist.kernels import linear_cross_entropy as lce  # noqa: E402
from complexity_dist.kernels.inl_dynamics import inl_update_torch, inl_update_triton  # noqa: E402
from complexity_dist.model import ComplexityForCausalLM  # noqa: E402

TRITON_HERE = DEVICE == "cuda" or (os.environ.get("TRITON_INTERPRET") == "1" and
                                   "Interpreted" in type(triton.language.sigmoid).__name__)
needs_triton = pytest.mark.skipif(not TRITON_HERE, reason="triton.language was imported compiled on CPU; "
                                  "test_triton_in_fresh_process runs these tests")
BF16 = dict(rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(TRITON_HERE, reason="the Triton tests ran in this process")
def test_triton_in_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "1 skipped" in summary, summary  # only this test skipped there


def grads_of(fn, inputs, out_grads):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, inputs, out_grads(outs))
    return [o.detach() for o in outs], list(grads)


# --- INL dynamics -------------------------------------------------------------------------------------------
def dynamics_inputs(dtype, N=37, H=8, seed=0):
    """c, a, v, mu with clamps active on both sides and rows exactly on the clamp bounds (beta_max=25: softplus
    is the identity above 20, so c_beta=25 gives beta == beta_max exactly; c_alpha=100 gives alpha == 1 and
    a == mu gives v_next == v exactly)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(N, 3 * H, generator=g) * 4
    a, v, mu = (torch.randn(N, H, generator=g) * s for s in (3.0, 6.0, 1.0))
    c[0, H:2 * H] = torch.tensor([25.0, 30.0, 20.0, 21.0, -30.0, 24.99, 0.0, 5.0])  # beta at/over/under bound
    c[0, :H], a[0], v[0] = 0.0, mu[0] + 0.1, 0.5  # row 0 inside the v clamp: its beta gradients show
    c[1:3, :H] = 100.0  # alpha == 1
    a[1:3] = mu[1:3]
    v[1] = torch.tensor([3.0, -3.0, 2.5, -2.5, 3.5, -3.5, 0.0, 1.0])  # v_next on +-v_clamp exactly, and past
    v[2] = -v[1]
    return [t.to(DEVICE, dtype) for t in (c, a, v, mu)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inl_dynamics_kernel_matches_torch(dtype):
    c, a, v, mu = dynamics_inputs(dtype)
    assert kernels.triton_runs_on(a)
    consts = (0.1, 25.0, 3.0)  # dt, beta_max, v_clamp
    g = torch.Generator().manual_seed(1)
    out_grads = lambda outs: [torch.randn(o.shape, generator=g).to(o) for o in outs]  # noqa: E731
    want, want_g = grads_of(lambda *x: inl_update_torch(*x, *consts), (c, a, v, mu), out_grads)
    g.manual_seed(1)
    got, got_g = grads_of(lambda *x: inl_update_triton(*x, *consts), (c, a, v, mu), out_grads)
    tol = {} if dtype == torch.float32 else BF16
    for x, y in zip(got + got_g, want + want_g):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, **tol)
    if dtype == torch.float32:
        # the bounds really were hit: beta at beta_max passes gradient, above it none; v_next at +-v_clamp
        # passes gradient, past it none (torch.clamp's rule, bounds included)
        H = a.shape[1]
        gcb = got_g[0][0, H:2 * H]
        assert gcb[0] != 0 and gcb[1] == 0 and gcb[2] != 0
        assert (got[1][1, [0, 1, 4, 5]].abs() == 3.0).all()
        assert (got_g[2][1, :4] != 0).all() and (got_g[2][1, 4:6] == 0).all()


@needs_triton
def test_inl_dynamics_one_output_used():
    """A layer whose v_next is unused downstream (the last layer) gets None for that output's gradient."""
    c, a, v, mu = dynamics_inputs(torch.float32, seed=2)
    ones = lambda outs: [torch.ones_like(outs[0])]  # noqa: E731
    _, want = grads_of(lambda *x: inl_update_torch(*x, 0.1, 2.0, 10.0)[0], (c, a, v, mu), ones)
    _, got = grads_of(lambda *x: inl_update_triton(*x, 0.1, 2.0, 10.0)[0], (c, a, v, mu), ones)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("kernel", ["triton", "torch_math"])
def test_inl_dynamics_ops_compile_to_the_eager_gradients(backend, kernel, monkeypatch):
    """Compiled (each decoder layer is, with train.compile), the kernels are two opaque ops in one graph
    (fullgraph: no break around them), and every gradient equals the torch math's, also when the layer's v_next
    is unused. On torch 2.11 a Function returning its op's own outputs got zero gradients when compiled (pytorch
    issue 180642): this is the check for it. Where Triton cannot run (CPU without the interpreter) the ops run
    the torch math: the same graph around them."""
    if kernel == "triton" and not TRITON_HERE:
        pytest.skip("triton.language was imported compiled on CPU; test_triton_in_fresh_process runs this")
    if kernel == "torch_math" and DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    c, a, v, mu = dynamics_inputs(torch.float32, seed=3)
    assert kernels.triton_runs_on(a) == (kernel == "triton" or DEVICE == "cuda")
    consts = (0.1, 25.0, 3.0)
    ones = lambda outs: [torch.ones_like(o) for o in outs]  # noqa: E731
    torch._dynamo.reset()
    both = torch.compile(lambda *x: inl_update_triton(*x, *consts), backend=backend, fullgraph=True)
    first = torch.compile(lambda *x: inl_update_triton(*x, *consts)[0] * 2, backend=backend, fullgraph=True)
    for fn, ref in ((both, lambda *x: inl_update_torch(*x, *consts)),
                    (first, lambda *x: inl_update_torch(*x, *consts)[0] * 2)):
        want, want_g = grads_of(ref, (c, a, v, mu), ones)
        got, got_g = grads_of(fn, (c, a, v, mu), ones)
        for x, y in zip(got + got_g, want + want_g):
            torch.testing.assert_close(x, y)
        assert all(g.abs().sum() > 0 for g in got_g)


# --- fused linear + cross-entropy ---------------------------------------------------------------------------
def ce_inputs(dtype, N=23, H=16, V=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[i for i in (0, 5, 6, 22) if i < N]] = -100  # ignored rows, the last one in a partial chunk
    targets[1] = V - 1
    return hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), targets.to(DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_triton", [False, True], ids=["torch_chunks", "triton"])
def test_fused_linear_cross_entropy_matches_torch(dtype, use_triton):
    hidden, weight, targets = ce_inputs(dtype)
    out_grads = lambda outs: [torch.tensor(2.5, device=DEVICE)]  # backward scales by grad_output  # noqa: E731
    want, want_g = grads_of(lambda h, w: lce.linear_cross_entropy_torch(h, w, targets), (hidden, weight),
                            out_grads)
    # 23 tokens in chunks of 5: the last chunk is partial
    got, got_g = grads_of(lambda h, w: lce.fused_linear_cross_entropy(h, w, targets, chunk_size=5,
                                                                      use_triton=use_triton),
                          (hidden, weight), out_grads)
    assert got[0].dtype == torch.float32
    tol = {} if dtype == torch.float32 else BF16
    for x, y in zip(got + got_g, want + want_g):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, **tol)
    assert (got_g[0][[0, 5, 6, 22]] == 0).all()  # ignored rows get no gradient
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(lce.fused_linear_cross_entropy(hidden, weight, targets, chunk_size=5,
                                                                  use_triton=use_triton), want[0], **tol)


@needs_triton
def test_fused_linear_cross_entropy_vocab_blocks():
    """A vocabulary longer than one Triton block: the online log-sum-exp across blocks."""
    from complexity_dist.kernels import _triton_ce
    hidden, weight, targets = ce_inputs(torch.float32, N=4, V=300)
    old = _triton_ce.BLOCK_V
    _triton_ce.BLOCK_V = 128  # 3 blocks, the last partial
    try:
        got = lce.fused_linear_cross_entropy(hidden, weight, targets, use_triton=True)
    finally:
        _triton_ce.BLOCK_V = old
    torch.testing.assert_close(got, lce.linear_cross_entropy_torch(hidden, weight, targets))


# --- the model -----------------------------------------------------------------------------------------------
def model_pair(monkeypatch, **extra):
    monkeypatch.setattr(lce, "DEFAULT_CHUNK", 7)  # 2 x 16 tokens: 5 chunks, the last partial
    models = []
    for k in ("torch", "triton"):
        cfg = load_config(None, tiny_overrides(**{"model.kernels": k, **extra}))
        torch.manual_seed(0)
        models.append(ComplexityForCausalLM(cfg.model).to(DEVICE))
    models[1].load_state_dict(models[0].state_dict())
    return models


@needs_triton
@pytest.mark.parametrize("tied,compiled", [(True, False), (False, False), (True, True)])
def test_model_triton_kernels_match_torch(monkeypatch, tied, compiled):
    """Loss and every parameter's gradient (the tied embedding/lm_head weight included) equal in fp32; also with
    the layers compiled (train.compile), where the INL kernels are opaque ops inside each layer's graph."""
    # straight_through: mu_router trains too, so every parameter has a gradient to compare
    ref, fused = model_pair(monkeypatch, **{"model.tie_word_embeddings": tied,
                                            "model.mu_router": "straight_through"})
    if compiled:
        torch._dynamo.reset()
        fused.compile_layers()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 17), generator=g).to(DEVICE)
    targets = ids[:, 1:].clone()
    targets[0, :3] = -100
    outs = []
    for m in (ref, fused):
        out = m(ids[:, :-1], targets=targets)
        out.loss.backward()
        outs.append(out)
    assert outs[1].logits is None  # the fused path never built them
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=1e-5)
    ref_grads = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-5, atol=1e-5, msg=name)
    # without targets the logits are there (generate, HF conversion), and decoding is unchanged
    torch.testing.assert_close(fused(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.generate(ids[:1, :4], 3), ref.generate(ids[:1, :4], 3))


@needs_triton
def test_model_keeps_a_layout_loss_seam(monkeypatch):
    """A vocabulary-parallel layout sets model.loss_fn on the instance: then it is what runs, with logits."""
    _, fused = model_pair(monkeypatch)
    seen = []
    fused.loss_fn = lambda logits, targets: seen.append(logits.shape) or logits.float().mean()
    ids = torch.randint(0, 97, (1, 9)).to(DEVICE)
    out = fused(ids[:, :-1], targets=ids[:, 1:])
    assert seen == [(1, 8, 97)] and out.logits is not None


def test_config_kernels_key():
    assert load_config(None, tiny_overrides()).model.kernels == "torch"
    with pytest.raises(ConfigError, match="model.kernels"):
        load_config(None, tiny_overrides(**{"model.kernels": "cuda"}))
    with pytest.raises(ConfigError, match="parallel.zero_stage=3"):
        load_config(None, tiny_overrides(**{"model.kernels": "triton", "parallel.zero_stage": 3}))
    with pytest.raises(ConfigError, match="parallel.pp=2"):
        load_config(None, tiny_overrides(**{"model.kernels": "triton", "parallel.pp": 2,
                                            "parallel.zero_stage": 1})).validate(world_size=2)


def test_triton_check_compiles_without_a_graph_break(monkeypatch):
    """triton_runs_on is traced inside every compiled decoder layer, also inside torch.utils.checkpoint, where a
    graph break makes dynamo run the whole layer eagerly (selective checkpointing ran at half speed on an H200:
    dynamo cannot trace importlib's find_spec on Python 3.12). So it may call nothing dynamo cannot trace."""
    import importlib.util

    def untraceable(*args, **kwargs):
        torch._dynamo.graph_break()

    monkeypatch.setattr(importlib.util, "find_spec", untraceable)
    torch._dynamo.reset()
    check = torch.compile(lambda t: t * 2 if kernels.triton_runs_on(t) else t + 1, fullgraph=True, backend="eager")
    x = torch.ones(3)
    torch.testing.assert_close(check(x), x * 2 if kernels.triton_runs_on(x) else x + 1)
