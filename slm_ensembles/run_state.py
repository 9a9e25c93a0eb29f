"""What lets a run be killed at any moment and resumed with nothing lost.

- A run folder is opened new or resumed here: a resume continues with the settings saved in its config.yaml, and
  refuses any other setting it is given (only total_rounds may change, and push_to_hub, which trains nothing).
- The manifest (manifest.json) records each planned round's status (pending, training, done), the member folders,
  the config's fingerprint, the seed (initialisation, data order) and the data seed (sample, split). It and every
  other file a resume relies on are written atomically: to a temporary file, then renamed, so a half-written file
  is never taken for a whole one.
- Rows of a CSV log are rewritten whole when a round's rows are replaced, so a resumed round never duplicates them;
  a row appended to the training log goes in whole or, when its write fails, not at all.
  The manifest keeps a journal of each finished round's metrics.csv rows: a resume restores a metrics.csv that was
  lost, emptied, overwritten or cut short from it, before any training.
- Trainer checkpoints count only when complete (the Trainer writes trainer_state.json last; with several processes,
  each process's RNG state must be there too), and the disk is checked before each one is written.
- Checkpoints, early stopping's best weights and members record each of their files' size and sha256 in
  checksums.json when they are written; a resume checks them before it uses the folder: a damaged checkpoint is
  passed over for the newest intact one, a damaged member or best folder is refused by name.
- A write that fails for want of disk stops the run with DiskSpaceError (exit code 2), naming the folder and the
  bytes needed; the files written before it stay as they were.
- SIGTERM and SIGUSR1 (what SLURM sends before a time limit or a preemption) ask the trainer to checkpoint at the
  next step boundary and stop (one during setup stops the run before it writes anything); the run then exits with
  processes.EXIT_PREEMPTED, which a requeueing launcher can tell from success (0) and failure (1, or 2 for bad input).
"""

import argparse
import dataclasses
import datetime
import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import TrainerCallback

import checksums
import config as config_lib
import utils
from slm_ensembles import compute, files, processes, students
from slm_ensembles.run_layout import RunLayout

METRIC_JOURNAL = "metric_rows"  # manifest key: each finished round's metrics.csv rows, as text, by round
CHECKPOINT_PREFIX = "checkpoint-"


def new_manifest(config_fingerprint: str, seed: int, data_seed: int, rounds: int, job_id: str | None = None) -> dict:
    return {"config_fingerprint": config_fingerprint, "seed": seed, "data_seed": data_seed, "job_id": job_id,
            "rounds": planned_rounds({}, rounds), "members": [], "teacher_evaluated": False}


def planned_rounds(rounds: dict, count: int) -> dict:
    """Rounds 0..count-1 with their statuses in `rounds`, "pending" for those not started (a grown total_rounds)."""
    return {str(index): rounds.get(str(index), "pending") for index in range(count)}


def find_run_of_job(output_root: str | Path, job_id: str) -> str | None:
    """The run folder that the scheduler job `job_id` started earlier, if any (a requeued job resumes it)."""
    for manifest_path in sorted(Path(output_root).glob(f"*/run_*/{RunLayout.MANIFEST}")):
        if json.loads(manifest_path.read_text()).get("job_id") == str(job_id):
            return str(manifest_path.parent)
    return None


def load_manifest(run_dir: Path) -> dict | None:
    """The run's manifest, None when it has none; a damaged one (cut short, emptied, overwritten) is refused by name:
    the run's progress is unknown without it."""
    path = RunLayout(run_dir).manifest
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        problem = None if isinstance(manifest, dict) and isinstance(manifest.get("rounds"), dict) else "not a manifest"
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = str(error)
    if problem is not None:
        raise config_lib.ConfigError(f"{path} is damaged ({problem}): the run's progress cannot be read. Restore it "
                                     "from a copy, or start a new run; nothing was changed")
    return manifest


def write_manifest(run_dir: Path, manifest: dict) -> None:
    files.write_atomically(RunLayout(run_dir).manifest, json.dumps(manifest, indent=2))


def round_status(manifest: dict, round_index: int) -> str:
    return manifest["rounds"].get(str(round_index), "pending")


