"""Tensor parallelism (and sequence parallelism) applied from outside to the single-process model.

`apply_tensor_parallel(model, tp_group)` takes the full `ComplexityForCausalLM` (built with the same seed on
every rank), replaces the parameters of the sharded projections by this rank's slice and inserts the
collectives of complexity_dist/parallel/comm.py with module hooks. The model's forward code is not copied.

The plan (tp = size of the group, r = this rank):

    attention q/k/v, mu_to_q/k/v   column-parallel by head: rows of query heads r*nq/tp.. and kv heads
                                   r*nkv/tp.. (the attention reads its local head counts from the weights;
                                   contiguous head blocks keep GQA's q-head -> kv-head map local)
    attention inputs n, mu_prev    copy_to (SP: gather_to_full along the sequence), both through one
                                   collective on [n, mu_prev]
    o_proj                         row-parallel (input columns of this rank's heads), output reduce_from
                                   (SP: reduce_scatter_to along the sequence)
    experts                        gate_up [E, H, 2I] -> [E, H, 2I/tp] = cat(gate slice r, up slice r),
                                   down [E, I, H] -> rows slice r; `TokenRoutedMLP.compute_experts` is wrapped
                                   on the instance: copy_to on its tokens, reduce_from on its result (SP:
                                   gather_to_full / reduce_scatter_to along the sequence of the [B, S/tp]
                                   tokens, so the wrapped compute gets one process's tokens in one
                                   process's order, as expert parallel inside it needs). The reduction sits
                                   inside compute_experts, so the straight-through factor p/p.detach()
                                   multiplies the full sum and mu_router's gradient is the same on every rank.
                                   expert_tp=False (SP only): not split, not wrapped; each rank's whole
                                   experts run its own tokens, and they are replicated parameters (below).
    embedding                      vocab-parallel: rows r*V/tp..; ids outside give zeros; reduce_from
                                   (SP: reduce_scatter_to along the sequence, which starts the SP region)
    lm_head (tied or not)          vocab-parallel rows; input copy_to (SP: gather_to_full); the loss is a
                                   vocab-parallel cross-entropy (max, sum of exponentials and the target logit
                                   reduced over tp) that never builds the full-vocabulary logits on one rank.
                                   `logits` in the output are this rank's vocabulary slice.

Replicated parameters (norms, dynamics, mu, mu_router): without SP every rank computes them on the same full
tensors, so their gradients come out identical on every TP rank with no communication — except q_norm and
k_norm, which are shared by all heads and see only this rank's heads: their gradient is partial. With SP every
replicated parameter sees only this rank's tokens. Such parameters are marked `tp_partial_grad = True` and their
gradients are summed over the TP group by `model.tp_partial_grads` (PartialGradSum): by a hook on each parameter,
in backward, before any optimizer or ZeRO hook sees the gradient, or, once an engine that reduces only at the
accumulation boundary has deferred it, once per step as one flat all-reduce. A data-parallel engine must count
every TP-replicated parameter once when it computes a gradient norm (parameters with `tp_shard` set are
sharded, the others replicated).

Sequence parallel splits the sequence (dim 1) over the TP ranks between the TP regions; data.seq_len must be
divisible by tp. Cached decoding (`generate`) is single-process only.

Linear backends (`backend`, from model.linear_backend). `torch`: the shards are plain parameters under today's
names and the collectives are the hooks above. `megatron`: the same shards, but the sharded projections run
through megatron-core's tensor-parallel linears, which carry their own collectives:
    o_proj              a RowParallelLinear (input_is_parallel) holding the `o_proj.weight` shard; its output
                        reduce replaces the hook
    lm_head             a ColumnParallelLinear (gather_output=False) holding the `lm_head.weight` shard (tied: the
                        embedding's shard, as with torch); its input-gradient all-reduce replaces copy_to
    stacked [x, mu] QKV the attention's `project_qkv` seam calls megatron's
                        linear_with_grad_accumulation_and_async_allreduce on `qkv_weight()` (this rank's heads,
                        concatenated from the q/k/v/mu_to_* shards as in one process), with the input-gradient
                        all-reduce replacing copy_to on n and mu_prev; a module holding stacked rows would
                        rename the checkpoint's q/k/v/mu_to_* weights
Both subclasses return the output alone (megatron returns (output, bias)) and drop megatron's `_extra_state`
state_dict entry, so the names and shapes of `full_state_dict` are today's. The experts (batched matmuls, not
linears), the embedding and the replicated projections (dynamics, mu_router: no TP split) are the same in both
backends. Refused with megatron: sequence parallel (megatron-core 0.16.1's sequence-parallel linears gather and
scatter dim 0 of [seq, batch, hidden] into buffers allocated with torch.cuda.current_device(); this model is
[batch, seq, hidden] and must also run on CPU). Transformer Engine (`te`) is refused in
complexity_dist/parallel/parallelize.py; on GPU it would sit behind the same seam, and te.Linear's
`_extra_state` (FP8 scaling) must then be kept out of the checkpoint names the same way.
"""
from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from complexity_dist.config import ConfigError, ModelConfig
from complexity_dist.model.layers import compute_dtype
from complexity_dist.parallel.comm import all_gather_cat, copy_to, gather_to_full, group_rank, group_size, reduce_from, \
    reduce_scatter_to
