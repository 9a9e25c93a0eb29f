"""quoted: a number quoted in a text must be one a result file rounds to."""

import pandas as pd

from slm_ensembles.study.quoted import quoted_numbers_missing


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
