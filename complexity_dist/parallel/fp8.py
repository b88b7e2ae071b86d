"""train.fp8=current with model.linear_backend=torch: the large dense projections as FP8 GEMMs
(`torch._scaled_mm`), with per-tensor scales taken from each tensor's own absolute maximum ("current" scaling).

Applied from outside, like a layout (complexity_dist/parallel/parallelize.py), after tensor and expert parallel:

    attention q/k/v + mu_to_q/k/v   the stacked [n, mu_prev] GEMM (the attention's `linear` seam)
    attention o_proj, dynamics mu_proj   the module's class becomes Fp8Linear (same Parameters, names, hooks)
    experts (train.fp8_experts)       gate_up and down as FP8 grouped GEMMs (the experts' `expert_forward`)

Left in bf16: the dynamics controller (its GEMMs have 64 output or input features: FP8 measured no faster at
K=64 or N=192 on an H200), the experts unless train.fp8_experts, the embedding, the tied lm_head and the loss,
the norms.

Numerics (the HYBRID format, as Transformer Engine's): forward operands in E4M3 (max 448), the output gradient
in E5M2 (max 57344); each operand is scaled so that its largest magnitude lands on the format's largest value,
and the GEMM multiplies the inverse scales back in, accumulating in fp32 and writing the input's dtype. Forward
GEMMs use the faster accumulation (`use_fast_accum`), the two gradient GEMMs the exact one. Backward reuses the
FP8 copies of the input and weight saved by the forward (half the bytes of the bf16 activations they replace).

Written in plain torch ops around `torch._scaled_mm`, so `train.compile` traces it: inductor fuses the amax
reductions and casts into the neighbouring elementwise kernels. Under tensor parallel each rank scales its own
shard (the GEMMs are local; the plan's hooks keep the communication). `torch._scaled_mm` needs an FP8-capable
GPU (compute capability 8.9+: H100, H200, L40S) and every GEMM dimension divisible by 16; the CPU build runs it
too (tests). The experts' `torch._scaled_grouped_mm` runs on sm90 (H100, H200) only; on CPU its reference runs
instead (the product of the dequantized operands, tests/test_fp8_experts.py).
"""
from __future__ import annotations

import torch
from torch import nn

from complexity_dist.model.experts import grouped_expert_forward, grouped_gemm_experts, use_grouped_kernel
from complexity_dist.torch_compat import function_output

FORWARD_DTYPE = torch.float8_e4m3fn
GRAD_DTYPE = torch.float8_e5m2


