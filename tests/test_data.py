"""complexity_dist.data: prepare-data (tokenizer, shards, index) and the resumable TokenLoader."""
import argparse
import collections
import hashlib
import json
import multiprocessing
import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from complexity_dist.data import DataError, ShardIndex, TokenLoader, add_prepare_data_parser, prepare_data
from complexity_dist.data import documents as documents_module
from complexity_dist.data import loader as loader_module
from complexity_dist.data.embedded import embedded_corpus_dir

SEQ = 16
WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma river stone cloud bright quiet "
         "model token shard loader batch rank worker seed epoch resume").split()


def make_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + rng.choice([".", "!", "?\n"])
            for _ in range(n)]


def write_inputs(folder: Path) -> tuple[list[Path], list[str]]:
    """Two .txt files (one document each) and a .jsonl of 100 documents; returns (files, documents in order)."""
    folder.mkdir(parents=True, exist_ok=True)
    txt = make_texts(2, seed=1)
    jsonl = make_texts(100, seed=2)
    files = [folder / "a.txt", folder / "b.txt", folder / "c.jsonl"]
    files[0].write_text(txt[0])
    files[1].write_text(txt[1])
    files[2].write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(jsonl)))
    return files, txt + jsonl


def all_samples(index: ShardIndex) -> np.ndarray:
    return np.concatenate([index.read_shard(i) for i in range(len(index.shards))])


