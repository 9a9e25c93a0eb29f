"""Studies side by side along the settings that tell them apart (the evidence's data axis: max_examples):
across.csv, every study's verdicts in one table, and across_curves.png, a panel per study of the single models'
learning curves and the ensembles against the students' own training FLOPs."""

from __future__ import annotations

import dataclasses

import pandas as pd
from matplotlib.figure import Figure

from slm_ensembles.study.comparison import deciding_verdicts
from slm_ensembles.study.figures import draw_curves
from slm_ensembles.study.grid import Matched, Study, StudyError
from slm_ensembles.study.report import deciding_lines, examples_line, examples_span, verdict_lines, wall_time_line


@dataclasses.dataclass(frozen=True)
class Panel:
    """One study's comparison, as collecting makes it and a side-by-side shows it: what tells it apart, its
    observations, curves, pairs and verdicts, its teacher, its run times, its training examples and its matched
    single families."""

    name: str
    setting: dict  # the settings (common to all its runs) in which it differs from the others; {} alone
    obs: pd.DataFrame
    curves: dict
    pairs: pd.DataFrame  # comparison.csv
    verdicts: pd.DataFrame
    teacher: float | None
    times: pd.DataFrame  # its run_times.csv
    train_examples: pd.Series  # per finished run, its training split's size (NaN: not recorded); runs.csv
    matched: tuple[Matched, ...] = ()  # the study's single families matched to an ensemble's size (its `match`)

    @property
    def label(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.setting.items())


def common_settings(study: Study) -> dict:
    """The settings every run of the study states alike (seed, data seed and learning rate aside: they are
    per run or per family)."""
    settings = [point.settings for point in study.points]
    if not settings:
        return {}
    return {key: value for key, value in settings[0].items()
            if key != "learning_rate" and all(key in s and s[key] == value for s in settings[1:])}


def differing_settings(studies: list[Study]) -> list[dict]:
    """Per study, the common settings whose values are not the same in every study: what its panel stands for.
    Refused when the studies share a name or state no such setting (nothing tells them apart)."""
    names = [study.name for study in studies]
    if len(set(names)) != len(names):
        raise StudyError(f"--across needs different studies; these repeat: {', '.join(names)}")
    commons = [common_settings(study) for study in studies]
    keys = dict.fromkeys(key for common in commons for key in common)
    differing = [key for key in keys
                 if len({repr(common.get(key)) for common in commons}) > 1]
    if not differing:
        raise StudyError(f"studies {', '.join(names)} state the same settings for all their runs: nothing to set "
                         "side by side (give them a setting that differs, such as max_examples)")
    return [{key: common.get(key) for key in differing} for common in commons]


def across_table(panels: list[Panel], deciding: bool = False) -> pd.DataFrame:
    """across.csv: every panel's verdicts (verdicts.csv's columns), after its study's name and the settings that
    tell it apart; `deciding`: only the verdicts each study was designed to decide (comparison.deciding_verdicts)."""
    keys = list(dict.fromkeys(key for panel in panels for key in panel.setting))
    shown = [deciding_verdicts(panel.verdicts, panel.matched) if deciding else panel.verdicts for panel in panels]
    frames = [verdicts.assign(**{key: panel.setting.get(key) for key in keys}, study=panel.name)
              for panel, verdicts in zip(panels, shown) if len(verdicts)]
    if not frames:
        return pd.DataFrame(columns=["study", *keys])
    table = pd.concat(frames, ignore_index=True)
    return table[["study", *keys, *[c for c in table.columns if c not in ("study", *keys)]]]


def across_figure(panels: list[Panel]) -> Figure:
    """A panel per study, side by side with one CE axis: its single models' learning curves and its ensembles
    against the training FLOPs the students spent (the teacher cache's build, paid alike by every run of a seed,
    taken off: it grows with the data size and would otherwise shift each panel by its own constant). The teacher's
    CE is in each panel's title, not drawn: far below the students, it would flatten their differences."""
    fig = Figure(figsize=(4.4 * len(panels), 4.6), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        if "train_flops" in panel.obs and panel.obs["train_flops"].notna().any():
            draw_curves(ax, panel.obs, panel.curves, None, students_only=True)
        else:
            ax.text(0.5, 0.5, "no finished run with training FLOPs", ha="center", transform=ax.transAxes)
        teacher = f" (teacher: {panel.teacher:.3f})" if panel.teacher is not None else ""
        span = examples_span(panel.train_examples)
        ax.set_title(panel.label + teacher + (f"\n{span} training examples" if span else ""), fontsize="medium")
    for ax in axes[1:]:
        ax.set_ylabel("")
    fig.suptitle("Held-out CE against the students' training FLOPs: single models' curves and ensembles, "
                 "one line or mark per seed", fontsize="medium")
    return fig


def across_markdown(panels: list[Panel]) -> str:
    """across.md: each study with what tells it apart, its teacher and measured wall time, then every verdict."""
    keys = tuple(dict.fromkeys(key for panel in panels for key in panel.setting))
    lines = ["# Studies side by side: " + ", ".join(panel.name for panel in panels), "",
             "CE is test cross-entropy, nats per supervised token; each verdict is the ensemble's CE minus the single "
             "model's, paired by seed, with its 95% t-interval (as in each study's summary.md).", ""]
    for panel in panels:
        teacher = f" Teacher: {panel.teacher:.4f}." if panel.teacher is not None else ""
        lines.append(f"- {panel.name} ({panel.label}): {examples_line(panel.train_examples)} "
                     f"{wall_time_line(panel.times)}{teacher}")
    seconds = sum(panel.times["seconds"].sum() for panel in panels)
    lines.append(f"- In all: {seconds / 3600:.2f} h measured.")
    lines += deciding_lines(across_table(panels, deciding=True), lead=("study", *keys))
    lines += ["", "## Every verdict", "", *verdict_lines(across_table(panels), lead=("study", *keys))]
    return "\n".join(lines) + "\n"
