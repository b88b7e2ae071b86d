"""Credentials work and never leak; the test SLURM cluster is reachable from this machine only.

A password in the tracking URI (`http://user:s3cret@host`) or in MLFLOW_TRACKING_USERNAME/PASSWORD must reach
the server (the reachability probe and MLflow's client both authenticate: checked through a proxy that
answers 401 without the right Authorization header) and must appear nowhere the stack writes: output,
run_dir files (checkpoint config, resolved_config.yaml, metrics.jsonl), MLflow params, tags and artifacts.
"""
from __future__ import annotations

import base64
import http.client
import http.server
import logging
import subprocess
import threading
import urllib.parse
from pathlib import Path

import pytest
from conftest import free_port
from slurm_cluster import listening_addresses
from test_train import dataset, metrics, run, train_cmd  # noqa: F401  (module fixture)

from complexity_dist.redact import redact, redact_tree, redact_uri

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD, TOKEN = "user", "s3cret", "t0ken-xyz"
ENV_PASSWORD = "envpassw0rd"  # a second secret: what MLFLOW_TRACKING_PASSWORD holds in some runs
SECRETS = (PASSWORD, ENV_PASSWORD, TOKEN)
TRACKING_LOGGER = "complexity_dist.train.tracking"


# --------------------------------------------------------------------------------------------- helpers
class _AuthProxy(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = urllib.parse.urlsplit(upstream)
        basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        self.accepted = {f"Basic {basic}", f"Bearer {TOKEN}"}
        self.seen: list[tuple[str, bool]] = []  # (path, authorized) of every request

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    """A reverse proxy that wants Basic user:s3cret (or Bearer t0ken-xyz): 401 otherwise."""

    def _relay(self):
        proxy: _AuthProxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ok = self.headers.get("Authorization") in proxy.accepted
        proxy.seen.append((self.path.split("?")[0], ok))
        if not ok:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("authorization", "host", "connection", "content-length")}
        conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        finally:
            conn.close()
        self.send_response(answer.status)
        for k, v in answer.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _relay

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def auth_proxy(mlflow_server):
    proxy = _AuthProxy(mlflow_server)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()


def _no_secret_in(what: str, text: str | bytes) -> None:
    for secret in SECRETS:
        needle = secret.encode() if isinstance(text, bytes) else secret
        assert needle not in text, f"{secret!r} leaked into {what}"


def _no_secret_in_files(folder: Path) -> int:
    files = [p for p in folder.rglob("*") if p.is_file()]
    for p in files:
        _no_secret_in(str(p), p.read_bytes())
    return len(files)


def _clear_mlflow_credentials(monkeypatch) -> None:
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------------------------- redaction
def test_redact_uri_masks_passwords_and_secret_query_values():
    assert redact_uri("http://user:s3cret@host:5000/x") == "http://user:***@host:5000/x"
    assert redact_uri("https://t0ken@host") == "https://***@host"
    assert redact_uri("https://host/api?token=abc&x=1") == "https://host/api?token=***&x=1"
    for plain in ("sqlite:////tmp/a/mlflow.db", "http://127.0.0.1:5000", "", "runs/x"):
        assert redact_uri(plain) == plain  # nothing secret: unchanged, byte for byte


def test_redact_text_and_trees(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ENV_PASSWORD)
    line = f"tracking.uri=http://user:{PASSWORD}@h:1 and the password {ENV_PASSWORD}"
    assert redact(line) == "tracking.uri=http://user:***@h:1 and the password ***"
    tree = {"tracking": {"uri": f"http://u:{PASSWORD}@h", "enabled": True}, "list": [f"x {ENV_PASSWORD}", 3]}
    assert redact_tree(tree) == {"tracking": {"uri": "http://u:***@h", "enabled": True}, "list": ["x ***", 3]}


