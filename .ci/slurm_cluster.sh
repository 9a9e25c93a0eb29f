#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for testing train.sh: Debian's munge, slurmctld and slurmd,
# configured and started by hand (CI machines have no systemd). Needs root and apt-get.
#
#   .ci/slurm_cluster.sh up                 # install if needed, configure, start, wait until the node is idle
#   .ci/slurm_cluster.sh wait JOB [SECONDS] # wait for a job (following requeues); 0 only if it COMPLETED 0:0
#   .ci/slurm_cluster.sh down               # cancel every job and stop the daemons this script started
#
# The node advertises one fake GPU (a device file with /dev/null's numbers), so `#SBATCH --gres=gpu:1` is
# accepted unmodified; jobs see CUDA_VISIBLE_DEVICES=0 but no GPU, and must fall back to the CPU.
# Everything lives in $SLURM_CLUSTER_DIR (default /tmp/slurm-cluster) except the config, which slurm's clients
# read from /etc/slurm. Pitfalls this handles, each measured on these machines:
#   - `sbatch --wait` returns 0 for a job cancelled while pending, and hangs if the node is unusable: use `wait`;
#   - MinJobAge above ~5 s makes `sbatch --wait` poll every 32 s, and batch_sched_delay delays starts by 3 s;
#   - a GPU gres without device files is dropped by slurmd, which then drains the node;
#   - a daemon that has exited stays a zombie for a second or two: a zombie counts as stopped.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

STATE=${SLURM_CLUSTER_DIR:-/tmp/slurm-cluster}
CONF=/etc/slurm
MARK="# written by slurm_cluster.sh"
MUNGE_SOCKET=$STATE/munge/socket
export SLURM_CONF=$CONF/slurm.conf

say() { echo "[slurm_cluster] $*" >&2; }
fail() { say "error: $*"; exit 1; }

