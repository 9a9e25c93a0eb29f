#!/bin/bash
# Launch main.py on a SLURM cluster: one process per GPU through accelerate; extra arguments go to main.py.
#
#   mkdir -p logs                                       # SLURM opens logs/... before this script runs
#   sbatch train.sh --preset paper --total_rounds 8     # one node, the GPUs of --gres
#   sbatch --gres=gpu:4 train.sh --preset paper         # more GPUs: DDP, one process each
#   sbatch --nodes=2 train.sh --preset paper            # several nodes: one launcher per node
#   sbatch --gres=none --partition=cpu train.sh         # CPU-only nodes (the demo preset)
#   sbatch --gres=none --partition=cpu --cpus-per-task=16 train.sh --preset paper --prepare_only
#                                                       # big data: tokenize it first on CPUs, then the GPU job
#   sbatch --array=0-2 train.sh --sweep seed=0,1,2 --preset paper      # one run folder per array task
#   sbatch --array=0-3 train.sh --sweep alpha=0.2,0.5,0.8,1.0 --preset paper
#
# Every #SBATCH line below is a default that the sbatch command line overrides (sbatch --time=2:00:00 ...).
# The project and its environment are found from the submission folder, or from PROJECT_DIR and VENV:
#   PROJECT_DIR=/path/to/slm-ensembles VENV=/path/to/venv sbatch /path/to/slm-ensembles/train.sh ...
#
# Time limits and preemption: 5 minutes before the limit SLURM sends SIGUSR1 to this script (--signal=B:...),
# which passes it to main.py; main.py checkpoints at the next step and exits, and this script requeues the job.
# A preemption's SIGTERM to this script is handled the same way, unless the job is being cancelled (scancel JOB):
# then main.py checkpoints and stops, and the job is not requeued (resume it later with main.py --resume RUN_DIR).
# The requeued job keeps its job id, and main.py --job_id finds and resumes the run folder it started.
#SBATCH --job-name=slm-ensembles
#SBATCH --output=logs/%x_%j.out
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
set -uo pipefail

# sbatch runs a copy of this script from a spool folder, so $0 does not locate the project under SLURM.
PROJECT_DIR=${PROJECT_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")" && pwd)}}
VENV=${VENV:-$PROJECT_DIR/.venv}
mkdir -p logs  # for the next submission from this folder
cd "$PROJECT_DIR" || exit 1
if [ -f "$VENV/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
fi

# --sweep KEY=V0,V1,...: array task i runs with --KEY Vi (each task makes its own run folder).
args=()
sweep=""
while [ $# -gt 0 ]; do
  if [ "$1" = "--sweep" ]; then sweep=${2:?--sweep needs KEY=V0,V1,...}; shift 2; else args+=("$1"); shift; fi
done
if [ -n "$sweep" ]; then
  task=${SLURM_ARRAY_TASK_ID:?--sweep needs an array job: sbatch --array=0-N train.sh --sweep KEY=V0,...}
  IFS=, read -ra values <<<"${sweep#*=}"
  if [ "$task" -ge "${#values[@]}" ]; then
    echo "error: array task $task but --sweep lists ${#values[@]} values: ${sweep}" >&2
    exit 2
  fi
  args+=("--${sweep%%=*}" "${values[$task]}")
  echo "sweep: array task $task runs with --${sweep%%=*} ${values[$task]}"
fi
if [ -n "${SLURM_JOB_ID:-}" ]; then
  args+=(--job_id "$SLURM_JOB_ID")  # a requeued job resumes the run folder this job id started
fi

# One process per GPU on each node (one on CPU-only nodes); several in all means DDP.
gpus_per_node=$(python -c "import torch; print(torch.cuda.device_count())")
processes_per_node=${PROCESSES_PER_NODE:-$((gpus_per_node > 0 ? gpus_per_node : 1))}
nodes=${SLURM_NNODES:-1}
launch=(--num_machines "$nodes" --num_processes $((nodes * processes_per_node)))
if [ $((nodes * processes_per_node)) -gt 1 ]; then
  main_address=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)
  launch+=(--config_file accelerate_configs/ddp.yaml --main_process_ip "${main_address:-localhost}"
           --main_process_port "${MAIN_PORT:-29500}")
else
  launch+=(--config_file accelerate_configs/single_gpu.yaml)
fi

# The warning signals go to main.py only: the launchers between here and main.py ignore them (an ignored signal
# stays ignored across exec and fork; main.py installs its own handler), so none of them dies of one and takes
# main.py down halfway through its checkpoint. A signal to this script marks the job for requeueing: the launcher
# turns main.py's exit code 75 ("preempted") into 1, so that code alone cannot tell a preemption from a failure.
# A cancelled job gets SIGTERM too, but is already COMPLETING (a preempted one is RUNNING until its grace time ends):
# requeueing it would undo the cancel.
warned=0
pass_on_warning() {  # $1: the signal
  if [ "$1" = TERM ] && squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null | grep -qE 'COMPLETING|CANCELLED'; then
    echo "job cancelled: asking main.py to checkpoint and stop; not requeueing (resume with main.py --resume)"
  else
    warned=1
    echo "time limit or preemption warning ($1): asking main.py to checkpoint and stop"
  fi
  scancel --signal=USR1 "$SLURM_JOB_ID"  # every process of the job's steps (not this script)
}
trap 'pass_on_warning USR1' USR1
trap 'pass_on_warning TERM' TERM

srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \
  'trap "" USR1 TERM; exec python -m accelerate.commands.launch --machine_rank "${SLURM_NODEID:-0}" "$@"' \
  launcher "${launch[@]}" main.py "${args[@]}" &
launcher=$!
wait "$launcher"
status=$?
while kill -0 "$launcher" 2>/dev/null; do  # a trapped signal interrupts `wait`: keep waiting
  wait "$launcher"
  status=$?
done

if [ "$status" -ne 0 ] && [ "$warned" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "stopped for the time limit or preemption: requeueing job $SLURM_JOB_ID to resume its run"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
