"""INL dynamics (docs/architecture.md, "One layer", step 3): a learned, clamped velocity update applied to the attention output."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from complexity_dist.config import ModelConfig
from complexity_dist.kernels.inl_dynamics import inl_update, inl_update_torch
from complexity_dist.model.layers import make_linear


class INLDynamics(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden_size
        self.dt = cfg.dynamics_dt
        self.beta_max = cfg.dynamics_beta_max
        self.v_clamp = cfg.dynamics_velocity_clamp
        self.update = inl_update if cfg.kernels == "triton" else inl_update_torch
        self.controller_in = make_linear(2 * H, cfg.dynamics_controller_hidden, bias=True)
        self.controller_out = make_linear(cfg.dynamics_controller_hidden, 3 * H, bias=True)
        self.mu = nn.Parameter(torch.zeros(H))
        self.mu_proj = make_linear(H, H)

    def forward(self, a: torch.Tensor, v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (a_next, v_next, mu). v is None at layer 0, meaning zeros."""
        if v is None:
            v = torch.zeros_like(a)
        c = self.controller_out(F.silu(self.controller_in(torch.cat([a, v], dim=-1))))
        mu = self.mu + self.mu_proj(a)
        # the elementwise tail (sigmoid/softplus/clamps/update): complexity_dist/kernels/inl_dynamics.py
        a_next, v_next = self.update(c, a, v, mu, self.dt, self.beta_max, self.v_clamp)
        return a_next, v_next, mu
