"""A scaling study: does an ensemble of small students beat one model at equal parameters or training FLOPs, and
how does quality scale with the ensemble's size?

A study spec (YAML, see docs/study.md) names base settings and families of runs: ensemble families (the method,
each combine mode a curve) and single-model families (models of growing size, or one matched to an ensemble's
parameters), each a grid of settings crossed with seeds. Each seed sets a run's seed and data_seed, so the seeds
vary the data; every run of a study shares one test set. A family may tune its learning rate (on the first seed,
on the early-stopping slice), and then every family does. Every grid point is one main.py run with its own
output_root, STUDY/runs/NAME, so it can be found, skipped when finished and resumed when not.

Usage:
    python study.py SPEC.yaml                  # run every unfinished grid point here, one after another; collect
    python study.py SPEC.yaml --dry_run        # list the grid points and which are finished
    python study.py SPEC.yaml --print_sbatch   # the sbatch lines that run the same grid as SLURM arrays (train.sh)
    python study.py SPEC.yaml --collect        # only collect: rows, fits, verdicts, figures and summary
    python study.py SPEC.yaml --latency        # after the runs: time each point's saved model (latency.csv); collect
    python study.py SPEC.yaml --latency --new_tokens 64 --repeats 5 --threads 1   # longer, steadier timings

What collecting writes into the study folder:
    rows.csv         every finished run's metrics.csv rows, with run, family, series, kind, seed and its settings
    runs.csv         every grid point: its status and run folder
    summary.csv      per series and point: mean and std of test CE over seeds, the x values
    fits.csv         L(x) = L_inf + A x^-alpha of CE against each x (only where 4 distinct x and 4 distinct mean
                     CEs determine it), with bootstrap intervals over seeds
    comparison.csv   per axis, ensemble point, single-model series and seed: the paired CE difference (on
                     train_flops the single model's curve read at the ensemble's spend, and the compute multiplier)
    verdicts.csv     per comparison: the mean difference over seeds, its 95% t-interval, wins, verdict, multiplier
    tuning.csv       with learning_rates: each tuning run's final early-stopping CE and the rate chosen
    teacher_gap.csv  per ensemble series (a member size): its best ensemble's mean CE and gap closed, and the single
                     models matched to its family (`match`), with 95% t-intervals over seeds; the teacher's CE
    summary.md       the tables above, short, and the notes (fits and pairs left out, and why)
    ce_vs_*.png      CE against ensemble size, parameters, training FLOPs, depth (log x), with the determined fits

What --latency writes (then collecting adds its section to summary.md and ce_vs_latency.png):
    latency.csv      per point (an ensemble family's at each size, a single family's at each grid point; one run of
                     it, the first seed's, stands for it): parameters, mean test CE over seeds with its 95%
                     t-interval, decode ms per token at batch 1 with a process per member (torchrun, gloo) and with
                     the members one after another in one process, whether it is on the Pareto frontier (no other
                     point has lower CE and lower latency), and the machine's thread settings. Timings come from
                     benchmarks/bench_inference.py's functions: the fastest of --repeats runs of --new_tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from matplotlib.figure import Figure
from scipy import stats
from scipy.optimize import OptimizeWarning, curve_fit
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import config as config_lib
import plot
from benchmarks import bench_inference
from ensemble import ModelEnsemble, saved_ensemble_config
from slm_ensembles import compute, embedded, students
from slm_ensembles.run_layout import RunLayout

REPO = Path(__file__).resolve().parent
MAIN = REPO / "main.py"
KINDS = ("ensemble", "single")
# The x axes a law is fitted against: metrics.csv column -> label. All but ensemble_size are columns that main.py
# may or may not write yet; a missing one skips its fits with a note.
X_AXES = {"ensemble_size": "ensemble size (members)", "parameters": "parameters",
          "non_embedding_parameters": "non-embedding parameters", "train_flops": "training FLOPs (all spent)",
          "critical_path_layers": "critical-path depth (layers)"}
# The axes an ensemble is compared with a single model on (the spec's `compare`, default all).
COMPARED_X = ("parameters", "non_embedding_parameters", "train_flops", "critical_path_layers")
EQUAL_X_RTOL = 0.01  # x values this close (relative) are the same grid point
ALPHA_BOUNDS = (1e-4, 10.0)
ALPHA_GRID = np.geomspace(*ALPHA_BOUNDS, 400)
INTERVAL = (2.5, 97.5)  # percentiles of the bootstrap: a 95% interval
MIN_DISTINCT = 4  # distinct x, and distinct mean CE, a 3-parameter law needs to be determined (parameters + 1)
DISTINCT_CE_ATOL = 1e-4  # mean CEs this close (nats) are one value: a member that stayed at zero repeats its CE
CONFIDENCE = 0.95  # of the paired t-intervals
CURVE_COLUMNS = ("train_flops", "heldout_ce", "test_ce")  # a train_log evaluation row's point of the curve
PAIR_COLUMNS = ["axis", "x_value", "ensemble", "point", "ensemble_size", "single", "seed", "ensemble_ce",
                "single_ce", "difference", "single_from", "single_flops", "multiplier", "multiplier_bound",
                "students_multiplier", "students_multiplier_bound"]
VERDICT_COLUMNS = ["axis", "x_value", "ensemble", "point", "ensemble_size", "single", "seeds", "mean_difference",
                   "low", "high", "wins", "verdict", "ensemble_ce", "single_ce", "single_from", "multiplier_median",
                   "multiplier_low", "multiplier_high", "multiplier_reached", "multiplier_bound",
                   "students_multiplier_median", "students_multiplier_low", "students_multiplier_high",
                   "students_multiplier_reached", "students_multiplier_bound"]
STUDY_KEYS = {"name", "output", "preset", "settings", "seeds", "families", "compare", "vary_data"}
FAMILY_KEYS = {"name", "kind", "preset", "settings", "grid", "seeds", "split_by", "learning_rates", "match"}
# Each run's seed (and data_seed, unless vary_data is false) comes from `seeds`, its output_root from its name.
SET_BY_STUDY = {"seed", "data_seed", "output_root"}
MATCH_AXES = ("parameters", "non_embedding_parameters")  # what a single family's `match` can equal
MATCH_RTOL = 0.10  # a matched single model further than this from its target is refused
RANDOM_DEPTHS = range(1, 65)  # the layers a random student matched to an ensemble may have
RANDOM_WIDTHS = range(32, 2049, 32)  # or its width: where embeddings dominate, only width reaches a total
NAME = re.compile(r"[A-Za-z0-9_.+-]+")


class StudyError(ValueError):
    """A spec or a study folder the driver cannot use; the message says what to change."""


class FitError(ValueError):
    """Too few distinct x values (or none usable) to fit the 3-parameter law."""


# --- the spec and its grid ----------------------------------------------------------------------------------------

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


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    folder: Path
    points: list[Point]  # every run to make now: tuning runs, and the later seeds' runs once tuning is finished
    compare: tuple[str, ...] = COMPARED_X  # the axes the ensembles are compared with the single models on
    waiting: tuple[str, ...] = ()  # per family whose later seeds wait for its tuning: a line saying so
    tuning: tuple[dict, ...] = ()  # tuning.csv's rows: family, point, rate, heldout_ce, chosen
    matched: tuple[tuple[str, str, int], ...] = ()  # (single family, the ensemble family it matches, at what size)

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


def _mapping(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StudyError(f"{what} must be a mapping of key: value, not {value!r}")
    return dict(value)


def _seeds(value, what: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise StudyError(f"{what} must be a non-empty list of integers, not {value!r}")
    if len(set(values)) != len(values):
        raise StudyError(f"{what} repeats a seed: {value!r}")
    return values


def _check_keys(keys, what: str, reserved: set[str]) -> None:
    try:
        config_lib.check_keys(dict.fromkeys(keys), what)
    except config_lib.ConfigError as error:
        raise StudyError(str(error)) from error
    found = sorted(reserved & set(keys))
    if found:
        raise StudyError(f"{what} sets {', '.join(found)}: the study sets these per run (seed, and data_seed "
                         f"unless the spec says vary_data: false, come from `seeds`; output_root is "
                         f"STUDY/runs/NAME)")


def _compare(value) -> tuple[str, ...]:
    axes = list(COMPARED_X) if value is None else value if isinstance(value, list) else [value]
    unknown = [axis for axis in axes if axis not in COMPARED_X]
    if unknown:
        raise StudyError(f"compare: unknown axis {', '.join(map(repr, unknown))}; the axes are "
                         f"{', '.join(COMPARED_X)}")
    return tuple(axes)


def load_spec(path) -> Study:
    """Read and check a study spec; every grid point's config is built (config.build_config) so a bad key or value
    fails here, before anything runs. Runs of later seeds that wait for learning-rate tuning are built once the
    tuning runs are finished (each tuning rate's config is built and checked now)."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study spec {str(path)!r} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise StudyError(f"study spec {str(path)!r} must hold a mapping")
    unknown = sorted(set(spec) - STUDY_KEYS)
    if unknown:
        raise StudyError(f"unknown key(s) {unknown} in {path}; a spec has {sorted(STUDY_KEYS)}")
    name = str(spec.get("name") or "")
    if not NAME.fullmatch(name):
        raise StudyError(f"the spec's name {name!r} must be letters, digits and _.+- only")
    folder = Path(spec.get("output") or Path("studies") / name).resolve()
    vary_data = spec.get("vary_data", True)
    if not isinstance(vary_data, bool):
        raise StudyError(f"vary_data must be true or false, not {vary_data!r}")
    reserved = SET_BY_STUDY if vary_data else SET_BY_STUDY - {"data_seed"}
    base = _mapping(spec.get("settings"), "settings")
    _check_keys(base, f"{path}: settings", reserved)
    compare = _compare(spec.get("compare"))
    seeds = _seeds(spec.get("seeds", [0]), "seeds")
    if not isinstance(spec.get("families"), list) or not spec["families"]:
        raise StudyError(f"{path}: `families` must be a non-empty list")
    families = [parse_family(f, spec.get("preset", config_lib.DEFAULT_PRESET), base, seeds, reserved)
                for f in spec["families"]]
    check_families(families, compare)
    families = [match_family(f, families) if f.match else f for f in families]
    points, waiting, tuning = [], [], []
    for family in families:
        made, wait, rows = family_points(family, folder, vary_data)
        points += made
        waiting += [wait] if wait else []
        tuning += rows
    check_points(points)
    matched = tuple((f.name, f.match["family"], f.match["size"]) for f in families if f.match)
    return Study(name=name, folder=folder, points=points, compare=compare, waiting=tuple(waiting),
                 tuning=tuple(tuning), matched=matched)


def parse_family(family: dict, preset: str, base: dict, seeds: list[int], reserved: set[str]) -> Family:
    """A family of the spec, its keys and values checked (the configs are built by family_points)."""
    family = _mapping(family, "a family")
    unknown = sorted(set(family) - FAMILY_KEYS)
    if unknown:
        raise StudyError(f"unknown key(s) {unknown} in family {family.get('name')!r}; a family has "
                         f"{sorted(FAMILY_KEYS)}")
    name = str(family.get("name") or "")
    if not NAME.fullmatch(name):
        raise StudyError(f"family name {name!r} must be letters, digits and _.+- only")
    what = f"family {name!r}"
    settings = _mapping(family.get("settings"), f"{what}: settings")
    grid = {key: values if isinstance(values, list) else [values]
            for key, values in _mapping(family.get("grid"), f"{what}: grid").items()}
    _check_keys([*settings, *grid], what, reserved)
    if any(not values for values in grid.values()):
        raise StudyError(f"{what}: every grid key needs at least one value")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    baselines = {str({**base, **settings, **combo}.get("baseline", "none")) for combo in combos}
    kind = family.get("kind") or ("single" if baselines <= set(config_lib.SINGLE_MODEL_BASELINES) else "ensemble")
    if kind not in KINDS:
        raise StudyError(f"{what}: kind {kind!r} must be one of {', '.join(KINDS)}")
    default_split = [key for key in grid if key != "total_rounds"] if kind == "ensemble" else []
    split_by = family.get("split_by", default_split)
    if not isinstance(split_by, list) or set(split_by) - set(grid):
        raise StudyError(f"{what}: split_by must list grid keys, not {split_by!r}")
    rates = family.get("learning_rates") or []
    if not isinstance(rates, list) or not all(isinstance(r, (int, float)) and not isinstance(r, bool)
                                              for r in rates):
        raise StudyError(f"{what}: learning_rates must be a list of numbers, not {rates!r}")
    return Family(name=name, kind=kind, preset=family.get("preset", preset), settings={**base, **settings},
                  combos=combos, seeds=_seeds(family["seeds"], f"{what}: seeds") if "seeds" in family else seeds,
                  split_by=split_by, rates=[float(r) for r in rates], match=parse_match(family.get("match"), what,
                                                                                       kind))


def check_families(families: list[Family], compare: tuple[str, ...]) -> None:
    """What a comparison needs of the families together: a single-model family for the ensembles to be compared
    with (unless the spec compares nothing: `compare: []`), and learning rates tuned on both sides alike (as many
    rates for every family), or on none."""
    kinds = {f.kind for f in families}
    if compare and "ensemble" in kinds and "single" not in kinds:
        raise StudyError("nothing to compare the ensemble against: add a family of kind single (or say "
                         "`compare: []` for a study that compares nothing)")
    tuned = {f.name: len(f.rates) for f in families}
    untuned = [name for name, count in tuned.items() if count == 0]
    if len(untuned) < len(tuned) and untuned:
        raise StudyError(f"a learning-rate grid on one side only: family {', '.join(untuned)} has no "
                         f"learning_rates; tune every family over as many rates, or none")
    if len(set(tuned.values())) > 1:
        raise StudyError(f"a learning-rate grid on one side only: the families tune over different numbers of "
                         f"rates ({', '.join(f'{name}: {count}' for name, count in tuned.items())}); give every "
                         f"family as many")


def check_points(points: list[Point]) -> None:
    """Run names are unique, and every run shares one test set (config test_seed), or the paired comparison would
    compare CE on different texts."""
    names = [p.name for p in points]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise StudyError(f"run names repeat: {repeated} (two families with one name, or grid values that read the "
                         f"same in a folder name)")
    test_seeds = {}
    for point in points:
        test_seeds.setdefault(getattr(point.config, "test_seed", None), []).append(point.family)
    if len(test_seeds) > 1:
        which = "; ".join(f"test_seed {seed}: {', '.join(dict.fromkeys(names))}" for seed, names in
                          test_seeds.items())
        raise StudyError(f"the families set different test_seed values ({which}): a comparison must share its "
                         f"test set")


def make_point(family: Family, combo: dict, seed: int, folder: Path, vary_data: bool,
               rate: float | None = None, tuning: bool = False) -> Point:
    """The run of `family` at grid point `combo` and `seed` (at learning rate `rate` when the family tunes one)."""
    stated = {**family.settings, **combo, **({} if rate is None else {"learning_rate": rate})}
    data_seed = seed if vary_data else None
    run_name = "__".join([family.name, *(f"{key}-{name_part(value)}" for key, value in combo.items()),
                          *([] if rate is None else [f"lr-{name_part(rate)}"]), f"seed-{seed}"])
    try:
        config = config_lib.build_config(family.preset, overrides={
            k: cli_value(v) for k, v in {**stated, **per_run_settings(seed, data_seed)}.items()})
    except config_lib.ConfigError as error:
        raise StudyError(f"run {run_name}: {error}") from error
    if rate is not None and config.eval_steps <= 0:
        raise StudyError(f"family {family.name!r} tunes its learning rate, which is chosen on the early-stopping "
                         f"slice: its runs need eval_steps > 0 (run {run_name} has {config.eval_steps})")
    split = [f"{key}={cli_value(combo[key])}" for key in family.split_by]
    rest = ", ".join(f"{key}={cli_value(value)}" for key, value in combo.items() if key not in family.split_by)
    label = (rest or family.name) if family.kind == "single" else family.name
    return Point(name=run_name, family=family.name, kind=family.kind,
                 series=f"{family.name} ({', '.join(split)})" if split else family.name,
                 label=f"{label} {family.label_note}".strip(), preset=family.preset, settings=stated, seed=seed,
                 output_root=folder / "runs" / run_name, config=config, data_seed=data_seed,
                 grid_point=", ".join(f"{k}={cli_value(v)}" for k, v in combo.items()) or family.name,
                 tuning=tuning)


def family_points(family: Family, folder: Path, vary_data: bool) -> tuple[list[Point], str, list[dict]]:
    """(the runs to make now, a line when its later seeds wait for tuning, tuning.csv's rows). Without tuning:
    the cartesian product of its grid's lists, crossed with its seeds. With learning_rates: every grid point at
    every rate on the first seed; once those are finished, the later seeds at each grid point's chosen rate (the
    first seed's run at that rate is its run)."""
    if not family.rates:
        return [make_point(family, combo, seed, folder, vary_data) for combo in family.combos
                for seed in family.seeds], "", []
    first, later = family.seeds[0], family.seeds[1:]
    points, rows, chosen = [], [], []
    for combo in family.combos:
        runs = [make_point(family, combo, first, folder, vary_data, rate, tuning=True) for rate in family.rates]
        of_combo = tuning_rows(family, runs)
        chosen += [(combo, row["rate"]) for row in of_combo if row["chosen"]]
        points, rows = points + runs, rows + of_combo
    finished = sum(math.isfinite(row["heldout_ce"]) for row in rows)
    if finished < len(points):
        wait = (f"family {family.name}: seeds {', '.join(map(str, later))} wait for tuning ({finished} of "
                f"{len(points)} tuning runs finished)") if later else ""
        return points, wait, rows
    runs = [make_point(family, combo, seed, folder, vary_data, rate) for combo, rate in chosen
            for seed in family.seeds]
    kept = {p.name for p in runs}  # the first seed's run at the chosen rate is a tuning run no more
    return [p for p in points if p.name not in kept] + runs, "", rows


def tuning_rows(family: Family, runs: list[Point]) -> list[dict]:
    """One grid point's tuning runs (one per rate): each finished run's final early-stopping CE, and which rate is
    chosen (the lowest such CE; none until every rate's run is finished)."""
    ces = []
    for run in runs:
        status = point_status(run)
        ces.append(final_heldout_ce(status.run_dir) if status.state == "finished" else math.nan)
    done = all(math.isfinite(ce) for ce in ces)
    best = int(np.argmin(ces)) if done else -1
    return [dict(family=family.name, point=run.grid_point, rate=run.settings["learning_rate"], heldout_ce=ce,
                 chosen=i == best, run=run.name) for i, (run, ce) in enumerate(zip(runs, ces))]


def last_heldout_ce(run_dir: Path) -> float:
    """A run's final early-stopping CE: the best held-out CE of its last round's evaluations (train_log.csv); NaN
    without any. Choices between runs (a learning rate, a grid point) rest on it, never on the test CE."""
    log = plot.readable_train_log(RunLayout(Path(run_dir)).train_log)
    if log is None or "heldout_ce" not in log.columns or log["heldout_ce"].notna().sum() == 0:
        return math.nan
    evals = log.dropna(subset=["heldout_ce"])
    return float(evals.loc[evals["round"] == evals["round"].max(), "heldout_ce"].min())


def final_heldout_ce(run_dir: Path) -> float:
    """A tuning run's last_heldout_ce, which it must have: its learning rate is chosen by it."""
    ce = last_heldout_ce(run_dir)
    if not math.isfinite(ce):
        raise StudyError(f"{run_dir} has no early-stopping evaluations (heldout_ce in train_log.csv) to choose a "
                         f"learning rate by")
    return ce


# --- a single model matched to an ensemble's size -------------------------------------------------------------------

def parse_match(value, what: str, kind: str) -> dict | None:
    """A single family's `match: {axis, family, size}`, checked (the sizes are resolved by match_family)."""
    if value is None:
        return None
    match = _mapping(value, f"{what}: match")
    if kind != "single":
        raise StudyError(f"{what}: match sets a single model's size; this family is of kind {kind}")
    size = match.get("size")
    if (set(match) - {"axis", "family", "size"} or match.get("axis") not in MATCH_AXES or not match.get("family")
            or not (size is None or (isinstance(size, int) and not isinstance(size, bool) and size >= 1))):
        raise StudyError(f"{what}: match needs axis ({' or '.join(MATCH_AXES)}), family (an ensemble family) and "
                         f"optionally size (its ensemble size, >= 1), not {match!r}")
    return match


def match_family(family: Family, families: list[Family]) -> Family:
    """`family` with the size setting whose single model's axis value (parameters or non-embedding parameters) is
    the closest to the named ensemble family's at its size: refused when none is within MATCH_RTOL."""
    match, what = family.match, f"family {family.name!r}"
    ensemble = next((f for f in families if f.name == match["family"] and f.kind == "ensemble"), None)
    if ensemble is None:
        raise StudyError(f"{what}: match names {match['family']!r}, which is no ensemble family of this spec")
    configs = [family_config(ensemble, combo) for combo in ensemble.combos]
    size = match.get("size") or configs[0].total_rounds
    targets = sorted({ensemble_size_value(config, match["axis"], size) for config in configs})
    if len(targets) > 1:
        raise StudyError(f"{what}: the grid points of {ensemble.name!r} have different {match['axis']} ({targets}) "
                         f"at {size} members: match one family of one size")
    target = targets[0]
    candidates = size_candidates(family_config(family, family.combos[0]), match["axis"])
    setting, value = min(candidates, key=lambda candidate: abs(candidate[1] - target))
    if abs(value - target) > MATCH_RTOL * target:
        raise StudyError(f"{what}: no size of this family reaches {match['axis']} {target:,} (family "
                         f"{ensemble.name!r} at {size} members) within {MATCH_RTOL:.0%}; the nearest is {value:,} "
                         f"({', '.join(f'{k}={cli_value(v)}' for k, v in setting.items())})")
    note = f"(matched {match['axis']} {value:,} to {ensemble.name} x{size}: {target:,})"
    return dataclasses.replace(family, settings={**family.settings, **setting}, label_note=note,
                               match={**match, "size": size})


def family_config(family: Family, combo: dict) -> config_lib.Config:
    try:
        return config_lib.build_config(family.preset, overrides={k: cli_value(v) for k, v in
                                                                 {**family.settings, **combo}.items()})
    except config_lib.ConfigError as error:
        raise StudyError(f"family {family.name!r}: {error}") from error


@functools.lru_cache(maxsize=None)
def teacher_parts(teacher: str, cache_dir: str, trust_remote_code: bool):
    """(the teacher's model config as an object with a `config`, its tokenizer): what a student's shape depends
    on; only a spec with `match` needs them."""
    path = embedded.resolve_teacher(teacher, cache_dir)
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return types.SimpleNamespace(config=model_config), tokenizer


def student_shape(config: config_lib.Config, round_index: int):
    """A round's student's compute.ModelShape, from its model config on the meta device (no weight allocated)."""
    teacher, tokenizer = teacher_parts(config.teacher, str(config.cache_dir), config.trust_remote_code)
    model_config = students.student_model_config(config, teacher, tokenizer, round_index)
    return model_config, compute.model_shape(model_config, config.trust_remote_code)


def ensemble_size_value(config: config_lib.Config, axis: str, size: int) -> int:
    """An ensemble of `size` members' parameters (or non-embedding parameters): its rounds' students summed; with
    combine additive every member after the first gets its own output head (students.start_at_zero unties a tied
    one), which counts as embedding parameters."""
    total = 0
    for round_index in range(size):
        model_config, shape = student_shape(config, round_index)
        total += getattr(shape, axis)
        untied = round_index > 0 and config.combine == "additive" and getattr(model_config, "tie_word_embeddings",
                                                                              False)
        total += shape.head_parameters if untied and axis == "parameters" else 0
    return total


def size_candidates(config: config_lib.Config, axis: str) -> list[tuple[dict, int]]:
    """(size setting, axis value) for every size a single model of `config`'s family can take: teacher_layers
    students copy 1 to all of the teacher's layers (spread from first to last); random students have 1 to 64
    layers at their width, or their depth at a width of 32 to 2,048 (the MLP's width and the heads' count scaled
    with it, so its head size stays the family's)."""
    if config.student_init == "teacher_layers":
        teacher, _ = teacher_parts(config.teacher, str(config.cache_dir), config.trust_remote_code)
        layers = teacher.config.num_hidden_layers
        settings = [{"teacher_layers": students.spread_layer_indices(n, layers), "teacher_layers_shift": 0}
                    for n in range(1, layers + 1)]
    elif config.student_init == "random":
        settings = [{"student_num_layers": n} for n in RANDOM_DEPTHS] + [
            widened(config, width) for width in RANDOM_WIDTHS if width != config.student_hidden_size]
    else:
        raise StudyError(f"match sizes students of student_init teacher_layers or random, not "
                         f"{config.student_init!r}")
    return [(setting, getattr(student_shape(dataclasses.replace(config, **setting), 0)[1], axis))
            for setting in settings]


def widened(config: config_lib.Config, width: int) -> dict:
    """A random student's settings at another `width`: MLP and heads scaled in proportion (at least one head, its
    key/value heads dividing its heads), so the shape stays the family's."""
    scale = width / config.student_hidden_size
    heads = max(1, round(config.student_num_heads * scale))
    while width % heads:
        heads -= 1
    kv_heads = max(1, min(heads, round(config.student_num_kv_heads * scale)))
    while heads % kv_heads:
        kv_heads -= 1
    return {"student_hidden_size": width, "student_intermediate_size": max(1, round(
        config.student_intermediate_size * scale)), "student_num_heads": heads, "student_num_kv_heads": kv_heads}


# --- the state of a grid point --------------------------------------------------------------------------------------

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


# --- run mode ---------------------------------------------------------------------------------------------------------

def launch(args: list[str], log_path: Path) -> int:
    """Run main.py with `args` in a subprocess (from the current folder, as `python main.py` would be), its output
    into log_path; its exit code."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ python main.py {shlex.join(args)}\n")
        log.flush()
        return subprocess.run([sys.executable, str(MAIN), *args], stdout=log, stderr=subprocess.STDOUT).returncode


def run_study(study: Study) -> list[str]:
    """Run every grid point that is not finished, one after another: new ones started, unfinished ones resumed.
    The names of those that did not finish. Every point's run folders are checked first (point_status), so a
    folder made with other settings stops the study before anything runs."""
    for point in study.points:
        point_status(point)
    failed = []
    for index, point in enumerate(study.points, 1):
        status = point_status(point)
        prefix = f"[{index}/{len(study.points)}] {point.name}"
        if status.state == "finished":
            print(f"{prefix}: finished ({status.run_dir}), skipped")
            continue
        args = list(status.resume_args) if status.state == "unfinished" else point.run_args()
        log_path = study.folder / "logs" / f"{point.name}.log"
        print(f"{prefix}: {'resuming ' + str(status.run_dir) if status.resume_args else 'running'} "
              f"(log: {log_path})", flush=True)
        started = time.monotonic()
        code = launch(args, log_path)
        if code == 0 and point_status(point).state == "finished":
            print(f"{prefix}: done in {time.monotonic() - started:.0f} s", flush=True)
        else:
            failed.append(point.name)
            tail = log_path.read_text().splitlines()[-5:] if log_path.is_file() else []
            print(f"{prefix}: not finished (main.py exit code {code}); the end of its log:\n    "
                  + "\n    ".join(tail), flush=True)
    return failed


def dry_run_lines(study: Study) -> list[str]:
    statuses = [point_status(p) for p in study.points]
    counts = {state: sum(s.state == state for s in statuses) for state in ("finished", "unfinished", "missing")}
    lines = [f"Study {study.name}: {len(study.points)} runs in {study.folder} ({counts['finished']} finished, "
             f"{counts['unfinished']} unfinished, {counts['missing']} not started)"]
    width = max(len(p.name) for p in study.points)
    for point, status in zip(study.points, statuses):
        where = status.run_dir or point.output_root
        lines.append(f"  {status.state:<10} {point.name:<{width}}  {'tuning' if point.tuning else point.kind:<8} "
                     f"{where}")
    return lines + [f"  {line}" for line in study.waiting]


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


# --- collecting -------------------------------------------------------------------------------------------------------

def collect_rows(study: Study) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows, runs): every finished run's metrics rows with its name, family, series, kind, seed, run folder and
    stated settings as columns; and every grid point's status."""
    frames, runs = [], []
    setting_keys = list(dict.fromkeys(k for p in study.points for k in ["preset", *p.settings]))
    for point in (p for p in study.points if not p.tuning):  # a rate not chosen is in tuning.csv only
        status = point_status(point)
        runs.append(dict(run=point.name, family=point.family, series=point.series, kind=point.kind,
                         seed=point.seed, status=status.state, run_dir=str(status.run_dir or "")))
        if status.state != "finished":
            continue
        metrics = plot.load_run(status.run_dir).metrics
        study_columns = dict(run=point.name, family=point.family, series=point.series, kind=point.kind,
                             point=point.label, seed=point.seed, run_dir=str(status.run_dir),
                             final_heldout_ce=last_heldout_ce(status.run_dir))
        values = {"preset": point.preset, **{k: cli_value(v) for k, v in point.settings.items()}}
        for key in setting_keys:
            column = key if key not in metrics.columns and key not in study_columns else f"setting.{key}"
            study_columns[column] = values.get(key, "")
        frames.append(metrics.assign(**study_columns)[[*study_columns, *metrics.columns]])
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["run", "family", "series", "kind", "point", "seed", "run_dir", "final_heldout_ce"])
    return rows, pd.DataFrame(runs)


