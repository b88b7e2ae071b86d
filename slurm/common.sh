# Shared logic of the slurm/pretrain_*.sh batch scripts and launch/torchrun.sh. Sourced, never run.
#
#   cx_run gpu|cpu CONFIG [section.key=value ...]
#
# Inside a SLURM allocation (SLURM_JOB_ID set): one srun task per node, each running torchrun with a c10d
# rendezvous on the first node of the allocation; the batch shell traps the preemption warning
# (USR1, from `#SBATCH --signal=B:USR1@<sec>` or `scancel --signal=USR1 --batch`), forwards it to the
# job step, waits for the trainer to checkpoint and exit, and requeues the job (`scontrol requeue`); the
# requeued job resumes from <run_dir>/checkpoints/latest. Outside SLURM: torchrun --standalone on this
# machine (what launch/torchrun.sh does). See docs/cluster.md for the whole story and the exit codes.
#
# Environment knobs (all optional):
#   COMPLEXITY_ROOT           the repository (found from SLURM_SUBMIT_DIR or this file otherwise)
#   COMPLEXITY_PYTHON         the Python command, e.g. "/opt/envs/cx/bin/python" or "tools/run python"
#                             (default: .venv/bin/python of the repository, else tools/run python)
#   NPROC_PER_NODE            processes per node (gpu: SLURM_GPUS_ON_NODE or the GPUs nvidia-smi lists;
#                             cpu: 2 in a SLURM job, 1 otherwise)
#   MASTER_PORT               rendezvous port on the first node (default 20000 + job id % 20000)
#   COMPLEXITY_MAX_REQUEUES   stop requeueing after this many restarts (default 50)
#   COMPLEXITY_RANK_LOGS      1 (default): per-rank stdout/stderr files under logs/<job>-<id>/; 0: off
#   COMPLEXITY_LOG_DIR        where the per-rank logs go (default: <repo>/logs)

# Exit codes of cx_run (the batch job's exit code when it is not requeued)
CX_EXIT_OK=0
CX_EXIT_CONFIG=2       # bad config or overrides: rejected before any process starts
CX_EXIT_SETUP=4        # the Python environment or the repository could not be found (3 is the trainer's "diverged")
CX_EXIT_REQUEUE=99     # stopped for preemption after a checkpoint (== complexity_dist.train.faults.EXIT_REQUEUE)

# Passwords in URIs (tracking.uri=http://user:pass@host overrides) are masked: user:***@, ***@.
cx_log() {
  echo "[complexity $(date +%H:%M:%S)] $*" |
    sed -E 's#(://[^:/@[:space:]]*):[^@/[:space:]]*@#\1:***@#g; s#://[^:/@[:space:]]+@#://***@#g' >&2
}

cx_die() { local code=$1; shift; cx_log "error: $*"; exit "$code"; }

# The repository root: COMPLEXITY_ROOT, else the parent of the folder holding this file (callers source it
# by its real path: the batch scripts locate it from SLURM_SUBMIT_DIR, since sbatch runs a spool copy).
cx_find_root() {
  local cand="${COMPLEXITY_ROOT:-$(dirname "${BASH_SOURCE[0]}")/..}"
  if [[ -f $cand/slurm/common.sh && -d $cand/complexity_dist ]]; then
    (cd "$cand" && pwd)
  else
    return 1
  fi
}

# PY: the Python command as an array.
cx_find_python() {
  if [[ -n ${COMPLEXITY_PYTHON:-} ]]; then
    read -r -a PY <<<"$COMPLEXITY_PYTHON"
  elif [[ -x $CX_ROOT/.venv/bin/python ]]; then
    PY=("$CX_ROOT/.venv/bin/python")
  else
    PY=("$CX_ROOT/tools/run" python)
  fi
}