def mark_round_training(run_dir: Path, manifest: dict, round_index: int, resume_from: Path | None,
                        log_columns: list[str]) -> None:
    """Write the manifest with the round marked as training, and drop the training log's (train_log.csv, with
    `log_columns`) rows written after the checkpoint the round resumes from: the resumed steps log them again."""
    write_manifest(run_dir, {**manifest, "rounds": {**manifest["rounds"], str(round_index): "training"}})
    last_step = checkpoint_step(resume_from) if resume_from else 0
    files.replace_csv_rows(RunLayout(run_dir).train_log, log_columns,
                     lambda row: int(row["round"]) != round_index or int(row["step"]) <= last_step, [])


def finished_round(manifest: dict, round_index: int, member: str, weights: list[float] | None,
                   metric_rows: list[dict], member_data: str = "all") -> dict:
    """The manifest once round `round_index` is done: its member folder (relative to the run) added, the members'
    weights, which data the member trained on, its metrics.csv rows (csv_text_rows: the journal a damaged metrics.csv
    is restored from), and the teacher evaluated (round 0 evaluates it)."""
    return {**manifest, "members": [*manifest["members"], member], "weights": weights,
            "member_data": {**manifest.get("member_data", {}), str(round_index): member_data},
            METRIC_JOURNAL: {**manifest.get(METRIC_JOURNAL, {}), str(round_index): metric_rows},
            "rounds": {**manifest["rounds"], str(round_index): "done"}, "teacher_evaluated": True}


def done_rounds(manifest: dict) -> list[str]:
    """The indices (as the manifest keys them) of the rounds marked done, in order."""
    return sorted((index for index, status in manifest["rounds"].items() if status == "done"), key=int)


def metrics_damage(path: Path, rows: list[dict] | None) -> str:
    """In words, what is wrong with the metrics.csv at `path`, read as `rows` (read_csv_rows), when it does not hold
    the rows of the run's finished rounds."""
    if not path.exists():
        return "it is missing"
    if rows is None:
        return "it is not CSV text"
    if not rows:
        return "it holds no rows"
    if not all(map(files.is_complete_row, rows)):
        return "a row is cut short"
    return "rows of finished rounds are missing or differ from the ones written"


def check_metric_rows_recoverable(run_dir: Path, manifest: dict) -> None:
    """Refuse to resume a run whose metrics.csv lost rows that its manifest cannot restore: rows of rounds that
    finished before manifests kept a journal of them (METRIC_JOURNAL). Rows in the journal are restored later, by
    restore_metric_rows; without this check, a run whose metrics.csv is unreadable would fail after its next round's
    training, and one cut short would lose rows for good."""
    journal = manifest.get(METRIC_JOURNAL, {})
    unjournaled = [index for index in done_rounds(manifest) if index not in journal]
    if not unjournaled:
        return
    path = RunLayout(run_dir).metrics
    written = files.read_csv_rows(path)
    whole = {row.get("round") for row in written or [] if files.is_complete_row(row)}
    cut = {row.get("round") for row in written or [] if not files.is_complete_row(row)}
    lost = [index for index in unjournaled if index not in whole or index in cut]
    if lost:
        raise config_lib.ConfigError(
            f"{path}: the rows of round(s) {', '.join(lost)} are lost ({metrics_damage(path, written)}), and "
            f"{RunLayout(run_dir).manifest} predates the journal of metric rows that would restore them. Restore "
            f"{RunLayout.METRICS} from a copy, or recompute them in a new run with this run's settings (`python main.py "
            f"--config {RunLayout(run_dir).config}`); nothing was changed")


def restore_metric_rows(run_dir: Path, columns: list[str], manifest: dict) -> None:
    """Rewrite the run's metrics.csv from the manifest's journal unless it holds the finished rounds' rows as they
    were written (missing, emptied, overwritten, cut short, rows lost or changed), with a warning naming the rows
    it restores. Rows of rounds not finished are dropped with it: those rounds are evaluated again. Rows of rounds
    finished before the journal existed are kept as the file holds them (check_metric_rows_recoverable refused the
    resume if any are lost)."""
    path = RunLayout(run_dir).metrics
    written = files.read_csv_rows(path)
    whole = [row for row in written or [] if files.is_complete_row(row)]
    journal = manifest.get(METRIC_JOURNAL, {})
    finished = done_rounds(manifest)
    wanted = [row for index in finished
              for row in journal.get(index, [row for row in whole if row.get("round") == index])]
    if not path.exists() and not wanted:
        return  # no round has finished: nothing was written yet
    if written is not None and [row for row in whole if row.get("round") in finished] == wanted:
        return
    damage = metrics_damage(path, written)
    restored = ", ".join(f"round {row['round']} {row['model']}" for row in wanted if row not in whole)
    files.write_csv_rows(path, columns, wanted)
    print(f"warning: {path}: {damage}; rewritten from the rows {RunLayout.MANIFEST} recorded for the finished rounds, "
          f"restoring {restored or 'no row'}", file=sys.stderr)