def observations(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per series, point and seed: test CE, the run's final early-stopping CE, gap_closed and the x columns
    there are. An ensemble run gives a point
    per ensemble size (its ensemble rows); a single-model run gives one (its final model). Several runs with the
    same series, point and seed (ensemble runs of different total_rounds share their small sizes) are averaged."""
    x_columns = [x for x in X_AXES if x in rows.columns]
    gap = ["gap_closed"] if "gap_closed" in rows.columns else []
    if rows.empty:
        return pd.DataFrame(columns=["series", "kind", "point", "order", "seed", "ce", "final_heldout_ce", *gap,
                                     *x_columns])
    models = rows[rows["model"] == "ensemble"].drop_duplicates(["run", "ensemble_size"], keep="last")
    models = models.sort_values(["run", "ensemble_size"], kind="stable")
    single = models["kind"] == "single"
    models = pd.concat([models[~single], models[single].groupby("run", sort=False).tail(1)])
    is_ensemble = models["kind"] == "ensemble"
    size = models["ensemble_size"].astype(int)
    series_rank = {series: i for i, series in enumerate(dict.fromkeys(rows["series"]))}
    models = models.assign(point=models["point"].where(~is_ensemble, size.map(lambda k: f"{k} member(s)")),
                           order=np.where(is_ensemble, size, 0), rank=models["series"].map(series_rank),
                           first=np.arange(len(models)))
    table = (models.groupby(["series", "kind", "point", "order", "seed"], sort=False)[
        ["ce", "final_heldout_ce", *gap, *x_columns, "rank", "first"]].mean().reset_index())
    table = table.sort_values(["rank", "order", "first"], kind="stable")
    return table.drop(columns=["rank", "first"]).reset_index(drop=True)


def point_table(obs: pd.DataFrame) -> pd.DataFrame:
    """Per series and point: seeds, mean and std of CE across seeds, and the mean of each x column."""
    x_columns = [x for x in X_AXES if x in obs.columns]
    if obs.empty:
        return pd.DataFrame(columns=["series", "kind", "point", "seeds", "ce_mean", "ce_std", *x_columns])
    grouped = obs.groupby(["series", "kind", "point"], sort=False)
    table = grouped["ce"].agg(seeds="count", ce_mean="mean", ce_std="std").reset_index()
    for x in x_columns:
        table[x] = grouped[x].mean().to_numpy()
    return table


# --- the power law ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L(x) = l_inf + a * x^-alpha, fitted to n points at n_x distinct x."""

    l_inf: float
    a: float
    alpha: float
    rss: float
    n: int
    n_x: int

    def __call__(self, x):
        return self.l_inf + self.a * np.power(np.asarray(x, dtype=float), -self.alpha)


def _law(u, l_inf, a, alpha):
    return l_inf + a * np.power(u, -alpha)


def _law_jacobian(u, l_inf, a, alpha):
    power = np.power(u, -alpha)
    return np.stack([np.ones_like(u), power, -a * power * np.log(u)], axis=1)


def fit_power_law(x, y) -> PowerLaw:
    """Least-squares fit of L(x) = L_inf + A x^-alpha with L_inf >= 0 and alpha in ALPHA_BOUNDS (A free: a negative
    A is CE rising with x). x is scaled by its geometric mean first, so FLOPs and sizes are fitted alike. For each
    alpha on a log grid, L_inf and A are a linear least-squares problem (L_inf clipped at 0); the best grid alpha
    starts scipy's curve_fit, whose result is kept when it is better. FitError with fewer than 3 distinct x."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[keep], y[keep]
    n_x = len(np.unique(x))
    if n_x < 3:
        raise FitError(f"{n_x} distinct x value(s) for 3 parameters: underdetermined, not fitted")
    scale = float(np.exp(np.log(x).mean()))
    u = x / scale
    powers = u[None, :] ** -ALPHA_GRID[:, None]
    centred = powers - powers.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = centred @ (y - y.mean()) / (centred ** 2).sum(axis=1)
        l_inf = y.mean() - a * powers.mean(axis=1)
        clipped = ~(l_inf >= 0)
        a[clipped] = powers[clipped] @ y / (powers[clipped] ** 2).sum(axis=1)
        l_inf[clipped] = 0.0
        rss = ((y[None, :] - l_inf[:, None] - a[:, None] * powers) ** 2).sum(axis=1)
    best = int(np.nanargmin(rss))
    params, best_rss = np.array([l_inf[best], a[best], ALPHA_GRID[best]]), float(rss[best])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)  # no covariance: the intervals come from the seeds
            refined, _ = curve_fit(_law, u, y, p0=params, jac=_law_jacobian, max_nfev=20_000,
                                   bounds=([0.0, -np.inf, ALPHA_BOUNDS[0]], [np.inf, np.inf, ALPHA_BOUNDS[1]]),
                                   ftol=1e-15, xtol=1e-15, gtol=1e-15)
        refined_rss = float(((y - _law(u, *refined)) ** 2).sum())
        if refined_rss <= best_rss:
            params, best_rss = refined, refined_rss
    except (RuntimeError, ValueError):
        pass  # the grid's best stands
    l_inf_fit, a_scaled, alpha = (float(v) for v in params)
    return PowerLaw(l_inf=l_inf_fit, a=a_scaled * scale ** alpha, alpha=alpha, rss=best_rss, n=len(x), n_x=n_x)


def bootstrap_laws(obs: pd.DataFrame, x: str, replicates: int, seed: int = 0) -> np.ndarray:
    """(k, 3) rows of l_inf, a, alpha: the law refitted to `replicates` resamples of the seeds (with replacement;
    each seed brings all its points), resamples that cannot be fitted left out. Empty with one seed."""
    seeds = list(dict.fromkeys(obs["seed"]))
    if len(seeds) < 2 or replicates < 1:
        return np.empty((0, 3))
    by_seed = {s: (obs.loc[obs["seed"] == s, x].to_numpy(float), obs.loc[obs["seed"] == s, "ce"].to_numpy(float))
               for s in seeds}
    rng = np.random.default_rng(seed)
    fitted: dict[tuple, tuple | None] = {}  # a resample is a multiset of seeds: few seeds give few distinct ones
    laws = []
    for _ in range(replicates):
        picked = tuple(sorted(rng.integers(len(seeds), size=len(seeds))))
        if picked not in fitted:
            try:
                law = fit_power_law(np.concatenate([by_seed[seeds[i]][0] for i in picked]),
                                    np.concatenate([by_seed[seeds[i]][1] for i in picked]))
                fitted[picked] = (law.l_inf, law.a, law.alpha)
            except FitError:
                fitted[picked] = None
        if fitted[picked] is not None:
            laws.append(fitted[picked])
    return np.array(laws).reshape(-1, 3)


@dataclasses.dataclass(frozen=True)
class Fitted:
    """A series' law against one x, or why there is none (law None)."""

    series: str
    x: str
    law: PowerLaw | None
    note: str
    boot: np.ndarray  # bootstrap l_inf, a, alpha

    @property
    def determined(self) -> bool:
        """Fitted with alpha inside its bounds: a law at its bound is a step or a line, not a power law, so it is
        neither drawn nor read between points."""
        return self.law is not None and ALPHA_BOUNDS[0] * 1.001 < self.law.alpha < ALPHA_BOUNDS[1] * 0.999

    def interval(self, index: int) -> tuple[float, float]:
        if len(self.boot) < 2:
            return math.nan, math.nan
        low, high = np.percentile(self.boot[:, index], INTERVAL)
        return float(low), float(high)


def too_few_points(part: pd.DataFrame, x: str) -> str:
    """Why a curve's points cannot determine the 3-parameter law ("" when they can): it needs MIN_DISTINCT
    distinct x values and as many distinct mean CEs (means within DISTINCT_CE_ATOL count once, as additive members
    that stayed at zero repeat the CE before them)."""
    means = np.sort(part.groupby(x)["ce"].mean().to_numpy(float))
    distinct_ce = 1 + int((np.diff(means) > DISTINCT_CE_ATOL).sum()) if len(means) else 0
    if len(means) >= MIN_DISTINCT and distinct_ce >= MIN_DISTINCT:
        return ""
    return (f"{len(means)} distinct x and {distinct_ce} distinct mean CE for 3 parameters (a fit needs "
            f"{MIN_DISTINCT} of each): not fitted")


def fit_notes(law: PowerLaw, boot: np.ndarray) -> str:
    note = []
    if not ALPHA_BOUNDS[0] * 1.001 < law.alpha < ALPHA_BOUNDS[1] * 0.999:
        note.append(f"not determined (alpha at its bound {law.alpha:g})")
    if law.l_inf == 0:
        note.append("L_inf at its bound 0")
    if law.a < 0:
        note.append("A < 0: CE rises with x")
    if len(boot) < 2:
        note.append("one seed: no interval")
    return "; ".join(note)


def fit_all(obs: pd.DataFrame, rows_columns, replicates: int) -> tuple[list[Fitted], list[str]]:
    """Every series' law against every x axis; notes for the fits skipped (a missing column, too few points)."""
    fits, notes = [], []
    for x in X_AXES:
        if x not in rows_columns:
            notes.append(f"x = {x}: metrics.csv has no `{x}` column, so no fit against {X_AXES[x]} and no "
                         f"figure (a main.py that writes it fills this in on the next --collect)")
            continue
        for series, part in obs.groupby("series", sort=False):
            if x == "ensemble_size" and (part["kind"] == "single").all():
                continue  # a single model has size 1
            part = part.dropna(subset=[x, "ce"])
            reason = too_few_points(part, x)
            if reason:
                fits.append(Fitted(series, x, None, reason, np.empty((0, 3))))
                notes.append(f"{series}, x = {x}: {reason}")
                continue
            law = fit_power_law(part[x], part["ce"])
            boot = bootstrap_laws(part, x, replicates)
            fits.append(Fitted(series, x, law, fit_notes(law, boot), boot))
    return fits, notes


def fits_table(fits: list[Fitted]) -> pd.DataFrame:
    rows = []
    for fit in fits:
        law = fit.law
        row = dict(series=fit.series, x=fit.x, points=law.n if law else 0, distinct_x=law.n_x if law else 0,
                   fitted=law is not None, determined=fit.determined)
        for i, name in enumerate(("l_inf", "a", "alpha")):
            low, high = fit.interval(i)
            row.update({name: getattr(law, name) if law else math.nan, f"{name}_low": low, f"{name}_high": high})
        row.update(rss=law.rss if law else math.nan, bootstrap_fits=len(fit.boot), note=fit.note)
        rows.append(row)
    return pd.DataFrame(rows, columns=["series", "x", "points", "distinct_x", "fitted", "determined", "l_inf",
                                       "l_inf_low", "l_inf_high", "a", "a_low", "a_high", "alpha", "alpha_low",
                                       "alpha_high", "rss", "bootstrap_fits", "note"])


# --- the comparison: paired over seeds --------------------------------------------------------------------------

def single_at(points: pd.DataFrame, x: str, value: float) -> tuple[float, str] | None:
    """One seed's single-model CE at x = value: its grid point there (when several share that x, as the `matched`
    family's lengths share one size, the one of the lowest final early-stopping CE); else, inside its points'
    range, log-linear interpolation between its neighbouring points. None outside their range: a curve
    extrapolated from a few points can say anything. `points`: the series' observations of that seed."""
    points = points.dropna(subset=[x]).sort_values(x)
    xs = points[x].to_numpy(float)
    equal = np.isclose(xs, value, rtol=EQUAL_X_RTOL, atol=0)
    if equal.any():
        there = points[equal]
        by_heldout = there["final_heldout_ce"].notna().all()
        row = there.sort_values("final_heldout_ce" if by_heldout else "ce", kind="stable").iloc[0]
        best_of = "" if len(there) == 1 else f", best of {len(there)} there by " + (
            "early-stopping CE" if by_heldout else "test CE (no early-stopping CE)")
        return float(row["ce"]), f"grid point {row['point']}{best_of}"
    if len(xs) < 2 or not xs[0] <= value <= xs[-1]:
        return None
    return float(np.interp(math.log(value), np.log(xs), points["ce"].to_numpy(float))), "interpolated"


@dataclasses.dataclass(frozen=True)
class Curve:
    """A single-model series' learning curve on one seed: its runs' early-stopping evaluations, pooled (each row's
    train_flops is what its run had spent by then), sorted by train_flops and, at equal spend, held-out CE."""

    evals: pd.DataFrame  # train_flops, heldout_ce, test_ce (and flops_teacher where the log has it)
    spent: float  # the most one of its runs spent in all
    from_metrics: bool  # old runs without the curve's columns: their final point only

    @property
    def fixed_flops(self) -> float:
        """The one-off cost every evaluation carries alike, the teacher cache's build (a cached teacher's charge
        does not grow with the steps): both sides of a paired comparison pay it. 0 for an online teacher."""
        if "flops_teacher" not in self.evals or self.evals["flops_teacher"].isna().any():
            return 0.0
        teacher = self.evals["flops_teacher"].to_numpy(float)
        return float(teacher[0]) if np.all(teacher == teacher[0]) else 0.0

    def at(self, budget: float) -> pd.Series | None:
        """The evaluation chosen within `budget`: the lowest held-out CE among those that had spent at most it
        (chosen on the early-stopping slice, never on the test CE). None when the first already spent more."""
        within = self.evals[self.evals["train_flops"] <= budget * (1 + 1e-9)]
        return None if within.empty else within.loc[within["heldout_ce"].idxmin()]

    def multiplier(self, ce: float, budget: float) -> tuple[float, float]:
        """(F'/budget for the smallest spend F' whose chosen evaluation's test CE is <= ce, NaN when none is;
        the curve's whole spend / budget, the bound a censored multiplier exceeds)."""
        best, test = math.inf, math.inf
        for row in self.evals.itertuples(index=False):
            if row.heldout_ce < best:
                best, test = row.heldout_ce, row.test_ce
            if test <= ce:
                return row.train_flops / budget, math.nan
        return math.nan, self.spent / budget


def run_evals(run_dir: str, final: pd.Series) -> tuple[pd.DataFrame, bool]:
    """A single-model run's early-stopping evaluations (train_flops, heldout_ce, test_ce) from its train_log;
    a run whose log lacks these columns gives its final metrics row as its one point (True: from metrics)."""
    log = plot.readable_train_log(RunLayout(Path(run_dir)).train_log)
    if log is not None and set(CURVE_COLUMNS) <= set(log.columns):
        columns = [*CURVE_COLUMNS, *(["flops_teacher"] if "flops_teacher" in log.columns else [])]
        evals = log.dropna(subset=list(CURVE_COLUMNS))[columns]
        if len(evals):
            return evals, False
    return pd.DataFrame({"train_flops": [final["train_flops"]], "heldout_ce": [final["ce"]],
                         "test_ce": [final["ce"]]}), True


def single_curves(rows: pd.DataFrame) -> tuple[dict[tuple[str, int], Curve], list[str]]:
    """Per single-model series and seed, its Curve; notes on old runs (no curve) and on what was left out."""
    if rows.empty or "train_flops" not in rows.columns:
        return {}, []
    finals = rows[(rows["kind"] == "single") & (rows["model"] == "ensemble")].groupby("run", sort=False).tail(1)
    curves, notes = {}, []
    for (series, seed), runs in finals.groupby(["series", "seed"], sort=False):
        parts = [run_evals(run.run_dir, run) for _, run in runs.iterrows()]
        from_metrics = any(old for _, old in parts)
        if from_metrics and len(parts) > 1:  # pooling final points would choose among runs on the test CE
            notes.append(f"{series}, seed {seed}: {len(parts)} runs without an early-stopping curve (train_log "
                         f"without train_flops, heldout_ce, test_ce): no train_flops comparison")
            continue
        if from_metrics:
            notes.append(f"{series}, seed {seed}: its train_log has no train_flops, heldout_ce, test_ce (an old "
                         f"run): its final point stands for its curve")
        evals = pd.concat([e for e, _ in parts]).sort_values(["train_flops", "heldout_ce"], kind="stable")
        spent = float(np.nanmax([runs["train_flops"].max(), evals["train_flops"].max()]))
        curves[(series, int(seed))] = Curve(evals.reset_index(drop=True), spent, from_metrics)
    return curves, notes


def paired_single(obs: pd.DataFrame, curves: dict, axis: str, single: str, ensemble) -> dict | None:
    """The single-model series' CE paired with one ensemble observation (same seed), or None where there is none:
    on train_flops its curve's choice within the ensemble's spend, and the compute multiplier; on the other axes
    its grid point at the ensemble's x or its interpolation."""
    if axis == "train_flops":
        curve = curves.get((single, int(ensemble.seed)))
        budget = float(ensemble.train_flops)
        chosen = None if curve is None else curve.at(budget)
        if chosen is None:
            return None
        multiplier, bound = curve.multiplier(float(ensemble.ce), budget)
        fixed = curve.fixed_flops if curve.fixed_flops < budget else 0.0
        return dict(single_ce=float(chosen["test_ce"]), single_flops=float(chosen["train_flops"]),
                    single_from="final point (no curve)" if curve.from_metrics else "early-stopping curve",
                    multiplier=multiplier, multiplier_bound=bound,
                    students_multiplier=without_fixed(multiplier, budget, fixed),
                    students_multiplier_bound=without_fixed(bound, budget, fixed))
    found = single_at(obs[(obs["series"] == single) & (obs["seed"] == ensemble.seed)], axis,
                      float(getattr(ensemble, axis)))
    return None if found is None else dict(single_ce=found[0], single_flops=math.nan, single_from=found[1],
                                           multiplier=math.nan, multiplier_bound=math.nan,
                                           students_multiplier=math.nan, students_multiplier_bound=math.nan)


def without_fixed(ratio: float, budget: float, fixed: float) -> float:
    """A multiplier of the whole spend (F' / F, F = `budget`) as one of the students' compute alone:
    (F' - fixed) / (F - fixed), the one-off cost both sides pay alike taken off both spends."""
    return (ratio * budget - fixed) / (budget - fixed)


def pairs_table(obs: pd.DataFrame, curves: dict, axes) -> tuple[pd.DataFrame, list[str]]:
    """comparison.csv: per axis, ensemble point, single-model series and seed, the ensemble's CE and the single
    model's from the run of the same seed, and their difference (negative: the ensemble is better). Notes on the
    seeds left out because the single model's first evaluation had already spent more than the ensemble."""
    singles = [s for s in dict.fromkeys(obs["series"]) if (obs.loc[obs["series"] == s, "kind"] == "single").all()]
    ensembles = obs[obs["kind"] == "ensemble"]
    rows, notes = [], []
    for axis in (a for a in axes if a in obs.columns):
        for (series, point), part in ensembles.dropna(subset=[axis]).groupby(["series", "point"], sort=False):
            for single in singles:
                late = []
                for ensemble in part.itertuples(index=False):
                    found = paired_single(obs, curves, axis, single, ensemble)
                    if found is None and (single, int(ensemble.seed)) in curves and axis == "train_flops":
                        late.append(str(ensemble.seed))
                    if found is not None:
                        rows.append(dict(axis=axis, x_value=float(getattr(ensemble, axis)), ensemble=series,
                                         point=point, ensemble_size=int(ensemble.order), single=single,
                                         seed=int(ensemble.seed), ensemble_ce=float(ensemble.ce),
                                         difference=float(ensemble.ce) - found["single_ce"], **found))
                if late:
                    notes.append(f"{single} against {series}, {point} (train_flops): on seed {', '.join(late)} its "
                                 f"first evaluation had already spent more than the ensemble: no pair")
    return pd.DataFrame(rows, columns=PAIR_COLUMNS), notes


def paired_interval(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval of the mean (n - 1 degrees of freedom); no interval for one value."""
    n, mean = len(values), float(np.mean(values))
    if n < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * float(np.std(values, ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(low: float, high: float, n: int) -> str:
    if n < 2:
        return "one seed: no interval"
    return "ensemble better" if high < 0 else "single better" if low > 0 else "no difference shown"


def multiplier_summary(multipliers: np.ndarray, bounds: np.ndarray, name: str = "multiplier") -> dict:
    """Over seeds: the median multiplier, and when every seed reached the ensemble's CE, the 95% t-interval of the
    geometric mean (on log multipliers); else the smallest bound the censored seeds exceed. Keys start with
    `name`."""
    reached = np.isfinite(multipliers)
    out = {f"{name}_median": math.nan, f"{name}_low": math.nan, f"{name}_high": math.nan,
           f"{name}_reached": int(reached.sum()), f"{name}_bound": math.nan}
    median = float(np.median(np.where(reached, multipliers, np.inf)))  # a censored seed lies above every bound
    out[f"{name}_median"] = median if math.isfinite(median) else math.nan
    if reached.all() and (multipliers > 0).all():
        _, low, high = paired_interval(np.log(multipliers))
        out.update({f"{name}_low": math.exp(low), f"{name}_high": math.exp(high)})
    elif not reached.all():
        out[f"{name}_bound"] = float(np.min(bounds[~reached]))
    return out


def verdict_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """verdicts.csv: per axis, ensemble point and single-model series, the paired differences over seeds: their
    mean and 95% t-interval, the seeds the ensemble wins, the verdict, both sides' mean CE, and (train_flops) the
    compute multiplier."""
    rows = []
    for (axis, ensemble, point, single), part in pairs.groupby(["axis", "ensemble", "point", "single"], sort=False):
        differences = part["difference"].to_numpy(float)
        mean, low, high = paired_interval(differences)
        row = dict(axis=axis, x_value=part["x_value"].mean(), ensemble=ensemble, point=point,
                   ensemble_size=int(part["ensemble_size"].iloc[0]), single=single, seeds=len(part),
                   mean_difference=mean, low=low, high=high, wins=int((differences < 0).sum()),
                   verdict=verdict(low, high, len(part)), ensemble_ce=part["ensemble_ce"].mean(),
                   single_ce=part["single_ce"].mean(), single_from="; ".join(dict.fromkeys(part["single_from"])))
        if axis == "train_flops":
            for name in ("multiplier", "students_multiplier"):
                row.update(multiplier_summary(part[name].to_numpy(float), part[f"{name}_bound"].to_numpy(float),
                                              name))
        rows.append(row)
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


# --- the teacher gap: how much of it each member size's ensemble closes -------------------------------------------

GAP_COLUMNS = ["family", "series", "member_size", "ensemble_size", "seeds", "ensemble_ce", "ensemble_ce_low",
               "ensemble_ce_high", "ensemble_gap_closed", "ensemble_gap_closed_low", "ensemble_gap_closed_high",
               "start_ce", "single", "single_point", "matched_size", "single_seeds", "single_ce", "single_ce_low",
               "single_ce_high", "single_gap_closed", "single_gap_closed_low", "single_gap_closed_high",
               "single_gap_closed_on_member_scale", "single_gap_closed_on_member_scale_low",
               "single_gap_closed_on_member_scale_high", "teacher_ce"]


def member_size(config: config_lib.Config) -> str:
    """What sizes a run's members, as teacher_gap.csv names it: the teacher layers a student copies, a random
    student's depth and width, or a pretrained student's name."""
    if config.student_init == "teacher_layers":
        return f"{len(config.teacher_layers)} teacher layers"
    if config.student_init == "random":
        return f"{config.student_num_layers} layers x {config.student_hidden_size} wide"
    return str(config.student_model)


def _interval_columns(prefix: str, values) -> dict:
    mean, low, high = paired_interval(np.asarray(values, dtype=float)) if len(values) else (math.nan,) * 3
    return {prefix: mean, f"{prefix}_low": low, f"{prefix}_high": high}


def teacher_gap_table(rows: pd.DataFrame, matched, member_sizes: dict[str, str]) -> pd.DataFrame:
    """teacher_gap.csv: per ensemble series (a member size), its best ensemble (the size of the lowest mean test CE
    over seeds) with the mean test CE and gap closed over seeds, each with its 95% t-interval; and each single-model
    series matched to its family (`matched`: (single family, ensemble family, size) as the spec's `match`), its
    CE and gap closed alike. gap_closed is metrics.csv's: each run's share of the gap from its own round-0 untrained
    student (`start_ce`, the mean over seeds) to the teacher; a matched single model starts elsewhere, so its CE
    is also given on the ensemble's scale (single_gap_closed_on_member_scale: (start_ce - CE) / (start_ce -
    teacher_ce), the ensemble's start and the teacher as ends). One row per ensemble series and matched single
    series (one with the single's columns empty where none is matched); empty without ensemble rows."""
    if rows.empty or not (rows["kind"] == "ensemble").any():
        return pd.DataFrame(columns=GAP_COLUMNS)
    obs = observations(rows)
    if "gap_closed" not in obs.columns:
        obs = obs.assign(gap_closed=math.nan)
    teachers = rows[rows["model"] == "teacher"].groupby("run")["ce"].first()
    teacher = float(teachers.mean()) if len(teachers) else math.nan
    untrained = rows[(rows["model"] == "student_untrained") & (rows["round"] == 0)]
    table = []
    for series, part in obs[obs["kind"] == "ensemble"].groupby("series", sort=False):
        means = part.groupby("order", sort=True)["ce"].mean()
        best = int(means.idxmin())  # the first of equal means: the smallest ensemble
        at_best = part[part["order"] == best]
        family = rows.loc[rows["series"] == series, "family"].iloc[0]
        starts = untrained.loc[untrained["series"] == series].groupby("run")["ce"].first()
        start = float(starts.mean()) if len(starts) else math.nan
        row = dict(family=family, series=series, member_size=member_sizes.get(series, ""), ensemble_size=best,
                   seeds=len(at_best), **_interval_columns("ensemble_ce", at_best["ce"]),
                   **_interval_columns("ensemble_gap_closed", at_best["gap_closed"].dropna()), start_ce=start,
                   teacher_ce=teacher)
        singles = [(single, size) for single, ensemble, size in matched if ensemble == family]
        single_rows = []
        for single_family, size in singles:
            series_of = rows.loc[rows["family"] == single_family, "series"].unique()
            for single in series_of:
                for point, chosen in obs[obs["series"] == single].groupby("point", sort=False):
                    ce = _interval_columns("single_ce", chosen["ce"])
                    scale = start - teacher
                    on_member = {key.replace("single_ce", "single_gap_closed_on_member_scale"):
                                 (start - value) / scale if scale else math.nan for key, value in ce.items()}
                    low_key = "single_gap_closed_on_member_scale_low"  # a higher CE is a lower share: swap the ends
                    high_key = "single_gap_closed_on_member_scale_high"
                    on_member[low_key], on_member[high_key] = on_member[high_key], on_member[low_key]
                    single_rows.append(dict(row, single=single, single_point=point, matched_size=size,
                                            single_seeds=len(chosen), **ce, **on_member,
                                            **_interval_columns("single_gap_closed", chosen["gap_closed"].dropna())))
        table += single_rows or [row]
    return pd.DataFrame(table, columns=GAP_COLUMNS)


def gap_lines(gap: pd.DataFrame) -> list[str]:
    """summary.md's section of teacher_gap.csv."""
    if gap.empty:
        return []

    def shown(row, name: str) -> str:
        return "–" if not math.isfinite(row[name]) else (
            f"{row[name]:.3f} [{row[f'{name}_low']:.3f}, {row[f'{name}_high']:.3f}]"
            if math.isfinite(row[f"{name}_low"]) else f"{row[name]:.3f}")
    lines = ["", "## The teacher gap closed, per member size (teacher_gap.csv)", "",
             "Per ensemble series, its best ensemble (the size of the lowest mean test CE) and the single models "
             "matched to its family, mean over seeds [95% t-interval]. Gap closed: the share of the gap from the "
             "run's own untrained student to the teacher; the single model's also on the ensemble's scale (from "
             "the ensemble's untrained member).", ""]
    return lines + _markdown(pd.DataFrame({
        "ensemble": gap["series"], "member size": gap["member_size"], "best size": gap["ensemble_size"],
        "CE": [shown(r, "ensemble_ce") for _, r in gap.iterrows()],
        "gap closed": [shown(r, "ensemble_gap_closed") for _, r in gap.iterrows()],
        "matched single (x size)": [f"{r['single']} (x{int(r['matched_size'])})" if isinstance(r["single"], str)
                                    and r["single"] else "–" for _, r in gap.iterrows()],
        "single CE": [shown(r, "single_ce") for _, r in gap.iterrows()],
        "single gap closed (own; ensemble's scale)": [
            f"{shown(r, 'single_gap_closed')}; {shown(r, 'single_gap_closed_on_member_scale')}"
            for _, r in gap.iterrows()],
        "teacher CE": gap["teacher_ce"].map(lambda v: f"{v:.4f}" if math.isfinite(v) else "–")}))


# --- figures ----------------------------------------------------------------------------------------------------------

def ce_figure(points: pd.DataFrame, fits: list[Fitted], x: str, teacher: float | None) -> Figure:
    """Mean CE against x (log axis) per series, seed std as error bars, each fitted law as a dashed curve; the
    teacher as a dotted line. Against ensemble size, single-model series are their best point, a dashed line."""
    fig = Figure(figsize=(7.2, 4.8), layout="constrained")
    ax = fig.subplots()
    by_key = {(f.series, f.x): f for f in fits}
    for i, series in enumerate(dict.fromkeys(points["series"])):
        color = f"C{i % 10}"
        part = points[points["series"] == series].dropna(subset=[x]).sort_values(x)
        if part.empty:
            continue
        if x == "ensemble_size" and (part["kind"] == "single").all():
            best = part.loc[part["ce_mean"].idxmin()]
            ax.axhline(best["ce_mean"], color=color, linestyle="--",
                       label=f"{series}, best ({best['point']}): {best['ce_mean']:.3f}")
            continue
        ax.errorbar(part[x], part["ce_mean"], yerr=part["ce_std"].fillna(0.0), color=color, marker="o",
                    linestyle="none", capsize=3, label=f"{series} (mean ± std over seeds)")
        fit = by_key.get((series, x))
        if fit is not None and fit.determined:
            grid = np.geomspace(part[x].min(), part[x].max(), 100)
            ax.plot(grid, fit.law(grid), color=color, linestyle="--",
                    label=f"fit: {fit.law.l_inf:.3g} + {fit.law.a:.3g} x^-{fit.law.alpha:.3g}")
    if teacher is not None:
        ax.axhline(teacher, color="gray", linestyle=":", label=f"teacher: {teacher:.3f}")
    ax.set_xscale("log")
    if x == "ensemble_size":
        sizes = sorted(points["ensemble_size"].dropna().unique())
        ax.set_xticks(sizes, labels=[f"{int(s)}" for s in sizes])
        ax.minorticks_off()
    ax.set_xlabel(f"{X_AXES[x]} (log scale)")
    ax.set_ylabel(plot.CE_LABEL)
    ax.set_title(f"Held-out CE against {X_AXES[x]}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return fig


def curves_figure(obs: pd.DataFrame, curves: dict, teacher: float | None, title: str) -> Figure:
    """Test CE against training FLOPs spent (log x): each single-model series' learning curve per seed (the test
    CE of its best evaluation on the early-stopping slice so far: what the comparison reads at a spend), and each
    ensemble point per seed, at the FLOPs it spent; the teacher dotted."""
    fig = Figure(figsize=(7.2, 4.8), layout="constrained")
    ax = fig.subplots()
    colors = {series: f"C{i % 10}" for i, series in enumerate(dict.fromkeys(obs["series"]))}
    for (series, _), curve in curves.items():
        chosen = curve.evals.assign(best=curve.evals["heldout_ce"].cummin())
        chosen = chosen[chosen["heldout_ce"] == chosen["best"]]
        labelled = series in {line.get_label() for line in ax.get_lines()}
        ax.step(chosen["train_flops"], chosen["test_ce"], where="post", color=colors[series], alpha=0.6,
                label="_nolegend_" if labelled else series)
    ensembles = obs[obs["kind"] == "ensemble"].dropna(subset=["train_flops"])
    for (series, point), part in ensembles.groupby(["series", "point"], sort=False):
        ax.scatter(part["train_flops"], part["ce"], color=colors[series], marker=f"${point.split()[0]}$", s=60,
                   label=f"{series}, {point}")
    if teacher is not None:
        ax.axhline(teacher, color="gray", linestyle=":", label=f"teacher: {teacher:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs spent (log scale)")
    ax.set_ylabel(plot.CE_LABEL)
    ax.set_title(f"{title}: single models' learning curves and ensembles, one line or mark per seed")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return fig


def study_figures(points: pd.DataFrame, fits: list[Fitted], teacher: float | None, obs: pd.DataFrame,
                  curves: dict, title: str) -> dict[str, Figure]:
    """ce_vs_<x> for each x axis metrics.csv has, and the learning curves against FLOPs where there are any."""
    figures = {f"ce_vs_{x}": ce_figure(points, fits, x, teacher) for x in X_AXES
               if x in points.columns and points[x].notna().any()}
    if curves:
        figures["curves_vs_train_flops"] = curves_figure(obs, curves, teacher, title)
    return figures


# --- summary ----------------------------------------------------------------------------------------------------------

def _number(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if float(value).is_integer() and abs(value) < 1e6:
        return f"{int(value)}"
    return f"{value:.{digits}g}"


def _interval(row, name: str) -> str:
    value, low, high = row[name], row[f"{name}_low"], row[f"{name}_high"]
    if not math.isfinite(value):
        return "–"
    if not (math.isfinite(low) and math.isfinite(high)):
        return _number(value)
    return f"{_number(value)} [{_number(low)}, {_number(high)}]"


def _markdown(table: pd.DataFrame) -> list[str]:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return lines


def _signed(value: float) -> str:
    return f"{value:+.3f}" if math.isfinite(value) else "–"


def _multiplier(row, name: str = "multiplier") -> str:
    """A verdict row's compute multiplier (`name`: of all the spend, or of the students' alone) as summary.md
    quotes it."""
    if row["axis"] != "train_flops":
        return ""
    seeds, reached = int(row["seeds"]), int(row[f"{name}_reached"])
    if reached == seeds:
        interval = (f", geometric mean 95% CI [{row[f'{name}_low']:.2f}, {row[f'{name}_high']:.2f}]"
                    if math.isfinite(row[f"{name}_low"]) else "")
        return f"median {row[f'{name}_median']:.2f}×{interval}"
    median = f"median {row[f'{name}_median']:.2f}×; " if math.isfinite(row[f"{name}_median"]) else ""
    return f"{median}not reached: > {row[f'{name}_bound']:.2f}× on {seeds - reached} of {seeds} seeds"


def verdict_lines(verdicts: pd.DataFrame) -> list[str]:
    """summary.md's table of verdicts.csv, each verdict with its axis."""
    if verdicts.empty:
        return ["No comparison: it needs ensemble and single-model runs of the same seeds with the compared axes' "
                "columns in metrics.csv, at x values the single models cover (on train_flops: a single model's "
                "first evaluation within the ensemble's spend)."]
    return _markdown(pd.DataFrame({
        "axis": verdicts["axis"], "at": verdicts["x_value"].map(_number), "ensemble": verdicts["ensemble"],
        "members": verdicts["ensemble_size"], "single": verdicts["single"],
        "CE ensemble / single": [f"{e:.4f} / {s:.4f}" for e, s in zip(verdicts["ensemble_ce"],
                                                                      verdicts["single_ce"])],
        "ensemble − single [95% CI]": [f"{_signed(m)} [{_signed(lo)}, {_signed(hi)}]" for m, lo, hi in
                                       zip(verdicts["mean_difference"], verdicts["low"], verdicts["high"])],
        "wins": [f"{w} of {n}" for w, n in zip(verdicts["wins"], verdicts["seeds"])],
        "verdict": verdicts["verdict"], "compute multiplier": [_multiplier(r) for _, r in verdicts.iterrows()],
        "students' compute multiplier": [_multiplier(r, "students_multiplier") for _, r in verdicts.iterrows()]}))


def summary_markdown(study: Study, runs: pd.DataFrame, points: pd.DataFrame, fits: pd.DataFrame,
                     verdicts: pd.DataFrame, notes: list[str], teacher: float | None,
                     gap: pd.DataFrame | None = None, latency: pd.DataFrame | None = None) -> str:
    counts = runs["status"].value_counts() if len(runs) else pd.Series(dtype=int)
    lines = [f"# Study {study.name}", "",
             f"{len(runs)} runs: {counts.get('finished', 0)} finished, {counts.get('unfinished', 0)} unfinished, "
             f"{counts.get('missing', 0)} not started; only finished runs count below. CE is test cross-entropy, "
             f"nats per supervised token."
             + (f" Teacher: {teacher:.4f}." if teacher is not None else ""), "",
             *(f"{line}." for line in study.waiting), "## CE per point (mean ± std over seeds)", ""]
    x_columns = [x for x in X_AXES if x in points.columns]
    shown = pd.DataFrame({"series": points["series"], "point": points["point"], "seeds": points["seeds"],
                          "CE": [f"{m:.4f} ± {_number(s, 2)}" for m, s in zip(points["ce_mean"], points["ce_std"])],
                          **{X_AXES[x]: points[x].map(_number) for x in x_columns if x != "ensemble_size"}})
    lines += _markdown(shown) if len(shown) else ["No finished run yet."]
    lines += ["", "## Fits: CE = L_inf + A x^-alpha (95% bootstrap intervals over seeds)", ""]
    determined = fits[fits["determined"]]
    if len(determined):
        lines += _markdown(pd.DataFrame({
            "series": determined["series"], "x": determined["x"], "points (distinct x)": [
                f"{p} ({d})" for p, d in zip(determined["points"], determined["distinct_x"])],
            "L_inf": [_interval(r, "l_inf") for _, r in determined.iterrows()],
            "A": [_interval(r, "a") for _, r in determined.iterrows()],
            "alpha": [_interval(r, "alpha") for _, r in determined.iterrows()],
            "note": determined["note"]}))
    else:
        lines.append("No law is determined by its points (see the notes and fits.csv).")
    lines += [f"- {r['series']}, x = {r['x']}: {r['note']}" for _, r in fits[fits["fitted"] &
                                                                               ~fits["determined"]].iterrows()]
    lines += ["", "## Ensemble against single model, paired by seed (verdicts.csv)", "",
              "Per seed, the ensemble's CE minus the single model's of the same seed (negative: the ensemble is "
              "better); the mean over seeds with its 95% t-interval. The verdict says whether the interval "
              "excludes 0. On train_flops the single model's CE is the best held-out evaluation of its curve "
              "within the ensemble's spend, and the compute multiplier the spend at which its curve reaches the "
              "ensemble's CE, over the ensemble's.", ""]
    lines += verdict_lines(verdicts)
    lines += gap_lines(gap) if gap is not None else []
    lines += latency_lines(latency) if latency is not None else []
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def collect(study: Study, replicates: int = 500) -> list[Path]:
    """Write the study folder's tables, figures and summary from the finished runs; the paths written."""
    study.folder.mkdir(parents=True, exist_ok=True)
    rows, runs = collect_rows(study)
    obs = observations(rows)
    points = point_table(obs)
    fits, notes = fit_all(obs, rows.columns, replicates)
    curves, curve_notes = single_curves(rows)
    pairs, pair_notes = pairs_table(obs, curves, study.compare)
    verdicts = verdict_table(pairs)
    teachers = [plot.teacher_ce(part) for _, part in rows.groupby("run")] if len(rows) else []
    teachers = [t for t in teachers if t is not None]
    teacher = float(np.mean(teachers)) if teachers else None
    fits_frame = fits_table(fits)
    tables = {"rows.csv": rows, "runs.csv": runs, "summary.csv": points, "fits.csv": fits_frame,
              "comparison.csv": pairs, "verdicts.csv": verdicts}
    if study.tuning:
        tables["tuning.csv"] = pd.DataFrame(list(study.tuning))
    gap = teacher_gap_table(rows, study.matched, {p.series: member_size(p.config) for p in study.points
                                                  if p.kind == "ensemble"})
    if len(gap):  # only where the study has ensemble runs
        tables["teacher_gap.csv"] = gap
    paths = []
    for name, table in tables.items():
        table.to_csv(study.folder / name, index=False)
        paths.append(study.folder / name)
    latency_path = study.folder / "latency.csv"  # written by --latency
    latency = pd.read_csv(latency_path) if latency_path.is_file() else None
    (study.folder / "summary.md").write_text(summary_markdown(study, runs, points, fits_frame, verdicts,
                                                              notes + curve_notes + pair_notes, teacher,
                                                              gap if len(gap) else None, latency))
    paths.append(study.folder / "summary.md")
    figures = study_figures(points, fits, teacher, obs, curves, study.name)
    if latency is not None and len(latency):
        figures["ce_vs_latency"] = latency_figure(latency)
    return paths + plot.save_figures(figures, study.folder)


# --- latency: CE against decode latency per token (--latency) ------------------------------------------------------

LATENCY_COLUMNS = ["family", "series", "kind", "point", "ensemble_size", "parameters", "seeds", "ce_mean", "ce_low",
                   "ce_high", "latency_ms_parallel", "latency_ms_sequential", "frontier", "run", "processes",
                   "threads_per_process", "cpu_count", "machine", "prompt_tokens", "new_tokens", "repeats",
                   "statistic"]


@dataclasses.dataclass(frozen=True)
class Timing:
    """How --latency times a model: greedy decoding at batch 1 of `new_tokens` after a random prompt of
    `prompt_tokens`, each the fastest of `repeats` runs (benchmarks.bench_inference.timed_generation), every process
    on `threads` intra-op threads."""

    new_tokens: int = 32
    repeats: int = 3
    prompt_tokens: int = 32
    threads: int = 1

    def options(self, members: int, vocab_size: int) -> argparse.Namespace:
        """bench_inference's options for a model of `members` members (processes) and `vocab_size`."""
        return bench_inference.parse_args([
            "--members", str(members), "--vocab_size", str(vocab_size), "--batch_sizes", "1", "--prompt_tokens",
            str(self.prompt_tokens), "--new_tokens", str(self.new_tokens), "--repeats", str(self.repeats),
            "--threads", str(self.threads), "--statistic", "min", "--device", "cpu", "--json", ""])


def first_members(folder: Path, size: int, into: Path) -> Path:
    """A saved ensemble of the first `size` members of the one in `folder`, made in `into`: its config.json with
    those member folders (and their weights), the rest of its files and the members' folders linked, not copied."""
    config = json.loads((folder / "config.json").read_text())
    kept = config["member_subfolders"][:size]
    config.update(member_subfolders=kept, **({"weights": config["weights"][:size]} if config.get("weights") else {}))
    into.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if path.name != "config.json" and (path.is_file() or path.name in kept):
            (into / path.name).symlink_to(path.resolve(), target_is_directory=path.is_dir())
    (into / "config.json").write_text(json.dumps(config, indent=2))
    saved_ensemble_config(into)  # a folder the loaders accept
    return into


def model_latency(folder: Path, size: int, timing: Timing) -> dict:
    """Decode ms per token of the first `size` members of the ensemble saved in `folder`: in parallel (one process
    per member under torchrun, over gloo) and sequentially (one process, one member after another); one member is
    timed alone, as a plain model in this process (both numbers). Its parameters too."""
    config = saved_ensemble_config(folder)
    if not 1 <= size <= len(config.member_subfolders):
        raise StudyError(f"{folder} holds {len(config.member_subfolders)} member(s), not {size}")
    threads = torch.get_num_threads()
    torch.set_num_threads(timing.threads)
    try:
        with tempfile.TemporaryDirectory() as temporary:
            saved = first_members(folder, size, Path(temporary) / "ensemble")
            if size == 1:
                model = AutoModelForCausalLM.from_pretrained(saved / config.member_subfolders[0],
                                                             use_safetensors=True).eval()
            else:
                model = ModelEnsemble.from_pretrained(saved, concurrent=False).eval()
            members = [model] if size == 1 else list(model.members)
            vocab_size = min(member.get_output_embeddings().weight.shape[0] for member in members)
            options = timing.options(size, vocab_size)
            sequential = bench_inference.timed_generation(model, 1, options)["decode_ms_per_token"]
            parallel = sequential if size == 1 else \
                bench_inference.distributed_rows(saved, options)[0]["decode_ms_per_token"]
            return dict(latency_ms_parallel=parallel, latency_ms_sequential=sequential, processes=size,
                        parameters=sum(map(bench_inference.parameters, members)))
    finally:
        torch.set_num_threads(threads)


def latency_points(rows: pd.DataFrame) -> pd.DataFrame:
    """Every point of summary.csv with the run that stands for it (the first seed's: seeds share the architecture)
    and the members it takes: an ensemble point's size, a single model's final model (one member)."""
    points = point_table(observations(rows))
    chosen = []
    for point in points.itertuples(index=False):
        of_series = rows[(rows["series"] == point.series) & (rows["model"] == "ensemble")]
        if point.kind == "ensemble":
            size = int(point.point.split()[0])
            runs = of_series[of_series["ensemble_size"] == size]
        else:
            size, runs = 1, of_series[of_series["point"] == point.point]
        run = runs.sort_values("seed", kind="stable").iloc[0]
        chosen.append(dict(family=run["family"], run=run["run"], run_dir=run["run_dir"], ensemble_size=size))
    return pd.concat([points[["series", "kind", "point", "seeds", "ce_mean", "ce_std"]].reset_index(drop=True),
                      pd.DataFrame(chosen, columns=["family", "run", "run_dir", "ensemble_size"])], axis=1)


def t_interval(mean: float, std: float, n: int) -> tuple[float, float]:
    """The 95% t-interval of a mean of n values of standard deviation std (ddof 1); NaN for one value."""
    if n < 2 or not math.isfinite(std):
        return math.nan, math.nan
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def pareto_frontier(ce, latency) -> np.ndarray:
    """Which points are on the frontier of lower CE and lower latency: no other point is at most as high in both
    and lower in one. A point without both numbers is on none."""
    ce, latency = np.asarray(ce, dtype=float), np.asarray(latency, dtype=float)
    known = np.isfinite(ce) & np.isfinite(latency)
    on = np.zeros(len(ce), dtype=bool)
    for i in np.flatnonzero(known):
        dominated = known & (ce <= ce[i]) & (latency <= latency[i]) & ((ce < ce[i]) | (latency < latency[i]))
        on[i] = not dominated.any()
    return on


def machine_settings(timing: Timing) -> dict:
    """The machine the latencies hold on: its CPU count and kind, the threads each process ran on."""
    return dict(threads_per_process=timing.threads, cpu_count=os.cpu_count(),
                machine=f"{platform.machine()} {platform.processor() or platform.system()}".strip())


def measure_latency(study: Study, timing: Timing, log=print) -> Path:
    """latency.csv: every point of the study's finished runs (an ensemble family's at each size, a single family's
    at each grid point), its mean test CE over seeds with its 95% t-interval (summary.csv's), and the decode latency
    per token of the saved model of one of its runs, in parallel and one member after another; the frontier."""
    rows, _ = collect_rows(study)
    if rows.empty:
        raise StudyError(f"study {study.name} has no finished run: nothing to time (--latency reads the saved "
                         f"models of finished runs)")
    points = latency_points(rows)
    table = []
    for index, point in enumerate(points.itertuples(index=False), 1):
        log(f"[{index}/{len(points)}] {point.series}, {point.point}: {point.ensemble_size} member(s) of {point.run}",
            flush=True)
        low, high = t_interval(point.ce_mean, point.ce_std, int(point.seeds))
        measured = model_latency(Path(point.run_dir) / "ensemble", point.ensemble_size, timing)
        table.append(dict(family=point.family, series=point.series, kind=point.kind, point=point.point,
                          ensemble_size=point.ensemble_size, seeds=int(point.seeds), ce_mean=point.ce_mean,
                          ce_low=low, ce_high=high, run=point.run, **measured, **machine_settings(timing),
                          prompt_tokens=timing.prompt_tokens, new_tokens=timing.new_tokens, repeats=timing.repeats,
                          statistic="min"))
    table = pd.DataFrame(table)
    table["frontier"] = pareto_frontier(table["ce_mean"], table["latency_ms_parallel"])
    path = study.folder / "latency.csv"
    table[LATENCY_COLUMNS].to_csv(path, index=False)
    return path


def latency_figure(latency: pd.DataFrame) -> Figure:
    """Mean test CE (95% t-interval bars) against decode latency per token with members in parallel processes:
    ensembles and single models as two series, each ensemble's one-after-another latency as an open mark, the
    Pareto frontier as a step line."""
    fig = Figure(figsize=(7.2, 4.8), layout="constrained")
    ax = fig.subplots()
    for kind, color, marker, label in (("ensemble", "C0", "o", "ensembles, a process per member"),
                                       ("single", "C1", "s", "single models")):
        part = latency[latency["kind"] == kind]
        if part.empty:
            continue
        bars = np.array([(part["ce_mean"] - part["ce_low"]).fillna(0.0), (part["ce_high"] - part["ce_mean"]).fillna(
            0.0)])
        ax.errorbar(part["latency_ms_parallel"], part["ce_mean"], yerr=bars, color=color, marker=marker,
                    linestyle="none", capsize=3, label=label)
        for row in part.itertuples(index=False):
            ax.annotate(f"{row.series}, {row.point}" if kind == "ensemble" else row.series,
                        (row.latency_ms_parallel, row.ce_mean), fontsize="x-small", xytext=(4, 4),
                        textcoords="offset points")
        several = part[part["ensemble_size"] > 1]
        if kind == "ensemble" and len(several):
            ax.scatter(several["latency_ms_sequential"], several["ce_mean"], facecolors="none", edgecolors=color,
                       label="the same ensembles, members one after another")
    front = latency[latency["frontier"].astype(bool)].sort_values("latency_ms_parallel")
    if len(front):
        ax.step(front["latency_ms_parallel"], front["ce_mean"], where="post", color="gray", linestyle="--",
                label="Pareto frontier (lower CE, lower latency)")
    ax.set_xlabel("decode latency per token, batch 1 (ms; members in parallel processes)")
    ax.set_ylabel(plot.CE_LABEL)
    ax.set_title("Held-out CE against decode latency")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return fig


def latency_lines(latency: pd.DataFrame) -> list[str]:
    """summary.md's section of latency.csv."""
    if latency.empty:
        return []
    first = latency.iloc[0]
    lines = ["", "## CE against decode latency (latency.csv)", "",
             f"Decode latency per token at batch 1, measured by `study.py --latency` on {first['machine']} "
             f"({int(first['cpu_count'])} CPUs, {int(first['threads_per_process'])} thread(s) per process): "
             f"{int(first['new_tokens'])} new tokens after a {int(first['prompt_tokens'])}-token prompt, the fastest "
             f"of {int(first['repeats'])} runs, from one run's saved model per point. Parallel: a process per member "
             f"(torchrun, gloo); sequential: the members one after another in one process. CE: mean test CE over "
             f"seeds [95% t-interval]. On the frontier: no other point has both lower CE and lower latency.", ""]

    def ce(row) -> str:
        return (f"{row['ce_mean']:.4f} [{row['ce_low']:.4f}, {row['ce_high']:.4f}]" if math.isfinite(row["ce_low"])
                else f"{row['ce_mean']:.4f}")
    return lines + _markdown(pd.DataFrame({
        "series": latency["series"], "point": latency["point"], "parameters": latency["parameters"].map(_number),
        "CE": [ce(r) for _, r in latency.iterrows()],
        "ms/token parallel": latency["latency_ms_parallel"].map(lambda v: f"{v:.2f}"),
        "ms/token sequential": latency["latency_ms_sequential"].map(lambda v: f"{v:.2f}"),
        "frontier": latency["frontier"].map(lambda v: "yes" if bool(v) else "")}))


# --- numbers quoted from the results --------------------------------------------------------------------------------

# A number as prose quotes it: a sign, digits with thousands commas, decimals, an exponent, a suffix (%, M, k).
# Not one inside a word, a date or a path (SmolLM2-135M, 2026-12-02, run_1).
QUOTED_NUMBER = re.compile(r"(?<![\w.\-−/])(?P<number>[-−+]?\d{1,3}(?:,\d{3})+(?![\d])|[-−+]?\d+(?:\.\d+)?)"
                           r"(?:[eE](?P<exponent>[-−+]?\d+))?(?P<suffix>%|M\b|k\b)?(?![\w\-/]|\.\d)")
SUFFIX_SCALE = {"%": 0.01, "M": 1e6, "k": 1e3, None: 1.0}
NOT_QUOTED = re.compile(r"```.*?```|`[^`\n]*`|\]\([^)\s]*\)", re.S)  # code and link targets quote no result


@dataclasses.dataclass(frozen=True)
class Quoted:
    """A number of a text: its value and the half-unit of its last digit (what rounding to it may move)."""

    text: str
    value: float
    tolerance: float

    def matches(self, number: float) -> bool:
        return abs(abs(number) - abs(self.value)) <= self.tolerance * (1 + 1e-9) + 1e-12 * abs(self.value)


def quoted_numbers(text: str) -> list[Quoted]:
    """The numbers a text quotes: decimals (5.857, 0.29, 3.6e13, 6.38M, 12.5%), and integers from 100 on (smaller
    ones are counts: 5 seeds, 3 of 3); none inside code spans, code blocks or link targets."""
    found = []
    for match in QUOTED_NUMBER.finditer(NOT_QUOTED.sub(" ", text)):
        digits = match["number"].replace(",", "").replace("−", "-")
        decimals = len(digits.split(".")[1]) if "." in digits else 0
        scale = SUFFIX_SCALE[match["suffix"]] * 10.0 ** int((match["exponent"] or "0").replace("−", "-"))
        if decimals == 0 and match["exponent"] is None and match["suffix"] in (None, "%") and abs(int(digits)) < 100:
            continue
        found.append(Quoted(match.group(0), float(digits) * scale, 0.5 * 10.0 ** -decimals * scale))
    return found


def numbers_in_results(paths) -> set[float]:
    """Every number in the result files: each CSV cell that reads as a number, and the numbers of other text
    files (summary.md) as quoted_numbers reads them."""
    numbers = set()
    for path in map(Path, paths):
        if path.suffix == ".csv":
            values = pd.to_numeric(pd.read_csv(path, dtype=str).stack(), errors="coerce")
            numbers.update(float(v) for v in values.dropna())
        else:
            numbers.update(q.value for q in quoted_numbers(path.read_text()))
    return {n for n in numbers if math.isfinite(n)}


def quoted_numbers_missing(text: str, result_files: list[Path]) -> list[str]:
    """The numbers `text` quotes that no number of the result files rounds to, as written in the text: a result
    is to be generated and copied, never typed. A percentage matches a fraction or a percentage."""
    numbers = numbers_in_results(result_files)
    missing = []
    for quoted in quoted_numbers(text):
        forms = [quoted]
        if quoted.text.endswith("%"):
            forms.append(Quoted(quoted.text, quoted.value * 100, quoted.tolerance * 100))
        if not any(form.matches(number) for form in forms for number in numbers):
            missing.append(quoted.text)
    return missing


# --- command line -----------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="the study spec (YAML; see docs/study.md)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry_run", action="store_true", help="list the grid points and which are finished; run nothing")
    mode.add_argument("--print_sbatch", action="store_true",
                      help="write each unstarted run's settings to STUDY/slurm/ and print the sbatch lines")
    mode.add_argument("--collect", action="store_true", help="only collect the finished runs; run nothing")
    mode.add_argument("--latency", action="store_true",
                      help="time the finished runs' saved models (decode ms per token at batch 1, members in "
                           "parallel processes and one after another) into latency.csv; then collect")
    parser.add_argument("--bootstrap", type=int, default=500, metavar="N",
                        help="bootstrap resamples of the seeds for the fits' intervals (default: 500; 0: none)")
    timing = Timing()
    parser.add_argument("--new_tokens", type=int, default=timing.new_tokens,
                        help=f"--latency: tokens decoded per timing (default: {timing.new_tokens})")
    parser.add_argument("--repeats", type=int, default=timing.repeats,
                        help=f"--latency: timings per model, the fastest kept (default: {timing.repeats})")
    parser.add_argument("--prompt_tokens", type=int, default=timing.prompt_tokens,
                        help=f"--latency: the random prompt's length (default: {timing.prompt_tokens})")
    parser.add_argument("--threads", type=int, default=timing.threads,
                        help=f"--latency: intra-op threads per process (default: {timing.threads})")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """0 when every run asked for finished (or nothing ran), 1 when one did not, 2 for a spec it cannot use."""
    args = parse_args(argv)
    try:
        study = load_spec(args.spec)
        if args.dry_run:
            print("\n".join(dry_run_lines(study)))
            return 0
        if args.print_sbatch:
            print("\n".join(sbatch_lines(study)))
            return 0
        if args.latency:
            print(measure_latency(study, Timing(args.new_tokens, args.repeats, args.prompt_tokens, args.threads)))
        failed = []
        while not args.collect and not args.latency and not failed:
            failed = run_study(study)
            before, study = study.waiting, load_spec(args.spec)  # finished tuning runs give the later seeds' runs
            if study.waiting == before:
                break
        for path in collect(study, args.bootstrap):
            print(path)
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if failed:
        print(f"{len(failed)} run(s) did not finish: {', '.join(failed)}; run the same command again to resume",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
