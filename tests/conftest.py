import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

# The SLURM clusters are session fixtures shared by every test module: registered here, once. (A fixture
# imported into two test modules is two fixtures, and a second cluster on the same ports cannot start.)
from slurm_cluster import slurm_cluster, slurm_multinode_cluster  # noqa: E402,F401


def tiny_overrides(**extra) -> list[str]:
    """A model small enough for per-token reference loops, with the tiny preset's shape ratios."""
    base = {"model.vocab_size": 97, "model.hidden_size": 32, "model.intermediate_size": 48,
            "model.num_hidden_layers": 3, "model.num_attention_heads": 4, "model.num_key_value_heads": 2,
            "model.num_experts": 4, "data.seq_len": 16}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def assert_same_grads(model, reference, rtol=1e-4, atol=1e-6) -> None:
    """Every parameter of `model` has the gradient of the same parameter of `reference` (None where it has None)."""
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def root() -> Path:
    return ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a sqlite store, started once per test session (it takes ~25 s to answer)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logfile = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
         "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)  # own group: kill workers too
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                logfile.flush()
                pytest.fail(f"mlflow server did not answer on {url}/health: "
                            f"{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        logfile.close()