TRAINING_RECORD = "training.json"  # in a member folder: steps run, the member's step, why its round stopped


def save_member_atomically(student, tokenizer, member_dir: Path, training: dict | None = None) -> None:
    """A clean `save_pretrained` folder with the tokenizer (and `training`, the record of how the round trained,
    as training.json) and the checksums of its files, moved into place only when complete."""
    tmp = member_dir.with_name(member_dir.name + ".tmp")
    with files.refuse_full_disk(member_dir.parent, member_bytes(student, tokenizer), member_dir.name,
                          "what was saved before is kept: free some space, then continue the run with "
                          "`python main.py --resume` and its run folder"):
        shutil.rmtree(tmp, ignore_errors=True)
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if training is not None:
            (tmp / TRAINING_RECORD).write_text(json.dumps(training, indent=2) + "\n")
        files.write_checksums(tmp)
        shutil.rmtree(member_dir, ignore_errors=True)
        os.replace(tmp, member_dir)


def save_ensemble_configs(ensemble, tokenizer, folder: Path) -> None:
    """The ensemble's own files (ModelEnsemble.save_configs: its config, generation config and tokenizer) written into
    its `folder`, beside the members. A write that fails for want of disk stops the run with DiskSpaceError, the
    files of the previous round kept as they were."""
    with files.refuse_full_disk(folder, saved_tokenizer_bytes(tokenizer) + CONFIG_BYTES, "the ensemble's configs",
                          "the previous round's are kept: free some space, then continue the run with "
                          "`python main.py --resume` and its run folder"):
        ensemble.save_configs(folder, tokenizer)


def training_record(member_dir: Path) -> dict:
    """What save_member_atomically recorded of a member's training ({} for a member saved without a record)."""
    path = Path(member_dir) / TRAINING_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


# --- opening or resuming a run folder ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stated:
    """A setting a resume's --preset, --config or command line states, and where it was stated."""

    value: object
    source: str  # for messages: "--preset test", "--config FILE", "the command line"
    from_preset: bool = False


def stated_settings(preset: str | None, config_file: str | None, overrides: dict) -> dict[str, Stated]:
    """The settings a resume's --preset, --config and command line state (later ones override earlier ones, as for
    a new run)."""
    stated = {}
    if preset is not None:
        stated.update({key: Stated(value, f"--preset {preset}", from_preset=True)
                       for key, value in config_lib.preset_values(preset).items()})
    if config_file is not None:
        stated.update({key: Stated(value, f"--config {config_file}")
                       for key, value in config_lib.read_yaml(config_file).items()})
    stated.update({key: Stated(value, "the command line") for key, value in overrides.items()})
    return stated


