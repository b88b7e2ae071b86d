"""The training loop: one readable function of small components (data, engine, checkpoints, metrics,
tracking, faults). Launched by torchrun (or as one plain process); launchers reuse it unchanged."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from complexity_dist.config import Config
from complexity_dist.model import ComplexityForCausalLM
from complexity_dist.model.accounting import flops_per_token, model_counts
from complexity_dist.parallel.distributed import DistEnv, check_supported, init_distributed, world_from_env
from complexity_dist.parallel.expert_parallel import routed_override_fraction
from complexity_dist.parallel.groups import destroy_groups
from complexity_dist.parallel.parallelize import expert_state, full_state_dict, load_expert_state, parallelize
from complexity_dist.train.checkpoint import (CheckpointMismatch, Checkpointer, SavedRun, finished,
                                              print_notes)
from complexity_dist.train.faults import (EXIT_DIVERGED, EXIT_NO_SPACE, EXIT_REQUEUE, InjectedFaults,
                                          NoSpaceLeft, PreemptionSignal, SkipGuard, TrainingDiverged)
from complexity_dist.parallel.deepspeed_engine import build_engine, global_grad_norm
from complexity_dist.train.evaluation import build_evaluator, check_heldout, training_shards
from complexity_dist.train.reshard import load_resharded, needs_reshard, open_reader
from complexity_dist.train.schedule import lr_at
from complexity_dist.train.step import optimizer_step
from complexity_dist.train.run_lock import check_run_dir, run_dir_lock


def data_cache_root() -> Path:
    return Path(os.environ.get("COMPLEXITY_DIST_CACHE", Path.home() / ".cache" / "complexity_dist"))


def embedded_vocab_size(cfg: Config) -> int:
    return cfg.data.vocab_size or min(cfg.model.vocab_size, 8192)


def preflight(cfg: Config, world: int) -> SavedRun | None:
    """Everything that can be wrong with the inputs, checked before a process group or GPU memory exists:
    layout, data shards, checkpoint compatibility. Returns the checkpoint to resume from, if any.
    Launchers run it too (`complexity-dist info --preflight`) so a bad job fails before it is queued."""
    from complexity_dist.data import ShardIndex

    cfg.layout(world)  # sizes that do not divide the world raise here
    check_supported(cfg)
    check_run_dir(cfg.train.run_dir)  # not an existing file, writable (read-only mounts, permissions)
    if cfg.data.path:
        ShardIndex.load(cfg.data.path).check(seq_len=cfg.data.seq_len, vocab_size=cfg.model.vocab_size)
    check_heldout(cfg)  # data.val_path / data.val_shards
    saved = None
    checkpointer = Checkpointer(cfg.train.run_dir, cfg.checkpoint.keep_last)
    if not cfg.checkpoint.resume:
        checkpointer.refuse_overwrite()  # never start over on top of existing checkpoints unasked
    else:
        saved = checkpointer.latest()  # falls back past damaged checkpoints; refuses tampered ones
        if saved is not None:
            Checkpointer.check_compatible(saved, cfg, world)
            if needs_reshard(saved, cfg, world):
                open_reader(saved)  # a file the new layout cannot be planned from fails here, before any group
            print_notes(saved)
            if saved.step > cfg.train.steps:
                raise CheckpointMismatch(
                    f"checkpoint {saved.path} is already at step {saved.step} > train.steps={cfg.train.steps}; "
                    f"raise train.steps to continue it, or use a new train.run_dir for a shorter run")
    return saved


def resolve_data_path(cfg: Config, env: DistEnv) -> str:
    """The configured shards, or the embedded corpus, prepared once per node by its first process.
    (TokenLoader checks the shards against seq_len and vocab when it opens them.)"""
    from complexity_dist.data import embedded_corpus_dir

    if cfg.data.path:
        return cfg.data.path
    path = None
    if env.local_rank == 0:
        path = embedded_corpus_dir(data_cache_root(), cfg.data.seq_len, embedded_vocab_size(cfg))
    dist.barrier()
    if path is None:
        path = embedded_corpus_dir(data_cache_root(), cfg.data.seq_len, embedded_vocab_size(cfg))
    return str(path)


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, saved: SavedRun | None):
        from complexity_dist.data import TokenLoader

        self.cfg, self.env = cfg, env
        self.bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and env.device.type == "cuda")
        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
        # under pp the full model stays in host memory: DeepSpeed's PipelineModule moves only this rank's stage
        # to the device (the other stages' modules are never used here)
        model = ComplexityForCausalLM(cfg.model).to(env.device if env.layout.pp == 1 else torch.device("cpu"))
        model.model.activation_checkpointing = cfg.train.activation_checkpointing
        # the layout (tensor/sequence/expert parallel) applied to the plain model, before compile and engine
        self.plan = parallelize(model, cfg, env.groups)
        if cfg.train.compile:
            model.compile_layers(cfg.train.compile_mode)
        self.pipeline = env.layout.pp > 1
        self.full_model, self._pipe_batches = model, None
        if self.pipeline:
            # DeepSpeed's PipelineModule over the same modules (complexity_dist/parallel/pipeline.py); its
            # PipelineEngine brings its own groups (same rank order as megatron-core's, checked)
            from complexity_dist.parallel.pipeline import build_pipeline_module, check_rank_order
            model = build_pipeline_module(model, cfg, env.layout)
            check_rank_order(model, env)
        self.engine = build_engine(model, cfg, env.layout, self.bf16, mpu=None if self.pipeline else self.plan.mpu,
                                   expert_group_name=self.plan.expert_group_name)
        self.checkpointer = Checkpointer(cfg.train.run_dir, cfg.checkpoint.keep_last)
        self.step, self.tokens_seen, self.skipped_total = 0, 0, 0
        loader_state = None
        if saved is not None:
            if needs_reshard(saved, cfg, env.world_size):  # another ZeRO stage, data-parallel size, tp, ep or pp
                rank_state = load_resharded(self.engine, saved, layout=self.plan,  # sets the expert rows too
                                            model=self.full_model if self.pipeline else None)
            else:
                rank_state = self.checkpointer.load(self.engine, saved)
                if self.plan.expert_parallel:
                    # DeepSpeed's model file holds one data-parallel rank's experts; each rank keeps its own rows
                    load_expert_state(self.engine.module, rank_state["experts"])
            self.step = saved.trainer_state["step"]
            self.tokens_seen = saved.trainer_state["tokens_seen"]
            self.skipped_total = saved.trainer_state["skipped_total"]
            loader_state = rank_state.get("loader")  # None in a checkpoint made by `convert from-hf`
        data_path = resolve_data_path(cfg, env)
        self.loader = TokenLoader(data_path, cfg.data.seq_len, env.layout.micro_batch,
                                  dp_rank=env.dp_rank, dp_size=env.layout.dp, seed=cfg.train.seed,
                                  num_workers=cfg.data.num_workers, vocab_size=cfg.model.vocab_size,
                                  pin_memory=env.device.type == "cuda",
                                  shards=training_shards(cfg, data_path))  # held-out shards never train
        if loader_state is not None:
            self.loader.load_state_dict(loader_state)
        elif saved is not None:  # a checkpoint made by `convert from-hf`: the data starts at step * global_batch
            self.loader.load_state_dict({**self.loader.state_dict(), "next_sample": self.step * cfg.train.global_batch})
        self.evaluator = build_evaluator(cfg, env, self.engine, data_path)  # None when train.eval_every=0
        self.faults = InjectedFaults()
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len, model_counts(cfg.model))

    def train_step(self, batches) -> tuple[float, float, bool, float, float]:
        """One optimizer step over grad_accum micro-batches. Returns (mean loss, grad norm, skipped, lr,
        routed_override_frac)."""
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.steps)
        if self.pipeline:
            return self._pipeline_step(batches, lr)
        loss_sum = optimizer_step(self.engine, batches, self.env.layout.grad_accum, lr, self.env.device,
                                  poison=self.step + 1 in self.faults.nan_steps)
        skipped = not self.engine.was_step_applied()
        grad_norm = global_grad_norm(self.engine)
        dist.all_reduce(loss_sum, group=self.env.dp_group)  # tp/pp ranks of a replica hold the same loss
        mean_loss = loss_sum.item() / (self.env.layout.grad_accum * self.env.layout.dp)
        return mean_loss, grad_norm, skipped, lr, self._routed_override_frac()

    def _pipeline_step(self, batches, lr: float) -> tuple[float, float, bool, float, float]:
        """One optimizer step by DeepSpeed's 1F1B schedule over grad_accum micro-batches. train_batch returns
        the loss averaged over micro-batches and data-parallel ranks, broadcast from the last stage."""
        if self._pipe_batches is None:
            device = self.env.device
            self._pipe_batches = ((b[:, :-1].to(device), b[:, 1:].to(device)) for b in batches)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        loss = self.engine.train_batch(data_iter=self._pipe_batches)
        return (float(loss), global_grad_norm(self.engine), not self.engine.was_step_applied(), lr,
                self._routed_override_frac())

    def _routed_override_frac(self) -> float:
        """Share of tokens the mu override moved off token_id % E in the last micro-batch: mean over layers,
        then over ranks (each rank's share is over the same number of tokens: its micro-batch, or under
        sequence parallel its slice of it, so the mean over all ranks is the mean over data-parallel ranks)."""
        frac = torch.tensor([routed_override_fraction(self.engine.module)], dtype=torch.float64,
                            device=self.env.device)
        dist.all_reduce(frac)
        return frac.item() / self.env.world_size

    def dump_full_weights(self, tag: str) -> None:
        """Debug/test drill: with COMPLEXITY_DIST_DUMP_WEIGHTS=DIR, rank 0 writes DIR/<tag>.pt, the
        single-process state_dict gathered from every rank's shards (collective: every rank calls it), when
        training starts (or resumes) and after every step. For parity tests on tiny models only."""
        out = os.environ.get("COMPLEXITY_DIST_DUMP_WEIGHTS")
        if not out:
            return
        if self.pipeline:
            from complexity_dist.parallel.pipeline import full_state_dict as pipeline_state
            state = pipeline_state(self.full_model, self.engine.module, self.env.groups.pp_group, self.plan.tp_group)
        else:
            state = full_state_dict(self.engine.module, self.plan)
        if self.env.is_main:
            Path(out).mkdir(parents=True, exist_ok=True)
            torch.save(state, Path(out) / f"{tag}.pt")

    def save(self) -> Path:
        state = {"tokens_seen": self.tokens_seen, "skipped_total": self.skipped_total}
        rank_state = {"loader": self.loader.state_dict()}
        if self.plan.expert_parallel:
            rank_state["experts"] = expert_state(self.engine.module)
        return self.checkpointer.save(self.engine, self.step, state, rank_state,
                                      self.cfg, before_commit=self.faults.maybe_kill_in_save,
                                      in_write=lambda path: self.faults.maybe_no_space(self.step, path))

    def fit(self) -> int:
        from complexity_dist.train.metrics import (MetricsLog, StepPrinter, Throughput, peak_flops_per_device,
                                                   peak_memory_gib)
        from complexity_dist.train.profiling import StepProfiler
        from complexity_dist.train.tracking import Tracker

        cfg, env = self.cfg, self.env
        run_dir = Path(cfg.train.run_dir)
        tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
        log = tracker = printer = None
        if env.is_main:
            log = MetricsLog(run_dir, resume_step=self.step)
            tracker = Tracker.from_config(cfg, run_dir, resume_step=self.step)
            printer = StepPrinter(total_steps=cfg.train.steps, start_step=self.step, log_every=cfg.train.log_every,
                                  device=env.device)
        throughput = Throughput(self.flops_per_token, peak_flops_per_device(env.device), num_devices=env.world_size)
        signal_flag = PreemptionSignal().install()
        guard = SkipGuard(cfg.train.max_consecutive_skips)
        batches = iter(self.loader)
        exit_code = 0
        profiler = StepProfiler(cfg.train.profile_start, cfg.train.profile_steps,
                                run_dir / "profile" / f"rank_{env.rank}", env.device)
        self.dump_full_weights(f"step_{self.step}")
        try:
            while self.step < cfg.train.steps:
                profiler.before_step(self.step + 1)
                t0 = time.perf_counter()
                loss, grad_norm, skipped, lr, override = self.train_step(batches)
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                self.step += 1
                if profiler.after_step(self.step) and env.is_main:
                    printer.message(f"profile of steps {profiler.start}-{profiler.last}: {run_dir / 'profile'}/"
                                    f"rank_*/ (kinds.txt, top_kernels.txt, idle.txt, trace.json.gz)")
                self.tokens_seen += tokens_per_step
                self.skipped_total += int(skipped)
                self.dump_full_weights(f"step_{self.step}")
                rates = throughput.update(tokens_per_step, seconds, steps_left=cfg.train.steps - self.step)
                # every rank evaluates together (after the step's timing, so tokens/s is training alone)
                evaluated = self.evaluator.maybe_evaluate(self.step) if self.evaluator else {}
                if env.is_main:
                    row = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_s": rates.tokens_per_s, "mfu": rates.mfu, "skipped": int(skipped),
                           "skipped_total": self.skipped_total, "tokens": self.tokens_seen,
                           "step_time_s": seconds, "routed_override_frac": override, **evaluated,
                           "peak_mem_gib": peak_memory_gib(env.device)}  # rank 0's peak so far
                    log.write(row)
                    tracker.log_metrics(self.step, row)
                    printer.update(row, rates)
                guard.record(skipped, self.step)
                if self.step == self.faults.preempt_at:
                    signal_flag.received = signal.SIGTERM
                preempted = self._agree_on_preemption(signal_flag)
                last = self.step == cfg.train.steps
                if cfg.checkpoint.enabled and (preempted or last or self.step % cfg.checkpoint.every == 0):
                    path = self.save()
                    if env.is_main:
                        printer.message(f"checkpoint {path}")
                if preempted:
                    if env.is_main:
                        printer.message(f"preempted by signal {signal_flag.received}: saved step {self.step}, "
                                        f"exiting with {EXIT_REQUEUE} so the launcher requeues")
                    exit_code = EXIT_REQUEUE
                    break
        except TrainingDiverged as e:
            if env.is_main:
                print(f"complexity-dist: {e}", file=sys.stderr)
            exit_code = EXIT_DIVERGED
        except NoSpaceLeft as e:  # raised on every rank by Checkpointer.save, the partial folder removed
            if env.is_main:
                print(f"complexity-dist: {e}", file=sys.stderr)
            exit_code = EXIT_NO_SPACE
        finally:
            profiler.close()
            signal_flag.uninstall()
            if env.is_main:
                printer.close()
                log.close()
                tracker.finish("FINISHED" if exit_code == 0 else "KILLED" if exit_code == EXIT_REQUEUE else "FAILED")
        return exit_code

    def _agree_on_preemption(self, signal_flag: PreemptionSignal) -> bool:
        # a signal may reach ranks at slightly different times: stop when any rank has it
        flag = torch.tensor([1.0 if signal_flag.received is not None else 0.0], device=self.env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def train_main(cfg: Config) -> int:
    """Validate, set up, train, tear down. Returns the process exit code."""
    rank, world, _ = world_from_env()
    # global rank 0 holds <run_dir>/.lock for the whole run: a second run on this run_dir exits 2 here,
    # before any process group exists (torchrun then stops its other ranks)
    with run_dir_lock(cfg.train.run_dir, enabled=rank == 0 and cfg.train.run_lock):
        saved = preflight(cfg, world)
        if saved is not None and saved.step >= cfg.train.steps:  # preflight refused >; == is a finished run
            return finished(saved, cfg)
        Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
        env = init_distributed(cfg)
        try:
            trainer = Trainer(cfg, env, saved)
            return trainer.fit()
        finally:
            if dist.is_initialized():
                destroy_groups()
                dist.destroy_process_group()
