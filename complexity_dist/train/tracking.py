"""MLflow tracking for one training run: params once, metrics per step, artifacts at the end.

Only rank 0 creates a Tracker (the caller's job); other ranks create nothing. Tracking never stops
training: the first error (unreachable server, HTTP error, bad store) prints ONE warning naming the
tracking URI and the error, and every later call is a no-op.

Nothing here touches MLflow's global state (no `mlflow.start_run`, no `mlflow.set_tracking_uri`): all
calls go through one `MlflowClient` bound to the URI, so no active run leaks into other code or tests.

Credentials: a password in the URI (`http://user:pass@host:5000`) or in MLFLOW_TRACKING_USERNAME/PASSWORD
(or a bearer MLFLOW_TRACKING_TOKEN) is sent to the server, by the reachability probe and by MLflow's client.
MLflow's client authenticates only from those environment variables, so a password in the URI is moved
there (it wins over values already set) and the client gets the URI without it. Every copy that leaves the
process (warnings, params, the resolved-config artifact) goes through complexity_dist.redact: `***`.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml

from complexity_dist.redact import redact, redact_tree, redact_uri
from complexity_dist.train.metrics import METRICS_FILE, plot_metrics

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
_MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
CONFIG_ARTIFACT = "resolved_config.yaml"
PLOT_FILE = "loss_curve.png"

# MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) turn a dead server into minutes of
# blocked training; these bound one failing call to a few seconds (a hung server: ~3 x the timeout).
# Values already in the environment win.
_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_PROBE_TIMEOUT_S = 5.0


def resolve_uri(uri: str, run_dir: str | Path) -> str:
    """The explicit URI, else $MLFLOW_TRACKING_URI, else a sqlite store in the run directory."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(the URI without its user-info, user, password): user and password percent-decoded, None where
    absent. Only for http(s) URIs; anything else comes back unchanged."""
    if not uri.startswith(("http://", "https://")):
        return uri, None, None
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, sep, password = userinfo.partition(":")
    bare = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return bare, urllib.parse.unquote(user), urllib.parse.unquote(password) if sep else None


def _authorization(user: str | None = None, password: str | None = None) -> str | None:
    """The Authorization header MLflow's client would send: Basic for a user (from the URI, else from
    MLFLOW_TRACKING_USERNAME/PASSWORD), else Bearer for MLFLOW_TRACKING_TOKEN."""
    if user is None and os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        user, password = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    if user is not None:
        return "Basic " + base64.b64encode(f"{user}:{password or ''}".encode()).decode("ascii")
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return "Bearer " + os.environ["MLFLOW_TRACKING_TOKEN"]
    return None


def _probe(uri: str) -> None:
    """Fail fast on an HTTP server that is not there: one GET of /health with a short timeout and no
    retries, with the run's credentials (urllib cannot take them from the URI: it would read
    `user:pass@host` as the host name). Any HTTP answer (even 401/404 from a proxy) counts as reachable,
    and so does a TLS complaint (MLflow has its own certificate settings); the real calls judge those."""
    bare, user, password = split_credentials(uri)
    request = urllib.request.Request(bare.rstrip("/") + "/health")
    auth = _authorization(user, password)
    if auth:
        request.add_header("Authorization", auth)
    try:
        urllib.request.urlopen(request, timeout=_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        pass
    except urllib.error.URLError as e:
        if not isinstance(e.reason, ssl.SSLError):
            raise


def _local_artifact_root(uri: str) -> str | None:
    """For a sqlite store, artifacts go beside the database (MLflow's default is ./mlruns of the current
    directory, which would scatter artifacts wherever training was launched)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(urllib.parse.urlparse(uri).path)
    return (db.parent / "mlartifacts").resolve().as_uri()