def resumed_config(run_dir: Path, stated: dict[str, Stated], preset: str | None = None) -> config_lib.Config:
    """The saved config of the run in `run_dir`. A stated setting that differs from it is refused, naming the key:
    a run continues with the settings it started with, except a total_rounds stated on the command line or in a
    YAML file (see check_total_rounds_change). A preset's total_rounds is compared like the rest of it: restating
    the preset a run started from must not add rounds to it. A `preset` other than the one the manifest records the
    run was started from is refused too, even when its settings agree (the demo preset states none). Damage that
    would stop the run later (its config.yaml, metric rows no journal restores) is refused now, by name."""
    saved_path = RunLayout(run_dir).config
    if not saved_path.is_file():
        raise config_lib.ConfigError(
            f"--resume {str(run_dir)!r} is not a run folder (it has no config.yaml): pass the folder of a run, "
            f"runs/YYYY-MM-DD/run_N, which holds config.yaml and {RunLayout.MANIFEST}")
    manifest = load_manifest(run_dir)
    if manifest is None:
        raise config_lib.ConfigError(f"--resume {str(run_dir)!r} has a config.yaml but no {RunLayout.MANIFEST}: it did "
                                     "not get past its setup; start a new run instead")
    check_saved_config(run_dir, manifest)
    for member in manifest["members"]:  # verified before anything is rewritten, and before the rounds load them
        files.check_intact(run_dir / member, "later rounds were trained with it: restore it from a copy (its checksums.json "
                                       "says what it held), or start a new run")
    check_metric_rows_recoverable(run_dir, manifest)
    saved = config_lib.load_saved_config(saved_path)
    types_by_key = config_lib.field_types()
    wanted = {key: dataclasses.replace(setting, value=config_lib.coerce(key, setting.value, types_by_key[key]))
              for key, setting in stated.items()}
    new_total = None
    if "total_rounds" in wanted and not wanted["total_rounds"].from_preset:
        new_total = wanted.pop("total_rounds").value
    # Settings a resume may change (config_lib.RESUMABLE_SETTINGS: push_to_hub), written into config.yaml with it.
    changed = {key: wanted.pop(key).value for key in config_lib.RESUMABLE_SETTINGS
               if key in wanted and wanted[key].value != getattr(saved, key)}
    if changed:
        saved = dataclasses.replace(saved, **changed)
        saved.validate()
    conflicts = [f"{setting.source} sets {key} = {setting.value!r}, but the run was started with {key} = "
                 f"{getattr(saved, key)!r}" for key, setting in wanted.items() if setting.value != getattr(saved, key)]
    started_from = manifest.get("preset")  # None: a run from before manifests recorded it
    if preset is not None and started_from is not None and preset != started_from:
        conflicts.insert(0, f"--preset {preset} is given, but the run was started from --preset {started_from}")
    if conflicts:
        raise config_lib.ConfigError(f"--resume {str(run_dir)!r}: {'; '.join(conflicts)}. A run continues with the "
                                     "settings it was started with (only total_rounds may change, on the command "
                                     "line or in a YAML file, and push_to_hub); leave these out, or start a new run")
    if new_total is None or new_total == saved.total_rounds:
        return saved
    check_total_rounds_change(run_dir, saved, new_total, manifest)
    resumed = dataclasses.replace(saved, total_rounds=new_total)
    resumed.validate()
    print(f"total_rounds: {saved.total_rounds} -> {new_total}")
    return resumed


def check_saved_config(run_dir: Path, manifest: dict) -> None:
    """Refuse a config.yaml that is not the one the run wrote: unreadable, or with a key missing or changed against
    the settings its manifest recorded when it was written (a cut, emptied or edited file would otherwise be filled
    in with defaults and train another run). total_rounds may differ: a resume that changes it writes config.yaml
    first, and a kill before the manifest follows leaves them one apart. Runs whose manifest predates the recorded
    settings are not checked."""
    recorded = manifest.get("config")
    if recorded is None:
        return
    path = RunLayout(run_dir).config
    try:
        written = yaml.safe_load(path.read_text())
    except (UnicodeDecodeError, yaml.YAMLError):
        written = None
    if not isinstance(written, dict):
        problems = ["it is not a YAML mapping of settings"]
    else:
        types_by_key = config_lib.field_types()

        def value(key, settings):
            try:
                return config_lib.coerce(key, settings[key], types_by_key[key])
            except (config_lib.ConfigError, KeyError):
                return settings.get(key)
        problems = [f"{key} is missing" for key in sorted(recorded.keys() - written.keys())]
        problems += [f"{key} = {written[key]!r}, but the run was written with {key} = {recorded[key]!r}"
                     for key in sorted(recorded.keys() & written.keys())
                     if key not in ("total_rounds", *config_lib.RESUMABLE_SETTINGS)
                     and value(key, written) != value(key, recorded)]
    if problems:
        raise config_lib.ConfigError(
            f"{path} is not the configuration this run was written with ({'; '.join(problems)}): it was damaged or "
            f"edited. The settings it started with are in {RunLayout(run_dir).manifest} under \"config\": restore "
            "config.yaml from them, or start a new run; nothing was changed")


def check_total_rounds_change(run_dir: Path, saved: config_lib.Config, total_rounds: int, manifest: dict) -> None:
    """A resumed run may get more rounds, or fewer down to the rounds it has started; not so a single-model
    baseline, whose one student's step count (and size, for single_large) total_rounds sets."""
    if saved.baseline in config_lib.SINGLE_MODEL_BASELINES:
        raise config_lib.ConfigError(
            f"--resume {str(run_dir)!r}: total_rounds cannot change for the {saved.baseline} baseline: it sets the "
            f"step count{' and size' if saved.baseline == 'single_large' else ''} of the baseline's one student; "
            "start a new run")
    started = [int(index) for index, status in manifest["rounds"].items() if status != "pending"]
    if started and total_rounds <= max(started):
        raise config_lib.ConfigError(f"--resume {str(run_dir)!r}: total_rounds = {total_rounds}, but the run has "
                                     f"started {max(started) + 1} rounds; give at least {max(started) + 1}")


