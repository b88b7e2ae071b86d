#!/bin/bash
# Pretrain the 3B preset (configs/3b.yaml) on 8 nodes x 8 H100/H200 GPUs.
#   mkdir -p logs && sbatch slurm/pretrain_3b.sh [section.key=value ...]      (from the repository root)
# sbatch options on the command line win over these lines (sbatch --nodes=2 --time=4:00:00 ...).
# Preemption/time-limit: checkpoint on USR1 and requeue; resubmitting resumes from <run_dir>. docs/cluster.md
#SBATCH --job-name=cx-3b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append

# sbatch runs a copy of this file from its spool folder: find the repository from the submit folder
# (or the script path SLURM recorded).
for _r in "${COMPLEXITY_ROOT:-}" "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.." "${BASH_SOURCE[0]%/*}/.." \
  "$(scontrol show job -o "${SLURM_JOB_ID:-0}" 2>/dev/null | grep -o 'Command=[^ ]*' | sed 's|^Command=||; s|/slurm/[^/]*$||')"; do
  [[ -f $_r/slurm/common.sh ]] && break
done
source "$_r/slurm/common.sh" || { echo "cannot find slurm/common.sh: set COMPLEXITY_ROOT" >&2; exit 4; }
cx_run gpu configs/3b.yaml "$@"
