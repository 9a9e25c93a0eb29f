"""fits: the power-law fit on points of known exponent (exact, at FLOPs scale, noisy with its bootstrap interval),
its bounds, and fits their points cannot determine, which say so and are not drawn."""

import numpy as np
import pandas as pd
import pytest

import study
from slm_ensembles.study.collecting import point_table
from slm_ensembles.study.figures import ce_figure
from slm_ensembles.study.fits import (ALPHA_BOUNDS, FitError, INTERVAL, bootstrap_laws, fit_all, fit_power_law,
                                      too_few_points)
from slm_ensembles.study.spec import load_spec
from study_runs import fake_run, write_spec


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
