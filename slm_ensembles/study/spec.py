"""A study spec (YAML, see docs/study.md) read and checked into its grid: every family's grid crossed with its seeds,
each point's config built so a bad key or value fails before anything runs; learning-rate tuning on the first seed,
then the later seeds at the chosen rate, or each family at the rate another study's tuning chose (tuned_in). A
single family's `match` is checked here and resolved by matching.py."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from pathlib import Path

import numpy as np
import yaml

import config as config_lib
import plot
from slm_ensembles.run_layout import RunLayout
from slm_ensembles.study.grid import (COMPARED_X, Family, Matched, Point, Study, StudyError, cli_value, name_part,
                                      per_run_settings)
from slm_ensembles.study.matching import match_family
from slm_ensembles.study.status import point_status

KINDS = ("ensemble", "single")
STUDY_KEYS = {"name", "output", "preset", "settings", "seeds", "families", "compare", "vary_data", "tuned_in"}
FAMILY_KEYS = {"name", "kind", "preset", "settings", "grid", "seeds", "split_by", "learning_rates", "match",
               "rate_from"}
# Each run's seed (and data_seed, unless vary_data is false) comes from `seeds`, its output_root from its name.
SET_BY_STUDY = {"seed", "data_seed", "output_root"}
MATCH_AXES = ("parameters", "non_embedding_parameters")  # what a single family's `match` can equal
NAME = re.compile(r"[A-Za-z0-9_.+-]+")


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
    waiting, tuning, stand_ins = [], [], []
    if spec.get("tuned_in") is not None:
        families, waiting, tuning, stand_ins = rates_tuned_in(families, Path(spec["tuned_in"]), path)
    elif any(f.rate_from for f in families):
        raise StudyError(f"{path}: family {', '.join(f.name for f in families if f.rate_from)} has rate_from, a "
                         f"family of the study named by tuned_in, but the spec has no tuned_in")
    points = []
    for family in families:
        made, wait, rows = family_points(family, folder, vary_data)
        points += made
        waiting += [wait] if wait else []
        tuning += rows
    pending = [point for family in stand_ins for point in family_points(family, folder, vary_data)[0]]
    check_points([*points, *pending])
    matched = tuple(Matched(f.name, f.match["family"], f.match["size"], f.match["axis"])
                    for f in [*families, *stand_ins] if f.match)
    return Study(name=name, folder=folder, points=points, compare=compare, waiting=tuple(waiting),
                 tuning=tuple(tuning), matched=matched, pending=tuple(pending))


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
    rate_from = family.get("rate_from")
    if rate_from is not None and not (isinstance(rate_from, str) and NAME.fullmatch(rate_from)):
        raise StudyError(f"{what}: rate_from must name a family of the tuned_in study, not {rate_from!r}")
    rates = family.get("learning_rates") or []
    if not isinstance(rates, list) or not all(isinstance(r, (int, float)) and not isinstance(r, bool)
                                              for r in rates):
        raise StudyError(f"{what}: learning_rates must be a list of numbers, not {rates!r}")
    return Family(name=name, kind=kind, preset=family.get("preset", preset), settings={**base, **settings},
                  combos=combos, seeds=_seeds(family["seeds"], f"{what}: seeds") if "seeds" in family else seeds,
                  split_by=split_by, rates=[float(r) for r in rates],
                  match=parse_match(family.get("match"), what, kind), rate_from=rate_from)


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


def rates_tuned_in(families: list[Family], source_path: Path,
                   path: Path) -> tuple[list[Family], list[str], list[dict], list[Family]]:
    """The spec's `tuned_in`: each family at the learning rate another study's tuning chose for its family of the
    same name, or of the name its `rate_from` gives (the larger data sizes of an axis take the rates tuned at the
    smallest, say, and larger members the rate tuned for smaller ones), so every family here is tuned alike without
    a grid of its own. Returns the families with their rates, a line per family that waits (its rate not chosen
    yet), the source's tuning.csv rows for each family (under its own name, the source's in `rate_from`), and the
    waiting families at the source's first rate: stand-ins whose runs are built, so that their settings are checked
    now, but not run."""
    if source_path.resolve() == path.resolve():
        raise StudyError(f"{path}: tuned_in names this spec itself; name the study whose tuning chose the rates")
    tuned = [f.name for f in families if f.rates]
    if tuned:
        raise StudyError(f"{path}: family {', '.join(tuned)} has learning_rates, but the spec takes its rates from "
                         f"tuned_in {str(source_path)!r}; give the one or the other")
    if not source_path.is_file():
        raise StudyError(f"{path}: tuned_in {str(source_path)!r} does not exist; name the spec of the study whose "
                         f"tuning chose the rates")
    if "tuned_in" in (yaml.safe_load(source_path.read_text()) or {}):
        raise StudyError(f"{path}: tuned_in {str(source_path)!r} takes its rates from another study in turn; name "
                         f"the study whose own tuning chose them")
    source = load_spec(source_path)
    with_rates, waiting, stand_ins, rows = [], [], [], []
    for family in families:
        source_family = family.rate_from or family.name
        own = [row for row in source.tuning if row["family"] == source_family]
        if not own or len({row["point"] for row in own}) > 1:
            raise StudyError(f"{path}: family {family.name!r} takes its learning rate from family {source_family!r} "
                             f"of {str(source_path)!r}, which must tune one grid point over learning_rates")
        rows += [{**row, "family": family.name, "tuned_in": source.name, "rate_from": source_family} for row in own]
        chosen = [row["rate"] for row in own if row["chosen"]]
        if chosen:
            with_rates.append(dataclasses.replace(family, rate=chosen[0]))
        else:
            finished = sum(math.isfinite(row["heldout_ce"]) for row in own)
            waiting.append(f"family {family.name} waits for its learning rate from study {source.name} ({finished} "
                           f"of {len(own)} tuning runs finished)")
            stand_ins.append(dataclasses.replace(family, rate=own[0]["rate"]))
    return with_rates, waiting, rows, stand_ins


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
    if family.rates and config.eval_steps <= 0:
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
        return [make_point(family, combo, seed, folder, vary_data, family.rate) for combo in family.combos
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
    """One grid point's tuning runs (one per rate): each finished run's final early-stopping CE, which rate is chosen
    (the lowest such CE; none until every rate's run is finished), and `grid_edge`: "lowest" or "highest" when the
    chosen rate is at that end of a grid of several (a rate beyond it was never tried: the best may lie there)."""
    ces = []
    for run in runs:
        status = point_status(run)
        ces.append(final_heldout_ce(status.run_dir) if status.state == "finished" else math.nan)
    done = all(math.isfinite(ce) for ce in ces)
    best = int(np.argmin(ces)) if done else -1
    rates = [run.settings["learning_rate"] for run in runs]
    edge = {min(rates): "lowest", max(rates): "highest"} if len(set(rates)) > 1 else {}
    return [dict(family=family.name, point=run.grid_point, rate=rate, heldout_ce=ce, chosen=i == best,
                 grid_edge=edge.get(rate, "") if i == best else "", run=run.name)
            for i, (run, rate, ce) in enumerate(zip(runs, rates, ces))]


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