from complexity_dist.parallel.overlap import gathered_linear, scattered_linear


@dataclass(frozen=True)
class ShardSpec:
    """How a parameter is split over the TP ranks: `dim`, and for the experts' gate_up the two halves
    (gate | up) of the last dimension are split separately."""
    dim: int
    halves: bool = False


# The plan above as a table by full-model parameter name: what readers of a tensor-parallel checkpoint
# (complexity_dist/convert/reader.py) reassemble along. apply_tensor_parallel checks every shard it makes
# against it, so the table cannot drift from the code that shards.
_SHARD_TABLE = (
    (re.compile(r"(model\.embed_tokens|lm_head)\.weight"), ShardSpec(0)),
    (re.compile(r"model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|mu_to_q|mu_to_k|mu_to_v)\.weight"),
     ShardSpec(0)),
    (re.compile(r"model\.layers\.\d+\.self_attn\.o_proj\.weight"), ShardSpec(1)),
    (re.compile(r"model\.layers\.\d+\.mlp\.gate_up_proj"), ShardSpec(2, halves=True)),
    (re.compile(r"model\.layers\.\d+\.mlp\.down_proj"), ShardSpec(1)),
)


_EXPERT_WEIGHT = re.compile(r"model\.layers\.\d+\.mlp\.(gate_up_proj|down_proj)")


def shard_spec_of(name: str, expert_tp: bool = True) -> ShardSpec | None:
    """How apply_tensor_parallel splits the parameter `name`; None for a replicated one. `expert_tp`:
    parallel.expert_tensor_parallel (false: the experts are whole on every TP rank)."""
    if not expert_tp and _EXPERT_WEIGHT.fullmatch(name):
        return None
    return next((spec for pattern, spec in _SHARD_TABLE if pattern.fullmatch(name)), None)


def unshard(pieces: list[torch.Tensor], spec: ShardSpec | None) -> torch.Tensor:
    """The full tensor from the tp ranks' pieces (in tp-rank order): the inverse of `_shard`."""
    if spec is None:
        return pieces[0]
    if spec.halves:
        halves = [p.chunk(2, dim=spec.dim) for p in pieces]
        return torch.cat([torch.cat([h[0] for h in halves], dim=spec.dim),
                          torch.cat([h[1] for h in halves], dim=spec.dim)], dim=spec.dim)
    return torch.cat(pieces, dim=spec.dim)


def check_tensor_parallel(cfg: ModelConfig, tp: int, sequence_parallel: bool = False,
                          seq_len: int | None = None, expert_tp: bool = True) -> None:
    """Raise ConfigError naming the numbers when `tp` cannot shard this model."""
    problems = []
    for key in ("num_attention_heads", "num_key_value_heads", "vocab_size"):
        value = getattr(cfg, key)
        if value % tp:
            problems.append(f"parallel.tp={tp} does not divide model.{key}={value}")
    if expert_tp and cfg.expert_intermediate_size % tp:
        problems.append(f"parallel.tp={tp} does not divide the expert intermediate size "
                        f"(model.intermediate_size / num_experts = {cfg.expert_intermediate_size})")
    if sequence_parallel and seq_len is not None and seq_len % tp:
        problems.append(f"parallel.sequence_parallel needs parallel.tp={tp} to divide data.seq_len={seq_len}")
    if problems:
        problems[-1] += ": choose a tp that divides them (or resize the model)"
    if not expert_tp and not sequence_parallel and tp > 1:
        problems.append("whole experts on every TP rank (expert_tensor_parallel=false) need sequence_parallel: "
                        "they run each rank's own slice of the tokens")
    if problems:
        raise ConfigError("; ".join(problems))


