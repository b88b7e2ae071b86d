"""Parameter counts, FLOPs per token (docs/architecture.md) and a training-memory estimate, from the real module
built on the meta device, so the numbers describe exactly what trains."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from complexity_dist.config import Config, Layout, ModelConfig
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


@dataclass(frozen=True)
class StageCounts:
    """Parameters held by one rank of pipeline stage `stage` (every tp and ep rank of a stage holds as many).

    split: tensor-parallel shards (attention projections, embedding/lm_head vocabulary slice), 1/tp each;
    expert: this rank's experts (num_experts/ep of them), each 1/expert_tp; replicated: whole on every tp and ep
    rank (norms, dynamics, router). `tied_copy`: the last stage's copy of the tied embedding, included in
    `split` there, counted twice over the grid."""

    stage: int
    layers: range
    split: int
    expert: int
    replicated: int
    holds_embedding: bool
    holds_head: bool
    tied_copy: int = 0

    @property
    def total(self) -> int:
        return self.split + self.expert + self.replicated


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def rank_parameter_counts(cfg: ModelConfig, layout: Layout) -> list[StageCounts]:
    """Per-rank parameter counts of every pipeline stage, from the real module's parameters and the plan of
    docs/architecture.md ("How the layers are spread over GPUs"): attention q/k/v/o split by head over tp,
    each expert's gate_up/down split over tp (whole with parallel.expert_tensor_parallel=false) and the
    experts over ep, the embedding (and an untied lm_head) by vocabulary over tp (padded to a multiple of tp,
    as megatron-core does); everything else whole.
    Stages hold `layout.stage_layers`; the first also the embedding, the last the final norm and the
    lm_head — with tied embeddings a second copy of the embedding, kept equal by the pipeline."""
    with torch.device("meta"):
        model = ComplexityForCausalLM(cfg)
    tp, ep = layout.tp, layout.ep
    vocab_rows = math.ceil(cfg.vocab_size / tp)
    layer_stage = {i: s for s in range(layout.pp) for i in layout.stage_layers(s)}
    split = [0] * layout.pp
    expert = [0] * layout.pp
    replicated = [0] * layout.pp
    embedding_slice = vocab_rows * cfg.hidden_size
    for name, p in model.named_parameters():
        n = p.numel()
        layer = _LAYER.match(name)
        if layer is not None:
            s = layer_stage[int(layer.group(1))]
            sub = name[layer.end():]
            if sub.startswith("self_attn.") and "norm" not in sub:
                split[s] += n // tp
            elif sub.startswith("mlp.") and "router" not in sub:
                expert[s] += n // (layout.expert_tp * ep)
            else:
                replicated[s] += n
        elif name == "model.embed_tokens.weight":
            split[0] += embedding_slice
        elif name == "lm_head.weight":  # untied only: a tied one is not a parameter of its own
            split[-1] += embedding_slice
        else:  # the final norm
            replicated[-1] += n
    tied = embedding_slice if cfg.tie_word_embeddings and layout.pp > 1 else 0
    split[-1] += tied
    return [StageCounts(s, layout.stage_layers(s), split[s], expert[s], replicated[s], s == 0, s == layout.pp - 1,
                        tied if s == layout.pp - 1 else 0)
            for s in range(layout.pp)]


def training_memory_gib(cfg: Config, world_size: int) -> dict[str, float]:
    """Rough per-GPU memory of a training step, in GiB, on the fullest pipeline stage: weights, gradients
    and AdamW state of the parameters this rank holds (rank_parameter_counts) under the configured ZeRO
    stage — dense parameters partitioned over the data-parallel group, expert parameters over the
    expert-data-parallel group — plus activations of one micro-batch."""
    layout = cfg.layout(world_size)
    m, z = cfg.model, cfg.parallel.zero_stage
    bf16 = cfg.train.precision != "fp32"
    stage = max(rank_parameter_counts(m, layout), key=lambda c: c.total)
    dense, experts = stage.split + stage.replicated, stage.expert
    w_bytes = 2 if bf16 else 4
    opt_bytes = 12 if bf16 else 8  # fp32 master (bf16 only) + exp_avg + exp_avg_sq

    def partitioned(per_param: float, stage_needed: int) -> float:
        if z >= stage_needed:
            return per_param * (dense / layout.dp + experts / layout.expert_dp)
        return per_param * (dense + experts)

    weights = partitioned(w_bytes, 3)
    grads = partitioned(w_bytes, 2)
    master_and_adam = partitioned(opt_bytes, 1)
    tokens = layout.micro_batch * cfg.data.seq_len
    H, L = m.hidden_size, len(stage.layers)
    # saved activations per token and layer, in elements: norms, qkv, attention out, dynamics (controller
    # 3H, mu, v, a), router and expert intermediate; the expert intermediate is split by tensor parallel
    per_layer = 16 * H + 3 * m.expert_intermediate_size / layout.tp
    kept_inputs = 4 * H  # a checkpointed layer keeps its inputs x, v, mu_prev, highway
    if cfg.train.activation_checkpointing == "full":
        per_layer = kept_inputs
    elif cfg.train.activation_checkpointing == "selective":
        # the inputs plus the outputs of the GEMMs and attention (complexity_dist/model/checkpointing.py):
        # q|k|v and attention out (tensor-parallel slices), o_proj, controller in/out, mu_proj, router,
        # expert gate|up (split by tensor parallel) and down
        per_layer = (kept_inputs + (2 * m.num_attention_heads + 2 * m.num_key_value_heads) * m.head_dim / layout.tp
                     + H + m.dynamics_controller_hidden + 3 * H + H + m.num_experts
                     + 2 * m.expert_intermediate_size / layout.tp + H)
    acts = tokens * L * per_layer * w_bytes
    if stage.holds_head:
        acts += tokens * math.ceil(m.vocab_size / layout.tp) * 4 * 2  # fp32 logits (vocab slice) and their grad
    gib = 1024 ** 3
    out = {"weights": weights / gib, "gradients": grads / gib, "optimizer": master_and_adam / gib,
           "activations": acts / gib}
    out["total"] = sum(out.values())
    return out