def take(loader, n: int) -> list[torch.Tensor]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def rows(batches) -> list[tuple]:
    return [tuple(row.tolist()) for batch in batches for row in batch]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A prepared dataset: ~450 samples of 17 tokens in shards of 32 samples (~15 shards)."""
    root = tmp_path_factory.mktemp("data")
    files, docs = write_inputs(root / "inputs")
    prepare_data(files, root / "out", seq_len=SEQ, vocab_size=300, samples_per_shard=32, num_proc=1)
    return root / "out", files, docs


def copy_of(dataset_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(dataset_dir, target)
    return target


# --- prepare-data -----------------------------------------------------------------------------------------

def test_prepare_is_byte_identical_across_runs_and_process_counts(dataset, tmp_path, root):
    out, files, _ = dataset
    again = tmp_path / "again"  # another process (the tools/ entry point), 2 tokenizer processes instead of 1
    subprocess.run([sys.executable, str(root / "tools" / "prepare_data.py"), *map(str, files), "--out", str(again),
                    "--seq-len", str(SEQ), "--vocab-size", "300", "--samples-per-shard", "32", "--workers", "2",
                    "--quiet"], check=True, capture_output=True)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert "index.json" in names and "tokenizer.json" in names and "shard-000000.tar" in names
    for name in names:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    assert not list(tmp_path.glob(".*partial*"))  # the staging folder was renamed away


def test_index_describes_the_shards(dataset):
    out, _, docs = dataset
    meta = json.loads((out / "index.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert meta["seq_len"] == SEQ and meta["sample_len"] == SEQ + 1
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.get_vocab_size() <= 300
    assert meta["tokenizer"] == "tokenizer.json"
    assert meta["tokenizer_sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    assert meta["documents"] == len(docs) and meta["eos_token_id"] == 0
    assert len(meta["shards"]) > 5 and all(s["samples"] == 32 for s in meta["shards"][:-1])
    assert meta["num_samples"] == sum(s["samples"] for s in meta["shards"])
    assert meta["total_tokens"] == meta["num_samples"] * (SEQ + 1)
    for i, shard in enumerate(meta["shards"]):
        path = out / shard["name"]
        assert shard["name"] == f"shard-{i:06d}.tar"
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert shard["bytes"] == path.stat().st_size
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        assert len(members) == shard["samples"]
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o444 for m in members)
        assert all(m.name.endswith(".u16") and m.size == 2 * (SEQ + 1) for m in members)
    index = ShardIndex.load(out)
    assert index.num_samples == meta["num_samples"] and index.vocab_size == meta["vocab_size"]
    assert ShardIndex.load(out / "index.json") == index


def test_trained_tokenizer_has_the_model_special_ids(dataset):
    tok = Tokenizer.from_file(str(dataset[0] / "tokenizer.json"))
    assert (tok.token_to_id("</s>"), tok.token_to_id("<pad>"), tok.token_to_id("<s>")) == (0, 1, 2)
    meta = json.loads((dataset[0] / "index.json").read_text())
    assert meta["special_token_ids"] == {"eos_token_id": 0, "pad_token_id": 1, "bos_token_id": 2}
    text = "alpha beta, quiet river: Ünïcödé bytes too!"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: any text round-trips


def test_shards_hold_txt_and_jsonl_documents_in_order_each_followed_by_eos(dataset):
    out, _, docs = dataset
    index = ShardIndex.load(out)
    tok = Tokenizer.from_file(str(index.tokenizer_path))
    expected = [t for doc in docs for t in tok.encode(doc, add_special_tokens=False).ids + [0]]
    stream = all_samples(index).reshape(-1)
    whole = len(expected) // (SEQ + 1) * (SEQ + 1)
    assert stream.tolist() == expected[:whole]
    assert json.loads((out / "index.json").read_text())["dropped_tokens"] == len(expected) - whole
    # the first document came from a.txt, the third from the first line of c.jsonl
    first_eos = stream.tolist().index(0)
    assert tok.decode(stream[:first_eos].tolist()) == docs[0]


def test_given_tokenizer_is_used_and_copied_verbatim(dataset, tmp_path):
    out, files, _ = dataset
    prepare_data(files[2:], tmp_path / "given", seq_len=SEQ, tokenizer=out / "tokenizer.json", num_proc=1)
    assert (tmp_path / "given" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    index = ShardIndex.load(tmp_path / "given")
    assert index.tokenizer_sha256 == ShardIndex.load(out).tokenizer_sha256
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    first = make_texts(100, seed=2)[0]
    head = tok.encode(first, add_special_tokens=False).ids + [0]
    assert all_samples(index).reshape(-1)[:len(head)].tolist() == head


def test_large_txt_is_one_document_read_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(documents_module, "PIECE_BYTES", 200)
    text = "\n".join(make_texts(30, seed=3)) + "\nÜnïcödé in the middle\n" + "\n".join(make_texts(30, seed=4))
    (tmp_path / "big.txt").write_text(text)
    pieces = list(documents_module.read_pieces(tmp_path / "big.txt"))
    assert len(pieces) > 5 and "".join(p for p, _ in pieces) == text
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    index = prepare_data([tmp_path / "big.txt"], tmp_path / "out", seq_len=8, vocab_size=300, num_proc=1)
    assert json.loads((tmp_path / "out" / "index.json").read_text())["documents"] == 1
    stream = all_samples(index).reshape(-1).tolist()
    assert 0 not in stream[:-1]  # one document: no EOS inside it
    decoded = Tokenizer.from_file(str(index.tokenizer_path)).decode([t for t in stream if t != 0])
    assert len(decoded) > 0.9 * len(text) and text.startswith(decoded)  # only the dropped tail is missing


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"txt": "no"}\n', r"c.jsonl:2 has no string field \"text\""),
    ('{"text": "ok"}\nnot json\n', r"c.jsonl:2 is not valid JSON"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        prepare_data([tmp_path / "c.jsonl"], tmp_path / "out", seq_len=4, vocab_size=300, num_proc=1)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))


def test_bad_arguments_are_refused(dataset, tmp_path):
    out, files, _ = dataset
    with pytest.raises(DataError, match=r"missing.txt does not exist"):
        prepare_data([tmp_path / "missing.txt"], tmp_path / "o", seq_len=4, num_proc=1)
    (tmp_path / "doc.md").write_text("x")
    with pytest.raises(DataError, match=r"doc.md is neither .txt"):
        prepare_data([tmp_path / "doc.md"], tmp_path / "o", seq_len=4, num_proc=1)
    with pytest.raises(DataError, match=r"already exists and is not empty"):
        prepare_data(files, out, seq_len=SEQ, num_proc=1)
    with pytest.raises(DataError, match=r"vocab size 100 is too small"):
        prepare_data(files, tmp_path / "o", seq_len=SEQ, vocab_size=100, num_proc=1)
    with pytest.raises(DataError, match=r"fewer than seq_len \+ 1 = 100001 tokens"):
        prepare_data(files[:1], tmp_path / "o", seq_len=100_000, vocab_size=300, num_proc=1)


def test_cli_subcommand(dataset, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_prepare_data_parser(parser.add_subparsers(dest="command"))
    _, files, _ = dataset
    args = parser.parse_args(["prepare-data", *map(str, files), "--out", str(tmp_path / "cli"), "--seq-len", "8",
                              "--vocab-size", "280", "--samples-per-shard", "30", "--workers", "1", "--quiet"])
    assert args.func(args) == 0
    index = ShardIndex.load(tmp_path / "cli")
    assert index.seq_len == 8 and index.vocab_size <= 280 and index.shards[0].samples == 30
    assert "samples of 9 tokens" in capsys.readouterr().out
    args = parser.parse_args(["prepare-data", str(files[0]), "--out", str(tmp_path / "cli"), "--seq-len", "8"])
    assert args.func(args) == 2
    assert "already exists" in capsys.readouterr().err


# --- reading ----------------------------------------------------------------------------------------------

def test_loader_yields_samples_of_the_dataset(dataset):
    index = ShardIndex.load(dataset[0])
    known = collections.Counter(tuple(r) for r in all_samples(index).tolist())
    batches = take(TokenLoader(dataset[0], SEQ, micro_batch=3, dp_rank=0, dp_size=1, seed=0), 5)
    for batch in batches:
        assert batch.shape == (3, SEQ + 1) and batch.dtype == torch.int64
    assert all(row in known for row in rows(batches))


@pytest.mark.parametrize("dp_size, micro_batch, num_workers", [(3, 2, 0), (2, 3, 2)])
def test_ranks_are_disjoint_and_cover_each_epoch(dataset, dp_size, micro_batch, num_workers):
    index = ShardIndex.load(dataset[0])
    n = index.num_samples
    rounds = 2 * n // (micro_batch * dp_size) + 1
    per_rank = [take(TokenLoader(dataset[0], SEQ, micro_batch, r, dp_size, seed=5, num_workers=num_workers), rounds)
                for r in range(dp_size)]
    # global order: round k is rank 0's k-th batch, then rank 1's, ...
    stream = rows(per_rank[r][k] for k in range(rounds) for r in range(dp_size))
    every_sample = collections.Counter(tuple(r) for r in all_samples(index).tolist())
    assert collections.Counter(stream[:n]) == every_sample  # epoch 0: each sample once, over all ranks
    assert collections.Counter(stream[n:2 * n]) == every_sample  # epoch 1 too
    assert stream[:n] != stream[n:2 * n]  # reshuffled
    in_epoch = n // (micro_batch * dp_size)  # whole rounds inside epoch 0
    ours = [set(rows(per_rank[r][:in_epoch])) for r in range(dp_size)]
    assert all(not (ours[a] & ours[b]) for a in range(dp_size) for b in range(a + 1, dp_size))


def test_global_batch_does_not_depend_on_dp_size(dataset):
    one = take(TokenLoader(dataset[0], SEQ, micro_batch=4, dp_rank=0, dp_size=1, seed=3), 12)
    two = [take(TokenLoader(dataset[0], SEQ, micro_batch=2, dp_rank=r, dp_size=2, seed=3, num_workers=w), 12)
           for r, w in ((0, 0), (1, 2))]
    for k in range(12):
        assert torch.equal(one[k], torch.cat([two[0][k], two[1][k]]))
    other_seed = take(TokenLoader(dataset[0], SEQ, micro_batch=4, dp_rank=0, dp_size=1, seed=4), 12)
    assert any(not torch.equal(a, b) for a, b in zip(one, other_seed))


def test_fewer_shards_than_ranks_times_workers(dataset, tmp_path):
    files = dataset[1]
    index = prepare_data(files, tmp_path / "one", seq_len=SEQ, tokenizer=dataset[0] / "tokenizer.json",
                         samples_per_shard=10_000, num_proc=1)
    assert len(index.shards) == 1
    ranks = [take(TokenLoader(tmp_path / "one", SEQ, 2, r, 4, seed=0, num_workers=2), 3) for r in range(4)]
    stream = rows(ranks[r][k] for k in range(3) for r in range(4))
    assert len(set(stream)) == len(stream) == 24  # 24 different samples, none repeated across ranks


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly(dataset, num_workers):
    def loader(**kw):
        return TokenLoader(dataset[0], SEQ, micro_batch=3, dp_rank=1, dp_size=2, seed=9, num_workers=num_workers, **kw)

    total = int(2.5 * ShardIndex.load(dataset[0]).num_samples) // 6  # rounds of 6 samples: 2.5 epochs
    straight = take(loader(), total)
    interrupted = loader()
    it = iter(interrupted)
    first = [next(it) for _ in range(37)]  # workers have prefetched beyond this point
    state = json.loads(json.dumps(interrupted.state_dict()))  # JSON-able
    assert state["next_sample"] == 37 * 3 * 2 and state["epoch"] == 0
    del it
    resumed = loader()
    resumed.load_state_dict(state)
    rest = take(resumed, total - 37)
    for a, b in zip(straight, first + rest, strict=True):
        assert torch.equal(a, b)
    assert resumed.epoch == 2 and resumed.state_dict()["next_sample"] == total * 6
    again = loader()  # a new iter() on the same loader continues where the last one stopped
    assert torch.equal(take(again, 3)[2], straight[2]) and torch.equal(take(again, 1)[0], straight[3])


def test_resume_with_another_dp_size(dataset):
    single = TokenLoader(dataset[0], SEQ, micro_batch=4, dp_rank=0, dp_size=1, seed=2)
    straight = take(single, 10)
    partial = TokenLoader(dataset[0], SEQ, micro_batch=4, dp_rank=0, dp_size=1, seed=2)
    take(partial, 6)
    state = partial.state_dict()
    halves = []
    for r in range(2):
        rank = TokenLoader(dataset[0], SEQ, micro_batch=2, dp_rank=r, dp_size=2, seed=2)
        rank.load_state_dict(state)
        halves.append(take(rank, 4))
    for k in range(4):
        assert torch.equal(straight[6 + k], torch.cat([halves[0][k], halves[1][k]]))
    odd = TokenLoader(dataset[0], SEQ, micro_batch=5, dp_rank=0, dp_size=1, seed=2)
    with pytest.raises(DataError, match=r"global sample 24, not a multiple of micro_batch \* dp_size = 5"):
        odd.load_state_dict(state)
    with pytest.raises(DataError, match=r"seed 2 but this loader has 3"):
        TokenLoader(dataset[0], SEQ, 4, 0, 1, seed=3).load_state_dict(state)


# --- refusing bad data ------------------------------------------------------------------------------------

def test_missing_folder_or_index_says_to_prepare(tmp_path):
    with pytest.raises(DataError, match=r"nothing-here does not exist; run `complexity-dist prepare-data"):
        ShardIndex.load(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty has no index.json.*complexity-dist prepare-data"):
        TokenLoader(tmp_path / "empty", SEQ, 1, 0, 1, seed=0)


def test_mismatched_seq_len_or_vocab_is_refused(dataset):
    with pytest.raises(DataError, match=r"prepared with seq_len=16 but the run asks for seq_len=32"):
        TokenLoader(dataset[0], 32, 1, 0, 1, seed=0)
    vocab = ShardIndex.load(dataset[0]).vocab_size
    with pytest.raises(DataError, match=rf"has {vocab} tokens but model.vocab_size=100"):
        TokenLoader(dataset[0], SEQ, 1, 0, 1, seed=0, vocab_size=100)
    TokenLoader(dataset[0], SEQ, 1, 0, 1, seed=0, vocab_size=vocab)  # equal is fine


def flip_bytes(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + 4] = bytes(b ^ 0xFF for b in data[offset:offset + 4])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("where", ["tokens", "header"])
def test_corrupt_shard_is_named_when_read(dataset, tmp_path, monkeypatch, num_workers, where):
    monkeypatch.setattr(loader_module, "VERIFY_AT_START_BYTES", 0)  # as for a large dataset: checked lazily
    folder = copy_of(dataset[0], tmp_path)
    shard = folder / "shard-000003.tar"
    # member 5: its header at 5 * 1024, its 34 bytes of tokens 512 bytes later
    flip_bytes(shard, 5 * 1024 + (512 + 8 if where == "tokens" else 0))
    loader = TokenLoader(folder, SEQ, micro_batch=8, dp_rank=0, dp_size=1, seed=0, num_workers=num_workers)
    with pytest.raises(DataError, match=rf"shard {shard} (is corrupt|is not a readable tar)"):
        take(loader, 100)  # more than an epoch: every shard is read


def test_small_dataset_is_verified_when_the_loader_is_made(dataset, tmp_path):
    folder = copy_of(dataset[0], tmp_path)
    shard = folder / "shard-000000.tar"
    flip_bytes(shard, 700)  # tar padding: the archive still parses, only the hash tells
    with pytest.raises(DataError, match=rf"shard {shard} is corrupt: its sha256 .* differs"):
        TokenLoader(folder, SEQ, micro_batch=2, dp_rank=0, dp_size=1, seed=0)


def test_missing_or_truncated_shard_is_named(dataset, tmp_path):
    folder = copy_of(dataset[0], tmp_path)
    (folder / "shard-000002.tar").unlink()
    with pytest.raises(DataError, match=rf"shard {folder / 'shard-000002.tar'} listed in .* is missing"):
        TokenLoader(folder, SEQ, 1, 0, 1, seed=0)
    index = ShardIndex.load(dataset[0])
    shutil.copy(dataset[0] / "shard-000002.tar", folder)
    loaded = ShardIndex.load(folder)
    (folder / "shard-000002.tar").unlink()  # vanishes after start-up: found when the shard is opened
    with pytest.raises(DataError, match=r"shard-000002.tar listed in .* is missing"):
        loaded.read_shard(2)
    (folder / "shard-000002.tar").write_bytes((dataset[0] / "shard-000002.tar").read_bytes()[:5000])
    expected = index.shards[2].bytes
    with pytest.raises(DataError, match=rf"shard-000002.tar has 5000 bytes but index.json says {expected}"):
        ShardIndex.load(folder)


def test_wrong_sample_length_is_named(dataset, tmp_path):
    folder = copy_of(dataset[0], tmp_path)
    meta = json.loads((folder / "index.json").read_text())
    meta["seq_len"] = SEQ - 1  # shards still hold SEQ + 1 tokens a sample
    (folder / "index.json").write_text(json.dumps(meta))
    index = ShardIndex.load(folder)
    with pytest.raises(DataError, match=r"shard .*shard-000000.tar: sample 0 has 34 bytes .* expected 32"):
        index.read_shard(0)


# --- embedded corpus --------------------------------------------------------------------------------------

EMBEDDED_ARGS = dict(seq_len=64, vocab_size=512, num_proc=1)


def test_embedded_corpus_builds_once_under_concurrency_and_is_reused(tmp_path):
    with multiprocessing.get_context("spawn").Pool(2) as pool:  # two processes ask at the same time
        results = [pool.apply_async(embedded_corpus_dir, (tmp_path,), EMBEDDED_ARGS) for _ in range(2)]
        path_a, path_b = (r.get(timeout=120) for r in results)
    assert path_a == path_b
    folder = path_a
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [folder.name]
    index = ShardIndex.load(folder).check(seq_len=64, vocab_size=512)
    assert index.num_samples > 1000 and len(index.shards) >= 4  # ~2 MB of Python documentation
    tok = Tokenizer.from_file(str(index.tokenizer_path))
    assert (tok.token_to_id("</s>"), tok.token_to_id("<pad>"), tok.token_to_id("<s>")) == (0, 1, 2)
    assert "Return" in tok.decode(index.read_shard(0).reshape(-1).tolist())
    stamp = (folder / "index.json").stat().st_mtime_ns
    start = time.monotonic()
    again = embedded_corpus_dir(tmp_path, **EMBEDDED_ARGS)
    assert again == path_a and time.monotonic() - start < 0.5  # reused, not rebuilt
    assert (folder / "index.json").stat().st_mtime_ns == stamp
    batch = take(TokenLoader(folder, 64, micro_batch=2, dp_rank=0, dp_size=1, seed=0, vocab_size=512), 1)[0]
    assert batch.shape == (2, 65) and int(batch.max()) < 512
