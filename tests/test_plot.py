"""plot.py on synthetic run folders with known numbers: the data functions, labels, seed groups and the figures."""

import math

import matplotlib.image
import pandas as pd
import pytest
import yaml

import plot

NEW_COLUMNS = ["round", "model", "ensemble_size", "ce", "perplexity", "kl_teacher", "top1_agreement", "ece",
               "gap_closed", "diversity", "num_tokens", "seconds"]
OLD_COLUMNS = ["round", "model", "ensemble_size", "ce", "perplexity", "kl_teacher", "top1_agreement", "num_tokens",
               "seconds"]
TRAIN_LOG_COLUMNS = ["round", "step", "hybrid", "kl", "nll", "learning_rate", "grad_norm", "epoch", "grad_norm_kl"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

TEACHER, START = 1.0, 5.0  # CE of the teacher and of round 0's untrained student: gap_closed = (5 - ce) / 4


def base_config(**changes):
    config = dict(teacher="embedded:smollm2-135m-instruct", alpha=0.5, combine="logits", total_rounds=3,
                  steps_per_round=4, seed=0, baseline="none", output_root="runs", cache_dir=".cache")
    config.update(changes)
    return config


def write_run(path, students, ensembles, config, old_schema=False, train_log=True, gap_closed_column=None):
    """A run folder as main.py writes it: round r has an untrained student (CE 5 + r/2), the trained student and
    the ensemble of r + 1 members; the teacher (CE 1) is evaluated in round 0."""
    rows = [dict(round=0, model="teacher", ensemble_size=0, ce=TEACHER)]
    for r, (student, ensemble) in enumerate(zip(students, ensembles)):
        rows += [dict(round=r, model="student_untrained", ensemble_size=1, ce=START + r / 2),
                 dict(round=r, model="student", ensemble_size=1, ce=student),
                 dict(round=r, model="ensemble", ensemble_size=r + 1, ce=ensemble)]
    for row in rows:
        row.update(perplexity=math.exp(row["ce"]), kl_teacher=row["ce"] - TEACHER, top1_agreement=0.5,
                   ece=0.1, gap_closed=(START - row["ce"]) / (START - TEACHER),
                   diversity=0.2 if row["model"] == "ensemble" and row["ensemble_size"] > 1 else 0.0,
                   num_tokens=1000, seconds=1.5)
    metrics = pd.DataFrame(rows, columns=OLD_COLUMNS if old_schema else NEW_COLUMNS)
    if gap_closed_column is not None:
        metrics["gap_closed"] = gap_closed_column
    path.mkdir(parents=True)
    metrics.to_csv(path / "metrics.csv", index=False)
    if train_log:
        log = [dict(round=r, step=step, hybrid=10.0 - step - r, kl=8.0 - step - r, nll=12.0 - step - r,
                    learning_rate=1e-3, grad_norm=1.0, epoch=step / 10, grad_norm_kl=0.5)
               for r in range(len(students)) for step in range(1, 5)]
        pd.DataFrame(log, columns=TRAIN_LOG_COLUMNS).to_csv(path / "train_log.csv", index=False)
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def runs(tmp_path):
    """Two seeds of alpha=0.5, one run of alpha=0.7, an independent baseline and a single_matched baseline."""
    return dict(
        a=write_run(tmp_path / "2026-11-29" / "run_1", [3.0, 3.2, 3.4], [3.0, 2.6, 2.4], base_config(seed=0)),
        b=write_run(tmp_path / "2026-11-29" / "run_2", [3.1, 3.3, 3.5], [3.1, 2.8, 2.2],
                    base_config(seed=1, output_root="elsewhere")),
        c=write_run(tmp_path / "2026-11-29" / "run_3", [2.9, 3.0, 3.1], [2.9, 2.5, 2.25], base_config(alpha=0.7)),
        independent=write_run(tmp_path / "2026-11-30" / "run_1", [3.0, 3.0, 3.0], [3.0, 2.9, 2.8],
                              base_config(baseline="independent")),
        single_matched=write_run(tmp_path / "2026-11-30" / "run_2", [2.7], [2.7],
                                 base_config(baseline="single_matched", total_rounds=1, steps_per_round=12)),
    )


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) < 100_000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert image.std() > 0.05  # not a blank canvas
    assert len({tuple(p) for p in image.reshape(-1, image.shape[2])[::37]}) > 20  # lines, text, colours


