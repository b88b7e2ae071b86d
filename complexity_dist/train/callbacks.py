"""The optional parts of the training loop, as callbacks (OLMo-core's pattern): the loop in
complexity_dist/train/trainer.py runs the step, the checkpoint cadence and preemption; everything else hooks in
here. Every rank runs every callback, in list order, so a callback may call collectives (evaluation does);
output goes through `trainer.message` (rank 0 prints).

    on_start(trainer)                 before the first step (also of a resumed run)
    before_step(trainer, step)        step (counted from 1) is about to run
    after_step(trainer, record)       it ran; record.metrics is the row rank 0 logs, and callbacks before the
                                      reporter may add to it (evaluation adds val_loss)
    on_end(trainer, exit_code)        always, also after an error (0, EXIT_REQUEUE, EXIT_DIVERGED, ...)
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from complexity_dist.train.faults import EXIT_REQUEUE, SkipGuard

if TYPE_CHECKING:
    from complexity_dist.train.trainer import Trainer


@dataclass
class StepRecord:
    """What one optimizer step produced, as the loop hands it to the callbacks."""
    step: int
    skipped: bool
    seconds: float
    rates: Any  # complexity_dist.train.metrics.Rates: tokens/s, MFU, time left
    metrics: dict[str, Any] = field(default_factory=dict)


class Callback:
    def on_start(self, trainer: "Trainer") -> None:
        pass

    def before_step(self, trainer: "Trainer", step: int) -> None:
        pass

    def after_step(self, trainer: "Trainer", record: StepRecord) -> None:
        pass

    def on_end(self, trainer: "Trainer", exit_code: int) -> None:
        pass


class Profiling(Callback):
    """train.profile_start / profile_steps: torch.profiler over those steps on every rank
    (<run_dir>/profile/rank_<R>/; complexity_dist/train/profiling.py)."""

    def __init__(self, start: int, steps: int, out: Path, device):
        from complexity_dist.train.profiling import StepProfiler

        self.profiler = StepProfiler(start, steps, out, device)

    def before_step(self, trainer, step):
        self.profiler.before_step(step)

    def after_step(self, trainer, record):
        if self.profiler.after_step(record.step):
            trainer.message(f"profile of steps {self.profiler.start}-{self.profiler.last}: "
                            f"{self.profiler.out.parent}/rank_*/ (kinds.txt, top_kernels.txt, idle.txt, "
                            f"trace.json.gz)")

    def on_end(self, trainer, exit_code):
        self.profiler.close()  # a run that stops inside the window still gets its reports


class WeightDumps(Callback):
    """Debug/test drill: with COMPLEXITY_DIST_DUMP_WEIGHTS=DIR, rank 0 writes DIR/step_<N>.pt, the
    single-process state_dict gathered from every rank's shards, when training starts (or resumes) and after
    every step. For parity tests on tiny models only (the gather is a collective: every rank runs it)."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_start(self, trainer):
        trainer.dump_full_weights(self.out / f"step_{trainer.step}.pt")

    def after_step(self, trainer, record):
        trainer.dump_full_weights(self.out / f"step_{record.step}.pt")


class Evaluation(Callback):
    """train.eval_every: the held-out loss, on every rank together, after the step's timing (so tokens/s is
    training alone); adds val_loss and val_ppl to the step's metrics."""

    def __init__(self, evaluator):
        self.evaluator = evaluator

    def after_step(self, trainer, record):
        record.metrics.update(self.evaluator.maybe_evaluate(record.step))


class Reporter(Callback):
    """Rank 0: metrics.jsonl, MLflow and the console line of every step; the MLflow run's final status."""

    def __init__(self, trainer: "Trainer"):
        from complexity_dist.train.metrics import MetricsLog, StepPrinter
        from complexity_dist.train.tracking import Tracker

        cfg, run_dir = trainer.cfg, Path(trainer.cfg.train.run_dir)
        self.log = MetricsLog(run_dir, resume_step=trainer.step)
        self.tracker = Tracker.from_config(cfg, run_dir, resume_step=trainer.step)
        self.printer = StepPrinter(total_steps=cfg.train.steps, start_step=trainer.step,
                                   log_every=cfg.train.log_every, device=trainer.env.device)

    def after_step(self, trainer, record):
        self.log.write(record.metrics)
        self.tracker.log_metrics(record.step, record.metrics)
        self.printer.update(record.metrics, record.rates)

    def on_end(self, trainer, exit_code):
        self.printer.close()
        self.log.close()
        self.tracker.finish("FINISHED" if exit_code == 0 else "KILLED" if exit_code == EXIT_REQUEUE else "FAILED")


class DivergenceGuard(Callback):
    """train.max_consecutive_skips: raises TrainingDiverged (exit EXIT_DIVERGED) after that many non-finite
    steps in a row."""

    def __init__(self, limit: int):
        self.guard = SkipGuard(limit)

    def after_step(self, trainer, record):
        self.guard.record(record.skipped, record.step)


class InjectedPreemption(Callback):
    """COMPLEXITY_DIST_PREEMPT_AT=N (complexity_dist/train/faults.py): behave as if SIGTERM arrived during step
    N, so the loop saves and exits for a requeue."""

    def __init__(self, step: int):
        self.step = step

    def after_step(self, trainer, record):
        if record.step == self.step:
            trainer.preemption.received = signal.SIGTERM


def default_callbacks(trainer: "Trainer") -> list[Callback]:
    """The callbacks a config asks for, in the order they run (evaluation before the reporter logs its
    metrics; the divergence guard after the step is logged)."""
    cfg, env = trainer.cfg, trainer.env
    callbacks: list[Callback] = []
    if cfg.train.profile_steps:
        callbacks.append(Profiling(cfg.train.profile_start, cfg.train.profile_steps,
                                   Path(cfg.train.run_dir) / "profile" / f"rank_{env.rank}", env.device))
    if os.environ.get("COMPLEXITY_DIST_DUMP_WEIGHTS"):
        callbacks.append(WeightDumps(os.environ["COMPLEXITY_DIST_DUMP_WEIGHTS"]))
    if trainer.evaluator is not None:
        callbacks.append(Evaluation(trainer.evaluator))
    if env.is_main:
        callbacks.append(Reporter(trainer))
    callbacks.append(DivergenceGuard(cfg.train.max_consecutive_skips))
    if trainer.faults.preempt_at:
        callbacks.append(InjectedPreemption(trainer.faults.preempt_at))
    return callbacks
