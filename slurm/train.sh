#!/bin/bash
# Training as one single-node Slurm job that survives time limits and preemption:
#
#   sbatch slurm/train.sh configs/my_run.yaml [key.sub=value ...]
#
# Five minutes before the time limit (or on `scancel --signal=USR1 --batch JOBID`) Slurm sends
# SIGUSR1. The trainer finishes its current step, writes a checkpoint and requeues the job
# (`scontrol requeue`); the requeued job keeps its id and resumes from that checkpoint
# (train.resume=auto), so a long run becomes a chain of time-limited pieces and loses no step.
# SIGTERM (scancel, preemption) checkpoints and stops without requeueing.
# Site specifics: edit the #SBATCH lines or pass them on the sbatch command line
# (sbatch -p PARTITION -A ACCOUNT --gpus-per-node=1 ...); module loads / venv activation go in
# EVR1_SETUP. Several nodes (Megatron TP/PP): slurm/train_8node.sh.
#SBATCH --job-name=evr1-train
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=evr1-train-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch slurm/train.sh CONFIG [key.sub=value ...]}
shift
eval "${EVR1_SETUP:-true}"   # e.g. EVR1_SETUP="module load python; source venv/bin/activate"

cd "${SLURM_SUBMIT_DIR:-.}"
# Threads for the CPUs Slurm gave this job, not for every core of a shared node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
echo "evr1-train: job ${SLURM_JOB_ID:-none}, start $((${SLURM_RESTART_COUNT:-0} + 1)) on" \
     "$(hostname) at $(date -Is)"
# exec: python becomes the batch shell, so the B:USR1 warning reaches the trainer itself.
exec python launchers/train.py --config "$CONFIG" "$@"
