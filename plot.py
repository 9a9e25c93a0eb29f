"""Figures of distillation runs written by main.py (runs/YYYY-MM-DD/run_N/).

One run: its figures go into the run folder (or into --out)
    ce_vs_ensemble_size.png   ensemble CE against ensemble size, teacher and best single member as dashed lines
    training_curves.png       hybrid loss, KL and NLL against training step, one line per round
    gap_closed.png            share of the teacher gap closed by each round's student and by the ensemble

Several runs, compared, into --out (default plots/): runs equal in config except seed are one group (mean line
and min-max band); baseline runs (config key `baseline`) are drawn as baselines
    ce_vs_ensemble_size.png   one curve per group, one-round baselines as dashed lines, the teacher as a line
    final_ce.png              final ensemble CE of each group, best first

Usage:
    python plot.py RUN_DIR [RUN_DIR ...] [--out DIR]
    python plot.py runs/2026-11-29/run_1                          # into runs/2026-11-29/run_1/
    python plot.py runs/2026-11-29/run_* --out plots/alpha_sweep  # a comparison

As a module (notebooks/analysis.ipynb does this):
    import plot
    run = plot.load_run("runs/2026-11-29/run_1")
    plot.ensemble_curve(run.metrics), plot.run_figures(run)["gap_closed"]

Matplotlib is used through its object-oriented API only (no pyplot): nothing depends on a GUI backend or on
global figure state.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from config import SINGLE_MODEL_BASELINES
from slm_ensembles.run_layout import RunLayout

CE_LABEL = "held-out CE (nats/token)"
SIZE_LABEL = "ensemble size (members)"
STEP_LABEL = "training step"
LOSS_LABEL = "training loss (nats/token)"
GAP_LABEL = "share of teacher gap closed\n(0 = untrained student, 1 = teacher)"
DPI = 100

# Keys that change where or how a run is stored, logged or computed, not what it learns: runs that differ only in
# these are seeds of one configuration, and labels never mention them. A key that one of two runs lacks (an older
# run, written before the key existed) is not compared either.
NOT_COMPARED = frozenset({"seed", "output_root", "cache_dir", "device", "logging_steps", "save_steps",
                          "keep_checkpoints", "eval_batch_size", "gradient_checkpointing", "loss_chunk_size",
                          "sample_answers", "sample_max_new_tokens", "plots"})
TRAIN_TERMS = (("hybrid", "hybrid loss (training objective)"),
               ("kl", "distillation term: KL(teacher || ensemble)"),
               ("nll", "NLL term"))
BASELINE_NAMES = {"none": "ensemble (main method)", "independent": "independent (baseline)",
                  "single_matched": "single_matched (baseline)", "single_large": "single_large (baseline)"}


@dataclass(eq=False)
class Run:
    """One run folder: metrics (gap_closed filled in), train log (None when absent), config, a short label."""
    path: Path
    metrics: pd.DataFrame
    train_log: pd.DataFrame | None
    config: dict
    label: str


# --- loading ----------------------------------------------------------------------------------------------------

def load_run(run_dir) -> Run:
    """Read a run folder; older runs (no gap_closed, no baseline key) are completed from their CE and defaults."""
    path = Path(run_dir)
    if not (RunLayout(path).metrics).is_file():
        raise FileNotFoundError(f"{path} has no metrics.csv: not a run folder written by main.py "
                                f"(or no round of it has been evaluated yet)")
    metrics = with_gap_closed(pd.read_csv(RunLayout(path).metrics))
    train_log = readable_train_log(RunLayout(path).train_log)
    config = {}
    if (RunLayout(path).config).is_file():
        config = yaml.safe_load((RunLayout(path).config).read_text()) or {}
    if config.get("baseline") is None:
        config["baseline"] = "none"
    return Run(path=path, metrics=metrics, train_log=train_log, config=config, label=path.name)


def readable_train_log(path: Path) -> pd.DataFrame | None:
    """The training log, or None when there is none or it cannot be read (not CSV text): the figures then leave
    out the training curves, with a warning naming the file, rather than fail a run that has finished."""
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        print(f"warning: {path} cannot be read ({type(error).__name__}: {error}); the figures leave out the "
              "training curves", file=sys.stderr)
        return None


def load_runs(run_dirs) -> list[Run]:
    """load_run on each folder, each labelled against the others (run_label)."""
    runs = [load_run(d) for d in run_dirs]
    for run in runs:
        run.label = run_label(run, runs)
    return runs


# --- pure data functions ----------------------------------------------------------------------------------------

def _ce_of(metrics: pd.DataFrame, model: str, round_index: int | None = None) -> float | None:
    rows = metrics[metrics["model"] == model]
    if round_index is not None:
        rows = rows[rows["round"] == round_index]
    rows = rows["ce"].dropna()
    return float(rows.iloc[0]) if len(rows) else None


def teacher_ce(metrics: pd.DataFrame) -> float | None:
    """The teacher's held-out CE (evaluated once, in round 0); None when the run has no teacher row."""
    return _ce_of(metrics, "teacher")


