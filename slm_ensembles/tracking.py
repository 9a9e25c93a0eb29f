"""Experiment trackers: a run's training curves and per-round metrics in TensorBoard, Weights & Biases, Trackio, ...

`report_to` (config.py) names them, comma-separated ("none": no tracker). Two streams reach each one:
- the Trainer's logs of every round (loss, its KL and NLL parts, learning rate, gradient norms, and the early
  stopping's held-out CE), through transformers' own integrations;
- each round's evaluation rows (metrics.csv), as `<model>/<metric>` at step = the round, through accelerate's
  trackers.
The run folder names the run; `tracker_project` groups runs (a study's, for example) in trackers that have
projects. TensorBoard writes into the run folder: tensorboard/round_<r>/ (training) and tensorboard/rounds/ (the
evaluation rows); `tensorboard --logdir runs` shows every run.
"""

from pathlib import Path

from accelerate.tracking import LOGGER_TYPE_TO_CLASS

from config import ConfigError

TENSORBOARD = "tensorboard"
TENSORBOARD_DIR = "tensorboard"  # in the run folder


def tracker_names(report_to: str) -> list[str]:
    """The trackers `report_to` names ([] for "none"); an unknown one is a ConfigError that lists the known."""
    names = [name.strip() for name in report_to.split(",") if name.strip() and name.strip() != "none"]
    unknown = sorted(set(names) - set(LOGGER_TYPE_TO_CLASS))
    if unknown:
        raise ConfigError(f"config key 'report_to' names unknown tracker(s) {unknown}: it takes none or any of "
                         f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}, comma-separated")
    return names


def trainer_report_to(report_to: str) -> list[str]:
    """The Trainer's report_to: the trackers whose transformers integration finds its own place to write (all but
    TensorBoard, which would write into the round's checkpoint folder, removed when the round ends)."""
    return [name for name in tracker_names(report_to) if name != TENSORBOARD]


def trainer_callbacks(report_to: str, run_dir: Path, round_index: int, is_main_process: bool) -> list:
    """The Trainer callbacks that write a round's training logs into the run folder (TensorBoard)."""
    if TENSORBOARD not in tracker_names(report_to):
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    folder = Path(run_dir) / TENSORBOARD_DIR / f"round_{round_index}"
    return [TensorBoardCallback(tb_writer=SummaryWriter(str(folder)) if is_main_process else None)]


def run_trackers(config, run_dir: Path) -> list:
    """round_trackers for a run: its config's trackers and project, named by its folder (run_name)."""
    return round_trackers(config.report_to, config.tracker_project, run_dir, run_name(run_dir, config.output_root))


def round_trackers(report_to: str, project: str, run_dir: Path, run_name: str) -> list:
    """Started accelerate trackers that take each round's evaluation rows (call on the main process only)."""
    trackers = []
    for name in tracker_names(report_to):
        if name == TENSORBOARD:
            tracker = LOGGER_TYPE_TO_CLASS[name]("rounds", Path(run_dir) / TENSORBOARD_DIR)
        else:  # accelerate's trackers take the project as their first argument
            tracker = LOGGER_TYPE_TO_CLASS[name](project, name=run_name)
        tracker.start()
        trackers.append(tracker)
    return trackers


def log_round(trackers: list, round_index: int, rows: list[dict]) -> None:
    """A round's metric rows, as `<model>/<metric>` values at step `round_index` (text columns left out)."""
    values = {f"{row['model']}/{key}": value for row in rows for key, value in row.items()
              if key not in ("round", "model") and isinstance(value, (int, float)) and not isinstance(value, bool)}
    for tracker in trackers:
        tracker.log(values, step=round_index)


def finish(trackers: list) -> None:
    for tracker in trackers:
        tracker.finish()


def run_name(folder: Path, output_root: str | Path) -> str:
    """The run's name in trackers: its folder below output_root (YYYY-MM-DD/run_N)."""
    return str(folder.relative_to(output_root)) if folder.is_relative_to(output_root) else folder.name
