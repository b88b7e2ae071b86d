"""`complexity-dist convert to-hf | from-hf` (README, "Hugging Face")."""
from __future__ import annotations

import argparse


def _to_hf(args) -> int:
    from complexity_dist.convert.to_hf import to_hf

    out = to_hf(args.checkpoint, args.out_dir, dtype=args.dtype, shard_size=args.shard_size)
    print(f"wrote {out}")
    return 0


def _from_hf(args) -> int:
    from complexity_dist.convert.from_hf import from_hf

    path = from_hf(args.hf_dir, args.run_dir, config=args.config, overrides=args.overrides, step=args.step)
    print(f"wrote {path}")
    return 0


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="Hugging Face export (to-hf) and import (from-hf)")
    sub = p.add_subparsers(dest="direction", required=True)
    t = sub.add_parser("to-hf", help="a training checkpoint -> a Hugging Face folder (safetensors)")
    t.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a step_N folder")
    t.add_argument("out_dir")
    t.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    t.add_argument("--shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    t.set_defaults(func=_to_hf)
    f = sub.add_parser("from-hf", help="a Hugging Face folder -> a checkpoint that `train` resumes")
    f.add_argument("hf_dir")
    f.add_argument("run_dir")
    f.add_argument("overrides", nargs="*", help="section.key=value of the training run")
    f.add_argument("--config", default=None, help="the training YAML (model sizes come from the HF config)")
    f.add_argument("--step", type=int, default=0, help="step the checkpoint is at (default 0)")
    f.set_defaults(func=_from_hf)
    return p