def start_ce(metrics: pd.DataFrame) -> float | None:
    """CE_start: round 0's untrained student, the zero of gap_closed; None when absent."""
    return _ce_of(metrics, "student_untrained", 0)


def gap_closed(metrics: pd.DataFrame) -> pd.Series:
    """(CE_start - CE) / (CE_start - CE_teacher) of every row: the share of the teacher gap closed, 0 at round 0's
    untrained student, 1 at the teacher. NaN when the run lacks either end of the gap, or the two ends are equal
    (the gap is empty). The one definition: main.py writes it into metrics.csv through rows_with_gap_closed."""
    start, teacher = start_ce(metrics), teacher_ce(metrics)
    if start is None or teacher is None or start == teacher:
        return pd.Series(math.nan, index=metrics.index, dtype=float)
    return (start - metrics["ce"].astype(float)) / (start - teacher)


def rows_with_gap_closed(rows: list[dict], metrics_path: Path) -> list[dict]:
    """New metric rows (dicts) with their gap_closed, whose ends (round 0's untrained student, the teacher) are in
    `rows` or in the rows already written to `metrics_path`."""
    table = pd.DataFrame(rows)
    if Path(metrics_path).is_file():  # the new rows first: they replace the written rows of their round
        table = pd.concat([table, pd.read_csv(metrics_path)], ignore_index=True)
    return [{**row, "gap_closed": gap} for row, gap in zip(rows, gap_closed(table))]


def with_gap_closed(metrics: pd.DataFrame) -> pd.DataFrame:
    """A copy of metrics whose gap_closed column exists, missing values computed from ce (older runs lack it)."""
    metrics = metrics.copy()
    computed = gap_closed(metrics)
    if "gap_closed" in metrics.columns:
        metrics["gap_closed"] = metrics["gap_closed"].astype(float).fillna(computed)
    else:
        metrics["gap_closed"] = computed
    return metrics


def ensemble_curve(metrics: pd.DataFrame) -> pd.DataFrame:
    """Columns ensemble_size, ce: the ensemble row of each round, by size."""
    rows = metrics[metrics["model"] == "ensemble"].drop_duplicates("ensemble_size", keep="last")
    curve = rows.sort_values("ensemble_size")[["ensemble_size", "ce"]].reset_index(drop=True)
    return curve.astype({"ensemble_size": int, "ce": float})


def final_ensemble_ce(metrics: pd.DataFrame) -> float | None:
    """CE of the largest ensemble of the run (the single student for one-round runs); None before round 0 ends."""
    curve = ensemble_curve(metrics)
    return float(curve["ce"].iloc[-1]) if len(curve) else None


def best_single_member(metrics: pd.DataFrame) -> float | None:
    """Lowest CE among the trained students evaluated alone; None when there are none."""
    ce = metrics.loc[metrics["model"] == "student", "ce"].dropna()
    return float(ce.min()) if len(ce) else None


