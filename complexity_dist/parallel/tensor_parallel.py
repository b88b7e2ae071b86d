"""Tensor parallelism (and sequence parallelism) applied from outside to the single-process model.

`apply_tensor_parallel(model, tp_group)` takes the full `ComplexityForCausalLM` (built with the same seed on
every rank), replaces the parameters of the sharded projections by this rank's slice and inserts the
collectives of complexity_dist/parallel/comm.py with module hooks. The model's forward code is not copied.

The plan (tp = size of the group, r = this rank):

    attention q/k/v, mu_to_q/k/v   column-parallel by head: rows of query heads r*nq/tp.. and kv heads
                                   r*nkv/tp.. (the attention reads its local head counts from the weights;
                                   contiguous head blocks keep GQA's q-head -> kv-head map local)
    attention inputs n, mu_prev    copy_to (SP: gather_to_full along the sequence)
    o_proj                         row-parallel (input columns of this rank's heads), output reduce_from
                                   (SP: reduce_scatter_to along the sequence)
    experts                        gate_up [E, H, 2I] -> [E, H, 2I/tp] = cat(gate slice r, up slice r),
                                   down [E, I, H] -> rows slice r; `TokenRoutedMLP.compute_experts` is wrapped
                                   on the instance: copy_to on its tokens, reduce_from on its result (SP:
                                   gather_to_full / reduce_scatter_to along the tokens). The reduction sits
                                   inside compute_experts, so the straight-through factor p/p.detach()
                                   multiplies the full sum and mu_router's gradient is the same on every rank.
    embedding                      vocab-parallel: rows r*V/tp..; ids outside give zeros; reduce_from
                                   (SP: reduce_scatter_to along the sequence, which starts the SP region)
    lm_head (tied or not)          vocab-parallel rows; input copy_to (SP: gather_to_full); the loss is a
                                   vocab-parallel cross-entropy (max, sum of exponentials and the target logit
                                   reduced over tp) that never builds the full-vocabulary logits on one rank.
                                   `logits` in the output are this rank's vocabulary slice.

Replicated parameters (norms, dynamics, mu, mu_router): without SP every rank computes them on the same full
tensors, so their gradients come out identical on every TP rank with no communication — except q_norm and
k_norm, which are shared by all heads and see only this rank's heads: their gradient is partial. With SP every
replicated parameter sees only this rank's tokens. Partial gradients are summed over the TP group by a hook on
the parameter (it runs in backward, before any optimizer or ZeRO hook sees the gradient); such parameters are
marked `tp_partial_grad = True`. A data-parallel engine must count every TP-replicated parameter once when it
computes a gradient norm (parameters with `tp_shard` set are sharded, the others replicated).

Sequence parallel splits the sequence (dim 1) over the TP ranks between the TP regions; data.seq_len must be
divisible by tp. Cached decoding (`generate`) is single-process only.

Linear backends. This plan is the `torch` backend: the shards are plain parameters under today's names, so
the attention's stacked [x, mu] QKV GEMM (it concatenates q/k/v/mu_to_* weights and calls F.linear) runs
unchanged on the local heads. A `megatron` backend is not done; the proposed design: keep the attention
reading `.weight` of q/k/v/mu_to_* (megatron-core's ColumnParallelLinear would only hold the shard there, its
forward is never called), and swap o_proj and an untied lm_head for subclasses of RowParallelLinear /
ColumnParallelLinear whose forward returns the output alone (megatron returns (output, bias)) and which take
`tp_group` explicitly, so the names stay `o_proj.weight` / `lm_head.weight`. Their gain on CPU is nil (same
GEMM and all-reduce as here); the value is on GPU with TE (`te.Linear`), whose `_extra_state` (FP8 scaling)
adds a state_dict key per linear — the checkpoint adapter must drop/restore it to keep today's names.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from complexity_dist.config import ConfigError, ModelConfig
from complexity_dist.model.layers import compute_dtype
from complexity_dist.parallel.comm import _all_gather, _rank, _size, copy_to, gather_to_full, reduce_from, \
    reduce_scatter_to


@dataclass(frozen=True)
class ShardSpec:
    """How a parameter is split over the TP ranks: `dim`, and for the experts' gate_up the two halves
    (gate | up) of the last dimension are split separately."""
    dim: int
    halves: bool = False


def check_tensor_parallel(cfg: ModelConfig, tp: int, sequence_parallel: bool = False,
                          seq_len: int | None = None) -> None:
    """Raise ConfigError naming the numbers when `tp` cannot shard this model."""
    problems = []
    for key in ("num_attention_heads", "num_key_value_heads", "vocab_size"):
        value = getattr(cfg, key)
        if value % tp:
            problems.append(f"parallel.tp={tp} does not divide model.{key}={value}")
    if cfg.expert_intermediate_size % tp:
        problems.append(f"parallel.tp={tp} does not divide the expert intermediate size "
                        f"(model.intermediate_size / num_experts = {cfg.expert_intermediate_size})")
    if sequence_parallel and seq_len is not None and seq_len % tp:
        problems.append(f"parallel.sequence_parallel needs parallel.tp={tp} to divide data.seq_len={seq_len}")
    if problems:
        raise ConfigError("; ".join(problems) + ": choose a tp that divides them (or resize the model)")


def _shard(param: torch.Tensor, tp: int, r: int, spec: ShardSpec) -> nn.Parameter:
    with torch.no_grad():
        if spec.halves:
            gate, up = param.chunk(2, dim=spec.dim)
            local = torch.cat([gate.chunk(tp, dim=spec.dim)[r], up.chunk(tp, dim=spec.dim)[r]], dim=spec.dim)
        else:
            local = param.chunk(tp, dim=spec.dim)[r]
    shard = nn.Parameter(local.clone().contiguous(), requires_grad=param.requires_grad)
    shard.tp_shard = spec
    return shard


def _head_rows(weight: torch.Tensor, heads: int, tp: int, r: int) -> nn.Parameter:
    # rows are heads * head_dim; a contiguous block of heads is a contiguous block of rows
    assert weight.shape[0] % heads == 0
    return _shard(weight, tp, r, ShardSpec(0))


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows r*V/tp .. (r+1)*V/tp of the embedding; other ids give zeros, summed over the group.
    A subclass of nn.Embedding so the checkpoint name (`weight`) and the model's initialisation stay."""

    def __init__(self, full: nn.Embedding, group, sequence_parallel: bool):
        tp, r = _size(group), _rank(group)
        local_rows = full.num_embeddings // tp
        super().__init__(local_rows, full.embedding_dim, device=full.weight.device, dtype=full.weight.dtype)
        self.weight = _shard(full.weight, tp, r, ShardSpec(0))
        self.vocab_start = r * local_rows
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to(out, self.group, dim=1)
        return reduce_from(out, self.group)


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group) -> torch.Tensor:
    """Mean cross-entropy over targets != -100, with logits [..., V/tp] this rank's vocabulary slice.

    log-sum-exp and the target's logit are assembled from per-rank pieces with reduce_from (forward sum,
    backward identity): everything after the sum is the same on every rank, so each rank's gradient of its
    own slice is exact. The max only stabilises the exponentials and carries no gradient."""
    logits = logits.to(compute_dtype(logits.dtype)).reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    vocab_local = logits.shape[-1]
    with torch.no_grad():
        row_max = logits.max(dim=-1).values
        if _size(group) > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - row_max.unsqueeze(-1)
    sum_exp = reduce_from(shifted.exp().sum(dim=-1), group)
    local = targets - _rank(group) * vocab_local
    inside = (local >= 0) & (local < vocab_local)
    target_logit = shifted.gather(1, local.clamp(0, vocab_local - 1).unsqueeze(1)).squeeze(1)
    target_logit = reduce_from(torch.where(inside, target_logit, torch.zeros_like(target_logit)), group)
    valid = targets != -100
    per_token = torch.where(valid, sum_exp.log() - target_logit, torch.zeros_like(target_logit))
    return per_token.sum() / valid.sum()


