#!/bin/bash
# Launch main.py on a SLURM cluster: one process per GPU through accelerate, extra arguments passed to main.py.
#
#   sbatch train.sh --preset paper                      # one node, the GPUs of --gres
#   sbatch --nodes=2 train.sh --preset paper            # several nodes (one launcher per node)
#   sbatch --gres=none --partition=cpu train.sh         # CPU-only nodes: the demo preset
#   PROJECT_DIR=/path/to/slm-ensembles VENV=/path/to/venv sbatch train.sh ...
#
# Every #SBATCH line below can be overridden on the sbatch command line. logs/ must exist before submission
# (SLURM opens the output file before this script runs): `mkdir -p logs`.
#SBATCH --job-name=slm-ensembles
#SBATCH --output=logs/%x_%j.out
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
# --signal: 5 minutes before the time limit SLURM sends SIGUSR1; main.py checkpoints at the next step and exits
# with code 75, and this script requeues the job. The requeued job (same job id) resumes the same run folder.
set -uo pipefail

# sbatch runs a copy of this script from a spool folder: find the project from the submission folder instead.
PROJECT_DIR=${PROJECT_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")" && pwd)}}
VENV=${VENV:-$PROJECT_DIR/.venv}
cd "$PROJECT_DIR"
mkdir -p logs
if [ -f "$VENV/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
fi

NUM_NODES=${SLURM_NNODES:-1}
GPUS_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
MAIN_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || echo localhost)
MAIN_PORT=${MAIN_PORT:-29500}
CPU_FLAG=$(python -c "import torch; print('' if torch.cuda.is_available() else '--cpu')")

# One launcher per node; accelerate starts one process per GPU and wires the nodes together.
srun --ntasks-per-node=1 bash -c "accelerate launch $CPU_FLAG \
  --num_machines $NUM_NODES --machine_rank \$SLURM_NODEID --num_processes $((NUM_NODES * GPUS_PER_NODE)) \
  --main_process_ip $MAIN_ADDR --main_process_port $MAIN_PORT \
  main.py --job_id ${SLURM_JOB_ID:-local} $(printf '%q ' "$@")"
status=$?
if [ "$status" -eq 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "preempted: requeueing job $SLURM_JOB_ID to resume its run"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
