"""What a study is made of: its families and grid points (each one main.py run) and the study they form, and
how a setting is written on main.py's command line and in a run's name. Every other module of the study speaks of
these; the spec (spec.py) builds them."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import NamedTuple

import config as config_lib

# The axes an ensemble is compared with a single model on (the spec's `compare`, default all).
COMPARED_X = ("parameters", "non_embedding_parameters", "train_flops", "critical_path_layers")


class StudyError(ValueError):
    """A spec or a study folder the driver cannot use; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point: one main.py run."""

    name: str
    family: str
    kind: str  # ensemble: every ensemble size of the run is a point of the curve; single: the run's final model
    series: str  # the curve it belongs to: the family, split by its split_by keys
    label: str  # the point on its curve (single kind): its grid values other than split_by, or the family name
    preset: str
    settings: dict  # every stated setting (study, family, grid, the tuned learning rate), seed excluded
    seed: int
    output_root: Path
    config: config_lib.Config  # what main.py resolves the run's command line to
    data_seed: int | None = None  # set per run when the study's seeds vary the data (vary_data)
    grid_point: str = ""  # the family's grid values, without the learning rate: what a rate is tuned for
    tuning: bool = False  # a learning-rate tuning run that is not its grid point's chosen run (not collected)

    @property
    def expected_rounds(self) -> int:
        return self.config.rounds_to_run()

    def per_run(self) -> dict:
        return per_run_settings(self.seed, self.data_seed)

    def run_args(self) -> list[str]:
        """main.py's arguments for a new run of this point."""
        args = ["--preset", self.preset, "--output_root", str(self.output_root)]
        for key, value in {**self.settings, **self.per_run()}.items():
            args += [f"--{key}", cli_value(value)]
        return args

    def run_yaml(self) -> dict:
        """This point's settings as a main.py --config file (the preset is given on the command line)."""
        return {**self.settings, **self.per_run(), "output_root": str(self.output_root)}


class Matched(NamedTuple):
    """A single family whose size was matched (the spec's `match`) to an ensemble family's at one ensemble size,
    on one axis (parameters or non-embedding parameters)."""

    single: str
    ensemble: str
    size: int
    axis: str


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    folder: Path
    points: list[Point]  # every run to make now: tuning runs, and the later seeds' runs once tuning is finished
    compare: tuple[str, ...] = COMPARED_X  # the axes the ensembles are compared with the single models on
    waiting: tuple[str, ...] = ()  # per family whose later seeds wait for its tuning: a line saying so
    tuning: tuple[dict, ...] = ()  # tuning.csv's rows: family, point, rate, heldout_ce, chosen
    matched: tuple[Matched, ...] = ()  # the single families matched to an ensemble family's size
    # Runs of families that wait for another study's tuning (tuned_in), built at a stand-in rate to check their
    # settings: never run, collected or listed.
    pending: tuple[Point, ...] = ()

    @property
    def families(self) -> list[str]:
        return list(dict.fromkeys(p.family for p in self.points))


@dataclasses.dataclass(frozen=True)
class Family:
    """A family of the spec, checked: the grid points (combos) its runs are made of."""

    name: str
    kind: str
    preset: str
    settings: dict  # the study's settings, then the family's
    combos: list[dict]
    seeds: list[int]
    split_by: list[str]
    rates: list[float]  # learning_rates to tune over (on the first seed); empty: no tuning
    match: dict | None
    rate: float | None = None  # the learning rate another study's tuning chose for it (the spec's tuned_in)
    rate_from: str | None = None  # the tuned_in study's family whose chosen rate it takes (None: its own name)
    label_note: str = ""  # what a match set, for the points' labels


def per_run_settings(seed: int, data_seed: int | None) -> dict:
    """The settings the study gives each run: its seed, and its data_seed when the seeds vary the data."""
    return {"seed": seed, **({} if data_seed is None else {"data_seed": data_seed})}


def cli_value(value) -> str:
    """A setting as main.py's command line takes it (config.coerce reads it back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def name_part(value) -> str:
    """A value as it appears in a run's name: safe in a folder name and in train.sh's comma-separated sweep."""
    return re.sub(r"[^A-Za-z0-9.+-]", "_", cli_value(value))
