"""benchmarks/mutation_summary.py: the score per module from mutmut's states and the equivalent mutants."""

import pandas as pd
import pytest

from benchmarks import mutation_summary

RESULTS = """    slm_ensembles.losses.x_loss_chunks__mutmut_1: killed
    slm_ensembles.losses.x_loss_chunks__mutmut_2: survived
    slm_ensembles.losses.x_loss_chunks__mutmut_3: survived
    slm_ensembles.losses.xǁLossSettingsǁfor_round__mutmut_1: no tests
    slm_ensembles.losses.x_bucket_log_probs__mutmut_4: timeout
    ensemble.xǁModelEnsembleǁtrain__mutmut_1: not checked
    ensemble.x_next_token_nll__mutmut_14: killed
"""


def test_the_score_is_the_caught_share_of_the_mutants_that_ran_less_the_equivalent_ones(tmp_path, capsys):
    results = tmp_path / "results.txt"
    results.write_text(RESULTS)
    equivalent = tmp_path / "equivalent.csv"
    equivalent.write_text("mutant,reason\nslm_ensembles.losses.x_loss_chunks__mutmut_3,the same slice\n")
    output = tmp_path / "summary.csv"
    assert mutation_summary.main([str(results), "--equivalent", str(equivalent), "--output", str(output)]) == 0
    table = pd.read_csv(output).set_index("module")
    assert table.loc["slm_ensembles.losses"].to_dict() == dict(
        mutants=5, run=4, killed=1, timeout=1, survived=1, equivalent=1, no_tests=1, not_run=0, caught_share=0.6667)
    assert table.loc["ensemble"].to_dict() == dict(
        mutants=2, run=1, killed=1, timeout=0, survived=0, equivalent=0, no_tests=0, not_run=1, caught_share=1.0)
    assert table.loc["all", "mutants"] == 7 and table.loc["all", "caught_share"] == 0.75
    assert "slm_ensembles.losses" in capsys.readouterr().out


@pytest.mark.parametrize("equivalent, message", [
    ("mutant,reason\nslm_ensembles.losses.x_loss_chunks__mutmut_1,caught anyway\n",
     "x_loss_chunks__mutmut_1: an equivalent mutant must have survived and say why"),
    ("mutant,reason\nslm_ensembles.losses.x_loss_chunks__mutmut_2,\n", "x_loss_chunks__mutmut_2: an equivalent"),
    ("mutant,reason\nno_such.x_f__mutmut_1,gone\n", "no_such.x_f__mutmut_1: an equivalent"),
])
def test_an_equivalent_mutant_must_be_a_survivor_with_its_reason(tmp_path, capsys, equivalent, message):
    (tmp_path / "results.txt").write_text(RESULTS)
    (tmp_path / "equivalent.csv").write_text(equivalent)
    assert mutation_summary.main([str(tmp_path / "results.txt"), "--equivalent", str(tmp_path / "equivalent.csv"),
                                  "--output", str(tmp_path / "summary.csv")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "summary.csv").exists()


def test_an_unknown_state_is_refused_by_name(tmp_path, capsys):
    (tmp_path / "results.txt").write_text("    ensemble.x_f__mutmut_1: exploded\n")
    assert mutation_summary.main([str(tmp_path / "results.txt")]) == 2
    assert "mutant ensemble.x_f__mutmut_1: unknown state 'exploded'" in capsys.readouterr().err
