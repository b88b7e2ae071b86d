"""`complexity-dist bench CONFIG [overrides] [--baseline] [--steps N] [--json OUT] [--profile DIR]`: the one
command every throughput figure of this project comes from.

It runs optimizer steps of a preset on one device through the real training path (the DeepSpeed engine of
the config's ZeRO stage, AdamW, clipping, accumulation, `train.compile`, activation checkpointing) on
synthetic tokens, and reports tokens/s, MFU (FLOPs per token as in docs/architecture.md), peak memory and the
step-time median and spread. `--baseline` also times, in the same process on the same device, Megatron-Core's
GPTModel with the Transformer Engine layer spec at the same width, depth, heads and vocabulary (a dense SwiGLU
FFN of the config's total intermediate size: the same shape as the Llama-style models Megatron users train),
through the same engine, and prints our MFU as a ratio of its MFU. `--profile DIR` runs two more steps of our
model under torch.profiler and writes where the device time goes: a table by kind of kernel (GEMM, attention,
communication, fused Triton/compiled, other), the top kernels, when the device sat idle and on which CPU
operator it was waiting, and a Chrome trace.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from complexity_dist.config import Config, ConfigError, load_config


@dataclass
class BenchResult:
    name: str
    parameters: int
    flops_per_token: float
    tokens_per_step: int
    step_times_s: list[float]
    tokens_per_s: float  # tokens per step / median step time
    mfu: float | None  # None without a known peak (CPU, unknown GPU)
    peak_memory_gib: float
    first_loss: float
    last_loss: float

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_times_s)

    def spread(self) -> tuple[float, float]:
        """10th and 90th percentile of the step time (min and max below 10 steps)."""
        times = sorted(self.step_times_s)
        if len(times) < 10:
            return times[0], times[-1]
        q = statistics.quantiles(times, n=10)
        return q[0], q[-1]


def synthetic_batches(vocab_size: int, micro_batch: int, seq_len: int, count: int, seed: int,
                      device: torch.device):
    """`count` fixed batches of random token ids, made once on the device and cycled: data loading is not
    what this measures (the trainer's loader prefetches pinned batches in worker processes)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pool = [torch.randint(0, vocab_size, (micro_batch, seq_len + 1), generator=gen).to(device)
            for _ in range(count)]
    i = 0
    while True:
        yield pool[i % count]
        i += 1


def time_engine(name: str, engine, cfg: Config, layout, flops_per_token: float, parameters: int,
                steps: int, warmup: int, device: torch.device, profile_dir: str | None = None) -> BenchResult:
    from complexity_dist.train.metrics import memory_gib, peak_flops_per_device
    from complexity_dist.train.step import optimizer_step

    batches = synthetic_batches(cfg.model.vocab_size, layout.micro_batch, cfg.data.seq_len,
                                2 * layout.grad_accum, cfg.train.seed, device)
    tokens_per_step = layout.micro_batch * layout.grad_accum * cfg.data.seq_len
    times, losses = [], []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        loss_sum = optimizer_step(engine, batches, layout.grad_accum, cfg.optim.lr, device)
        loss = loss_sum.item() / layout.grad_accum  # waits for the step
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            losses.append(loss)
    if profile_dir is not None:
        profile_steps(engine, batches, layout.grad_accum, cfg.optim.lr, device, Path(profile_dir))
    median = statistics.median(times)
    peak = peak_flops_per_device(device)
    tokens_per_s = tokens_per_step / median
    return BenchResult(name, parameters, flops_per_token, tokens_per_step, times, tokens_per_s,
                       tokens_per_s * flops_per_token / peak if peak else None, memory_gib(device),
                       losses[0], losses[-1])


def profile_steps(engine, batches, grad_accum: int, lr: float, device: torch.device, out: Path,
                  steps: int = 2) -> None:
    """Profile `steps` optimizer steps and write the reports of complexity_dist/train/profiling.py under `out`."""
    from complexity_dist.train.profiling import StepProfiler
    from complexity_dist.train.step import optimizer_step

    profiler = StepProfiler(start=1, steps=steps, out=out, device=device)
    for step in range(1, steps + 1):
        profiler.before_step(step)
        optimizer_step(engine, batches, grad_accum, lr, device).item()
        profiler.after_step(step)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_complexity(cfg: Config, env, bf16: bool, steps: int, warmup: int,
                     profile_dir: str | None = None) -> BenchResult:
    from complexity_dist.model import ComplexityForCausalLM, count_parameters
    from complexity_dist.model.accounting import flops_per_token
    from complexity_dist.parallel.deepspeed_engine import build_engine

    from complexity_dist.parallel.parallelize import parallelize

    torch.manual_seed(cfg.train.seed)
    model = ComplexityForCausalLM(cfg.model).to(env.device)
    model.model.activation_checkpointing = cfg.train.activation_checkpointing
    parallelize(model, cfg, None)  # one GPU: only model.linear_backend / train.fp8 apply
    if cfg.train.compile:
        model.compile_layers(cfg.train.compile_mode)
    engine = build_engine(model.to(env.device), cfg, env.layout, bf16)
    result = time_engine("complexity (ours)", engine, cfg, env.layout,
                         flops_per_token(cfg.model, cfg.data.seq_len), count_parameters(model), steps, warmup,
                         env.device, profile_dir)
    del engine, model
    _release(env.device)
    return result


