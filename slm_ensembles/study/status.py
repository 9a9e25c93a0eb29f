"""The state of a grid point from its run folders: finished, unfinished (resume it) or missing; a folder made
with other settings than the spec gives is refused, so that a changed spec never mixes old runs in."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

import config as config_lib
import plot
from slm_ensembles.run_layout import RunLayout
from slm_ensembles.study.grid import Point, StudyError


@dataclasses.dataclass(frozen=True)
class Status:
    state: str  # finished | unfinished | missing
    run_dir: Path | None = None
    resume_args: tuple = ()  # main.py's arguments that continue an unfinished run


def _run_folders(output_root: Path) -> list[Path]:
    """Run folders with a manifest under output_root, oldest first (by date folder, then run number)."""
    folders = [m.parent for m in output_root.glob("*/run_*/manifest.json")]

    def order(folder: Path):
        number = folder.name.removeprefix("run_")
        return folder.parent.name, int(number) if number.isdigit() else -1
    return sorted(folders, key=order)


def _rounds_done(run_dir: Path) -> tuple[int, bool]:
    """(rounds planned, whether every one is done) from the run's manifest."""
    rounds = json.loads((RunLayout(run_dir).manifest).read_text()).get("rounds", {})
    return len(rounds), bool(rounds) and all(status == "done" for status in rounds.values())


def point_status(point: Point) -> Status:
    """Finished (a run folder whose every planned round is done, as many as the point needs), unfinished (the newest
    run folder otherwise: resume it) or missing. A run folder made with other settings than the spec's is an
    error, so that a changed spec never mixes old runs in."""
    folders = _run_folders(point.output_root)
    for run_dir in folders:
        check_settings(point, run_dir)
    finished = [d for d in folders if _rounds_done(d)[1] and _rounds_done(d)[0] >= point.expected_rounds]
    if finished:
        return Status("finished", finished[-1])
    if not folders:
        return Status("missing")
    run_dir = folders[-1]
    grown = _rounds_done(run_dir)[0] < point.expected_rounds
    return Status("unfinished", run_dir, ("--resume", str(run_dir),
                                          *(("--total_rounds", str(point.expected_rounds)) if grown else ())))


def check_settings(point: Point, run_dir: Path) -> None:
    """The saved config.yaml agrees with the config the point resolves to, in every key both have, seed included
    (where and how a run is stored and logged is not compared: plot.NOT_COMPARED, as for seed groups). An ensemble
    run may have fewer rounds than the point: it is resumed with more."""
    saved_path = RunLayout(run_dir).config
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    wanted = point.config
    keys = set(config_lib.field_types()) - (plot.NOT_COMPARED - {"seed"})
    grown = saved.get("total_rounds", 0) < wanted.total_rounds
    if grown and wanted.baseline not in config_lib.SINGLE_MODEL_BASELINES:
        keys.discard("total_rounds")
    differ = sorted(key for key in keys if key in saved and
                    json.dumps(saved[key], default=str) != json.dumps(getattr(wanted, key), default=str))
    if differ:
        details = ", ".join(f"{key}: run {saved[key]!r}, spec {getattr(wanted, key)!r}" for key in differ)
        raise StudyError(f"{run_dir} was made with other settings than the spec gives run {point.name} ({details}): "
                         f"move that folder away or fix the spec")