def shard_of(full: torch.Tensor, tp: int, r: int, spec: ShardSpec | None) -> torch.Tensor:
    """Rank r's piece of a full tensor (a view where possible; `full` itself when replicated)."""
    if spec is None:
        return full
    if spec.halves:
        gate, up = full.chunk(2, dim=spec.dim)
        return torch.cat([gate.chunk(tp, dim=spec.dim)[r], up.chunk(tp, dim=spec.dim)[r]], dim=spec.dim)
    return full.chunk(tp, dim=spec.dim)[r]


def _shard(param: torch.Tensor, tp: int, r: int, spec: ShardSpec) -> nn.Parameter:
    with torch.no_grad():
        local = shard_of(param, tp, r, spec)
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
        tp, r = group_size(group), group_rank(group)
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
        if group_size(group) > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - row_max.unsqueeze(-1)
    sum_exp = reduce_from(shifted.exp().sum(dim=-1), group)
    local = targets - group_rank(group) * vocab_local
    inside = (local >= 0) & (local < vocab_local)
    target_logit = shifted.gather(1, local.clamp(0, vocab_local - 1).unsqueeze(1)).squeeze(1)
    target_logit = reduce_from(torch.where(inside, target_logit, torch.zeros_like(target_logit)), group)
    valid = targets != -100
    per_token = torch.where(valid, sum_exp.log() - target_logit, torch.zeros_like(target_logit))
    return per_token.sum() / valid.sum()


class PartialGradSum:
    """Sums the TP-partial gradients (`tp_partial_grad` parameters) over the TP group, in one of two modes.

    immediate (the default): a hook on each parameter all-reduces its gradient in backward, every micro-batch,
        before the gradient is accumulated. What a plain backward (tests) and ZeRO 2/3 need: their reduction
        hooks take each gradient as it is produced.
    deferred (`defer()`): the hooks pass gradients through, so each rank accumulates its own partial sums over
        the micro-batches, and `sum_accumulated()` all-reduces them once per optimizer step, as one flat
        buffer. A sum commutes with the accumulation, so the result is the same; the cost is one collective per
        step instead of one per parameter, layer and micro-batch (with sequence parallel, every replicated
        parameter: 11 per layer). For engines that reduce only at the accumulation boundary (ZeRO 0/1): see
        complexity_dist/parallel/deepspeed_engine.py, which calls it first thing in that reduction."""

    def __init__(self, group):
        self.group = group
        self.params: list[nn.Parameter] = []
        self.deferred = False

    def add(self, param: nn.Parameter) -> None:
        if getattr(param, "tp_partial_grad", False):
            return
        param.tp_partial_grad = True
        self.params.append(param)
        param.register_hook(self._hook)

    def _hook(self, grad: torch.Tensor) -> torch.Tensor:
        if self.deferred:
            return grad
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=self.group)
        return grad

    def defer(self, accumulated_in: str = "grad", dtype: torch.dtype | None = None) -> None:
        """`accumulated_in`: the parameter attribute the engine sums gradients in over the micro-batches (.grad,
        or DeepSpeed ZeRO 1's fp32 `grad_accum`), of `dtype` (None: the parameter's)."""
        self.deferred = True
        self.accumulated_in, self.accumulated_dtype = accumulated_in, dtype

    def sum_accumulated(self) -> None:
        """All-reduce the accumulated gradient of every partial parameter in place (deferred mode). Collective
        over the TP group; a rank whose parameter has no gradient contributes zeros, so the ranks never disagree
        on the buffer's layout."""
        if not self.deferred or not self.params:
            return
        for p in self.params:
            if getattr(p, self.accumulated_in, None) is None:
                setattr(p, self.accumulated_in, torch.zeros_like(p, dtype=self.accumulated_dtype))
        grads = [getattr(p, self.accumulated_in) for p in self.params]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for same in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in same])
            dist.all_reduce(flat, group=self.group)
            for g, summed in zip(same, flat.split([g.numel() for g in same])):
                g.copy_(summed.view_as(g))