running_pid() {  # the pid in $STATE/run/$1.pid if that process is alive, is $1 and is not a zombie
  local pid
  pid=$(cat "$STATE/run/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
  echo "$pid"
}

retry() {  # seconds what command...: run command until it succeeds
  local seconds=$1 what=$2 tick
  shift 2
  for tick in $(seq 1 $((seconds * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  tail -n 5 "$STATE"/log/*.log >&2 || true
  fail "$what not ready after ${seconds}s"
}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null && return 0
  say "installing munge and slurm from Debian"
  export DEBIAN_FRONTEND=noninteractive
  local packages=(munge slurmctld slurmd slurm-client)
  apt-get install -y -q --no-install-recommends "${packages[@]}" >/tmp/slurm_cluster_apt.log 2>&1 || {
    apt-get update -q >>/tmp/slurm_cluster_apt.log 2>&1
    apt-get install -y -q --no-install-recommends "${packages[@]}" >>/tmp/slurm_cluster_apt.log 2>&1 \
      || { tail -n 20 /tmp/slurm_cluster_apt.log >&2; fail "apt-get install failed"; }
  }
}

write_config() {  # slurm.conf and gres.conf for this host; refuses to replace a config it did not write
  [ ! -e "$CONF/slurm.conf" ] || grep -qF "$MARK" "$CONF/slurm.conf" \
    || fail "$CONF/slurm.conf was not written by this script; not touching a real cluster's config"
  local host cpus memory
  host=$(hostname -s)
  cpus=$(nproc)
  memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  mkdir -p "$CONF" "$STATE/dev"
  [ -c "$STATE/dev/gpu0" ] || mknod -m 666 "$STATE/dev/gpu0" c 1 3
  cat >"$CONF/slurm.conf" <<EOF
$MARK
ClusterName=ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((memory / cpus))
MinJobAge=5
KillWait=5
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL Default=NO MaxTime=INFINITE State=UP
EOF
  printf '%s\nNodeName=%s Name=gpu File=%s/dev/gpu0\n' "$MARK" "$host" "$STATE" >"$CONF/gres.conf"
}

start_munge() {
  running_pid munged >/dev/null && return 0
  install -d -m 0755 -o munge -g munge "$STATE/munge"
  [ -s "$STATE/munge/key" ] || runuser -u munge -- mungekey --create --keyfile="$STATE/munge/key"
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/key" --origin=127.0.0.1 \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/seed"
  retry 10 munged munge --socket="$MUNGE_SOCKET" -n
  cp "$STATE/munge/munged.pid" "$STATE/run/munged.pid"
}

node_idle() { sinfo -h -N -o '%T' | grep -qE '^(idle|mixed|allocated)'; }

up() {
  install_packages
  mkdir -p "$STATE/run" "$STATE/log" "$STATE/state" "$STATE/spool"
  write_config
  start_munge
  if ! running_pid slurmctld >/dev/null; then
    slurmctld -i
    retry 20 slurmctld scontrol ping
  fi
  if ! running_pid slurmd >/dev/null; then
    slurmd
    retry 10 slurmd running_pid slurmd
  fi
  retry 30 "the node" node_idle
  say "up: $(sinfo -h -N -o '%N %c CPUs %m MB %G %T' | head -n 1)"
}

stop() {  # SIGTERM, then SIGKILL after 10 s; only processes named in our own pid files
  local name pid tick
  for name in "$@"; do
    pid=$(running_pid "$name") || continue
    kill -TERM "$pid" 2>/dev/null || true
    for tick in $(seq 1 50); do running_pid "$name" >/dev/null || break; sleep 0.2; done
    if running_pid "$name" >/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$STATE/run/$name.pid"
  done
}

down() {
  if running_pid slurmctld >/dev/null; then
    scancel --user=root 2>/dev/null || true
    for _ in $(seq 1 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  stop slurmd slurmctld munged
  say "down"
}

wait_for_job() {  # job [seconds]: wait while the job (every task of an array) is pending, running or requeued
  local job=${1:?usage: wait JOB [SECONDS]} seconds=${2:-900} start lines line job_state exit_code active failed
  start=$(date +%s)
  while :; do
    lines=$(scontrol -o show job "$job" 2>/dev/null || true)
    if [ -z "$lines" ]; then  # forgotten by slurmctld (MinJobAge): its last line in the completion log
      lines=$(grep "^JobId=$job " "$STATE/log/jobcomp.log" 2>/dev/null | tail -n 1 || true)
      [ -n "$lines" ] || fail "job $job is unknown"
    fi
    active=0
    failed=0
    while IFS= read -r line; do
      job_state=$(sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' <<<"$line")
      exit_code=$(sed -n 's/.*ExitCode=\([0-9:]*\).*/\1/p' <<<"$line")
      case "$job_state" in
        PENDING | RUNNING | CONFIGURING | COMPLETING | REQUEUED | REQUEUE_HOLD | RESIZING | SIGNALING | SUSPENDED)
          active=1 ;;
        COMPLETED) [ "$exit_code" = 0:0 ] || failed=1 ;;
        *) failed=1 ;;
      esac
    done <<<"$lines"
    if [ "$active" = 0 ]; then
      sed -n 's/^\(JobId=[0-9]*\).*\( ArrayTaskId=[^ ]*\).*\( JobState=[A-Z_]*\).*\( ExitCode=[0-9:]*\).*/\1\2\3\4/p; t; s/^\(JobId=[0-9]*\).*\( JobState=[A-Z_]*\).*\( ExitCode=[0-9:]*\).*/\1\2\3/p' <<<"$lines"
      return "$failed"
    fi
    if [ $(($(date +%s) - start)) -ge "$seconds" ]; then
      say "job $job still active after ${seconds}s: cancelling it"
      scancel "$job" || true
      return 124
    fi
    sleep 1
  done
}

[ "$(id -u)" = 0 ] || [ "${1:-}" = wait ] || fail "needs root (it installs packages and starts daemons)"
case "${1:-}" in
  up) up ;;
  down) down ;;
  wait) shift; wait_for_job "$@" ;;
  *) fail "usage: $0 up | down | wait JOB [SECONDS]" ;;
esac
