"""One optimizer step through the DeepSpeed engine: shared by the trainer and `complexity-dist bench`, so a
benchmark times exactly the code that trains."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.profiler import record_function


def optimizer_step(engine, batches: Iterator[torch.Tensor], grad_accum: int, lr: float, device: torch.device,
                   poison: bool = False) -> torch.Tensor:
    """Forward/backward over `grad_accum` micro-batches of [B, S+1] tokens, then DeepSpeed applies the update
    at the accumulation boundary (clipping, and skipping a non-finite step). Returns this rank's summed loss
    (fp64, on device; not synchronised, so the caller decides when to wait for it). `poison` makes the loss
    NaN (fault drills)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(grad_accum):
        # the phases name the ranges a profile charges the device's idle time to (train/profiling.py)
        with record_function("step/forward"):
            batch = next(batches).to(device, non_blocking=True)
            loss = engine(batch[:, :-1], targets=batch[:, 1:]).loss
            if poison:
                loss = loss * float("nan")
        with record_function("step/backward"):
            engine.backward(loss)
        with record_function("step/optimizer"):
            engine.step()  # applies the update at the accumulation boundary only
        loss_sum += loss.detach().double()
    return loss_sum