def gap_closed_bars(metrics: pd.DataFrame) -> pd.DataFrame:
    """Columns ensemble_size, student, ensemble: gap closed by the student added at each size and by the ensemble."""
    metrics = with_gap_closed(metrics)
    students = metrics[metrics["model"] == "student"]
    students = pd.DataFrame({"ensemble_size": students["round"].astype(int) + 1,
                             "student": students["gap_closed"].astype(float)})
    ensembles = metrics[metrics["model"] == "ensemble"]
    ensembles = pd.DataFrame({"ensemble_size": ensembles["ensemble_size"].astype(int),
                              "ensemble": ensembles["gap_closed"].astype(float)})
    bars = pd.merge(students.drop_duplicates("ensemble_size", keep="last"),
                    ensembles.drop_duplicates("ensemble_size", keep="last"), on="ensemble_size", how="outer")
    return bars.sort_values("ensemble_size").reset_index(drop=True)


def metrics_summary(metrics: pd.DataFrame) -> str:
    """A run's metrics as main.py prints them at the end: the table, then each ensemble against its best member."""
    shown = metrics[["round", "model", "ensemble_size", "ce", "perplexity", "kl_teacher", "top1_agreement"]]
    lines = ["Metrics on the held-out split (ce and kl_teacher in nats per supervised token)",
             shown.to_string(index=False, formatters={"ce": "{:.4f}".format, "perplexity": "{:.4g}".format,
                                                      "kl_teacher": "{:.4f}".format,
                                                      "top1_agreement": "{:.4f}".format}),
             "", "The ensemble against its best single member (ce; a positive gain means the ensemble is better)"]
    members = metrics[metrics["model"] == "student"].set_index("round")["ce"]
    for round_index, row in metrics[metrics["model"] == "ensemble"].set_index("round").iterrows():
        best = members.loc[:round_index].min()
        lines.append(f"  {int(row['ensemble_size'])} member(s): ensemble {row['ce']:.4f}, best member {best:.4f}, "
                     f"gain {best - row['ce']:+.4f}")
    return "\n".join(lines)


def mean_and_spread(curves) -> pd.DataFrame:
    """Columns ensemble_size, mean, min, max, n: CE per ensemble size across curves (seeds of one configuration)."""
    frames = [curve[["ensemble_size", "ce"]] for curve in curves if len(curve)]
    if not frames:
        return pd.DataFrame({"ensemble_size": pd.Series(dtype=int), "mean": pd.Series(dtype=float),
                             "min": pd.Series(dtype=float), "max": pd.Series(dtype=float),
                             "n": pd.Series(dtype=int)})
    spread = pd.concat(frames).groupby("ensemble_size")["ce"].agg(["mean", "min", "max", "count"])
    return spread.rename(columns={"count": "n"}).reset_index()


def _compared(config: dict) -> dict[str, str]:
    config = {"baseline": "none", **config}
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in config.items() if k not in NOT_COMPARED}


def same_config(a: Run, b: Run) -> bool:
    """Whether two runs are seeds of one configuration: equal in every compared key that both configs have."""
    config_a, config_b = _compared(a.config), _compared(b.config)
    return all(config_a[k] == config_b[k] for k in config_a.keys() & config_b.keys())


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and "/" in value:
        return Path(value).name or value  # a local path: its last component says enough
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def differing_keys(runs) -> list[str]:
    """Config keys (not baseline, not NOT_COMPARED) with different values among the runs that have them, in config
    order."""
    keys = []
    for run in runs:
        keys.extend(k for k in run.config if k not in keys and k not in NOT_COMPARED and k != "baseline")
    return [k for k in keys
            if len({json.dumps(run.config[k], sort_keys=True, default=str) for run in runs if k in run.config}) > 1]


