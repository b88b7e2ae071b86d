"""Submit training runs with submitit: to SLURM (one task per GPU, or per CPU process) or to this machine.

    python -m launch.submit CONFIG [section.key=value ...] [--nodes N] [--gpus-per-node G] [--partition P]
        [--time T] [--cpus-per-task C] [--nproc-per-node K] [--sweep key=v1,v2 ...] [--local] [--wait]

Task layout. Every task is one training process: `--nodes N --gpus-per-node G` gives N*G tasks
(`--ntasks-per-node=G`), each of which sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the
first host of the allocation) and MASTER_PORT from `submitit.JobEnvironment` and runs the trainer in-process
(`complexity-dist train CONFIG overrides`), exactly as torchrun would have started it: no torchrun, no
subprocess, one srun step. Every task sees all GPUs of its node and uses cuda:LOCAL_RANK. `--nproc-per-node K`
makes a CPU run instead (K gloo processes per node, no GPU requested).

Preemption and time limits. submitit asks SLURM for `--signal=USR2@<--signal-delay>`; SLURM sends USR2 to every
task before the end (or `scancel --signal=USR2 JOBID`, or job._interrupt() for a drill). The trainer must save
before anything is requeued, and it saves on its own SIGUSR1, so each task relays: on USR2 it raises SIGUSR1 in
its own process (waiting first, if the trainer has not installed its handler yet); the trainer finishes its
step, agrees with the other ranks, writes a checkpoint and returns 99 (EXIT_REQUEUE). Only then does the task
call submitit's own handler, which on rank 0 calls `TrainJob.checkpoint()` (it returns a requeue of the same
run: same config, overrides and run_dir, attempt + 1), rewrites the job pickle and runs `scontrol requeue`;
the requeued job starts the trainer again, which resumes from <run_dir>/checkpoints/latest. A timeout counts
against `--max-timeouts` (submitit's countdown); a preemption does not. A run stopped by SIGTERM (scancel, or
SLURM preempting in REQUEUE mode) also checkpoints, but is left to SLURM: no result is written and nothing
is requeued from here.

Sweeps. Each `--sweep section.key=v1,v2,...` is one axis; the runs are the cartesian product, submitted as
one job array, and each element gets its own run_dir: <run_dir>-<key><value>-... (e.g. runs/tiny-lr0.001-seed1).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import submitit

from complexity_dist.redact import redact
from complexity_dist.train.faults import EXIT_REQUEUE  # a plain module: the submitter does not import torch

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- sweeps
def parse_sweeps(specs: list[str]) -> list[tuple[str, list[str]]]:
    """`["optim.lr=1e-3,3e-4", "train.seed=1,2"]` -> `[("optim.lr", ["1e-3", "3e-4"]), ("train.seed", ["1", "2"])]`."""
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*\.[A-Za-z_]\w*", key):
            raise ValueError(f"--sweep {spec!r}: expected section.key=v1,v2,... (e.g. optim.lr=1e-3,3e-4)")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise ValueError(f"--sweep {spec!r}: no values after '='")
        if len(set(vals)) != len(vals):
            raise ValueError(f"--sweep {spec!r}: a value is repeated")
        if key in (k for k, _ in axes):
            raise ValueError(f"--sweep {key} is given twice; put all its values in one --sweep")
        axes.append((key, vals))
    return axes


def sweep_grid(specs: list[str]) -> list[dict[str, str]]:
    """The cartesian product of the sweep axes, first axis slowest: one dict (key -> value) per run."""
    axes = parse_sweeps(specs)
    keys = [k for k, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(vals for _, vals in axes))]


def run_suffix(point: dict[str, str]) -> str:
    """`{"optim.lr": "1e-3", "train.seed": "2"}` -> `"lr1e-3-seed2"` (characters safe in a path)."""
    last = [k.rsplit(".", 1)[-1] for k in point]
    names = [k.rsplit(".", 1)[-1] if last.count(k.rsplit(".", 1)[-1]) == 1 else k for k in point]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "-".join(f"{n}{v}" for n, v in zip(names, point.values())))


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for o in overrides:
        key, sep, value = o.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"override {o!r}: expected section.key=value")
        out[key.strip()] = value
    return out


def expand_runs(base_run_dir: str, overrides: list[str], sweeps: list[str]) -> list[list[str]]:
    """One override list per run: the fixed overrides, then the sweep point, and a train.run_dir of its own
    (<run_dir>-<suffix>) for each point of a sweep. Without sweeps: the overrides unchanged."""
    fixed = parse_overrides(overrides)
    grid = sweep_grid(sweeps)
    if not grid or grid == [{}]:
        return [[f"{k}={v}" for k, v in fixed.items()]]
    run_dir = fixed.get("train.run_dir", base_run_dir)
    runs = []
    for point in grid:
        merged = {**fixed, **point}
        if "train.run_dir" not in point:
            merged["train.run_dir"] = f"{run_dir.rstrip('/')}-{run_suffix(point)}"
        runs.append([f"{k}={v}" for k, v in merged.items()])
    return runs


# ------------------------------------------------------------------------------------------------ the job
class _PreemptionRelay:
    """submitit's preemption signal -> the trainer's SIGUSR1; submitit's requeue only after the trainer saved."""

    def __init__(self) -> None:
        self.signum = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        self.received: int | None = None
        self.submitit_handler = None
        self.finished = threading.Event()

    def install(self) -> None:
        self.submitit_handler = signal.getsignal(self.signum)
        signal.signal(self.signum, self._on_preempt)
        # Until the trainer installs its own SIGUSR1 handler (and after it restores this one), a SIGUSR1 must
        # not kill the process (the default action).
        signal.signal(signal.SIGUSR1, self._placeholder)

    def _placeholder(self, signum, frame) -> None:
        pass

    def _on_preempt(self, signum, frame) -> None:
        if self.received is not None:
            return
        self.received = signum
        print(f"[launch.submit] {signal.Signals(signum).name}: asking the trainer to checkpoint and stop",
              file=sys.stderr, flush=True)
        threading.Thread(target=self._deliver, name="preemption-relay", daemon=True).start()

    def _deliver(self) -> None:
        # The trainer listens to SIGUSR1 once its loop starts (after the model, checkpoint and data are ready).
        while not self.finished.is_set():
            if signal.getsignal(signal.SIGUSR1) != self._placeholder:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.2)

    def requeue_and_exit(self) -> None:
        """After the trainer saved and returned EXIT_REQUEUE: submitit's own handler. On rank 0 it calls
        TrainJob.checkpoint(), dumps the requeued job and runs `scontrol requeue`, then exits; it raises
        UncompletedJobError when it will not requeue (too many timeouts). Other ranks exit without a result."""
        if self.received is not None and callable(self.submitit_handler):
            self.submitit_handler(self.received, None)
        raise SystemExit(EXIT_REQUEUE)