def _sum_grad_over(group):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=group)
        return grad
    return hook


def _mark_partial(param: nn.Parameter, group) -> None:
    if getattr(param, "tp_partial_grad", False):
        return
    param.tp_partial_grad = True
    param.register_hook(_sum_grad_over(group))


def apply_tensor_parallel(model: nn.Module, tp_group, sequence_parallel: bool = False) -> nn.Module:
    """Shard `model` (a ComplexityForCausalLM) in place over `tp_group` and return it. See the module doc."""
    if getattr(model, "tp_group", None) is not None:
        raise ValueError("apply_tensor_parallel: this model is already tensor-parallel")
    tp, r = _size(tp_group), _rank(tp_group)
    cfg = model.config
    check_tensor_parallel(cfg, tp, sequence_parallel)
    if tp == 1:
        return model
    g = tp_group
    enter = functools.partial(gather_to_full, group=g, dim=1) if sequence_parallel else \
        functools.partial(copy_to, group=g)
    leave = functools.partial(reduce_scatter_to, group=g, dim=1) if sequence_parallel else \
        functools.partial(reduce_from, group=g)

    # vocabulary: embedding, then the (possibly tied) lm_head and the loss
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens, g, sequence_parallel)
    head = model.lm_head
    head.weight = model.model.embed_tokens.weight if tied else _shard(head.weight, tp, r, ShardSpec(0))
    head.out_features = head.weight.shape[0]
    head.register_forward_pre_hook(lambda mod, args: (enter(args[0]), *args[1:]))
    model.loss_fn = functools.partial(vocab_parallel_cross_entropy, group=g)

    for layer in model.model.layers:
        attn = layer.self_attn
        names = [("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads),
                 ("v_proj", cfg.num_key_value_heads)]
        if attn.has_mu:
            names += [("mu_to_q", cfg.num_attention_heads), ("mu_to_k", cfg.num_key_value_heads),
                      ("mu_to_v", cfg.num_key_value_heads)]
        for name, heads in names:
            lin = getattr(attn, name)
            lin.weight = _head_rows(lin.weight, heads, tp, r)
            lin.out_features = lin.weight.shape[0]
        attn.o_proj.weight = _shard(attn.o_proj.weight, tp, r, ShardSpec(1))
        attn.o_proj.in_features = attn.o_proj.weight.shape[1]
        assert attn.o_proj.bias is None, "a row-parallel bias would be added tp times"

        def attn_inputs(mod, args):
            n, mu_prev, *rest = args
            return (enter(n), None if mu_prev is None else enter(mu_prev), *rest)
        attn.register_forward_pre_hook(attn_inputs)
        attn.o_proj.register_forward_hook(lambda mod, args, out: leave(out))
        # shared by every head, applied to this rank's heads only
        _mark_partial(attn.q_norm.weight, g)
        _mark_partial(attn.k_norm.weight, g)

        mlp = layer.mlp
        mlp.gate_up_proj = _shard(mlp.gate_up_proj, tp, r, ShardSpec(2, halves=True))
        mlp.down_proj = _shard(mlp.down_proj, tp, r, ShardSpec(1))
        mlp.compute_experts = _tp_experts(mlp.compute_experts, g, sequence_parallel)
        if sequence_parallel:
            # routing runs on this rank's tokens: give it this rank's slice of the ids
            mlp.register_forward_pre_hook(
                lambda mod, args: (args[0], args[1].chunk(tp, dim=1)[r], *args[2:]))

    if sequence_parallel:
        for p in model.parameters():
            if not hasattr(p, "tp_shard"):
                _mark_partial(p, g)
    model.tp_group, model.sequence_parallel = g, sequence_parallel
    return model


def _tp_experts(compute, group, sequence_parallel: bool):
    """Wrap a bound `compute_experts(x [T, H], expert [T])` so it runs on this rank's expert shards."""
    def wrapped(x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        if sequence_parallel:
            # the flattened tokens of every rank, rank after rank; reduce_scatter_to gives each its own back
            out = compute(gather_to_full(x, group, dim=0), _all_gather(expert, group, dim=0))
            return reduce_scatter_to(out, group, dim=0)
        return reduce_from(compute(copy_to(x, group), expert), group)
    return wrapped


def _gather(t: torch.Tensor, spec: ShardSpec | None, group) -> torch.Tensor:
    if spec is None:
        return t.detach().clone()
    t = t.detach()
    if spec.halves:
        gate, up = t.chunk(2, dim=spec.dim)
        return torch.cat([_all_gather(gate, group, spec.dim), _all_gather(up, group, spec.dim)], dim=spec.dim)
    return _all_gather(t, group, spec.dim)


def gather_full(model: nn.Module, tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """Full single-process tensors from this rank's `tensors` keyed by parameter or state_dict name (a
    state_dict, or {name: p.grad}). Collective: every rank of the model's TP group calls it, same order."""
    group = getattr(model, "tp_group", None)
    specs = {name: getattr(p, "tp_shard", None) for name, p in model.named_parameters(remove_duplicate=False)}
    out = {}
    for name, t in tensors.items():
        out[name] = None if t is None else _gather(t, specs.get(name) if group is not None else None, group)
    return out


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-process state_dict (today's names and shapes) of a tensor-parallel model."""
    return gather_full(model, model.state_dict())


def full_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """Each parameter's gradient, gathered to its single-process shape (None where it has none)."""
    return gather_full(model, {name: p.grad for name, p in model.named_parameters()})
