"""The Complexity v0.13 decoder: layers, mu highway, tied LM head, loss, cached decoding."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from complexity_dist.config import ModelConfig
from complexity_dist.kernels.linear_cross_entropy import fused_linear_cross_entropy
from complexity_dist.model.attention import LayerKVCache, MuGuidedAttention
from complexity_dist.model.checkpointing import MODES, run_checkpointed
from complexity_dist.model.dynamics import INLDynamics
from complexity_dist.model.experts import TokenRoutedMLP
from complexity_dist.model.layers import RMSNorm, compute_dtype, rope_tables


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.highway_scale = cfg.mu_highway_scale
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MuGuidedAttention(cfg, layer_idx)
        self.dynamics = INLDynamics(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = TokenRoutedMLP(cfg)
        # none | selective | full (complexity_dist/model/checkpointing.py); set through
        # ComplexityModel.activation_checkpointing. Decided here, inside the layer, so that a compiled layer
        # (compile_layers) traces the checkpoint with it, as torchtitan compiles its checkpointed blocks.
        self.activation_checkpointing = "none"

    def forward(self, x, v, mu_prev, highway, token_ids, cos, sin, cache=None):
        """(x, v, mu_prev, highway) in, the same four out: what a pipeline stage boundary carries (stacked).
        v, mu_prev and highway are None at layer 0."""
        if self.training and cache is None:
            return run_checkpointed(self.activation_checkpointing, self.step, x, v, mu_prev, highway,
                                    token_ids, cos, sin)
        return self.step(x, v, mu_prev, highway, token_ids, cos, sin, cache)

    def step(self, x, v, mu_prev, highway, token_ids, cos, sin, cache=None):
        """The layer's math (forward, without checkpointing)."""
        a = self.self_attn(self.input_layernorm(x), mu_prev, cos, sin, cache)
        a_next, v_next, mu = self.dynamics(a, v)
        x = x + a_next
        x = x + self.mlp(self.post_attention_layernorm(x), token_ids, mu)
        highway = mu if highway is None else highway + mu
        return x, v_next, mu + self.highway_scale * highway, highway


class ComplexityModel(nn.Module):
    """Embedding, decoder layers and final norm (checkpoint prefix `model.`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
        self.max_positions = cfg.max_position_embeddings

    @property
    def activation_checkpointing(self) -> str:
        """none | selective | full: what each decoder layer keeps for backward in training mode."""
        return self.layers[0].activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"activation checkpointing {mode!r} is not one of {', '.join(MODES)}")
        for layer in self.layers:
            layer.activation_checkpointing = mode

    def forward(self, input_ids: torch.Tensor, cache: "KVCache | None" = None) -> torch.Tensor:
        S = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        if start + S > self.max_positions:
            raise ValueError(f"sequence of {start + S} positions exceeds max_position_embeddings="
                             f"{self.max_positions}")
        x = self.embed_tokens(input_ids)
        cos, sin = rope_tables(self.head_dim, start, S, self.rope_theta, compute_dtype(x.dtype), x.device)
        v = mu_prev = highway = None
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            x, v, mu_prev, highway = layer(x, v, mu_prev, highway, input_ids, cos, sin, layer_cache)
        return self.norm(x)


@dataclass
class CausalLMOutput:
    # None when the loss was computed fused (model.kernels=triton with targets): pass no targets for logits
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None


class KVCache:
    """Per-layer key/value caches. Only attention looks across tokens (velocity starts at zero for each
    token in training and in decoding alike), so keys and values are all a step needs."""

    def __init__(self, num_layers: int):
        self.layers = [LayerKVCache() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length


class ComplexityForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = ComplexityModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference's initialisation: N(0, std) for linears, embeddings and experts; zero biases;
        norms 1; mu 0."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, TokenRoutedMLP):
                module.gate_up_proj.normal_(0.0, std)
                module.down_proj.normal_(0.0, std)
            elif isinstance(module, INLDynamics):
                module.mu.zero_()
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, cache: KVCache | None = None) -> CausalLMOutput:
        """`labels` are Hugging Face style (same positions as input_ids, shifted here); `targets` are
        already aligned with the positions of input_ids (what the trainer passes). Ignore index -100."""
        hidden = self.model(input_ids, cache)
        if labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        if targets is not None and self._fused_loss():
            # training and evaluation read only the loss: the full-vocabulary logits are never built
            return CausalLMOutput(logits=None, loss=fused_linear_cross_entropy(hidden, self.lm_head.weight, targets))
        logits = self.lm_head(hidden)
        loss = None
        if targets is not None:
            loss = self.loss_fn(logits, targets)
        return CausalLMOutput(logits=logits, loss=loss)

    def _fused_loss(self) -> bool:
        """model.kernels=triton and the loss seam untouched: a vocabulary-parallel layout (tp > 1) sets its own
        loss_fn on the instance and keeps it (its logits are a vocabulary slice)."""
        return self.config.kernels == "triton" and "loss_fn" not in vars(self)

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over targets != -100. The seam of a vocabulary-parallel layout: it sets an
        instance attribute of the same name (logits are then this rank's vocabulary slice)."""
        logits = logits.to(compute_dtype(logits.dtype))  # fp32 under bf16; fp64 stays fp64 in tests
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    def compile_layers(self, mode: str = "default") -> None:
        """torch.compile each decoder layer in place (per-block, as torchtitan does): most of a layer's
        time in eager mode is elementwise work (norms, INL dynamics, SwiGLU) that the compiler fuses."""
        # the one side effect in a layer's forward is TokenRoutedMLP.routed_override_frac (a metric): dynamo
        # refuses to trace a checkpoint (train.activation_checkpointing) that has one, falling back to eager
        # for the whole layer; not replaying it in the recompute loses nothing (it would write the same value)
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        for layer in self.model.layers:
            layer.compile(mode=None if mode == "default" else mode)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with the KV cache: each step computes exactly what the training forward does."""
        cache = self.new_cache()
        logits = self(input_ids, cache=cache).logits
        out = [input_ids]
        for _ in range(max_new_tokens):
            nxt = logits[:, -1:].argmax(-1)
            out.append(nxt)
            logits = self(nxt, cache=cache).logits
        return torch.cat(out, dim=1)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters())
