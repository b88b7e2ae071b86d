"""`complexity-dist` command line: train | prepare-data | convert | bench | compare-runs | info | smoke."""
from __future__ import annotations

import argparse
import sys

from complexity_dist.config import ConfigError, load_config
from complexity_dist.data.errors import DataError
from complexity_dist.train.run_lock import RunDirError, probe_run_lock


def _info(args: argparse.Namespace) -> int:
    from complexity_dist.model.accounting import (flops_per_token, model_counts, rank_parameter_counts,
                                                  training_memory_gib)

    if args.world_size < 1:
        raise ConfigError(f"--world-size {args.world_size} must be >= 1 (the number of processes of the run)")
    # the whole layout is checked here (one message for every violation); tp/pp/ep > 1 are accepted even
    # though the training loop does not run them yet (`--preflight` says so)
    cfg = load_config(args.config, args.overrides, world_size=args.world_size)
    counts = model_counts(cfg.model)
    seq = cfg.data.seq_len
    flops = flops_per_token(cfg.model, seq, counts)
    layout = cfg.layout(args.world_size)
    mem = training_memory_gib(cfg, args.world_size)
    m, p = cfg.model, cfg.parallel
    print(f"model: H={m.hidden_size} L={m.num_hidden_layers} heads={m.num_attention_heads}/"
          f"{m.num_key_value_heads} experts={m.num_experts} I={m.intermediate_size} V={m.vocab_size}")
    print(f"parameters (total):            {counts.total:,}")
    print(f"parameters (active per token): {counts.active:,} ({counts.active / 1e9:.3f}B)")
    print(f"  of which non-embedding:      {counts.active_nonembedding:,}")
    print(f"FLOPs per token (seq {seq}):   {flops / 1e9:.2f} GFLOP")
    print(f"layout on {args.world_size} process(es): tp={layout.tp} pp={layout.pp} ep={layout.ep} dp={layout.dp} "
          f"expert_dp={layout.expert_dp} expert_tp={layout.expert_tp} "
          f"sequence_parallel={str(p.sequence_parallel).lower()} "
          f"micro_batch={layout.micro_batch} grad_accum={layout.grad_accum} zero={p.zero_stage}")
    stages = rank_parameter_counts(m, layout)
    print(f"parameters per rank (every tp and ep rank of a stage holds as many) = tensor-parallel shards + "
          f"experts ({m.num_experts // layout.ep} of {m.num_experts}, "
          f"{'each a tp shard' if layout.expert_tp > 1 else 'whole'}) + replicated (norms, "
          f"dynamics, router):")
    for c in stages:
        held = [f"layers {c.layers.start}-{c.layers.stop - 1}"]
        if c.holds_embedding:
            held.append("embedding")
        if c.holds_head:
            held.append("final norm")
            if c.tied_copy:
                held.append("tied embedding copy")
            elif not m.tie_word_embeddings:
                held.append("lm_head")
        print(f"  stage {c.stage} ({', '.join(held)}): {c.total:,} = {c.split:,} + {c.expert:,} + "
              f"{c.replicated:,}")
    grid = sum(layout.tp * c.split + layout.expert_tp * layout.ep * c.expert + c.replicated for c in stages)
    tied = sum(c.tied_copy for c in stages) * layout.tp
    padding = grid - tied - counts.total
    experts = "tp x ep x experts" if layout.expert_tp > 1 else "ep x experts"
    check = f"  over the grid (tp x split + {experts} + replicated, summed over stages): {grid:,}"
    extras = []
    if tied:
        extras.append(f"the tied embedding's copy on the last stage {tied:,}")
    if padding:
        extras.append(f"vocabulary padding to a multiple of tp {padding:,}")
    print(check + (f" = total {counts.total:,} + " + " + ".join(extras) if extras else " = total"))
    print("training memory per GPU (estimate, GiB): " +
          ", ".join(f"{k} {v:.1f}" for k, v in mem.items()) +
          f" (activations with train.activation_checkpointing={cfg.train.activation_checkpointing})")
    if args.preflight:
        from complexity_dist.train.trainer import preflight

        if cfg.train.run_lock:
            probe_run_lock(cfg.train.run_dir)  # a queued job on a run_dir in use fails now, not after the wait
        saved = preflight(cfg, args.world_size)
        print(f"preflight ok: {'resumes from ' + str(saved.path) if saved else 'starts a new run'} "
              f"in {cfg.train.run_dir}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from complexity_dist.train.trainer import train_main

    from complexity_dist.parallel.distributed import world_from_env

    # the layout is checked for the launched world now, with every violation in one message
    return train_main(load_config(args.config, args.overrides, world_size=world_from_env()[1]))


def _smoke(args: argparse.Namespace) -> int:
    """One forward/backward on generated tokens: checks an install without data or a process group."""
    import torch

    from complexity_dist.model import ComplexityForCausalLM, count_parameters

    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(cfg.train.seed)
    model = ComplexityForCausalLM(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    ids = torch.randint(0, cfg.model.vocab_size, (2, min(cfg.data.seq_len, 64)))
    for step in range(args.steps):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step + 1} loss {loss.item():.4f}")
    print(f"ok: {count_parameters(model):,} parameters")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="complexity-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain (one process, or every rank under torchrun)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=_train)

    from complexity_dist.data.prepare import add_prepare_data_parser
    add_prepare_data_parser(sub)

    from complexity_dist.convert.cli import add_convert_parser
    add_convert_parser(sub)

    from complexity_dist.train.bench import add_bench_parser
    add_bench_parser(sub)

    from complexity_dist.train.compare import add_compare_parser
    add_compare_parser(sub)

    p = sub.add_parser("info", help="parameters, FLOPs per token and a memory estimate of a config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--world-size", type=int, default=1, help="number of GPUs/processes for the layout")
    p.add_argument("--preflight", action="store_true",
                   help="also run the trainer's checks (supported layout, data shards, checkpoint to resume)")
    p.set_defaults(func=_info)

    p = sub.add_parser("smoke", help="a few forward/backward steps on random tokens (no data needed)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=3)
    p.set_defaults(func=_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come after options too (`info CONFIG --world-size 8 train.micro_batch=4`)
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    try:
        return args.func(args)
    except RunDirError as e:
        print(f"complexity-dist: run directory error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"complexity-dist: configuration error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"complexity-dist: data error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