class MegatronGPTLoss(nn.Module):
    """Megatron-Core's GPTModel behind the interface the engine calls: (input_ids, targets) -> .loss."""

    def __init__(self, gpt: nn.Module):
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        per_token = self.gpt(input_ids, positions, None, labels=targets)  # [B, S] losses
        return SimpleNamespace(loss=per_token.float().mean())


def build_megatron_baseline(cfg: Config, bf16: bool) -> tuple[nn.Module, int, int]:
    """(module, parameters, non-embedding parameters) of the dense Megatron-Core + TE reference model."""
    import torch.nn.functional as F
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    from megatron.core.transformer import TransformerConfig

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    m = cfg.model
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = TransformerConfig(
        num_layers=m.num_hidden_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_key_value_heads, ffn_hidden_size=m.intermediate_size, kv_channels=m.head_dim,
        normalization="RMSNorm", layernorm_epsilon=m.rms_norm_eps, qk_layernorm=True,
        gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=True, add_bias_linear=False,
        apply_rope_fusion=True, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=m.initializer_range,
        bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype, **megatron_fp8(cfg))
    gpt = GPTModel(config, get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True), vocab_size=m.vocab_size,
                   max_sequence_length=cfg.data.seq_len, position_embedding_type="rope",
                   rotary_base=int(m.rope_theta), share_embeddings_and_output_weights=False)
    total = sum(p.numel() for p in gpt.parameters())
    embedding = sum(p.numel() for n, p in gpt.named_parameters() if "word_embeddings" in n or "output_layer" in n)
    return MegatronGPTLoss(gpt), total, total - embedding


def megatron_fp8(cfg: Config) -> dict:
    """The baseline's FP8 settings matching train.fp8, so that `bench --baseline` compares FP8 with FP8: the
    HYBRID format (E4M3 forward, E5M2 gradients), per-tensor current scaling ("tensorwise") or delayed."""
    if cfg.train.fp8 == "none":
        return {}
    return {"fp8": "hybrid", "fp8_recipe": "tensorwise" if cfg.train.fp8 == "current" else "delayed"}


def check_baseline_available() -> None:
    if not torch.cuda.is_available():
        raise ConfigError("--baseline needs a CUDA GPU with Transformer Engine (Megatron-Core's TE layers do "
                          "not run on CPU); run bench without --baseline here")
    for module, package in (("megatron.core", "megatron-core"), ("transformer_engine.pytorch", "transformer-engine")):
        try:
            __import__(module)
        except Exception as e:  # noqa: BLE001 - ImportError, or a library that fails to load (OSError)
            raise ConfigError(f"--baseline needs {package}, which does not import here ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); install it (pip install "
                              f"'complexity-dist[te]') or run bench without --baseline") from None


def bench_megatron(cfg: Config, env, bf16: bool, steps: int, warmup: int) -> BenchResult:
    from complexity_dist.parallel.deepspeed_engine import build_engine

    torch.manual_seed(cfg.train.seed)
    model, total, nonembedding = build_megatron_baseline(cfg, bf16)
    m = cfg.model
    flops = 6 * nonembedding + 6 * m.vocab_size * m.hidden_size + 12 * m.num_hidden_layers * m.hidden_size * \
        cfg.data.seq_len
    engine = build_engine(model.to(env.device), cfg, env.layout, bf16)
    name = "megatron-core GPT + TE (dense)" if cfg.train.fp8 == "none" else "megatron-core + TE (dense, FP8)"
    result = time_engine(name, engine, cfg, env.layout, flops, total, steps, warmup,
                         env.device)
    del engine, model
    _release(env.device)
    return result


