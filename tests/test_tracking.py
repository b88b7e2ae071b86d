"""Metrics log, throughput/MFU, the progress line and MLflow tracking (a real server, a dead one, a
failing one, and the default sqlite store in the run directory)."""
from __future__ import annotations

import http.server
import io
import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from complexity_dist.config import Config
from complexity_dist.train.metrics import (
    MetricsLog, StepPrinter, Throughput, format_step, peak_flops_per_device, plot_metrics, read_metrics,
)
from complexity_dist.train.tracking import RUN_ID_FILE, Tracker

pytestmark = pytest.mark.timeout(300)

TRACKING_LOGGER = "complexity_dist.train.tracking"


def _row(step: int, loss: float = 3.0, **extra) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0,
            "mfu": None, "skipped": False, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expected_params(cfg: Config) -> dict[str, str]:
    return {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in cfg.flat().items()}


def _tracking_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == TRACKING_LOGGER and r.levelno >= logging.WARNING]


# --- metrics.jsonl -------------------------------------------------------------------------------------

def test_metrics_log_appends_and_resume_drops_later_steps(tmp_path):
    with MetricsLog(tmp_path) as log:
        for step in range(1, 28):  # crashed after step 27; the last checkpoint was step 20
            log.write(_row(step, loss=float(step), extra_key="x"))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 28, "loss": 1.')  # a line cut off by the crash

    with MetricsLog(tmp_path, resume_step=20) as log:
        assert [r["step"] for r in read_metrics(log.path)] == list(range(1, 21))
        log.write(_row(21, loss=99.0))
    records = list(read_metrics(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 22))
    assert records[-1]["loss"] == 99.0 and records[0]["extra_key"] == "x"
    assert not (tmp_path / "metrics.jsonl.tmp").exists()

    MetricsLog(tmp_path).close()  # a fresh run (resume_step 0) keeps nothing
    assert list(read_metrics(tmp_path / "metrics.jsonl")) == []


def test_metrics_log_writes_strict_json_and_requires_keys(tmp_path):
    with MetricsLog(tmp_path) as log:
        written = log.write(_row(1, loss=float("nan"), skipped=True))
        with pytest.raises(KeyError, match="lacks lr"):
            log.write({"step": 2, "loss": 1.0, "grad_norm": 1.0, "tokens_per_s": 1.0, "mfu": None,
                       "skipped": False})
    assert written["loss"] is None  # NaN is not JSON; `skipped` says what happened
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert json.loads(line)["skipped"] is True and "NaN" not in line


# --- throughput, MFU, ETA ------------------------------------------------------------------------------

def test_throughput_mfu_and_eta_against_hand_numbers():
    # 8 H100s at 989 TFLOP/s each, 6.52 GFLOP/token
    tp = Throughput(flops_per_token=6.52e9, peak_flops=989e12, num_devices=8, window=2)
    r1 = tp.update(tokens=1_048_576, seconds=2.0, steps_left=10)
    assert r1.tokens_per_s == pytest.approx(524_288.0)
    assert r1.tokens_per_s_instant == pytest.approx(524_288.0)
    assert r1.mfu == pytest.approx(524_288 * 6.52e9 / (8 * 989e12))  # = 0.432047...
    assert r1.mfu == pytest.approx(0.432047, abs=1e-6)
    assert r1.eta_s == pytest.approx(20.0)

    r2 = tp.update(tokens=1_048_576, seconds=6.0, steps_left=9)
    assert r2.tokens_per_s_instant == pytest.approx(174_762.667, rel=1e-6)
    assert r2.tokens_per_s == pytest.approx(2 * 1_048_576 / 8.0)  # ratio of sums: 262144, not 349525
    assert r2.eta_s == pytest.approx(9 * 4.0)

    r3 = tp.update(tokens=1_048_576, seconds=2.0)  # window 2: the first step has left
    assert r3.tokens_per_s == pytest.approx(2 * 1_048_576 / 8.0) and r3.eta_s is None

    cpu = Throughput(flops_per_token=1e6, peak_flops=None).update(100, 1.0, steps_left=1)
    assert cpu.mfu is None and cpu.tokens_per_s == 100.0