def run_label(run: Run, others) -> str:
    """Short label of run among others: the baseline name for baselines, else the config keys that differ among the
    runs of the same kind (seed excluded), e.g. "alpha=0.7, combine=weighted"; else the run's folder name."""
    baseline = run.config.get("baseline", "none")
    peers = [run] + [o for o in others if o is not run and o.config.get("baseline", "none") == baseline]
    parts = [f"{k}={_format_value(run.config[k])}" for k in differing_keys(peers) if k in run.config]
    if baseline != "none":
        return ", ".join([baseline, *parts])
    if parts:
        return ", ".join(parts)
    if any(o is not run and o.path.name == run.path.name for o in others):
        return f"{run.path.parent.name}/{run.path.name}"
    return run.path.name


def group_seeds(runs) -> dict[str, list[Run]]:
    """Runs equal in config except seed (same_config) form one group, keyed by its label (run_label among the
    groups), groups and runs in the order given. data_seed is compared like any setting: seeds form a band only
    when they were scored on the same test set."""
    grouped: list[list[Run]] = []
    for run in runs:
        group = next((g for g in grouped if same_config(g[0], run)), None)
        if group is None:
            grouped.append([run])
        else:
            group.append(run)
    representatives = [group[0] for group in grouped]
    groups = {}
    for group in grouped:
        label = run_label(group[0], representatives)
        if label in groups:  # only possible through shortened values: keep the labels apart
            label = f"{label} ({group[0].path.name})"
        groups[label] = group
    return groups


def final_ce_table(runs) -> pd.DataFrame:
    """Columns label, baseline, members, mean, min, max, n: each group's final ensemble CE across seeds, best first."""
    rows = []
    for label, group in group_seeds(runs).items():
        finals = [(final_ensemble_ce(r.metrics), int(ensemble_curve(r.metrics)["ensemble_size"].max()))
                  for r in group if final_ensemble_ce(r.metrics) is not None]
        if finals:
            values = [ce for ce, _ in finals]
            rows.append(dict(label=label, baseline=group[0].config.get("baseline", "none"),
                             members=max(size for _, size in finals), mean=sum(values) / len(values),
                             min=min(values), max=max(values), n=len(values)))
    table = pd.DataFrame(rows, columns=["label", "baseline", "members", "mean", "min", "max", "n"])
    return table.sort_values("mean", kind="stable").reset_index(drop=True)


def teacher_lines(runs) -> dict[str, float]:
    """Teacher CE to draw: one entry per distinct teacher among the runs (mean over the runs that evaluated it)."""
    by_teacher: dict[str, list[float]] = {}
    for run in runs:
        ce = teacher_ce(run.metrics)
        if ce is not None:
            by_teacher.setdefault(_format_value(run.config.get("teacher", "")), []).append(ce)
    if len(by_teacher) == 1:
        (values,) = by_teacher.values()
        return {"teacher": sum(values) / len(values)}
    return {f"teacher {name}": sum(values) / len(values) for name, values in by_teacher.items()}


# --- figures ----------------------------------------------------------------------------------------------------

def _run_title(run: Run) -> str:
    name = f"{run.path.parent.name}/{run.path.name}"
    shown = [f"{k}={_format_value(run.config[k])}" for k in ("alpha", "combine", "seed") if k in run.config]
    if run.config.get("baseline", "none") != "none":
        shown.insert(0, f"baseline={run.config['baseline']}")
    return f"{name} ({', '.join(shown)})" if shown else name


