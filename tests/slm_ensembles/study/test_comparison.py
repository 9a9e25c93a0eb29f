"""comparison: the ensemble against a single model, paired over seeds: a single model read only inside its range, a
matched one at its own size, a learning curve at the ensemble's spend, the t-interval and its verdict, the compute
multipliers, and the deciding verdicts."""

import math

import numpy as np
import pandas as pd
import pytest

import study
from slm_ensembles.study.across import Panel, across_markdown
from slm_ensembles.study.comparison import (Curve, deciding_verdicts, multiplier_summary, paired_interval,
                                            paired_single, pairs_table, single_at, verdict, verdict_table)
from slm_ensembles.study.grid import Matched
from slm_ensembles.study.spec import load_spec
from study_runs import F0, fake_run, write_spec


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