BACKENDS = ("torch", "megatron")
MEGATRON_SP_REFUSAL = (
    "model.linear_backend=megatron with parallel.sequence_parallel=true: megatron-core 0.16.1's sequence-parallel "
    "linears gather/scatter dim 0 of [seq, batch, hidden] tensors into buffers on torch.cuda.current_device(), "
    "while this model is [batch, seq, hidden] and runs on CPU too; set parallel.sequence_parallel=false or "
    "model.linear_backend=torch")


def _megatron_layers():
    # megatron.core's package import warns that Transformer Engine/Apex are missing (on CPU); these linears
    # need neither
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel import layers
    return ModelParallelConfig, layers


class _MegatronLinears:
    """Builds megatron-core linears that hold a given shard under today's parameter name."""

    def __init__(self, group, dtype: torch.dtype):
        ModelParallelConfig, layers = _megatron_layers()
        self.group, self.layers = group, layers
        # CPU allocation of a placeholder that the shard replaces (no init, no CUDA); the fused wgrad GEMM
        # needs apex
        self.config = ModelParallelConfig(tensor_model_parallel_size=group_size(group), sequence_parallel=False,
                                          use_cpu_initialization=True, perform_initialization=False,
                                          gradient_accumulation_fusion=False, params_dtype=dtype)
        self.row_cls, self.column_cls = _megatron_classes(layers)

    def row(self, full: nn.Linear) -> nn.Module:
        mod = self.row_cls(full.in_features, full.out_features, config=self.config, init_method=nn.init.zeros_,
                           bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=self.group)
        mod.weight = _shard(full.weight, group_size(self.group), group_rank(self.group), ShardSpec(1))
        return mod

    def column(self, full: nn.Linear, weight: nn.Parameter) -> nn.Module:
        mod = self.column_cls(full.in_features, full.out_features, config=self.config,
                              init_method=nn.init.zeros_, bias=False, gather_output=False, tp_group=self.group)
        mod.weight = weight
        return mod

    def qkv(self, attn: nn.Module):
        fn, group = self.layers.linear_with_grad_accumulation_and_async_allreduce, self.group

        def project_qkv(n: torch.Tensor, mu_prev: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
            inp = n if mu_prev is None else torch.cat([n, mu_prev], dim=-1)
            # forward: this rank's heads; backward: the input gradient all-reduced over the TP group (copy_to)
            return attn.split_qkv(fn(inp, attn.qkv_weight(), None, gradient_accumulation_fusion=False,
                                     allreduce_dgrad=True, sequence_parallel=False, tp_group=group))
        return project_qkv


@functools.cache
def _megatron_classes(layers):
    class _Plain:
        """A megatron-core linear with this model's interface: the output alone (bias-free), and no
        `_extra_state` entry (megatron saves None for TE compatibility and a load pre-hook inserts one; neither
        is part of this model's checkpoint names)."""
        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._load_state_dict_pre_hooks.clear()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[0]

    class RowParallel(_Plain, layers.RowParallelLinear):
        pass

    class ColumnParallel(_Plain, layers.ColumnParallelLinear):
        pass
    return RowParallel, ColumnParallel


def apply_tensor_parallel(model: nn.Module, tp_group, sequence_parallel: bool = False,
                          backend: str = "torch", comm_overlap: bool = False, expert_tp: bool = True) -> nn.Module:
    """Shard `model` (a ComplexityForCausalLM) in place over `tp_group` and return it. `backend` is
    model.linear_backend ("torch" or "megatron"). `comm_overlap` (parallel.tp_comm_overlap; sequence parallel
    with the torch backend only): the attention's projections gather and scatter by chunks that overlap their
    GEMMs (complexity_dist/parallel/overlap.py) instead of through the hooks. `expert_tp`
    (parallel.expert_tensor_parallel; false needs sequence parallel): false keeps every expert whole on each
    rank, where it runs this rank's slice of the tokens. See the module doc."""
    if getattr(model, "tp_group", None) is not None:
        raise ValueError("apply_tensor_parallel: this model is already tensor-parallel")
    if backend not in BACKENDS:
        raise ValueError(f"apply_tensor_parallel: backend={backend!r}, expected one of {BACKENDS}")
    if backend == "megatron" and sequence_parallel:
        raise ConfigError(MEGATRON_SP_REFUSAL)
    tp, r = group_size(tp_group), group_rank(tp_group)
    cfg = model.config
    check_tensor_parallel(cfg, tp, sequence_parallel, expert_tp=expert_tp)
    if tp == 1:
        return model
    megatron = _MegatronLinears(tp_group, model.lm_head.weight.dtype) if backend == "megatron" else None
    overlap = comm_overlap and sequence_parallel and backend == "torch"
    g = tp_group
    partial = PartialGradSum(g)
    enter = functools.partial(gather_to_full, group=g, dim=1) if sequence_parallel else \
        functools.partial(copy_to, group=g)
    leave = functools.partial(reduce_scatter_to, group=g, dim=1) if sequence_parallel else \
        functools.partial(reduce_from, group=g)

    # vocabulary: embedding, then the (possibly tied) lm_head and the loss
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens, g, sequence_parallel)
    head = model.lm_head
    head_weight = model.model.embed_tokens.weight if tied else _shard(head.weight, tp, r, ShardSpec(0))
    if megatron is not None:
        model.lm_head = megatron.column(head, head_weight)
    else:
        head.weight = head_weight
        head.out_features = head.weight.shape[0]
        head.register_forward_pre_hook(lambda mod, args: (enter(args[0]), *args[1:]))
    model.loss_fn = functools.partial(vocab_parallel_cross_entropy, group=g)

    if not expert_tp:
        local_ids = _LocalTokenIds(tp, r)
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
        assert attn.o_proj.bias is None, "a row-parallel bias would be added tp times"
        if megatron is not None:  # the collectives are inside megatron's linears
            attn.o_proj = megatron.row(attn.o_proj)
            attn.project_qkv = megatron.qkv(attn)
        else:
            attn.o_proj.weight = _shard(attn.o_proj.weight, tp, r, ShardSpec(1))
            attn.o_proj.in_features = attn.o_proj.weight.shape[1]
            if overlap:  # the collectives are inside the projections, by chunks that overlap their GEMMs
                attn.o_proj.forward = _scattered_o_proj(attn.o_proj, g)
                attn.project_qkv = _gathered_qkv(attn, g)
            else:
                attn.register_forward_pre_hook(_attention_inputs(enter))
                attn.o_proj.register_forward_hook(lambda mod, args, out: leave(out))
        # shared by every head, applied to this rank's heads only
        partial.add(attn.q_norm.weight)
        partial.add(attn.k_norm.weight)

        mlp = layer.mlp
        if not expert_tp:
            # whole experts (SP only) run this rank's tokens as they come: no collective; their gradients are
            # partial sums over the ranks' tokens, like every replicated parameter's below. The ids go first
            # (before expert parallel's pre-hook, which then plans this rank's slice)
            mlp.register_forward_pre_hook(local_ids.routing_inputs, prepend=True)
            continue
        mlp.gate_up_proj = _shard(mlp.gate_up_proj, tp, r, ShardSpec(2, halves=True))
        mlp.down_proj = _shard(mlp.down_proj, tp, r, ShardSpec(1))
        mlp.compute_experts = _tp_experts(mlp, g, sequence_parallel)
        if sequence_parallel:
            # routing runs on this rank's tokens: give it this rank's slice of the ids. Registered after
            # expert parallel's own pre-hook (parallelize applies EP first), which keeps the full ids
            mlp.register_forward_pre_hook(_sp_routing_inputs(tp, r))

    if sequence_parallel:
        for p in model.parameters():
            if not hasattr(p, "tp_shard"):
                partial.add(p)
    for name, p in model.named_parameters():
        if getattr(p, "tp_shard", None) != shard_spec_of(name, expert_tp):
            raise AssertionError(f"apply_tensor_parallel: {name} sharded as {getattr(p, 'tp_shard', None)}, "
                                 f"shard_spec_of says {shard_spec_of(name, expert_tp)}: update _SHARD_TABLE")
    model.tp_group, model.sequence_parallel, model.linear_backend = g, sequence_parallel, backend
    model.tp_partial_grads = partial
    return model


