"""The study's figures: CE against each x axis with the determined fits, the single models' learning curves with
the ensembles at their spend, and CE against decode latency with its Pareto frontier."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

import plot
from slm_ensembles.study.collecting import X_AXES
from slm_ensembles.study.fits import Fitted


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


def fixed_flops(curves: dict) -> dict[int, float]:
    """Per seed, the one-off cost every single-model curve of that seed carries alike (Curve.fixed_flops: the
    teacher cache's build, which depends on the seed's data sample); 0 for a seed whose curves disagree."""
    values: dict[int, set] = {}
    for (_, seed), curve in curves.items():
        values.setdefault(seed, set()).add(curve.fixed_flops)
    return {seed: found.pop() if len(found) == 1 else 0.0 for seed, found in values.items()}


def draw_curves(ax, obs: pd.DataFrame, curves: dict, teacher: float | None, students_only: bool = False) -> None:
    """Onto `ax`, test CE against training FLOPs spent (log x): each single-model series' learning curve per seed
    (the test CE of its best evaluation on the early-stopping slice so far: what the comparison reads at a spend),
    and each ensemble point per seed, at the FLOPs it spent; the teacher dotted. students_only: each seed's fixed
    cost (fixed_flops) taken off its spends, so the x axis is the students' own compute; an ensemble of a seed
    without a single-model curve, whose fixed cost is not known, is left out."""
    offsets = fixed_flops(curves) if students_only else {}
    colors = {series: f"C{i % 10}" for i, series in enumerate(dict.fromkeys(obs["series"]))}
    for (series, seed), curve in curves.items():
        chosen = curve.evals.assign(best=curve.evals["heldout_ce"].cummin())
        chosen = chosen[chosen["heldout_ce"] == chosen["best"]]
        labelled = series in {line.get_label() for line in ax.get_lines()}
        ax.step(chosen["train_flops"] - offsets.get(seed, 0.0), chosen["test_ce"], where="post",
                color=colors[series], alpha=0.6, label="_nolegend_" if labelled else series)
    ensembles = obs[obs["kind"] == "ensemble"].dropna(subset=["train_flops"])
    if students_only:
        ensembles = ensembles[ensembles["seed"].isin(list(offsets))]
    for (series, point), part in ensembles.groupby(["series", "point"], sort=False):
        spent = part["train_flops"] - part["seed"].map(lambda seed: offsets.get(int(seed), 0.0))
        ax.scatter(spent, part["ce"], color=colors[series], marker=f"${point.split()[0]}$", s=60,
                   label=f"{series}, {point}")
    if teacher is not None:
        ax.axhline(teacher, color="gray", linestyle=":", label=f"teacher: {teacher:.3f}")
    ax.set_xscale("log")
    taken = [value for value in offsets.values() if value]
    ax.set_xlabel(f"students' training FLOPs (log)\ncache build {min(taken):.2g}-{max(taken):.2g} taken off" if taken
                  else "training FLOPs spent (log scale)")
    ax.set_ylabel(plot.CE_LABEL)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def curves_figure(obs: pd.DataFrame, curves: dict, teacher: float | None, title: str) -> Figure:
    """The study's single models' learning curves and its ensembles against training FLOPs spent (draw_curves)."""
    fig = Figure(figsize=(7.2, 4.8), layout="constrained")
    ax = fig.subplots()
    draw_curves(ax, obs, curves, teacher)
    ax.set_title(f"{title}: single models' learning curves and ensembles, one line or mark per seed",
                 fontsize="medium")
    return fig


def study_figures(points: pd.DataFrame, fits: list[Fitted], teacher: float | None, obs: pd.DataFrame,
                  curves: dict, title: str) -> dict[str, Figure]:
    """ce_vs_<x> for each x axis metrics.csv has, and the learning curves against FLOPs where there are any."""
    figures = {f"ce_vs_{x}": ce_figure(points, fits, x, teacher) for x in X_AXES
               if x in points.columns and points[x].notna().any()}
    if curves:
        figures["curves_vs_train_flops"] = curves_figure(obs, curves, teacher, title)
    return figures


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