# --- data functions ---------------------------------------------------------------------------------------------

def test_the_data_functions_return_the_runs_numbers(runs):
    run = plot.load_run(runs["a"])
    assert run.path == runs["a"] and run.label == "run_1" and run.config["alpha"] == 0.5
    assert list(run.train_log.columns) == TRAIN_LOG_COLUMNS  # unknown columns are kept, and ignored
    curve = plot.ensemble_curve(run.metrics)
    assert list(curve.columns) == ["ensemble_size", "ce"]
    assert curve["ensemble_size"].tolist() == [1, 2, 3]
    assert curve["ce"].tolist() == [3.0, 2.6, 2.4]
    assert plot.best_single_member(run.metrics) == 3.0
    assert plot.teacher_ce(run.metrics) == 1.0
    assert plot.start_ce(run.metrics) == 5.0
    assert plot.final_ensemble_ce(run.metrics) == 2.4
    bars = plot.gap_closed_bars(run.metrics)
    assert bars["ensemble_size"].tolist() == [1, 2, 3]
    assert bars["student"].tolist() == pytest.approx([0.5, 0.45, 0.4])
    assert bars["ensemble"].tolist() == pytest.approx([0.5, 0.6, 0.65])


def test_an_old_run_gets_gap_closed_from_its_ce(tmp_path):
    old = plot.load_run(write_run(tmp_path / "old", [3.0, 4.0], [3.0, 2.0], base_config(), old_schema=True))
    assert "ece" not in old.metrics.columns and "diversity" not in old.metrics.columns
    by_model = old.metrics.set_index(["round", "model"])["gap_closed"]
    assert by_model[(0, "teacher")] == 1.0
    assert by_model[(0, "student_untrained")] == 0.0
    assert by_model[(1, "student_untrained")] == pytest.approx((5.0 - 5.5) / 4)
    assert by_model[(0, "student")] == pytest.approx(0.5)
    assert by_model[(1, "student")] == pytest.approx(0.25)
    assert by_model[(1, "ensemble")] == pytest.approx(0.75)
    # every row follows the definition (CE_start - CE) / (CE_start - CE_teacher)
    assert old.metrics["gap_closed"].tolist() == pytest.approx(((5.0 - old.metrics["ce"]) / 4.0).tolist())


def test_gap_closed_values_in_the_file_are_kept_and_only_missing_ones_computed(tmp_path):
    written = [1.0, 0.0, 0.42, math.nan]  # teacher, untrained, student, ensemble (missing)
    run = plot.load_run(write_run(tmp_path / "run", [3.0], [2.0], base_config(), gap_closed_column=written))
    assert run.metrics["gap_closed"].tolist() == pytest.approx([1.0, 0.0, 0.42, 0.75])


def test_gap_closed_is_nan_without_a_teacher_row(tmp_path):
    path = write_run(tmp_path / "run", [3.0], [2.0], base_config(), old_schema=True)
    metrics = pd.read_csv(path / "metrics.csv")
    metrics[metrics["model"] != "teacher"].to_csv(path / "metrics.csv", index=False)
    run = plot.load_run(path)
    assert plot.teacher_ce(run.metrics) is None
    assert run.metrics["gap_closed"].isna().all()
    assert plot.run_figures(run)["gap_closed"] is not None  # still draws


