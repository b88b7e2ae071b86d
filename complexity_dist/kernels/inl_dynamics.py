"""The elementwise tail of the INL dynamics (complexity_dist/model/dynamics.py): given the controller output
c = [c_alpha | c_beta | c_gate] ([..., 3H]), the attention output a, the velocity v and mu ([..., H]):

    alpha = sigmoid(c_alpha)      beta = min(softplus(c_beta), beta_max)      gate = sigmoid(c_gate)
    v_next = clamp(alpha * v - beta * (a - mu), -v_clamp, v_clamp)
    a_next = a + dt * gate * v_next

`inl_update_torch` is the math (what the model runs with model.kernels=torch); `inl_update_triton` is one
Triton kernel forward and one backward with the gradients torch autograd gives `inl_update_torch`: a clamp
passes gradient only inside its range, bounds included (torch.clamp's rule), and softplus is the identity
above 20 (F.softplus's threshold). The kernels compute in fp32 whatever the storage dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from complexity_dist.kernels import triton_runs_on
from complexity_dist.torch_compat import function_output

SOFTPLUS_THRESHOLD = 20.0  # F.softplus default: above it softplus(x) = x


def inl_update_torch(c, a, v, mu, dt: float, beta_max: float, v_clamp: float):
    """(a_next, v_next); the reference for the kernel and the model's own code path."""
    c_a, c_b, c_g = c.chunk(3, dim=-1)
    alpha = torch.sigmoid(c_a)
    beta = torch.clamp(F.softplus(c_b), max=beta_max)  # the clamp prevents the late-training NaN
    gate = torch.sigmoid(c_g)
    v_next = torch.clamp(alpha * v - beta * (a - mu), -v_clamp, v_clamp)
    a_next = a + dt * gate * v_next
    return a_next, v_next


def inl_update(c, a, v, mu, dt: float, beta_max: float, v_clamp: float):
    """The Triton kernels where they can run on these tensors, else the torch math. Inside torch.compile
    (train.compile=true compiles each decoder layer) the kernels are two ops of their own, opaque to the compiler
    (defined below), so the layer stays one graph around them."""
    if triton_runs_on(a):
        return inl_update_triton(c, a, v, mu, dt, beta_max, v_clamp)
    return inl_update_torch(c, a, v, mu, dt, beta_max, v_clamp)


def inl_update_triton(c, a, v, mu, dt: float, beta_max: float, v_clamp: float):
    return _INLUpdate.apply(c, a, v, mu, float(dt), float(beta_max), float(v_clamp))


# The forward and the backward kernel as ops on a plain torch.library.Library (as complexity_dist/parallel/fp8.py
# does, for its lower host cost per call than torch.library.custom_op's), one implementation for CPU (the
# interpreter, or the torch math) and CUDA, with shape-only fakes for the compiler.
_LIBRARY = torch.library.Library("complexity_dist", "FRAGMENT")
_LIBRARY.define("inl_update_fwd(Tensor c, Tensor a, Tensor v, Tensor mu, float dt, float beta_max, float v_clamp)"
                " -> (Tensor, Tensor)")
_LIBRARY.define("inl_update_bwd(Tensor c, Tensor a, Tensor v, Tensor mu, Tensor g_an, Tensor g_vn, float dt, "
                "float beta_max, float v_clamp) -> (Tensor, Tensor, Tensor, Tensor)")


@torch.library.register_fake("complexity_dist::inl_update_fwd")
def _(c, a, v, mu, dt, beta_max, v_clamp):
    return torch.empty_like(a), torch.empty_like(a)


@torch.library.register_fake("complexity_dist::inl_update_bwd")
def _(c, a, v, mu, g_an, g_vn, dt, beta_max, v_clamp):
    return torch.empty_like(c), torch.empty_like(a), torch.empty_like(v), torch.empty_like(mu)


def _forward_impl(c, a, v, mu, dt, beta_max, v_clamp):
    if not triton_runs_on(a):  # CPU without the interpreter: the same math in torch
        return inl_update_torch(c, a, v, mu, dt, beta_max, v_clamp)
    from complexity_dist.kernels import _triton_inl as k
    c, a, v, mu = (t.contiguous() for t in (c, a, v, mu))
    a_next, v_next = torch.empty_like(a), torch.empty_like(a)
    k.forward(c, a, v, mu, a_next, v_next, a.shape[-1], dt, beta_max, v_clamp)
    return a_next, v_next


def _backward_impl(c, a, v, mu, g_an, g_vn, dt, beta_max, v_clamp):
    if not triton_runs_on(a):
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (c, a, v, mu)]
            outputs = inl_update_torch(*inputs, dt, beta_max, v_clamp)
            return torch.autograd.grad(outputs, inputs, (g_an, g_vn))
    from complexity_dist.kernels import _triton_inl as k
    c, a, v, mu, g_an, g_vn = (t.contiguous() for t in (c, a, v, mu, g_an, g_vn))
    g_c, g_a, g_v, g_mu = torch.empty_like(c), torch.empty_like(a), torch.empty_like(v), torch.empty_like(mu)
    k.backward(c, a, v, mu, g_an, g_vn, g_c, g_a, g_v, g_mu, a.shape[-1], dt, beta_max, v_clamp)
    return g_c, g_a, g_v, g_mu


for _device in ("CPU", "CUDA"):
    _LIBRARY.impl("inl_update_fwd", _forward_impl, _device)
    _LIBRARY.impl("inl_update_bwd", _backward_impl, _device)


class _INLUpdate(torch.autograd.Function):
    # returns function_output(...) of the ops' outputs (complexity_dist/torch_compat.py: a torch 2.11 bug)
    @staticmethod
    def forward(ctx, c, a, v, mu, dt, beta_max, v_clamp):
        a_next, v_next = torch.ops.complexity_dist.inl_update_fwd(c, a, v, mu, dt, beta_max, v_clamp)
        ctx.save_for_backward(c, a, v, mu)
        ctx.consts = (dt, beta_max, v_clamp)
        return function_output(a_next), function_output(v_next)

    @staticmethod
    def backward(ctx, g_an, g_vn):
        c, a, v, mu = ctx.saved_tensors
        # an output unused downstream arrives as None: zeros keep one kernel
        g_an = torch.zeros_like(a) if g_an is None else g_an
        g_vn = torch.zeros_like(a) if g_vn is None else g_vn
        grads = torch.ops.complexity_dist.inl_update_bwd(c, a, v, mu, g_an, g_vn, *ctx.consts)
        return (*(function_output(g) for g in grads), None, None, None)
