"""Small shared pieces: RMSNorm, rotary embedding, and the projection factory."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in (at least) fp32 for stability under bf16, return the input dtype
        xf = x.to(compute_dtype(x.dtype))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for low-precision inputs, the input's own dtype otherwise (fp64 stays fp64 in tests)."""
    return torch.promote_types(dtype, torch.float32)


def rope_tables(head_dim: int, start: int, length: int, theta: float, dtype: torch.dtype,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [length, head_dim] for positions start..start+length-1, NeoX "rotate half" layout.
    Computed per forward (cheap) rather than stored, so casting the model to bf16 cannot round them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    pos = torch.arange(start, start + length, dtype=torch.float64, device=device)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, d]; cos/sin: [S, d] for the positions of x, in the compute dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).to(x.dtype)


class _ZeroGradTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, alive, dead):
        ctx.dead_shape, ctx.dead_dtype = dead.shape, dead.dtype
        return alive.view_as(alive)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.zeros(ctx.dead_shape, dtype=ctx.dead_dtype, device=grad.device)


def zero_grad_to(alive: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """`alive` unchanged (a view), and in backward an exact zero gradient for `dead`: for a tensor whose true
    gradient is zero but which autograd would leave without one (None), where a consumer needs a tensor."""
    return _ZeroGradTo.apply(alive, dead)


def make_linear(in_features: int, out_features: int, bias: bool = False, parallel: str = "replicated") -> nn.Module:
    """The one place projections are built. `parallel` says how a tensor-parallel backend would split it:
    "column" (output features), "row" (input features) or "replicated". The plain torch backend ignores it;
    complexity_dist.parallel swaps these modules for sharded ones without touching the model's math."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    layer.tp_parallel = parallel
    return layer
