"""train.fp8=current with model.linear_backend=torch: the large dense projections as FP8 GEMMs
(`torch._scaled_mm`), with per-tensor scales taken from each tensor's own absolute maximum ("current" scaling).

Applied from outside, like a layout (complexity_dist/parallel/parallelize.py), after tensor and expert parallel:

    attention q/k/v + mu_to_q/k/v   the stacked [n, mu_prev] GEMM (the attention's `linear` seam)
    attention o_proj, dynamics mu_proj   the module's class becomes Fp8Linear (same Parameters, names, hooks)

Left in bf16: the dynamics controller (its GEMMs have 64 output or input features: FP8 measured no faster at
K=64 or N=192 on an H200), the experts (grouped GEMMs), the embedding, the tied lm_head and the loss, the norms.

Numerics (the HYBRID format, as Transformer Engine's): forward operands in E4M3 (max 448), the output gradient
in E5M2 (max 57344); each operand is scaled so that its largest magnitude lands on the format's largest value,
and the GEMM multiplies the inverse scales back in, accumulating in fp32 and writing the input's dtype. Forward
GEMMs use the faster accumulation (`use_fast_accum`), the two gradient GEMMs the exact one. Backward reuses the
FP8 copies of the input and weight saved by the forward (half the bytes of the bf16 activations they replace).

Written in plain torch ops around `torch._scaled_mm`, so `train.compile` traces it: inductor fuses the amax
reductions and casts into the neighbouring elementwise kernels. Under tensor parallel each rank scales its own
shard (the GEMMs are local; the plan's hooks keep the communication). `torch._scaled_mm` needs an FP8-capable
GPU (compute capability 8.9+: H100, H200, L40S) and every GEMM dimension divisible by 16; the CPU build runs it
too (tests).
"""
from __future__ import annotations

import torch
from torch import nn

FORWARD_DTYPE = torch.float8_e4m3fn
GRAD_DTYPE = torch.float8_e5m2


def scaled_fp8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in `dtype` scaled so that max|x| maps to the format's largest value, the fp32 inverse scale)."""
    fmax = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float()
    scale = fmax / amax.clamp_min(1e-12)  # an all-zero tensor stays zero
    return (x.float() * scale).clamp(-fmax, fmax).to(dtype), scale.reciprocal()


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix with column-major strides (the second operand layout `torch._scaled_mm` takes)."""
    return t.t().contiguous().t()


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


def apply_fp8_linears(model: nn.Module) -> nn.Module:
    """Run the large dense projections of a ComplexityForCausalLM (already laid out) in FP8, in place."""
    for layer in model.model.layers:
        attn = layer.self_attn
        if type(attn.o_proj) is not nn.Linear or attn.__dict__.get("project_qkv") is not None:
            # another backend's modules or projection seam (megatron, te, the TP overlap): refused in
            # complexity_dist/parallel/parallelize.py before it gets here
            raise ValueError("train.fp8 with model.linear_backend=torch expects the torch backend's projections")
        attn.linear = fp8_linear
        attn.o_proj.__class__ = Fp8Linear
        layer.dynamics.mu_proj.__class__ = Fp8Linear
    return model