def scaled_fp8(x: torch.Tensor, dtype: torch.dtype, per_group: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in `dtype` scaled so that max|x| maps to the format's largest value, the fp32 inverse scale).
    per_group: one scale per index of the first dimension (each expert's weight matrix), inverse scales [G]."""
    fmax = torch.finfo(dtype).max
    magnitude = x.detach().abs()
    amax = (magnitude.flatten(1).amax(1) if per_group else magnitude.amax()).float()
    scale = fmax / amax.clamp_min(1e-12)  # an all-zero tensor stays zero
    expanded = scale.view(-1, *[1] * (x.dim() - 1)) if per_group else scale
    return (x.float() * expanded).clamp(-fmax, fmax).to(dtype), scale.reciprocal()


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrices with column-major strides in the last two dimensions (the second operand layout
    torch's scaled GEMMs take); free when `t` is laid out so already."""
    return t.transpose(-2, -1).contiguous().transpose(-2, -1)


class _Fp8Matmul(torch.autograd.Function):
    """x [M, K] @ weight[N, K]^T in FP8; gradients for both, from the saved FP8 copies."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x8, x_inv = scaled_fp8(x, FORWARD_DTYPE)
        w8, w_inv = scaled_fp8(weight, FORWARD_DTYPE)
        out = torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x.dtype, use_fast_accum=True)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = scaled_fp8(grad.contiguous(), GRAD_DTYPE)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # [M, N] @ [N, K]
            grad_x = torch._scaled_mm(g8, _col_major(w8), scale_a=g_inv, scale_b=w_inv, out_dtype=ctx.x_dtype)
        if ctx.needs_input_grad[1]:  # [N, M] @ [M, K]
            grad_w = torch._scaled_mm(g8.t().contiguous(), _col_major(x8), scale_a=g_inv, scale_b=x_inv,
                                      out_dtype=ctx.w_dtype)
        return grad_x, grad_w


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with the matrix product in FP8 (x of any leading shape)."""
    out = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), weight)
    out = out.view(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


class Fp8Linear(nn.Linear):
    """nn.Linear whose product runs through fp8_linear. Made by swapping the class of an existing nn.Linear, so
    its Parameters, checkpoint names and a layout's hooks stay as they were."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias)


# --- the experts (train.fp8_experts): grouped GEMMs in FP8 ----------------------------------------------------

# Every expert's group of rows starts on a multiple of 16: the weight-gradient GEMM contracts over the rows, and
# its FP8 operands' groups must start 16-byte aligned.
EXPERT_ROW_ALIGN = 16


# The two grouped GEMMs are ops of their own, opaque to the compiler: it cannot hand the kernel operands in a
# layout it does not take. Defined on a plain torch.library.Library with one kernel per device (not
# torch.library.custom_op, whose Python wrapping measured ~0.2 ms of host time per call on an H200: more than the
# GEMM takes on the device at 1.5b sizes). Callers pass the operands exactly as the kernel takes them
# (`grouped_mm_operands`, `weight_grad_operands`: plain torch ops, which the compiler fuses into the quantization
# kernels); the CUDA kernels still fix a wrong layout themselves, at the price of a copy.
_LIBRARY = torch.library.Library("complexity_dist", "FRAGMENT")
_FIXED_LAYOUT = (torch.Tag.needs_fixed_stride_order,)  # the compiler keeps the traced strides of the operands
_LIBRARY.define("fp8_grouped_mm(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor offs, bool fast_accum)"
                " -> Tensor", tags=_FIXED_LAYOUT)
_LIBRARY.define("fp8_grouped_weight_grad(Tensor a_t, Tensor a_scale, Tensor g, Tensor g_scale, Tensor offs)"
                " -> Tensor", tags=_FIXED_LAYOUT)
fp8_grouped_mm = torch.ops.complexity_dist.fp8_grouped_mm.default
"""Rows offs[g-1]..offs[g] of a [M, K] times b[g] [K, N], for each group g, in bf16 [M, N]. a row-major and b
column-major, in E4M3; a_scale [M] one inverse scale per row of a, b_scale [G, N] one per group and column of b."""
fp8_grouped_weight_grad = torch.ops.complexity_dist.fp8_grouped_weight_grad.default
"""For each group g: a_t[:, rows of g] @ g[rows of g], in bf16 [G, K, N]: the weight gradient of
fp8_grouped_mm. a_t [K, M] row-major, g [M, N] column-major, in E4M3; a_scale [G * K] one inverse scale per group
and row of a_t, g_scale [G * N] one per group and column of g."""


def grouped_mm_operands(a8: torch.Tensor, a_inv: torch.Tensor, b8: torch.Tensor, b_inv: torch.Tensor):
    """fp8_grouped_mm's a, a_scale, b, b_scale from a [M, K] with one inverse scale and b [G, K, N] with one per
    group (scaled_fp8's outputs)."""
    G, N = b8.shape[0], b8.shape[-1]
    return (a8.contiguous(), a_inv.expand(a8.shape[0]).contiguous(), _col_major(b8),
            b_inv.unsqueeze(1).expand(G, N).contiguous())


def weight_grad_operands(a8: torch.Tensor, a_inv: torch.Tensor, g8: torch.Tensor, g_inv: torch.Tensor,
                         groups: int):
    """fp8_grouped_weight_grad's a_t, a_scale, g, g_scale from a [M, K] and g [M, N], one inverse scale each."""
    return (a8.t().contiguous(), a_inv.expand(groups * a8.shape[1]).contiguous(), _col_major(g8),
            g_inv.expand(groups * g8.shape[1]).contiguous())


@torch.library.register_fake("complexity_dist::fp8_grouped_mm")
def _(a, a_scale, b, b_scale, offs, fast_accum):
    return a.new_empty(a.shape[0], b.shape[-1], dtype=torch.bfloat16)


@torch.library.register_fake("complexity_dist::fp8_grouped_weight_grad")
def _(a_t, a_scale, g, g_scale, offs):
    return a_t.new_empty(offs.shape[0], a_t.shape[0], g.shape[1], dtype=torch.bfloat16)


def _cuda_grouped_mm(a, a_scale, b, b_scale, offs, fast_accum):
    """torch._scaled_grouped_mm, 2d x 3d (sm90)."""
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-2) == 1 else _col_major(b)
    return torch._scaled_grouped_mm(a, b, a_scale, b_scale, offs=offs, out_dtype=torch.bfloat16,
                                    use_fast_accum=fast_accum)


def _cuda_grouped_weight_grad(a_t, a_scale, g, g_scale, offs):
    """torch._scaled_grouped_mm, 2d x 2d: the groups run along the contraction (the rows of g)."""
    a_t = a_t if a_t.stride(-1) == 1 else a_t.contiguous()
    g = g if g.stride(-2) == 1 else _col_major(g)
    return torch._scaled_grouped_mm(a_t, g, a_scale, g_scale, offs=offs, out_dtype=torch.bfloat16)


def _row_groups(offs: torch.Tensor, rows: int) -> torch.Tensor:
    """The group of each row (len(offs) for rows past the last offset)."""
    return torch.searchsorted(offs, torch.arange(rows, device=offs.device, dtype=offs.dtype), right=True)


def _reference_grouped_mm(a, a_scale, b, b_scale, offs, fast_accum=False):
    """What the kernel computes, from the dequantized operands in fp32 (CPU; the kernel is CUDA-only), always
    with exact accumulation (fast_accum is the kernel's option). No host sync: every group's product is taken
    over all rows and masked."""
    group, a32 = _row_groups(offs, a.shape[0]), a.float() * a_scale.unsqueeze(1)
    out = a32.new_zeros(a.shape[0], b.shape[-1])
    for e in range(b.shape[0]):
        out = torch.where((group == e).unsqueeze(1), a32 @ (b[e].float() * b_scale[e]), out)
    return out.to(torch.bfloat16)


def _reference_grouped_weight_grad(a_t, a_scale, g, g_scale, offs):
    G, K, N = offs.shape[0], a_t.shape[0], g.shape[1]
    group, a_scale, g_scale = _row_groups(offs, g.shape[0]), a_scale.view(G, K, 1), g_scale.view(G, N)
    a32, g32 = a_t.float(), g.float()
    return torch.stack([(a32 * (group == e) * a_scale[e]) @ (g32 * g_scale[e]) for e in range(G)]
                       ).to(torch.bfloat16)


_LIBRARY.impl("fp8_grouped_mm", _cuda_grouped_mm, "CUDA")
_LIBRARY.impl("fp8_grouped_mm", _reference_grouped_mm, "CPU")
_LIBRARY.impl("fp8_grouped_weight_grad", _cuda_grouped_weight_grad, "CUDA")
_LIBRARY.impl("fp8_grouped_weight_grad", _reference_grouped_weight_grad, "CPU")


class _Fp8GroupedGemm(torch.autograd.Function):
    """rows [R, K] (grouped by offs) @ weight[g] [K, N] per group in FP8: rows scaled per tensor, each expert's
    weight by its own amax; gradients for both from the saved FP8 copies. The output gradient is E4M3 here,
    not the dense GEMMs' E5M2: torch's grouped FP8 kernel takes E4M3 operands only."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        r8, r_inv = scaled_fp8(rows, FORWARD_DTYPE)
        w8, w_inv = scaled_fp8(weight, FORWARD_DTYPE, per_group=True)
        ctx.save_for_backward(r8, r_inv, w8, w_inv, offs)
        ctx.rows_dtype, ctx.weight_dtype = rows.dtype, weight.dtype
        # a view, not the op's own output: returning that, torch 2.11's compile gave the experts and the norm before
        # them zero gradients (complexity_dist/torch_compat.py)
        return function_output(fp8_grouped_mm(*grouped_mm_operands(r8, r_inv, w8, w_inv), offs, True).to(rows.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        r8, r_inv, w8, w_inv, offs = ctx.saved_tensors
        g8, g_inv = scaled_fp8(grad, FORWARD_DTYPE)
        grad_rows = grad_weight = None
        if ctx.needs_input_grad[0]:  # [R, N] @ weight[g]^T [N, K]
            grad_rows = function_output(fp8_grouped_mm(
                *grouped_mm_operands(g8, g_inv, w8.transpose(-2, -1), w_inv), offs, False).to(ctx.rows_dtype))
        if ctx.needs_input_grad[1]:  # rows of g: [K, R_g] @ [R_g, N]
            grad_weight = function_output(fp8_grouped_weight_grad(
                *weight_grad_operands(r8, r_inv, g8, g_inv, offs.shape[0]), offs).to(ctx.weight_dtype))
        return grad_rows, grad_weight, None


def fp8_expert_forward(x: torch.Tensor, expert: torch.Tensor, gate_up: torch.Tensor,
                       down: torch.Tensor) -> torch.Tensor:
    """grouped_expert_forward (complexity_dist/model/experts.py) with both grouped GEMMs in FP8. On a GPU where
    torch's grouped kernels do not run (refused up front by the config check), with parameters that are not
    bf16 (train.precision=fp32) and for an empty batch: the plain experts."""
    if x.shape[0] == 0 or (x.is_cuda and not use_grouped_kernel(x, gate_up, down)):
        return grouped_expert_forward(x, expert, gate_up, down)
    return grouped_gemm_experts(x, expert, gate_up, down, gemm=_Fp8GroupedGemm.apply, row_align=EXPERT_ROW_ALIGN)


def apply_fp8(model: nn.Module, experts: bool = False) -> nn.Module:
    """Run the large dense projections of a ComplexityForCausalLM (already laid out) in FP8, in place; with
    `experts`, the experts' grouped GEMMs too."""
    for layer in model.model.layers:
        attn = layer.self_attn
        if type(attn.o_proj) is not nn.Linear or attn.__dict__.get("project_qkv") is not None:
            # another backend's modules or projection seam (megatron, te, the TP overlap): refused in
            # complexity_dist/parallel/parallelize.py before it gets here
            raise ValueError("train.fp8 with model.linear_backend=torch expects the torch backend's projections")
        attn.linear = fp8_linear
        attn.o_proj.__class__ = Fp8Linear
        layer.dynamics.mu_proj.__class__ = Fp8Linear
        if experts:
            layer.mlp.expert_forward = fp8_expert_forward
    return model