def _legend(ax, **kwargs) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def ce_vs_size_figure(run: Run) -> Figure:
    """Ensemble CE against ensemble size; teacher CE and best single member CE as horizontal dashed lines."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    curve = ensemble_curve(run.metrics)
    ax.plot(curve["ensemble_size"], curve["ce"], marker="o", color="C0", label="ensemble")
    best = best_single_member(run.metrics)
    if best is not None:
        ax.axhline(best, color="C1", linestyle="--", label=f"best single member: {best:.3f}")
    teacher = teacher_ce(run.metrics)
    if teacher is not None:
        ax.axhline(teacher, color="gray", linestyle="--", label=f"teacher: {teacher:.3f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(SIZE_LABEL)
    ax.set_ylabel(CE_LABEL)
    ax.set_title(f"Held-out CE against ensemble size\n{_run_title(run)}", fontsize="medium")
    _legend(ax)
    return fig


def training_curves_figure(run: Run) -> Figure:
    """Hybrid loss, KL and NLL against training step, one line per round (run.train_log must not be None)."""
    log = run.train_log
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    axes = fig.subplots(1, len(TRAIN_TERMS), sharex=True)
    for ax, (column, title) in zip(axes, TRAIN_TERMS):
        if column in log.columns:
            for round_index, rows in log.groupby("round"):
                ax.plot(rows["step"], rows[column], marker="." if len(rows) <= 20 else None,
                        label=f"round {round_index}")
        else:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel(LOSS_LABEL)
    _legend(axes[0], fontsize="small", title="student of")
    fig.suptitle(f"Training curves: {_run_title(run)}")
    return fig


def gap_closed_figure(run: Run) -> Figure:
    """Bars: share of the teacher gap closed by each round's student alone and by the ensemble at each size."""
    bars = gap_closed_bars(run.metrics)
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    x = bars["ensemble_size"].to_numpy(dtype=float)
    width = 0.38
    for offset, column, color, label in ((-width / 2, "student", "C1", "student added at that size"),
                                         (width / 2, "ensemble", "C0", "ensemble of that size")):
        values = bars[column].to_numpy(dtype=float)
        container = ax.bar(x + offset, values, width, color=color, label=label)
        ax.bar_label(container, labels=["" if math.isnan(v) else f"{v:.2f}" for v in values], fontsize="small")
    ax.axhline(1.0, color="gray", linestyle="--", label="teacher")
    ax.axhline(0.0, color="black", linewidth=0.8)
    highest = bars[["student", "ensemble"]].max().max()
    ax.set_ylim(top=max(1.0, 0.0 if pd.isna(highest) else highest) + 0.3)  # room for the legend above the bars
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(SIZE_LABEL)
    ax.set_ylabel(GAP_LABEL)
    ax.set_title(f"Teacher gap closed, CE_start = round 0's untrained student\n{_run_title(run)}",
                 fontsize="medium")
    _legend(ax, fontsize="small", loc="upper center", ncols=3)
    return fig


