#!/bin/bash
# The tiny preset (configs/tiny.yaml) on CPU processes (gloo): for tests, laptops and trying the cluster path.
#   mkdir -p logs && sbatch slurm/pretrain_tiny.sh [section.key=value ...]      (from the repository root)
#   NPROC_PER_NODE=4 sbatch --cpus-per-task=4 slurm/pretrain_tiny.sh ...        (processes per node, default 2)
#   bash slurm/pretrain_tiny.sh ...                                              (no SLURM: torchrun --standalone)
# Same batch logic as the GPU scripts (slurm/common.sh): USR1 -> checkpoint -> requeue -> resume. docs/cluster.md
#SBATCH --job-name=cx-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@60
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append

# sbatch runs a copy of this file from its spool folder: find the repository from the submit folder
# (or the script path SLURM recorded).
for _r in "${COMPLEXITY_ROOT:-}" "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.." "${BASH_SOURCE[0]%/*}/.." \
  "$(scontrol show job -o "${SLURM_JOB_ID:-0}" 2>/dev/null | grep -o 'Command=[^ ]*' | sed 's|^Command=||; s|/slurm/[^/]*$||')"; do
  [[ -f $_r/slurm/common.sh ]] && break
done
source "$_r/slurm/common.sh" || { echo "cannot find slurm/common.sh: set COMPLEXITY_ROOT" >&2; exit 4; }
cx_run cpu configs/tiny.yaml "$@"