def test_seed_groups_and_their_mean_min_and_max(runs):
    loaded = plot.load_runs(list(runs.values()))
    groups = plot.group_seeds(loaded)
    assert list(groups) == ["alpha=0.5", "alpha=0.7", "independent", "single_matched"]
    assert [r.path for r in groups["alpha=0.5"]] == [runs["a"], runs["b"]]  # output_root differs: still seeds
    assert [r.path for r in groups["alpha=0.7"]] == [runs["c"]]
    spread = plot.mean_and_spread([plot.ensemble_curve(r.metrics) for r in groups["alpha=0.5"]])
    assert spread["ensemble_size"].tolist() == [1, 2, 3]
    assert spread["mean"].tolist() == pytest.approx([3.05, 2.7, 2.3])
    assert spread["min"].tolist() == [3.0, 2.6, 2.2]
    assert spread["max"].tolist() == [3.1, 2.8, 2.4]
    assert spread["n"].tolist() == [2, 2, 2]
    # a seed that stopped after two rounds counts only where it has a value
    short = pd.DataFrame({"ensemble_size": [1, 2], "ce": [4.0, 3.0]})
    spread = plot.mean_and_spread([plot.ensemble_curve(loaded[0].metrics), short])
    assert spread["mean"].tolist() == pytest.approx([3.5, 2.8, 2.4])
    assert spread["n"].tolist() == [2, 2, 1]
    assert plot.mean_and_spread([]).empty


def test_an_older_run_without_newer_config_keys_is_a_seed_of_the_same_config(runs, tmp_path):
    config = base_config(seed=2)
    del config["baseline"]  # older runs lack it: the main method
    old = plot.load_run(write_run(tmp_path / "old", [3.0, 3.0, 3.0], [3.0, 2.5, 2.0], config, old_schema=True))
    assert old.config["baseline"] == "none"
    new = plot.load_run(write_run(tmp_path / "new", [3.0], [3.0], base_config(seed=3, eta=1.0)))  # a newer key
    groups = plot.group_seeds([plot.load_run(runs["a"]), old, new])
    assert list(groups) == ["run_1"] and [r.path.name for r in groups["run_1"]] == ["run_1", "old", "new"]
    assert plot.same_config(old, new)
    other_eta = plot.load_run(write_run(tmp_path / "eta", [3.0], [3.0], base_config(eta=0.5)))
    assert not plot.same_config(new, other_eta)
    assert plot.run_label(other_eta, [new, other_eta, old]) == "eta=0.5"


def test_labels_name_what_differs(runs, tmp_path):
    a, b, c, independent, single = plot.load_runs(list(runs.values()))
    assert [r.label for r in (a, b, c, independent, single)] == [
        "alpha=0.5", "alpha=0.5", "alpha=0.7", "independent", "single_matched"]
    assert plot.run_label(a, [a, b]) == "run_1"  # only the seed differs: the folder name
    assert plot.run_label(b, [a, b]) == "run_2"
    assert plot.run_label(a, [a]) == "run_1"
    weighted = plot.load_run(write_run(tmp_path / "w" / "run_1", [3.0], [3.0], base_config(combine="weighted")))
    assert plot.run_label(weighted, [a, weighted]) == "combine=weighted"
    assert plot.run_label(a, [a, weighted]) == "combine=logits"
    # same folder name on two dates, nothing else differs: the date tells them apart
    twin = plot.load_run(write_run(tmp_path / "2026-12-01" / "run_1", [3.0], [3.0], base_config(seed=5)))
    assert plot.run_label(twin, [a, twin]) == "2026-12-01/run_1"
    # baselines differing among themselves say both
    large = plot.load_run(write_run(tmp_path / "l" / "run_1", [2.0], [2.0],
                                    base_config(baseline="single_large", total_rounds=1, alpha=0.7)))
    large_half = plot.load_run(write_run(tmp_path / "l" / "run_2", [2.1], [2.1],
                                         base_config(baseline="single_large", total_rounds=1)))
    assert plot.run_label(large, [large, large_half, a]) == "single_large, alpha=0.7"


def test_final_ce_table_is_best_first(runs):
    table = plot.final_ce_table(plot.load_runs(list(runs.values())))
    assert table["label"].tolist() == ["alpha=0.7", "alpha=0.5", "single_matched", "independent"]
    assert table["mean"].tolist() == pytest.approx([2.25, 2.3, 2.7, 2.8])
    assert table["min"].tolist() == [2.25, 2.2, 2.7, 2.8]
    assert table["max"].tolist() == [2.25, 2.4, 2.7, 2.8]
    assert table["n"].tolist() == [1, 2, 1, 1]
    assert table["members"].tolist() == [3, 3, 1, 3]
    assert plot.teacher_lines(plot.load_runs(list(runs.values()))) == {"teacher": 1.0}


# --- figures ----------------------------------------------------------------------------------------------------

