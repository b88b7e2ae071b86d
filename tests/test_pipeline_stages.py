"""The stage boundary of pipeline parallel (complexity_dist/parallel/pipeline.py): DeepSpeed's PipelineEngine runs
one backward call per float tensor a stage outputs, so a boundary carrying (x, v, mu_prev, highway) as four
tensors ran each non-last stage's backward four times (a third of the expected tokens/s on two H200s). Here, on
2 gloo processes under torchrun (the trainer's own process lifecycle), every parameter's gradient must be
accumulated exactly once per micro-batch on both stages, and the boundary must carry one float tensor.
(Parity of the pipeline with one process: tests/test_pipeline_train.py.)

Run directly, this file is the worker: `torchrun --nproc-per-node 2 tests/test_pipeline_stages.py`."""
import collections
import sys
from pathlib import Path

import torch

MICRO_BATCHES = 4


def check_one_backward_per_micro_batch() -> str:
    import torch.distributed as dist
    from conftest import tiny_overrides

    from complexity_dist.config import load_config
    from complexity_dist.model import ComplexityForCausalLM
    from complexity_dist.parallel.deepspeed_engine import build_engine
    from complexity_dist.parallel.pipeline import build_pipeline_module

    dist.init_process_group("gloo")
    rank = dist.get_rank()
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
        assert len(floats) == 1 and floats[0].shape == (4, 1, cfg.data.seq_len, cfg.model.hidden_size), \
            [tuple(t.shape) for t in floats]
    dist.barrier()  # neither rank tears down while the other still communicates
    dist.destroy_process_group()
    return f"stage {rank}: {len(held)} parameters, each accumulated once per micro-batch"


def test_each_stage_runs_one_backward_per_micro_batch():
    from test_train import ROOT, launcher, run

    proc = run([*launcher(2), str(ROOT / "tests/test_pipeline_stages.py")], timeout=300)
    assert "stage 0: " in proc.stdout and "stage 1: " in proc.stdout, proc.stdout


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))  # conftest's helpers
    print(check_one_backward_per_micro_batch(), flush=True)
