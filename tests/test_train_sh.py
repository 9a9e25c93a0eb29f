"""train.sh, unmodified, submitted to a real one-node SLURM cluster (.ci/slurm_cluster.sh brings it up).

The cluster needs root and apt-get (Debian's slurm packages); elsewhere these tests are skipped. The node has one
fake GPU, so the script's `--gres=gpu:1` is accepted and the job falls back to the CPU. Only the resources this
2-CPU machine lacks are overridden on the sbatch command line, as users override them.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import DATA_DIR
from slm_ensembles import run_state

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / ".ci" / "slurm_cluster.sh"
SMALL_NODE = ("--cpus-per-task=2", "--mem=6G", "--time=00:15:00")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("apt-get") is None,
                                reason="a local SLURM cluster needs root and apt-get")


@pytest.fixture(scope="module")
def cluster():
    up = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stderr[-3000:]
    yield
    subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, timeout=120)


def submit(tmp_path, teacher_dir, *main_args, sbatch_options=SMALL_NODE) -> str:
    """sbatch train.sh from `tmp_path` (logs/ there), the project and venv given as train.sh documents."""
    (tmp_path / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "PROJECT_DIR": str(REPO), "VENV": sys.prefix}
    command = ["sbatch", "--parsable", *sbatch_options, str(REPO / "train.sh"), "--preset", "test",
               "--teacher", str(teacher_dir), "--dataset", str(DATA_DIR / "chats.jsonl"),
               "--output_root", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"), *main_args]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def wait(job: str, seconds: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), "wait", job, str(seconds)], capture_output=True, text=True,
                          timeout=seconds + 60)


def job_log(tmp_path, job: str) -> str:
    return "\n".join(path.read_text() for path in sorted((tmp_path / "logs").glob(f"slm-ensembles_{job}*.out")))


def finished_runs(tmp_path) -> list[Path]:
    return [run for run in sorted((tmp_path / "runs").glob("*/run_*"))
            if set(json.loads((run / "manifest.json").read_text())["rounds"].values()) == {"done"}]


def test_a_submitted_job_completes_a_run(cluster, tmp_path, tiny_teacher_dir):
    job = submit(tmp_path, tiny_teacher_dir)
    finished = wait(job)
    log = job_log(tmp_path, job)
    assert finished.returncode == 0, finished.stdout + finished.stderr + log[-3000:]
    (run,) = finished_runs(tmp_path)
    assert json.loads((run / "manifest.json").read_text())["job_id"] == job
    assert f"run folder: {run}" in log
    assert len(pd.read_csv(run / "metrics.csv")) == 7  # teacher once, then 3 models per round


STOP_SIGNALS = {
    # What `#SBATCH --signal=B:USR1@300` does 5 minutes before the time limit: signal the batch script.
    "the time-limit warning": ("--batch", "--signal=USR1"),
    # A preemption's SIGTERM to the batch script and every process of the job, launchers included. main.py's exit
    # code 75 does not come through `accelerate launch` (it exits 1): the script must requeue on the signal itself.
    "a preemption's SIGTERM": ("--full", "--signal=TERM"),
}


@pytest.mark.parametrize("stop", list(STOP_SIGNALS))
def test_a_stop_signal_checkpoints_requeues_and_the_job_resumes_its_run(cluster, tmp_path, tiny_teacher_dir, stop):
    steps = 300
    job = submit(tmp_path, tiny_teacher_dir, *long_round(steps))
    train_log = wait_for_training(tmp_path, job)
    subprocess.run(["scancel", *STOP_SIGNALS[stop], job], check=True, timeout=30)
    release_when_requeued(job)
    finished = wait(job)
    log = job_log(tmp_path, job)
    assert finished.returncode == 0, finished.stdout + log[-4000:]
    assert f"requeueing job {job}" in log
    assert "resuming from checkpoint-" in log
    (run,) = finished_runs(tmp_path)  # the requeued job finished the run it started, in the same folder
    assert run == train_log.parents[0]
    logged = pd.read_csv(run / "train_log.csv")
    assert list(logged["step"]) == list(range(10, steps + 1, 10))  # every logged step once, none lost or repeated


def long_round(steps: int) -> tuple[str, ...]:
    return "--total_rounds", "1", "--steps_per_round", str(steps), "--save_steps", "20", "--logging_steps", "10"


def wait_for_training(tmp_path, job: str) -> Path:
    """The run's train_log.csv, once it has two rows (training is under way)."""
    deadline = time.time() + 300
    while time.time() < deadline:
        logs = list((tmp_path / "runs").glob("*/run_*/train_log.csv"))
        if logs and len(logs[0].read_text().splitlines()) >= 3:
            return logs[0]
        time.sleep(0.2)
    raise AssertionError(job_log(tmp_path, job)[-3000:])


def test_a_cancelled_job_checkpoints_and_is_not_requeued(cluster, tmp_path, tiny_teacher_dir):
    """scancel JOB sends SIGTERM too: the run stops at a checkpoint, and the job stays cancelled."""
    job = submit(tmp_path, tiny_teacher_dir, *long_round(3000))
    run = wait_for_training(tmp_path, job).parent
    subprocess.run(["scancel", job], check=True, timeout=30)
    finished = wait(job, 60)  # a requeued job would be pending again: still active after 60 s
    log = job_log(tmp_path, job)
    assert "JobState=CANCELLED" in finished.stdout, finished.stdout + log[-3000:]
    assert "job cancelled: asking main.py to checkpoint and stop; not requeueing" in log
    assert "requeueing job" not in log
    assert run_state.latest_complete_checkpoint(run / "checkpoints" / "round_0") is not None
    assert json.loads((run / "manifest.json").read_text())["rounds"] == {"0": "training"}


def release_when_requeued(job: str, seconds: int = 300) -> None:
    """Start a requeued job soon: SLURM holds a requeued batch job for 2 minutes (its EligibleTime)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        state = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
        if "Restarts=1" in state and "JobState=PENDING" in state:
            # slurmd rejects a credential issued in the same second as the requeue revoked the old one ("Job
            # credential revoked", the job then FAILS): that is what SLURM's own delay protects against.
            time.sleep(2.5)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job} was not requeued within {seconds}s")


def test_a_job_array_sweeps_a_setting_with_one_run_folder_per_task(cluster, tmp_path, tiny_teacher_dir):
    job = submit(tmp_path, tiny_teacher_dir, "--sweep", "alpha=0.3,0.7", "--total_rounds", "1",
                 sbatch_options=("--array=0-1", "--cpus-per-task=1", "--mem=4G", "--time=00:15:00"))
    finished = wait(job)
    assert finished.returncode == 0, finished.stdout + job_log(tmp_path, job)[-3000:]
    runs = finished_runs(tmp_path)
    assert sorted(yaml.safe_load((run / "config.yaml").read_text())["alpha"] for run in runs) == [0.3, 0.7]
