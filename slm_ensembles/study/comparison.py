"""The ensemble against a single model, paired over seeds: per axis, ensemble point, single-model series and seed,
their CE difference (on train_flops the single model's early-stopping curve read at the ensemble's spend, and the
compute multiplier); per comparison, the mean difference's 95% t-interval and its verdict."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

import plot
from slm_ensembles.run_layout import RunLayout
from slm_ensembles.study.grid import Matched

EQUAL_X_RTOL = 0.01  # x values this close (relative) are the same grid point
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


def paired_single(obs: pd.DataFrame, curves: dict, axis: str, single: str, ensemble,
                  matched: tuple[Matched, ...] = ()) -> dict | None:
    """The single-model series' CE paired with one ensemble observation (same seed), or None where there is none:
    on train_flops its curve's choice within the ensemble's spend, and the compute multiplier; on the other axes
    its grid point at the ensemble's x or its interpolation, or, for a family `matched` on that axis to the
    ensemble's family at the ensemble's size, its own point (the closest size it has: matching.MATCH_RTOL)."""
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
    points = obs[(obs["series"] == single) & (obs["seed"] == ensemble.seed)]
    found = matched_single(points, axis, ensemble, matched) or single_at(points, axis, float(getattr(ensemble, axis)))
    return None if found is None else dict(single_ce=found[0], single_flops=math.nan, single_from=found[1],
                                           multiplier=math.nan, multiplier_bound=math.nan,
                                           students_multiplier=math.nan, students_multiplier_bound=math.nan)


def matched_single(points: pd.DataFrame, axis: str, ensemble, matched: tuple[Matched, ...]) -> tuple[float, str] | None:
    """A matched family's CE at its own size (`points`: its observations of the ensemble's seed), where it was
    matched on `axis` to the ensemble's family at the ensemble's size: (CE, how far its x is from the ensemble's).
    None for any other pair, and where its points hold more than one size."""
    if not matched or points.empty:
        return None
    sizes = points.dropna(subset=[axis])[axis].unique()
    if len(sizes) != 1 or Matched(str(points["family"].iloc[0]), str(ensemble.family), int(ensemble.order),
                                  axis) not in matched:
        return None
    ce, chosen = single_at(points, axis, float(sizes[0]))
    target = float(getattr(ensemble, axis))
    best_of = chosen[chosen.find(", best of"):] if ", best of" in chosen else ""
    return ce, f"matched: {sizes[0]:,.0f} to {target:,.0f} ({sizes[0] / target - 1:+.1%}){best_of}"


def without_fixed(ratio: float, budget: float, fixed: float) -> float:
    """A multiplier of the whole spend (F' / F, F = `budget`) as one of the students' compute alone:
    (F' - fixed) / (F - fixed), the one-off cost both sides pay alike taken off both spends."""
    return (ratio * budget - fixed) / (budget - fixed)


def pairs_table(obs: pd.DataFrame, curves: dict, axes,
                matched: tuple[Matched, ...] = ()) -> tuple[pd.DataFrame, list[str]]:
    """comparison.csv: per axis, ensemble point, single-model series and seed, the ensemble's CE and the single
    model's from the run of the same seed (a `matched` family's at its own size), and their difference (negative:
    the ensemble is better). Notes on the seeds left out because the single model's first evaluation had already
    spent more than the ensemble."""
    singles = [s for s in dict.fromkeys(obs["series"]) if (obs.loc[obs["series"] == s, "kind"] == "single").all()]
    ensembles = obs[obs["kind"] == "ensemble"]
    rows, notes = [], []
    for axis in (a for a in axes if a in obs.columns):
        for (series, point), part in ensembles.dropna(subset=[axis]).groupby(["series", "point"], sort=False):
            for single in singles:
                late = []
                for ensemble in part.itertuples(index=False):
                    found = paired_single(obs, curves, axis, single, ensemble, matched)
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


def deciding_verdicts(verdicts: pd.DataFrame, matched: tuple[Matched, ...]) -> pd.DataFrame:
    """The verdicts a study was designed to decide: each single family matched to an ensemble size (the spec's
    `match`) against that ensemble, at equal training FLOPs and on the axis it was matched on, in the spec's order
    (verdicts.csv's rows and columns; none without a match)."""
    rows = []
    for match in matched:
        for axis in ("train_flops", match.axis):
            rows.append(verdicts[(verdicts["axis"] == axis) & (verdicts["ensemble"] == match.ensemble)
                                 & (verdicts["ensemble_size"] == match.size) & (verdicts["single"] == match.single)])
    return pd.concat(rows, ignore_index=True) if rows else verdicts.iloc[:0]
