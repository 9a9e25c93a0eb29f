"""figures: every series drawn with its seeds' bars and its fit, and the learning curves with each seed's fixed
build taken off both sides."""

import pandas as pd
import pytest
from matplotlib.figure import Figure

from slm_ensembles.study.collecting import collect_rows, observations, point_table
from slm_ensembles.study.comparison import Curve
from slm_ensembles.study.figures import draw_curves, fixed_flops, study_figures
from slm_ensembles.study.fits import fit_all
from slm_ensembles.study.spec import load_spec
from study_runs import synthetic_study_spec


@pytest.fixture
def synthetic_study(tmp_path):
    """study_runs.synthetic_study_spec's spec, in this test's folder."""
    return synthetic_study_spec(tmp_path)


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
