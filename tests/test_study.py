"""study.py and its pieces (slm_ensembles/study/): the power-law fit on points of known exponent, the spec's grid, skipping and resuming runs, the sbatch
lines, collecting synthetic run folders of known laws, and a real tiny study of `test`-preset runs end to end."""

import dataclasses
import json
import math
import shlex
import shutil
import types
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from matplotlib.figure import Figure
from scipy import stats
from transformers import LlamaConfig, LlamaForCausalLM

import config as config_lib
from conftest import DATA_DIR
from ensemble import ModelEnsemble
import study
from slm_ensembles import students
from slm_ensembles.study import running
from slm_ensembles.study.across import Panel, across_markdown, differing_settings
from slm_ensembles.study.collecting import collect_rows, observations, point_table
from slm_ensembles.study.comparison import (Curve, deciding_verdicts, multiplier_summary, paired_interval,
                                            paired_single, pairs_table, single_at, single_curves, verdict,
                                            verdict_table)
from slm_ensembles.study.figures import ce_figure, curves_figure, draw_curves, fixed_flops, latency_figure, study_figures
from slm_ensembles.study.fits import (ALPHA_BOUNDS, FitError, INTERVAL, bootstrap_laws, fit_all, fit_power_law,
                                      too_few_points)
from slm_ensembles.study.grid import Matched, StudyError
from slm_ensembles.study.latency import first_members, pareto_frontier
from slm_ensembles.study.matching import ensemble_size_value, teacher_parts
from slm_ensembles.study.quoted import quoted_numbers_missing
from slm_ensembles.study.spec import check_points, load_spec
from slm_ensembles.study.status import point_status
from slm_ensembles.study.teacher_gap import teacher_gap_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- the fit ----------------------------------------------------------------------------------------------------------

def test_exact_points_are_recovered_exactly():
    x = np.array([1, 2, 4, 8, 16, 32], dtype=float)
    law = fit_power_law(x, 1.5 + 3 * x ** -0.7)
    assert (law.l_inf, law.a, law.alpha) == pytest.approx((1.5, 3.0, 0.7), abs=1e-8)
    assert law.rss < 1e-20 and law.n == law.n_x == 6


def test_exact_points_at_flops_scale_are_recovered():
    """x of 1e15 to 1e18 (training FLOPs): A is in x's own units, A = 3 * 1e15^0.7."""
    x = np.geomspace(1e15, 1e18, 7)
    law = fit_power_law(x, 1.5 + 3 * (x / 1e15) ** -0.7)
    assert law.alpha == pytest.approx(0.7, abs=1e-8) and law.l_inf == pytest.approx(1.5, abs=1e-8)
    assert law.a == pytest.approx(3 * 1e15 ** 0.7, rel=1e-6)
    assert law(1e15) == pytest.approx(4.5, abs=1e-8)


def test_noisy_points_recover_the_exponent_and_the_bootstrap_covers_it():
    rng = np.random.default_rng(0)
    x = np.geomspace(1, 1000, 10)
    obs = pd.DataFrame([dict(seed=seed, x=xi, ce=1.5 + 3 * xi ** -0.7 + rng.normal(0, 0.005))
                        for seed in range(4) for xi in x])
    law = fit_power_law(obs["x"], obs["ce"])
    assert law.alpha == pytest.approx(0.7, abs=0.03) and law.l_inf == pytest.approx(1.5, abs=0.03)
    assert law.a == pytest.approx(3.0, abs=0.05)
    boot = bootstrap_laws(obs, "x", replicates=100)
    assert boot.shape == (100, 3)
    low, high = np.percentile(boot[:, 2], INTERVAL)
    assert low < 0.7 < high and high - low < 0.1
    assert bootstrap_laws(obs[obs["seed"] == 0], "x", replicates=100).shape == (0, 3)  # one seed: none


def test_bounds_hold_and_a_fit_needs_four_distinct_x_and_four_distinct_ce():
    law = fit_power_law([1, 2, 4, 8, 16], [5.0, 4.0, 3.0, 2.0, 1.0])  # linear in log x: no asymptote
    assert law.l_inf >= 0 and law.alpha >= ALPHA_BOUNDS[0]
    three = fit_power_law([1, 2, 4], 1.5 + 3 * np.array([1, 2, 4]) ** -0.7)
    assert three(2) == pytest.approx(1.5 + 3 * 2 ** -0.7, abs=1e-6)  # 3 points: the curve passes through them
    with pytest.raises(FitError, match="2 distinct x"):
        fit_power_law([1, 1, 2, 2], [3.0, 3.1, 2.0, 2.1])
    four = pd.DataFrame({"x": [1, 2, 4, 8], "ce": [3.0, 2.5, 2.2, 2.0]})
    assert too_few_points(four, "x") == ""
    assert "3 distinct x and 3 distinct mean CE" in too_few_points(four[:3], "x")
    stayed = four.assign(ce=[3.0, 2.5, 2.5, 2.50005])  # additive members that stayed at zero repeat the CE
    assert "4 distinct x and 2 distinct mean CE" in too_few_points(stayed, "x")


# --- the spec and the grid ------------------------------------------------------------------------------------------

def write_spec(path, families, **top):
    """A spec of `families`; one without a single-model family compares nothing (compare: [])."""
    spec = dict(name="scaling", output=str(path.parent / "study"), preset="test", seeds=[0, 1], families=families)
    if not any(f.get("kind") == "single" or "baseline" in f.get("settings", {}) for f in families):
        spec["compare"] = []
    spec.update(top)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


ENSEMBLE_AND_SINGLE = [
    dict(name="method", settings=dict(total_rounds=4), grid=dict(combine=["logits", "additive"])),
    dict(name="single", kind="single", settings=dict(total_rounds=1), grid=dict(student_num_layers=[1, 3, 5, 8])),
]