def compare_ce_figure(runs) -> Figure:
    """Several runs: ensemble CE against size per seed group (mean line, min-max band), the independent baseline
    as a curve, one-round baselines as labelled dashed lines, the teacher as a dotted line."""
    fig = Figure(figsize=(7.2, 4.8), layout="constrained")
    ax = fig.subplots()
    for i, (label, group) in enumerate(group_seeds(runs).items()):
        color = f"C{i % 10}"
        baseline = group[0].config.get("baseline", "none")
        seeds = f" ({len(group)} seeds; band: min-max)" if len(group) > 1 else ""
        if baseline in SINGLE_MODEL_BASELINES:
            values = [v for v in (final_ensemble_ce(r.metrics) for r in group) if v is not None]
            if values:
                value = sum(values) / len(values)
                ax.axhline(value, color=color, linestyle="--", label=f"{label}{seeds}: {value:.3f}")
            continue
        spread = mean_and_spread([ensemble_curve(r.metrics) for r in group])
        if spread.empty:
            continue
        style = dict(marker="s", linestyle="-.") if baseline == "independent" else dict(marker="o", linestyle="-")
        ax.plot(spread["ensemble_size"], spread["mean"], color=color, label=label + seeds, **style)
        if len(group) > 1:
            ax.fill_between(spread["ensemble_size"], spread["min"], spread["max"], color=color, alpha=0.2,
                            linewidth=0)
    for name, value in teacher_lines(runs).items():
        ax.axhline(value, color="gray", linestyle=":", label=f"{name}: {value:.3f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(SIZE_LABEL)
    ax.set_ylabel(CE_LABEL)
    ax.set_title("Held-out CE against ensemble size")
    _legend(ax, fontsize="small")
    return fig


def final_ce_figure(runs) -> Figure:
    """Horizontal bars: each group's final ensemble CE (mean over seeds, whiskers min-max), best at the top."""
    table = final_ce_table(runs)
    fig = Figure(figsize=(7.2, max(3.4, 2.0 + 0.45 * len(table))), layout="constrained")
    ax = fig.subplots()
    y = list(range(len(table)))
    labelled = set()
    for position, row in zip(y, table.itertuples(index=False)):
        kind = row.baseline if row.baseline in BASELINE_NAMES else "none"
        color = f"C{list(BASELINE_NAMES).index(kind)}"
        whiskers = [[row.mean - row.min], [row.max - row.mean]] if row.n > 1 else None
        container = ax.barh(position, row.mean, xerr=whiskers, color=color, capsize=3,
                            label=None if kind in labelled else BASELINE_NAMES[kind])
        labelled.add(kind)
        ax.bar_label(container, labels=[f"{row.mean:.3f}"], label_type="center", color="white", fontsize="small")
    for name, value in teacher_lines(runs).items():
        ax.axvline(value, color="gray", linestyle=":", zorder=0.5, label=f"{name}: {value:.3f}")  # behind the bars
    ax.set_yticks(y, labels=[f"{row.label} ({row.members} member{'s' if row.members != 1 else ''}"
                             f"{f', {row.n} seeds' if row.n > 1 else ''})" for row in table.itertuples(index=False)],
                  fontsize="small")
    ax.invert_yaxis()  # best at the top
    ax.set_xlabel(f"final ensemble {CE_LABEL}")
    ax.set_ylabel("configuration (best first)")
    ax.set_title("Final ensemble CE by configuration (lower is better)")
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside lower center", ncols=3, fontsize="small")
    return fig


def run_figures(run: Run) -> dict[str, Figure]:
    """The figures of one run by file stem: ce_vs_ensemble_size, training_curves (when logged), gap_closed."""
    figures = {"ce_vs_ensemble_size": ce_vs_size_figure(run)}
    if run.train_log is not None and len(run.train_log):
        figures["training_curves"] = training_curves_figure(run)
    figures["gap_closed"] = gap_closed_figure(run)
    return figures


def comparison_figures(runs) -> dict[str, Figure]:
    """The figures comparing several runs by file stem: ce_vs_ensemble_size, final_ce."""
    return {"ce_vs_ensemble_size": compare_ce_figure(runs), "final_ce": final_ce_figure(runs)}


def save_figures(figures: dict[str, Figure], out_dir) -> list[Path]:
    """Write each figure as out_dir/<name>.png; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=DPI)
        paths.append(path)
    return paths


def plot_run(run_dir, out_dir=None) -> list[Path]:
    """Figures of one run, written into the run folder (or out_dir); returns the paths."""
    run = load_run(run_dir)
    return save_figures(run_figures(run), run.path if out_dir is None else out_dir)


def plot_runs(run_dirs, out_dir) -> list[Path]:
    """Figures comparing several runs, written into out_dir; returns the paths."""
    return save_figures(comparison_figures(load_runs(run_dirs)), out_dir)


# --- command line -----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Figures of one run (into its folder) or of several runs compared "
                                                 "(into --out).")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders written by main.py (runs/DATE/run_N)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: the run folder for one run, plots/ for several)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = [str(d) for d in args.run_dirs if not (RunLayout(d).metrics).is_file()]
    if missing:
        raise SystemExit(f"plot.py: no metrics.csv in {', '.join(missing)}: pass run folders written by main.py "
                         f"(runs/YYYY-MM-DD/run_N)")
    if len(args.run_dirs) == 1:
        paths = plot_run(args.run_dirs[0], args.out)
    else:
        paths = plot_runs(args.run_dirs, args.out if args.out is not None else Path("plots"))
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
