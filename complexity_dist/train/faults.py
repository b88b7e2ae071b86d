"""Fault handling: preemption signals, the skip-streak guard, and a fault-injection hook for tests."""
from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

# Exit code of a run that stopped on SIGTERM/SIGUSR1 after saving a checkpoint: launchers requeue on it.
EXIT_REQUEUE = 99
# Exit code of a run aborted after too many consecutive non-finite steps.
EXIT_DIVERGED = 3
# Exit code of a run that stopped because a checkpoint did not fit on disk (ENOSPC/EDQUOT on any rank); the
# partial checkpoint is removed and the previous one is intact. Not requeued: someone must free space first.
EXIT_NO_SPACE = 4


class TrainingDiverged(RuntimeError):
    pass


class NoSpaceLeft(RuntimeError):
    """A checkpoint save hit a full disk or quota; raised on every rank, with one message for all."""


class PreemptionSignal:
    """Remembers that SIGTERM or SIGUSR1 arrived; the trainer finishes its step, saves, and exits."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> "PreemptionSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class SkipGuard:
    """Counts consecutive skipped (non-finite) steps and aborts after `limit` of them."""

    def __init__(self, limit: int):
        self.limit = limit
        self.consecutive = 0
        self.total = 0

    def record(self, skipped: bool, step: int) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.limit:
            raise TrainingDiverged(
                f"{self.consecutive} consecutive steps (up to step {step}) had a non-finite loss or gradient "
                f"norm; stopping. Lower optim.lr, check the data, or resume from an earlier checkpoint "
                f"(train.max_consecutive_skips={self.limit})")


class InjectedFaults:
    """Deterministic faults for tests and drills, read from the environment (all off by default):
    COMPLEXITY_DIST_INJECT_NAN="5,6"     the loss of these steps is made NaN
    COMPLEXITY_DIST_PREEMPT_AT=20        behave as if SIGTERM arrived during step 20
    COMPLEXITY_DIST_KILL_IN_SAVE=40      SIGKILL this process while it writes the checkpoint of step 40
    COMPLEXITY_DIST_ENOSPC_IN_SAVE=40    writing a checkpoint file of step 40 fails with ENOSPC (disk full);
                                         "40@1": on rank 1 only
    """

    def __init__(self, environ=os.environ):
        self.nan_steps = {int(s) for s in environ.get("COMPLEXITY_DIST_INJECT_NAN", "").split(",") if s.strip()}
        self.preempt_at = int(environ.get("COMPLEXITY_DIST_PREEMPT_AT", 0))
        self.kill_in_save = int(environ.get("COMPLEXITY_DIST_KILL_IN_SAVE", 0))
        step, _, rank = environ.get("COMPLEXITY_DIST_ENOSPC_IN_SAVE", "").partition("@")
        self.enospc_in_save = int(step or 0)
        self.enospc_rank = int(rank) if rank else None
        self.rank = int(environ.get("RANK", 0))

    def maybe_kill_in_save(self, step: int) -> None:
        if step == self.kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_no_space(self, step: int, path: Path) -> None:
        """Called just before a checkpoint file is opened for writing."""
        if step == self.enospc_in_save and self.enospc_rank in (None, self.rank):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