def new_run_dir(output_root: str | Path, today: datetime.date | None = None) -> Path:
    """Create and return output_root/YYYY-MM-DD/run_N with the next free N (never reuses an existing folder)."""
    day_dir = Path(output_root) / (today or datetime.date.today()).isoformat()
    day_dir.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[4:]) for p in day_dir.glob("run_*") if p.name[4:].isdigit()]
    number = max(taken, default=0) + 1
    while True:
        run_dir = day_dir / f"run_{number}"
        try:
            run_dir.mkdir()  # atomic: two runs starting together cannot get the same folder
            return run_dir
        except FileExistsError:
            number += 1


def open_run(config: config_lib.Config, resume_dir: Path | None, job_id: str | None, state,
             preset: str, examples: dict[str, int]) -> tuple[Path, dict]:
    """The run folder and its manifest: the one being resumed (`resume_dir`, checked by resumed_config), or a new
    folder, never an existing one, picked by one process so that every process agrees on it. A new run's manifest
    records the `preset` it was started from (a resume refuses another), and every run's the `examples` each data
    split holds (what a study reports as its data size: the conversations left once too-long ones are dropped)."""
    if resume_dir is not None:
        return resume_dir, resumed_manifest(resume_dir, config, state, examples)
    manifest = {**new_manifest(config.fingerprint(), config.seed, config.data_seed, config.rounds_to_run(), job_id),
                "config": config.to_dict(),  # what check_saved_config compares config.yaml with on resume
                "preset": preset, "examples": examples}
    run_dir = None
    if state.is_main_process:
        run_dir = new_run_dir(config.output_root)
        write_run_config(config, run_dir)
        write_manifest(run_dir, manifest)
    (run_dir,) = broadcast_object_list([run_dir])
    return run_dir, manifest


def resumed_manifest(run_dir: Path, config: config_lib.Config, state, examples: dict[str, int]) -> dict:
    """The resumed run's manifest. A total_rounds changed on this command line is written into config.yaml and the
    manifest (fingerprint, pending rounds), so a later plain --resume, after a preemption, still trains every
    round; the split sizes (`examples`) too, which a manifest written before they were recorded lacks."""
    manifest = load_manifest(run_dir)
    updated = {**manifest, "config_fingerprint": config.fingerprint(), "config": config.to_dict(),
               "rounds": planned_rounds(manifest["rounds"], config.rounds_to_run()), "examples": examples}
    if updated != manifest and state.is_main_process:
        # config.yaml first: after a kill between the two writes, the next resume finds the manifest out of date
        # and writes both again.
        write_run_config(config, run_dir)
        write_manifest(run_dir, updated)
    return updated


def write_run_config(config: config_lib.Config, run_dir: Path) -> None:
    """config.yaml, atomically: a resume reads it back."""
    files.write_atomically(RunLayout(run_dir).config, config_lib.config_yaml(config))


def remove_finished_rounds_checkpoints(run_dir: Path, manifest: dict) -> None:
    """Drop the checkpoints of rounds the manifest marks done: a kill right after the manifest write leaves them
    behind, and a finished round's state is its member."""
    for index in done_rounds(manifest):
        shutil.rmtree(RunLayout(run_dir).checkpoints(int(index)), ignore_errors=True)


# --- checkpoints --------------------------------------------------------------------------------------------------