def test_launchers_print_overrides_redacted(capsys):
    import sys

    sys.path.insert(0, str(ROOT))
    from launch import submit as S

    uri = f"http://user:{PASSWORD}@127.0.0.1:5000"
    assert S.main(["configs/tiny.yaml", f"tracking.uri={uri}", "--nproc-per-node", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tracking.uri=http://user:***@127.0.0.1:5000" in out and PASSWORD not in out
    r = subprocess.run(["bash", "-c", f'source slurm/common.sh; cx_log "overrides: tracking.uri={uri}"'],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert "tracking.uri=http://user:***@127.0.0.1:5000" in r.stderr and PASSWORD not in r.stderr


# ------------------------------------------------------------------------------- MLflow, in one process
def test_probe_and_client_authenticate_with_environment_credentials(tmp_path, auth_proxy, monkeypatch, caplog):
    from mlflow import MlflowClient

    from complexity_dist.train.tracking import Tracker, _probe

    _clear_mlflow_credentials(monkeypatch)
    caplog.set_level(logging.WARNING, logger=TRACKING_LOGGER)
    # the probe sends the credentials of the URI (urllib alone would take `user:s3cret@127.0.0.1` for a host)
    _probe(f"http://{USER}:{PASSWORD}@127.0.0.1:{auth_proxy.server_address[1]}")
    assert auth_proxy.seen[-1] == ("/health", True)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    _probe(auth_proxy.url)
    assert auth_proxy.seen[-1] == ("/health", True)
    # username/password from the environment: MLflow's client sends them itself
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    tracker = Tracker(uri=auth_proxy.url, run_dir=tmp_path / "run", experiment="secrets-env")
    tracker.start({"a": 1}, {"a": 1})
    tracker.log_metrics(1, {"loss": 2.5})
    tracker.finish()
    assert tracker.run_id and not _tracking_warnings(caplog)
    assert MlflowClient(tracking_uri=auth_proxy.upstream.geturl()).get_run(tracker.run_id).info.status == "FINISHED"


def test_wrong_password_warns_without_it(tmp_path, auth_proxy, monkeypatch, caplog):
    from complexity_dist.train.tracking import Tracker

    _clear_mlflow_credentials(monkeypatch)
    caplog.set_level(logging.WARNING, logger=TRACKING_LOGGER)
    wrong = "wr0ngpass"
    uri = f"http://{USER}:{wrong}@127.0.0.1:{auth_proxy.server_address[1]}"
    tracker = Tracker(uri=uri, run_dir=tmp_path)
    tracker.start({"tracking.uri": uri}, {"tracking": {"uri": uri}})
    tracker.finish()
    (message,) = [r.getMessage() for r in _tracking_warnings(caplog)]
    assert f"http://{USER}:***@127.0.0.1:{auth_proxy.server_address[1]}" in message and "401" in message
    assert wrong not in message and wrong not in caplog.text
    assert not tracker.enabled


def _tracking_warnings(caplog):
    return [r for r in caplog.records if r.name == TRACKING_LOGGER and r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------- training runs
def test_training_with_a_password_in_the_uri_tracks_and_leaks_nothing(tmp_path, dataset, auth_proxy,  # noqa: F811
                                                                       mlflow_server):
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    uri = f"http://{USER}:{PASSWORD}@127.0.0.1:{auth_proxy.server_address[1]}"
    proc = run(train_cmd(run_dir, dataset, "train.steps=3", "checkpoint.every=3", "tracking.enabled=true",
                         f"tracking.uri={uri}", "tracking.experiment=secrets"))
    assert len(metrics(run_dir)) == 3
    assert "MLflow tracking disabled" not in proc.stderr, proc.stderr[-3000:]
    assert auth_proxy.seen and all(ok for _, ok in auth_proxy.seen[-5:])
    _no_secret_in("stdout", proc.stdout)
    _no_secret_in("stderr", proc.stderr)
    assert (run_dir / "resolved_config.yaml").exists() and list(run_dir.glob("checkpoints/*/config.json"))
    _no_secret_in_files(run_dir)
    # the run, read through the real server (no proxy, no credentials)
    client = MlflowClient(tracking_uri=mlflow_server)
    got = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert got.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(got.info.run_id, "loss")) == [1, 2, 3]
    assert got.data.params["tracking.uri"] == f"http://{USER}:***@127.0.0.1:{auth_proxy.server_address[1]}"
    _no_secret_in("MLflow params and tags", repr(got.data.params) + repr(got.data.tags))
    artifacts = Path(client.download_artifacts(got.info.run_id, "", str(tmp_path / "artifacts")))
    assert (artifacts / "config" / "resolved_config.yaml").exists()
    assert _no_secret_in_files(artifacts) >= 3  # config, metrics, plot


def test_unreachable_server_with_credentials_warns_without_them(tmp_path, dataset):  # noqa: F811
    run_dir = tmp_path / "run"
    port = free_port()
    proc = run(train_cmd(run_dir, dataset, "train.steps=3", "checkpoint.enabled=false", "tracking.enabled=true",
                         f"tracking.uri=http://{USER}:{PASSWORD}@127.0.0.1:{port}"),
               env_extra={"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": ENV_PASSWORD})
    assert len(metrics(run_dir)) == 3
    output = proc.stdout + proc.stderr
    assert "MLflow tracking disabled" in output and f"http://{USER}:***@127.0.0.1:{port}" in output
    _no_secret_in("output", output)
    _no_secret_in_files(run_dir)


# ------------------------------------------------------------------------------------------------ SLURM
@pytest.mark.slurm
def test_slurm_test_cluster_listens_on_loopback_only(slurm_cluster):  # noqa: F811
    for port in slurm_cluster.ports:  # slurmctld, then each slurmd
        assert listening_addresses(port) == {"127.0.0.1"}, \
            f"port {port}: bound to {listening_addresses(port) or 'nothing'}\n{slurm_cluster.logs()[-2000:]}"
