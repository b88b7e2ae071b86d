"""Pipeline parallelism: the plain model cut into stages for DeepSpeed's PipelineModule / PipelineEngine.

Why DeepSpeed's and not megatron-core's schedules: megatron-core's pipeline schedules allocate CUDA tensors
and streams (measured with megatron-core 0.16.1 on CPU), while DeepSpeed's PipelineEngine runs its 1F1B schedule
(`TrainSchedule`) with gloo on CPU as well as with NCCL on GPU, so the parity proof of this layout runs on
the CPU machine.

The stages are built from the SAME modules as the single-process model (no second copy of the math): every
rank builds the full `ComplexityForCausalLM` with the same seed, and the pipe layers below hold references
to its embedding, decoder layers, final norm and lm_head. The pipe layers are:

    0            tied "embed" (embedding + lm_head)   input_ids -> (x, ids)
    1..L         one per DecoderLayer                  (x, ids) | (x, v, mu_prev, highway, ids) | (stacked, ids)
                                                       -> (x, v, mu_prev, highway, ids) | (stacked, ids)
    L+1          final norm                            5-tuple -> hidden
    L+2          tied "embed", head forward            hidden -> logits;  loss = model.loss_fn(logits, targets)

Inside a stage, layers pass (x, v, mu_prev, highway, token ids). A stage boundary carries ONE float tensor,
stacked = torch.stack([x, v, mu_prev, highway]), and the ids: DeepSpeed's PipelineEngine runs one backward
call per float tensor a stage outputs, each through the whole stage's graph (retain_graph), so four tensors
made every non-last stage's backward four times as long (PP2 ran at 35% of two GPUs on H200s). The stack is
an exact copy, and its gradient is one tensor as well (the unused highway of the last layer gets zeros).
At layer 0 the single-process model passes v = mu_prev = highway = None; here layer 0 receives the 2-tuple
(x, ids) instead and passes None itself, so it runs exactly the single-process code. Layer 0 always sits on
stage 0 (every stage holds at least one decoder layer), so no None ever crosses a boundary. Rotary tables
are recomputed by each layer (deterministic, cheap): as float tensors crossing a boundary DeepSpeed would
mark them as needing gradients and send gradients back for them.

Tied embedding/lm_head: DeepSpeed's TiedLayerSpec builds the tied module on the first and the last stage,
broadcasts its weight from the first at start and after a load, and all-reduces its gradient over the
first/last-stage group after every backward (`allreduce_tied_weight_gradients`); the copy on the last stage is
marked `ds_pipe_replicated`, so the gradient norm counts it once.

Stage boundaries follow `Layout.stage_layers` (config.py), not DeepSpeed's partition methods.

ZeRO: DeepSpeed's PipelineEngine asserts ZeRO stage < 2 (gradients must stay whole for its per-micro-batch
backward); stage 0 would clip with our optimizer by this stage's norm only. So pp > 1 runs with ZeRO 1
(complexity_dist/parallel/parallelize.py check_parallelize refuses the rest).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from complexity_dist.config import Config, Layout
from complexity_dist.model.layers import compute_dtype, rope_tables

TIED_KEY = "embed"


class EmbedPipe(nn.Module):
    """The model's embedding and lm_head (one module, so one TiedLayerSpec ties them across stages)."""

    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.model.embed_tokens
        self.lm_head = model.lm_head  # its weight is embed_tokens.weight when tied

    def forward(self, input_ids: torch.Tensor):
        return self.embed_tokens(input_ids), input_ids


def head_forward(module: EmbedPipe, hidden: torch.Tensor) -> torch.Tensor:
    return module.lm_head(hidden)


class HeadPipe(nn.Module):
    """The untied lm_head (model.tie_word_embeddings=false)."""

    def __init__(self, model):
        super().__init__()
        self.lm_head = model.lm_head

    def forward(self, hidden):
        return self.lm_head(hidden)


class EmbeddingOnlyPipe(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.model.embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids), input_ids


class DecoderLayerPipe(nn.Module):
    """One DecoderLayer of the model, taking and returning what its neighbours in the pipe pass: the first
    layer of a stage (but layer 0) unstacks a boundary's tensor, the last one of a stage (but the model's
    last) stacks its outputs into one (see the module doc)."""

    def __init__(self, model, index: int, activation_checkpointing: str, first_in_stage: bool = False,
                 last_in_stage: bool = False):
        super().__init__()
        self.layer = model.model.layers[index]
        self.unstacks_input = first_in_stage and index > 0
        self.stacks_output = last_in_stage and index < len(model.model.layers) - 1
        self.head_dim, self.rope_theta = model.model.head_dim, model.model.rope_theta
        # the layer checkpoints itself in training mode (DecoderLayer.forward), as in the single-process model
        self.layer.activation_checkpointing = activation_checkpointing

    def forward(self, inputs):
        if self.unstacks_input:
            stacked, ids = inputs
            x, v, mu_prev, highway = stacked.unbind(0)
        elif len(inputs) == 2:  # layer 0: what the single-process model passes as None
            x, ids = inputs
            v = mu_prev = highway = None
        else:
            x, v, mu_prev, highway, ids = inputs
        cos, sin = rope_tables(self.head_dim, 0, ids.shape[1], self.rope_theta, compute_dtype(x.dtype), x.device)
        out = self.layer(x, v, mu_prev, highway, ids, cos, sin)
        if self.stacks_output:
            return torch.stack(out), ids
        return (*out, ids)


