"""The finished runs' metrics rows in one table, and from them the observations every later step reads: one row
per series, point and seed with its test CE and x values, and their means over seeds per point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

import plot
from slm_ensembles import files
from slm_ensembles.run_layout import RunLayout
from slm_ensembles.study.grid import Study, cli_value
from slm_ensembles.study.spec import last_heldout_ce
from slm_ensembles.study.status import point_status

# The x axes a law is fitted against: metrics.csv column -> label. All but ensemble_size are columns that main.py
# may or may not write yet; a missing one skips its fits with a note.
X_AXES = {"ensemble_size": "ensemble size (members)", "parameters": "parameters",
          "non_embedding_parameters": "non-embedding parameters", "train_flops": "training FLOPs (all spent)",
          "critical_path_layers": "critical-path depth (layers)"}


def training_examples(run_dir: Path) -> float:
    """The examples the run's training split held, as its manifest records them; NaN for a run started before
    manifests kept them."""
    examples = json.loads(RunLayout(run_dir).manifest.read_text()).get("examples", {})
    return float(examples["train"]) if "train" in examples else np.nan


def collect_rows(study: Study) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows, runs): every finished run's metrics rows with its name, family, series, kind, seed, run folder and
    stated settings as columns; and every grid point's status, with a finished run's training examples."""
    frames, runs = [], []
    setting_keys = list(dict.fromkeys(k for p in study.points for k in ["preset", *p.settings]))
    for point in (p for p in study.points if not p.tuning):  # a rate not chosen is in tuning.csv only
        status = point_status(point)
        finished = status.state == "finished"
        runs.append(dict(run=point.name, family=point.family, series=point.series, kind=point.kind,
                         seed=point.seed, status=status.state, run_dir=str(status.run_dir or ""),
                         train_examples=training_examples(status.run_dir) if finished else np.nan))
        if not finished:
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
    return rows, pd.DataFrame(runs, columns=["run", "family", "series", "kind", "seed", "status", "run_dir",
                                             "train_examples"])


def finished_examples(runs: pd.DataFrame) -> pd.Series:
    """runs.csv's training examples of the finished runs (NaN: a run that does not record them)."""
    return runs.loc[runs["status"] == "finished", "train_examples"] if len(runs) else pd.Series(dtype=float)


def wall_times(study: Study) -> pd.DataFrame:
    """Every grid point, tuning runs included: its status, and the launches and wall seconds its run folder's
    wall_time.csv records (NaN seconds for a run without one: not started, or launched before studies kept it)."""
    rows = []
    for point in study.points:
        status = point_status(point)
        launches = files.read_csv_rows(RunLayout(status.run_dir).wall_time) if status.run_dir else None
        rows.append(dict(run=point.name, family=point.family, seed=point.seed, tuning=point.tuning,
                         status=status.state, launches=len(launches or []),
                         seconds=sum(float(row["seconds"]) for row in launches) if launches else np.nan))
    return pd.DataFrame(rows, columns=["run", "family", "seed", "tuning", "status", "launches", "seconds"])


def finished_timed(times: pd.DataFrame) -> pd.DataFrame:
    """The rows of wall_times' table whose run finished with a measured wall time."""
    return times[(times["status"] == "finished") & times["seconds"].notna()]


def time_left(times: pd.DataFrame) -> tuple[float, int]:
    """The wall seconds the runs not finished yet would take at their family's mean over its finished, timed runs
    (wall_times' table; an unfinished run counted whole: its launches so far are not a share of it), and how many
    runs that leaves unestimated (their family has no finished, timed run yet)."""
    timed = finished_timed(times)
    per_family = timed.groupby("family")["seconds"].mean()
    left = times[times["status"] != "finished"]
    estimated = left["family"].map(per_family)
    return float(estimated.sum()), int(estimated.isna().sum())


def observations(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per series (with its family), point and seed: test CE, the run's final early-stopping CE, gap_closed
    and the x columns there are. An ensemble run gives a point per ensemble size (its ensemble rows); a single-model
    run gives one (its final model). Several runs with the same series, point and seed (ensemble runs of different
    total_rounds share their small sizes) are averaged."""
    x_columns = [x for x in X_AXES if x in rows.columns]
    gap = ["gap_closed"] if "gap_closed" in rows.columns else []
    if rows.empty:
        return pd.DataFrame(columns=["family", "series", "kind", "point", "order", "seed", "ce", "final_heldout_ce",
                                     *gap, *x_columns])
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
    table = (models.groupby(["family", "series", "kind", "point", "order", "seed"], sort=False)[
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