def test_the_figures_of_one_run_draw_its_numbers(runs):
    figures = plot.run_figures(plot.load_run(runs["a"]))
    assert list(figures) == ["ce_vs_ensemble_size", "training_curves", "gap_closed"]
    (ax,) = figures["ce_vs_ensemble_size"].axes
    ensemble, best, teacher = ax.lines
    assert list(ensemble.get_xdata()) == [1, 2, 3] and list(ensemble.get_ydata()) == [3.0, 2.6, 2.4]
    assert list(best.get_ydata()) == [3.0, 3.0] and best.get_linestyle() == "--"
    assert list(teacher.get_ydata()) == [1.0, 1.0] and teacher.get_linestyle() == "--"
    assert ax.get_xlabel() == "ensemble size (members)" and ax.get_ylabel() == "held-out CE (nats/token)"
    assert ax.get_title() and ax.get_legend() is not None
    axes = figures["training_curves"].axes
    assert [a.get_title() for a in axes][0].startswith("hybrid")
    assert [len(a.lines) for a in axes] == [3, 3, 3]  # one line per round
    assert list(axes[2].lines[1].get_ydata()) == [10.0, 9.0, 8.0, 7.0]  # nll of round 1
    assert all(a.get_xlabel() == "training step" for a in axes) and axes[0].get_legend() is not None
    (ax,) = figures["gap_closed"].axes
    heights = [patch.get_height() for patch in ax.patches]
    assert heights == pytest.approx([0.5, 0.45, 0.4, 0.5, 0.6, 0.65])  # students, then ensembles
    assert ax.get_legend() is not None


def test_plot_run_writes_pngs_into_the_run_folder(runs):
    paths = plot.plot_run(runs["a"])
    assert paths == [runs["a"] / "ce_vs_ensemble_size.png", runs["a"] / "training_curves.png",
                     runs["a"] / "gap_closed.png"]
    for path in paths:
        check_png(path)


def test_plot_run_without_a_train_log_skips_the_training_curves(tmp_path):
    path = write_run(tmp_path / "run", [3.0], [3.0], base_config(), train_log=False)
    assert [p.name for p in plot.plot_run(path, tmp_path / "out")] == ["ce_vs_ensemble_size.png", "gap_closed.png"]
    assert not (path / "ce_vs_ensemble_size.png").exists()


def test_a_train_log_that_is_not_csv_text_is_left_out_of_the_figures_with_a_warning(tmp_path, capsys):
    path = write_run(tmp_path / "run", [3.0, 2.8], [3.0, 2.6], base_config())
    (path / "train_log.csv").write_bytes(b"round,step,hybrid\n0,1,\xff\xfe\n")
    run = plot.load_run(path)
    assert run.train_log is None
    assert f"warning: {path / 'train_log.csv'} cannot be read (UnicodeDecodeError" in capsys.readouterr().err
    assert [p.name for p in plot.plot_run(path, tmp_path / "out")] == ["ce_vs_ensemble_size.png", "gap_closed.png"]


def test_plot_runs_compares_groups_and_baselines(runs, tmp_path):
    figures = plot.comparison_figures(plot.load_runs(list(runs.values())))
    (ax,) = figures["ce_vs_ensemble_size"].axes
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines["alpha=0.5 (2 seeds; band: min-max)"].get_ydata()) == pytest.approx([3.05, 2.7, 2.3])
    assert list(lines["alpha=0.7"].get_ydata()) == [2.9, 2.5, 2.25]
    assert list(lines["independent"].get_ydata()) == [3.0, 2.9, 2.8]
    assert list(lines["single_matched: 2.700"].get_ydata()) == [2.7, 2.7]
    assert lines["single_matched: 2.700"].get_linestyle() == "--"
    assert list(lines["teacher: 1.000"].get_ydata()) == [1.0, 1.0]
    assert len(ax.collections) == 1  # the min-max band of the seed group
    (ax,) = figures["final_ce"].axes
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["alpha=0.7 (3 members)", "alpha=0.5 (3 members, 2 seeds)"]
    assert [p.get_width() for p in ax.patches] == pytest.approx([2.25, 2.3, 2.7, 2.8])

    paths = plot.plot_runs(list(runs.values()), tmp_path / "compare")
    assert paths == [tmp_path / "compare" / "ce_vs_ensemble_size.png", tmp_path / "compare" / "final_ce.png"]
    for path in paths:
        check_png(path)


