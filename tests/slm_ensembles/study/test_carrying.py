"""carrying: a study's finished runs kept as records without weights or checkpoints, and, copied back into a study
folder on another machine, finished there: skipped, collected and timed."""

import shutil

import pandas as pd

import study
from slm_ensembles.study.spec import load_spec
from slm_ensembles.study.status import point_status
from study_runs import fake_run, saved_tiny_ensemble, write_spec


def test_records_carry_finished_runs_without_weights_and_count_as_finished_where_copied_back(tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", [dict(name="method", settings=dict(total_rounds=2))], seeds=[0, 1])
    finished, unfinished = load_spec(spec).points
    run_dir = fake_run(finished, [3.0, 2.5])
    saved_tiny_ensemble(run_dir, 2)
    (run_dir / "checkpoints" / "round_1").mkdir(parents=True)
    (run_dir / "checkpoints" / "round_1" / "trainer_state.json").write_text("{}")
    fake_run(unfinished, [3.0], rounds_done=1)
    kept = tmp_path / "kept"
    assert study.main([str(spec), "--records", str(kept)]) == 0
    assert "1 finished run(s) kept as records" in capsys.readouterr().out
    copied = {p.relative_to(kept / "runs" / finished.name / "2026-12-01" / "run_1").as_posix()
              for p in (kept / "runs").rglob("*") if p.is_file()}
    assert {"metrics.csv", "config.yaml", "manifest.json", "ensemble/config.json", "ensemble/generation_config.json",
            "ensemble/member_0/config.json"} <= copied
    assert not any(name.endswith(".safetensors") or name.startswith("checkpoints") for name in copied)
    assert not (kept / "runs" / unfinished.name).exists()  # it could not resume without its checkpoints
    # On another machine: the records copied into a new study folder make the run finished there, and collectable.
    (tmp_path / "elsewhere").mkdir()
    elsewhere = write_spec(tmp_path / "elsewhere" / "spec.yaml", [dict(name="method", settings=dict(total_rounds=2))],
                           seeds=[0, 1])
    moved = load_spec(elsewhere)
    shutil.copytree(kept / "runs", moved.folder / "runs")
    states = [point_status(p).state for p in moved.points]
    assert states == ["finished", "missing"]
    assert study.main([str(elsewhere), "--collect", "--bootstrap", "0"]) == 0
    assert set(pd.read_csv(moved.folder / "rows.csv")["run"]) == {finished.name}
    # ... and timeable: its ensemble of 2, a record only, with random weights of its shapes; also as records kept
    # before they kept generation_config.json (the ensemble, in one process and in one per member, takes its first
    # member's)
    for path in (moved.folder / "runs").rglob("generation_config.json"):
        path.unlink()
    assert study.main([str(elsewhere), "--latency", "--new_tokens", "2", "--repeats", "1", "--prompt_tokens", "2",
                       "--bootstrap", "0"]) == 0
    latency = pd.read_csv(moved.folder / "latency.csv")
    assert list(latency["ensemble_size"]) == [1, 2] and set(latency["weights"]) == {"random"}
