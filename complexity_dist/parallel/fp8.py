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


@torch.library.custom_op("complexity_dist::fp8_grouped_mm", mutates_args=())
def fp8_grouped_mm(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor,
                   offs: torch.Tensor, fast_accum: bool) -> torch.Tensor:
    """Rows offs[g-1]..offs[g] of a [M, K] times b[g] [K, N], for each group g, in bf16 [M, N]. a and b in
    E4M3, a_inv one inverse scale, b_inv one per group. An opaque op, so the compiler cannot hand the kernel
    operands in a layout it does not take (the layouts are fixed here, free when already right)."""
    if a.device.type == "cuda":
        return _cuda_grouped_mm(a, a_inv, b, b_inv, offs, fast_accum)
    return _reference_grouped_mm(a, a_inv, b, b_inv, offs)


@fp8_grouped_mm.register_fake
def _(a, a_inv, b, b_inv, offs, fast_accum):
    return a.new_empty(a.shape[0], b.shape[-1], dtype=torch.bfloat16)


@torch.library.custom_op("complexity_dist::fp8_grouped_weight_grad", mutates_args=())
def fp8_grouped_weight_grad(a: torch.Tensor, a_inv: torch.Tensor, g: torch.Tensor, g_inv: torch.Tensor,
                            offs: torch.Tensor) -> torch.Tensor:
    """For each group: a[rows of g]^T @ g[rows of g], in bf16 [G, K, N] (a [M, K], g [M, N] in E4M3, one
    inverse scale each): the weight gradient of fp8_grouped_mm."""
    if a.device.type == "cuda":
        return _cuda_grouped_weight_grad(a, a_inv, g, g_inv, offs)
    return _reference_grouped_weight_grad(a, a_inv, g, g_inv, offs)


@fp8_grouped_weight_grad.register_fake
def _(a, a_inv, g, g_inv, offs):
    return a.new_empty(offs.shape[0], a.shape[1], g.shape[1], dtype=torch.bfloat16)


def _cuda_grouped_mm(a, a_inv, b, b_inv, offs, fast_accum):
    """torch._scaled_grouped_mm (sm90): a row-major, b column-major, scales per row of a and per group and
    column of b (ours are constant along those: one per tensor, one per expert)."""
    M, G, N = a.shape[0], b.shape[0], b.shape[-1]
    return torch._scaled_grouped_mm(a.contiguous(), _col_major(b), a_inv.expand(M).contiguous(),
                                    b_inv.unsqueeze(1).expand(G, N).contiguous(), offs=offs,
                                    out_dtype=torch.bfloat16, use_fast_accum=fast_accum)


def _cuda_grouped_weight_grad(a, a_inv, g, g_inv, offs):
    """The op's 2d x 2d form: groups along the contraction (the rows); a^T row-major [K, M], g column-major
    [M, N], scales per group and row of a^T / per group and column of g."""
    K, N, G = a.shape[1], g.shape[1], offs.shape[0]
    return torch._scaled_grouped_mm(a.t().contiguous(), _col_major(g), a_inv.expand(G * K).contiguous(),
                                    g_inv.expand(G * N).contiguous(), offs=offs, out_dtype=torch.bfloat16)


def _row_groups(offs: torch.Tensor, rows: int) -> torch.Tensor:
    """The group of each row (len(offs) for rows past the last offset)."""
    return torch.searchsorted(offs, torch.arange(rows, device=offs.device, dtype=offs.dtype), right=True)


def _reference_grouped_mm(a, a_inv, b, b_inv, offs):
    """What the kernel computes, from the dequantized operands in fp32 (CPU; the kernel is CUDA-only). No
    host sync: every group's product is taken over all rows and masked."""
    group, a32 = _row_groups(offs, a.shape[0]), a.float() * a_inv
    out = a32.new_zeros(a.shape[0], b.shape[-1])
    for e in range(b.shape[0]):
        out = torch.where((group == e).unsqueeze(1), a32 @ (b[e].float() * b_inv[e]), out)
    return out.to(torch.bfloat16)


def _reference_grouped_weight_grad(a, a_inv, g, g_inv, offs):
    group, a32, g32 = _row_groups(offs, a.shape[0]), a.float() * a_inv, g.float() * g_inv
    return torch.stack([(a32 * (group == e).unsqueeze(1)).t() @ g32 for e in range(offs.shape[0])]
                       ).to(torch.bfloat16)


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
        return fp8_grouped_mm(r8, r_inv, w8, w_inv, offs, True).to(rows.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        r8, r_inv, w8, w_inv, offs = ctx.saved_tensors
        g8, g_inv = scaled_fp8(grad, FORWARD_DTYPE)
        grad_rows = grad_weight = None
        if ctx.needs_input_grad[0]:  # [R, N] @ weight[g]^T [N, K]
            grad_rows = fp8_grouped_mm(g8, g_inv, w8.transpose(-2, -1), w_inv, offs, False).to(ctx.rows_dtype)
        if ctx.needs_input_grad[1]:  # rows of g: [K, R_g] @ [R_g, N]
            grad_weight = fp8_grouped_weight_grad(r8, r_inv, g8, g_inv, offs).to(ctx.weight_dtype)
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