def _job_port(job_id: str) -> int:
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 20000


def distributed_env(job_env: submitit.JobEnvironment) -> dict[str, str]:
    """The torchrun-style variables of this task, from submitit's view of the SLURM (or local) job."""
    ntasks, nodes = job_env.num_tasks, max(job_env.num_nodes, 1)
    slurm = job_env.cluster == "slurm"
    master = job_env.hostnames[0] if slurm else "127.0.0.1"
    job_id = os.environ.get("SLURM_JOB_ID", "") if slurm else str(job_env.job_id)
    return {
        "RANK": str(job_env.global_rank), "WORLD_SIZE": str(ntasks),
        "LOCAL_RANK": str(job_env.local_rank), "LOCAL_WORLD_SIZE": str(ntasks // nodes),
        "GROUP_RANK": str(job_env.node), "NODE_RANK": str(job_env.node),
        "MASTER_ADDR": os.environ.get("COMPLEXITY_MASTER_ADDR", master),
        "MASTER_PORT": os.environ.get("COMPLEXITY_MASTER_PORT", str(_job_port(job_id))),
    }


def env_defaults(device: str, cpus_per_task: int, root: Path = ROOT) -> dict[str, str]:
    """Defaults for a training process; values already in the environment win (except NVLink multicast)."""
    env = {
        "OMP_NUM_THREADS": str(max(1, cpus_per_task)),
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "TORCH_EXTENSIONS_DIR": str(root / ".cache" / "torch_extensions"),
    }
    if device == "gpu":
        env.update(TORCH_NCCL_ASYNC_ERROR_HANDLING="1", NCCL_ASYNC_ERROR_HANDLING="1", NCCL_DEBUG="WARN")
    return env


@dataclasses.dataclass
class TrainJob(submitit.helpers.Checkpointable):
    """One training run (all its tasks); submitit pickles it, runs it in every task and requeues it."""

    config: str
    overrides: list[str]
    root: str = str(ROOT)
    device: str = "gpu"  # "gpu" (NCCL) or "cpu" (gloo)
    cpus_per_task: int = 1
    attempt: int = 0

    def __call__(self) -> dict:
        job_env = submitit.JobEnvironment()
        os.environ.update(distributed_env(job_env))
        for key, value in env_defaults(self.device, self.cpus_per_task, Path(self.root)).items():
            os.environ.setdefault(key, value)
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # never NVLink multicast
        if self.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.chdir(self.root)  # relative paths (configs, run_dir) are relative to the repository, as in slurm/
        rank = job_env.global_rank
        if rank == 0:
            print(f"[launch.submit] {job_env}: attempt {self.attempt + 1}, {self.device}, "
                  f"{self.config} {redact(' '.join(self.overrides))}", file=sys.stderr, flush=True)

        relay = _PreemptionRelay()
        relay.install()
        from complexity_dist.cli import main as cli_main

        try:
            code = cli_main(["train", self.config, *self.overrides])
        finally:
            relay.finished.set()
        if code == EXIT_REQUEUE:
            relay.requeue_and_exit()  # never returns
        if code != 0:
            raise RuntimeError(f"training exited with code {code} on rank {rank} (job {job_env.job_id}); "
                               f"see the job's stdout/stderr")
        return self.result(rank)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """submitit's preemption/timeout hook (rank 0, after the trainer saved): requeue this same run. It
        resumes from <run_dir>/checkpoints/latest, so no state travels in the pickle."""
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self, attempt=self.attempt + 1))

    def run_dir(self) -> Path:
        from complexity_dist.config import load_config

        return Path(self.root) / load_config(self.config, self.overrides).train.run_dir

    def result(self, rank: int) -> dict:
        out: dict = {"rank": rank, "exit_code": 0, "attempt": self.attempt}
        if rank == 0:
            run_dir = self.run_dir()
            out["run_dir"] = str(run_dir)
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists():
                lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
                if lines:
                    last = json.loads(lines[-1])
                    out.update(step=last.get("step"), loss=last.get("loss"))
            latest = run_dir / "checkpoints" / "latest"
            if latest.exists():
                out["checkpoint"] = str(run_dir / "checkpoints" / latest.read_text().strip())
        return out