def latest_complete_checkpoint(checkpoint_dir: Path, num_processes: int = 1) -> Path | None:
    """The newest complete and intact checkpoint (see is_complete_checkpoint and folder_damage); older ones are the
    last good state when the newest was cut short while being written, or damaged since. A damaged one is passed
    over with a warning that names it and what is wrong."""
    if not checkpoint_dir.is_dir():
        return None
    candidates = [p for p in checkpoint_dir.iterdir()
                  if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    for candidate in sorted(candidates, key=checkpoint_step, reverse=True):
        if not is_complete_checkpoint(candidate, num_processes):
            continue
        problem = checksums.folder_damage(candidate)
        if problem is None:
            return candidate
        print(f"warning: {problem}: checkpoint {candidate} is damaged, so the round resumes from an older one (or "
              "from its start) and writes it again", flush=True)
    return None


def is_complete_checkpoint(checkpoint: Path, num_processes: int) -> bool:
    """Whether the Trainer finished writing `checkpoint`.

    A checkpoint with checksums.json is: it is written last, once every process has written its files
    (RecordChecksums); whether they are still intact is folder_damage's question. Without it (a checkpoint of an
    earlier version, or one killed just before its checksums were written), the rule is the Trainer's: one process
    writes trainer_state.json after everything else, so it parsing is enough. With several processes, the main
    process writes it without waiting for the others' rng_state_{i}.pth (a resumed process without its own RNG
    state silently draws other random numbers), so every one of those must be there too. A checkpoint written by a
    single process (rng_state.pth) is complete without them.
    """
    if (checkpoint / checksums.CHECKSUMS).is_file():
        return True
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if num_processes == 1 or (checkpoint / "rng_state.pth").is_file():
        return True
    return all((checkpoint / f"rng_state_{index}.pth").is_file() for index in range(num_processes))


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name[len(CHECKPOINT_PREFIX):])


class RecordChecksums(TrainerCallback):
    """Writes each checkpoint's checksums.json once every process has written its part of it, so that a resume
    tells a damaged checkpoint from an intact one (latest_complete_checkpoint)."""

    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()  # every process's RNG state is written
        if state.is_world_process_zero:
            files.write_checksums(Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}")
        return control


# --- disk -----------------------------------------------------------------------------------------------------------

# What a checkpoint's and a member's files hold besides the weights (fp32: students train with fp32 master weights),
# the optimizer's two fp32 AdamW moments and the tokenizer's files, set above what a tiny model's files take (in
# brackets; docs/resume.md compares the whole estimate with real checkpoints):
WEIGHTS_HEADER_BYTES = 256  # per tensor, in the safetensors weights file (~100)
OPTIMIZER_HEADER_BYTES = 1024  # per tensor, in optimizer.pt: the records of its moments and step (~820)
CONFIG_BYTES = 8 * 1024  # the model and generation configs, checksums.json, a member's training.json (~3 kB)
# A checkpoint's RNG states, scheduler, trainer state and training arguments (~22 kB). The trainer state's log
# history grows by ~0.3 kB per log: a round of many thousand logged steps outgrows this, by little beside its weights.
TRAINER_FILES_BYTES = 64 * 1024


