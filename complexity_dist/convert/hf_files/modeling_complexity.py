"""The Complexity v0.13 decoder for transformers (written by complexity-dist convert; torch + transformers only).

It computes what complexity_dist/model computes (docs/architecture.md, "One layer"): RMSNorm in fp32; q/k/v
from [norm(x), mu_prev] as one product with the x and mu weights side by side (layer 0 has no mu input: its
mu_to_* weights are stored, as published checkpoints do, and unused); per-head QK RMSNorm; NeoX RoPE; causal
GQA; INL dynamics with beta capped and the velocity clamped; token-routed SwiGLU experts (base expert
token_id % E, overridden only when mu_router's logit beats the margin); the mu highway. Decoding with the cache
keeps keys and values only: the velocity starts at zero for every token, in training and decoding alike.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_complexity import ComplexityConfig


def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


class ComplexityRMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        xf = x.to(_compute_dtype(x.dtype))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


class ComplexityRotaryEmbedding(nn.Module):
    def __init__(self, head_dim, theta):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv, persistent=True)  # stored as published checkpoints do

    def forward(self, start, length, dtype, device):
        # recomputed in float64 (like the training code) so a bf16 model cannot round the tables
        inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device)
                                    / self.head_dim))
        pos = torch.arange(start, start + length, dtype=torch.float64, device=device)
        emb = torch.cat([torch.outer(pos, inv)] * 2, dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).to(x.dtype)


class ComplexityAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        H = config.hidden_size
        d = H // config.num_attention_heads
        self.layer_idx, self.head_dim = layer_idx, d
        self.nq, self.nkv = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(H, self.nq * d, bias=False)
        self.k_proj = nn.Linear(H, self.nkv * d, bias=False)
        self.v_proj = nn.Linear(H, self.nkv * d, bias=False)
        self.mu_to_q = nn.Linear(H, self.nq * d, bias=False)
        self.mu_to_k = nn.Linear(H, self.nkv * d, bias=False)
        self.mu_to_v = nn.Linear(H, self.nkv * d, bias=False)
        self.o_proj = nn.Linear(self.nq * d, H, bias=False)
        self.q_norm = ComplexityRMSNorm(d, config.rms_norm_eps)
        self.k_norm = ComplexityRMSNorm(d, config.rms_norm_eps)
        self.rotary_emb = ComplexityRotaryEmbedding(d, config.rope_theta)

    def forward(self, n, mu_prev, cos, sin, cache):
        B, S, _ = n.shape
        d = self.head_dim
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight], dim=0)
        if mu_prev is not None:  # layer 0 has no mu input
            w_mu = torch.cat([self.mu_to_q.weight, self.mu_to_k.weight, self.mu_to_v.weight], dim=0)
            w = torch.cat([w, w_mu], dim=1)
            n = torch.cat([n, mu_prev], dim=-1)
        q, k, v = F.linear(n, w).split([self.nq * d, self.nkv * d, self.nkv * d], dim=-1)
        q = self.q_norm(q.view(B, S, self.nq, d)).transpose(1, 2)
        k = self.k_norm(k.view(B, S, self.nkv, d)).transpose(1, 2)
        v = v.view(B, S, self.nkv, d).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.get_seq_length(self.layer_idx)
            k, v = cache.update(k, v, self.layer_idx)
        gqa = self.nq != self.nkv
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, enable_gqa=gqa)
        else:
            q_pos = torch.arange(past, past + S, device=n.device)
            mask = torch.arange(k.shape[2], device=n.device)[None, :] <= q_pos[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.nq * d))


class ComplexityDynamics(nn.Module):
    def __init__(self, config):
        super().__init__()
        H = config.hidden_size
        self.dt, self.beta_max, self.v_clamp = config.dynamics_dt, config.dynamics_beta_max, config.dynamics_velocity_clamp
        self.controller_in = nn.Linear(2 * H, config.dynamics_controller_hidden, bias=True)
        self.controller_out = nn.Linear(config.dynamics_controller_hidden, 3 * H, bias=True)
        self.mu = nn.Parameter(torch.zeros(H))
        self.mu_proj = nn.Linear(H, H, bias=False)

    def forward(self, a, v):
        if v is None:
            v = torch.zeros_like(a)
        c = self.controller_out(F.silu(self.controller_in(torch.cat([a, v], dim=-1))))
        c_a, c_b, c_g = c.chunk(3, dim=-1)
        alpha = torch.sigmoid(c_a)
        beta = torch.clamp(F.softplus(c_b), max=self.beta_max)
        gate = torch.sigmoid(c_g)
        mu = self.mu + self.mu_proj(a)
        v_next = torch.clamp(alpha * v - beta * (a - mu), -self.v_clamp, self.v_clamp)
        return a + self.dt * gate * v_next, v_next, mu


def _padded_block_experts(x, expert, gate_up, down):
    """x [T, H], expert [T] -> [T, H]: each expert's tokens fill blocks of ceil(T/E) rows (zero-padded), and one
    bmm per projection multiplies every block by its expert's weights (the training code's CPU path, so the
    numbers are the same bit for bit)."""
    T, H = x.shape
    E = gate_up.shape[0]
    B = max(1, -(-T // E))
    n_blocks = -(-T // B) + E
    one_hot = (expert.unsqueeze(1) == torch.arange(E, device=x.device)).long()
    counts = one_hot.sum(0)
    rank = (one_hot.cumsum(0) - 1).gather(1, expert.unsqueeze(1)).squeeze(1)
    expert_blocks = (counts + B - 1) // B
    block_end = expert_blocks.cumsum(0)
    row = ((block_end - expert_blocks) * B)[expert] + rank
    source = torch.full((n_blocks * B,), T, dtype=row.dtype, device=x.device)
    source = source.scatter(0, row, torch.arange(T, dtype=row.dtype, device=x.device))
    blocks = torch.cat([x, x.new_zeros(1, H)]).index_select(0, source).view(n_blocks, B, H)
    block_expert = torch.searchsorted(block_end, torch.arange(n_blocks, device=x.device, dtype=block_end.dtype),
                                      right=True).clamp_(max=E - 1)
    gate, up = torch.bmm(blocks, gate_up.index_select(0, block_expert)).chunk(2, dim=-1)
    out = torch.bmm(F.silu(gate) * up, down.index_select(0, block_expert))
    return out.view(n_blocks * B, H).index_select(0, row)


class ComplexityTokenRoutedMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        E, H = config.num_experts, config.hidden_size
        I = config.intermediate_size // E
        self.num_experts, self.margin = E, config.router_base_margin
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, H))
        self.mu_router = nn.Linear(H, E, bias=False)
        self.register_buffer("token_to_expert", torch.arange(config.vocab_size, dtype=torch.long) % E,
                             persistent=True)  # stored as published checkpoints do; routing uses token_id % E

    def forward(self, m, token_ids, mu):
        shape = m.shape
        base = torch.remainder(token_ids, self.num_experts)
        logits = self.margin * F.one_hot(base, self.num_experts).to(m.dtype) + self.mu_router(mu)
        expert = logits.argmax(dim=-1).reshape(-1)
        out = _padded_block_experts(m.reshape(-1, shape[-1]), expert, self.gate_up_proj, self.down_proj)
        return out.view(shape)


class ComplexityDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.highway_scale = config.mu_highway_scale
        self.input_layernorm = ComplexityRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = ComplexityAttention(config, layer_idx)
        self.dynamics = ComplexityDynamics(config)
        self.post_attention_layernorm = ComplexityRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = ComplexityTokenRoutedMLP(config)

    def forward(self, x, v, mu_prev, highway, token_ids, cos, sin, cache):
        a = self.self_attn(self.input_layernorm(x), mu_prev, cos, sin, cache)
        a_next, v_next, mu = self.dynamics(a, v)
        x = x + a_next
        x = x + self.mlp(self.post_attention_layernorm(x), token_ids, mu)
        highway = mu if highway is None else highway + mu
        return x, v_next, mu + self.highway_scale * highway, highway


class ComplexityPreTrainedModel(PreTrainedModel):
    config_class = ComplexityConfig
    base_model_prefix = "model"
    _no_split_modules = ["ComplexityDecoderLayer"]
    _supports_cache_class = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, ComplexityRMSNorm):
            module.weight.data.fill_(1.0)
        elif isinstance(module, ComplexityTokenRoutedMLP):
            module.gate_up_proj.data.normal_(0.0, std)
            module.down_proj.data.normal_(0.0, std)
            module.token_to_expert.copy_(torch.arange(module.token_to_expert.numel()) % module.num_experts)
        elif isinstance(module, ComplexityDynamics):
            module.mu.data.zero_()


class ComplexityModel(ComplexityPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ComplexityDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = ComplexityRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids, past_key_values=None):
        S = input_ids.shape[1]
        start = past_key_values.get_seq_length() if past_key_values is not None else 0
        x = self.embed_tokens(input_ids)
        cos, sin = self.layers[0].self_attn.rotary_emb(start, S, _compute_dtype(x.dtype), x.device)
        v = mu_prev = highway = None
        for layer in self.layers:
            x, v, mu_prev, highway = layer(x, v, mu_prev, highway, input_ids, cos, sin, past_key_values)
        return self.norm(x)


class ComplexityForCausalLM(ComplexityPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = ComplexityModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, cache=None, past_key_values=None, use_cache=None,
                labels=None, return_dict=None, **kwargs):
        # transformers >= 5 passes the cache as `cache`, earlier versions as `past_key_values`
        cache = cache if cache is not None else past_key_values
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported (the model has no padding mask); "
                             "pass unpadded sequences of equal length")
        if use_cache and cache is None:
            cache = DynamicCache()
        hidden = self.model(input_ids, cache)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
            lf = logits.to(_compute_dtype(logits.dtype))
            loss = F.cross_entropy(lf.view(-1, lf.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})


_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"