# --------------------------------------------------------------------------------------------- submitting
def parse_time(text: str) -> int:
    """SLURM-style time ("90", "4:00:00", "1-12:00:00", "30:00") -> minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(f"--time {text!r}: use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = m.groups()
    if b is None and c is None:  # minutes, or D-HH
        minutes = int(a) * 60 if days else int(a)
    elif c is None:  # MM:SS, or D-HH:MM
        minutes = int(a) * 60 + int(b) if days else int(a) + (1 if int(b) else 0)
    else:  # HH:MM:SS
        minutes = int(a) * 60 + int(b) + (1 if int(c) else 0)
    return int(days or 0) * 24 * 60 + minutes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.split("\n\n")[0],
                                epilog="See docs/cluster.md.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (relative paths: from the repository)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs = tasks per node (default 8)")
    p.add_argument("--nproc-per-node", type=int, default=0,
                   help="a CPU run: this many gloo processes per node, no GPU requested")
    p.add_argument("--cpus-per-task", type=int, default=0, help="default: 8 per GPU task, 1 per CPU process")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default="24:00:00", help="time limit per attempt (default 24:00:00)")
    p.add_argument("--name", default=None, help="job name (default cx-<config name>)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="one sweep axis (repeatable): the runs are the cartesian product, as one job array")
    p.add_argument("--local", action="store_true", help="run here with submitit's LocalExecutor (one node)")
    p.add_argument("--wait", action="store_true", help="wait for the results and print them")
    p.add_argument("--folder", default=None, help="submitit's logs and pickles (default <repo>/logs/submitit)")
    p.add_argument("--signal-delay", type=int, default=180,
                   help="seconds between the preemption signal and the time limit (default 180)")
    p.add_argument("--max-timeouts", type=int, default=3, help="requeues after a time-out (default 3)")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--array-parallelism", type=int, default=256, help="array elements running at once")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --sbatch mem=0 --sbatch exclusive=true")
    p.add_argument("--dry-run", action="store_true", help="print the runs and exit without submitting")
    return p


def _resolve_config(config: str) -> str:
    path = Path(config)
    if not path.is_absolute():
        path = Path.cwd() / path if (Path.cwd() / path).exists() else ROOT / path
    if not path.exists():
        raise FileNotFoundError(f"config {config} not found (looked in {Path.cwd()} and {ROOT})")
    return str(path.resolve())


def plan(args: argparse.Namespace) -> tuple[list[TrainJob], dict]:
    """The TrainJobs and the executor parameters; every run's config is validated here, before submitting."""
    from complexity_dist.config import load_config

    config = _resolve_config(args.config)
    cpu = args.nproc_per_node > 0
    tasks_per_node = args.nproc_per_node if cpu else args.gpus_per_node
    if args.nodes < 1 or tasks_per_node < 1:
        raise ValueError("--nodes and --gpus-per-node/--nproc-per-node must be >= 1")
    if args.local and args.nodes != 1:
        raise ValueError("--local runs on this machine: --nodes must be 1")
    world = args.nodes * tasks_per_node
    base = load_config(config, args.overrides)
    runs = expand_runs(base.train.run_dir, args.overrides, args.sweep)
    try:  # what this version of the training loop refuses (tp/pp/ep > 1 ...); imports torch, hence optional
        from complexity_dist.parallel.distributed import check_supported
    except ImportError:
        check_supported = None
    for overrides in runs:
        cfg = load_config(config, overrides)
        cfg.layout(world)  # ConfigError names the key and the fix
        if check_supported is not None:
            check_supported(cfg)
    cpus = args.cpus_per_task or (1 if cpu else 8)
    jobs = [TrainJob(config=config, overrides=o, root=str(ROOT), device="cpu" if cpu else "gpu",
                     cpus_per_task=cpus) for o in runs]
    params: dict = dict(nodes=args.nodes, tasks_per_node=tasks_per_node, cpus_per_task=cpus,
                        timeout_min=parse_time(args.time),
                        name=args.name or f"cx-{Path(config).stem}")
    if not cpu:
        params["gpus_per_node"] = args.gpus_per_node
    exports = [f"export {k}=${{{k}:-{v}}}" for k, v in env_defaults("cpu" if cpu else "gpu", cpus).items()]
    exports += ["export NCCL_NVLS_ENABLE=0",  # never NVLink multicast
                # srun >= 22.05 does not inherit --cpus-per-task from the allocation
                "export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}"]
    if cpu:
        exports.append("export CUDA_VISIBLE_DEVICES=")
    additional = {"requeue": True}
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--sbatch {item!r}: expected KEY=VALUE")
        additional[key] = True if value.lower() == "true" else value
    params.update(slurm_signal_delay_s=args.signal_delay, slurm_setup=exports,
                  slurm_additional_parameters=additional, slurm_array_parallelism=args.array_parallelism)
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(args, name):
            params[f"slurm_{name}"] = getattr(args, name)
    return jobs, params