class Tracker:
    """One MLflow run per training run, continued across resumes.

    The run id is kept in `<run_dir>/mlflow_run_id`; a Tracker on a run_dir that has one continues that
    run (same id, status back to RUNNING) and does not log params again (MLflow params are immutable).
    `resume_step` is the checkpoint step the training starts from: 0 means a fresh start, so a stale run
    id left in the run_dir is not continued; None (unknown) continues any saved run. MLflow cannot delete
    metric points, so steps logged after the checkpoint by the crashed segment stay in its history next
    to the new ones (the later timestamp is the live one); metrics.jsonl is exact. Metrics are sent in
    batches every `flush_seconds` and at finish: a process killed outright loses at most that much of its
    MLflow history (never of metrics.jsonl).
    """

    def __init__(self, *, enabled: bool = True, uri: str = "", run_dir: str | Path = ".",
                 experiment: str = "complexity-dist", run_name: str = "", resume_step: int | None = None,
                 flush_seconds: float = 5.0):
        self.run_dir = Path(run_dir)
        resolved = resolve_uri(uri, run_dir) if enabled else uri
        # the only form that is ever printed or stored
        self.display_uri = redact_uri(resolved)
        # what the MLflow client gets: without a user:password, which goes to the environment in _start
        bare, self._user, self._password = split_credentials(resolved)
        self.uri = bare if self._password is not None else resolved
        self.experiment = experiment
        self.run_name = run_name or self.run_dir.resolve().name
        self.enabled = enabled
        self.resume_step = resume_step
        self.run_id: str | None = None
        self.resumed = False
        self._client = None
        # metrics are sent in batches, at most every flush_seconds (and at finish), so a slow or remote
        # store does not stall rank 0 (and with it every rank) once per step
        self.flush_seconds = flush_seconds
        self._pending: list = []
        self._last_flush = time.monotonic()

    @classmethod
    def from_config(cls, cfg: Any, run_dir: str | Path | None = None, resolved_config: dict | None = None,
                    resume_step: int | None = None) -> "Tracker":
        """Build from a complexity_dist Config and start the run: params = cfg.flat(), the config
        artifact = `resolved_config` or cfg.to_dict(); run_dir defaults to cfg.train.run_dir."""
        t = cfg.tracking
        tracker = cls(enabled=t.enabled, uri=t.uri, run_dir=run_dir or cfg.train.run_dir,
                      experiment=t.experiment, run_name=t.run_name, resume_step=resume_step)
        return tracker.start(cfg.flat(), resolved_config if resolved_config is not None else cfg.to_dict())

    # --- the guard every MLflow call goes through ---

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        if not self.enabled:
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self.enabled = False
            # error texts may quote a URL or a header: redact them too
            log.warning("MLflow tracking disabled: %s failed for tracking URI %s: %s: %s "
                        "(training continues; metrics are still written to %s)",
                        redact(what), self.display_uri, type(e).__name__,
                        redact(str(e).splitlines()[0]) if str(e) else "", self.run_dir / METRICS_FILE)
            return None

    # --- public API ---

    def start(self, params: dict[str, Any], resolved_config: dict) -> "Tracker":
        """Open (or continue) the run; log `params` (flat `section.key` -> value) if the run is new and
        the resolved config as an artifact. Returns self."""
        self._guard("starting the run", lambda: self._start(params, resolved_config))
        return self

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Log the numeric entries of `metrics` at `step` (None, strings and non-finite values skipped)."""
        self._guard("logging metrics", lambda: self._log_metrics(step, metrics))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._guard(f"uploading {path}",
                    lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def finish(self, status: str = "FINISHED") -> None:
        """Upload metrics.jsonl and a loss-curve PNG, then close the run with `status`
        (FINISHED, FAILED or KILLED). Later calls do nothing."""
        self._guard("finishing the run", lambda: self._finish(status))
        self.enabled = False

    # --- the work ---

    def _start(self, params: dict[str, Any], resolved_config: dict) -> None:
        for key, value in _HTTP_ENV.items():
            os.environ.setdefault(key, value)
        if self._password is not None:  # MLflow's client reads credentials only from here
            os.environ["MLFLOW_TRACKING_USERNAME"] = self._user or ""
            os.environ["MLFLOW_TRACKING_PASSWORD"] = self._password
        if self.uri.startswith(("http://", "https://")):
            _probe(self.uri)
        from mlflow.tracking import MlflowClient  # heavy import, only when tracking is on

        self._client = MlflowClient(tracking_uri=self.uri)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = self._existing_run()
        self.resumed = self.run_id is not None
        if self.resumed:
            self._client.update_run(self.run_id, status="RUNNING")
            if self.resume_step is not None:
                self._client.set_tag(self.run_id, "resumed_from_step", str(self.resume_step))
        else:
            experiment_id = self._experiment_id()
            run = self._client.create_run(experiment_id, run_name=self.run_name,
                                          tags={"run_dir": str(self.run_dir.resolve())})
            self.run_id = run.info.run_id
            _write_atomic(self.run_dir / RUN_ID_FILE, self.run_id + "\n")
            self._log_params(params)
        config_file = self.run_dir / CONFIG_ARTIFACT
        _write_atomic(config_file, yaml.safe_dump(redact_tree(resolved_config), sort_keys=False))
        self._client.log_artifact(self.run_id, str(config_file), "config")

    def _existing_run(self) -> str | None:
        """The run id saved by an earlier segment of this training run, if the store still has it."""
        from mlflow.exceptions import MlflowException

        path = self.run_dir / RUN_ID_FILE
        if not path.exists() or self.resume_step == 0:
            return None
        run_id = path.read_text().strip()
        try:
            run = self._client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            log.warning("MLflow run %s from %s is not in %s (deleted, or another store); starting a new run",
                        run_id, path, self.display_uri)
            return None
        return run_id

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                return self._client.create_experiment(self.experiment,
                                                       artifact_location=_local_artifact_root(self.uri))
            except MlflowException as e:  # another run created it meanwhile
                exp = self._client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise e
        if exp.lifecycle_stage == "deleted":
            self._client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), redact(json.dumps(v) if isinstance(v, (list, dict)) else str(v)))
                 for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def _log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if hasattr(value, "item") and callable(value.item):
                value = value.item()
            if key == "step" or isinstance(value, str) or value is None:
                continue
            value = float(value)  # bools too (skipped -> 0/1)
            if value == value and abs(value) != float("inf"):
                self._pending.append(Metric(key, value, now, int(step)))
        if time.monotonic() - self._last_flush >= self.flush_seconds or len(self._pending) >= _MAX_BATCH:
            self._flush()

    def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:_MAX_BATCH], self._pending[_MAX_BATCH:]
            self._client.log_batch(self.run_id, metrics=batch)
        self._last_flush = time.monotonic()

    def _finish(self, status: str) -> None:
        self._flush()
        jsonl = self.run_dir / METRICS_FILE
        if jsonl.exists():
            self._client.log_artifact(self.run_id, str(jsonl), "metrics")
            try:
                png = plot_metrics(jsonl, self.run_dir / PLOT_FILE)
            except ImportError as e:
                png = None
                log.warning("no loss plot: matplotlib is not importable (%s)", e)
            if png is not None:
                self._client.log_artifact(self.run_id, str(png), "plots")
        self._client.set_terminated(self.run_id, status)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
