"""teacher_gap: each member size's best ensemble and its matched single model, with the teacher gap they close and
their t-intervals over seeds."""

import math

import pandas as pd
import pytest
from scipy import stats

from slm_ensembles.study.grid import Matched
from slm_ensembles.study.teacher_gap import teacher_gap_table


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
