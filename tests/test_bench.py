"""`complexity-dist bench`: the command every throughput figure comes from, run end to end at tiny size on CPU."""
import gzip
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
    with gzip.open(tmp_path / "prof/trace.json.gz", "rt") as f:  # the ranges the idle time is charged to on a GPU
        phases = {e["name"] for e in json.load(f)["traceEvents"] if e.get("cat") == "user_annotation"
                  and e.get("name", "").startswith("step/")}
    assert phases == {"step/forward", "step/backward", "step/optimizer"}, phases
    idle = (tmp_path / "prof/idle.txt").read_text()
    assert idle.startswith("no device activity") and idle.strip() in proc.stdout  # CPU: no kernels to wait


def test_device_idle_is_charged_to_the_outermost_and_the_innermost_open_operator_and_the_phase():
    from complexity_dist.train.profiling import device_idle, gap_histogram, idle_report

    def x(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    events = [x("kernel", "gemm", 0, 10), x("kernel", "add", 20, 10), x("gpu_memcpy", "copy", 25, 10),
              x("kernel", "norm", 41, 9), x("kernel", "late", 60, 5),
              x("cpu_op", "aten::isfinite", 5, 18), x("cpu_op", "aten::abs", 12, 6),  # both open at 15
              x("cpu_op", "aten::mul", 51, 3),  # closed before the 50-60 gap's middle
              x("ac2g", "flow", 0, 0), {"ph": "i", "cat": "kernel", "name": "instant", "ts": 100}]
    span, idle, by_op = device_idle(events)
    # gaps: 10-20 (middle 15: isfinite, which calls abs), 35-41 (middle 38: nothing open), 50-60
    assert (span, idle) == (65, 10 + 6 + 10)
    assert by_op == {"aten::isfinite": 10, "(no operator: Python between operators)": 16}
    assert gap_histogram(events) == [("0-2 us", 0, 0.0), ("2-10 us", 1, 6.0), ("10-100 us", 2, 20.0),
                                     ("100-1000 us", 0, 0.0), (">1000 us", 0, 0.0)]
    # innermost: abs (called by isfinite) at 15; a runtime call counts too
    events.append(x("cuda_runtime", "cudaStreamSynchronize", 36, 4))
    assert device_idle(events, charge_to="innermost")[2] == {"aten::abs": 10, "cudaStreamSynchronize": 6,
                                                      "(no operator: Python between operators)": 10}
    # phases: the step's record_function ranges (train/step.py), other annotations ignored
    events += [x("user_annotation", "step/forward", 0, 30), x("user_annotation", "step/optimizer", 55, 10),
               x("user_annotation", "Optimizer.step#AdamW.step", 30, 20)]
    assert device_idle(events, charge_to="phase")[2] == {"step/forward": 10, "step/optimizer": 10,
                                                   "(outside the step's phases: between steps, logging, "
                                                   "checkpointing)": 6}
    report = idle_report(events)
    assert report[0].startswith("device idle 0.0 ms of 0.1 ms (40.0%)") and "aten::isfinite" in report[2]
    phase_head = report.index("the same idle time by the phase of the optimizer step open meanwhile:")
    assert report[phase_head + 1].endswith("step/forward") or report[phase_head + 1].endswith("step/optimizer")
    assert "aten::abs" in report[report.index("", phase_head) + 2]
    assert "2 gaps of 10-100 us" in report[report.index("the same idle time by the length of each gap (5 device "
                                                        "activities):") + 3]
    assert device_idle([x("cpu_op", "aten::mm", 0, 5)]) == (0.0, 0.0, {})


def test_bench_baseline_needs_a_gpu_and_says_so():
    proc = bench("--steps", "1", "--warmup", "0", "--baseline")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--baseline needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_device_time_counts_every_device_activity_of_the_trace_and_no_annotation():
    from complexity_dist.train.profiling import device_rows

    def x(cat, name, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": 0, "dur": dur}

    gemm = "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT"
    events = [x("kernel", gemm, 5), x("kernel", "ncclDevKernel_AllGather", 3), x("kernel", gemm, 7),
              x("gpu_memcpy", "Memcpy DtoD", 2),
              x("gpu_memset", "Memset (Device)", 1),
              # device-side ranges of record_function and c10d span kernels that are counted on their own
              x("gpu_user_annotation", "Optimizer.step#AdamW.step", 50), x("gpu_user_annotation", "nccl:all_gather", 3),
              x("cpu_op", "aten::mm", 9), x("cuda_runtime", "cudaLaunchKernel", 1), {"ph": "i", "cat": "kernel"}]
    assert sorted(device_rows(events)) == [("Memcpy DtoD", 2, 1), ("Memset (Device)", 1, 1),
                                           ("ncclDevKernel_AllGather", 3, 1),
                                           (gemm, 12, 2)]


def test_our_triton_kernels_count_as_fused_kernels():
    """The profile's kinds table counts a kernel by its name: the Triton kernels we launch (complexity_dist/kernels/)
    are named so that they land beside the compiler's fused kernels, not under "other"."""
    import re

    from complexity_dist.train.profiling import kernel_kind

    launched = {name for path in (ROOT / "complexity_dist/kernels").glob("_triton_*.py")
                for name in re.findall(r"(\w+)\[\(", path.read_text())}
    assert launched >= {"triton_inl_fwd", "triton_inl_bwd", "triton_ce_row"}, launched
    assert {kernel_kind(name) for name in launched} == {"fused triton / compiled"}