# Threading, NCCL and tool defaults; the user's environment wins except for NVLink multicast.
cx_env_defaults() {
  local device=$1 nproc=$2 cpus=$3
  local threads=$(( cpus / nproc ))
  (( threads >= 1 )) || threads=1
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$threads}"
  export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"
  export PYTHONUNBUFFERED=1
  export PYTHONFAULTHANDLER=1
  export MLFLOW_ALLOW_FILE_STORE="${MLFLOW_ALLOW_FILE_STORE:-true}"
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$CX_ROOT/.cache/torch_extensions}"
  if [[ $device == cpu ]]; then
    export CUDA_VISIBLE_DEVICES=""  # CPU processes (gloo) even on a GPU node
  else
    # A hung or failed collective raises in every rank instead of hanging the job until its time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-$TORCH_NCCL_ASYNC_ERROR_HANDLING}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  fi
  # Never NVLink multicast (NVLS): it is unreliable on the clusters we run on and must stay off.
  if [[ -n ${NCCL_NVLS_ENABLE:-} && $NCCL_NVLS_ENABLE != 0 ]]; then
    cx_log "warning: NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE ignored: NVLink multicast stays off (NCCL_NVLS_ENABLE=0)"
  fi
  export NCCL_NVLS_ENABLE=0
}

cx_gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

# How torchrun is started: `"${PY[@]}" "${CX_TORCHRUN[@]}" <torchrun arguments>`. A bootstrap that gives
# torchrun a no-op SIGUSR1 handler, so that a USR1 delivered to every process of the job step (what SLURM
# does) stops only the workers: they checkpoint and exit 99 in their own time. A Python handler (unlike
# SIG_IGN) is not inherited across exec, so the workers start with the default action until the trainer
# installs its own. Not `torchrun --signals-to-handle=...,SIGUSR1`: torchrun would then kill the workers 30 s
# after forwarding the signal (torch 2.11 has no --shutdown-timeout), which can cut a checkpoint short.
CX_TORCHRUN=(-c 'import runpy, signal, sys
signal.signal(signal.SIGUSR1, lambda signum, frame: None)
sys.argv[0] = "torchrun"
runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)')

cx_torchrun_common() {
  TR_COMMON=(--max-restarts=0)
}