def test_peak_flops_by_device_name(monkeypatch):
    import torch

    assert peak_flops_per_device("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA GeForce RTX 3090", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert peak_flops_per_device("cuda:0") == peak, name


def test_step_printer_plain_lines_every_log_every():
    out = io.StringIO()  # not a TTY: plain lines, no tqdm redraws
    printer = StepPrinter(total_steps=10, log_every=4, stream=out)
    tp = Throughput(flops_per_token=1e9, peak_flops=1e12)
    for step in range(1, 11):
        rates = tp.update(2000, 1.0, steps_left=10 - step)
        row = _row(step, skipped=step == 5, tokens_per_s=rates.tokens_per_s, mfu=rates.mfu)
        printer.update(row, rates)
    printer.message("checkpoint runs/x/step-10")
    printer.close()
    lines = out.getvalue().splitlines()
    assert [ln.split(" | ")[0] for ln in lines[:-1]] == ["step 4/10", "step 5/10", "step 8/10", "step 10/10"]
    assert "SKIPPED" in lines[1] and lines[-1] == "checkpoint runs/x/step-10"
    assert "2,000 tok/s" in lines[0] and "mfu 200.0%" in lines[0] and "eta 0m06s" in lines[0]
    assert " GiB" in lines[0]
    cpu_line = format_step(_row(3), total_steps=10, mem_gib=1.5, eta_s=3725)
    assert "mfu -" in cpu_line and "mem 1.5 GiB" in cpu_line and "eta 1h02m" in cpu_line


def test_plot_metrics(tmp_path):
    with MetricsLog(tmp_path) as log:
        for step in range(1, 6):
            log.write(_row(step, loss=5.0 / step))
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- MLflow: a real server -----------------------------------------------------------------------------

def test_server_params_metrics_artifacts_and_resume(mlflow_server, tmp_path, caplog):
    from mlflow import MlflowClient

    caplog.set_level(logging.WARNING, logger=TRACKING_LOGGER)
    cfg = Config()
    cfg.train.run_dir = str(tmp_path / "run")
    cfg.tracking.uri = mlflow_server
    cfg.tracking.run_name = "server-test"

    tracker = Tracker.from_config(cfg)
    assert tracker.enabled and not tracker.resumed
    with MetricsLog(tmp_path / "run") as log:
        for step in range(1, 6):
            tracker.log_metrics(step, log.write(_row(step, loss=4.0 - 0.5 * step)))
    tracker.finish("KILLED")  # e.g. preempted
    run_id = tracker.run_id
    assert (tmp_path / "run" / RUN_ID_FILE).read_text().strip() == run_id

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.info.run_name == "server-test" and run.info.status == "KILLED"
    assert run.data.params == _expected_params(cfg)
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 4.0 - 0.5 * s) for s in range(1, 6)]
    assert "mfu" not in run.data.metrics  # None on CPU: not logged
    artifacts = {a.path for d in ("config", "plots", "metrics") for a in client.list_artifacts(run_id, d)}
    assert artifacts == {"config/resolved_config.yaml", "plots/loss_curve.png", "metrics/metrics.jsonl"}
    local = client.download_artifacts(run_id, "config/resolved_config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(local).read_text()) == cfg.to_dict()

    # resume from the step-3 checkpoint with a longer schedule: same run, params untouched
    cfg.train.steps = 500
    resumed = Tracker.from_config(cfg, resume_step=3)
    assert resumed.enabled and resumed.resumed and resumed.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["resumed_from_step"] == "3"
    with MetricsLog(tmp_path / "run", resume_step=3) as log:
        for step in range(4, 8):
            resumed.log_metrics(step, log.write(_row(step, loss=1.0)))
    resumed.finish()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.steps"] == "100"
    assert {m.step for m in client.get_metric_history(run_id, "loss")} == set(range(1, 8))
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 8))
    assert _tracking_warnings(caplog) == []


# --- MLflow: no server, a failing server --------------------------------------------------------------