def format_report(cfg: Config, layout, device_name: str, steps: int, warmup: int,
                  results: list[BenchResult]) -> str:
    lines = [f"bench on {device_name}: seq {cfg.data.seq_len}, global batch {layout.micro_batch * layout.grad_accum}"
             f" (micro-batch {layout.micro_batch} x {layout.grad_accum}), ZeRO {cfg.parallel.zero_stage}, "
             f"compile {cfg.train.compile}, activation checkpointing {cfg.train.activation_checkpointing}; "
             f"{steps} timed steps after {warmup} warm-up",
             f"{'model':<32} {'params':>8} {'GFLOP/tok':>9} {'tokens/s':>10} {'MFU':>6} "
             f"{'step ms median (p10-p90)':>26} {'peak GiB':>8} {'loss':>7}"]
    for r in results:
        lo, hi = r.spread()
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "-"
        lines.append(f"{r.name:<32} {r.parameters / 1e9:>7.2f}B {r.flops_per_token / 1e9:>9.2f} "
                     f"{r.tokens_per_s:>10,.0f} {mfu:>6} "
                     f"{r.median_s * 1e3:>10.1f} ({lo * 1e3:.1f}-{hi * 1e3:.1f}){'':>3} {r.peak_memory_gib:>8.1f} "
                     f"{r.last_loss:>7.3f}")
    if len(results) == 2 and results[1].tokens_per_s > 0:
        ours, base = results
        ratio = f"MFU {ours.mfu / base.mfu:.3f}" if ours.mfu and base.mfu else "MFU -"
        lines.append(f"ours / baseline: {ratio}, tokens/s {ours.tokens_per_s / base.tokens_per_s:.3f}")
    return "\n".join(lines)


def bench_main(args: argparse.Namespace) -> int:
    from complexity_dist.parallel.distributed import init_distributed, world_from_env

    overrides = list(args.overrides)
    if args.global_batch:
        overrides.append(f"train.global_batch={args.global_batch}")
    cfg = load_config(args.config, overrides)
    if world_from_env()[1] != 1:
        raise ConfigError("bench measures one device: run it as a plain process, not under torchrun")
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError(f"--steps={args.steps} must be >= 1 and --warmup={args.warmup} >= 0")
    if not args.global_batch and not any(o.startswith("train.global_batch=") for o in args.overrides):
        # a preset's global batch is a whole pretraining step (hundreds of sequences): time two micro-batches
        micro = cfg.train.micro_batch or cfg.train.global_batch
        cfg = load_config(args.config, [*overrides, f"train.micro_batch={micro}", f"train.global_batch={2 * micro}"])
    layout = cfg.layout(1)
    if args.baseline:
        check_baseline_available()  # before anything is timed
    env = init_distributed(cfg)
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and env.device.type == "cuda")
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "CPU"
    try:
        results = [bench_complexity(cfg, env, bf16, args.steps, args.warmup, args.profile)]
        if args.baseline:
            results.append(bench_megatron(cfg, env, bf16, args.steps, args.warmup))
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    print(format_report(cfg, layout, device_name, args.steps, args.warmup, results))
    if args.profile:
        print(f"profile of complexity (ours), 2 steps -> {args.profile}/ (kinds.txt, top_kernels.txt, idle.txt, "
              f"trace.json.gz)")
        print((Path(args.profile) / "kinds.txt").read_text(), end="")
        print("".join((Path(args.profile) / "idle.txt").read_text().splitlines(keepends=True)[:6]), end="")
    if args.json:
        out = {"config": str(args.config), "overrides": overrides, "device": device_name,
               "seq_len": cfg.data.seq_len, "micro_batch": layout.micro_batch, "grad_accum": layout.grad_accum,
               "zero_stage": cfg.parallel.zero_stage, "compile": cfg.train.compile,
               "results": [{**asdict(r), "step_time_median_s": r.median_s,
                            "step_time_p10_s": r.spread()[0], "step_time_p90_s": r.spread()[1]}
                           for r in results]}
        if len(results) == 2 and results[0].mfu and results[1].mfu:
            out["mfu_ratio"] = results[0].mfu / results[1].mfu
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="tokens/s, MFU and memory of a preset on one device (optionally against "
                                     "Megatron-Core + Transformer Engine in the same run)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator; default 5)")
    p.add_argument("--global-batch", type=int, default=0,
                   help="sequences per optimizer step (default: two micro-batches, unless train.global_batch "
                        "is given as an override)")
    p.add_argument("--baseline", action="store_true",
                   help="also time Megatron-Core GPTModel with the TE layer spec (dense, same sizes; needs CUDA)")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--profile", metavar="DIR",
                   help="after timing, profile two steps of our model: time by kernel kind, top kernels and a "
                        "Chrome trace under DIR")
    p.set_defaults(func=bench_main)
