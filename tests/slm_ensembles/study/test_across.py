"""across: studies that no setting tells apart, or one study named twice, are refused before anything is written."""

import pytest

import study
from slm_ensembles.study.across import differing_settings
from slm_ensembles.study.grid import StudyError
from slm_ensembles.study.spec import load_spec
from study_runs import F0, size_study


def test_across_refuses_studies_that_nothing_tells_apart(tmp_path):
    one = size_study(tmp_path, "one", 40, F0, [3.0, 2.0], 2.5)
    same = size_study(tmp_path, "same", 40, F0, [3.0, 2.0], 2.5)
    with pytest.raises(StudyError, match="state the same settings for all their runs"):
        differing_settings([load_spec(one), load_spec(same)])
    with pytest.raises(StudyError, match="repeat: one, one"):
        differing_settings([load_spec(one), load_spec(one)])
    assert study.main([str(one), str(same), "--across", str(tmp_path / "side")]) == 2
    assert not (tmp_path / "side").exists()  # refused before anything is written
