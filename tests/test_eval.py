"""Validation loss (train/evaluation.py) and peak memory (train/metrics.py), in one process.

The end-to-end checks (1 vs 2 processes, ZeRO-1/3, metrics.jsonl rows) are in test_train_coverage.py."""
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from complexity_dist.config import ConfigError, load_config
from complexity_dist.data import ShardIndex, TokenLoader
from complexity_dist.data.errors import DataError
from complexity_dist.train.evaluation import Evaluator, heldout_source, training_shards
from complexity_dist.train.metrics import format_step, peak_memory_gib

SEQ = 32


@pytest.fixture(scope="module")
def unique_dataset(tmp_path_factory):
    """6 shards of 16 samples made from random made-up words, so no two samples are equal (checked) and a
    sample tells which shard it came from."""
    from complexity_dist.data.prepare import prepare_data

    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    src = tmp_path_factory.mktemp("text")
    for i in range(6):
        (src / f"doc{i}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(500)) + "\n")
    out = tmp_path_factory.mktemp("data") / "shards"
    prepare_data(sorted(src.glob("*.txt")), out, seq_len=SEQ, tokenizer=None, vocab_size=384,
                 samples_per_shard=16, num_proc=1, progress=False)
    index = ShardIndex.load(out)
    rows = [bytes(r) for i in range(len(index.shards)) for r in index.read_shard(i)]
    assert len(index.shards) >= 4 and len(set(rows)) == len(rows)
    return out


def config(data, *extra):
    return load_config(None, ["model.vocab_size=512", f"data.seq_len={SEQ}", f"data.path={data}",
                              "train.global_batch=4", *extra])


def shard_rows(path, numbers) -> set[bytes]:
    index = ShardIndex.load(path)
    return {bytes(r.astype(np.int64)) for i in numbers for r in index.read_shard(i)}


def rows_of(batch: torch.Tensor) -> list[bytes]:
    return [bytes(r.numpy().astype(np.int64)) for r in batch]


def test_config_refuses_what_cannot_evaluate(unique_dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"train.eval_every=5 needs held-out data.*data.val_shards"):
        config(unique_dataset, "train.eval_every=5")
    with pytest.raises(ConfigError, match="both name held-out data"):
        config(unique_dataset, "data.val_shards=1", f"data.val_path={tmp_path}")
    for bad in ("data.val_shards=-1", "train.eval_every=-1", "train.eval_batches=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            config(unique_dataset, bad)
    n = len(ShardIndex.load(unique_dataset).shards)
    with pytest.raises(ConfigError, match=rf"data.val_shards={n} holds out all {n} shards.*at most {n - 1}"):
        training_shards(config(unique_dataset, f"data.val_shards={n}"), unique_dataset)
    # more samples per evaluation than held out: refused rather than counting samples twice
    with pytest.raises(ConfigError, match=r"train.eval_batches=5 x train.global_batch=4 = 20 samples.*has only 1[0-9];"):
        heldout_source(config(unique_dataset, "data.val_shards=1", "train.eval_every=1", "train.eval_batches=5"),
                       unique_dataset)
    with pytest.raises(ConfigError, match="is the training data itself"):
        heldout_source(config(unique_dataset, f"data.val_path={unique_dataset}", "train.eval_every=1"),
                       unique_dataset)


def test_preflight_checks_the_heldout_data_before_any_process_group(unique_dataset, tmp_path):
    from complexity_dist.train.trainer import preflight

    n = len(ShardIndex.load(unique_dataset).shards)
    with pytest.raises(ConfigError, match=f"data.val_shards={n} holds out all"):
        preflight(config(unique_dataset, f"data.val_shards={n}", f"train.run_dir={tmp_path / 'r'}"), 1)
    with pytest.raises(DataError, match="prepare-data"):
        preflight(config(unique_dataset, f"data.val_path={tmp_path / 'nowhere'}", "train.eval_every=2",
                         f"train.run_dir={tmp_path / 'r'}"), 1)


def test_heldout_shards_never_appear_in_training_batches(unique_dataset):
    """Two data-parallel ranks read 3 epochs of the training part: every sample is from the training
    shards, all of those are seen, and the evaluation loader reads only the held-out shards."""
    cfg = config(unique_dataset, "data.val_shards=2", "train.eval_every=1", "train.eval_batches=2")
    n = len(ShardIndex.load(unique_dataset).shards)
    train_part = training_shards(cfg, unique_dataset)
    assert train_part == slice(0, n - 2)
    train_rows, heldout_rows = shard_rows(unique_dataset, range(n - 2)), shard_rows(unique_dataset, [n - 2, n - 1])
    seen = []
    for rank in range(2):
        loader = TokenLoader(unique_dataset, SEQ, 2, dp_rank=rank, dp_size=2, seed=1, shards=train_part)
        batches = iter(loader)
        for _ in range(3 * len(train_rows) // 4):
            seen += rows_of(next(batches))
    assert set(seen) == train_rows and not set(seen) & heldout_rows
    path, part = heldout_source(cfg, unique_dataset)
    val = TokenLoader(path, SEQ, 2, dp_rank=0, dp_size=1, seed=1, shards=part)
    val_seen = set(r for _, b in zip(range(16), val) for r in rows_of(b))
    assert val_seen == heldout_rows
    # a loader state saved with another split is refused: the part has its own fingerprint
    full = TokenLoader(unique_dataset, SEQ, 2, dp_rank=0, dp_size=1, seed=1)
    with pytest.raises(DataError, match="dataset"):
        full.load_state_dict(TokenLoader(unique_dataset, SEQ, 2, dp_rank=0, dp_size=1, seed=1,
                                         shards=train_part).state_dict())


def test_evaluation_samples_are_one_global_set_whatever_the_dp_size(unique_dataset):
    """What each rank's Evaluator reads (eval_batches x grad_accum micro-batches from position 0): the
    union over ranks is the same multiset of samples for dp 1, 2 and 4 and micro-batch 1 or 2."""
    cfg = config(unique_dataset, "data.val_shards=2", "train.eval_every=1", "train.eval_batches=3",
                 "train.global_batch=4")
    path, part = heldout_source(cfg, unique_dataset)

    def samples(dp, micro):
        out = []
        for rank in range(dp):
            loader = TokenLoader(path, SEQ, micro, dp_rank=rank, dp_size=dp, seed=cfg.train.seed, shards=part)
            grad_accum = cfg.train.global_batch // (dp * micro)
            out += [r for _, b in zip(range(cfg.train.eval_batches * grad_accum), loader) for r in rows_of(b)]
        return sorted(out)

    one = samples(1, 4)
    assert len(one) == 12 and len(set(one)) == 12
    assert samples(2, 2) == one and samples(2, 1) == one and samples(4, 1) == one


class _Engine:
    """What the Evaluator uses of a DeepSpeed engine: call, module, eval(), train(mode)."""

    def __init__(self, module):
        self.module = module
        self.calls_with_grad = 0

    def __call__(self, *args, **kwargs):
        self.calls_with_grad += torch.is_grad_enabled()
        return self.module(*args, **kwargs)

    def eval(self):
        self.module.train(False)

    def train(self, mode=True):
        self.module.train(mode)


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_evaluator_is_the_token_mean_over_fixed_samples_in_eval_mode(unique_dataset, one_process_group):
    from complexity_dist.model import ComplexityForCausalLM

    cfg = config(unique_dataset, "data.val_shards=2", "train.eval_every=1", "train.eval_batches=2",
                 "model.hidden_size=32", "model.intermediate_size=48", "model.num_hidden_layers=2",
                 "model.num_attention_heads=4", "model.num_key_value_heads=2")
    torch.manual_seed(0)
    model = ComplexityForCausalLM(cfg.model)
    model.model.activation_checkpointing = "full"  # only in train mode: eval must switch it off
    model.train()
    path, part = heldout_source(cfg, unique_dataset)
    loader = TokenLoader(path, SEQ, 2, dp_rank=0, dp_size=1, seed=cfg.train.seed, shards=part)
    engine = _Engine(model)
    evaluator = Evaluator(engine, loader, micro_batches=4, device=torch.device("cpu"), every=3, total_steps=10)
    got = evaluator.evaluate()
    assert model.training and engine.calls_with_grad == 0
    assert all(p.grad is None for p in model.parameters())
    # by hand: the first 8 samples of the held-out order, cross-entropy averaged over all their tokens
    fresh = TokenLoader(path, SEQ, 8, dp_rank=0, dp_size=1, seed=cfg.train.seed, shards=part)
    batch = next(iter(fresh))
    model.eval()
    with torch.no_grad():
        logits = model(batch[:, :-1]).logits
    want = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()
    assert got["val_loss"] == pytest.approx(want, rel=1e-6)
    assert got["val_ppl"] == pytest.approx(math.exp(want), rel=1e-6)
    # the same samples again at the next evaluation (not the next ones), whatever was trained in between
    model.train()
    assert evaluator.evaluate() == got
    assert [evaluator.due(s) for s in (1, 3, 6, 7, 10)] == [False, True, True, False, True]  # and the last


def test_peak_memory_is_the_peak_rss_on_cpu():
    def rss_gib() -> float:  # the current resident set, from the kernel
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

    before = peak_memory_gib("cpu")
    # ru_maxrss is a lifetime peak (a child even inherits its parent's across fork/exec): allocate past it
    extra = max(0.0, before - rss_gib()) + 0.2
    block = np.ones(int(extra * 2**30) // 8)  # touched
    during = peak_memory_gib(torch.device("cpu"))
    del block
    after = peak_memory_gib()
    assert during - before > 0.15 and after == pytest.approx(during, abs=0.01)  # a peak does not fall


def test_progress_line_shows_validation_loss():
    row = {"step": 6, "loss": 4.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0, "mfu": None}
    assert "val" not in format_step(row, 10)
    line = format_step({**row, "val_loss": 4.25, "val_ppl": math.exp(4.25)}, 10, mem_gib=1.5)
    assert "| val_loss 4.2500 | val_ppl 70.11 |" in line and "mem 1.5 GiB" in line