@functools.cache  # measured once per tokenizer
def saved_tokenizer_bytes(tokenizer) -> int:
    """What the tokenizer's files take in each checkpoint and member folder, measured by saving it once to a
    temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return sum(path.stat().st_size for path in Path(folder).iterdir())


def member_bytes(model, tokenizer) -> int:
    """About a member folder (or early stopping's best weights) of `model`: its fp32 weights, each distinct tensor
    once, the tokenizer and the configs."""
    parameters = list(model.parameters())  # distinct: a tied head is saved once
    return (4 * sum(p.numel() for p in parameters) + WEIGHTS_HEADER_BYTES * len(parameters)
            + saved_tokenizer_bytes(tokenizer) + CONFIG_BYTES)


def checkpoint_bytes(model, tokenizer) -> int:
    """About one Trainer checkpoint of `model` trained with AdamW: what a member folder holds, the optimizer's two
    fp32 moments, and the trainer's own files."""
    parameters = list(model.parameters())
    return (member_bytes(model, tokenizer) + 8 * sum(p.numel() for p in parameters)
            + OPTIMIZER_HEADER_BYTES * len(parameters) + TRAINER_FILES_BYTES)


def round_bytes(model, tokenizer, config: config_lib.Config) -> int:
    """About the most a round of `model` holds on disk at once: keep_checkpoints + 1 checkpoints (the Trainer writes
    the newest before it removes the oldest), early stopping's best weights (eval_steps), and its member, which is
    saved while the checkpoints are still there."""
    return ((config.keep_checkpoints + 1) * checkpoint_bytes(model, tokenizer)
            + (2 if config.eval_steps else 1) * member_bytes(model, tokenizer))


def check_disk_for_a_round(folder: Path, model, tokenizer, config: config_lib.Config) -> None:
    """Refuse to start a round of `model` (a student, or its skeleton on the meta device) whose files the disk
    cannot hold (round_bytes). Each checkpoint write is checked again just before it happens
    (CheckDiskBeforeSave)."""
    files.check_disk_space(folder, round_bytes(model, tokenizer, config),
                     f"a round's checkpoints, best weights and member ({compute.parameter_count(model):,} parameters "
                     f"with their optimizer state, {config.keep_checkpoints} checkpoints kept)",
                     "free some space or point output_root elsewhere")


class CheckDiskBeforeSave(TrainerCallback):
    """Stops training before a checkpoint write the disk has no room for, rather than failing halfway through it.

    Free space shrinks while a run trains (other jobs share the disk), so it is checked before every write, not
    only when a round starts. Training stops with DiskSpaceError; the earlier checkpoints stay as they are.
    Placed after the callbacks that decide to save, so it sees their decision.
    """

    def __init__(self, run_dir: Path, checkpoint_bytes: int):
        self.run_dir = run_dir
        self.checkpoint_bytes = checkpoint_bytes

    def on_step_end(self, args, state, control, **kwargs):
        if not control.should_save:
            return control
        error = None
        try:
            files.check_disk_space(self.run_dir, self.checkpoint_bytes, f"the checkpoint of step {state.global_step}",
                             f"training stopped before writing it, the earlier checkpoints are kept: free some "
                             f"space, then continue with `python main.py --resume {self.run_dir}`")
        except files.DiskSpaceError as short:
            error = short
        if processes.any_process(error is not None, args.device):  # processes stop together (see received_anywhere)
            raise error or files.DiskSpaceError(f"another process found too little free disk for the checkpoint of step "
                                          f"{state.global_step} in {self.run_dir}; see its message")
        return control


# --- a run's config, disk and members, when it opens -----------------------------------------------------------------

def resolve_config(args: argparse.Namespace) -> tuple[config_lib.Config, Path | None]:
    """The run's config and, when it continues a run, that run's folder. A new run layers the preset, YAML file and
    command line (config.build_config); --resume continues with the run's saved config.yaml, refusing any other
    setting (resumed_config); a requeued --job_id resumes the run the job started, if it started one."""
    overrides = config_lib.command_line_settings(args)
    if args.resume is not None:
        stated = stated_settings(args.preset, args.config_file, overrides)
        return resumed_config(Path(args.resume), stated, args.preset), Path(args.resume)
    config = config_lib.build_config(chosen_preset(args), args.config_file, overrides)
    if args.job_id is not None:
        # Looked for under the output_root the whole command line gives (a YAML file may set it).
        started = find_run_of_job(config.output_root, args.job_id)
        if started is not None:  # a requeued job repeats its command line: the run's saved config counts
            return resumed_config(Path(started), {}), Path(started)
    return config, None

def chosen_preset(args: argparse.Namespace) -> str:
    """The preset a new run starts from: --preset, or the default one."""
    return args.preset or config_lib.DEFAULT_PRESET

def check_disk_before_the_run_folder(config: config_lib.Config, resume_dir: Path | None,
                                     round_config: config_lib.Config, teacher: torch.nn.Module, tokenizer) -> None:
    """Refuse a run whose output folder's disk cannot hold a round of its student (check_disk_for_a_round,
    sized from the student's skeleton: nothing allocated). Checked before the run folder exists, so a run that
    cannot write its checkpoints leaves nothing behind."""
    output_folder = resume_dir or Path(config.output_root)
    output_folder.mkdir(parents=True, exist_ok=True)
    check_disk_for_a_round(output_folder, students.student_skeleton(round_config, teacher, tokenizer), tokenizer,
                           config)


def load_intact(folder: Path, what_to_do: str, trust_remote_code: bool, device) -> torch.nn.Module:
    """A saved student (a member, or the best weights early stopping kept) in float32 on `device`, once its
    checksums say it is intact (else ConfigError, naming the file and `what_to_do`)."""
    files.check_intact(folder, what_to_do)
    return utils.load_causal_lm(str(folder), torch.float32, trust_remote_code).to(device)


def earlier_members(config: config_lib.Config, folder: Path, manifest: dict, device: torch.device) -> tuple:
    """The frozen students of the rounds the run finished before (none for a new run), in the frozen dtype on
    `device`, in round order."""
    frozen_dtype = utils.frozen_dtype(config.dtype, device)
    return tuple(utils.load_causal_lm(str(folder / path), frozen_dtype, config.trust_remote_code).to(device).eval()
                 for path in manifest["members"])
