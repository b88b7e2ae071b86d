"""Token-routed mixture of SwiGLU experts (docs/architecture.md, "One layer", step 5).

Routing is deterministic: expert = token_id % E, unless mu_router's logit for another expert beats the
base expert's bonus of `router_base_margin` (10). Tokens are grouped by expert and each expert runs one
GEMM over its group, so no per-token weight is ever gathered and every expert weight gets its gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from complexity_dist.config import ModelConfig
from complexity_dist.model.layers import make_linear


def route(token_ids: torch.Tensor, router_logits: torch.Tensor, num_experts: int, margin: float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (expert index per token, full routing logits). Shapes: ids [...], logits [..., E]."""
    base = torch.remainder(token_ids, num_experts)
    logits = margin * F.one_hot(base, num_experts).to(router_logits.dtype) + router_logits
    return logits.argmax(dim=-1), logits


def grouped_expert_forward(x: torch.Tensor, expert: torch.Tensor, gate_up: torch.Tensor,
                           down: torch.Tensor) -> torch.Tensor:
    """x: [T, H], expert: [T] -> [T, H]. gate_up: [E, H, 2I] (gate half first), down: [E, I, H].
    Tokens are sorted by expert once; each expert multiplies its contiguous slice."""
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=gate_up.shape[0]).tolist()
    out_sorted = []
    for e, chunk in enumerate(torch.split(x.index_select(0, order), counts)):
        if chunk.shape[0] == 0:
            continue
        gate, up = (chunk @ gate_up[e]).chunk(2, dim=-1)
        out_sorted.append((F.silu(gate) * up) @ down[e])
    out_sorted = torch.cat(out_sorted) if out_sorted else x.new_zeros(0, down.shape[-1])
    return torch.zeros_like(x).index_copy(0, order, out_sorted)


class TokenRoutedMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
        self.num_experts = E
        self.margin = cfg.router_base_margin
        self.straight_through = cfg.mu_router == "straight_through"
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, H))
        self.mu_router = make_linear(H, E)

    def forward(self, m: torch.Tensor, token_ids: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        shape = m.shape
        expert, logits = route(token_ids, self.mu_router(mu), self.num_experts, self.margin)
        out = grouped_expert_forward(m.reshape(-1, shape[-1]), expert.reshape(-1), self.gate_up_proj,
                                     self.down_proj).view(shape)
        if self.straight_through:
            # forward unchanged (factor is exactly 1); backward carries d p_e / d logits to mu_router
            p = torch.softmax(logits.float(), dim=-1).gather(-1, expert.unsqueeze(-1))
            out = out * (p / p.detach()).to(out.dtype)
        return out
