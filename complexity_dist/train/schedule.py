"""Learning-rate schedule: linear warmup, then cosine decay that reaches min_lr at the last step."""
from __future__ import annotations

import math

from complexity_dist.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based, so the last step of a run is total_steps - 1).

    Warmup steps 0..W-1 climb linearly to lr (step W-1 has lr itself); the cosine then runs from lr at
    step W to min_lr at step total_steps - 1, so the run's final update uses min_lr."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    span = max(1, total_steps - 1 - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))
