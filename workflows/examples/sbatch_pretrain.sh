#!/bin/bash
# Multi-node DINOv2 pretraining on SLURM through Lightning: 2 nodes x 4 GPUs = 8 processes.
#
# SLURM starts one task per GPU (`srun` below); Lightning reads each process's rank and the world
# size from the SLURM variables, so --devices and --nodes must equal --ntasks-per-node and --nodes
# here. `--signal=SIGUSR1@120` lets Lightning save a checkpoint and requeue the job before the time
# limit (<output-dir>/hpc_ckpt_<n>.ckpt); the requeued fm-train resumes from the newest of that and
# <output-dir>/checkpoints/last.ckpt.
#
#   sbatch workflows/examples/sbatch_pretrain.sh
#
#SBATCH --job-name=fm-pretrain-pathology
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=8
#SBATCH --mem=256G
#SBATCH --time=48:00:00
#SBATCH --signal=SIGUSR1@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -euo pipefail

# adapt to the site: the environment with fm-suite installed, and where data and runs live
VENV=${VENV:-$HOME/fm-suite/.venv}
COHORT=${COHORT:-/data/cohorts/slides.csv}   # slide_id, patient_id, slide_path (absolute)
TILES=${TILES:-/scratch/$USER/fm/tiles}       # from `fm-prepare pathology ... --output-dir` or the pipeline
RUN_DIR=${RUN_DIR:-/scratch/$USER/fm/pretrain-$SLURM_JOB_ID}

source "$VENV/bin/activate"

# one SQLite writer on a network file system is safe only without concurrent writers: rank 0 alone
# logs, but prefer a tracking server (MLFLOW_TRACKING_URI=http://...) when the site has one
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$RUN_DIR/mlflow.db}
mkdir -p "$RUN_DIR"

# srun no longer inherits --cpus-per-task from sbatch (SLURM >= 22.05)
export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK

srun fm-train pathology \
    --cohorts "csv:$COHORT" \
    --tiles-dir "$TILES" \
    --output-dir "$RUN_DIR" \
    --devices 4 \
    --nodes 2 \
    --strategy ddp \
    --num-workers "$SLURM_CPUS_PER_TASK"