# Send a signal to the worker processes of the torchrun whose pid is $2 (its direct children; read from
# /proc, so that no procps is needed).
cx_signal_workers() {
  local sig=$1 parent=$2 stat line ppid pid
  local -a pids=()
  for stat in /proc/[0-9]*/stat; do
    read -r line 2>/dev/null < "$stat" || continue
    read -r _ ppid _ <<<"${line##*) }"   # fields after "pid (comm) ": state ppid ...
    if [[ $ppid == "$parent" ]]; then
      pid=${stat#/proc/}
      pids+=("${pid%/stat}")
    fi
  done
  (( ${#pids[@]} )) && kill "-$sig" "${pids[@]}" 2>/dev/null
  return 0
}

# Preflight: `complexity-dist info --preflight` validates config + overrides + layout, the data shards and the
# checkpoint to resume (and prints the model, layout and memory summary into the log) before any process
# group starts. COMPLEXITY_PREFLIGHT=0 skips it.
cx_preflight() {
  local world=$1; shift
  local rc=0
  [[ ${COMPLEXITY_PREFLIGHT:-1} == 0 ]] && return 0
  "${PY[@]}" -m complexity_dist info "$@" --world-size "$world" --preflight || rc=$?
  (( rc == 0 )) && return 0
  (( rc == 2 )) && cx_die "$CX_EXIT_CONFIG" "the configuration was rejected (see above); nothing was started"
  cx_die "$CX_EXIT_SETUP" "'${PY[*]} -m complexity_dist info' failed (exit $rc): is the environment installed?" \
    "(tools/run sets up .venv; or set COMPLEXITY_PYTHON)"
}

# ------------------------------------------------------------------------------------------------- main
CX_SIGNAL=""     # the first of USR1/TERM this shell received
CX_SRUN_PID=""
cx_run() {
  local device=$1 config=$2; shift 2
  cx_setup "$config"
  if [[ -n ${SLURM_JOB_ID:-} ]]; then
    cx_run_slurm "$device" "$CX_CONFIG" "$@"
  else
    cx_run_local "$device" "$CX_CONFIG" "$@"
  fi
}

# CX_ROOT (and cd there), PY, CX_CONFIG (made absolute when it names a file relative to the caller's folder;
# otherwise it is relative to the repository).
cx_setup() {
  local config=$1
  set -uo pipefail
  if [[ -f $config && $config != /* ]]; then
    config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
  fi
  CX_ROOT="$(cx_find_root)" || cx_die "$CX_EXIT_SETUP" \
    "cannot find the repository: submit from its root (sbatch slurm/...) or set COMPLEXITY_ROOT"
  export COMPLEXITY_ROOT="$CX_ROOT"
  cd "$CX_ROOT" || cx_die "$CX_EXIT_SETUP" "cannot cd to $CX_ROOT"
  [[ -f $config ]] || cx_die "$CX_EXIT_CONFIG" "config $config not found (relative paths: from $CX_ROOT)"
  CX_CONFIG=$config
  cx_find_python
}

# One machine, no SLURM: torchrun --standalone. USR1 to this shell is forwarded to the workers (they
# checkpoint and exit 99; torchrun then exits 1), TERM to torchrun (which passes it on to the workers).
cx_run_local() {
  local device=$1 config=$2; shift 2
  local nproc cpus tpid rc=0
  if [[ $device == gpu ]]; then
    nproc="${NPROC_PER_NODE:-${NPROC:-$(cx_gpu_count)}}"
    (( nproc >= 1 )) || cx_die "$CX_EXIT_SETUP" \
      "no GPU found (nvidia-smi -L); for CPU processes: COMPLEXITY_DEVICE=cpu NPROC=N launch/torchrun.sh ..."
  else
    nproc="${NPROC_PER_NODE:-${NPROC:-1}}"
  fi
  cpus="$(nproc 2>/dev/null || echo 1)"
  cx_env_defaults "$device" "$nproc" "$cpus"
  cx_preflight "$nproc" "$config" "$@"
  cx_torchrun_common
  cx_log "torchrun --standalone: $nproc $device process(es), OMP_NUM_THREADS=$OMP_NUM_THREADS: $config $*"
  "${PY[@]}" "${CX_TORCHRUN[@]}" --standalone --nnodes=1 --nproc-per-node="$nproc" "${TR_COMMON[@]}" \
    -m complexity_dist train "$config" "$@" &
  tpid=$!
  trap 'CX_SIGNAL=USR1; cx_log "SIGUSR1: asking the trainer to checkpoint and stop"; cx_signal_workers USR1 '"$tpid" USR1
  trap 'kill -TERM '"$tpid"' 2>/dev/null' TERM
  while true; do
    wait "$tpid"; rc=$?
    kill -0 "$tpid" 2>/dev/null || break
  done
  wait "$tpid" 2>/dev/null; rc=$?
  if [[ $CX_SIGNAL == USR1 && $rc != 0 ]]; then
    cx_log "stopped after SIGUSR1 (torchrun exit $rc): run the same command again to resume from the checkpoint"
    exit "$CX_EXIT_REQUEUE"
  fi
  exit "$rc"
}


cx_on_signal() {
  local sig=$1
  [[ -n $CX_SIGNAL ]] || CX_SIGNAL=$sig
  if [[ $sig == USR1 ]]; then
    cx_log "SIGUSR1 (preemption or time-limit warning): asking the trainer to checkpoint, then requeueing"
    # srun forwards the signal to every process of the step: the workers (the trainer stops at the end
    # of its step, saves, exits 99) and torchrun (which ignores it, see CX_TORCHRUN).
    [[ -n $CX_SRUN_PID ]] && kill -USR1 "$CX_SRUN_PID" 2>/dev/null
  else
    # SLURM is ending the job (scancel, time limit, preemption in REQUEUE mode): it signals the job
    # steps itself (TERM, then KILL after KillWait); the trainer checkpoints on TERM if it has time.
    cx_log "SIG$sig: the job is being ended by SLURM; waiting for the trainer to checkpoint"
  fi
}

cx_run_slurm() {
  local device=$1 config=$2; shift 2
  local nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
  local cpus="${SLURM_CPUS_PER_TASK:-$(nproc)}"
  local restarts="${SLURM_RESTART_COUNT:-0}"
  local nproc head port rc=0 rank_logs=""
  if [[ $device == gpu ]]; then
    nproc="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(cx_gpu_count)}}"
    nproc="${nproc##*:}"   # "h100:8" style
    (( nproc >= 1 )) || cx_die "$CX_EXIT_SETUP" "no GPUs in this allocation (ask for --gpus-per-node)"
  else
    nproc="${NPROC_PER_NODE:-${NPROC:-2}}"
  fi
  head="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
  port="${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"

  trap 'cx_on_signal USR1' USR1
  trap 'cx_on_signal TERM' TERM
  cx_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) attempt $((restarts + 1)) on $nodes node(s) [$SLURM_JOB_NODELIST]:" \
         "$nproc $device process(es)/node, rendezvous $head:$port, repo $CX_ROOT, python ${PY[*]}"
  cx_log "config $config, overrides: ${*:-(none)}"

  cx_env_defaults "$device" "$nproc" "$cpus"
  cx_preflight $(( nodes * nproc )) "$config" "$@"

  local -a srun_args=(--nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
  # srun (>= 22.05) does not inherit --cpus-per-task from the batch allocation.
  [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  local -a tr_args=(--nnodes="$nodes" --nproc-per-node="$nproc"
    --rdzv-backend=c10d --rdzv-endpoint="$head:$port" --rdzv-id="$SLURM_JOB_ID-$restarts")
  cx_torchrun_common
  tr_args+=("${TR_COMMON[@]}")
  if [[ ${COMPLEXITY_RANK_LOGS:-1} == 1 ]]; then
    rank_logs="${COMPLEXITY_LOG_DIR:-$CX_ROOT/logs}/${SLURM_JOB_NAME:-job}-$SLURM_JOB_ID"
    mkdir -p "$rank_logs"
    # <rank_logs>/<rdzv id>_<random>/attempt_0/<local rank>/{stdout,stderr}.log, and on the console too
    tr_args+=(--log-dir="$rank_logs" --tee=3)
  fi

  if [[ -z $CX_SIGNAL ]]; then
    srun "${srun_args[@]}" "${PY[@]}" "${CX_TORCHRUN[@]}" "${tr_args[@]}" \
      -m complexity_dist train "$config" "$@" &
    CX_SRUN_PID=$!
    # `wait` returns early when a trapped signal arrives: keep waiting until srun itself has ended.
    while true; do
      wait "$CX_SRUN_PID"; rc=$?
      kill -0 "$CX_SRUN_PID" 2>/dev/null || break
    done
    wait "$CX_SRUN_PID" 2>/dev/null; rc=$?   # the step's status, not that of an interrupted wait
    CX_SRUN_PID=""
  else
    rc=$CX_EXIT_REQUEUE  # the warning came before the step started: nothing to save
  fi

  if [[ $CX_SIGNAL == USR1 ]]; then
    if (( rc == 0 )); then
      cx_log "the run finished before it was stopped: not requeueing"
      exit "$CX_EXIT_OK"
    fi
    local max="${COMPLEXITY_MAX_REQUEUES:-50}"
    if (( restarts >= max )); then
      cx_log "not requeueing: $restarts restarts already (COMPLEXITY_MAX_REQUEUES=$max)"
      exit "$CX_EXIT_REQUEUE"
    fi
    cx_log "step ended (exit $rc) after the stop request: requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint"
    trap '' TERM USR1  # `scontrol requeue` ends this shell with TERM
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit "$CX_EXIT_REQUEUE"
    fi
    cx_log "error: scontrol requeue failed (was the job submitted with --requeue / --no-requeue?)"
    exit "$CX_EXIT_REQUEUE"
  fi
  if [[ $CX_SIGNAL == TERM ]]; then
    cx_log "step ended (exit $rc) after SIGTERM"
    exit "$rc"
  fi
  if (( rc != 0 )); then
    cx_log "training failed (exit $rc); see the per-rank logs above${rank_logs:+ and in $rank_logs}"
  else
    cx_log "training finished"
  fi
  exit "$rc"
}
