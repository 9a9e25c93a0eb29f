"""Power laws L(x) = L_inf + A x^-alpha of CE against each x axis, per series, with bootstrap intervals over seeds;
a law only where its points determine it (4 distinct x and 4 distinct mean CEs), and why not elsewhere."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pandas as pd
from scipy.optimize import OptimizeWarning, curve_fit

from slm_ensembles.study.collecting import X_AXES

ALPHA_BOUNDS = (1e-4, 10.0)
ALPHA_GRID = np.geomspace(*ALPHA_BOUNDS, 400)
INTERVAL = (2.5, 97.5)  # percentiles of the bootstrap: a 95% interval
MIN_DISTINCT = 4  # distinct x, and distinct mean CE, a 3-parameter law needs to be determined (parameters + 1)
DISTINCT_CE_ATOL = 1e-4  # mean CEs this close (nats) are one value: a member that stayed at zero repeats its CE


class FitError(ValueError):
    """Too few distinct x values (or none usable) to fit the 3-parameter law."""


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
