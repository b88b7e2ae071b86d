"""Triton kernels of complexity_dist/kernels/inl_dynamics.py (imported only when they run)."""
from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _softplus_sigmoid(x, threshold):
    """softplus(x) as F.softplus (identity above threshold) and its derivative (sigmoid; 1 above threshold)."""
    e = tl.exp(tl.minimum(x, threshold))
    sp = tl.where(x > threshold, x, tl.log(1.0 + e))
    dsp = tl.where(x > threshold, 1.0, e / (1.0 + e))
    return sp, dsp


@triton.jit
def _load(c_ptr, a_ptr, v_ptr, mu_ptr, n, H, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row, col = offs // H, offs % H
    cb = row * 3 * H + col  # c = [c_alpha | c_beta | c_gate] along the last dim
    ca = tl.load(c_ptr + cb, mask=mask, other=0.0).to(tl.float32)
    cbeta = tl.load(c_ptr + cb + H, mask=mask, other=0.0).to(tl.float32)
    cg = tl.load(c_ptr + cb + 2 * H, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return offs, mask, cb, ca, cbeta, cg, a, v, mu


@triton.jit
def triton_inl_fwd(c_ptr, a_ptr, v_ptr, mu_ptr, an_ptr, vn_ptr, n, H, dt, beta_max, v_clamp, threshold,
                   BLOCK: tl.constexpr):
    offs, mask, cb, ca, cbeta, cg, a, v, mu = _load(c_ptr, a_ptr, v_ptr, mu_ptr, n, H, BLOCK)
    alpha = tl.sigmoid(ca)
    sp, _ = _softplus_sigmoid(cbeta, threshold)
    beta = tl.minimum(sp, beta_max)
    gate = tl.sigmoid(cg)
    u = alpha * v - beta * (a - mu)
    vn = tl.minimum(tl.maximum(u, -v_clamp), v_clamp)
    an = a + dt * gate * vn
    tl.store(vn_ptr + offs, vn.to(vn_ptr.dtype.element_ty), mask=mask)
    tl.store(an_ptr + offs, an.to(an_ptr.dtype.element_ty), mask=mask)


@triton.jit
def triton_inl_bwd(c_ptr, a_ptr, v_ptr, mu_ptr, gan_ptr, gvn_ptr, gc_ptr, ga_ptr, gv_ptr, gmu_ptr,
                   n, H, dt, beta_max, v_clamp, threshold, BLOCK: tl.constexpr):
    offs, mask, cb, ca, cbeta, cg, a, v, mu = _load(c_ptr, a_ptr, v_ptr, mu_ptr, n, H, BLOCK)
    g_an = tl.load(gan_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g_vn = tl.load(gvn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.sigmoid(ca)
    sp, dsp = _softplus_sigmoid(cbeta, threshold)
    beta = tl.minimum(sp, beta_max)
    gate = tl.sigmoid(cg)
    d = a - mu
    u = alpha * v - beta * d
    vn = tl.minimum(tl.maximum(u, -v_clamp), v_clamp)
    # a_next = a + dt * gate * v_next
    g_gate = g_an * dt * vn
    g_u = tl.where((u >= -v_clamp) & (u <= v_clamp), g_vn + g_an * dt * gate, 0.0)
    # u = alpha * v - beta * (a - mu)
    g_beta = -g_u * d
    g_ca = g_u * v * alpha * (1.0 - alpha)
    g_cb = tl.where(sp <= beta_max, g_beta * dsp, 0.0)
    g_cg = g_gate * gate * (1.0 - gate)
    tl.store(gc_ptr + cb, g_ca.to(gc_ptr.dtype.element_ty), mask=mask)
    tl.store(gc_ptr + cb + H, g_cb.to(gc_ptr.dtype.element_ty), mask=mask)
    tl.store(gc_ptr + cb + 2 * H, g_cg.to(gc_ptr.dtype.element_ty), mask=mask)
    tl.store(ga_ptr + offs, (g_an - g_u * beta).to(ga_ptr.dtype.element_ty), mask=mask)
    tl.store(gv_ptr + offs, (g_u * alpha).to(gv_ptr.dtype.element_ty), mask=mask)
    tl.store(gmu_ptr + offs, (g_u * beta).to(gmu_ptr.dtype.element_ty), mask=mask)


def forward(c, a, v, mu, a_next, v_next, H, dt, beta_max, v_clamp):
    n = a.numel()
    triton_inl_fwd[(triton.cdiv(n, BLOCK),)](c, a, v, mu, a_next, v_next, n, H, dt, beta_max, v_clamp, 20.0,
                                             BLOCK=BLOCK)


def backward(c, a, v, mu, g_an, g_vn, g_c, g_a, g_v, g_mu, H, dt, beta_max, v_clamp):
    n = a.numel()
    triton_inl_bwd[(triton.cdiv(n, BLOCK),)](c, a, v, mu, g_an, g_vn, g_c, g_a, g_v, g_mu, n, H, dt, beta_max,
                                             v_clamp, 20.0, BLOCK=BLOCK)