def make_executor(args: argparse.Namespace, params: dict) -> submitit.AutoExecutor:
    folder = Path(args.folder) if args.folder else ROOT / "logs" / "submitit"
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="local" if args.local else "slurm",
                                     slurm_max_num_timeout=args.max_timeouts)
    executor.update_parameters(**params)
    return executor


def submit(jobs: list[TrainJob], executor: submitit.AutoExecutor) -> list[submitit.Job]:
    if len(jobs) == 1:
        return [executor.submit(jobs[0])]
    return executor.submit_array(jobs)


def _in_queue(job_id: str) -> bool:
    try:
        r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return True  # cannot tell: keep waiting on submitit's own view
    return r.returncode != 0 or bool(r.stdout.strip())


def wait_for(job: submitit.Job, poll_s: float = 2.0, gone_grace_s: float = 30.0) -> list:
    """job.results(), robust to clusters without accounting (where submitit cannot read the job state):
    a SLURM job that has left the queue without writing its results for `gone_grace_s` is reported."""
    gone_since = None
    while not job.done():
        if isinstance(job, submitit.SlurmJob):
            if _in_queue(job.job_id):
                gone_since = None
            elif gone_since is None:
                gone_since = time.time()
            elif time.time() - gone_since > gone_grace_s:
                raise RuntimeError(f"job {job.job_id} left the queue without a result; "
                                   f"see {job.paths.stdout} and {job.paths.stderr}")
        time.sleep(poll_s)
    return job.results()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        jobs, params = plan(args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError
        print(f"launch.submit: {e}", file=sys.stderr)
        return 2
    layout = (f"{args.nodes} node(s) x {params['tasks_per_node']} "
              f"{'CPU process(es)' if jobs[0].device == 'cpu' else 'GPU(s)'}")
    for i, job in enumerate(jobs):
        print(f"run {i}: {Path(job.config).name} {redact(' '.join(job.overrides))}")  # no passwords in URIs
    if args.dry_run:
        print(f"dry run: {len(jobs)} run(s) on {layout} each; nothing submitted")
        return 0
    executor = make_executor(args, params)
    submitted = submit(jobs, executor)
    for i, sj in enumerate(submitted):
        print(f"submitted run {i} as job {sj.job_id} ({layout}); logs: {sj.paths.stdout.parent}")
    if not args.wait:
        return 0
    failed = 0
    for i, sj in enumerate(submitted):
        try:
            result = wait_for(sj)[0]
            print(f"run {i} (job {sj.job_id}): {json.dumps(result)}")
        except Exception as e:  # noqa: BLE001 - report every run, then fail
            failed += 1
            print(f"run {i} (job {sj.job_id}) failed: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    # Run through the importable module, so that submitit pickles launch.submit.TrainJob by reference.
    from launch.submit import main as _main

    sys.exit(_main())
