"""latency: a saved member with neither weights nor a config cannot be timed; the Pareto frontier of lower CE and
lower latency."""

import math

import pytest

from slm_ensembles.study.latency import first_members, pareto_frontier
from study_runs import saved_tiny_ensemble


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
