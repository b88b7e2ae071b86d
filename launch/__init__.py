"""Launchers: `python -m launch.submit` (submitit, SLURM or local) and `launch/torchrun.sh` (one node).

The sbatch scripts live in slurm/; docs/cluster.md describes all three paths.
"""
