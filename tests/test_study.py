"""study.py, the command: collecting synthetic run folders of known laws into its files, studies set side by side
(--across), their latency timed (--latency), and real tiny studies of `test`-preset runs end to end. The study's
pieces (slm_ensembles/study/) are tested in tests/slm_ensembles/study/."""

import json
import math

import matplotlib.image
import pandas as pd
import pytest

from conftest import DATA_DIR
import study
from slm_ensembles.study import running
from slm_ensembles.study.collecting import collect_rows, observations
from slm_ensembles.study.comparison import single_curves
from slm_ensembles.study.figures import curves_figure, latency_figure
from slm_ensembles.study.latency import pareto_frontier
from slm_ensembles.study.quoted import quoted_numbers_missing
from slm_ensembles.study.spec import load_spec
from slm_ensembles.study.status import point_status
from study_runs import (F0, P0, ensemble_law, fake_run, saved_tiny_ensemble, single_law, size_study,
                        synthetic_study_spec, write_spec)


@pytest.fixture
def synthetic_study(tmp_path):
    """study_runs.synthetic_study_spec's spec, in this test's folder."""
    return synthetic_study_spec(tmp_path)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- collecting synthetic runs of known laws --------------------------------------------------------------------------

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


def test_collect_writes_the_teacher_gap_with_the_matches_of_the_spec(synthetic_study):
    assert study.main([str(synthetic_study), "--collect", "--bootstrap", "0"]) == 0
    folder = load_spec(synthetic_study).folder
    gap = pd.read_csv(folder / "teacher_gap.csv")
    assert list(gap["series"]) == ["method (combine=logits)", "method (combine=additive)"]
    assert set(gap["member_size"]) == {"1 layers x 32 wide"} and set(gap["ensemble_size"]) == {4}
    assert gap["single"].isna().all() and set(gap["teacher_ce"]) == {1.0}  # the spec matches no single family
    assert "## The teacher gap closed, per member size" in (folder / "summary.md").read_text()


# --- studies side by side ---------------------------------------------------------------------------------------------

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


# --- latency ----------------------------------------------------------------------------------------------------------

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


# --- real tiny studies ------------------------------------------------------------------------------------------------

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
