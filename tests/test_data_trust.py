"""The data package treats its inputs as untrusted: index.json cannot point outside its folder, prepare-data
streams however its input is shaped, shards cannot feed ids past the embedding, and interrupted runs are
cleaned up."""
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from complexity_dist.cli import main as cli_main
from complexity_dist.data import DataError, ShardIndex, TokenLoader, prepare_data
from complexity_dist.data import documents as documents_module
from complexity_dist.data.shards import ShardWriter
from complexity_dist.data.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma river stone cloud Ünïcödé 東京 x, y!".split()


def words(n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A prepared dataset of a few shards (vocab 300, seq_len 16)."""
    root = tmp_path_factory.mktemp("small")
    (root / "a.txt").write_text(words(3000))
    prepare_data([root / "a.txt"], root / "out", seq_len=16, vocab_size=300, samples_per_shard=64, num_proc=1)
    return root / "out"


def edit_index(folder: Path, change) -> None:
    meta = json.loads((folder / "index.json").read_text())
    change(meta)
    (folder / "index.json").write_text(json.dumps(meta))


# --- 3a: names in index.json stay inside the folder -------------------------------------------------------

@pytest.mark.parametrize("case", ["parent", "absolute", "subfolder", "link_out", "dotdot", "tokenizer"])
def test_index_names_cannot_leave_the_folder(small, tmp_path, case):
    data = tmp_path / "d" / "data"
    shutil.copytree(small, data)
    outside = tmp_path / "d" / "outside.tar"  # a valid copy of shard 0, so only the name is wrong
    shutil.copy(data / "shard-000000.tar", outside)
    name = {"parent": "../outside.tar", "absolute": str(outside), "subfolder": "sub/shard-000000.tar",
            "link_out": "link.tar", "dotdot": "..", "tokenizer": "../outside.tar"}[case]
    if case == "subfolder":
        (data / "sub").mkdir()
        shutil.copy(data / "shard-000000.tar", data / "sub" / "shard-000000.tar")
    if case == "link_out":
        (data / "link.tar").symlink_to(outside)
    key = "tokenizer" if case == "tokenizer" else "shards"

    def change(meta):
        if key == "tokenizer":
            meta["tokenizer"] = name
        else:
            meta["shards"][0]["name"] = name

    edit_index(data, change)
    kind = "tokenizer" if case == "tokenizer" else "shard"
    with pytest.raises(DataError, match=rf"index.json: the {kind} entry {re.escape(repr(name))} is not a file name"):
        ShardIndex.load(data)


def test_a_link_inside_the_folder_is_accepted(small, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small, data)
    (data / "shard-000000.tar").rename(data / "real.tar")
    (data / "shard-000000.tar").symlink_to("real.tar")
    index = ShardIndex.load(data)
    index.verify()
    assert index.read_shard(0).shape[1] == 17


# --- 8: prepare-data streams its input --------------------------------------------------------------------

def test_one_line_text_is_cut_before_whitespace_into_the_same_tokens(tmp_path, monkeypatch):
    text = words(20000, seed=1) + "  tail"  # one line, ~130 kB
    (tmp_path / "one.txt").write_text(text)
    monkeypatch.setattr(documents_module, "PIECE_BYTES", 4096)
    monkeypatch.setattr(documents_module, "TRAIN_PIECE_CHARS", 1000)
    pieces = list(documents_module.read_pieces(tmp_path / "one.txt"))
    assert len(pieces) > 20 and max(len(p.encode()) for p, _ in pieces) <= 2 * 4096
    assert "".join(p for p, _ in pieces) == text and [e for _, e in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(p[0] == " " for p, _ in pieces[1:])  # cut before a space, never inside a word or character
    index = prepare_data([tmp_path / "one.txt"], tmp_path / "out", seq_len=8, vocab_size=300, num_proc=1)
    whole = train_bpe([text], 300)  # the tokenizer of the uncut text
    assert (tmp_path / "out" / "tokenizer.json").read_text() == whole.to_str(pretty=True)
    expected = whole.encode(text, add_special_tokens=False).ids + [0]
    stream = np.concatenate([index.read_shard(i) for i in range(len(index.shards))]).reshape(-1).tolist()
    assert stream == expected[:len(stream)] and len(expected) - len(stream) < 9


def test_huge_jsonl_document_reaches_the_tokenizer_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(documents_module, "PIECE_BYTES", 1000)
    doc = words(3000, seed=2)
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": doc}) + "\n" + json.dumps({"text": "short"}) + "\n")
    pieces = list(documents_module.read_pieces(tmp_path / "d.jsonl"))
    assert max(len(p) for p, _ in pieces) <= 1000 and "".join(p for p, _ in pieces[:-1]) == doc
    assert [e for _, e in pieces] == [False] * (len(pieces) - 2) + [True, True]


def _peak_rss_mib(cmd: list[str], log: Path) -> int:
    """Run `cmd` under a 3 GiB address-space limit; the peak RSS of that process alone (wait4)."""
    limit = 3 << 30

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    # few malloc arenas and tokenizer threads, so the address space does not scale with the core count
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "RAYON_NUM_THREADS": "2", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, preexec_fn=limited)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return usage.ru_maxrss // 1024


def test_prepare_memory_is_flat_in_the_size_of_a_one_line_file(tmp_path):
    # a tokenizer made once, so the big file is only tokenized (no BPE training on it)
    vocab = ["alphabetagammadelta", "epsilonzetaetatheta", "iotakappalambdamu"]
    unit = " ".join(vocab) + " "
    train_bpe([unit * 2000], 300).save(str(tmp_path / "tok.json"))
    peaks = {}
    for mib in (4, 32):
        src = tmp_path / f"one{mib}.txt"
        src.write_text(unit * (mib * (1 << 20) // len(unit)))  # one line, no newline at all
        out = tmp_path / f"out{mib}"
        peaks[mib] = _peak_rss_mib([sys.executable, "-m", "complexity_dist", "prepare-data", str(src), "--out",
                                    str(out), "--seq-len", "2047", "--tokenizer", str(tmp_path / "tok.json"),
                                    "--workers", "1", "--quiet"], tmp_path / f"log{mib}")
        meta = json.loads((out / "index.json").read_text())
        assert meta["documents"] == 1 and meta["total_tokens"] > mib * (1 << 20) // 20
    # before streaming, the 32 MiB line was encoded whole: gigabytes; now pieces of 1 MiB at most
    assert peaks[32] - peaks[4] < 48, peaks


# --- 9: token ids past the vocabulary ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_ids(small, tmp_path_factory):
    """A copy of `small` whose only shard holds id 700 (index.json still says vocab 300)."""
    data = tmp_path_factory.mktemp("bad") / "data"
    shutil.copytree(small, data)
    index = ShardIndex.load(data)
    samples = np.concatenate([index.read_shard(i) for i in range(len(index.shards))]).copy()
    samples[3, 5] = 700
    for shard in data.glob("shard-*.tar"):
        shard.unlink()
    writer = ShardWriter(data, index.sample_len, np.dtype(index.dtype), samples_per_shard=len(samples))
    for row in samples:
        writer.add(row)
    shards = writer.finish()
    edit_index(data, lambda meta: meta.update(shards=shards))
    return data


def test_loader_refuses_an_id_past_the_vocab(bad_ids):
    loader = TokenLoader(bad_ids, 16, micro_batch=4, dp_rank=0, dp_size=1, seed=0, vocab_size=512)
    with pytest.raises(DataError, match=r"shard-000000.tar holds token id 700, but the vocab size is 512"):
        next(iter(loader))
    loader = TokenLoader(bad_ids, 16, micro_batch=4, dp_rank=0, dp_size=1, seed=0, num_workers=1)
    with pytest.raises(DataError, match=r"holds token id 700, but the vocab size is 300"):  # the dataset's
        next(iter(loader))


def test_train_exits_2_with_one_line_on_an_id_past_the_vocab(bad_ids, tmp_path):
    from test_train import run, train_cmd

    proc = run(train_cmd(tmp_path / "run", bad_ids, "data.seq_len=16", "train.steps=3", "data.num_workers=1",
                         "checkpoint.enabled=false"), check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("complexity-dist")]
    assert len(errors) == 1 and errors[0].startswith("complexity-dist: data error: shard "), proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert "token id 700" in errors[0] and "vocab size is 512" in errors[0]
    assert "Traceback" not in proc.stderr


# --- 10 (part): an --out that cannot be made -------------------------------------------------------------

def test_out_under_a_file_is_one_line_and_exit_2(small, tmp_path, capsys):
    (tmp_path / "a.txt").write_text(words(200))
    (tmp_path / "file").write_text("not a folder")
    code = cli_main(["prepare-data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "file" / "sub" / "out"),
                     "--seq-len", "4", "--vocab-size", "300", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert re.fullmatch(r"complexity-dist prepare-data: output folder .*/file/sub/out cannot be created: "
                        r".*/file is a file, not a folder; choose another --out", err[0]), err


# --- 11b: interrupted runs leave no .partial folders behind -----------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from complexity_dist.data.files import staging_dir
with staging_dir(Path(sys.argv[1])) as tmp:
    print(tmp, flush=True)
    time.sleep(120)
"""


def test_stale_partials_are_removed_but_not_a_live_one(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.txt").write_text(words(60000, seed=i))  # ~0.5 MB each: a run of a few seconds
    out = tmp_path / "out"
    # 1. a run killed mid-way (SIGKILL: no cleanup of its own)
    killed = subprocess.Popen([sys.executable, "-m", "complexity_dist", "prepare-data", str(src), "--out", str(out),
                               "--seq-len", "16", "--vocab-size", "400", "--workers", "1", "--quiet"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.partial-*")) and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert list(tmp_path.glob(f".out.partial-{killed.pid}")) and not out.exists()
    # 2. one left by an older version (no lock at all), and one of another output
    (tmp_path / ".out.partial-99999999").mkdir()
    (tmp_path / ".out.partial-99999999" / "shard-000000.tar").write_bytes(b"junk")
    (tmp_path / ".other.partial-1").mkdir()
    # 3. a run of the same output that is alive right now
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        live = Path(holder.stdout.readline().strip())
        assert live.is_dir()
        index = prepare_data([src], out, seq_len=16, vocab_size=400, num_proc=1)
        left = sorted(p.name for p in tmp_path.glob(".*partial*"))
        assert left == sorted([live.name, ".other.partial-1"]), left
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    reference = prepare_data([src], tmp_path / "reference", seq_len=16, vocab_size=400, num_proc=1)
    assert index.fingerprint == reference.fingerprint
    for f in (tmp_path / "reference").iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
