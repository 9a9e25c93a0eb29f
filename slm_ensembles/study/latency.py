"""What --latency reads and derives, apart from the timing itself (study.py, through benchmarks/bench_inference.py):
the run that stands for each point, a saved ensemble cut to its first members, CE intervals and the Pareto
frontier of lower CE and lower latency."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from transformers import AutoConfig, AutoModelForCausalLM

from ensemble import saved_ensemble_config
from slm_ensembles.study.collecting import observations, point_table
from slm_ensembles.study.comparison import CONFIDENCE

LATENCY_COLUMNS = ["family", "series", "kind", "point", "ensemble_size", "parameters", "seeds", "ce_mean", "ce_low",
                   "ce_high", "latency_ms_parallel", "latency_ms_sequential", "frontier", "run", "weights", "processes",
                   "threads_per_process", "cpu_count", "machine", "prompt_tokens", "new_tokens", "repeats",
                   "statistic"]


def first_members(folder: Path, size: int, into: Path) -> tuple[Path, str]:
    """(a saved ensemble of the first `size` members of the one in `folder`, made in `into`; which weights it holds).
    Its config.json names those member folders; the rest of its files and the members' folders are linked, not
    copied. A member kept as a record only (config.json, no weights: a study's runs carried over from another
    machine) is built from its config with random weights: decode latency depends on the shapes, not the values,
    and the second value says "random" so the table says which were timed."""
    config = json.loads((folder / "config.json").read_text())
    kept = config["member_subfolders"][:size]
    config.update(member_subfolders=kept, **({"weights": config["weights"][:size]} if config.get("weights") else {}))
    into.mkdir(parents=True, exist_ok=True)
    records_only = [name for name in kept if not any((folder / name).glob("*.safetensors"))]
    for path in folder.iterdir():
        if path.name != "config.json" and (path.is_file() or path.name in kept) and path.name not in records_only:
            (into / path.name).symlink_to(path.resolve(), target_is_directory=path.is_dir())
    for name in records_only:
        random_weights(folder / name, into / name)
    (into / "config.json").write_text(json.dumps(config, indent=2))
    saved_ensemble_config(into)  # a folder the loaders accept
    return into, "random" if records_only else "trained"


def random_weights(member: Path, into: Path) -> None:
    """The model member/config.json describes, with freshly initialised weights, saved in `into`."""
    if not (member / "config.json").is_file():
        raise FileNotFoundError(f"{member} holds neither weights nor a config.json: its shapes are unknown, so it "
                                f"cannot be timed")
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(member)).save_pretrained(into)


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
