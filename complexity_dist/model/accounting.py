"""Parameter counts, FLOPs per token (docs/architecture.md) and a training-memory estimate, from the real module
built on the meta device, so the numbers describe exactly what trains."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from complexity_dist.config import Config, ModelConfig
from complexity_dist.model.experts import TokenRoutedMLP
from complexity_dist.model.model import ComplexityForCausalLM, count_parameters


@dataclass(frozen=True)
class ModelCounts:
    total: int  # distinct parameters, tied embedding once
    active: int  # used by one token: one expert of E per layer
    embedding: int
    expert: int  # all experts' weights, all layers

    @property
    def active_nonembedding(self) -> int:
        return self.active - self.embedding


def model_counts(cfg: ModelConfig) -> ModelCounts:
    with torch.device("meta"):
        model = ComplexityForCausalLM(cfg)
    expert = sum(m.gate_up_proj.numel() + m.down_proj.numel()
                 for m in model.modules() if isinstance(m, TokenRoutedMLP))
    total = count_parameters(model)
    active = total - expert * (cfg.num_experts - 1) // cfg.num_experts
    return ModelCounts(total, active, model.model.embed_tokens.weight.numel(), expert)


def flops_per_token(cfg: ModelConfig, seq_len: int, counts: ModelCounts | None = None) -> float:
    """6 N_active_nonembedding + 6 V H + 12 L H S (attention scores and values, no causal halving)."""
    counts = counts or model_counts(cfg)
    return (6 * counts.active_nonembedding + 6 * cfg.vocab_size * cfg.hidden_size
            + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len)


def training_memory_gib(cfg: Config, world_size: int, counts: ModelCounts | None = None) -> dict[str, float]:
    """Rough per-GPU memory of a training step, in GiB: weights, gradients and AdamW state under the
    configured ZeRO stage and model-parallel split, plus activations of one micro-batch."""
    counts = counts or model_counts(cfg.model)
    layout = cfg.layout(world_size)
    m, z = cfg.model, cfg.parallel.zero_stage
    bf16 = cfg.train.precision != "fp32"
    # model parallel shards the weights (experts additionally by ep)
    dense = counts.total - counts.expert
    params_local = dense / (layout.tp * layout.pp) + counts.expert / (layout.tp * layout.pp * layout.ep)
    w_bytes = 2 if bf16 else 4
    weights = params_local * w_bytes
    grads = params_local * w_bytes
    master_and_adam = params_local * (12 if bf16 else 8)  # fp32 master (bf16 only) + exp_avg + exp_avg_sq
    dp = layout.dp
    if z >= 1:
        master_and_adam /= dp
    if z >= 2:
        grads /= dp
    if z >= 3:
        weights /= dp
    tokens = layout.micro_batch * cfg.data.seq_len
    H, L = m.hidden_size, m.num_hidden_layers / layout.pp
    # saved activations per token and layer, in elements: norms, qkv, attention out, dynamics (controller
    # 3H, mu, v, a), router and expert intermediate; halved by tensor parallel for the sharded parts
    per_layer = 16 * H + 3 * m.expert_intermediate_size / layout.tp
    if cfg.train.activation_checkpointing:
        per_layer = 4 * H
    acts = tokens * L * per_layer * w_bytes + tokens * m.vocab_size * 4 * 2  # + fp32 logits and their grad
    gib = 1024 ** 3
    out = {"weights": weights / gib, "gradients": grads / gib, "optimizer": master_and_adam / gib,
           "activations": acts / gib}
    out["total"] = sum(out.values())
    return out
