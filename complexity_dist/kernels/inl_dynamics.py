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
    """The Triton kernel where it can run on these tensors, else the torch math. Inside torch.compile
    (train.compile=true compiles each decoder layer) the torch math is traced instead: the compiler fuses
    this elementwise tail into its own kernels, and an opaque call would cut the layer's graph in two."""
    if triton_runs_on(a) and not torch.compiler.is_compiling():
        return inl_update_triton(c, a, v, mu, dt, beta_max, v_clamp)
    return inl_update_torch(c, a, v, mu, dt, beta_max, v_clamp)


def inl_update_triton(c, a, v, mu, dt: float, beta_max: float, v_clamp: float):
    return _INLUpdate.apply(c, a, v, mu, float(dt), float(beta_max), float(v_clamp))


class _INLUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c, a, v, mu, dt, beta_max, v_clamp):
        from complexity_dist.kernels import _triton_inl as k
        H = a.shape[-1]
        c, a, v, mu = (t.contiguous() for t in (c, a, v, mu))
        a_next, v_next = torch.empty_like(a), torch.empty_like(a)
        k.forward(c, a, v, mu, a_next, v_next, H, dt, beta_max, v_clamp)
        ctx.save_for_backward(c, a, v, mu)
        ctx.consts = (H, dt, beta_max, v_clamp)
        return a_next, v_next

    @staticmethod
    def backward(ctx, g_an, g_vn):
        from complexity_dist.kernels import _triton_inl as k
        c, a, v, mu = ctx.saved_tensors
        H, dt, beta_max, v_clamp = ctx.consts
        # an output unused downstream arrives as None: zeros keep one kernel
        g_an = torch.zeros_like(a) if g_an is None else g_an.contiguous()
        g_vn = torch.zeros_like(a) if g_vn is None else g_vn.contiguous()
        g_c, g_a, g_v, g_mu = torch.empty_like(c), torch.empty_like(a), torch.empty_like(v), torch.empty_like(mu)
        k.backward(c, a, v, mu, g_an, g_vn, g_c, g_a, g_v, g_mu, H, dt, beta_max, v_clamp)
        return g_c, g_a, g_v, g_mu, None, None, None
