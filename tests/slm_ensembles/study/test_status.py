"""status: a finished run whose spec has grown its rounds is resumed; a run made with other settings is refused."""

import pytest

import study
from slm_ensembles.study import running
from slm_ensembles.study.grid import StudyError
from slm_ensembles.study.spec import load_spec
from slm_ensembles.study.status import point_status
from study_runs import fake_run, write_spec


def test_grown_rounds_resume_and_other_settings_are_refused(tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path / "spec.yaml", [dict(name="method", settings=dict(total_rounds=3))], seeds=[0, 1])
    grown, other = load_spec(spec).points
    run_dir = fake_run(grown, [3.0, 2.5], total_rounds=2)  # finished with 2 rounds; the spec now asks for 3
    assert point_status(grown).resume_args == ("--resume", str(run_dir), "--total_rounds", "3")
    fake_run(other, [3.0, 2.5, 2.2], alpha=0.9)  # made with another alpha than the spec's
    with pytest.raises(StudyError, match=r"alpha: run 0.9, spec 0.5"):
        point_status(other)
    monkeypatch.setattr(running, "launch", lambda *a: pytest.fail("nothing may run"))
    assert study.main([str(spec)]) == 2 and "other settings" in capsys.readouterr().err
