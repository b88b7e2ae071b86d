"""The training loop: one readable function of small components (data, engine, checkpoints, faults); its
optional parts (metrics and tracking, evaluation, profiling, drills) are callbacks
(complexity_dist/train/callbacks.py). Launched by torchrun (or as one plain process); launchers reuse it
unchanged."""
from __future__ import annotations

import os
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
from complexity_dist.train.callbacks import Callback, Reporter, StepRecord, default_callbacks
from complexity_dist.train.faults import (EXIT_DIVERGED, EXIT_NO_SPACE, EXIT_REQUEUE, InjectedFaults,
                                          NoSpaceLeft, PreemptionSignal, TrainingDiverged)
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
        self.callbacks: list[Callback] = []  # fit() sets them
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

    def dump_full_weights(self, path: Path) -> None:
        """The single-process state_dict gathered from every rank's shards, written by rank 0 to `path` (a
        collective: every rank calls it; the WeightDumps callback's drill, tiny models only)."""
        if self.pipeline:
            from complexity_dist.parallel.pipeline import full_state_dict as pipeline_state
            state = pipeline_state(self.full_model, self.engine.module, self.env.groups.pp_group, self.plan.tp_group)
        else:
            state = full_state_dict(self.engine.module, self.plan)
        if self.env.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, path)

    def message(self, text: str) -> None:
        """A line for the console, printed by rank 0 (through the reporter's printer, between step lines)."""
        if self.env.is_main:
            reporter = next((c for c in self.callbacks if isinstance(c, Reporter)), None)
            reporter.printer.message(text) if reporter else print(text, flush=True)

    def save(self) -> Path:
        state = {"tokens_seen": self.tokens_seen, "skipped_total": self.skipped_total}
        rank_state = {"loader": self.loader.state_dict()}
        if self.plan.expert_parallel:
            rank_state["experts"] = expert_state(self.engine.module)
        return self.checkpointer.save(self.engine, self.step, state, rank_state,
                                      self.cfg, before_commit=self.faults.maybe_kill_in_save,
                                      in_write=lambda path: self.faults.maybe_no_space(self.step, path))

    def fit(self, callbacks: list[Callback] | None = None) -> int:
        """Train to train.steps (or until preempted); returns the exit code. `callbacks`: the optional parts of
        the loop (complexity_dist/train/callbacks.py); by default those the config asks for."""
        from complexity_dist.train.metrics import Throughput, peak_flops_per_device, peak_memory_gib

        cfg, env = self.cfg, self.env
        tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
        throughput = Throughput(self.flops_per_token, peak_flops_per_device(env.device), num_devices=env.world_size)
        self.callbacks = default_callbacks(self) if callbacks is None else callbacks
        self.preemption = PreemptionSignal().install()  # uninstalled in the finally below
        batches = iter(self.loader)
        exit_code = 0
        try:
            for callback in self.callbacks:
                callback.on_start(self)
            while self.step < cfg.train.steps:
                for callback in self.callbacks:
                    callback.before_step(self, self.step + 1)
                t0 = time.perf_counter()
                loss, grad_norm, skipped, lr, override = self.train_step(batches)
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                self.step += 1
                self.tokens_seen += tokens_per_step
                self.skipped_total += int(skipped)
                rates = throughput.update(tokens_per_step, seconds, steps_left=cfg.train.steps - self.step)
                record = StepRecord(self.step, skipped, seconds, rates, {
                    "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": rates.tokens_per_s, "mfu": rates.mfu, "skipped": int(skipped),
                    "skipped_total": self.skipped_total, "tokens": self.tokens_seen, "step_time_s": seconds,
                    "routed_override_frac": override,
                    "peak_mem_gib": peak_memory_gib(env.device)})  # this rank's peak so far (rank 0 logs)
                for callback in self.callbacks:
                    callback.after_step(self, record)
                preempted = self._agree_on_preemption(self.preemption)
                last = self.step == cfg.train.steps
                if cfg.checkpoint.enabled and (preempted or last or self.step % cfg.checkpoint.every == 0):
                    self.message(f"checkpoint {self.save()}")
                if preempted:
                    self.message(f"preempted by signal {self.preemption.received}: saved step {self.step}, "
                                 f"exiting with {EXIT_REQUEUE} so the launcher requeues")
                    exit_code = EXIT_REQUEUE
                    break
        except (TrainingDiverged, NoSpaceLeft) as e:  # (NoSpaceLeft: on every rank, the partial checkpoint removed)
            if env.is_main:
                print(f"complexity-dist: {e}", file=sys.stderr)
            exit_code = EXIT_DIVERGED if isinstance(e, TrainingDiverged) else EXIT_NO_SPACE
        finally:
            for callback in self.callbacks:
                callback.on_end(self, exit_code)
            self.preemption.uninstall()
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