def _attention_inputs(enter):
    def hook(mod, args):
        n, mu_prev, *rest = args
        if mu_prev is None:
            return (enter(n), None, *rest)
        # both inputs of the stacked projection through one collective (SP: one all-gather forward, one
        # reduce-scatter backward; without SP one backward all-reduce instead of two)
        return (*enter(torch.cat([n, mu_prev], dim=-1)).chunk(2, dim=-1), *rest)
    return hook


# The two seams below are closures, not functools.partial objects: dynamo guards a partial by identity, and one
# per layer made every compiled layer a graph of its own (recompiling past the recompile limit); a closure is
# guarded by its code, which all layers share (tests/test_tensor_parallel.py counts the graphs).

def _gathered_qkv(attn, group):
    """project_qkv under SP with overlap: n and mu_prev are this rank's [B, S/tp, H] slices; the stacked
    projection gathers the sequence by chunks (one all-gather of [n, mu_prev], overlapped) and returns this
    rank's heads over the whole sequence."""
    def project_qkv(n: torch.Tensor, mu_prev: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        inp = n if mu_prev is None else torch.cat([n, mu_prev], dim=-1)
        return attn.split_qkv(gathered_linear(inp, attn.qkv_weight(), group))
    return project_qkv


def _scattered_o_proj(o_proj: nn.Linear, group):
    """o_proj's forward under SP with overlap: this rank's heads over the whole sequence in, this rank's
    sequence slice of the sum over ranks out."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        return scattered_linear(x, o_proj.weight, group)
    return forward


def _tp_experts(mlp, group, sequence_parallel: bool):
    """Wrap the bound `mlp.compute_experts(x [T, H], expert [T])` so it runs on this rank's expert shards."""
    compute = mlp.compute_experts

    def wrapped(x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        if sequence_parallel:
            # gathered along the sequence of [B, S/tp, H], the tokens come in the single-process (batch, seq)
            # order: the inner compute sees the same tokens, in the same order, as without SP. Expert parallel
            # relies on it: its plan cache and moved-token check read the full ids remembered before the SP
            # pre-hook sliced them (complexity_dist/parallel/expert_parallel.py)
            local = mlp._sp_local_shape
            full = gather_to_full(x.view(*local, x.shape[-1]), group, dim=1)
            out = compute(full.reshape(-1, x.shape[-1]), all_gather_cat(expert.view(local), group, dim=1).reshape(-1))
            return reduce_scatter_to(out.view(full.shape), group, dim=1).reshape(x.shape)
        return reduce_from(compute(copy_to(x, group), expert), group)
    return wrapped


class _LocalTokenIds:
    """This rank's sequence slice of the micro-batch's token ids for whole experts, cut once per micro-batch:
    every layer gets the same ids tensor from the model (or from its pipeline stage), so the slice is kept
    until another ids tensor comes, and every layer hands the same slice tensor to routing and to expert
    parallel, whose plan cache and speculative check know a micro-batch by that tensor's identity."""

    def __init__(self, tp: int, rank: int):
        self.tp, self.rank = tp, rank
        self.full: torch.Tensor | None = None  # holding it keeps its identity from being reused
        self.ids: torch.Tensor | None = None

    def routing_inputs(self, mlp, args):
        m, full_ids, *rest = args
        if full_ids is not self.full:
            self.full, self.ids = full_ids, full_ids.chunk(self.tp, dim=1)[self.rank]
        return (m, self.ids, *rest)


def _sp_routing_inputs(tp: int, r: int):
    def hook(mod, args):
        m, ids, *rest = args
        mod._sp_local_shape = m.shape[:-1]  # [B, S/tp]: how the expert wrapper regroups the flat tokens
        return (m, ids.chunk(tp, dim=1)[r], *rest)
    return hook


def _gather(t: torch.Tensor, spec: ShardSpec | None, group) -> torch.Tensor:
    if spec is None:
        return t.detach().clone()
    t = t.detach()
    if spec.halves:
        gate, up = t.chunk(2, dim=spec.dim)
        return torch.cat([all_gather_cat(gate, group, spec.dim), all_gather_cat(up, group, spec.dim)], dim=spec.dim)
    return all_gather_cat(t, group, spec.dim)


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