# --- command line -----------------------------------------------------------------------------------------------

def test_main_plots_one_run_into_its_folder_and_several_into_plots(runs, tmp_path, monkeypatch, capsys):
    assert plot.main([str(runs["c"])]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(runs["c"] / name) for name in ("ce_vs_ensemble_size.png", "training_curves.png",
                                                          "gap_closed.png")]
    monkeypatch.chdir(tmp_path)
    assert plot.main([str(runs["a"]), str(runs["b"]), str(runs["single_matched"])]) == 0
    assert capsys.readouterr().out.split() == ["plots/ce_vs_ensemble_size.png", "plots/final_ce.png"]
    check_png(tmp_path / "plots" / "final_ce.png")


def test_main_names_a_folder_without_metrics(runs, tmp_path):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(SystemExit) as raised:
        plot.main([str(runs["a"]), str(empty), "--out", str(tmp_path / "out")])
    assert str(empty) in str(raised.value) and "metrics.csv" in str(raised.value)
    assert not (tmp_path / "out").exists()  # nothing written
    with pytest.raises(FileNotFoundError, match="not_a_run"):
        plot.load_run(empty)


def test_gap_closed_is_nan_when_the_untrained_student_already_scores_as_the_teacher():
    metrics = pd.DataFrame([dict(round=0, model="teacher", ce=2.0), dict(round=0, model="student_untrained", ce=2.0),
                            dict(round=0, model="student", ce=1.5)])
    assert plot.gap_closed(metrics).isna().all()  # the gap is empty: no share of it can be closed


def test_metrics_summary_sets_each_ensemble_against_its_best_member_so_far():
    metrics = pd.DataFrame([dict(round=r, model=m, ensemble_size=n, ce=ce, perplexity=math.exp(ce), kl_teacher=0.1,
                                 top1_agreement=0.5)
                            for r, m, n, ce in [(0, "student", 1, 3.0), (0, "ensemble", 1, 3.0),
                                                (1, "student", 1, 3.5), (1, "ensemble", 2, 2.75)]])
    summary = plot.metrics_summary(metrics)
    assert "  1 member(s): ensemble 3.0000, best member 3.0000, gain +0.0000" in summary
    assert "  2 member(s): ensemble 2.7500, best member 3.0000, gain +0.2500" in summary
    assert summary.startswith("Metrics on the held-out split") and "2.7500" in summary.splitlines()[1 + 4]


def test_new_rows_get_gap_closed_from_the_ends_written_before_or_given_with_them(tmp_path):
    path = tmp_path / "metrics.csv"
    first = plot.rows_with_gap_closed([dict(round=0, model="teacher", ce=TEACHER),
                                       dict(round=0, model="student_untrained", ce=START),
                                       dict(round=0, model="student", ce=3.0)], path)
    assert [row["gap_closed"] for row in first] == [1.0, 0.0, 0.5]
    pd.DataFrame(first).to_csv(path, index=False)
    later = plot.rows_with_gap_closed([dict(round=1, model="ensemble", ce=2.0)], path)
    assert later == [dict(round=1, model="ensemble", ce=2.0, gap_closed=0.75)]
    # A round evaluated again: its new rows count, not those it replaces.
    again = plot.rows_with_gap_closed([dict(round=0, model="student_untrained", ce=4.0),
                                       dict(round=0, model="teacher", ce=TEACHER)], path)
    assert [row["gap_closed"] for row in again] == [0.0, 1.0]


def test_seeds_form_a_group_only_when_their_data_seed_and_so_test_set_is_the_same(tmp_path):
    paths = [write_run(tmp_path / name, [3.0], [2.5], base_config(seed=seed, data_seed=data_seed))
             for name, seed, data_seed in (("a", 0, 0), ("b", 1, 0), ("c", 2, 1))]
    groups = plot.group_seeds(plot.load_runs(paths))
    assert [[run.path for run in group] for group in groups.values()] == [paths[:2], paths[2:]]
