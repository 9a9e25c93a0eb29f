"""Where a run's files lie in its folder (runs/YYYY-MM-DD/run_N/): the one spelling of the layout that main.py and
run_state write by and every reader (score.py, generate.py, plot.py, study.py, the lm-eval adapter, push.py, the
model card) finds them by."""

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """The paths of the run folder `root`."""

    CONFIG = "config.yaml"  # the resolved configuration
    MANIFEST = "manifest.json"  # each round's status, its member, the journal of its metric rows
    METRICS = "metrics.csv"  # one row per model and round
    TRAIN_LOG = "train_log.csv"  # the training curves
    SAMPLES = "samples.csv"  # answers to the fixed prompts
    ENSEMBLE = "ensemble"  # the ensemble's folder (ModelEnsemble.from_pretrained), its members inside
    CHECKPOINTS = "checkpoints"  # a round's checkpoints while it trains
    WALL_TIME = "wall_time.csv"  # a study's launches of the run: when each started, its seconds, its exit code

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def manifest(self) -> Path:
        return self.root / self.MANIFEST

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def train_log(self) -> Path:
        return self.root / self.TRAIN_LOG

    @property
    def samples(self) -> Path:
        return self.root / self.SAMPLES

    @property
    def wall_time(self) -> Path:
        return self.root / self.WALL_TIME

    @property
    def ensemble(self) -> Path:
        return self.root / self.ENSEMBLE

    def member(self, round_index: int) -> Path:
        """Round `round_index`'s student, saved: a member of the ensemble's folder."""
        return self.ensemble / f"member_{round_index}"

    def checkpoints(self, round_index: int) -> Path:
        """The round's checkpoints while it trains (removed once its member is saved)."""
        return self.root / self.CHECKPOINTS / f"round_{round_index}"

    def best(self, round_index: int) -> Path:
        """The best weights early stopping has kept so far in the round."""
        return self.checkpoints(round_index) / "best"
