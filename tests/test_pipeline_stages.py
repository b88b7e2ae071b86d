"""The stage boundary of pipeline parallel (complexity_dist/parallel/pipeline.py), in process on 2 gloo ranks:
DeepSpeed's PipelineEngine runs one backward call per float tensor a stage outputs, so a boundary carrying
(x, v, mu_prev, highway) as four tensors ran each non-last stage's backward four times (a third of the
expected tokens/s on two H200s). Here every parameter's gradient must be accumulated exactly once per
micro-batch, on both stages, and the boundary must carry one float tensor. (Parity of the pipeline with one
process: tests/test_pipeline_train.py.)"""
import collections
import os

import torch
from conftest import tiny_overrides
from spawn_util import spawn_gloo

MICRO_BATCHES = 4


def check_one_backward_per_micro_batch(rank):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    from complexity_dist.config import load_config
    from complexity_dist.model import ComplexityForCausalLM
    from complexity_dist.parallel.deepspeed_engine import build_engine
    from complexity_dist.parallel.pipeline import build_pipeline_module

    # 4 layers on 2 stages: each stage has a first and a last layer that are not the model's first or last
    cfg = load_config(None, tiny_overrides(**{"model.num_hidden_layers": 4, "model.mu_router": "straight_through",
                                              "parallel.pp": 2, "train.micro_batch": 1,
                                              "train.global_batch": MICRO_BATCHES}))
    layout = cfg.layout(2)
    torch.manual_seed(0)
    pipe = build_pipeline_module(ComplexityForCausalLM(cfg.model), cfg, layout)
    engine = build_engine(pipe, cfg, layout, bf16=False)
    accumulated = collections.Counter()
    for name, p in pipe.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: accumulated.update([name]))
    boundary = []
    if rank == 0:  # what stage 0 hands to stage 1: the output of its last pipe layer
        pipe.forward_funcs[-1].register_forward_hook(lambda mod, args, out: boundary.append(out))
    ids = torch.randint(0, cfg.model.vocab_size, (MICRO_BATCHES, 1, cfg.data.seq_len + 1),
                        generator=torch.Generator().manual_seed(1))
    engine.train_batch(data_iter=iter([(b[:, :-1], b[:, 1:]) for b in ids]))
    held = {name for name, _ in pipe.named_parameters()}
    assert accumulated.keys() == held, f"stage {rank}: no gradient for {held - accumulated.keys()}"
    assert set(accumulated.values()) == {MICRO_BATCHES}, f"stage {rank}: {dict(accumulated)}"
    if rank == 0:
        assert len(boundary) == MICRO_BATCHES
        floats = [t for t in boundary[0] if t.is_floating_point()]
        assert len(floats) == 1 and floats[0].shape == (4, 1, cfg.data.seq_len, cfg.model.hidden_size)


def test_each_stage_runs_one_backward_per_micro_batch():
    spawn_gloo(check_one_backward_per_micro_batch, 2)
