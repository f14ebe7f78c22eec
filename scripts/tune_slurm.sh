#!/bin/bash
# A hyperparameter search spread over a SLURM job array: every array task is one worker of the
# same Optuna study (same --study_name and --storage), each running its share of the trials.
#
#   sbatch --array=0-7 scripts/tune_slurm.sh          # 8 workers x TRIALS_PER_TASK trials
#
# The storage must be reachable from every node: a database server (PostgreSQL/MySQL URL) is
# safest; a SQLite file on a shared file system works for a few workers (file locking permitting).
#SBATCH --job-name=vpr-tune
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=logs/slurm_%A_%a.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
mkdir -p logs

STORAGE="${STORAGE:-sqlite:///$PWD/logs/vpr_tune.db}"
STUDY="${STUDY:-vpr_tune_${SLURM_ARRAY_JOB_ID:-local}}"
TRIALS_PER_TASK="${TRIALS_PER_TASK:-4}"
PYTHON="${PYTHON:-.venv/bin/python}"

export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-4}"
"$PYTHON" tune_vpr.py --config config.toml --storage "$STORAGE" --study_name "$STUDY" \
    --n_trials "$TRIALS_PER_TASK" --n_jobs 1 --sampler_seed "$((1000 + ${SLURM_ARRAY_TASK_ID:-0}))"