def _exercise(tracker: Tracker, run_dir: Path) -> float:
    cfg = Config()
    t0 = time.monotonic()
    tracker.start(cfg.flat(), cfg.to_dict())
    with MetricsLog(run_dir) as log:
        for step in range(1, 4):
            tracker.log_metrics(step, log.write(_row(step)))
    tracker.log_artifact(run_dir / "metrics.jsonl")
    tracker.finish("FAILED")
    return time.monotonic() - t0


def test_unreachable_server_fails_fast_with_one_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=TRACKING_LOGGER)
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    tracker = Tracker(uri=uri, run_dir=tmp_path)
    elapsed = _exercise(tracker, tmp_path)
    assert elapsed < 15, elapsed
    assert not tracker.enabled
    warnings = _tracking_warnings(caplog)
    assert len(warnings) == 1 and uri in warnings[0].getMessage()
    assert "Connection refused" in warnings[0].getMessage() or "URLError" in warnings[0].getMessage()
    assert len(list(read_metrics(tmp_path / "metrics.jsonl"))) == 3  # the local log is unaffected


class _Failing(http.server.BaseHTTPRequestHandler):
    """Healthy on /health, 503 on every API call: what a broken proxy or an overloaded server looks like."""

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()
        self.wfile.write(b"OK")

    do_POST = do_PATCH = do_GET

    def log_message(self, *args):
        pass


def test_erroring_server_disables_after_bounded_retries(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=TRACKING_LOGGER)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        tracker = Tracker(uri=uri, run_dir=tmp_path)
        elapsed = _exercise(tracker, tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert elapsed < 15, elapsed
    warnings = _tracking_warnings(caplog)
    assert len(warnings) == 1 and uri in warnings[0].getMessage()


def test_disabled_tracker_does_nothing(tmp_path):
    tracker = Tracker(enabled=False, run_dir=tmp_path)
    _exercise(tracker, tmp_path)
    assert tracker.run_id is None and not (tmp_path / RUN_ID_FILE).exists()
    assert not (tmp_path / "mlflow.db").exists()


# --- MLflow: the default store -------------------------------------------------------------------------

def test_default_sqlite_store_in_run_dir(tmp_path, monkeypatch, caplog):
    from mlflow import MlflowClient

    caplog.set_level(logging.WARNING, logger=TRACKING_LOGGER)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the current directory
    run_dir = tmp_path / "run"
    cfg = Config()
    cfg.train.run_dir = str(run_dir)

    tracker = Tracker.from_config(cfg)
    assert tracker.uri == f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    with MetricsLog(run_dir) as log:
        for step in range(1, 4):
            tracker.log_metrics(step, log.write(_row(step)))
    tracker.finish()
    assert _tracking_warnings(caplog) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    client = MlflowClient(tracking_uri=tracker.uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params == _expected_params(cfg) and run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((run_dir / "mlartifacts").resolve().as_uri())
    assert (run_dir / "mlartifacts").is_dir()
    assert {m.step for m in client.get_metric_history(tracker.run_id, "grad_norm")} == {1, 2, 3}

    resumed = Tracker.from_config(cfg)
    assert resumed.resumed and resumed.run_id == tracker.run_id
    resumed.finish()

    fresh = Tracker.from_config(cfg, resume_step=0)  # no checkpoint: the saved run id is stale
    assert not fresh.resumed and fresh.run_id != tracker.run_id
    assert (run_dir / RUN_ID_FILE).read_text().strip() == fresh.run_id

    def store_gone(*args, **kwargs):
        raise ConnectionError("store went away")

    monkeypatch.setattr(fresh._client, "log_batch", store_gone)  # fails in the middle of training
    for step in range(1, 4):
        fresh.log_metrics(step, _row(step))
    fresh.finish()
    warnings = _tracking_warnings(caplog)
    assert len(warnings) == 1 and "store went away" in warnings[0].getMessage() and not fresh.enabled
    assert client.get_run(fresh.run_id).info.status == "RUNNING"  # finish was a no-op after the failure


def test_env_uri_used_when_config_uri_empty(tmp_path, monkeypatch):
    from complexity_dist.train.tracking import resolve_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_uri("", tmp_path) == "http://tracking.example:5000"
    assert resolve_uri("sqlite:////x/y.db", tmp_path) == "sqlite:////x/y.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
