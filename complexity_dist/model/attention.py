"""Mu-guided grouped-query attention (docs/architecture.md, "One layer", step 2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from complexity_dist.config import ModelConfig
from complexity_dist.model.layers import RMSNorm, apply_rope, make_linear


class MuGuidedAttention(nn.Module):
    """q/k/v from the normed input plus, after layer 0, from the previous layer's mu.

    The x and mu projections are kept as separate weights so the state_dict has the checkpoint names of
    docs/architecture.md, and are applied as one GEMM of [n, mu_prev] (2H wide) against the stacked weights.
    Layer 0 has no mu input, so it has no mu_to_* weights (the reference keeps dead ones).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        H, d = cfg.hidden_size, cfg.head_dim
        self.head_dim = d
        self.has_mu = layer_idx > 0
        self.q_proj = make_linear(H, cfg.num_attention_heads * d, parallel="column")
        self.k_proj = make_linear(H, cfg.num_key_value_heads * d, parallel="column")
        self.v_proj = make_linear(H, cfg.num_key_value_heads * d, parallel="column")
        if self.has_mu:
            self.mu_to_q = make_linear(H, cfg.num_attention_heads * d, parallel="column")
            self.mu_to_k = make_linear(H, cfg.num_key_value_heads * d, parallel="column")
            self.mu_to_v = make_linear(H, cfg.num_key_value_heads * d, parallel="column")
        self.o_proj = make_linear(cfg.num_attention_heads * d, H, parallel="row")
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    # the stacked projection's matrix product: F.linear; complexity_dist/parallel/fp8.py sets an FP8 one
    linear = staticmethod(F.linear)

    def qkv_weight(self) -> torch.Tensor:
        """[(nh + 2 nkv) d, H or 2H]: x weights in the first H input columns, mu weights in the next H."""
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight], dim=0)
        if self.has_mu:
            w_mu = torch.cat([self.mu_to_q.weight, self.mu_to_k.weight, self.mu_to_v.weight], dim=0)
            w = torch.cat([w, w_mu], dim=1)
        return w

    def project_qkv(self, n: torch.Tensor, mu_prev: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(q, k, v): the one GEMM of [n, mu_prev] against the stacked weights (mu_prev is None at layer 0).
        The seam of a linear backend: complexity_dist/parallel/tensor_parallel.py and te_backend.py set an
        instance attribute of the same name."""
        inp = torch.cat([n, mu_prev], dim=-1) if self.has_mu else n
        return self.split_qkv(self.linear(inp, self.qkv_weight()))

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of q, k and v in the stacked projection's output. Local sizes come from the weights, so a
        tensor-parallel shard splits the same way."""
        return qkv.split([self.q_proj.weight.shape[0], self.k_proj.weight.shape[0], self.v_proj.weight.shape[0]],
                         dim=-1)

    def forward(self, n: torch.Tensor, mu_prev: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                cache: "LayerKVCache | None" = None) -> torch.Tensor:
        d = self.head_dim
        q, k, v = self.project_qkv(n, mu_prev if self.has_mu else None)
        # sizes from the projection: under sequence parallel it may gather the sequence itself
        B, S = q.shape[0], q.shape[1]
        # local head counts come from the outputs, so a tensor-parallel shard runs the same code
        nq, nkv = q.shape[-1] // d, k.shape[-1] // d
        q = self.q_norm(q.view(B, S, nq, d)).transpose(1, 2)
        k = self.k_norm(k.view(B, S, nkv, d)).transpose(1, 2)
        v = v.view(B, S, nkv, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, enable_gqa=nq != nkv)
        else:
            # queries sit at positions past..past+S-1 and see every key at or before their own position
            q_pos = torch.arange(past, past + S, device=n.device)
            mask = torch.arange(k.shape[2], device=n.device)[None, :] <= q_pos[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nq != nkv)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, nq * d))


class LayerKVCache:
    """Keys (after QK-norm and RoPE) and values of one layer for incremental decoding."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v
