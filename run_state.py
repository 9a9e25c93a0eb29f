"""What lets a run be killed at any moment and resumed with nothing lost.

- The manifest (manifest.json) records each round's status (training, done), the member folders, the config's
  fingerprint and the data-order seed. It and every other file a resume relies on are written atomically: to a
  temporary file, then renamed, so a half-written file is never taken for a whole one.
- Rows of a CSV log are rewritten whole when a round's rows are replaced, so a resumed round never duplicates them.
- Trainer checkpoints count only when complete (the Trainer writes trainer_state.json last).
- SIGTERM and SIGUSR1 (what SLURM sends before a time limit or a preemption) ask the trainer to checkpoint at the
  next step boundary and stop; the run then exits with EXIT_PREEMPTED, which a requeueing launcher can tell from
  success (0) and failure (1, or 2 for bad input).
"""

import csv
import io
import json
import os
import shutil
import signal
from pathlib import Path

from transformers import TrainerCallback

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
MANIFEST = "manifest.json"
CHECKPOINT_PREFIX = "checkpoint-"


class DiskSpaceError(RuntimeError):
    """Not enough free disk for the next checkpoint; the message gives the bytes needed and available."""


# --- atomic files -------------------------------------------------------------------------------------------------

def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:  # newline="": text (a CSV's \r\n row ends) is written as it is
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def new_manifest(config_fingerprint: str, data_seed: int, job_id: str | None = None) -> dict:
    return {"config_fingerprint": config_fingerprint, "data_seed": data_seed, "job_id": job_id, "rounds": {},
            "members": [], "teacher_evaluated": False}


def find_run_of_job(output_root: str | Path, job_id: str) -> str | None:
    """The run folder that the scheduler job `job_id` started earlier, if any (a requeued job resumes it)."""
    for manifest_path in sorted(Path(output_root).glob(f"*/run_*/{MANIFEST}")):
        if json.loads(manifest_path.read_text()).get("job_id") == str(job_id):
            return str(manifest_path.parent)
    return None


def load_manifest(run_dir: Path) -> dict | None:
    path = run_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def write_manifest(run_dir: Path, manifest: dict) -> None:
    write_atomically(run_dir / MANIFEST, json.dumps(manifest, indent=2))


def round_status(manifest: dict, round_index: int) -> str:
    return manifest["rounds"].get(str(round_index), "pending")


def replace_csv_rows(path: Path, columns: list[str], keep, new_rows: list[dict]) -> None:
    """Rewrite a CSV with the existing rows for which keep(row) is true, then `new_rows`; atomically.

    A row cut short by a kill (fewer fields than the header) is dropped.
    """
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if None not in row.values() and keep(row)]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows + new_rows)
    write_atomically(path, text.getvalue())


def save_member_atomically(student, tokenizer, member_dir: Path) -> None:
    """A clean `save_pretrained` folder with the tokenizer, moved into place only when complete."""
    tmp = member_dir.with_name(member_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(member_dir, ignore_errors=True)
    os.replace(tmp, member_dir)


# --- checkpoints --------------------------------------------------------------------------------------------------

def latest_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint whose trainer_state.json (the Trainer's last write) exists and parses."""
    if not checkpoint_dir.is_dir():
        return None
    candidates = [p for p in checkpoint_dir.iterdir()
                  if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    for candidate in sorted(candidates, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), reverse=True):
        try:
            json.loads((candidate / "trainer_state.json").read_text())
            return candidate
        except (OSError, json.JSONDecodeError):
            continue  # cut short while being written: an older one is the last good state
    return None


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name[len(CHECKPOINT_PREFIX):])


def check_disk_space(folder: Path, parameters: int) -> None:
    """Refuse to start a round whose checkpoints cannot be written: fp32 weights plus two AdamW moments, twice
    over (the newest checkpoint is written before the oldest is pruned)."""
    needed = parameters * 4 * 3 * 2
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskSpaceError(f"{folder}: {free:,} bytes free, but the next checkpoints need about {needed:,} bytes "
                             f"({parameters:,} parameters with their optimizer state); free some space or point "
                             "output_root elsewhere")


# --- signals ------------------------------------------------------------------------------------------------------

class PreemptionSignal:
    """Records SIGTERM/SIGUSR1; the training loop checkpoints and stops at the next step boundary.

    The handler only sets a flag, so a second signal while a checkpoint is being written changes nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None

    def install(self) -> "PreemptionSignal":
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            print(f"\nsignal {signal.Signals(signum).name}: checkpointing at the next step, then exiting "
                  f"with code {EXIT_PREEMPTED} (resume with --resume)", flush=True)
        self.received = signum

    def received_anywhere(self, device) -> bool:
        """Whether any process has received a signal; every process must call this at the same point.

        Processes must stop together: one stopping at a step boundary while another trains on would leave the
        other waiting for a gradient all-reduce that never comes. A process that learns of another's signal
        counts it as its own.
        """
        import torch
        from accelerate.utils import reduce

        count = reduce(torch.tensor(int(self.received is not None), device=device), reduction="sum")
        if count.item() > 0 and self.received is None:
            self.received = signal.SIGUSR1
        return self.received is not None


class StopOnSignal(TrainerCallback):
    """Turns a received preemption signal into a checkpoint and a stop at the end of the current step."""

    def __init__(self, preemption: PreemptionSignal):
        self.preemption = preemption

    def on_step_end(self, args, state, control, **kwargs):
        if self.preemption.received_anywhere(args.device):
            control.should_save = True
            control.should_training_stop = True
        return control
