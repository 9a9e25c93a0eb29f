"""summary.md: the study's tables in short (points, fits, verdicts, teacher gap, latency) and its notes, with
numbers written as the summary quotes them."""

from __future__ import annotations

import math

import pandas as pd

from slm_ensembles.study.collecting import X_AXES, finished_examples
from slm_ensembles.study.grid import Study


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


def verdict_lines(verdicts: pd.DataFrame, lead: tuple[str, ...] = ()) -> list[str]:
    """summary.md's table of verdicts.csv, each verdict with its axis; `lead`: columns of `verdicts` shown first
    (across.md's study and the settings that tell it apart)."""
    if verdicts.empty:
        return ["No comparison: it needs ensemble and single-model runs of the same seeds with the compared axes' "
                "columns in metrics.csv, at x values the single models cover (on train_flops: a single model's "
                "first evaluation within the ensemble's spend)."]
    return _markdown(pd.DataFrame({
        **{name: verdicts[name] for name in lead}, "axis": verdicts["axis"], "at": verdicts["x_value"].map(_number),
        "ensemble": verdicts["ensemble"],
        "members": verdicts["ensemble_size"], "single": verdicts["single"],
        "CE ensemble / single": [f"{e:.4f} / {s:.4f}" for e, s in zip(verdicts["ensemble_ce"],
                                                                      verdicts["single_ce"])],
        "ensemble − single [95% CI]": [f"{_signed(m)} [{_signed(lo)}, {_signed(hi)}]" for m, lo, hi in
                                       zip(verdicts["mean_difference"], verdicts["low"], verdicts["high"])],
        "wins": [f"{w} of {n}" for w, n in zip(verdicts["wins"], verdicts["seeds"])],
        "verdict": verdicts["verdict"], "compute multiplier": [_multiplier(r) for _, r in verdicts.iterrows()],
        "students' compute multiplier": [_multiplier(r, "students_multiplier") for _, r in verdicts.iterrows()]}))


def deciding_lines(deciding: pd.DataFrame, lead: tuple[str, ...] = ()) -> list[str]:
    """The section of the verdicts the study was designed to decide (comparison.deciding_verdicts): each single
    model matched to an ensemble's size against it, at equal training FLOPs and on its matched axis."""
    if deciding.empty:
        return []
    return ["", "## The deciding comparisons", "",
            "Each single model matched to an ensemble's size (the spec's `match`) against that ensemble: at equal "
            "training FLOPs (read off its learning curve at the ensemble's spend) and on the axis it was matched on "
            "(trained to its plateau). The full table follows.", "", *verdict_lines(deciding, lead)]


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


def grid_edge_notes(tuning: list[dict]) -> list[str]:
    """A note for each learning rate chosen at its grid's edge (tuning.csv's grid_edge): the tuning may have missed a
    better rate beyond it, so the family may be under-tuned and a verdict against it is weaker."""
    return [f"family {row['family']}" + (f" at {row['point']}" if row["point"] != row["family"] else "")
            + f" chose learning rate {row['rate']:g}, the {row['grid_edge']} of its grid: a rate beyond it was not "
            "tried, so the family may be under-tuned" for row in tuning if row.get("grid_edge")]


def examples_span(train_examples: pd.Series) -> str:
    """The range of the recorded training split sizes ("209 to 218", or one number); "" when none is recorded."""
    known = train_examples.dropna().astype(int)
    if not len(known):
        return ""
    return f"{known.min()}" if known.min() == known.max() else f"{known.min()} to {known.max()}"


def examples_line(train_examples: pd.Series) -> str:
    """The finished runs' training split sizes (runs.csv's train_examples): the study's data size as the runs
    trained on it, once conversations too long for max_length are dropped and the held-out splits taken."""
    known = int(train_examples.notna().sum())
    unknown = len(train_examples) - known
    if not known:
        return "No finished run records its training examples." if unknown else ""
    return (f"Training examples: {examples_span(train_examples)} per run (the manifests of {known} finished run(s))"
            + (f"; {unknown} finished run(s) do not record it (started before manifests kept it)" if unknown else "")
            + ".")


def wall_time_line(times: pd.DataFrame) -> str:
    """The study's measured wall time so far (run_times.csv), and how many finished runs it leaves out."""
    timed = times[times["seconds"].notna()]
    untimed = int(((times["status"] == "finished") & times["seconds"].isna()).sum())
    return (f"Measured wall time: {timed['seconds'].sum() / 3600:.2f} h in {int(timed['launches'].sum())} "
            f"launch(es) of {len(timed)} run(s), tuning runs included (run_times.csv)"
            + (f"; {untimed} finished run(s) have no wall_time.csv (launched before studies recorded it)"
               if untimed else "") + ".")


def summary_markdown(study: Study, runs: pd.DataFrame, points: pd.DataFrame, fits: pd.DataFrame,
                     verdicts: pd.DataFrame, deciding: pd.DataFrame, notes: list[str], teacher: float | None,
                     gap: pd.DataFrame | None = None, latency: pd.DataFrame | None = None,
                     times: pd.DataFrame | None = None) -> str:
    counts = runs["status"].value_counts() if len(runs) else pd.Series(dtype=int)
    finished = finished_examples(runs)
    lines = [f"# Study {study.name}", "",
             f"{len(runs)} runs: {counts.get('finished', 0)} finished, {counts.get('unfinished', 0)} unfinished, "
             f"{counts.get('missing', 0)} not started; only finished runs count below. CE is test cross-entropy, "
             f"nats per supervised token."
             + (f" Teacher: {teacher:.4f}." if teacher is not None else "")
             + (f" {wall_time_line(times)}" if times is not None and len(times) else "")
             + (f" {examples_line(finished)}" if len(finished) else ""), "",
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
    lines += deciding_lines(deciding)
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
