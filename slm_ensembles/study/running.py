"""Running a study's grid: here, one main.py subprocess after another (new points started, unfinished ones
resumed); or listed with their state (--dry_run); or as SLURM array lines over train.sh (--print_sbatch)."""

from __future__ import annotations

import datetime
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from slm_ensembles import files
from slm_ensembles.run_layout import RunLayout
from slm_ensembles.study.carrying import keep_records, restore_records
from slm_ensembles.study.collecting import finished_timed, time_left, wall_times
from slm_ensembles.study.grid import Study, StudyError
from slm_ensembles.study.status import point_status

WALL_TIME_COLUMNS = ["started", "seconds", "exit_code"]

REPO = Path(__file__).resolve().parents[2]  # the repository root: main.py and train.sh
MAIN = REPO / "main.py"


def launch(args: list[str], log_path: Path) -> int:
    """Run main.py with `args` in a subprocess (from the current folder, as `python main.py` would be), its output
    into log_path; its exit code."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ python main.py {shlex.join(args)}\n")
        log.flush()
        return subprocess.run([sys.executable, str(MAIN), *args], stdout=log, stderr=subprocess.STDOUT).returncode


def run_study(study: Study, records: Path | None = None) -> list[str]:
    """Run every grid point that is not finished, one after another: new ones started, unfinished ones resumed;
    seed by seed (every family's run of a seed before any of the next), so that a study stopped part way holds
    whole paired seeds, not one family's every seed and no baseline. The names of those that did not finish. Every
    point's run folders are checked first (point_status), so a folder made with other settings stops the study
    before anything runs. `records`: a folder the finished runs' records are copied into (carrying.keep_records)
    before the first launch and after each run finishes, so that a machine lost mid-study loses one run at most;
    first, the records it holds of runs the study folder lacks are copied back (carrying.restore_records), so that
    the same command goes on where the lost machine stopped."""
    if records is not None:
        restored = restore_records(study, records)
        if restored:
            print(f"restored {len(restored)} finished run(s) from the records in {records}", flush=True)
    for point in study.points:
        point_status(point)
    if records is not None:
        keep_records(study, records)
    failed = []
    seed_order = {seed: i for i, seed in enumerate(dict.fromkeys(p.seed for p in study.points))}
    for index, point in enumerate(sorted(study.points, key=lambda p: seed_order[p.seed]), 1):
        status = point_status(point)
        prefix = f"[{index}/{len(study.points)}] {point.name}"
        if status.state == "finished":
            print(f"{prefix}: finished ({status.run_dir}), skipped")
            continue
        args = list(status.resume_args) if status.state == "unfinished" else point.run_args()
        log_path = study.folder / "logs" / f"{point.name}.log"
        print(f"{prefix}: {'resuming ' + str(status.run_dir) if status.resume_args else 'running'} "
              f"(log: {log_path})", flush=True)
        started, clock = datetime.datetime.now(datetime.timezone.utc), time.monotonic()
        code = launch(args, log_path)
        seconds = time.monotonic() - clock
        after = point_status(point)
        if after.run_dir is not None:  # a launch that made no run folder (a refused config) cost next to nothing
            record_wall_time(after.run_dir, started, seconds, code)
        if code == 0 and after.state == "finished":
            print(f"{prefix}: done in {seconds:.0f} s", flush=True)
            if records is not None:
                keep_records(study, records)
        else:
            failed.append(point.name)
            tail = log_path.read_text().splitlines()[-5:] if log_path.is_file() else []
            print(f"{prefix}: not finished (main.py exit code {code}); the end of its log:\n    "
                  + "\n    ".join(tail), flush=True)
    return failed


def record_wall_time(run_dir: Path, started: datetime.datetime, seconds: float, exit_code: int) -> None:
    """One launch of a run appended to its folder's wall_time.csv (a resumed run has a row per launch), so that the
    study's measured time travels with the run's records."""
    files.append_csv_rows(RunLayout(run_dir).wall_time, WALL_TIME_COLUMNS, [dict(
        started=started.isoformat(timespec="seconds"), seconds=round(seconds, 1), exit_code=exit_code)])


def dry_run_lines(study: Study) -> list[str]:
    statuses = [point_status(p) for p in study.points]
    counts = {state: sum(s.state == state for s in statuses) for state in ("finished", "unfinished", "missing")}
    lines = [f"Study {study.name}: {len(study.points)} runs in {study.folder} ({counts['finished']} finished, "
             f"{counts['unfinished']} unfinished, {counts['missing']} not started)"]
    width = max((len(p.name) for p in study.points), default=0)
    for point, status in zip(study.points, statuses):
        where = status.run_dir or point.output_root
        lines.append(f"  {status.state:<10} {point.name:<{width}}  {'tuning' if point.tuning else point.kind:<8} "
                     f"{where}")
    timing = [time_left_line(wall_times(study))] if study.points else []
    return lines + timing + [f"  {line}" for line in study.waiting]


def time_left_line(times: pd.DataFrame) -> str:
    """The measured wall time so far and the estimate of what is left (collecting.time_left), for --dry_run."""
    finished = finished_timed(times)
    seconds, unknown = time_left(times)
    left = int((times["status"] != "finished").sum())
    return (f"Measured: {len(finished)} finished run(s) took {finished['seconds'].sum() / 3600:.2f} h; the {left} "
            f"left, at their family's mean so far: about {seconds / 3600:.2f} h"
            + (f" for {left - unknown} of them ({unknown} of a family with no finished, timed run yet)"
               if unknown else "") + ".")


def sbatch_lines(study: Study) -> list[str]:
    """One `sbatch --array` line per preset for the runs not started, each array task given its settings as a
    main.py --config file (train.sh --sweep config=...); one per resume arguments for the unfinished runs. The
    config files are written into STUDY/slurm/."""
    pending = [(p, point_status(p)) for p in study.points]
    new = [p for p, s in pending if s.state == "missing"]
    resumed = [(p, s) for p, s in pending if s.state == "unfinished"]
    lines = [f"# study {study.name}: {len(new)} to start, {len(resumed)} to resume, "
             f"{len(pending) - len(new) - len(resumed)} finished; from the repository root:",
             *(f"# {line}: print the lines again once they are" for line in study.waiting), "mkdir -p logs"]
    slurm = study.folder / "slurm"
    for preset in dict.fromkeys(p.preset for p in new):
        files = []
        for point in (p for p in new if p.preset == preset):
            slurm.mkdir(parents=True, exist_ok=True)
            files.append(slurm / f"{point.name}.yaml")
            files[-1].write_text(yaml.safe_dump(point.run_yaml(), sort_keys=False))
        lines.append(array_line(study.name, ["--preset", preset], "config", files))
    groups: dict[tuple, list[Path]] = {}
    for point, status in resumed:
        groups.setdefault(tuple(status.resume_args[2:]), []).append(status.run_dir)
    for extra, run_dirs in groups.items():
        lines.append(array_line(study.name, list(extra), "resume", run_dirs))
    return lines


def array_line(job_name: str, args: list[str], key: str, values: list[Path]) -> str:
    bad = [str(v) for v in values if "," in str(v)]
    if bad:
        raise StudyError(f"train.sh --sweep splits its values at commas; these paths hold one: {bad}")
    return shlex.join(["sbatch", f"--array=0-{len(values) - 1}", f"--job-name={job_name}",
                       str(REPO / "train.sh"), *args, "--sweep", f"{key}={','.join(map(str, values))}"])
