"""SLURM clusters on localhost for the launcher tests (Debian's slurm-wlm + munge).

`LocalSlurm.start()` installs the packages when they are missing (root + apt only), writes a private
slurm.conf under its own state folder (nothing in /etc/slurm is touched), starts munged (unless one already
answers), slurmctld and one slurmd per node, and waits for the nodes to be idle. `stop()` cancels the jobs and
ends the daemons this object started, by pid. Client commands find a cluster through SLURM_CONF (`.env`);
sbatch passes the environment on to jobs.

Two shapes:
- `LocalSlurm(state)`: one node `localhost` with this machine's CPUs (at least 2), partition `debug`. The
  session fixture `slurm_cluster` starts it and exports its SLURM_CONF into os.environ.
- `LocalSlurm(state, emulated_nodes=K)`: K nodes n1..nK of 1 CPU each, each its own slurmd on this same
  machine (`slurmd -N nI`, own port): real multi-node jobs (one srun task per node, a rendezvous across
  them) without a second machine. Node names do not resolve, so jobs there set MASTER_ADDR=127.0.0.1.
  The fixture `slurm_multinode_cluster` starts it on other ports and does not touch os.environ.

Usable outside pytest:  python tests/slurm_cluster.py up|down [STATE_DIR]   (EMULATED_NODES=2 for the other).
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "slurmctld", "slurmd", "munge"]
COMMANDS = ["sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo", "slurmctld", "slurmd", "munged"]
# Non-default ports so that a real SLURM on the same machine is never disturbed.
PORT_BASE = int(os.environ.get("COMPLEXITY_TEST_SLURM_PORT", "17817"))
MUNGE_SOCKET = "/run/munge/munge.socket.2"


class ClusterUnavailable(RuntimeError):
    """This machine cannot host the cluster (not root, no apt): tests skip with this message."""


class ClusterError(RuntimeError):
    """Installing or starting the cluster failed where it should have worked: tests fail with the logs."""


def _run(cmd: list[str], timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, timeout=timeout, text=True, capture_output=True, **kw)


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _missing() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None and not Path("/usr/sbin", c).exists()]


def ensure_installed() -> None:
    """apt-get install the Debian packages when a command is missing (needs root and apt)."""
    if not _missing():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"a local SLURM cluster needs root and apt (missing: {', '.join(_missing())})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        _run(["apt-get", "update", "-qq"], env=env)
        _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], env=env)
    except subprocess.CalledProcessError as e:
        raise ClusterError(f"apt-get install {' '.join(PACKAGES)} failed: {e.stderr[-2000:]}") from e
    if _missing():
        raise ClusterError(f"installed {PACKAGES} but still missing {_missing()}")


def slurm_conf_text(state: Path, ctld_port: int, nodes: list[tuple[str, int, int]]) -> str:
    """nodes: (name, slurmd port, CPUs). Every node is this machine (NodeAddr 127.0.0.1)."""
    host = socket.gethostname()
    node_lines = "".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
                         f"State=UNKNOWN\n" for name, port, cpus in nodes)
    return f"""# written by tests/slurm_cluster.py: a test cluster on localhost
