#!/bin/bash
# Preprocess as a plain Slurm job array, for users who don't use the Python launchers:
#
#   sbatch --array=0-15%8 slurm/preprocess.sh configs/my_run.yaml [key.sub=value ...]
#
# Each array task decodes its slice of the media files into one HDF5 shard. The number of
# tasks is taken from the array (it overrides preprocess.num_tasks), and whichever task finishes
# last merges the manifest. Re-submitting the same array skips finished tasks.
# Site specifics: edit the #SBATCH lines or pass them on the sbatch command line
# (sbatch -p PARTITION -A ACCOUNT ...); module loads / venv activation go in EVR1_SETUP.
#SBATCH --job-name=evr1-preprocess
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=evr1-preprocess-%A_%a.out
#SBATCH --requeue
set -euo pipefail

CONFIG=${1:?usage: sbatch --array=0-N%P slurm/preprocess.sh CONFIG [key.sub=value ...]}
shift
: "${SLURM_ARRAY_TASK_ID:?submit this script with sbatch --array=0-(N-1)}"
eval "${EVR1_SETUP:-true}"   # e.g. EVR1_SETUP="module load python; source venv/bin/activate"

cd "${SLURM_SUBMIT_DIR:-.}"
exec python launchers/preprocess.py --config "$CONFIG" --task "$SLURM_ARRAY_TASK_ID" \
    preprocess.num_tasks="$SLURM_ARRAY_TASK_COUNT" "$@"