class NormPipe(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.norm = model.model.norm

    def forward(self, inputs):
        return self.norm(inputs[0])


def stage_bounds(layout: Layout) -> list[int]:
    """DeepSpeed's `parts`: pipe layer index where each stage starts, then the total. Stage s holds decoder
    layers layout.stage_layers(s); the embedding joins stage 0, the norm and head the last stage."""
    n = layout.num_layers
    parts = [0] + [1 + layout.stage_layers(s).start for s in range(1, layout.pp)] + [n + 3]
    return parts


def build_pipeline_module(model, cfg: Config, layout: Layout):
    """The PipelineModule of `model` for this rank's stage (collective: every rank calls it)."""
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, PipeModelDataParallelTopology

    class StagedPipelineModule(PipelineModule):
        # stage boundaries from our Layout (DeepSpeed's partition methods balance by other measures)
        def _partition_layers(self, method="uniform"):
            self.parts = stage_bounds(layout)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    # PipelineModule makes its groups through deepspeed.comm, which must wrap our (already made) process group
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    ckpt = cfg.train.activation_checkpointing
    tied = cfg.model.tie_word_embeddings
    specs = [TiedLayerSpec(TIED_KEY, EmbedPipe, model, tied_weight_attr=["embed_tokens.weight"]) if tied
             else LayerSpec(EmbeddingOnlyPipe, model)]
    firsts = {layout.stage_layers(st).start for st in range(layout.pp)}
    lasts = {layout.stage_layers(st)[-1] for st in range(layout.pp)}
    specs += [LayerSpec(DecoderLayerPipe, model, i, ckpt, i in firsts, i in lasts) for i in range(layout.num_layers)]
    specs.append(LayerSpec(NormPipe, model))
    specs.append(TiedLayerSpec(TIED_KEY, EmbedPipe, model, forward_fn=head_forward,
                               tied_weight_attr=["embed_tokens.weight"]) if tied else LayerSpec(HeadPipe, model))
    # DeepSpeed's rank order (pipe, data[, model]) is megatron-core's (tp innermost, then dp, then pp):
    # the trainer checks that both give this rank the same coordinates
    topo = (PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp) if layout.tp > 1
            else PipeDataParallelTopology(num_pp=layout.pp, num_dp=layout.dp))
    return StagedPipelineModule(specs, topology=topo, loss_fn=model.loss_fn, partition_method="uniform")


def pipe_parameter_names(model) -> dict[str, tuple[int, str, str]]:
    """Where each parameter of a pipeline checkpoint lives, from the pipe layers build_pipeline_module makes of
    `model` (any device; meta costs nothing): DeepSpeed's PipelineModule name (the name in the optimizer's
    `param_shapes`: "<pipe index>.<local>", or "tied_modules.embed.<local>" for the tied embedding/lm_head)
    -> (pipe layer index, its name in that layer's `layer_XX` file, the single-process name).
    The tied head (pipe layer L+2) has no file and no name of its own: it is the embedding's module."""
    n = len(model.model.layers)
    tied = model.config.tie_word_embeddings
    layers = [(0, EmbedPipe(model) if tied else EmbeddingOnlyPipe(model))]
    layers += [(1 + i, DecoderLayerPipe(model, i, False)) for i in range(n)]
    layers.append((n + 1, NormPipe(model)))
    if not tied:
        layers.append((n + 2, HeadPipe(model)))
    single = {id(p): name for name, p in model.named_parameters()}
    names = {}
    for index, module in layers:
        prefix = f"tied_modules.{TIED_KEY}." if tied and index == 0 else f"{index}."
        for local, p in module.named_parameters():
            names[prefix + local] = (index, local, single[id(p)])
    return names


def check_rank_order(pipe_module, env) -> None:
    """DeepSpeed's pipeline grid and megatron-core's groups must agree on this rank's coordinates (the data
    loader reads by env.dp_rank; DeepSpeed reduces over its own groups)."""
    grid = pipe_module._grid
    coords = env.layout.coords(env.rank)
    if (grid.get_stage_id(), grid.get_data_parallel_rank()) != (coords["pp"], coords["dp"]):
        raise RuntimeError(f"rank {env.rank}: DeepSpeed's pipeline grid puts it at stage {grid.get_stage_id()}, "
                           f"data-parallel rank {grid.get_data_parallel_rank()}; the layout at {coords}")


def local_state_names(model, pipe_module) -> dict[str, torch.Tensor]:
    """The single-process state_dict entries (today's names) whose tensors this rank's stage holds."""
    held = {id(p) for p in pipe_module.parameters()}
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) in held}


def full_state_dict(model, pipe_module, pp_group, tp_group=None) -> dict[str, torch.Tensor]:
    """The single-process state_dict gathered from every stage (collective over the pipeline group, and the
    tensor-parallel group when there is one; tiny models only: it travels as Python objects)."""
    names = local_state_names(model, pipe_module).keys()
    if tp_group is not None:  # every rank holds all layers' shards (same seed), so the TP gather is uniform
        from complexity_dist.parallel.tensor_parallel import full_state_dict as tp_full
        state = tp_full(model)
    else:
        state = model.state_dict()
    local = {k: state[k].detach().cpu().clone() for k in names}
    parts = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(parts, local, group=pp_group)
    state = {}
    for part in parts:
        state.update(part)
    return {k: state[k] for k in model.state_dict()}