ClusterName=cx-test-{ctld_port}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
# slurmctld (NoCtldInAddrAny) and slurmd (NoInAddrAny) bind to their configured 127.0.0.1, not 0.0.0.0:
# nothing outside this machine can reach the test cluster
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool-%n
SlurmdParameters=config_overrides
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd-%n.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
{node_lines}PartitionName=debug Nodes={','.join(n for n, _, _ in nodes)} Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """A cluster on this machine whose state, config and logs live under `state`."""

    def __init__(self, state: Path, cpus: int | None = None, emulated_nodes: int = 0,
                 port_base: int = PORT_BASE):
        self.state = Path(state).resolve()
        self.conf = self.state / "slurm.conf"
        self.ctld_port = port_base
        if emulated_nodes:
            self.node_specs = [(f"n{i}", port_base + i, 1) for i in range(1, emulated_nodes + 1)]
        else:  # slurm/pretrain_tiny.sh asks for 2 CPUs; config_overrides lets a 1-core machine declare 2
            self.node_specs = [("localhost", port_base + 1, cpus or max(2, os.cpu_count() or 1))]
        self.nodes = [n for n, _, _ in self.node_specs]
        self._pids: list[tuple[str, int]] = []

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def _client(self, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return _run(cmd, timeout=timeout, check=False, env={**os.environ, **self.env})

    # ---------------------------------------------------------------- daemons
    def start(self, timeout: float = 60) -> "LocalSlurm":
        ensure_installed()
        if os.geteuid() != 0:
            raise ClusterUnavailable("a local SLURM cluster needs root and apt (slurmd runs jobs as root here)")
        try:
            self._start(timeout)
        except (subprocess.SubprocessError, OSError, TimeoutError) as e:
            detail = getattr(e, "stderr", "") or ""
            raise ClusterError(f"{e} {detail}\n{self.logs()}") from e
        return self

    def _start(self, timeout: float) -> None:
        (self.state / "ctld").mkdir(parents=True, exist_ok=True)
        for old in [*self.state.glob("slurm*.log"), *self.state.glob("slurm*.pid")]:
            old.unlink()
        self.conf.write_text(slurm_conf_text(self.state, self.ctld_port, self.node_specs))
        self._start_munge()
        self._daemon("slurmctld", "slurmctld", ["-i"])
        for node in self.nodes:
            (self.state / f"spool-{node}").mkdir(exist_ok=True)
            self._daemon(f"slurmd-{node}", "slurmd", ["-N", node])
        try:
            _wait(self.nodes_idle, timeout, "the nodes did not become idle")
        except TimeoutError as e:
            raise ClusterError(f"{e}: {self.node_state()}\n{self.logs()}") from e

    def _munge_ok(self) -> bool:
        if not Path(MUNGE_SOCKET).exists():
            return False
        try:
            cred = _run(["munge", "-n"], timeout=10).stdout
            _run(["unmunge"], timeout=10, input=cred)
            return True
        except (subprocess.SubprocessError, OSError):
            return False

    def _start_munge(self) -> None:
        if self._munge_ok():
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():  # Debian's package makes one; create it if someone removed it
            _run([_sbin("mungekey"), "--create", "--keyfile", str(key)])
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        _run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"])
        _run(["runuser", "-u", "munge", "--", _sbin("munged"), "--force"])  # a leftover socket is stale here
        _wait(self._munge_ok, 20, "munged did not answer (munge -n | unmunge)")
        pid = _read_pid(Path("/run/munge/munged.pid"))
        if pid is not None:
            self._pids.append(("munged", pid))

    def _daemon(self, name: str, program: str, args: list[str]) -> None:
        pidfile, log = self.state / f"{name}.pid", self.state / f"{name}.log"
        try:
            _run([_sbin(program), "-f", str(self.conf), *args], timeout=60, env={**os.environ, **self.env})
        except subprocess.CalledProcessError as e:
            raise ClusterError(f"{name} did not start: {e.stderr}\n{self.logs()}") from e
        # The daemon creates its pid file before it writes the number: wait for the number, not the file.
        _wait(lambda: _read_pid(pidfile) is not None or "fatal:" in (log.read_text() if log.exists() else ""),
              20, f"{name} wrote no pid to {pidfile}")
        pid = _read_pid(pidfile)
        if pid is None:
            raise ClusterError(f"{name} failed to start:\n{self.logs()}")
        self._pids.append((name, pid))

    @property
    def ports(self) -> list[int]:
        """The TCP ports of this cluster's daemons: slurmctld's, then each slurmd's."""
        return [self.ctld_port, *(port for _, port, _ in self.node_specs)]

    def node_state(self) -> str:
        r = self._client(["sinfo", "-h", "-N", "-o", "%N %T"])
        return (r.stdout + r.stderr).strip()

    def nodes_idle(self) -> bool:
        states = dict(line.split() for line in self.node_state().splitlines() if len(line.split()) == 2)
        return all(states.get(n) == "idle" for n in self.nodes)

    def logs(self) -> str:
        return "\n".join(f"--- {p}\n" + p.read_text()[-3000:] for p in sorted(self.state.glob("slurm*.log")))

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every job of this cluster and wait until its queue is empty."""
        ids = sorted(set(self._client(["squeue", "-h", "-o", "%A"]).stdout.split()))
        if ids:
            self._client(["scancel", *ids])
            try:
                _wait(lambda: not self._client(["squeue", "-h", "-o", "%A"]).stdout.strip(), timeout,
                      "jobs still in the queue after scancel")
            except TimeoutError:
                pass

    def stop(self) -> None:
        """Cancel the jobs, then end the daemons this object started (never others), newest first."""
        if any(name == "slurmctld" for name, _ in self._pids):
            self.cancel_all()
        for name, pid in reversed(self._pids):  # munged only when this object started it
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 15
            while time.time() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._pids.clear()

    # ---------------------------------------------------------------- jobs
    def in_queue(self, job_id: str) -> bool:
        r = self._client(["squeue", "-h", "-j", str(job_id), "-o", "%T"])
        return r.returncode == 0 and bool(r.stdout.strip())

    def wait_gone(self, job_id: str, timeout: float) -> None:
        """Wait until `job_id` has left the queue (finished, failed or cancelled)."""
        _wait(lambda: not self.in_queue(job_id), timeout, f"job {job_id} still in the queue")

    def job_field(self, job_id: str, field: str) -> str:
        """A field of `scontrol show job` (JobState, Restarts, Reason, ...); "" once the job is purged."""
        for tok in self._client(["scontrol", "show", "job", "-o", str(job_id)]).stdout.split():
            if tok.startswith(field + "="):
                return tok.split("=", 1)[1]
        return ""


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on `port` (IPv4 and IPv6), read from /proc/net:
    e.g. {"127.0.0.1"}, or {"0.0.0.0"} for a socket bound to every interface."""
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr_hex, port_hex = fields[1].split(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A = LISTEN
                continue
            raw = bytes.fromhex(addr_hex)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
            found.add(str(ipaddress.ip_address(raw)))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _read_pid(pidfile: Path) -> int | None:
    """The pid in a daemon's pid file, or None while the file is missing or not yet written."""
    try:
        words = pidfile.read_text().split()
    except FileNotFoundError:
        return None
    return int(words[0]) if words and words[0].isdigit() else None


def _wait(pred, timeout: float, what: str, period: float = 0.25) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(period)
    raise TimeoutError(f"{what} (after {timeout:.0f} s)")


try:
    import pytest
except ImportError:  # the module also works as a plain script
    pytest = None

if pytest is not None:

    def _started(cluster: LocalSlurm) -> LocalSlurm:
        try:
            return cluster.start()
        except ClusterUnavailable as e:
            cluster.stop()
            pytest.skip(str(e))
        except ClusterError as e:
            cluster.stop()
            pytest.fail(f"could not set up the local SLURM cluster: {e}", pytrace=False)

    @pytest.fixture(scope="session")
    def slurm_cluster(tmp_path_factory):
        """One node `localhost` for the session, its SLURM_CONF in os.environ; skips without root/apt,
        fails if the setup breaks where it should work."""
        cluster = _started(LocalSlurm(tmp_path_factory.mktemp("slurm")))
        saved = os.environ.get("SLURM_CONF")
        os.environ.update(cluster.env)
        yield cluster
        cluster.stop()
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved

    @pytest.fixture(scope="session")
    def slurm_multinode_cluster(tmp_path_factory):
        """Two emulated nodes n1, n2 (1 CPU each) on other ports; use `cluster.env` to reach it."""
        cluster = _started(LocalSlurm(tmp_path_factory.mktemp("slurm2"), emulated_nodes=2,
                                      port_base=PORT_BASE + 10))
        yield cluster
        cluster.stop()


if __name__ == "__main__":
    import sys

    state = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/complexity-slurm")
    emulated = int(os.environ.get("EMULATED_NODES", "0"))
    if sys.argv[1:2] == ["up"]:
        c = LocalSlurm(state, emulated_nodes=emulated, port_base=PORT_BASE + (10 if emulated else 0)).start()
        for name, pid in c._pids:
            if name == "munged":  # started by us: `down` stops it too
                (state / "slurm-munged.pid").write_text(str(pid))
        print(f"cluster up; use: export SLURM_CONF={c.conf}")
    elif sys.argv[1:2] == ["down"]:
        for pidfile in state.glob("slurm*.pid"):
            pid = _read_pid(pidfile)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        print("stopped")
    else:
        print(__doc__)
