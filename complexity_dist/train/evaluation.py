"""Validation loss on held-out data: the same fixed samples at every evaluation, whatever the dp size.

Held-out data is either its own prepared folder (`data.val_path`) or the last `data.val_shards` shards of
the training data's index, which the training loader then never reads (`training_shards`).

An evaluation reads global positions [0, eval_batches * global_batch) of the held-out sample order, in
rounds of micro_batch * dp samples exactly as TokenLoader hands out training data, so each rank takes its
own slice of one global set of samples. The loss is token-weighted: every rank adds up (loss x tokens) and
tokens, and one all-reduce gives the mean over all held-out tokens (unchanged by ranks that hold the same
slice, since both sums grow alike).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from complexity_dist.config import Config, ConfigError

IGNORE_INDEX = -100  # the model's cross-entropy ignore index


def heldout_split(cfg: Config, num_shards: int, where: str) -> tuple[slice | None, slice | None]:
    """(training part, held-out part) of a dataset of `num_shards` shards; (None, None) when nothing is
    held out of it. `where` names the dataset in errors."""
    n = cfg.data.val_shards
    if n == 0:
        return None, None
    if n >= num_shards:
        raise ConfigError(f"data.val_shards={n} holds out all {num_shards} shards of {where}, leaving none to "
                          f"train on; set data.val_shards to at most {num_shards - 1}, or give separate "
                          f"held-out data with data.val_path")
    return slice(0, num_shards - n), slice(num_shards - n, num_shards)


def training_shards(cfg: Config, data_path: str | Path) -> slice | None:
    """The shards of `data_path` the training loader may read (None = all)."""
    from complexity_dist.data import ShardIndex

    if cfg.data.val_shards == 0:
        return None
    return heldout_split(cfg, len(ShardIndex.load(data_path).shards), str(data_path))[0]


def heldout_source(cfg: Config, data_path: str | Path) -> tuple[str, slice | None] | None:
    """(folder, shards of it) holding the validation samples, or None when no held-out data is set.
    Raises ConfigError/DataError for held-out data that cannot serve one evaluation."""
    from complexity_dist.data import ShardIndex

    if cfg.data.val_path:
        if Path(cfg.data.val_path).resolve() == Path(data_path).resolve():
            raise ConfigError(f"data.val_path={cfg.data.val_path} is the training data itself, so the validation "
                              f"loss would be measured on trained-on samples; prepare a separate folder, or hold "
                              f"out shards of the training data with data.val_shards=N instead")
        index = ShardIndex.load(cfg.data.val_path).check(seq_len=cfg.data.seq_len, vocab_size=cfg.model.vocab_size)
        source = (str(cfg.data.val_path), None)
        samples, where = index.num_samples, f"data.val_path={cfg.data.val_path}"
    elif cfg.data.val_shards:
        index = ShardIndex.load(data_path)
        part = heldout_split(cfg, len(index.shards), str(data_path))[1]
        source = (str(data_path), part)
        samples = sum(s.samples for s in index.shards[part])
        where = f"the last data.val_shards={cfg.data.val_shards} shards of {data_path}"
    else:
        return None
    wanted = cfg.train.eval_batches * cfg.train.global_batch
    if cfg.train.eval_every and wanted > samples:
        # the order would wrap into a second, reshuffled pass: some samples would count twice
        raise ConfigError(f"train.eval_batches={cfg.train.eval_batches} x train.global_batch="
                          f"{cfg.train.global_batch} = {wanted} samples per evaluation, but {where} has only "
                          f"{samples}; lower train.eval_batches or hold out more data")
    return source


def check_heldout(cfg: Config) -> None:
    """Preflight: the held-out data of a run on a prepared dataset (the embedded corpus, prepared later,
    is checked when the trainer starts)."""
    if cfg.data.val_path or (cfg.data.val_shards and cfg.data.path):
        heldout_source(cfg, cfg.data.path)


class Evaluator:
    """Mean held-out loss of the engine's model; every rank calls `evaluate` together."""

    def __init__(self, engine, loader, micro_batches: int, device: torch.device, every: int, total_steps: int,
                 dp_group=None):
        self.engine, self.loader, self.micro_batches, self.device = engine, loader, micro_batches, device
        self.every, self.total_steps = every, total_steps
        self.dp_group = dp_group  # None = the default group

    def due(self, step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == self.total_steps)

    def maybe_evaluate(self, step: int) -> dict[str, float]:
        return self.evaluate() if self.due(step) else {}

    def evaluate(self) -> dict[str, float]:
        """{"val_loss": mean cross-entropy per held-out token, "val_ppl": exp(val_loss)}."""
        engine, module = self.engine, self.engine.module
        was_training = module.training  # (the engine's own `training` flag does not follow engine.eval())
        # every evaluation starts the held-out order at its first sample: the same samples each time
        self.loader.load_state_dict({**self.loader.state_dict(), "next_sample": 0})
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of token losses, tokens)
        if hasattr(engine, "eval_batch"):  # DeepSpeed's PipelineEngine: only its schedule runs the stages
            return self._evaluate_pipeline()
        engine.eval()
        batches = iter(self.loader)
        try:
            with torch.no_grad():
                for _ in range(self.micro_batches):
                    batch = next(batches).to(self.device, non_blocking=True)
                    targets = batch[:, 1:]
                    # through the engine, not the bare module: under ZeRO-3 its hooks gather the parameters
                    loss = engine(batch[:, :-1], targets=targets).loss
                    tokens = (targets != IGNORE_INDEX).sum()
                    totals[0] += loss.double() * tokens
                    totals[1] += tokens
        finally:
            batches.close()
            engine.train(was_training)
        # over the data-parallel group: the tensor-parallel ranks of a replica hold the same (vocab-parallel)
        # loss of the same samples
        dist.all_reduce(totals, group=self.dp_group)
        val_loss = (totals[0] / totals[1]).item()
        # (exp overflows past ~709; a NaN loss stays NaN)
        return {"val_loss": val_loss, "val_ppl": float("inf") if val_loss > 700 else math.exp(val_loss)}


    def _evaluate_pipeline(self) -> dict[str, float]:
        """The mean of the micro-batches' mean losses, averaged over data-parallel ranks and broadcast from
        the last stage by DeepSpeed: the token-weighted mean whenever every micro-batch has the same number of
        target tokens (no ignore index in the held-out samples, as in prepared shards)."""
        batches = iter(self.loader)
        try:
            pairs = ((b[:, :-1].to(self.device), b[:, 1:].to(self.device)) for b in batches)
            loss = self.engine.eval_batch(pairs, num_micro_batches=self.micro_batches)
        finally:
            batches.close()
        val_loss = float(loss)
        return {"val_loss": val_loss, "val_ppl": float("inf") if val_loss > 700 else math.exp(val_loss)}


def build_evaluator(cfg: Config, env, engine, data_path: str | Path) -> Evaluator | None:
    """The run's Evaluator, or None when train.eval_every is 0."""
    from complexity_dist.data import TokenLoader

    if cfg.train.eval_every == 0:
        return None
    path, part = heldout_source(cfg, data_path)
    layout = env.layout
    # num_workers=0: an evaluation is short, and worker processes would start again at every one
    loader = TokenLoader(path, cfg.data.seq_len, layout.micro_batch, dp_rank=env.dp_rank, dp_size=layout.dp,
                         seed=cfg.train.seed, vocab_size=cfg.model.vocab_size, shards=part)
    return Evaluator(engine, loader, cfg.train.eval_batches * layout.grad_accum, env.device,
                     cfg.train.eval_every, cfg.train.steps, dp_group=env.dp_group)
