"""The Hugging Face key set of the architecture's published checkpoints (docs/architecture.md, "Checkpoint
names"), with the shape of every tensor, computed from a ModelConfig without building the model."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from complexity_dist.config import ConfigError, ModelConfig


class ConvertError(ConfigError):
    """A file `convert` cannot use (wrong, truncated, foreign); the message names it. Exit 2."""


@dataclass(frozen=True)
class Key:
    name: str
    shape: tuple[int, ...]
    kind: str = "weight"  # "weight": trained; "dead": layer-0 mu weights (zeros); "buffer": derived, persistent

    @property
    def trained(self) -> bool:
        return self.kind == "weight"


def layer_keys(cfg: ModelConfig, i: int) -> list[Key]:
    H, d, E, I = cfg.hidden_size, cfg.head_dim, cfg.num_experts, cfg.expert_intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    p = f"model.layers.{i}."
    mu = "weight" if i > 0 else "dead"
    return [
        Key(p + "input_layernorm.weight", (H,)),
        Key(p + "post_attention_layernorm.weight", (H,)),
        Key(p + "self_attn.q_proj.weight", (q, H)),
        Key(p + "self_attn.k_proj.weight", (kv, H)),
        Key(p + "self_attn.v_proj.weight", (kv, H)),
        Key(p + "self_attn.o_proj.weight", (H, q)),
        Key(p + "self_attn.mu_to_q.weight", (q, H), mu),
        Key(p + "self_attn.mu_to_k.weight", (kv, H), mu),
        Key(p + "self_attn.mu_to_v.weight", (kv, H), mu),
        Key(p + "self_attn.q_norm.weight", (d,)),
        Key(p + "self_attn.k_norm.weight", (d,)),
        Key(p + "self_attn.rotary_emb.inv_freq", (d // 2,), "buffer"),
        Key(p + "dynamics.mu", (H,)),
        Key(p + "dynamics.mu_proj.weight", (H, H)),
        Key(p + "dynamics.controller_in.weight", (cfg.dynamics_controller_hidden, 2 * H)),
        Key(p + "dynamics.controller_in.bias", (cfg.dynamics_controller_hidden,)),
        Key(p + "dynamics.controller_out.weight", (3 * H, cfg.dynamics_controller_hidden)),
        Key(p + "dynamics.controller_out.bias", (3 * H,)),
        Key(p + "mlp.gate_up_proj", (E, H, 2 * I)),
        Key(p + "mlp.down_proj", (E, I, H)),
        Key(p + "mlp.mu_router.weight", (E, H)),
        Key(p + "mlp.token_to_expert", (cfg.vocab_size,), "buffer"),
    ]


def hf_keys(cfg: ModelConfig) -> list[Key]:
    """Every key of the HF layout, in file order. lm_head.weight is stored (a copy of the embedding when tied)."""
    keys = [Key("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))]
    for i in range(cfg.num_hidden_layers):
        keys += layer_keys(cfg, i)
    keys += [Key("model.norm.weight", (cfg.hidden_size,)), Key("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))]
    return keys


def source_name(cfg: ModelConfig, name: str) -> str:
    """The name of a trained HF key in our state_dict (the same, except a tied lm_head)."""
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return name


def buffer_value(cfg: ModelConfig, key: Key) -> torch.Tensor:
    """The values published checkpoints carry for the derived buffers and the dead layer-0 mu weights."""
    if key.kind == "dead":
        return torch.zeros(key.shape)
    if key.name.endswith("rotary_emb.inv_freq"):
        d = cfg.head_dim
        return 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if key.name.endswith("mlp.token_to_expert"):
        return torch.arange(cfg.vocab_size, dtype=torch.int64) % cfg.num_experts
    raise KeyError(key.name)


# config.json fields of the HF layout that are ModelConfig fields of the same name
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "num_experts")
MODEL_TYPE = "complexity-deep"
