#!/bin/bash
# One node, no SLURM needed: torchrun over all this machine's GPUs, or NPROC CPU processes (gloo).
#
#   launch/torchrun.sh CONFIG [section.key=value ...]
#   launch/torchrun.sh configs/pretrain_1b.yaml train.steps=1000     # every GPU nvidia-smi -L lists
#   NPROC=4 launch/torchrun.sh configs/150m.yaml                      # the first 4 GPUs' worth of processes
#   NPROC=2 launch/torchrun.sh configs/tiny.yaml                      # no GPU (or COMPLEXITY_DEVICE=cpu): 2 CPU processes
#
# Environment: NPROC (processes; default all GPUs, or 1 on CPU), COMPLEXITY_DEVICE=gpu|cpu (default: gpu when
# nvidia-smi lists one), COMPLEXITY_PYTHON (default .venv/bin/python, else tools/run python), OMP_NUM_THREADS
# (default cores / NPROC). NCCL defaults and NVLink multicast off as in slurm/common.sh.
# Stopping: `kill -USR1 <pid of this script>` makes the workers finish their step, checkpoint and exit; the
# script then exits 99. Run the same command again (same train.run_dir) to resume. SIGTERM goes to torchrun
# (it passes it to the workers, which also checkpoint, but it kills them after its shutdown timeout, 30 s).
set -uo pipefail
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 0
fi
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/slurm/common.sh" || exit 4
config=$1; shift
device="${COMPLEXITY_DEVICE:-}"
if [[ -z $device ]]; then
  if (( $(cx_gpu_count) > 0 )); then device=gpu; else device=cpu; fi
fi
[[ $device == gpu || $device == cpu ]] || cx_die "$CX_EXIT_SETUP" "COMPLEXITY_DEVICE=$device: use gpu or cpu"
cx_setup "$config"
cx_run_local "$device" "$CX_CONFIG" "$@"
