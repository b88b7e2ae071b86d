"""Profile forward+backward of a preset on one GPU and print the top CUDA kernels (plain model, no DeepSpeed).

    python tools/profile_step.py configs/pretrain_1b.yaml --micro-batch 4 [section.key=value ...]
"""
from __future__ import annotations

import argparse
import time

import torch

from complexity_dist.config import load_config
from complexity_dist.model import ComplexityForCausalLM
from complexity_dist.model.accounting import flops_per_token


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    model = ComplexityForCausalLM(cfg.model).cuda().to(torch.bfloat16)
    model.model.activation_checkpointing = cfg.train.activation_checkpointing
    if cfg.train.compile:
        model.compile_layers()
    S = cfg.data.seq_len
    ids = torch.randint(0, cfg.model.vocab_size, (args.micro_batch, S + 1), device="cuda")

    def step():
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()

    for _ in range(4 if cfg.train.compile else 3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tps = args.micro_batch * S / dt
    mfu = tps * flops_per_token(cfg.model, S) / 989e12
    print(f"fwd+bwd: {dt * 1e3:.1f} ms/micro-batch, {tps:,.0f} tokens/s, MFU {mfu:.1%}, "
          f"peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