def test_spec_grid_names_series_and_run_arguments(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", ENSEMBLE_AND_SINGLE, settings=dict(alpha=0.7))
    loaded = load_spec(spec)
    assert loaded.folder == (tmp_path / "study").resolve() and loaded.families == ["method", "single"]
    assert len(loaded.points) == (2 + 4) * 2
    first = loaded.points[0]
    assert first.name == "method__combine-logits__seed-0" and first.series == "method (combine=logits)"
    assert first.kind == "ensemble" and first.expected_rounds == 4
    assert first.output_root == loaded.folder / "runs" / first.name
    assert first.run_args() == ["--preset", "test", "--output_root", str(first.output_root), "--alpha", "0.7",
                                "--total_rounds", "4", "--combine", "logits", "--seed", "0", "--data_seed", "0"]
    assert loaded.points[1].config.data_seed == 1  # the seeds vary the data
    single = [p for p in loaded.points if p.family == "single"]
    assert {p.series for p in single} == {"single"} and single[2].label == "student_num_layers=3"
    assert single[0].kind == "single" and single[0].expected_rounds == 1
    # A baseline family is single by default; its rounds are one.
    matched = write_spec(tmp_path / "m.yaml", [dict(name="m", settings=dict(baseline="single_matched"))])
    (point, _) = load_spec(matched).points
    assert point.kind == "single" and point.expected_rounds == 1 and point.label == "m"


@pytest.mark.parametrize("families, message", [
    ([dict(name="a", grid=dict(seed=[0, 1]))], "sets seed"),
    ([dict(name="a", settings=dict(output_root="x"))], "sets output_root"),
    ([dict(name="a", grid=dict(alpah=[0.1]))], "alpah"),
    ([dict(name="a", grid=dict(alpha=[2.0]))], "run a__alpha-2.0__seed-0: config key 'alpha'"),
    ([dict(name="a"), dict(name="a")], "run names repeat"),
    ([dict(name="a", split_by=["combine"])], "split_by"),
    ([dict(name="a b")], "family name"),
])
def test_bad_specs_are_refused_by_name(tmp_path, families, message):
    with pytest.raises(StudyError, match=message):
        load_spec(write_spec(tmp_path / "spec.yaml", families))
    assert study.main([str(tmp_path / "spec.yaml"), "--dry_run"]) == 2


# --- fake run folders -------------------------------------------------------------------------------------------------

def fake_run(point, ensemble_ce, extra=None, rounds_done=None, run_name="run_1", evals=None, train_examples=None,
             **config_changes):
    """A run folder as main.py writes it for `point`: the teacher row, then per round the untrained student, the
    student and the ensemble of `ensemble_ce[r]` (one number per size); `extra` maps a column to a function of the
    size. rounds_done: how many rounds the manifest marks done (default: all). evals: train_log.csv's early-stopping
    rows, dicts of round, train_flops, heldout_ce, test_ce (each after a training-loss row). train_examples: the
    training split's size the manifest records (None: a manifest from before they were recorded)."""
    run_dir = point.output_root / "2026-12-01" / run_name
    run_dir.mkdir(parents=True)
    if evals is not None:
        log = [row for step, e in enumerate(evals) for row in (dict(round=e["round"], step=step, loss=3.0),
                                                               dict(e, step=step))]
        pd.DataFrame(log).to_csv(run_dir / "train_log.csv", index=False)
    rows = [dict(round=0, model="teacher", ensemble_size=0, ce=1.0)]
    for r, ce in enumerate(ensemble_ce):
        size = r + 1 if point.kind == "ensemble" else 1
        rows += [dict(round=r, model="student_untrained", ensemble_size=1, ce=9.0),
                 dict(round=r, model="student", ensemble_size=1, ce=ce + 0.1),
                 dict(round=r, model="ensemble", ensemble_size=size, ce=ce)]
    for row in rows:
        row.update(perplexity=math.exp(row["ce"]), kl_teacher=row["ce"] - 1.0, top1_agreement=0.5, ece=0.1,
                   diversity=0.0, num_tokens=100, seconds=1.0)
        for column, of_size in (extra or {}).items():
            row[column] = of_size(row["ensemble_size"])
    pd.DataFrame(rows).to_csv(run_dir / "metrics.csv", index=False)
    saved = {**point.config.to_dict(), "output_root": str(point.output_root), **config_changes}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    planned = saved["total_rounds"] if saved["baseline"] not in config_lib.SINGLE_MODEL_BASELINES and \
        point.kind == "ensemble" else len(ensemble_ce)
    done = planned if rounds_done is None else rounds_done
    manifest = {"rounds": {str(i): "done" if i < done else "training" for i in range(planned)}}
    if train_examples is not None:
        manifest["examples"] = {"train": train_examples, "test": 8, "early_stop": 4}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return run_dir


def test_skips_finished_resumes_unfinished_starts_missing_then_runs_nothing(tmp_path, monkeypatch):
    spec = write_spec(tmp_path / "spec.yaml", [dict(name="method", settings=dict(total_rounds=2))], seeds=[0, 1, 2])
    finished, unfinished, missing = load_spec(spec).points
    fake_run(finished, [3.0, 2.5])
    half = fake_run(unfinished, [3.0], rounds_done=1)
    calls = []

    def fake_launch(args, log_path):  # plays main.py: the run it is asked for ends finished
        calls.append(args)
        if args[0] == "--resume":
            manifest = json.loads((half / "manifest.json").read_text())
            manifest["rounds"] = {k: "done" for k in manifest["rounds"]}
            (half / "manifest.json").write_text(json.dumps(manifest))
        else:
            fake_run(missing, [3.1, 2.6])
        return 0

    monkeypatch.setattr(running, "launch", fake_launch)
    assert study.main([str(spec), "--bootstrap", "0"]) == 0
    assert calls == [["--resume", str(half)], missing.run_args()]
    folder = load_spec(spec).folder
    assert set(pd.read_csv(folder / "runs.csv")["status"]) == {"finished"}
    launch = pd.read_csv(half / "wall_time.csv")  # each launch's wall time, kept in the run's folder
    assert list(launch.columns) == ["started", "seconds", "exit_code"] and len(launch) == 1
    assert launch["exit_code"].tolist() == [0] and 0 <= launch["seconds"][0] < 60
    times = pd.read_csv(folder / "run_times.csv").set_index("run")
    assert times["launches"].tolist() == [0, 1, 1]  # the run finished before this study ran it has no record
    assert times["seconds"].isna().tolist() == [True, False, False]
    assert times.loc[missing.name, "seconds"] == pd.read_csv(next(missing.output_root.glob("*/run_*/wall_time.csv"))
                                                             )["seconds"].sum()
    assert ("launch(es) of 2 run(s), tuning runs included (run_times.csv); 1 finished run(s) have no wall_time.csv"
            in (folder / "summary.md").read_text())
    calls.clear()
    assert study.main([str(spec), "--bootstrap", "0"]) == 0
    assert calls == []  # everything finished: nothing runs again
    assert len(pd.read_csv(half / "wall_time.csv")) == 1  # and no launch was recorded


def test_a_run_resumed_after_a_failed_launch_records_both_launches_wall_times(tmp_path, monkeypatch):
    spec = write_spec(tmp_path / "spec.yaml", [dict(name="method", settings=dict(total_rounds=2))], seeds=[0])
    (point,) = load_spec(spec).points
    half = fake_run(point, [3.0], rounds_done=1)
    codes = [1, 0]

    def fake_launch(args, log_path):  # the first launch dies; the second finishes the run
        code = codes.pop(0)
        if code == 0:
            manifest = json.loads((half / "manifest.json").read_text())
            (half / "manifest.json").write_text(json.dumps({**manifest, "rounds": {"0": "done", "1": "done"}}))
        return code

    monkeypatch.setattr(running, "launch", fake_launch)
    assert study.main([str(spec), "--bootstrap", "0"]) == 1
    assert study.main([str(spec), "--bootstrap", "0"]) == 0
    assert pd.read_csv(half / "wall_time.csv")["exit_code"].tolist() == [1, 0]
    times = pd.read_csv(load_spec(spec).folder / "run_times.csv")
    assert times["launches"].tolist() == [2] and times["status"].tolist() == ["finished"]


def test_grown_rounds_resume_and_other_settings_are_refused(tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path / "spec.yaml", [dict(name="method", settings=dict(total_rounds=3))], seeds=[0, 1])
    grown, other = load_spec(spec).points
    run_dir = fake_run(grown, [3.0, 2.5], total_rounds=2)  # finished with 2 rounds; the spec now asks for 3
    assert point_status(grown).resume_args == ("--resume", str(run_dir), "--total_rounds", "3")
    fake_run(other, [3.0, 2.5, 2.2], alpha=0.9)  # made with another alpha than the spec's
    with pytest.raises(StudyError, match=r"alpha: run 0.9, spec 0.5"):
        point_status(other)
    monkeypatch.setattr(running, "launch", lambda *a: pytest.fail("nothing may run"))
    assert study.main([str(spec)]) == 2 and "other settings" in capsys.readouterr().err


def test_failed_run_is_reported_and_the_rest_still_runs(tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path / "spec.yaml", [dict(name="method", settings=dict(total_rounds=1))])
    first, second = load_spec(spec).points
    ran = []

    def fake_launch(args, log_path):
        ran.append(args)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("boom\n")
        if first.name not in " ".join(args):
            fake_run(second, [2.0])
            return 0
        return 1

    monkeypatch.setattr(running, "launch", fake_launch)
    assert study.main([str(spec), "--bootstrap", "0"]) == 1
    assert len(ran) == 2
    captured = capsys.readouterr()
    assert "not finished (main.py exit code 1)" in captured.out and "boom" in captured.out
    assert first.name in captured.err
    runs = pd.read_csv(load_spec(spec).folder / "runs.csv").set_index("run")["status"]
    assert runs[first.name] == "missing" and runs[second.name] == "finished"


def test_dry_run_lists_points_and_their_state(tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", [dict(name="method", settings=dict(total_rounds=1))])
    fake_run(load_spec(spec).points[0], [2.0])
    assert study.main([str(spec), "--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "2 runs" in lines[0] and "1 finished" in lines[0] and "1 not started" in lines[0]
    assert lines[1].split()[:2] == ["finished", "method__seed-0"]
    assert lines[2].split()[:2] == ["missing", "method__seed-1"]
    assert not (load_spec(spec).folder / "rows.csv").exists()  # a dry run writes nothing


def test_print_sbatch_gives_each_array_task_its_settings(tmp_path, capsys):
    families = [dict(name="method", settings=dict(total_rounds=2), grid=dict(combine=["logits", "weighted"])),
                dict(name="big", preset="demo", settings=dict(baseline="single_large", total_rounds=2))]
    spec = write_spec(tmp_path / "spec.yaml", families, settings=dict(steps_per_round=5))
    loaded = load_spec(spec)
    half = fake_run(loaded.points[0], [3.0], rounds_done=1)
    assert study.main([str(spec), "--print_sbatch"]) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("sbatch")]
    assert len(lines) == 3  # the test preset's new runs, the demo preset's, the resumed one

    def tasks(words):
        """What train.sh gives main.py for each array task: the arguments, then --KEY V_i of the sweep."""
        array = next(w for w in words if w.startswith("--array="))
        first, last = map(int, array.removeprefix("--array=").split("-"))
        sweep = words[words.index("--sweep") + 1]
        key, values = sweep.split("=", 1)
        values = values.split(",")
        assert (first, last) == (0, len(values) - 1)
        script = next(i for i, w in enumerate(words) if w.endswith("train.sh"))
        rest = [w for w in words[script + 1:] if w not in ("--sweep", sweep)]
        return [(rest, key, value) for value in values]

    started = {}
    for rest, key, value in tasks(lines[0]) + tasks(lines[1]):
        assert key == "config" and rest[0] == "--preset"
        config = config_lib.build_config(rest[1], value)  # what main.py builds from it
        started[config.output_root] = (rest[1], config)
    wanted = {str(p.output_root): p for p in loaded.points[1:]}
    assert set(started) == set(wanted)
    for root, (preset, config) in started.items():
        point = wanted[root]
        assert preset == point.preset and config.seed == point.seed and config.steps_per_round == 5
        assert config.combine == point.settings.get("combine", "logits") and config.baseline == point.config.baseline
    assert tasks(lines[2]) == [([], "resume", str(half))]


# --- collecting synthetic runs of known laws ----------------------------------------------------------------------

P0, F0 = 1e6, 1e12  # parameters and training FLOPs of one unit (one student, one layer)


def ensemble_law(k):
    return 1.5 + 3 * k ** -0.7


def single_law(n):
    return 1.2 + 3 * n ** -0.5


def single_curve(n, final_ce, fractions=(0.25, 0.5, 0.75, 1.0)):
    """A single model of n units' early-stopping evaluations: spend n F0 x fraction, test CE falling to final_ce
    (0.3 above it at the start), held-out CE 0.05 above the test CE."""
    return [dict(round=0, train_flops=n * F0 * f, test_ce=final_ce + 0.3 * (1 - f),
                 heldout_ce=final_ce + 0.3 * (1 - f) + 0.05) for f in fractions]


@pytest.fixture
def synthetic_study(tmp_path):
    """Ensembles of 1-4 students (CE 1.5 + 3 k^-0.7; additive 0.5 lower) and single models of 1, 3, 5, 8 layers
    (CE 1.2 + 3 n^-0.5, the end of a learning curve: single_curve), k students or n layers having k or n times P0
    parameters (half of them not embeddings) and F0 FLOPs; 3 seeds, noise 0.002. No critical_path_layers column."""
    spec = write_spec(tmp_path / "spec.yaml", ENSEMBLE_AND_SINGLE, seeds=[0, 1, 2])
    loaded = load_spec(spec)
    rng = np.random.default_rng(0)
    for point in loaded.points:
        if point.kind == "ensemble":
            shift = -0.5 if point.settings["combine"] == "additive" else 0.0
            ce = [ensemble_law(k) + shift + rng.normal(0, 0.002) for k in range(1, 5)]
            fake_run(point, ce, extra=dict(parameters=lambda k: k * P0, non_embedding_parameters=lambda k: k * P0 / 2,
                                           train_flops=lambda k: k * F0))
        else:
            n = point.settings["student_num_layers"]
            ce = single_law(n) + rng.normal(0, 0.002)
            fake_run(point, [ce], evals=single_curve(n, ce),
                     extra=dict(parameters=lambda k, n=n: n * P0, non_embedding_parameters=lambda k, n=n: n * P0 / 2,
                                train_flops=lambda k, n=n: n * F0))
    return spec


def test_collect_writes_rows_fits_comparison_summary_and_figures(synthetic_study):
    assert study.main([str(synthetic_study), "--collect", "--bootstrap", "40"]) == 0
    folder = load_spec(synthetic_study).folder

    rows = pd.read_csv(folder / "rows.csv")
    assert len(rows) == 6 * (1 + 3 * 4) + 12 * (1 + 3)  # every row of the 18 runs: teacher, then 3 per round
    assert {"run", "family", "series", "kind", "seed", "preset", "total_rounds", "combine", "student_num_layers",
            "ce", "parameters", "train_flops"} <= set(rows.columns)
    one = rows[(rows["run"] == "method__combine-additive__seed-2") & (rows["model"] == "ensemble")]
    assert list(one["ensemble_size"]) == [1, 2, 3, 4] and set(one["combine"]) == {"additive"}
    assert set(one["seed"]) == {2} and set(one["family"]) == {"method"}

    points = pd.read_csv(folder / "summary.csv").set_index(["series", "point"])
    assert points.loc[("method (combine=logits)", "2 member(s)"), "seeds"] == 3
    assert points.loc[("method (combine=logits)", "2 member(s)"), "ce_mean"] == pytest.approx(ensemble_law(2),
                                                                                              abs=0.01)
    assert points.loc[("single", "student_num_layers=5"), "parameters"] == 5 * P0
    assert 0 < points.loc[("single", "student_num_layers=5"), "ce_std"] < 0.01

    fits = pd.read_csv(folder / "fits.csv").set_index(["series", "x"])
    for x in ("ensemble_size", "parameters", "train_flops"):
        assert fits.loc[("method (combine=logits)", x), "alpha"] == pytest.approx(0.7, abs=0.1)
        assert fits.loc[("method (combine=additive)", x), "alpha"] == pytest.approx(0.7, abs=0.1)
    assert fits.loc[("method (combine=logits)", "parameters"), "a"] == pytest.approx(3 * P0 ** 0.7, rel=0.3)
    single = fits.loc[("single", "parameters")]
    assert single["alpha"] == pytest.approx(0.5, abs=0.15) and single["alpha_low"] <= single["alpha"]
    assert single["alpha"] <= single["alpha_high"] and single["bootstrap_fits"] > 0 and single["determined"]
    assert ("single", "ensemble_size") not in fits.index  # a single model has one size

    pairs = pd.read_csv(folder / "comparison.csv")  # one row per seed: the evidence of each verdict
    assert set(pairs["axis"]) == {"parameters", "non_embedding_parameters", "train_flops"}
    assert len(pairs[(pairs["axis"] == "parameters") & (pairs["point"] == "4 member(s)")]) == 2 * 3
    verdicts = pd.read_csv(folder / "verdicts.csv")
    logits = verdicts[(verdicts["ensemble"] == "method (combine=logits)") & (verdicts["axis"] == "parameters")]
    by_point = logits.set_index("point")
    assert by_point.loc["1 member(s)", "single_from"] == "grid point student_num_layers=1"
    assert by_point.loc["3 member(s)", "single_from"] == "grid point student_num_layers=3"
    assert by_point.loc["2 member(s)", "single_from"] == "interpolated"
    four = by_point.loc["4 member(s)"]
    assert four["mean_difference"] == pytest.approx(ensemble_law(4) - single_law(4), abs=0.02)
    assert four["low"] < four["mean_difference"] < four["high"] < 0 and four["wins"] == 3 and four["seeds"] == 3
    assert four["verdict"] == "ensemble better"  # 2.64 against 2.70
    assert by_point.loc["1 member(s)", "verdict"] == "single better" and by_point.loc["1 member(s)", "wins"] == 0

    flops = verdicts[verdicts["axis"] == "train_flops"].set_index(["ensemble", "point"])
    # The logits ensemble of 4 (CE 2.64 at 4 F0): within 4 F0 the lowest held-out CE is the 8-layer model's
    # evaluation at 4 F0 (test CE 2.41); the curve's choice is below 2.64 from 2 F0 on (2.49): a multiplier of 0.5.
    logits4 = flops.loc[("method (combine=logits)", "4 member(s)")]
    assert logits4["single_ce"] == pytest.approx(single_law(8) + 0.15, abs=0.005)
    assert logits4["verdict"] == "single better"
    assert logits4["multiplier_median"] == pytest.approx(0.5) and logits4["multiplier_reached"] == 3
    assert logits4["multiplier_low"] == pytest.approx(0.5) == logits4["multiplier_high"]
    additive4 = flops.loc[("method (combine=additive)", "4 member(s)")]  # 2.14: below every single model
    assert additive4["multiplier_reached"] == 0 and additive4["multiplier_bound"] == pytest.approx(2.0)
    assert math.isnan(additive4["multiplier_median"])

    summary = (folder / "summary.md").read_text()
    assert "18 runs: 18 finished" in summary and "Teacher: 1.0000" in summary
    assert "| method (combine=logits) | 4 member(s) | 3 |" in summary
    assert "| parameters | 4e+06 | method (combine=logits) | 4 | single |" in summary  # each verdict its axis
    assert "ensemble better" in summary and "single better" in summary
    assert "not reached: > 2.00× on 3 of 3 seeds" in summary and "median 0.50×" in summary
    assert "no `critical_path_layers` column" in summary
    for name in ("ce_vs_ensemble_size", "ce_vs_parameters", "ce_vs_train_flops"):
        assert (folder / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE
        assert matplotlib.image.imread(folder / f"{name}.png").shape[:2] == (480, 720)
    assert not (folder / "ce_vs_critical_path_layers.png").exists()
    assert quoted_numbers_missing(summary, [folder / "verdicts.csv", folder / "summary.csv",
                                                  folder / "fits.csv", folder / "teacher_gap.csv"]) == []
    # summary.md quotes the tables


def test_figures_draw_every_series_with_seed_bars_and_fits(synthetic_study):
    loaded = load_spec(synthetic_study)
    rows, _ = collect_rows(loaded)
    obs = observations(rows)
    points = point_table(obs)
    fits, _ = fit_all(obs, rows.columns, replicates=0)
    figures = study_figures(points, fits, 1.0, obs, {}, loaded.name)
    assert set(figures) == {"ce_vs_ensemble_size", "ce_vs_parameters", "ce_vs_non_embedding_parameters",
                            "ce_vs_train_flops"}  # no learning curves in these synthetic runs: no curve figure
    (ax,) = figures["ce_vs_parameters"].axes
    assert ax.get_xscale() == "log" and "parameters" in ax.get_xlabel()
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert sum("mean ± std over seeds" in label for label in labels) == 3  # two combine modes, the single family
    assert sum(label.startswith("fit: ") for label in labels) == 3 and "teacher: 1.000" in labels
    assert len(ax.containers) == 3  # the error bars
    single_bars = ax.containers[2]
    assert len(single_bars.lines[0].get_xdata()) == 4  # the 4 single models
    (size_ax,) = figures["ce_vs_ensemble_size"].axes
    size_labels = [text.get_text() for text in size_ax.get_legend().get_texts()]
    assert any(label.startswith("single, best (student_num_layers=8)") for label in size_labels)
    assert [t.get_text() for t in size_ax.get_xticklabels()] == ["1", "2", "3", "4"]


def test_collect_with_one_seed_and_no_runs(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", [dict(name="method", settings=dict(total_rounds=4))], seeds=[0])
    assert study.main([str(spec), "--collect"]) == 0  # nothing finished yet
    folder = load_spec(spec).folder
    assert "No finished run yet." in (folder / "summary.md").read_text()
    fake_run(load_spec(spec).points[0], [3.0, 2.0, 1.8, 1.75])
    assert study.main([str(spec), "--collect"]) == 0
    fits = pd.read_csv(folder / "fits.csv").set_index("x")
    assert fits.loc["ensemble_size", "fitted"] and "one seed" in fits.loc["ensemble_size", "note"]
    assert math.isnan(fits.loc["ensemble_size", "alpha_low"])
    assert pd.read_csv(folder / "verdicts.csv").empty  # compare: [] and no single family
    assert "no `parameters` column" in (folder / "summary.md").read_text()


# --- a real tiny study ------------------------------------------------------------------------------------------------

def test_a_tiny_study_runs_main_skips_it_when_finished_and_collects(tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    settings = dict(teacher=str(tiny_teacher_dir), dataset=str(DATA_DIR / "chats.jsonl"),
                    cache_dir=str(tmp_path / "cache"), steps_per_round=2)
    families = [dict(name="method", settings=dict(total_rounds=2)),
                dict(name="matched", settings=dict(baseline="single_matched", total_rounds=2), seeds=[0])]
    spec = write_spec(tmp_path / "spec.yaml", families, settings=settings)
    launched = []
    real_launch = running.launch
    monkeypatch.setattr(running, "launch", lambda args, log: launched.append(args) or real_launch(args, log))

    assert study.main([str(spec), "--bootstrap", "20"]) == 0
    assert len(launched) == 3
    loaded = load_spec(spec)
    statuses = {p.name: point_status(p) for p in loaded.points}
    assert {s.state for s in statuses.values()} == {"finished"}
    for point in loaded.points:
        assert statuses[point.name].run_dir.parent.parent == point.output_root  # each point in its own root
        assert (loaded.folder / "logs" / f"{point.name}.log").is_file()

    rows = pd.read_csv(loaded.folder / "rows.csv")
    assert set(rows["run"]) == {"method__seed-0", "method__seed-1", "matched__seed-0"}
    method = rows[rows["run"] == "method__seed-1"]
    metrics = pd.read_csv(statuses["method__seed-1"].run_dir / "metrics.csv")
    assert list(method["ce"]) == pytest.approx(list(metrics["ce"]))
    assert set(method["seed"]) == {1} and set(method["family"]) == {"method"} and set(method["kind"]) == {"ensemble"}
    matched = rows[rows["run"] == "matched__seed-0"]
    assert set(matched["baseline"]) == {"single_matched"} and set(matched["kind"]) == {"single"}
    assert list(matched.loc[matched["model"] == "ensemble", "ensemble_size"]) == [1]

    points = pd.read_csv(loaded.folder / "summary.csv")
    assert list(points["point"]) == ["1 member(s)", "2 member(s)", "matched"]
    assert list(points["seeds"]) == [2, 2, 1]
    summary = (loaded.folder / "summary.md").read_text()
    assert "3 runs: 3 finished" in summary
    assert "method, x = ensemble_size: 2 distinct x and 2 distinct mean CE for 3 parameters" in summary
    assert (loaded.folder / "verdicts.csv").is_file()
    assert (loaded.folder / "ce_vs_ensemble_size.png").read_bytes()[:8] == PNG_SIGNATURE
    for x in ("parameters", "train_flops"):  # figures and fits wherever main.py writes these columns
        assert (loaded.folder / f"ce_vs_{x}.png").exists() == (x in rows.columns)
        assert (f"no `{x}` column" in summary) == (x not in rows.columns)

    written = {p: p.stat().st_mtime_ns for p in loaded.folder.glob("runs/*/*/run_*/metrics.csv")}
    launched.clear()
    capsys.readouterr()
    assert study.main([str(spec), "--bootstrap", "20"]) == 0
    assert launched == []  # a second invocation runs nothing
    assert capsys.readouterr().out.count("finished") >= 3
    assert {p: p.stat().st_mtime_ns for p in written} == written
    assert len(list(loaded.folder.glob("runs/*/*/run_*"))) == 3  # and starts no new run folder


def test_the_shipped_cpu_study_is_a_valid_spec_whose_seeds_vary_the_data():
    spec = load_spec(Path(__file__).resolve().parents[1] / "studies" / "cpu.yaml")
    configs = [point.config for point in spec.points]
    assert {point.seed for point in spec.points} == {0, 1, 2}
    assert all(c.data_seed == c.seed for c in configs)  # each seed its own training sample
    assert {(c.teacher_mode, c.max_examples, c.test_size, c.cache_k) for c in configs} == {("topk", 360, 64, 64)}
    method = [c for c in configs if c.baseline == "none" and c.total_rounds > 1]
    assert {c.combine for c in method} == {"additive"} and {c.total_rounds for c in method} == {4}
    wide = [c for c in configs if c.baseline == "none" and c.total_rounds == 1]
    assert sorted({c.student_hidden_size for c in wide}) == [64, 128, 256] and all(c.eval_steps > 0 for c in wide)
    matched = [c for c in configs if c.baseline == "single_matched"]
    assert matched and all(c.baseline_budget == "flops" and c.eval_steps > 0 for c in matched)
    assert {c.combine for c in matched} == {"additive"}  # matched to the additive ensemble's budget


def test_a_single_model_is_compared_only_inside_its_range_per_seed():
    """One seed's single models: at a grid point's x its CE; between points log-linear interpolation; outside them
    none, where an extrapolated law can say anything."""
    points = pd.DataFrame({"point": ["a", "b", "b2", "c"], "parameters": [1e6, 2e6, 2.01e6, 4e6],
                           "ce": [7.0, 6.0, 6.2, 5.5], "final_heldout_ce": [7.1, 6.3, 6.25, 5.6]})
    ce, source = single_at(points[points["point"] != "b2"], "parameters", math.sqrt(2) * 1e6)
    assert (round(ce, 6), source) == (6.5, "interpolated")
    # Two grid points within 1%: the better on the early-stopping slice, b2, though b has the lower test CE.
    assert single_at(points, "parameters", 2e6) == (6.2, "grid point b2, best of 2 there by early-stopping CE")
    old = points.assign(final_heldout_ce=math.nan)  # runs without early stopping: the test CE, said so
    assert single_at(old, "parameters", 2e6) == (6.0, "grid point b, best of 2 there by test CE (no "
                                                            "early-stopping CE)")
    assert single_at(points, "parameters", 8e6) is None
    assert single_at(points, "parameters", 5e5) is None


# --- the rules of the comparison --------------------------------------------------------------------------------------

def test_the_paired_interval_is_a_t_interval_and_its_verdict_whether_it_excludes_zero():
    differences = np.array([-0.30, -0.28, -0.25])
    mean, low, high = paired_interval(differences)
    half = 4.302653 * np.std(differences, ddof=1) / math.sqrt(3)  # t(0.975, 2 dof)
    assert (mean, low, high) == pytest.approx((-0.27667, -0.27667 - half, -0.27667 + half), abs=1e-5)
    assert verdict(low, high, 3) == "ensemble better"
    assert verdict(*paired_interval(-differences)[1:], 3) == "single better"
    # Wins on every seed, but the interval holds 0: 5 seeds of one large and four tiny wins show nothing.
    mixed = np.array([-0.8, -0.01, -0.01, -0.01, -0.01])
    assert verdict(*paired_interval(mixed)[1:], 5) == "no difference shown"
    mean, low, high = paired_interval(np.array([-0.3]))
    assert mean == -0.3 and math.isnan(low) and verdict(low, high, 1) == "one seed: no interval"


def test_seeds_are_paired_so_a_shared_seed_effect_cancels():
    """Seeds that move both models alike (3, 4, 5 nats) leave the paired difference at -0.1 on each: the
    ensemble is better, where mean ± std of each side would overlap. A seed the single model lacks is no pair."""
    obs = pd.DataFrame([dict(series=series, kind=kind, point=point, order=order, seed=seed, parameters=1e6,
                             ce=3.0 + seed - shift, final_heldout_ce=math.nan)
                        for series, kind, point, order, shift, seeds in (
                            ("method", "ensemble", "1 member(s)", 1, 0.1, (0, 1, 2, 3)),
                            ("one", "single", "one", 0, 0.0, (0, 1, 2)))
                        for seed in seeds])
    pairs, _ = pairs_table(obs, {}, ["parameters"])
    assert list(pairs["seed"]) == [0, 1, 2] and pairs["difference"].tolist() == pytest.approx([-0.1] * 3)
    (row,) = verdict_table(pairs).to_dict("records")
    assert row["verdict"] == "ensemble better" and row["wins"] == 3 and row["seeds"] == 3
    assert row["low"] == pytest.approx(-0.1) == row["high"]


def test_a_matched_single_model_is_paired_at_its_own_size_on_its_axis_and_size_only():
    """The wide family was matched (the spec's `match`) to the ensemble of 2's parameters: the closest width it has
    is 5% larger, outside the 1% that makes two points one, so only the match pairs them; not on another axis, and
    not with the ensemble of 3. Seed 0 tuned: the run of the lowest early-stopping CE stands for it."""
    ensembles = [dict(family="method", series="method", kind="ensemble", point=f"{k} member(s)", order=k, seed=seed,
                      parameters=1e6 * k, non_embedding_parameters=1e4 * k, ce=4.0 - 0.1 * k + 0.01 * seed,
                      final_heldout_ce=math.nan) for k in (1, 2, 3) for seed in (0, 1)]
    wide = [dict(family="wide", series="wide", kind="single", point="wide", order=0, seed=seed, parameters=2.1e6,
                 non_embedding_parameters=5e4, ce=ce, final_heldout_ce=heldout)
            for seed, ce, heldout in ((0, 3.9, 4.2), (0, 3.7, 4.0), (1, 3.85, 4.1))]
    obs = pd.DataFrame(ensembles + wide)
    assert pairs_table(obs, {}, ["parameters"])[0].query("single == 'wide'").empty
    pairs, _ = pairs_table(obs, {}, ["parameters", "non_embedding_parameters"],
                           (Matched("wide", "method", 2, "parameters"),))
    matched = pairs[pairs["single"] == "wide"]
    assert list(zip(matched["axis"], matched["ensemble_size"], matched["seed"])) == [("parameters", 2, 0),
                                                                                   ("parameters", 2, 1)]
    assert matched["single_ce"].tolist() == [3.7, 3.85]  # seed 0: its run of early-stopping CE 4.0
    assert matched["difference"].tolist() == pytest.approx([3.8 - 3.7, 3.81 - 3.85])
    assert matched["single_from"].tolist() == [
        "matched: 2,100,000 to 2,000,000 (+5.0%), best of 2 there by early-stopping CE",
        "matched: 2,100,000 to 2,000,000 (+5.0%)"]
    # A family of two sizes has no one size to stand for it: read at the ensemble's x as any other family.
    sizes = pd.DataFrame([dict(family="sizes", series="sizes", kind="single", point=f"w{x}", order=0, seed=0,
                               parameters=x, ce=4.0 - x / 1e7, final_heldout_ce=math.nan) for x in (1.5e6, 2.5e6)])
    pairs, _ = pairs_table(pd.concat([obs, sizes]), {}, ["parameters"], (Matched("sizes", "method", 2, "parameters"),))
    assert pairs.query("single == 'sizes'")["single_from"].tolist() == ["interpolated"]  # seed 0, its only seed


def curve(*evals, spent=None):
    frame = pd.DataFrame(evals, columns=["train_flops", "heldout_ce", "test_ce"])
    return Curve(frame.sort_values(["train_flops", "heldout_ce"]), spent or frame["train_flops"].max(),
                       False)


def test_a_single_curve_is_read_at_the_best_held_out_evaluation_within_the_budget_never_the_best_test():
    single = curve((1.0, 5.0, 5.2), (2.0, 4.5, 4.9), (3.0, 4.6, 4.1), (6.0, 4.0, 3.9), spent=8.0)
    assert single.at(3.0)["test_ce"] == 4.9  # held-out 4.5 is the best within 3: its test CE, not the lower 4.1
    assert single.at(0.5) is None  # its first evaluation spent more than the budget
    assert single.multiplier(4.95, budget=2.0) == (1.0, pytest.approx(math.nan, nan_ok=True))
    assert single.multiplier(4.0, budget=2.0)[0] == 3.0  # reached at 6 (3.9 <= 4.0): 6 / 2
    multiplier, bound = single.multiplier(3.5, budget=2.0)  # never reached: censored at its spend, 8 / 2
    assert math.isnan(multiplier) and bound == 4.0


def size_study(tmp_path, name, max_examples, build, ensemble_ce, single_ce, recorded=False):
    """A study at `max_examples` of an ensemble of 2 (CE ensemble_ce[k-1] at k F0 + build) and one single model whose
    curve ends at single_ce (3 F0 + build), 2 seeds; seed s's teacher cache build costs build + s F0 / 10. recorded:
    the manifests record max_examples - 10 - s training examples for seed s."""
    families = [dict(name="method", settings=dict(total_rounds=2)),
                dict(name="one", kind="single", settings=dict(total_rounds=1))]
    spec = write_spec(tmp_path / f"{name}.yaml", families, name=name, output=str(tmp_path / name),
                      settings=dict(max_examples=max_examples), compare=["train_flops"])
    for point in load_spec(spec).points:
        fixed = build + point.seed * F0 / 10
        examples = max_examples - 10 - point.seed if recorded else None
        if point.kind == "ensemble":
            fake_run(point, ensemble_ce, extra=dict(train_flops=lambda k, fixed=fixed: k * F0 + fixed),
                     train_examples=examples)
        else:
            evals = [dict(round=0, train_flops=f * F0 + fixed, heldout_ce=ce + 0.1, test_ce=ce, flops_teacher=fixed)
                     for f, ce in ((0.5, single_ce + 1.0), (1.5, single_ce + 0.5), (3.0, single_ce))]
            fake_run(point, [single_ce], evals=evals, extra=dict(train_flops=lambda k, fixed=fixed: 3 * F0 + fixed),
                     train_examples=examples)
    return spec


def test_across_sets_studies_of_different_data_sizes_side_by_side(tmp_path):
    small = size_study(tmp_path, "small", 40, 1 * F0, [3.0, 2.0], 2.5)
    large = size_study(tmp_path, "large", 80, 2 * F0, [2.8, 2.6], 2.2, recorded=True)
    assert study.main([str(small), str(large), "--across", str(tmp_path / "side")]) == 0
    table = pd.read_csv(tmp_path / "side" / "across.csv")
    assert list(table.columns[:2]) == ["study", "max_examples"]
    two = table[table["point"] == "2 member(s)"].set_index("study")
    assert two.loc["small", "max_examples"] == 40 and two.loc["large", "max_examples"] == 80
    # small: 2.0 against the single curve's best within 2 F0 (3.0); large: 2.6 against 2.7
    assert two.loc["small", "mean_difference"] == pytest.approx(-1.0)
    assert two.loc["large", "mean_difference"] == pytest.approx(-0.1)
    text = (tmp_path / "side" / "across.md").read_text()
    assert "- small (max_examples=40): No finished run records its training examples. Measured wall time" in text
    assert ("- large (max_examples=80): Training examples: 69 to 70 per run (the manifests of 4 finished run(s)). "
            "Measured wall time") in text and "Teacher: 1.0000." in text
    assert "| small | 40 | train_flops |" in text and "| large | 80 | train_flops |" in text
    assert (tmp_path / "side" / "across_curves.png").read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(SystemExit):  # several specs need --across
        study.parse_args([str(small), str(large)])


def test_the_deciding_verdicts_are_each_matched_single_at_its_ensemble_size_on_flops_and_its_own_axis():
    def row(axis, size, single, difference):
        return dict(axis=axis, x_value=1.0, ensemble="method", point=f"{size} member(s)", ensemble_size=size,
                    single=single, seeds=5, mean_difference=difference, low=difference - 0.1,
                    high=difference + 0.1, wins=5, verdict="ensemble better", ensemble_ce=3.0, single_ce=3.5,
                    **{f"{name}_{part}": value for name in ("multiplier", "students_multiplier")
                       for part, value in dict(median=1.5, low=1.2, high=1.8, reached=5, bound=math.nan).items()})
    verdicts = pd.DataFrame([row("parameters", 2, "deep", 0.01),  # deep was matched on non-embedding parameters
                             row("non_embedding_parameters", 2, "deep", -0.2),
                             row("train_flops", 3, "wide", 0.02),  # wide was matched at size 2, not 3
                             row("critical_path_layers", 2, "wide", 0.03),
                             row("train_flops", 2, "deep", -0.4), row("parameters", 2, "wide", -0.3),
                             row("train_flops", 2, "member", 0.04),  # not matched: no deciding verdict
                             row("train_flops", 2, "wide", -0.5)])
    matched = (Matched("wide", "method", 2, "parameters"), Matched("deep", "method", 2, "non_embedding_parameters"))
    deciding = deciding_verdicts(verdicts, matched)
    assert deciding["mean_difference"].tolist() == [-0.5, -0.3, -0.4, -0.2]  # the spec's order, FLOPs first
    assert list(deciding.columns) == list(verdicts.columns)
    assert deciding_verdicts(verdicts, ()).empty
    panel = Panel("small", dict(max_examples=40), pd.DataFrame(), {}, pd.DataFrame(), verdicts, None,
                  pd.DataFrame(dict(seconds=[60.0], launches=[1], status=["finished"])), pd.Series([30.0]), matched)
    text = across_markdown([panel])
    deciding_part, every_part = text.split("## Every verdict")
    assert "## The deciding comparisons" in deciding_part and deciding_part.count("| small | 40 |") == 4
    assert "-0.500 [-0.600, -0.400]" in deciding_part and "+0.040" not in deciding_part
    assert every_part.count("| small | 40 |") == len(verdicts)


def test_collect_reports_the_training_examples_the_runs_manifests_record(tmp_path):
    spec = size_study(tmp_path, "sized", 80, F0, [2.8, 2.6], 2.2, recorded=True)
    older = next((tmp_path / "sized" / "runs").glob("one__seed-1/*/run_1/manifest.json"))
    older.write_text(json.dumps({"rounds": {"0": "done"}}))  # started before manifests kept the split sizes
    assert study.main([str(spec), "--collect", "--bootstrap", "0"]) == 0
    runs = pd.read_csv(tmp_path / "sized" / "runs.csv").set_index("run")
    assert runs["train_examples"].to_dict() == pytest.approx(
        {"method__seed-0": 70, "method__seed-1": 69, "one__seed-0": 70, "one__seed-1": math.nan}, nan_ok=True)
    assert ("Training examples: 69 to 70 per run (the manifests of 3 finished run(s)); 1 finished run(s) do not "
            "record it (started before manifests kept it).") in (tmp_path / "sized" / "summary.md").read_text()


def test_across_refuses_studies_that_nothing_tells_apart(tmp_path):
    one = size_study(tmp_path, "one", 40, F0, [3.0, 2.0], 2.5)
    same = size_study(tmp_path, "same", 40, F0, [3.0, 2.0], 2.5)
    with pytest.raises(StudyError, match="state the same settings for all their runs"):
        differing_settings([load_spec(one), load_spec(same)])
    with pytest.raises(StudyError, match="repeat: one, one"):
        differing_settings([load_spec(one), load_spec(one)])
    assert study.main([str(one), str(same), "--across", str(tmp_path / "side")]) == 2
    assert not (tmp_path / "side").exists()  # refused before anything is written


def test_students_only_curves_take_each_seeds_build_off_both_sides():
    evals = lambda fixed: pd.DataFrame({"train_flops": [fixed + 1.0, fixed + 2.0], "heldout_ce": [5.0, 4.0],
                                        "test_ce": [5.0, 4.0], "flops_teacher": [fixed, fixed]})
    curves = {("one", 0): Curve(evals(10.0), 12.0, False), ("one", 1): Curve(evals(20.0), 22.0, False)}
    assert fixed_flops(curves) == {0: 10.0, 1: 20.0}
    assert fixed_flops({**curves, ("two", 1): Curve(evals(30.0), 32.0, False)})[1] == 0.0  # a seed's curves disagree
    obs = pd.DataFrame({"series": ["method"] * 3 + ["one"], "kind": ["ensemble"] * 3 + ["single"],
                        "point": ["2 member(s)"] * 3 + ["one"], "seed": [0, 1, 2, 0], "ce": [4.5, 4.4, 4.3, 4.0],
                        "train_flops": [11.5, 21.5, 31.5, 12.0]})
    ax = Figure().subplots()
    draw_curves(ax, obs, curves, None, students_only=True)
    assert [list(line.get_xdata()) for line in ax.get_lines()] == [[1.0, 2.0], [1.0, 2.0]]
    (marks,) = ax.collections  # seed 2 has no curve: its fixed cost is unknown, its mark left out
    assert [tuple(xy) for xy in marks.get_offsets()] == [(1.5, 4.5), (1.5, 4.4)]
    whole = Figure().subplots()
    draw_curves(whole, obs, curves, None)
    assert list(whole.get_lines()[0].get_xdata()) == [11.0, 12.0] and len(whole.collections[0].get_offsets()) == 3


def test_the_students_multiplier_takes_the_build_both_sides_pay_off_both_spends():
    """A cached teacher's build is charged to every run alike (constant flops_teacher along the curve): the
    students' multiplier compares what is left. An online teacher's charge grows with the steps: nothing is
    fixed."""
    evals = pd.DataFrame({"train_flops": [11.0, 12.0, 14.0], "heldout_ce": [5.0, 4.5, 4.0],
                          "test_ce": [5.0, 4.5, 4.0], "flops_teacher": [10.0, 10.0, 10.0]})
    cached = Curve(evals, 14.0, False)
    assert cached.fixed_flops == 10.0
    online = Curve(evals.assign(flops_teacher=[1.0, 2.0, 4.0]), 14.0, False)
    assert online.fixed_flops == 0.0
    ensemble = pd.Series({"seed": 0, "train_flops": 12.0, "ce": 4.0})
    pair = paired_single(pd.DataFrame(), {("single", 0): cached}, "train_flops", "single",
                               ensemble.to_frame().T.astype({"seed": int}).itertuples(index=False).__next__())
    # reached at 14 of the ensemble's 12: 1.17x in all, but (14 - 10) / (12 - 10) = 2x of the students' compute
    assert pair["multiplier"] == pytest.approx(14 / 12) and pair["students_multiplier"] == pytest.approx(2.0)


def test_multipliers_give_a_geometric_interval_when_every_seed_reached_else_a_bound():
    reached = multiplier_summary(np.array([1.5, 2.0, 2.5]), np.full(3, math.nan))
    logs = np.log([1.5, 2.0, 2.5])
    half = 4.302653 * np.std(logs, ddof=1) / math.sqrt(3)
    assert reached["multiplier_median"] == 2.0 and reached["multiplier_reached"] == 3
    assert (reached["multiplier_low"], reached["multiplier_high"]) == pytest.approx(
        (math.exp(logs.mean() - half), math.exp(logs.mean() + half)), rel=1e-5)
    censored = multiplier_summary(np.array([1.5, math.nan, 2.5]), np.array([math.nan, 3.0, math.nan]))
    assert censored["multiplier_reached"] == 2 and censored["multiplier_bound"] == 3.0
    assert censored["multiplier_median"] == 2.5 and math.isnan(censored["multiplier_low"])


def flops_study(tmp_path, single_evals, single_flops=3 * F0):
    """An ensemble of 2 (CE 3.0 at F0, then 2.0 at 2 F0) against one single family, 2 seeds: single_evals(seed) is
    its run's train_log rows (None: an old run without them); its final CE 2.5 at single_flops."""
    families = [dict(name="method", settings=dict(total_rounds=2)),
                dict(name="one", kind="single", settings=dict(total_rounds=1))]
    spec = write_spec(tmp_path / "spec.yaml", families, seeds=[0, 1], compare=["train_flops"])
    for point in load_spec(spec).points:
        if point.kind == "ensemble":
            fake_run(point, [3.0, 2.0], extra=dict(train_flops=lambda k: k * F0))
        else:
            fake_run(point, [2.5], evals=single_evals(point.seed), extra=dict(train_flops=lambda k: single_flops))
    assert study.main([str(spec), "--collect", "--bootstrap", "0"]) == 0
    folder = load_spec(spec).folder
    return (pd.read_csv(folder / "comparison.csv"), pd.read_csv(folder / "verdicts.csv"),
            (folder / "summary.md").read_text())


def test_a_single_model_whose_first_evaluation_spent_more_gives_no_pair_and_a_note(tmp_path):
    def evals(seed):  # seed 1's single model is first evaluated at 1.5 F0: more than the ensemble of 1 spent
        start = 0.5 if seed == 0 else 1.5
        return [dict(round=0, train_flops=f * F0, heldout_ce=ce + 0.1, test_ce=ce) for f, ce in
                ((start, 2.8), (2.5, 2.4), (3.0, 1.9))]
    pairs, verdicts, summary = flops_study(tmp_path, evals)
    one = pairs[pairs["point"] == "1 member(s)"]
    assert list(one["seed"]) == [0] and list(one["single_ce"]) == [2.8]
    assert "on seed 1 its first evaluation had already spent more than the ensemble: no pair" in summary
    two = verdicts.set_index("point").loc["2 member(s)"]  # 2.0 against 2.8 on both seeds (their best by 2 F0)
    assert two["seeds"] == 2 and two["single_ce"] == pytest.approx((2.8 + 2.8) / 2)
    assert two["multiplier_median"] == pytest.approx(1.5)  # reached at 3 F0: 1.9 <= 2.0
    assert two["verdict"] == "ensemble better" and two["wins"] == 2


def test_old_runs_without_a_curve_fall_back_to_their_final_point_with_a_note(tmp_path):
    pairs, verdicts, summary = flops_study(tmp_path, lambda seed: None, single_flops=1.5 * F0)
    assert "its train_log has no train_flops, heldout_ce, test_ce (an old run)" in summary
    assert list(pairs["point"]) == ["2 member(s)"] * 2  # its final point (1.5 F0) is within 2 F0, not F0
    assert set(pairs["single_from"]) == {"final point (no curve)"} and set(pairs["single_ce"]) == {2.5}
    assert list(verdicts["multiplier_bound"]) == [0.75]  # never reached 2.0: censored at 1.5 F0 / 2 F0


def test_fits_that_their_points_cannot_determine_say_so_and_are_not_drawn(tmp_path):
    families = [dict(name="method", settings=dict(total_rounds=4, combine="additive"))]
    spec = write_spec(tmp_path / "spec.yaml", families, seeds=[0, 1])
    for point in load_spec(spec).points:  # members 3 and 4 stayed at zero: 2 distinct CEs for 4 sizes
        fake_run(point, [3.0 + point.seed * 0.01, 2.5, 2.5, 2.5])
    assert study.main([str(spec), "--collect", "--bootstrap", "0"]) == 0
    folder = load_spec(spec).folder
    fit = pd.read_csv(folder / "fits.csv").set_index("x").loc["ensemble_size"]
    assert not fit["fitted"] and "4 distinct x and 2 distinct mean CE" in fit["note"]
    obs = pd.DataFrame({"series": "s", "kind": "ensemble", "seed": 0, "ensemble_size": [1, 2, 3, 4],
                        "ce": [3.0, 2.0, 1.9996, 1.9994]})  # a step, then flat: alpha runs to its bound
    fits, _ = fit_all(obs, obs.columns, replicates=0)
    assert fits[0].law is not None and not fits[0].determined
    assert "not determined (alpha at its bound" in fits[0].note
    points = point_table(obs.assign(point=["1", "2", "3", "4"]))
    (ax,) = ce_figure(points, fits, "ensemble_size", None).axes
    assert not any(t.get_text().startswith("fit: ") for t in ax.get_legend().get_texts())


@pytest.mark.parametrize("top, families, message", [
    (dict(compare=["parameters", "flops"]), ENSEMBLE_AND_SINGLE,
     r"compare: unknown axis 'flops'; the axes are parameters, non_embedding_parameters, train_flops"),
    (dict(compare=["parameters"]), ENSEMBLE_AND_SINGLE[:1], "nothing to compare the ensemble against: add a "
                                                            "family of kind single"),
    ({}, [dict(name="a", settings=dict(data_seed=3))], "sets data_seed"),
    (dict(vary_data="no"), ENSEMBLE_AND_SINGLE, "vary_data must be true or false"),
    ({}, [{**ENSEMBLE_AND_SINGLE[0], "match": dict(axis="parameters", family="single")}, ENSEMBLE_AND_SINGLE[1]],
     "family 'method': match sets a single model's size; this family is of kind ensemble"),
])
def test_bad_comparisons_are_refused_by_name(tmp_path, top, families, message):
    with pytest.raises(StudyError, match=message):
        load_spec(write_spec(tmp_path / "spec.yaml", families, **top))
    assert study.main([str(tmp_path / "spec.yaml"), "--dry_run"]) == 2


def test_vary_data_false_takes_data_seed_from_the_settings(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", ENSEMBLE_AND_SINGLE, vary_data=False, settings=dict(data_seed=7))
    points = load_spec(spec).points
    assert {p.config.data_seed for p in points} == {7} and "--data_seed" not in points[0].run_args()[-4:]
    assert {p.config.seed for p in points} == {0, 1}


def test_families_of_different_test_sets_are_refused(tmp_path):
    points = load_spec(write_spec(tmp_path / "spec.yaml", ENSEMBLE_AND_SINGLE)).points
    check_points(points)  # the config has one test_seed for all (or none yet)
    with_seed = [dataclasses.replace(p, config=types.SimpleNamespace(test_seed=1 if p.kind == "single" else 0))
                 for p in points]
    with pytest.raises(StudyError, match=r"different test_seed values \(test_seed 0: method; test_seed 1: "
                                               r"single\): a comparison must share its test set"):
        check_points(with_seed)


# --- numbers quoted from the results ---------------------------------------------------------------------------------

def test_quoted_numbers_must_come_from_the_result_files(tmp_path):
    results = tmp_path / "verdicts.csv"
    pd.DataFrame({"verdict": ["ensemble better"], "mean_difference": [-0.2883], "low": [-0.3114],
                  "ensemble_ce": [5.85712], "train_flops": [3.61e13], "share": [0.1234], "steps": [288]}
                 ).to_csv(results, index=False)
    quoted = ("The ensemble (5.857, 5.86) wins by 0.29 nats [−0.31, -0.288] at 3.6e13 FLOPs, 12.3% of the time, "
              "in 288 steps over 5 seeds; see [the table](results/x_0.777.csv) and `7.77`.")
    assert quoted_numbers_missing(quoted, [results]) == []
    typed = "The ensemble wins by 0.30 nats at 3.7e13 FLOPs, 5.8575 CE, in 289 steps, 12.4% of the time."
    assert quoted_numbers_missing(typed, [results]) == ["0.30", "3.7e13", "5.8575", "289", "12.4%"]
    summary = tmp_path / "summary.md"
    summary.write_text("| ensemble | 6.4660 |\n")  # a rendered table counts as a result file too
    assert quoted_numbers_missing("6.466 and 6.47", [summary]) == []


# --- learning-rate tuning ---------------------------------------------------------------------------------------------

RATES = [1e-3, 3e-3]
TUNED = [dict(name="method", settings=dict(total_rounds=2), learning_rates=RATES),
         dict(name="single", kind="single", settings=dict(total_rounds=1), grid=dict(student_num_layers=[1, 2]),
              learning_rates=RATES)]


@pytest.mark.parametrize("families, settings, message", [
    ([TUNED[0], {**TUNED[1], "learning_rates": None}], dict(eval_steps=2),
     "a learning-rate grid on one side only: family single has no learning_rates"),
    ([TUNED[0], {**TUNED[1], "learning_rates": [1e-3]}], dict(eval_steps=2),
     r"different numbers of rates \(method: 2, single: 1\)"),
    (TUNED, {}, "family 'method' tunes its learning rate, which is chosen on the early-stopping slice: its runs "
                "need eval_steps > 0"),
    ([TUNED[0], {**TUNED[1], "learning_rates": [1e-3, -1.0]}], dict(eval_steps=2), "config key 'learning_rate'"),
])
def test_a_learning_rate_grid_must_be_on_both_sides_and_chosen_on_early_stopping(tmp_path, families, settings,
                                                                                 message):
    with pytest.raises(StudyError, match=message):
        load_spec(write_spec(tmp_path / "spec.yaml", families, settings=settings))


def play_main(args, log_path):
    """Plays main.py for a fake launch: the run its arguments ask for, finished, its held-out CE chosen so that
    rate 3e-3 wins for the ensemble and for the single model of 2 layers, 1e-3 for that of 1 layer; the test CE
    says the opposite (a choice made on it would differ)."""
    overrides = dict(zip((key.removeprefix("--") for key in args[4::2]), args[5::2]))
    config = config_lib.build_config(args[1], overrides=overrides)
    point = types.SimpleNamespace(output_root=Path(args[3]), config=config,
                                  kind="single" if config.total_rounds == 1 else "ensemble")
    better = (config.learning_rate == 3e-3) != (point.kind == "single" and config.student_num_layers == 1)
    heldout = 2.0 if better else 2.5
    last = config.total_rounds - 1  # earlier rounds' CE (of fewer members) is no part of the choice
    evals = [dict(round=r, train_flops=(r + 1) * F0, heldout_ce=h, test_ce=5.0 - h)
             for r in range(config.total_rounds) for h in ((heldout + 0.3, heldout) if r == last else (1.0,))]
    fake_run(point, [3.0] * config.total_rounds, evals=evals)
    return 0


def test_tuning_runs_on_the_first_seed_then_the_later_seeds_at_the_chosen_rate(tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path / "spec.yaml", TUNED, settings=dict(eval_steps=2), seeds=[0, 1, 2])
    before = load_spec(spec)
    assert len(before.points) == 6 and all(p.tuning and p.seed == 0 for p in before.points)
    assert before.points[1].name == "method__lr-0.003__seed-0" and before.points[1].config.learning_rate == 3e-3
    assert study.main([str(spec), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "method__lr-0.001__seed-0" in out and "  tuning  " in out
    assert "family method: seeds 1, 2 wait for tuning (0 of 2 tuning runs finished)" in out
    launched = []
    monkeypatch.setattr(running, "launch", lambda args, log: launched.append(args[3]) or play_main(args, log))
    assert study.main([str(spec), "--bootstrap", "0"]) == 0
    names = [Path(root).name for root in launched]
    assert names[:6] == [p.name for p in before.points]  # tuning first, then the later seeds
    assert names[6:] == ["method__lr-0.003__seed-1",  # seed by seed: a study stopped part way holds whole seeds
                         "single__student_num_layers-1__lr-0.001__seed-1",
                         "single__student_num_layers-2__lr-0.003__seed-1",
                         "method__lr-0.003__seed-2",
                         "single__student_num_layers-1__lr-0.001__seed-2",
                         "single__student_num_layers-2__lr-0.003__seed-2"]
    after = load_spec(spec)
    assert not after.waiting and {p.name for p in after.points if p.tuning} == {
        "method__lr-0.001__seed-0", "single__student_num_layers-1__lr-0.003__seed-0",
        "single__student_num_layers-2__lr-0.001__seed-0"}
    tuning = pd.read_csv(after.folder / "tuning.csv")
    assert list(tuning.columns[:5]) == ["family", "point", "rate", "heldout_ce", "chosen"]
    chosen = tuning[tuning["chosen"]].set_index("point")
    assert chosen.loc["method", "rate"] == 3e-3 and chosen.loc["method", "heldout_ce"] == 2.0  # the last round's
    assert chosen.loc["student_num_layers=1", "rate"] == 1e-3
    runs = set(pd.read_csv(after.folder / "rows.csv")["run"])  # the first seed's chosen run is its run
    assert "method__lr-0.003__seed-0" in runs and "method__lr-0.001__seed-0" not in runs and len(runs) == 9
    assert tuning["grid_edge"].fillna("").tolist() == ["", "highest", "lowest", "", "", "highest"]
    notes = (after.folder / "summary.md").read_text()
    assert ("- family single at student_num_layers=1 chose learning rate 0.001, the lowest of its grid: a rate beyond "
            "it was not tried, so the family may be under-tuned") in notes
    assert "- family method chose learning rate 0.003, the highest of its grid" in notes


ONE_POINT_EACH = [TUNED[0], dict(name="single", kind="single", settings=dict(total_rounds=1, student_num_layers=1),
                                 learning_rates=RATES)]


def untuned(families):
    return [{key: value for key, value in family.items() if key != "learning_rates"} for family in families]


def test_a_study_tuned_in_another_takes_each_familys_chosen_rate_and_waits_for_it(tmp_path, monkeypatch,
                                                                                   capsys):
    source = write_spec(tmp_path / "small.yaml", ONE_POINT_EACH, settings=dict(eval_steps=2), seeds=[0])
    larger = write_spec(tmp_path / "larger.yaml", untuned(ONE_POINT_EACH), name="larger",
                        output=str(tmp_path / "larger"), settings=dict(max_examples=60), seeds=[0, 1],
                        tuned_in=str(source))
    waiting = load_spec(larger)
    assert [p.name for p in waiting.pending] == ["method__lr-0.001__seed-0", "method__lr-0.001__seed-1",
                                                 "single__lr-0.001__seed-0", "single__lr-0.001__seed-1"]
    assert waiting.points == [] and waiting.waiting == (
        "family method waits for its learning rate from study scaling (0 of 2 tuning runs finished)",
        "family single waits for its learning rate from study scaling (0 of 2 tuning runs finished)")
    assert study.main([str(larger), "--dry_run"]) == 0
    assert capsys.readouterr().out.endswith(f"not started)\n  {waiting.waiting[0]}\n  {waiting.waiting[1]}\n")
    assert study.main([str(larger)]) == 2
    assert capsys.readouterr().err == (f"error: nothing to run yet: {'; '.join(waiting.waiting)}; run the spec named "
                                       "by tuned_in first\n")
    monkeypatch.setattr(running, "launch", play_main)
    assert study.main([str(source), "--bootstrap", "0"]) == 0
    tuned = load_spec(larger)
    assert [(p.name, p.config.learning_rate, p.config.max_examples) for p in tuned.points] == [
        ("method__lr-0.003__seed-0", 3e-3, 60), ("method__lr-0.003__seed-1", 3e-3, 60),
        ("single__lr-0.001__seed-0", 1e-3, 60), ("single__lr-0.001__seed-1", 1e-3, 60)]
    assert not tuned.waiting and {(row["family"], row["rate"], row["tuned_in"]) for row in tuned.tuning
                                  if row["chosen"]} == {("method", 3e-3, "scaling"), ("single", 1e-3, "scaling")}


def test_a_family_takes_the_rate_another_family_of_the_tuned_in_study_chose_when_it_names_it(tmp_path, monkeypatch):
    source = write_spec(tmp_path / "small.yaml", ONE_POINT_EACH, settings=dict(eval_steps=2), seeds=[0])
    monkeypatch.setattr(running, "launch", play_main)
    assert study.main([str(source), "--bootstrap", "0"]) == 0  # chooses 3e-3 for method, 1e-3 for single
    larger_members = {**untuned(ONE_POINT_EACH)[0], "name": "method2", "rate_from": "method",
                      "settings": dict(total_rounds=2, student_num_layers=2)}
    larger_single = {**untuned(ONE_POINT_EACH)[1], "name": "single2", "rate_from": "single",
                     "settings": dict(total_rounds=1, student_num_layers=3)}
    spec = write_spec(tmp_path / "larger.yaml", [*untuned(ONE_POINT_EACH), larger_members, larger_single],
                      name="larger", output=str(tmp_path / "larger"), seeds=[0], tuned_in=str(source))
    tuned = load_spec(spec)
    assert [(p.name, p.config.learning_rate) for p in tuned.points] == [
        ("method__lr-0.003__seed-0", 3e-3), ("single__lr-0.001__seed-0", 1e-3),
        ("method2__lr-0.003__seed-0", 3e-3), ("single2__lr-0.001__seed-0", 1e-3)]
    chosen = {(row["family"], row["rate_from"], row["rate"]) for row in tuned.tuning if row["chosen"]}
    assert chosen == {("method", "method", 3e-3), ("single", "single", 1e-3), ("method2", "method", 3e-3),
                      ("single2", "single", 1e-3)}


@pytest.mark.parametrize("change, message", [
    (dict(families=TUNED), "family method, single has learning_rates, but the spec takes its rates from tuned_in"),
    (dict(tuned_in="missing.yaml"), "tuned_in 'missing.yaml' does not exist"),
    (dict(tuned_in="SELF"), "tuned_in names this spec itself"),
    (dict(source="CHAINED"), "source.yaml' takes its rates from another study in turn"),
    (dict(source=TUNED), "family 'single' takes its learning rate from family 'single' of .*source.yaml', which must "
                         "tune one grid point over learning_rates"),  # which of its two points' rates is meant?
    (dict(source=ONE_POINT_EACH[:1] + [{**ONE_POINT_EACH[1], "name": "other"}]),
     "family 'single' takes its learning rate from family 'single' of .*source.yaml', which must tune"),
    (dict(families=[untuned(ONE_POINT_EACH)[0], {**untuned(ONE_POINT_EACH)[1], "rate_from": "missing"}]),
     "family 'single' takes its learning rate from family 'missing' of .*source.yaml', which must tune"),
    (dict(families=[untuned(ONE_POINT_EACH)[0], {**untuned(ONE_POINT_EACH)[1], "rate_from": ["method"]}]),
     "family 'single': rate_from must name a family of the tuned_in study, not \\['method'\\]"),
    (dict(tuned_in=None, families=[untuned(ONE_POINT_EACH)[0], {**untuned(ONE_POINT_EACH)[1], "rate_from": "method"}]),
     "family single has rate_from, a family of the study named by tuned_in, but the spec has no tuned_in"),
    (dict(families=[{**untuned(ONE_POINT_EACH)[0], "settings": dict(total_rounds=0)}, untuned(ONE_POINT_EACH)[1]]),
     "config key 'total_rounds' = 0"),  # checked while the family waits for its rate
])
def test_a_spec_tuned_in_another_is_refused_with_a_grid_of_its_own_or_no_source_to_take_from(tmp_path, change,
                                                                                            message):
    source_families = change.pop("source", ONE_POINT_EACH)
    chained = source_families == "CHAINED"  # a source that takes its own rates from a third study
    source = write_spec(tmp_path / "source.yaml", untuned(ONE_POINT_EACH) if chained else source_families,
                        settings=dict(eval_steps=2), **({"tuned_in": str(tmp_path / "third.yaml")} if chained else {}))
    spec = tmp_path / "larger.yaml"
    top = {"families": untuned(ONE_POINT_EACH), "tuned_in": str(source), **change}
    if top["tuned_in"] == "SELF":
        top["tuned_in"] = str(spec)
    with pytest.raises(StudyError, match=message):
        load_spec(write_spec(spec, top.pop("families"), settings=dict(eval_steps=2), **top))


# --- a single model matched to an ensemble's size ---------------------------------------------------------------------

def matched_points(tmp_path, teacher, match, single=None, ensemble=None):
    families = [dict(name="method", settings=dict(total_rounds=2, **(ensemble or {}))),
                dict(name="one", kind="single", settings=dict(total_rounds=1, **(single or {})), match=match)]
    spec = write_spec(tmp_path / "spec.yaml", families, settings=dict(teacher=str(teacher)), seeds=[0])
    return {p.family: p for p in load_spec(spec).points}


def real_parameters(config, round_index, additive):
    """A round's student built for real (students.build_student's model config, start_at_zero for a later additive
    member): its distinct parameters."""
    import transformers

    teacher, tokenizer = teacher_parts(config.teacher, str(config.cache_dir), False)
    model = transformers.AutoModelForCausalLM.from_config(students.student_model_config(config, teacher, tokenizer,
                                                                                     round_index))
    if additive and round_index > 0:
        students.start_at_zero(model)
    return sum(p.numel() for p in model.parameters())


def test_a_random_single_model_is_matched_by_its_depth(tiny_teacher_dir, tmp_path):
    points = matched_points(tmp_path, tiny_teacher_dir, dict(axis="non_embedding_parameters", family="method"))
    one = points["one"]  # the ensemble of 2 one-layer students has the non-embedding parameters of 2 layers
    assert one.config.student_num_layers == 2 and one.settings["student_num_layers"] == 2
    assert "(matched non_embedding_parameters" in one.label and "to method x2" in one.label
    additive = dataclasses.replace(points["method"].config, combine="additive")
    target = ensemble_size_value(additive, "parameters", 2)
    assert target == real_parameters(additive, 0, True) + real_parameters(additive, 1, True)  # an untied head


def test_a_random_single_model_is_matched_by_its_width_where_depth_cannot_reach_the_total(tiny_teacher_dir,
                                                                                         tmp_path):
    """Embeddings dominate a small random student (the study preset's: 3.1M of its 3.24M parameters), so an
    ensemble's total is out of reach of any depth; here wider members stand for that: the match widens the single
    model (MLP and heads in proportion)."""
    points = matched_points(tmp_path, tiny_teacher_dir, dict(axis="parameters", family="method"),
                            ensemble=dict(student_hidden_size=256, student_intermediate_size=512))
    one, method = points["one"].config, points["method"].config
    assert one.student_hidden_size > method.student_hidden_size and one.student_num_layers == method.student_num_layers
    assert one.student_hidden_size % one.student_num_heads == 0 and one.student_num_heads % one.student_num_kv_heads == 0
    target = ensemble_size_value(method, "parameters", 2)
    assert abs(real_parameters(one, 0, False) - target) <= 0.1 * target


def test_a_teacher_layers_single_model_copies_layers_spread_from_first_to_last(tiny_teacher_dir, tmp_path):
    layers = dict(student_init="teacher_layers", teacher_layers=[0])
    points = matched_points(tmp_path, tiny_teacher_dir, dict(axis="non_embedding_parameters", family="method"),
                            single=layers, ensemble=layers)
    assert points["one"].config.teacher_layers == [0, 1] and points["one"].config.teacher_layers_shift == 0


@pytest.mark.parametrize("match, single, message", [
    (dict(axis="parameters", family="method", size=4), dict(student_init="teacher_layers", teacher_layers=[0]),
     r"family 'one': no size of this family reaches parameters [\d,]+ \(family 'method' at 4 members\) within "
     r"10%; the nearest is [\d,]+ \(teacher_layers=0,1, teacher_layers_shift=0\)"),
    (dict(axis="flops", family="method"), {}, "match needs axis"),
    (dict(axis="parameters", family="nope"), {}, "match names 'nope', which is no ensemble family"),
])
def test_a_match_no_size_can_reach_is_refused_by_name(tiny_teacher_dir, tmp_path, match, single, message):
    with pytest.raises(StudyError, match=message):
        matched_points(tmp_path, tiny_teacher_dir, match, single=single)


def test_a_tiny_tuned_study_compares_at_the_ensembles_spend_with_paired_intervals_and_a_multiplier(
        tiny_teacher_dir, tmp_path):
    """End to end with main.py's learning curves: every family tuned on the first seed over the same rates, a
    single model matched to the ensemble's non-embedding parameters, and the verdicts on every axis, the
    training-FLOPs one read off the single models' curves at the ensemble's spend, with its multiplier."""
    settings = dict(teacher=str(tiny_teacher_dir), dataset=str(DATA_DIR / "chats.jsonl"),
                    cache_dir=str(tmp_path / "cache"), steps_per_round=4, eval_steps=1, early_stopping_examples=4,
                    lr_scheduler="wsd", warmup_steps=1)
    rates = [1e-3, 3e-3]
    families = [dict(name="method", settings=dict(total_rounds=2), learning_rates=rates),
                dict(name="member", kind="single", settings=dict(total_rounds=1, steps_per_round=12),
                     learning_rates=rates),
                dict(name="deeper", kind="single", settings=dict(total_rounds=1, steps_per_round=12),
                     learning_rates=rates, match=dict(axis="non_embedding_parameters", family="method"))]
    spec = write_spec(tmp_path / "spec.yaml", families, settings=settings, seeds=[0, 1])
    assert study.main([str(spec), "--bootstrap", "0"]) == 0
    folder = load_spec(spec).folder

    tuning = pd.read_csv(folder / "tuning.csv")
    assert len(tuning) == 6 and tuning.groupby("family")["chosen"].sum().tolist() == [1, 1, 1]
    runs = pd.read_csv(folder / "runs.csv")
    assert (runs["status"] == "finished").all() and len(runs) == 3 * 2  # the chosen rate's run is seed 0's
    verdicts = pd.read_csv(folder / "verdicts.csv")
    assert {"parameters", "non_embedding_parameters", "train_flops", "critical_path_layers"} >= set(verdicts["axis"])
    flops = verdicts[(verdicts["axis"] == "train_flops") & (verdicts["ensemble_size"] == 2)]
    assert len(flops) == 2 and (flops["seeds"] == 2).all()  # against each single family, paired over 2 seeds
    assert flops[["mean_difference", "low", "high"]].notna().all().all() and (flops["low"] <= flops["high"]).all()
    assert flops["multiplier_median"].notna().all() or flops["multiplier_bound"].notna().all()
    deeper = verdicts[(verdicts["axis"] == "non_embedding_parameters") & (verdicts["single"] == "deeper")
                      & (verdicts["ensemble_size"] == 2)]
    assert len(deeper) == 1 and deeper["seeds"].iloc[0] == 2
    summary = (folder / "summary.md").read_text()
    assert "95%" in summary
    deciding = summary.split("## The deciding comparisons")[1].split("## Ensemble against single model")[0]
    assert deciding.count("| deeper |") == 2 and "| train_flops |" in deciding and "| member |" not in deciding
    rows, _ = collect_rows(load_spec(spec))
    curves, _ = single_curves(rows)
    figure = curves_figure(observations(rows), curves, None, "tiny")
    (ax,) = figure.axes
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert {"member", "deeper", "method, 2 member(s)"} <= set(labels) and ax.get_xscale() == "log"
    assert len(ax.get_lines()) == 2 * 2  # a learning curve per single family and seed
    assert (folder / "curves_vs_train_flops.png").read_bytes()[:8] == PNG_SIGNATURE


SHIPPED_SPECS = Path(__file__).resolve().parents[1] / "studies"


@pytest.mark.parametrize("spec", sorted(p.name for p in SHIPPED_SPECS.glob("*.yaml")))
def test_every_shipped_spec_is_valid_and_its_runs_share_one_test_set(spec):
    """Every spec under studies/ loads (its configs built, matches resolved, tuning laid out), and every run of
    it is scored on one test set, each seed's runs on one training sample."""
    loaded = load_spec(SHIPPED_SPECS / spec)
    runs = [*loaded.points, *loaded.pending]  # pending: those that wait for the tuning of the study they name
    assert len({p.config.test_seed for p in runs}) == 1
    for seed in {p.seed for p in runs}:
        assert len({p.config.data_seed for p in runs if p.seed == seed}) == 1


# --- the teacher gap per member size --------------------------------------------------------------------------------

def gap_rows(series, family, kind, point, seed, sizes_ce, start=9.0, teacher=1.0):
    """A run's rows as rows.csv holds them: the teacher, the untrained student, the ensemble of each size."""
    run = f"{family}__{point}__seed-{seed}"
    common = dict(run=run, family=family, series=series, kind=kind, point=point, seed=seed, final_heldout_ce=1.0)
    rows = [dict(common, model="teacher", round=0, ensemble_size=0, ce=teacher),
            dict(common, model="student_untrained", round=0, ensemble_size=1, ce=start)]
    rows += [dict(common, model="ensemble", round=k - 1, ensemble_size=k if kind == "ensemble" else 1, ce=ce)
             for k, ce in enumerate(sizes_ce, 1)]
    for row in rows:
        row["gap_closed"] = (start - row["ce"]) / (start - teacher)
    return rows


def test_the_teacher_gap_table_gives_each_member_sizes_best_ensemble_and_its_matched_single():
    rows = []
    for seed, noise in enumerate([-0.1, 0.0, 0.1]):
        rows += gap_rows("m3", "m3", "ensemble", "m3", seed, [5.0 + noise, 4.0 + noise, 4.5 + noise])  # best: 2
        rows += gap_rows("m6", "m6", "ensemble", "m6", seed, [4.0 + noise, 3.0 + noise, 3.0 + noise], start=7.0)
        rows += gap_rows("s14", "s14", "single", "teacher_layers=14", seed, [4.6 + noise], start=6.0)
    table = teacher_gap_table(pd.DataFrame(rows), [Matched("s14", "m3", 2, "parameters")],
                                    {"m3": "3 teacher layers", "m6": "6 teacher layers"})
    assert list(table["series"]) == ["m3", "m6"] and list(table["member_size"]) == ["3 teacher layers",
                                                                                    "6 teacher layers"]
    m3, m6 = table.iloc[0], table.iloc[1]
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)  # the seeds' CEs are 0.1 apart: std 0.1
    assert m3["ensemble_size"] == 2 and m3["seeds"] == 3 and m3["ensemble_ce"] == pytest.approx(4.0)
    assert (m3["ensemble_ce_low"], m3["ensemble_ce_high"]) == pytest.approx((4.0 - half, 4.0 + half))
    assert m3["ensemble_gap_closed"] == pytest.approx(5 / 8) and m3["start_ce"] == 9.0 and m3["teacher_ce"] == 1.0
    assert m3["ensemble_gap_closed_high"] - m3["ensemble_gap_closed_low"] == pytest.approx(2 * half / 8)
    assert m3["single"] == "s14" and m3["matched_size"] == 2 and m3["single_seeds"] == 3
    assert m3["single_ce"] == pytest.approx(4.6) and m3["single_gap_closed"] == pytest.approx(1.4 / 5)  # own start
    assert m3["single_gap_closed_on_member_scale"] == pytest.approx(4.4 / 8)  # from the member's start, 9.0
    assert m3["single_gap_closed_on_member_scale_low"] == pytest.approx((4.4 - half) / 8)
    assert m6["ensemble_size"] == 2 and pd.isna(m6["single"])  # equal means: the smaller; nothing matched to it
    assert teacher_gap_table(pd.DataFrame(rows)[lambda r: r["kind"] == "single"], [], {}).empty


def test_collect_writes_the_teacher_gap_with_the_matches_of_the_spec(synthetic_study):
    assert study.main([str(synthetic_study), "--collect", "--bootstrap", "0"]) == 0
    folder = load_spec(synthetic_study).folder
    gap = pd.read_csv(folder / "teacher_gap.csv")
    assert list(gap["series"]) == ["method (combine=logits)", "method (combine=additive)"]
    assert set(gap["member_size"]) == {"1 layers x 32 wide"} and set(gap["ensemble_size"]) == {4}
    assert gap["single"].isna().all() and set(gap["teacher_ce"]) == {1.0}  # the spec matches no single family
    assert "## The teacher gap closed, per member size" in (folder / "summary.md").read_text()


# --- latency ----------------------------------------------------------------------------------------------------------

def test_a_member_with_neither_weights_nor_config_cannot_be_timed(tmp_path):
    saved_tiny_ensemble(tmp_path, 1)
    for path in (tmp_path / "ensemble" / "member_0").iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match="neither weights nor a config.json"):
        first_members(tmp_path / "ensemble", 1, tmp_path / "cut")


def test_the_frontier_holds_the_points_no_other_beats_in_both():
    ce = [3.0, 2.5, 2.6, 2.0, 2.0, math.nan, 3.5]
    latency = [1.0, 2.0, 3.0, 4.0, 5.0, 0.5, 0.9]
    # 2.6 at 3.0 is beaten by 2.5 at 2.0; 2.0 at 5.0 by 2.0 at 4.0; no CE: on none; 3.5 at 0.9 is the fastest
    assert list(pareto_frontier(ce, latency)) == [True, True, False, True, False, False, True]
    assert list(pareto_frontier([1.0, 1.0], [2.0, 2.0])) == [True, True]  # equal points beat neither


def saved_tiny_ensemble(run_dir, members, layers=1):
    """A run's saved ensemble/ folder of `members` tiny random Llamas of `layers` layers (an end-of-sequence token
    they may emit: the timing decodes past it)."""
    models = []
    for seed in range(members):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=96, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=32, eos_token_id=2, bos_token_id=None,
                             pad_token_id=0)
        models.append(LlamaForCausalLM(config).eval())
    ModelEnsemble.from_members(models, vocab_size=96, concurrent=False).save_pretrained(run_dir / "ensemble")


def test_latency_times_every_point_from_its_saved_model_and_draws_the_frontier(tmp_path):
    families = [dict(name="method", settings=dict(total_rounds=2)),
                dict(name="single", kind="single", settings=dict(total_rounds=1),
                     grid=dict(student_num_layers=[1, 3]))]
    spec = write_spec(tmp_path / "spec.yaml", families)
    loaded = load_spec(spec)
    for point in loaded.points:
        if point.kind == "ensemble":
            run_dir = fake_run(point, [3.0 + point.seed / 10, 2.5 + point.seed / 10])
            saved_tiny_ensemble(run_dir, 2)
        else:
            layers = point.settings["student_num_layers"]
            run_dir = fake_run(point, [3.2 - layers / 10 + point.seed / 10])
            saved_tiny_ensemble(run_dir, 1, layers)
            if layers == 3:  # kept as a record only, as a study carried over from another machine: no weights
                for path in (run_dir / "ensemble" / "member_0").iterdir():
                    if path.name != "config.json":
                        path.unlink()
    assert study.main([str(spec), "--latency", "--new_tokens", "4", "--repeats", "1", "--prompt_tokens", "4",
                       "--bootstrap", "0"]) == 0
    table = pd.read_csv(loaded.folder / "latency.csv")
    assert list(table["point"]) == ["1 member(s)", "2 member(s)", "student_num_layers=1", "student_num_layers=3"]
    assert list(table["ensemble_size"]) == [1, 2, 1, 1] and list(table["processes"]) == [1, 2, 1, 1]
    assert list(table["run"]) == ["method__seed-0", "method__seed-0", "single__student_num_layers-1__seed-0",
                                  "single__student_num_layers-3__seed-0"]  # the first seed's run stands for each
    assert (table[["latency_ms_parallel", "latency_ms_sequential"]] > 0).all().all()
    one = table[table["ensemble_size"] == 1]
    assert (one["latency_ms_parallel"] == one["latency_ms_sequential"]).all()  # one member: one process
    assert table.loc[1, "parameters"] == 2 * table.loc[0, "parameters"]
    # The record-only member is timed with random weights of its saved shapes, and the table says so.
    assert list(table["weights"]) == ["trained", "trained", "trained", "random"]
    assert table.loc[3, "parameters"] > table.loc[2, "parameters"] > 0
    assert list(table["ce_mean"]) == pytest.approx([3.05, 2.55, 3.15, 2.95])
    assert table.loc[0, "ce_low"] < 3.05 < table.loc[0, "ce_high"]  # the t-interval over the 2 seeds
    assert set(table["threads_per_process"]) == {1} and set(table["new_tokens"]) == {4}
    assert list(table["frontier"]) == list(pareto_frontier(table["ce_mean"], table["latency_ms_parallel"]))
    assert table.loc[1, "frontier"]  # the lowest CE is always on it
    assert (loaded.folder / "ce_vs_latency.png").read_bytes()[:8] == PNG_SIGNATURE
    summary = (loaded.folder / "summary.md").read_text()
    assert "## CE against decode latency (latency.csv)" in summary and "| method | 2 member(s) |" in summary
    section = summary.split("## CE against decode latency")[1].split("\n## ")[0]
    assert quoted_numbers_missing(section, [loaded.folder / "latency.csv"]) == []  # quoted from the table
    (ax,) = latency_figure(table).axes
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert {"ensembles, a process per member", "single models", "Pareto frontier (lower CE, lower latency)",
            "the same ensembles, members one after another"} <= set(labels)


# --- a study carried to another machine as records ------------------------------------------------------------------

def test_records_carry_finished_runs_without_weights_and_count_as_finished_where_copied_back(tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", [dict(name="method", settings=dict(total_rounds=2))], seeds=[0, 1])
    finished, unfinished = load_spec(spec).points
    run_dir = fake_run(finished, [3.0, 2.5])
    saved_tiny_ensemble(run_dir, 2)
    (run_dir / "checkpoints" / "round_1").mkdir(parents=True)
    (run_dir / "checkpoints" / "round_1" / "trainer_state.json").write_text("{}")
    fake_run(unfinished, [3.0], rounds_done=1)
    kept = tmp_path / "kept"
    assert study.main([str(spec), "--records", str(kept)]) == 0
    assert "1 finished run(s) kept as records" in capsys.readouterr().out
    copied = {p.relative_to(kept / "runs" / finished.name / "2026-12-01" / "run_1").as_posix()
              for p in (kept / "runs").rglob("*") if p.is_file()}
    assert {"metrics.csv", "config.yaml", "manifest.json", "ensemble/config.json", "ensemble/generation_config.json",
            "ensemble/member_0/config.json"} <= copied
    assert not any(name.endswith(".safetensors") or name.startswith("checkpoints") for name in copied)
    assert not (kept / "runs" / unfinished.name).exists()  # it could not resume without its checkpoints
    # On another machine: the records copied into a new study folder make the run finished there, and collectable.
    (tmp_path / "elsewhere").mkdir()
    elsewhere = write_spec(tmp_path / "elsewhere" / "spec.yaml", [dict(name="method", settings=dict(total_rounds=2))],
                           seeds=[0, 1])
    moved = load_spec(elsewhere)
    shutil.copytree(kept / "runs", moved.folder / "runs")
    states = [point_status(p).state for p in moved.points]
    assert states == ["finished", "missing"]
    assert study.main([str(elsewhere), "--collect", "--bootstrap", "0"]) == 0
    assert set(pd.read_csv(moved.folder / "rows.csv")["run"]) == {finished.name}
    # ... and timeable: its ensemble of 2, a record only, with random weights of its shapes; also as records kept
    # before they kept generation_config.json (the ensemble, in one process and in one per member, takes its first
    # member's)
    for path in (moved.folder / "runs").rglob("generation_config.json"):
        path.unlink()
    assert study.main([str(elsewhere), "--latency", "--new_tokens", "2", "--repeats", "1", "--prompt_tokens", "2",
                       "--bootstrap", "0"]) == 0
    latency = pd.read_csv(moved.folder / "latency.csv")
    assert list(latency["ensemble_size"]) == [1, 2] and set(latency["weights"]) == {"random"}
