#!/bin/bash
# Multi-node training: 8 nodes x 4 GPUs, one process per GPU, torch.distributed over NCCL.
# Either backend; the ranks form data-parallel replicas, and each replica generates, scores
# and trains its own share of every step's groups (train.prompts_per_step must divide over
# them; docs/architecture.md, "Data-parallel rollouts"):
#
#   sbatch slurm/train_8node.sh configs/my_run.yaml train.backend=megatron \
#       train.megatron.tensor_parallel=4        # 8 replicas of TP=4 (one per node)
#   sbatch slurm/train_8node.sh configs/my_run.yaml train.backend=hf
#                                               # 32 replicas, FSDP2 over all ranks
#   ... rollout.engine=vllm                     # one vLLM engine per replica, TP as trained
#
# Every rank gets SIGUSR1 ten minutes before the time limit; the ranks agree to stop after the
# same step, write a checkpoint, and rank 0 requeues the job, which resumes from it
# (train.resume=auto). Another node count: sbatch --nodes=N slurm/train_8node.sh ...
# (A --time of 10 minutes or less gets that warning at once, before the ranks can catch it.)
# Site specifics: the #SBATCH lines below (or the sbatch command line: -p PARTITION -A ACCOUNT)
# and the variables in the "site" block.
# Without GPUs (CPU processes, gloo; e.g. tools/local_slurm.sh's 2 nodes, the tiny demo model):
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 --mem=4G \
#       slurm/train_8node.sh configs/demo_cpu.yaml train.backend=megatron \
#       train.megatron.tensor_parallel=2        # one replica spanning both nodes
#   (train.backend=hf or megatron at TP=1: two replicas, each node rolls out half a step)
#SBATCH --job-name=evr1-train
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=evr1-train-%j.out
set -euo pipefail

# ---- site ------------------------------------------------------------------------------
# Module loads / venv activation, e.g. "module load cuda/12.4; source ~/venvs/evr1/bin/activate"
EVR1_SETUP=${EVR1_SETUP:-true}
# Network interface for NCCL's bootstrap and socket traffic (ib0, hsn0, ...); empty: NCCL picks.
NCCL_IFNAME=${NCCL_IFNAME:-}
# InfiniBand adapters NCCL may use (e.g. mlx5_0,mlx5_1); empty: all it finds.
NCCL_HCA=${NCCL_HCA:-}
# Compute nodes usually have no internet: never try to download models or tokenizers.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# -----------------------------------------------------------------------------------------

CONFIG=${1:?usage: sbatch slurm/train_8node.sh CONFIG [key.sub=value ...]}
shift
eval "$EVR1_SETUP"
cd "${SLURM_SUBMIT_DIR:-.}"

# torch.distributed rendezvous: the first node of the allocation hosts the store, reached at
# the address Slurm itself uses for that node (its NodeAddr; the node name where scontrol
# cannot say). EVR1_MASTER_ADDR / EVR1_MASTER_PORT override both.
FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
NODE_ADDR=$(scontrol show node "$FIRST_NODE" -o 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
MASTER_ADDR=${EVR1_MASTER_ADDR:-${NODE_ADDR:-$FIRST_NODE}}
MASTER_PORT=${EVR1_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}  # per job: no collisions
WORLD_SIZE=$SLURM_NTASKS
export MASTER_ADDR MASTER_PORT WORLD_SIZE

export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# A rank that dies must fail the collective instead of hanging every other rank until the
# time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Megatron's tensor-parallel communication overlap relies on one CUDA work queue.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
if [[ -n $NCCL_IFNAME ]]; then
    export NCCL_SOCKET_IFNAME=$NCCL_IFNAME GLOO_SOCKET_IFNAME=$NCCL_IFNAME
fi
if [[ -n $NCCL_HCA ]]; then
    export NCCL_IB_HCA=$NCCL_HCA
fi

echo "evr1-train: job $SLURM_JOB_ID, start $((${SLURM_RESTART_COUNT:-0} + 1)):" \
     "$SLURM_JOB_NUM_NODES nodes ($SLURM_JOB_NODELIST), $WORLD_SIZE ranks," \
     "master $MASTER_ADDR:$MASTER_PORT"

# One process per GPU. RANK / LOCAL_RANK differ per task, so they are set inside the task
# (single quotes: expanded by each task's shell, not here). --kill-on-bad-exit: one failed rank
# ends the step rather than leaving the others waiting in a collective.
srun --kill-on-bad-exit=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" \
    bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID
             echo "evr1-rank $RANK/$WORLD_SIZE: node $SLURMD_NODENAME (node id $SLURM_NODEID," \
                  "host $(hostname)), local rank $LOCAL_RANK"
             exec python launchers/train.py "$@"' evr1-rank --config "$CONFIG" "$@"
