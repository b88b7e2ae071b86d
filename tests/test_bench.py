"""`complexity-dist bench`: the command every throughput figure comes from, run end to end at tiny size on CPU."""
import json
import subprocess
import sys

from conftest import ROOT

SIZE = ["model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
        "data.seq_len=32", "train.micro_batch=2"]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "complexity_dist", "bench", str(ROOT / "configs/tiny.yaml"), *SIZE,
                           *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={"OMP_NUM_THREADS": "1", **__import__("os").environ})


def test_bench_reports_the_training_path_figures(tmp_path):
    out = tmp_path / "bench.json"
    proc = bench("--steps", "3", "--warmup", "1", "--json", str(out), "--profile", str(tmp_path / "prof"),
                 "parallel.zero_stage=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report["micro_batch"], report["grad_accum"], report["zero_stage"]) == (2, 2, 1)  # two micro-batches
    [ours] = report["results"]
    assert len(ours["step_times_s"]) == 3
    assert ours["tokens_per_step"] == 2 * 2 * 32
    assert abs(ours["tokens_per_s"] - ours["tokens_per_step"] / ours["step_time_median_s"]) < 1e-6 * ours["tokens_per_s"]
    assert ours["mfu"] is None  # no known peak on CPU: never a made-up number
    # FLOPs/token as docs/architecture.md: 6 N_active_nonembedding + 6 V H + 12 L H S
    from complexity_dist.config import load_config
    from complexity_dist.model.accounting import flops_per_token
    cfg = load_config(ROOT / "configs/tiny.yaml", SIZE)
    assert ours["flops_per_token"] == flops_per_token(cfg.model, 32)
    assert 0 < ours["last_loss"] < 10 and ours["peak_memory_gib"] > 0
    assert "complexity (ours)" in proc.stdout and "tokens/s" in proc.stdout
    # --profile: where the time of two more steps goes, by kind of kernel (on CPU: operators' self time)
    kinds = (tmp_path / "prof/kinds.txt").read_text().splitlines()
    shares = {line.split()[0]: float(line.split()[-1].rstrip("%")) for line in kinds[1:]}
    assert "gemm" in shares and abs(sum(shares.values()) - 100) < 1, kinds
    top = (tmp_path / "prof/top_kernels.txt").read_text()
    assert "aten::" in top and (tmp_path / "prof/trace.json.gz").stat().st_size > 0
    assert kinds[0] in proc.stdout


def test_bench_baseline_needs_a_gpu_and_says_so():
    proc = bench("--steps", "1", "--warmup", "0", "--baseline")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--baseline needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
