"""spec: a spec read into its grid (series, run arguments, seeds that vary the data), bad specs and comparisons
refused by name, learning-rate tuning on the first seed or taken from another study (tuned_in), and every shipped
spec valid."""

import dataclasses
import types
from pathlib import Path

import pandas as pd
import pytest

import config as config_lib
import study
from slm_ensembles.study import running
from slm_ensembles.study.grid import StudyError
from slm_ensembles.study.spec import check_points, load_spec
from study_runs import ENSEMBLE_AND_SINGLE, F0, fake_run, write_spec


# --- the grid ---------------------------------------------------------------------------------------------------------

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


# --- the shipped specs ------------------------------------------------------------------------------------------------

def test_the_shipped_cpu_study_is_a_valid_spec_whose_seeds_vary_the_data():
    spec = load_spec(Path(__file__).resolve().parents[3] / "studies" / "cpu.yaml")
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


SHIPPED_SPECS = Path(__file__).resolve().parents[3] / "studies"


@pytest.mark.parametrize("spec", sorted(p.name for p in SHIPPED_SPECS.glob("*.yaml")))
def test_every_shipped_spec_is_valid_and_its_runs_share_one_test_set(spec):
    """Every spec under studies/ loads (its configs built, matches resolved, tuning laid out), and every run of
    it is scored on one test set, each seed's runs on one training sample."""
    loaded = load_spec(SHIPPED_SPECS / spec)
    runs = [*loaded.points, *loaded.pending]  # pending: those that wait for the tuning of the study they name
    assert len({p.config.test_seed for p in runs}) == 1
    for seed in {p.seed for p in runs}:
        assert len({p.config.data_seed for p in runs if p.seed == seed}) == 1
