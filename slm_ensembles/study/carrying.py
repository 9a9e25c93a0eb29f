"""A study's finished runs carried to another machine as records: every file collecting, status and --latency read
(CSV, YAML, the manifest, model configs and cards, the members' training records), no weights and no checkpoints,
a few hundred kB a run instead of hundreds of MB. Copied back into the study folder, the records make those runs
finished there: the study skips them, and collects and times them (a member without weights is timed with random
weights of its shapes, see latency.first_members). A study run with --keep_records copies them back itself
(restore_records), so that on a new machine the one command both restores and goes on."""

from __future__ import annotations

import shutil
from pathlib import Path

from slm_ensembles.study.grid import Study
from slm_ensembles.study.status import point_status

KEPT_SUFFIXES = {".csv", ".yaml"}
KEPT_NAMES = {"manifest.json", "config.json", "generation_config.json", "training.json", "README.md"}


def is_record(relative: Path) -> bool:
    """Whether a file of a run folder (its path inside the folder) is part of the run's record."""
    return "checkpoints" not in relative.parts and (relative.suffix in KEPT_SUFFIXES or relative.name in KEPT_NAMES)


def keep_records(study: Study, into: Path) -> list[Path]:
    """Copy every finished run's records into `into`/runs/, at the place the run folder has under the study folder's
    runs/ (so that copying `into`/runs back into the study folder restores them); the run folders copied. An
    unfinished run is not copied: without its checkpoints it could not resume, and would only stop the study."""
    copied = []
    for point in study.points:
        status = point_status(point)
        if status.state != "finished":
            continue
        destination = into / "runs" / status.run_dir.relative_to(study.folder / "runs")
        for path in sorted(status.run_dir.rglob("*")):
            relative = path.relative_to(status.run_dir)
            if path.is_file() and is_record(relative):
                (destination / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, destination / relative)
        copied.append(destination)
    return copied


def restore_records(study: Study, kept: Path) -> list[Path]:
    """Copy into the study folder the records kept in `kept`/runs/ (keep_records) of every run the study folder has
    no run folder of (point_status: missing), so that a study restarted on another machine skips the runs finished
    on the last one; a run the study folder has, finished or not, is left as it is. The run folders restored."""
    restored = []
    for point in study.points:
        record = kept / "runs" / point.output_root.relative_to(study.folder / "runs")
        if record.is_dir() and point_status(point).state == "missing":
            shutil.copytree(record, point.output_root, dirs_exist_ok=True)
            restored.append(point.output_root)
    return restored
