"""How much of the teacher gap each member size's ensemble closes (teacher_gap.csv): per ensemble series its best
ensemble, and the single models matched to its family, each with 95% t-intervals over seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

import config as config_lib
from slm_ensembles.study.collecting import observations
from slm_ensembles.study.comparison import paired_interval

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
    series matched to its family (`matched`: grid.Matched, as the spec's `match`), its
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
        singles = [(match.single, match.size) for match in matched if match.ensemble == family]
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
