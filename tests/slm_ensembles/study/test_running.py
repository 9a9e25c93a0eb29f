"""running: finished runs skipped, unfinished ones resumed and missing ones started (each launch's wall time kept),
a failed run reported while the rest still runs, --dry_run's list and --print_sbatch's array lines."""

import datetime
import json
import shlex
import shutil

import pandas as pd
import pytest

import config as config_lib
import study
from slm_ensembles.study import carrying, running
from slm_ensembles.study.spec import load_spec
from study_runs import fake_run, write_spec


def test_skips_finished_resumes_unfinished_starts_missing_then_runs_nothing(tmp_path, monkeypatch):
    spec = write_spec(tmp_path / "spec.yaml", [dict(name="method", settings=dict(total_rounds=2))], seeds=[0, 1, 2])
    finished, unfinished, missing = load_spec(spec).points
    fake_run(finished, [3.0, 2.5])
    half = fake_run(unfinished, [3.0], rounds_done=1)
    calls = []

    def fake_launch(args, log_path):  # plays main.py: the run it is asked for ends finished
        calls.append(args)
        if args[0] == "--resume":
            manifest = json.loads((half / "manifest.json").read_text())
            manifest["rounds"] = {k: "done" for k in manifest["rounds"]}
            (half / "manifest.json").write_text(json.dumps(manifest))
        else:
            fake_run(missing, [3.1, 2.6])
        return 0

    monkeypatch.setattr(running, "launch", fake_launch)
    assert study.main([str(spec), "--bootstrap", "0"]) == 0
    assert calls == [["--resume", str(half)], missing.run_args()]
    folder = load_spec(spec).folder
    assert set(pd.read_csv(folder / "runs.csv")["status"]) == {"finished"}
    launch = pd.read_csv(half / "wall_time.csv")  # each launch's wall time, kept in the run's folder
    assert list(launch.columns) == ["started", "seconds", "exit_code"] and len(launch) == 1
    assert launch["exit_code"].tolist() == [0] and 0 <= launch["seconds"][0] < 60
    times = pd.read_csv(folder / "run_times.csv").set_index("run")
    assert times["launches"].tolist() == [0, 1, 1]  # the run finished before this study ran it has no record
    assert times["seconds"].isna().tolist() == [True, False, False]
    assert times.loc[missing.name, "seconds"] == pd.read_csv(next(missing.output_root.glob("*/run_*/wall_time.csv"))
                                                             )["seconds"].sum()
    assert ("launch(es) of 2 run(s), tuning runs included (run_times.csv); 1 finished run(s) have no wall_time.csv"
            in (folder / "summary.md").read_text())
    calls.clear()
    assert study.main([str(spec), "--bootstrap", "0"]) == 0
    assert calls == []  # everything finished: nothing runs again
    assert len(pd.read_csv(half / "wall_time.csv")) == 1  # and no launch was recorded


def test_a_run_resumed_after_a_failed_launch_records_both_launches_wall_times(tmp_path, monkeypatch):
    spec = write_spec(tmp_path / "spec.yaml", [dict(name="method", settings=dict(total_rounds=2))], seeds=[0])
    (point,) = load_spec(spec).points
    half = fake_run(point, [3.0], rounds_done=1)
    codes = [1, 0]

    def fake_launch(args, log_path):  # the first launch dies; the second finishes the run
        code = codes.pop(0)
        if code == 0:
            manifest = json.loads((half / "manifest.json").read_text())
            (half / "manifest.json").write_text(json.dumps({**manifest, "rounds": {"0": "done", "1": "done"}}))
        return code

    monkeypatch.setattr(running, "launch", fake_launch)
    assert study.main([str(spec), "--bootstrap", "0"]) == 1
    assert study.main([str(spec), "--bootstrap", "0"]) == 0
    assert pd.read_csv(half / "wall_time.csv")["exit_code"].tolist() == [1, 0]
    times = pd.read_csv(load_spec(spec).folder / "run_times.csv")
    assert times["launches"].tolist() == [2] and times["status"].tolist() == ["finished"]


