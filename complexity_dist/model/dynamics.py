"""INL dynamics (docs/architecture.md, "One layer", step 3): a learned, clamped velocity update applied to the attention output."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from complexity_dist.config import ModelConfig
from complexity_dist.model.layers import make_linear


class INLDynamics(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden_size
        self.dt = cfg.dynamics_dt
        self.beta_max = cfg.dynamics_beta_max
        self.v_clamp = cfg.dynamics_velocity_clamp
        self.controller_in = make_linear(2 * H, cfg.dynamics_controller_hidden, bias=True)
        self.controller_out = make_linear(cfg.dynamics_controller_hidden, 3 * H, bias=True)
        self.mu = nn.Parameter(torch.zeros(H))
        self.mu_proj = make_linear(H, H)

    def forward(self, a: torch.Tensor, v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (a_next, v_next, mu). v is None at layer 0, meaning zeros."""
        if v is None:
            v = torch.zeros_like(a)
        c = self.controller_out(F.silu(self.controller_in(torch.cat([a, v], dim=-1))))
        c_a, c_b, c_g = c.chunk(3, dim=-1)
        alpha = torch.sigmoid(c_a)
        beta = torch.clamp(F.softplus(c_b), max=self.beta_max)  # the clamp prevents the late-training NaN
        gate = torch.sigmoid(c_g)
        mu = self.mu + self.mu_proj(a)
        v_next = torch.clamp(alpha * v - beta * (a - mu), -self.v_clamp, self.v_clamp)
        a_next = a + self.dt * gate * v_next
        return a_next, v_next, mu
