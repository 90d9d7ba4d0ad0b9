#!/bin/bash
# Multi-node fine-tuning under SLURM: one torchrun per node, 8 GPUs each, FSDP2 over all of them.
#   sbatch examples/slurm_multinode.sh examples/squad_llama3.1_8b_full.yaml [--section.field=value ...]
# The run folder (logging.run_dir) must be on a file system every node sees: each rank writes its
# shards of the checkpoints there. Re-submitting with --resume continues from the newest complete one.
#SBATCH --job-name=fastft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=04:00:00
#SBATCH --signal=TERM@120          # SIGTERM two minutes before the limit: fastft checkpoints and exits
set -euo pipefail
RECIPE=${1:?usage: sbatch examples/slurm_multinode.sh RECIPE.yaml [overrides]}; shift
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=8
srun torchrun \
  --nnodes "$SLURM_NNODES" --nproc_per_node 8 \
  --rdzv-backend c10d --rdzv-id "$SLURM_JOB_ID" --rdzv-endpoint "$HEAD_NODE:29500" \
  -m fastft.cli train "$RECIPE" --resume "$@"