def test_failed_run_is_reported_and_the_rest_still_runs(tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path / "spec.yaml", [dict(name="method", settings=dict(total_rounds=1))])
    first, second = load_spec(spec).points
    ran = []

    def fake_launch(args, log_path):
        ran.append(args)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("boom\n")
        if first.name not in " ".join(args):
            fake_run(second, [2.0])
            return 0
        return 1

    monkeypatch.setattr(running, "launch", fake_launch)
    assert study.main([str(spec), "--bootstrap", "0"]) == 1
    assert len(ran) == 2
    captured = capsys.readouterr()
    assert "not finished (main.py exit code 1)" in captured.out and "boom" in captured.out
    assert first.name in captured.err
    runs = pd.read_csv(load_spec(spec).folder / "runs.csv").set_index("run")["status"]
    assert runs[first.name] == "missing" and runs[second.name] == "finished"


def test_dry_run_lists_points_and_their_state(tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", [dict(name="method", settings=dict(total_rounds=1))])
    fake_run(load_spec(spec).points[0], [2.0])
    assert study.main([str(spec), "--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "2 runs" in lines[0] and "1 finished" in lines[0] and "1 not started" in lines[0]
    assert lines[1].split()[:2] == ["finished", "method__seed-0"]
    assert lines[2].split()[:2] == ["missing", "method__seed-1"]
    assert not (load_spec(spec).folder / "rows.csv").exists()  # a dry run writes nothing


def test_print_sbatch_gives_each_array_task_its_settings(tmp_path, capsys):
    families = [dict(name="method", settings=dict(total_rounds=2), grid=dict(combine=["logits", "weighted"])),
                dict(name="big", preset="demo", settings=dict(baseline="single_large", total_rounds=2))]
    spec = write_spec(tmp_path / "spec.yaml", families, settings=dict(steps_per_round=5))
    loaded = load_spec(spec)
    half = fake_run(loaded.points[0], [3.0], rounds_done=1)
    assert study.main([str(spec), "--print_sbatch"]) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("sbatch")]
    assert len(lines) == 3  # the test preset's new runs, the demo preset's, the resumed one

    def tasks(words):
        """What train.sh gives main.py for each array task: the arguments, then --KEY V_i of the sweep."""
        array = next(w for w in words if w.startswith("--array="))
        first, last = map(int, array.removeprefix("--array=").split("-"))
        sweep = words[words.index("--sweep") + 1]
        key, values = sweep.split("=", 1)
        values = values.split(",")
        assert (first, last) == (0, len(values) - 1)
        script = next(i for i, w in enumerate(words) if w.endswith("train.sh"))
        rest = [w for w in words[script + 1:] if w not in ("--sweep", sweep)]
        return [(rest, key, value) for value in values]

    started = {}
    for rest, key, value in tasks(lines[0]) + tasks(lines[1]):
        assert key == "config" and rest[0] == "--preset"
        config = config_lib.build_config(rest[1], value)  # what main.py builds from it
        started[config.output_root] = (rest[1], config)
    wanted = {str(p.output_root): p for p in loaded.points[1:]}
    assert set(started) == set(wanted)
    for root, (preset, config) in started.items():
        point = wanted[root]
        assert preset == point.preset and config.seed == point.seed and config.steps_per_round == 5
        assert config.combine == point.settings.get("combine", "logits") and config.baseline == point.config.baseline
    assert tasks(lines[2]) == [([], "resume", str(half))]


def test_keep_records_copies_each_finished_run_before_the_next_launch_and_no_unfinished_one(tmp_path, monkeypatch):
    spec = write_spec(tmp_path / "spec.yaml", [dict(name="method", settings=dict(total_rounds=1))], seeds=[0, 1, 2])
    before, finishing, failing = load_spec(spec).points
    fake_run(before, [2.0])
    kept = tmp_path / "kept" / "runs"
    kept_at_launch = []

    def fake_launch(args, log_path):  # seed 1's run finishes; seed 2's dies part way
        kept_at_launch.append(sorted(path.name for path in kept.iterdir()))
        if str(finishing.output_root) in args:
            fake_run(finishing, [2.1])
            return 0
        fake_run(failing, [2.2], rounds_done=0)
        return 1

    monkeypatch.setattr(running, "launch", fake_launch)
    assert study.main([str(spec), "--bootstrap", "0", "--keep_records", str(kept.parent)]) == 1
    assert kept_at_launch == [[before.name], [before.name, finishing.name]]  # kept before each next launch
    assert sorted(path.name for path in kept.iterdir()) == [before.name, finishing.name]  # not the unfinished one
    assert (kept / finishing.name / "2026-12-01" / "run_1" / "metrics.csv").is_file()


def test_keep_records_restores_the_kept_runs_a_new_machine_lacks_and_leaves_the_runs_it_has(tmp_path, monkeypatch,
                                                                                           capsys):
    spec = write_spec(tmp_path / "spec.yaml", [dict(name="method", settings=dict(total_rounds=1))], seeds=[0, 1, 2])
    grid = load_spec(spec)
    kept_only, restarted, new = grid.points
    fake_run(kept_only, [2.0])
    fake_run(restarted, [2.1])
    carrying.keep_records(grid, tmp_path / "kept")
    shutil.rmtree(grid.folder / "runs")  # the machine is lost; on the new one, `restarted` was started again
    half = fake_run(restarted, [2.1], rounds_done=0)
    launched = []

    def fake_launch(args, log_path):
        launched.append(args)
        if args[0] == "--resume":
            manifest = json.loads((half / "manifest.json").read_text())
            (half / "manifest.json").write_text(json.dumps({"rounds": {k: "done" for k in manifest["rounds"]}}))
        else:
            fake_run(new, [2.2])
        return 0

    monkeypatch.setattr(running, "launch", fake_launch)
    assert study.main([str(spec), "--bootstrap", "0", "--keep_records", str(tmp_path / "kept")]) == 0
    assert "restored 1 finished run(s)" in capsys.readouterr().out
    assert len(launched) == 2 and launched[0][:2] == ["--resume", str(half)]  # kept_only is not run again
    assert str(new.output_root) in launched[1]
    assert (kept_only.output_root / "2026-12-01" / "run_1" / "metrics.csv").is_file()
    assert sorted(p.name for p in (restarted.output_root / "2026-12-01").iterdir()) == ["run_1"]  # not replaced


def test_keep_records_is_refused_with_the_modes_that_run_nothing(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", [dict(name="method", settings=dict(total_rounds=1))])
    with pytest.raises(SystemExit):
        study.parse_args([str(spec), "--collect", "--keep_records", str(tmp_path / "kept")])
    assert study.parse_args([str(spec), "--keep_records", str(tmp_path / "kept")]).keep_records == tmp_path / "kept"


def test_dry_run_estimates_the_time_left_at_each_familys_mean_over_its_finished_runs(tmp_path, capsys):
    families = [dict(name="method", settings=dict(total_rounds=1)),
                dict(name="single", kind="single", settings=dict(total_rounds=1))]
    spec = write_spec(tmp_path / "spec.yaml", families, seeds=[0, 1, 2])
    points = {(p.family, p.seed): p for p in load_spec(spec).points}
    for seed, seconds in ((0, 100.0), (1, 300.0)):  # method's mean: 200 s
        run_dir = fake_run(points["method", seed], [2.0])
        running.record_wall_time(run_dir, datetime.datetime.now(datetime.timezone.utc), seconds, 0)
    fake_run(points["single", 0], [2.0])  # finished before studies timed runs: no mean for its family
    assert study.main([str(spec), "--dry_run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "Measured: 2 finished run(s) took 0.11 h; the 3 left, at their family's mean so far: about 0.06 h for 1 of "
        "them (2 of a family with no finished, timed run yet).")
