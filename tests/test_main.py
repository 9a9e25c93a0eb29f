"""main.py end to end with the `test` preset: rounds, run folder, metrics, resume, and refusals."""

import csv
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import DATA_DIR, accelerate_launch, build_tiny_llama, build_tokenizer
from ensemble import ModelEnsemble
import main
from model_io import OutputHeadOnly
import train
from train import EVALUATION_LOG_COLUMNS
import utils
from slm_ensembles import evaluation, files, processes, records, run_state, teacher as teacher_lib
from slm_ensembles.run_layout import RunLayout
from safetensors.torch import load_file
from transformers import PreTrainedModel

REPO = Path(__file__).resolve().parents[1]


def refuse_to_load_weights(monkeypatch) -> None:
    """Make any weight loading fail the test: what is checked before anything heavy loads must not need it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the dry run loaded weights")

    monkeypatch.setattr(utils, "load_causal_lm", refuse)
    monkeypatch.setattr(utils, "load_output_head", refuse)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


def cli_args(teacher_dir, tmp_path, *extra):
    return ["--preset", "test", "--teacher", str(teacher_dir), "--dataset", str(DATA_DIR / "chats.jsonl"),
            "--output_root", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"), *extra]


def only_run_dir(tmp_path) -> Path:
    (run_dir,) = (tmp_path / "runs").glob("*/run_*")
    return run_dir


def test_a_metrics_csv_damaged_during_the_run_is_restored_before_the_next_rows_are_added(tiny_teacher_dir, tmp_path,
                                                                                         monkeypatch, capsys):
    record_round = main.record_round

    def record_then_damage(run, round_index, rows):
        run = record_round(run, round_index, rows)
        path = run.folder / RunLayout.METRICS
        path.write_bytes(path.read_bytes().replace(b"student", b"\xff\xfeudent", 1))  # not UTF-8 any more
        return run

    monkeypatch.setattr(main, "record_round", record_then_damage)
    assert main.main(cli_args(tiny_teacher_dir, tmp_path)) == 0
    assert "metrics.csv: it is not CSV text" in capsys.readouterr().err
    rows = files.read_csv_rows(only_run_dir(tmp_path) / RunLayout.METRICS)
    assert sorted({(row["round"], row["model"]) for row in rows}) == [
        ("0", "ensemble"), ("0", "student"), ("0", "student_untrained"), ("0", "teacher"),
        ("1", "ensemble"), ("1", "student"), ("1", "student_untrained")]


def test_main_runs_end_to_end_from_the_command_line(tiny_teacher_dir, tmp_path):
    result = subprocess.run([sys.executable, "main.py", *cli_args(tiny_teacher_dir, tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert run_dir.name == "run_1" and len(run_dir.parent.name) == len("YYYY-MM-DD")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["steps_per_round"] == 3

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["model"]) == ["teacher", "student_untrained", "student", "ensemble",
                                      "student_untrained", "student", "ensemble"]
    assert list(metrics["ensemble_size"]) == [0, 1, 1, 1, 1, 1, 2]
    teacher = metrics.iloc[0]
    assert teacher["kl_teacher"] == pytest.approx(0.0, abs=1e-6) and teacher["top1_agreement"] == 1.0
    assert (metrics["perplexity"] - metrics["ce"].map(math.exp)).abs().max() < 1e-6
    first_round = metrics[metrics["round"] == 0].set_index("model")
    # One trained member: the ensemble is the student.
    assert first_round.loc["ensemble", "ce"] == pytest.approx(first_round.loc["student", "ce"], rel=1e-6)
    assert first_round.loc["student", "ce"] < first_round.loc["student_untrained", "ce"]

    train_log = pd.read_csv(run_dir / "train_log.csv")
    assert list(train_log.columns) == ["round", "step", "hybrid", "kl", "nll", "learning_rate", "grad_norm",
                                       "grad_norm_kl", "grad_norm_nll", "epoch", *EVALUATION_LOG_COLUMNS]
    assert list(train_log["round"]) == [0, 0, 0, 1, 1, 1] and list(train_log["step"]) == [1, 2, 3, 1, 2, 3]
    assert train_log.drop(columns=EVALUATION_LOG_COLUMNS).notna().all().all()
    assert train_log[EVALUATION_LOG_COLUMNS].isna().all().all()  # no early stopping: nothing held out is scored
    assert (train_log[["grad_norm_kl", "grad_norm_nll"]] > 0).all().all()

    ensemble = ModelEnsemble.from_pretrained(run_dir / "ensemble")
    assert len(ensemble) == 2 and ensemble.config.combine == "logits"
    assert "Metrics on the held-out split" in result.stdout and "2 member(s): ensemble" in result.stdout


def test_resume_skips_finished_rounds_and_adds_new_ones(tiny_teacher_dir, tmp_path):
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--total_rounds", "1")) == 0
    run_dir = only_run_dir(tmp_path)
    first = pd.read_csv(run_dir / "metrics.csv")
    leftover = run_dir / "checkpoints" / "round_0" / "checkpoint-2"  # as if killed just after the manifest write
    leftover.mkdir(parents=True)
    assert main.main(["--resume", str(run_dir), "--total_rounds", "2"]) == 0
    assert not (run_dir / "checkpoints" / "round_0").exists()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["model"]).count("teacher") == 1  # the teacher is evaluated once per run
    assert len(metrics[metrics["round"] == 0]) == 4 and len(metrics[metrics["round"] == 1]) == 3
    pd.testing.assert_frame_equal(metrics.iloc[: len(first)], first)  # earlier rows untouched
    assert len(ModelEnsemble.from_pretrained(run_dir / "ensemble")) == 2


def test_resume_refuses_a_changed_setting_from_any_source_and_a_non_run_folder(tiny_teacher_dir, tmp_path):
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--total_rounds", "1")) == 0
    run_dir = only_run_dir(tmp_path)
    before = snapshot(run_dir)
    assert {"config.yaml", "manifest.json", "metrics.csv", "train_log.csv"} <= set(before)
    changed = tmp_path / "changed.yaml"
    changed.write_text("alpha: 0.9\n")
    refusals = {
        ("--alpha", "0.9"): "the command line sets alpha = 0.9, but the run was started with alpha = 0.5",
        ("--config", str(changed)): f"--config {changed} sets alpha = 0.9, but the run was started with alpha = 0.5",
        ("--preset", "paper"): "--preset paper sets teacher = 'Qwen/Qwen2.5-7B-Instruct', but the run was started "
                               f"with teacher = '{tiny_teacher_dir}'",
        # Restating the preset the run started from does not add the preset's 2 rounds to it.
        ("--preset", "test"): "--preset test sets total_rounds = 2, but the run was started with total_rounds = 1",
        # The demo preset states no setting, so none conflicts: the preset the run started from is compared.
        ("--preset", "demo"): "--preset demo is given, but the run was started from --preset test",
    }
    for extra, message in refusals.items():
        with pytest.raises(main.config_lib.ConfigError, match="only total_rounds may change") as error:
            main.main(["--resume", str(run_dir), *extra])
        assert message in str(error.value)
        assert snapshot(run_dir) == before
    with pytest.raises(main.config_lib.ConfigError, match="is not a run folder \\(it has no config.yaml\\): pass "
                                                          "the folder of a run, runs/YYYY-MM-DD/run_N, which holds "
                                                          "config.yaml and manifest.json"):
        main.main(["--resume", str(tmp_path)])
    # The same settings restated change nothing: the finished run has nothing left to do.
    same = tmp_path / "same.yaml"
    same.write_text("alpha: 0.5\nsteps_per_round: 3\n")
    assert main.main(["--resume", str(run_dir), "--preset", "test", "--config", str(same), "--total_rounds",
                      "1"]) == 0
    assert snapshot(run_dir) == before
    assert run_dirs(tmp_path) == [run_dir]


def fake_run(tmp_path, rounds: dict, **settings) -> Path:
    """A run folder as a run leaves it (config.yaml and manifest), with the test preset and `settings`."""
    run_dir = tmp_path / "runs" / "2026-01-01" / "run_1"
    run_dir.mkdir(parents=True)
    config = main.config_lib.build_config("test", overrides=settings)
    main.config_lib.save_config(config, run_dir / "config.yaml")
    manifest = run_state.new_manifest(config.fingerprint(), config.seed, config.data_seed, len(rounds))
    manifest["rounds"] = rounds
    manifest["metric_rows"] = {index: [] for index, status in rounds.items() if status == "done"}
    run_state.write_manifest(run_dir, manifest)
    return run_dir


def resolved(*argv) -> main.config_lib.Config:
    config, resume_dir = run_state.resolve_config(main.parse_args(list(argv)))
    assert resume_dir == Path(argv[argv.index("--resume") + 1])  # the folder it resolved, returned, not stored
    return config


def test_resume_may_change_total_rounds_down_to_the_rounds_it_has_started(tmp_path):
    run_dir = fake_run(tmp_path, {"0": "done", "1": "training", "2": "pending"}, total_rounds=3)
    before = snapshot(run_dir)
    with pytest.raises(main.config_lib.ConfigError, match="total_rounds = 1, but the run has started 2 rounds; "
                                                          "give at least 2"):
        main.main(["--resume", str(run_dir), "--total_rounds", "1"])
    assert snapshot(run_dir) == before
    assert resolved("--resume", str(run_dir), "--total_rounds", "2").total_rounds == 2
    grown = resolved("--resume", str(run_dir), "--total_rounds", "5")
    assert grown == main.config_lib.build_config("test", overrides={"total_rounds": 5})  # nothing else changes
    with pytest.raises(main.config_lib.ConfigError, match="--preset test sets total_rounds = 2, but the run was "
                                                          "started with total_rounds = 3"):
        resolved("--resume", str(run_dir), "--preset", "test")  # a preset's total is compared, not taken


@pytest.mark.parametrize("baseline", ["single_matched", "single_large"])
def test_resume_refuses_a_new_total_rounds_for_a_single_model_baseline(tmp_path, baseline):
    run_dir = fake_run(tmp_path, {"0": "training"}, baseline=baseline)
    before = snapshot(run_dir)
    with pytest.raises(main.config_lib.ConfigError, match=f"total_rounds cannot change for the {baseline} "
                                                          "baseline: it sets the step count"):
        main.main(["--resume", str(run_dir), "--total_rounds", "3"])
    assert snapshot(run_dir) == before
    assert resolved("--resume", str(run_dir), "--total_rounds", "2").total_rounds == 2  # unchanged: fine


BAD_SETTINGS = {
    "an unknown key": (["--alpah", "1"], "unknown config key(s) 'alpah' in the command line"),
    "an abbreviated key": (["--lr", "0.001"], "unknown config key(s) 'lr' in the command line"),
    "an unknown preset": (["--preset", "huge"], "unknown preset 'huge': choose one of demo, paper, study, test"),
    "an unknown key in a YAML file": (["--config", "{yaml}"], "unknown config key(s) 'alpah' in config file "
                                                              "'{yaml}'"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_settings_are_refused_before_any_run_folder_changes(tiny_teacher_dir, tmp_path, existing_run, case):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("alpha: 0.5\nalpah: 1\n")
    extra, message = BAD_SETTINGS[case]
    extra = [arg.format(yaml=yaml_file) for arg in extra]
    args = cli_args(tiny_teacher_dir, tmp_path, *extra)
    if "--preset" in extra:  # the one given last would count: leave out cli_args' own
        del args[:2]
    with pytest.raises(main.config_lib.ConfigError) as error:
        main.main(args)
    assert message.format(yaml=yaml_file) in str(error.value)
    assert snapshot(tmp_path / "runs") == existing_run
    assert [p.name for p in run_dirs(tmp_path)] == ["run_1"]


def test_bad_config_stops_with_a_message_and_no_run_folder(tiny_teacher_dir, tmp_path):
    result = subprocess.run([sys.executable, "main.py", *cli_args(tiny_teacher_dir, tmp_path, "--alpha", "3")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "config key 'alpha' = 3.0 must lie in [0, 1]" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_dry_run_prints_the_paper_plan_without_loading_anything(capsys):
    assert main.main(["--preset", "paper", "--dry_run"]) == 0
    plan = capsys.readouterr().out
    assert "Qwen/Qwen2.5-7B-Instruct" in plan and "Qwen/Qwen2.5-0.5B-Instruct" in plan
    assert "allenai/tulu-3-sft-mixture (200000 conversations, 2000 held out, max 1024 tokens)" in plan


def final_metrics(tmp_path) -> pd.DataFrame:
    return pd.read_csv(only_run_dir(tmp_path) / "metrics.csv").set_index(["round", "model"])


@pytest.mark.parametrize("cache_args", [
    ["--teacher_mode", "topk", "--cache_k", "400", "--cache_value_dtype", "float16"],  # k = the whole vocabulary
    ["--teacher_mode", "hidden"],
])
def test_a_cached_teacher_trains_like_the_online_teacher(tiny_teacher_dir, tmp_path, cache_args, monkeypatch):
    """...with only its output head in the rounds (its body, loaded to build the caches, is let go), and a second
    run on the same caches never loads the teacher's weights beyond its head."""
    assert main.main(cli_args(tiny_teacher_dir, tmp_path / "online")) == 0
    real_rounds_teacher = teacher_lib.rounds_teacher
    rounds_teachers = []
    monkeypatch.setattr(teacher_lib, "rounds_teacher",
                        lambda *args: rounds_teachers.append(real_rounds_teacher(*args)) or rounds_teachers[-1])
    assert main.main(cli_args(tiny_teacher_dir, tmp_path / "cached", *cache_args)) == 0
    assert isinstance(rounds_teachers[0], OutputHeadOnly)  # running its body would raise
    real_load_causal_lm = utils.load_causal_lm
    monkeypatch.setattr(utils, "load_causal_lm", lambda name, *args, **kwargs: pytest.fail(f"{name} was loaded")
                        if name == str(tiny_teacher_dir) else real_load_causal_lm(name, *args, **kwargs))
    assert main.main(cli_args(tiny_teacher_dir, tmp_path / "cached", *cache_args,  # the same caches, a new folder
                              "--output_root", str(tmp_path / "again" / "runs"))) == 0
    assert final_metrics(tmp_path / "again")["ce"].equals(final_metrics(tmp_path / "cached")["ce"])
    online, cached = final_metrics(tmp_path / "online"), final_metrics(tmp_path / "cached")
    assert list(cached.index) == list(online.index)
    # gap_closed divides by the tiny teacher's small gap: it follows from ce, compared here.
    compared = ["ce", "perplexity", "kl_teacher", "top1_agreement", "ece", "diversity", "num_tokens"]
    pd.testing.assert_frame_equal(cached[compared], online[compared], rtol=1e-3)
    # The training losses are the sharper check: a top-k cache with k < V gives a KL an order of magnitude off.
    online_log, cached_log = (pd.read_csv(only_run_dir(tmp_path / name) / "train_log.csv")
                              for name in ("online", "cached"))
    for column in ("hybrid", "kl", "nll"):
        pd.testing.assert_series_equal(cached_log[column], online_log[column], rtol=1e-3)
    (cache_dir,) = (tmp_path / "cached" / "cache" / "teacher_cache").iterdir()
    assert (cache_dir / "metadata.json").is_file()
    (test_cache_dir,) = (tmp_path / "cached" / "cache" / "teacher_eval_cache").iterdir()
    assert json.loads((test_cache_dir / "metadata.json").read_text())["mode"] == "hidden"


# --- surviving interruption ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_two_processes_give_the_run_of_one_process(tiny_teacher_dir, tmp_path, checkpointing):
    """accelerate launch on 2 processes x 1 micro-batch = 1 process x 2 micro-batches (the same global batches): the
    same training log and the same metrics (evaluation scores each of the 7 test examples once, split 4 + 3), in
    one run folder written by the main process; both processes build the teacher cache, one shard each. With
    gradient checkpointing too (the paper preset's): recomputed activations under DDP, next to the frozen members'
    single-position (logits_to_keep=1) forwards, must give the same steps."""
    common = ("--teacher_mode", "topk", "--cache_k", "400", "--cache_value_dtype", "float16", "--test_size", "7",
              "--gradient_checkpointing", checkpointing)
    accelerate_launch(["main.py", *cli_args(tiny_teacher_dir, tmp_path / "two", *common)], 2, REPO)
    assert main.main(cli_args(tiny_teacher_dir, tmp_path / "one", *common, "--grad_accum", "2")) == 0
    (cache_dir,) = (tmp_path / "two" / "cache" / "teacher_cache").iterdir()
    assert sorted(p.name for p in cache_dir.glob("shard_*")) == ["shard_00000", "shard_00001"]
    two, one = final_metrics(tmp_path / "two"), final_metrics(tmp_path / "one")
    assert (two["num_tokens"] == one["num_tokens"]).all()
    pd.testing.assert_frame_equal(two.drop(columns=["seconds", "gap_closed"]), one.drop(columns=["seconds", "gap_closed"]),
                                  rtol=1e-4)  # gap_closed follows from ce, with the tiny teacher's small gap below
    logs = [pd.read_csv(only_run_dir(tmp_path / name) / "train_log.csv") for name in ("two", "one")]
    assert len(logs[0]) == len(logs[1]) == 6  # written once, by the main process
    pd.testing.assert_frame_equal(logs[0][["round", "step", "hybrid", "kl", "nll"]],
                                  logs[1][["round", "step", "hybrid", "kl", "nll"]], rtol=1e-4)
    assert len(ModelEnsemble.from_pretrained(only_run_dir(tmp_path / "two") / "ensemble")) == 2


RESUMABLE = ("--total_rounds", "2", "--steps_per_round", "6")


def start_run(tiny_teacher_dir, tmp_path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "main.py", *cli_args(tiny_teacher_dir, tmp_path, *RESUMABLE)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def resume_until_done(run_dir: Path) -> None:
    result = subprocess.run([sys.executable, "main.py", "--resume", str(run_dir)], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def wait_for(process: subprocess.Popen, condition, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before the moment to kill it: {process.stderr.read()[-2000:]}"
        assert time.time() < deadline, "timed out waiting for the moment to kill the run"
        time.sleep(0.01)


def pause_at(process: subprocess.Popen, moment, timeout: float = 300.0) -> None:
    """Stop the process (SIGSTOP) at a moment when `moment()` holds. The run may move past the moment between a
    check and the stop: it is then let go on and stopped again the next time the moment comes."""
    deadline = time.time() + timeout
    while True:
        wait_for(process, moment, deadline - time.time())
        process.send_signal(signal.SIGSTOP)
        while Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            time.sleep(0.001)  # the stop lands asynchronously
        if moment():
            return
        process.send_signal(signal.SIGCONT)


def run_dirs(tmp_path) -> list[Path]:
    return sorted((tmp_path / "runs").glob("*/run_*"))


def train_log_rows(tmp_path) -> int:
    dirs = run_dirs(tmp_path)
    path = dirs[0] / "train_log.csv" if dirs else None
    return len(path.read_text().splitlines()) - 1 if path and path.is_file() else 0


def partial_checkpoint_exists(tmp_path) -> bool:
    dirs = run_dirs(tmp_path)
    return bool(dirs) and any(not (c / "trainer_state.json").exists()
                              for c in (dirs[0] / "checkpoints").glob("round_*/checkpoint-*"))


def round_status(tmp_path, round_index) -> str | None:
    dirs = run_dirs(tmp_path)
    manifest = dirs[0] / "manifest.json" if dirs else None
    if not (manifest and manifest.is_file()):
        return None
    return json.loads(manifest.read_text())["rounds"].get(str(round_index))


def round_done(tmp_path, round_index) -> bool:
    return round_status(tmp_path, round_index) == "done"


def member_saved(tmp_path, round_index) -> bool:
    dirs = run_dirs(tmp_path)
    return bool(dirs) and (dirs[0] / "ensemble" / f"member_{round_index}" / "config.json").exists()


def checkpoint_started(tmp_path, round_index) -> bool:
    dirs = run_dirs(tmp_path)
    return bool(dirs) and any((dirs[0] / "checkpoints" / f"round_{round_index}").glob("checkpoint-*"))


KILL_MOMENTS = {  # each moment as the run folder shows it
    "during training": lambda tmp_path: (round_status(tmp_path, 0) == "training" and train_log_rows(tmp_path) >= 2
                                         and not member_saved(tmp_path, 0)),
    "during a checkpoint write": partial_checkpoint_exists,
    "during evaluation": lambda tmp_path: member_saved(tmp_path, 0) and not round_done(tmp_path, 0),
    "between rounds": lambda tmp_path: round_done(tmp_path, 0) and not checkpoint_started(tmp_path, 1),
}


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_teacher_dir, tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, *RESUMABLE)) == 0
    return only_run_dir(tmp_path)


TRAIN_LOG_COMPARED = ["hybrid", "kl", "nll", "learning_rate", "grad_norm"]


def assert_same_finished_run(tmp_path, reference_dir: Path) -> None:
    (run_dir,) = run_dirs(tmp_path)
    metrics = final_metrics(tmp_path)
    reference = pd.read_csv(reference_dir / "metrics.csv").set_index(["round", "model"])
    assert not metrics.index.duplicated().any()
    assert list(metrics.index) == list(reference.index)  # every round, every model, once
    pd.testing.assert_frame_equal(metrics.drop(columns=["seconds", "gap_closed"]),
                                  reference.drop(columns=["seconds", "gap_closed"]), rtol=1e-4, atol=1e-3)
    # gap_closed divides CE differences by the tiny teacher's small gap, so CPU rounding noise of 1e-5 in a CE
    # (seen in CI after a resume) shows as 1e-3 there: compared to what the CE tolerance implies.
    pd.testing.assert_series_equal(metrics["gap_closed"], reference["gap_closed"], rtol=0, atol=1e-2)
    train_log = pd.read_csv(run_dir / "train_log.csv")
    assert list(zip(train_log["round"], train_log["step"])) == [(r, s) for r in (0, 1) for s in range(1, 7)]
    # Resumed steps see the same batches, RNG and schedule as uninterrupted ones: the same losses, rates, norms.
    pd.testing.assert_frame_equal(train_log[TRAIN_LOG_COMPARED],
                                  pd.read_csv(reference_dir / "train_log.csv")[TRAIN_LOG_COMPARED], rtol=1e-4)
    assert json.loads((run_dir / "manifest.json").read_text())["rounds"] == {"0": "done", "1": "done"}
    assert len(ModelEnsemble.from_pretrained(run_dir / "ensemble")) == 2
    assert not (run_dir / "checkpoints" / "round_0").exists()  # a finished round keeps only its member


@pytest.mark.parametrize("moment", list(KILL_MOMENTS))
def test_sigkill_at_any_moment_then_resume_finishes_the_same_run(tiny_teacher_dir, tmp_path, uninterrupted_run,
                                                                 moment):
    process = start_run(tiny_teacher_dir, tmp_path)
    try:
        pause_at(process, lambda: KILL_MOMENTS[moment](tmp_path))
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert KILL_MOMENTS[moment](tmp_path), f"the run was not killed {moment}"
    (run_dir,) = run_dirs(tmp_path)
    resume_until_done(run_dir)
    assert_same_finished_run(tmp_path, uninterrupted_run)


def test_sigterm_checkpoints_exits_for_requeue_and_resumes(tiny_teacher_dir, tmp_path, uninterrupted_run):
    process = start_run(tiny_teacher_dir, tmp_path)
    wait_for(process, lambda: train_log_rows(tmp_path) >= 2)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGUSR1)  # a second signal at once changes nothing
    assert process.wait(timeout=300) == processes.EXIT_PREEMPTED
    (run_dir,) = run_dirs(tmp_path)
    assert run_state.latest_complete_checkpoint(run_dir / "checkpoints" / "round_0") is not None
    assert json.loads((run_dir / "manifest.json").read_text())["rounds"] == {"0": "training", "1": "pending"}
    resume_until_done(run_dir)
    assert_same_finished_run(tmp_path, uninterrupted_run)


def test_signals_while_the_stop_checkpoint_is_written_change_nothing(tiny_teacher_dir, tmp_path, uninterrupted_run,
                                                                      monkeypatch):
    """SIGTERM at step 2; then SIGUSR1 and SIGTERM again halfway through the checkpoint write it asks for (model and
    optimizer written, RNG state and trainer state not yet). In-process, so the second signals land exactly there."""
    events = []

    class SignalAtStep2(processes.StopOnSignal):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2 and not events:
                os.kill(os.getpid(), signal.SIGTERM)
                events.append("SIGTERM")
            return super().on_step_end(args, state, control, **kwargs)

    class SignalAgainWhileSaving(main.DistillationTrainer):
        def _save_rng_state(self, output_dir):
            if events == ["SIGTERM"]:
                checkpoint = Path(output_dir)
                assert (checkpoint / "model.safetensors").is_file()
                assert not (checkpoint / "trainer_state.json").exists()  # the write is under way
                os.kill(os.getpid(), signal.SIGUSR1)
                os.kill(os.getpid(), signal.SIGTERM)
                events.append(f"SIGUSR1 and SIGTERM while writing {checkpoint.name}")
            super()._save_rng_state(output_dir)

    with monkeypatch.context() as patch:
        patch.setattr(main.processes, "StopOnSignal", SignalAtStep2)
        patch.setattr(main, "DistillationTrainer", SignalAgainWhileSaving)
        assert main.main(cli_args(tiny_teacher_dir, tmp_path, *RESUMABLE)) == processes.EXIT_PREEMPTED
    assert events == ["SIGTERM", "SIGUSR1 and SIGTERM while writing checkpoint-2"]
    run_dir = only_run_dir(tmp_path)
    checkpoints = sorted((run_dir / "checkpoints" / "round_0").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-1", "checkpoint-2"]
    assert all((c / "trainer_state.json").is_file() and (c / "rng_state.pth").is_file() for c in checkpoints)
    assert run_state.latest_complete_checkpoint(run_dir / "checkpoints" / "round_0") == checkpoints[-1]
    assert pd.read_csv(run_dir / "train_log.csv")["step"].tolist() == [1, 2]  # stopped at the step it was asked to
    assert main.main(["--resume", str(run_dir)]) == 0
    assert_same_finished_run(tmp_path, uninterrupted_run)


def test_a_round_killed_after_its_last_checkpoint_is_not_trained_further(tiny_teacher_dir, tmp_path,
                                                                          uninterrupted_run):
    process = start_run(tiny_teacher_dir, tmp_path)
    try:
        wait_for(process, lambda: any((c / "trainer_state.json").exists() for c in
                                      (tmp_path / "runs").glob("*/run_*/checkpoints/round_0/checkpoint-6")))
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    (run_dir,) = run_dirs(tmp_path)
    if not round_done(tmp_path, 0):  # as if killed before the member's save (unless the round raced past that)
        shutil.rmtree(run_dir / "ensemble" / "member_0", ignore_errors=True)
    resume_until_done(run_dir)
    assert_same_finished_run(tmp_path, uninterrupted_run)


METRICS_DAMAGE = {  # what is done to a finished run's metrics.csv, and how the resume's warning describes it
    "cut mid-row": (lambda path: path.write_bytes(path.read_bytes()[:len(path.read_bytes()) * 2 // 3]),
                    "a row is cut short"),
    "emptied": (lambda path: path.write_bytes(b""), "it holds no rows"),
    "overwritten with other bytes of the same size": (
        lambda path: path.write_bytes(b"\x00\xff" * (path.stat().st_size // 2) + b"\xff" * (path.stat().st_size % 2)),
        "it is not CSV text"),
    "deleted": (lambda path: path.unlink(), "it is missing"),
}


@pytest.mark.parametrize("damage", list(METRICS_DAMAGE))
def test_a_damaged_metrics_csv_is_restored_from_the_manifest_before_the_resumed_rounds(tmp_path, uninterrupted_run,
                                                                                       damage, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run_dir)
    path = run_dir / "metrics.csv"
    original = path.read_text()
    with open(path, newline="") as f:
        original_rows = list(csv.DictReader(f))
    spoil, problem = METRICS_DAMAGE[damage]
    spoil(path)
    kept = files.read_csv_rows(path) or []
    lost = [row for row in original_rows if row not in kept]
    assert lost  # the damage lost rows: a resume without the journal could not bring them back
    capsys.readouterr()
    assert main.main(["--resume", str(run_dir), "--total_rounds", "3"]) == 0
    assert (f"warning: {path}: {problem}; rewritten from the rows manifest.json recorded for the finished rounds, "
            "restoring " + ", ".join(f"round {row['round']} {row['model']}" for row in lost) + "\n"
            ) in capsys.readouterr().err
    restored = path.read_text()
    assert restored.startswith(original)  # every earlier row, byte for byte, then the new round's
    metrics = pd.read_csv(path)
    assert list(metrics.loc[metrics["round"] == 2, "model"]) == ["student_untrained", "student", "ensemble"]
    assert len(metrics) == len(original_rows) + 3


def test_resume_refuses_lost_metric_rows_of_a_run_older_than_the_journal(tmp_path, uninterrupted_run, capsys,
                                                                        monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    del manifest["metric_rows"]  # as a run started before manifests kept a journal of metric rows
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    path = run_dir / "metrics.csv"
    path.write_text(path.read_text()[:-20])  # round 1's last row cut short
    before = snapshot(run_dir)
    monkeypatch.setattr(sys, "argv", ["main.py", "--resume", str(run_dir), "--total_rounds", "3"])
    assert main.run_from_command_line() == 2
    assert (f"error: {path}: the rows of round(s) 1 are lost (a row is cut short), and {run_dir / 'manifest.json'} "
            "predates the journal of metric rows that would restore them. Restore metrics.csv from a copy, or "
            "recompute them in a new run with this run's settings (`python main.py --config "
            f"{run_dir / 'config.yaml'}`); nothing was changed\n") in capsys.readouterr().err
    assert snapshot(run_dir) == before
    path.unlink()
    with pytest.raises(main.config_lib.ConfigError, match="the rows of round\\(s\\) 0, 1 are lost \\(it is missing\\)"):
        main.main(["--resume", str(run_dir)])


class StopAtStep(processes.StopOnSignal):
    """A preemption signal (as the handler records it) at the end of global step `step`."""

    step = 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.preemption.received = signal.SIGUSR1
        return super().on_step_end(args, state, control, **kwargs)


def stop_at_step(step: int) -> type:
    return type(f"StopAtStep{step}", (StopAtStep,), {"step": step})


def test_a_grown_total_rounds_is_kept_by_later_resumes_and_the_manifest_tracks_every_round(
        tiny_teacher_dir, tmp_path, monkeypatch):
    """The manifest lists every planned round (pending, training, done), the members, the config's fingerprint and
    the data seed. `--resume --total_rounds 3`, preempted, then a plain `--resume`: all 3 rounds, not 2. Every
    model a resume loads is loaded with the run's trust_remote_code."""
    def manifest():
        return json.loads((run_dir / "manifest.json").read_text())

    def saved_config():
        return main.config_lib.load_saved_config(run_dir / "config.yaml")

    with monkeypatch.context() as patch:
        patch.setattr(main.processes, "StopOnSignal", stop_at_step(2))
        assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--seed", "7", "--trust_remote_code", "true")) == 75
    run_dir = only_run_dir(tmp_path)
    assert manifest() == {"config_fingerprint": saved_config().fingerprint(), "seed": 7, "data_seed": 0,
                          "job_id": None, "config": saved_config().to_dict(), "preset": "test",
                          "rounds": {"0": "training", "1": "pending"}, "members": [], "teacher_evaluated": False,
                          "examples": {"train": 32, "test": 8}}  # no early-stopping split in this run

    loads = []
    real_load = main.utils.load_causal_lm

    def recording_load(name, dtype=main.torch.float32, trust_remote_code=False, device=None):
        loads.append((Path(name).name, trust_remote_code))
        return real_load(name, dtype, trust_remote_code, device)

    monkeypatch.setattr(main.utils, "load_causal_lm", recording_load)
    with monkeypatch.context() as patch:
        patch.setattr(main.processes, "StopOnSignal", stop_at_step(1))  # round 1's first step (round 0 resumes at 2)
        assert main.main(["--resume", str(run_dir), "--total_rounds", "3"]) == 75
    assert saved_config().total_rounds == 3
    assert manifest()["config_fingerprint"] == saved_config().fingerprint()
    assert manifest()["rounds"] == {"0": "done", "1": "training", "2": "pending"}
    assert manifest()["members"] == ["ensemble/member_0"]

    assert main.main(["--resume", str(run_dir)]) == 0
    assert manifest()["rounds"] == {"0": "done", "1": "done", "2": "done"}
    assert manifest()["members"] == ["ensemble/member_0", "ensemble/member_1", "ensemble/member_2"]
    assert manifest()["seed"] == 7 and manifest()["config_fingerprint"] == saved_config().fingerprint()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert sorted(set(metrics["round"])) == [0, 1, 2] and not metrics.duplicated(["round", "model"]).any()
    assert len(ModelEnsemble.from_pretrained(run_dir / "ensemble")) == 3
    assert ("member_0", True) in loads and all(trust for _, trust in loads)


def test_a_signal_during_setup_stops_before_anything_is_written(tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    """SIGTERM while the data is prepared: exit 75 with no new run folder, and a resumed run's folder untouched
    (its grown total_rounds not yet written). main() puts back the SIGTERM handler it found."""
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--total_rounds", "1")) == 0
    run_dir = only_run_dir(tmp_path)
    before = snapshot(tmp_path / "runs")
    real_prepare_for_run = main.preprocess_dataset.prepare_for_run

    def prepare_data_then_signal(config, tokenizer):
        prepared = real_prepare_for_run(config, tokenizer)
        os.kill(os.getpid(), signal.SIGTERM)
        return prepared

    monkeypatch.setattr(main.preprocess_dataset, "prepare_for_run", prepare_data_then_signal)
    signals_main_missed = []

    def test_handler(signum, frame):
        signals_main_missed.append(signum)

    previous = signal.signal(signal.SIGTERM, test_handler)
    try:
        for command in (cli_args(tiny_teacher_dir, tmp_path, "--total_rounds", "1"),
                        ["--resume", str(run_dir), "--total_rounds", "2"]):
            assert main.main(command) == processes.EXIT_PREEMPTED
            assert "preempted during setup" in capsys.readouterr().out
            assert signal.getsignal(signal.SIGTERM) is test_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert signals_main_missed == []
    assert run_dirs(tmp_path) == [run_dir] and snapshot(tmp_path / "runs") == before


def test_a_disk_that_fills_up_mid_round_stops_before_the_next_checkpoint(tiny_teacher_dir, tmp_path, monkeypatch):
    """Free space runs out once checkpoint-1 is written: step 2's checkpoint is refused before it starts, with the
    bytes one checkpoint needs, and the run continues from checkpoint-1 once there is room again."""
    real_disk_usage = shutil.disk_usage

    def disk_full_after_checkpoint_1(path):
        usage = real_disk_usage(path)
        full = any(tmp_path.glob("runs/*/run_*/checkpoints/round_0/checkpoint-1/trainer_state.json"))
        return usage._replace(free=1000) if full else usage

    with monkeypatch.context() as patch:
        patch.setattr(files.shutil, "disk_usage", disk_full_after_checkpoint_1)
        with pytest.raises(files.DiskSpaceError) as error:
            main.main(cli_args(tiny_teacher_dir, tmp_path, "--total_rounds", "1"))
    run_dir = only_run_dir(tmp_path)
    checkpoint_1 = run_dir / "checkpoints" / "round_0" / "checkpoint-1"
    assert str(error.value).startswith(f"{run_dir}: 1,000 bytes free, but about ")
    assert " bytes are needed for the checkpoint of step 2; " in str(error.value)
    assert folder_bytes(checkpoint_1) <= needed_bytes(str(error.value)) < 1.5 * folder_bytes(checkpoint_1)
    assert f"python main.py --resume {run_dir}" in str(error.value)
    assert sorted(p.name for p in checkpoint_1.parent.glob("checkpoint-*")) == ["checkpoint-1"]
    assert run_state.latest_complete_checkpoint(checkpoint_1.parent) == checkpoint_1
    assert json.loads((run_dir / "manifest.json").read_text())["rounds"] == {"0": "training"}
    assert main.main(["--resume", str(run_dir)]) == 0
    assert pd.read_csv(run_dir / "train_log.csv")["step"].tolist() == [1, 2, 3]


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir())


def needed_bytes(message: str) -> int:
    """The bytes a disk error says are needed."""
    return int(re.search(r"about ([0-9,]+) bytes are needed", message).group(1).replace(",", ""))


def no_space_in(part: str, write):
    """`write`, failing as a full disk does (OSError ENOSPC) when its path has `part` in it."""
    def writer(obj, path, *args, **kwargs):
        if part in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write(obj, path, *args, **kwargs)
    return writer


def test_a_disk_that_fills_up_during_a_checkpoint_write_exits_2_and_the_earlier_checkpoint_resumes(
        tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", no_space_in(f"checkpoint-2{os.sep}optimizer.pt", torch.save))
        patch.setattr(sys, "argv", ["main.py", *cli_args(tiny_teacher_dir, tmp_path, "--total_rounds", "1")])
        assert main.run_from_command_line() == 2
    run_dir = only_run_dir(tmp_path)
    checkpoints = run_dir / "checkpoints" / "round_0"
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bars
    assert error.startswith(f"error: {checkpoints}: the disk is full: writing the checkpoint of step 2 failed ([Errno "
                            f"28] No space left on device: '{checkpoints / 'checkpoint-2' / 'optimizer.pt'}'); about ")
    written = folder_bytes(checkpoints / "checkpoint-1")  # one checkpoint: the estimate holds it
    assert written <= needed_bytes(error) < 1.5 * written
    assert (checkpoints / "checkpoint-2" / "model.safetensors").is_file()  # half written: not taken
    assert run_state.latest_complete_checkpoint(checkpoints) == checkpoints / "checkpoint-1"
    assert main.main(["--resume", str(run_dir)]) == 0
    assert pd.read_csv(run_dir / "train_log.csv")["step"].tolist() == [1, 2, 3]


def test_a_disk_that_fills_up_while_the_member_is_saved_exits_2_and_the_checkpoints_resume(
        tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils

    with monkeypatch.context() as patch:
        patch.setattr(transformers.modeling_utils, "safe_save_file",
                      no_space_in("member_0.tmp", transformers.modeling_utils.safe_save_file))
        patch.setattr(sys, "argv", ["main.py", *cli_args(tiny_teacher_dir, tmp_path, "--total_rounds", "1")])
        assert main.run_from_command_line() == 2
    run_dir = only_run_dir(tmp_path)
    checkpoint = run_dir / "checkpoints" / "round_0" / "checkpoint-3"
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bars
    assert error.startswith(f"error: {run_dir / 'ensemble'}: the disk is full: writing member_0 failed ([Errno 28] No "
                            f"space left on device: '{run_dir / 'ensemble' / 'member_0.tmp' / 'model.safetensors'}'); "
                            "about ")
    assert not (run_dir / "ensemble" / "member_0").exists()
    assert run_state.latest_complete_checkpoint(checkpoint.parent) == checkpoint
    assert main.main(["--resume", str(run_dir)]) == 0
    assert pd.read_csv(run_dir / "train_log.csv")["step"].tolist() == [1, 2, 3]  # saved from it, not trained again
    written = folder_bytes(run_dir / "ensemble" / "member_0")  # the member, once there was room: the estimate holds it
    assert written <= needed_bytes(error) < 1.5 * written


def test_a_damaged_newest_checkpoint_is_passed_over_by_name_and_the_round_resumes_from_the_intact_one(
        tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    """Checkpoint-2's weights overwritten with other bytes of the same size would load without a word (wrong)."""
    with monkeypatch.context() as patch:
        patch.setattr(main.processes, "StopOnSignal", stop_at_step(2))
        assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--total_rounds", "1")) == processes.EXIT_PREEMPTED
    run_dir = only_run_dir(tmp_path)
    weights = run_dir / "checkpoints" / "round_0" / "checkpoint-2" / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[:-64] + bytes(64))
    capsys.readouterr()
    assert main.main(["--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"warning: {weights}: holds {len(intact):,} bytes with sha256 " in out
    assert "round 0: resuming from checkpoint-1" in out
    assert pd.read_csv(run_dir / "train_log.csv")["step"].tolist() == [1, 2, 3]


def test_a_damaged_member_is_refused_by_name_and_once_deleted_is_saved_again(tiny_teacher_dir, tmp_path,
                                                                             monkeypatch):
    """Killed after round 0's member was saved, before the round was recorded: a damaged member is refused naming
    the file, and once deleted the resume saves it again from the round's last checkpoint, training no step more.
    A finished round's member is refused too, before anything is rewritten: later rounds trained with it."""
    with monkeypatch.context() as patch:
        patch.setattr(main, "record_round", lambda *args: (_ for _ in ()).throw(SystemExit("killed")))
        with pytest.raises(SystemExit, match="killed"):
            main.main(cli_args(tiny_teacher_dir, tmp_path, "--total_rounds", "1"))
    run_dir = only_run_dir(tmp_path)
    member = run_dir / "ensemble" / "member_0"
    (member / "tokenizer.json").write_text("{}")
    with pytest.raises(main.config_lib.ConfigError) as error:
        main.main(["--resume", str(run_dir)])
    assert str(error.value).startswith(f"{member / 'tokenizer.json'}: holds 2 bytes, but ")
    assert str(error.value).endswith(f"{member} is damaged and nothing was loaded from it; delete it, and --resume "
                                     "saves round 0's member again from its checkpoints")
    shutil.rmtree(member)
    assert main.main(["--resume", str(run_dir)]) == 0
    assert pd.read_csv(run_dir / "train_log.csv")["step"].tolist() == [1, 2, 3]

    weights = member / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    before = snapshot(run_dir)
    with pytest.raises(main.config_lib.ConfigError) as error:
        main.main(["--resume", str(run_dir), "--total_rounds", "2"])
    assert str(error.value).startswith(f"{weights}: holds ")
    assert "later rounds were trained with it: restore it from a copy" in str(error.value)
    assert snapshot(run_dir) == before


def test_damaged_best_weights_are_refused_by_name_and_the_round_trains_again_once_its_checkpoints_go(
        tiny_teacher_dir, tmp_path, monkeypatch):
    settings = (*EARLY_STOPPING, "--early_stopping_min_delta", "1")
    with monkeypatch.context() as patch:  # the plateau's checkpoint is written, then the process dies
        patch.setattr(main, "saved_member", lambda *args: (_ for _ in ()).throw(SystemExit("killed")))
        with pytest.raises(SystemExit, match="killed"):
            main.main(cli_args(tiny_teacher_dir, tmp_path, *settings))
    run_dir = only_run_dir(tmp_path)
    weights = RunLayout(run_dir).best(0) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(main.config_lib.ConfigError) as error:
        main.main(["--resume", str(run_dir)])
    checkpoints = run_dir / "checkpoints" / "round_0"
    assert str(error.value).startswith(f"{weights}: holds 100 bytes, but ")
    assert str(error.value).endswith(f"round 0's best weights are lost: delete {checkpoints}, and --resume trains "
                                     "the round again")
    shutil.rmtree(checkpoints)
    assert main.main(["--resume", str(run_dir)]) == 0
    assert list(pd.read_csv(run_dir / "train_log.csv")["step"]) == [1, 2]  # no step beats the start: patience 2


def test_a_round_stopped_by_non_finite_steps_keeps_a_good_checkpoint_and_resumes(tiny_teacher_dir, tmp_path,
                                                                               monkeypatch):
    """From step 3 on the loss is NaN: steps 3-5 are skipped and the round stops; a complete checkpoint with finite
    weights is kept, the round stays "training", and --resume finishes the run."""

    class NaNFromStep3(main.DistillationTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss * float("nan") if self.state.global_step >= 2 else loss

    args = cli_args(tiny_teacher_dir, tmp_path, "--total_rounds", "1", "--steps_per_round", "6")
    with monkeypatch.context() as patch:
        patch.setattr(main, "DistillationTrainer", NaNFromStep3)
        with pytest.raises(main.NonFiniteLossError, match="round 0: 3 non-finite steps in a row up to step 5"):
            main.main(args)
    run_dir = only_run_dir(tmp_path)
    checkpoint = run_state.latest_complete_checkpoint(run_dir / "checkpoints" / "round_0")
    assert checkpoint is not None
    assert all(t.isfinite().all() for t in load_file(checkpoint / "model.safetensors").values())
    assert json.loads((run_dir / "manifest.json").read_text())["rounds"] == {"0": "training"}
    assert main.main(["--resume", str(run_dir)]) == 0
    assert json.loads((run_dir / "manifest.json").read_text())["rounds"] == {"0": "done"}
    assert pd.read_csv(run_dir / "train_log.csv")["step"].max() == 6


# --- bad input: a clear error before any work, and nothing already written is lost -------------------------------

def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def existing_run(tmp_path):
    """A run folder from earlier today that no refused command may touch."""
    run_dir = tmp_path / "runs" / time.strftime("%Y-%m-%d") / "run_1"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text("round,model,ce\n0,student,1.0\n")
    return snapshot(tmp_path / "runs")


def jsonl_text(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


BAD_DATA = {  # file name, its text (None: no file), what the message says
    "a missing path": ("missing.jsonl", None, "no such file"),
    "an empty file": ("empty.jsonl", "", "holds no conversations"),
    "an empty list": ("empty.json", "[]\n", "holds no conversations"),
    "no conversations": ("bad.jsonl", jsonl_text([{"text": "hello"}] * 20),
                         "no 'messages' (role/content turns) or 'conversations'"),
    "an unknown role": ("bad.jsonl", jsonl_text([{"messages": [{"role": "robot", "content": "beep"}]}] * 20),
                        "unknown role value(s) ['robot']"),
    "no assistant turn": ("bad.jsonl", jsonl_text([{"messages": [{"role": "user", "content": "hi"}]}] * 20),
                          "no example is left"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_refused_before_any_run_folder_changes(tiny_teacher_dir, tmp_path, existing_run, case):
    name, text, message = BAD_DATA[case]
    dataset = tmp_path / name
    if text is not None:
        dataset.write_text(text)
    args = cli_args(tiny_teacher_dir, tmp_path)
    args[args.index("--dataset") + 1] = str(dataset)
    with pytest.raises(main.preprocess_dataset.DataError, match=f"{dataset}") as error:
        main.main(args)
    assert message in str(error.value)
    assert snapshot(tmp_path / "runs") == existing_run


def refused_from_the_command_line(monkeypatch, capsys, argv: list[str]) -> str:
    """main.py's message for `argv`, which it must refuse as bad input (exit code 2) before loading any weights: the
    last line it writes to stderr, without a traceback."""
    refuse_to_load_weights(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["main.py", *argv])
    assert main.run_from_command_line() == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_a_malformed_jsonl_file_is_refused_naming_its_first_bad_line(tiny_teacher_dir, tmp_path, monkeypatch,
                                                                     capsys):
    lines = (DATA_DIR / "chats.jsonl").read_text().splitlines()
    dataset = tmp_path / "chats.jsonl"
    dataset.write_text("\n".join([*lines[:6], lines[6][:-10], *lines[7:], "not json"]) + "\n")  # line 7 cut short
    args = cli_args(tiny_teacher_dir, tmp_path)
    args[args.index("--dataset") + 1] = str(dataset)
    assert refused_from_the_command_line(monkeypatch, capsys, args) == (
        f"error: {dataset}: invalid JSON at line 7 (Unterminated string starting at: column 130). Fix or remove that "
        "line: each record must be a JSON object (one per line in a .jsonl file).")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("key", ["teacher", "student_model"])
def test_a_model_folder_that_does_not_exist_is_refused_before_anything_loads(tiny_teacher_dir, tmp_path, monkeypatch,
                                                                             capsys, key):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    # Both look like paths: the first starts with "/"; "models/student" is no hub name, as "models" is a folder here.
    missing = {"teacher": str(tmp_path / "models" / "teacher"), "student_model": "models/student"}[key]
    args = cli_args(tiny_teacher_dir, tmp_path, "--student_init", "pretrained", "--student_model",
                    str(tiny_teacher_dir))
    args[args.index(f"--{key}") + 1] = missing
    assert (f"error: config key {key!r} = {missing!r}: no such folder. Give the folder of a saved model (its "
            "config.json, weights and tokenizer) or a hub name (owner/name)"
            ) == refused_from_the_command_line(monkeypatch, capsys, args)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


FITS_TEACHER = {  # settings the tiny teacher (400 tokens, 2 layers) cannot meet, and the message
    "cache_k above the vocabulary": (["--teacher_mode", "topk", "--cache_k", "401"],
                                     "config key 'cache_k' = 401 is more than the teacher's vocabulary of 400 "
                                     "tokens: give at most 400"),
    "teacher_layers out of range": (["--student_init", "teacher_layers", "--teacher_layers", "0,2"],
                                    "config key 'teacher_layers' = [0, 2] names layer(s) [2] outside the teacher's 2 "
                                    "layers: give indices from 0 to 1"),
}


@pytest.mark.parametrize("case", list(FITS_TEACHER))
def test_settings_the_teacher_cannot_meet_are_refused_before_the_data_and_its_weights(tiny_teacher_dir, tmp_path,
                                                                                      monkeypatch, capsys, case):
    extra, message = FITS_TEACHER[case]
    assert f"error: {message}" == refused_from_the_command_line(monkeypatch, capsys,
                                                                  cli_args(tiny_teacher_dir, tmp_path, *extra))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache" / "datasets").exists()


def test_nothing_left_after_truncation_is_refused(tiny_teacher_dir, tmp_path, existing_run):
    with pytest.raises(main.preprocess_dataset.DataError, match="Raise --max_length"):
        main.main(cli_args(tiny_teacher_dir, tmp_path, "--max_length", "8"))
    assert snapshot(tmp_path / "runs") == existing_run


def test_a_student_with_another_tokenizer_is_refused(tiny_teacher_dir, tmp_path, existing_run):
    student_dir = tmp_path / "student"
    other = build_tokenizer("llama3")
    build_tiny_llama(other).save_pretrained(student_dir)
    other.save_pretrained(student_dir)
    with pytest.raises(main.utils.TokenizerMismatchError, match="have different tokenizers"):
        main.main(cli_args(tiny_teacher_dir, tmp_path, "--student_init", "pretrained", "--student_model",
                           str(student_dir)))
    assert snapshot(tmp_path / "runs") == existing_run


def test_a_teacher_cache_built_for_other_settings_is_refused(tiny_teacher_dir, tmp_path):
    cache_args = ("--teacher_mode", "topk", "--cache_k", "8", "--total_rounds", "1")
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, *cache_args)) == 0
    (cache_dir,) = (tmp_path / "cache" / "teacher_cache").iterdir()
    metadata = json.loads((cache_dir / "metadata.json").read_text())
    metadata["temperature"] = 2.0  # as if built for another temperature
    (cache_dir / "metadata.json").write_text(json.dumps(metadata))
    before = snapshot(tmp_path / "runs")
    with pytest.raises(main.teacher_cache.CacheMismatchError, match="temperature = 2.0, but this run wants "
                                                                     "temperature = 1.0"):
        main.main(cli_args(tiny_teacher_dir, tmp_path, *cache_args))
    assert snapshot(tmp_path / "runs") == before


def test_not_enough_disk_is_refused_before_a_run_folder_exists(tiny_teacher_dir, tmp_path, existing_run,
                                                               monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(files.DiskSpaceError, match="1,000 bytes free, but about [0-9,]+ bytes are needed for "
                                                       "a round's checkpoints, best weights and member"):
        main.main(cli_args(tiny_teacher_dir, tmp_path))
    assert snapshot(tmp_path / "runs") == existing_run


def test_a_new_run_never_overwrites_an_existing_folder(tiny_teacher_dir, tmp_path, existing_run):
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--total_rounds", "1")) == 0
    day = tmp_path / "runs" / time.strftime("%Y-%m-%d")
    assert sorted(p.name for p in day.iterdir()) == ["run_1", "run_2"]
    assert {k: v for k, v in snapshot(tmp_path / "runs").items() if "run_1" in k} == existing_run


def test_resume_of_a_folder_that_never_finished_setup_is_refused(tmp_path):
    run_dir = tmp_path / "runs" / "2026-01-01" / "run_1"
    run_dir.mkdir(parents=True)
    main.config_lib.save_config(main.config_lib.build_config("test"), run_dir / "config.yaml")
    with pytest.raises(main.config_lib.ConfigError, match="did not get past its setup"):
        main.main(["--resume", str(run_dir)])


def test_a_requeued_job_resumes_the_run_it_started(tiny_teacher_dir, tmp_path):
    """The run is looked for under the output_root of the whole command line: here a YAML file sets it."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"output_root: {tmp_path / 'runs'}\n")
    args = cli_args(tiny_teacher_dir, tmp_path, "--total_rounds", "1", "--config", str(config_file))
    del args[args.index("--output_root"):args.index("--output_root") + 2]
    assert main.main([*args, "--job_id", "4242"]) == 0
    (run_dir,) = run_dirs(tmp_path)
    assert json.loads((run_dir / "manifest.json").read_text())["job_id"] == "4242"
    before = snapshot(run_dir)
    assert main.main([*args, "--job_id", "4242"]) == 0  # the same job again: its run is found, nothing left to do
    assert run_dirs(tmp_path) == [run_dir] and snapshot(run_dir) == before
    assert main.main([*args, "--job_id", "4243"]) == 0
    assert len(run_dirs(tmp_path)) == 2  # another job starts its own run


def test_an_fsdp_launch_is_refused_before_anything_loads(tiny_teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    with pytest.raises(main.config_lib.ConfigError, match="FSDP is not supported: launch with accelerate_configs"):
        main.main(cli_args(tiny_teacher_dir, tmp_path))
    assert not (tmp_path / "runs").exists()


def test_metrics_have_one_numeric_schema_with_calibration_gap_closed_and_diversity(tiny_teacher_dir, tmp_path):
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--plots", "true")) == 0
    run_dir = only_run_dir(tmp_path)
    assert {p.name for p in run_dir.glob("*.png")} == {"ce_vs_ensemble_size.png", "training_curves.png",
                                                       "gap_closed.png"}
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics.columns) == records.METRIC_COLUMNS
    numeric = metrics.drop(columns=["model", "stop_reason"])
    assert all(pd.api.types.is_numeric_dtype(numeric[c]) for c in numeric)
    trained = metrics["model"].isin(records.TRAINED_ROWS)
    assert not numeric[trained].isna().any().any() and not numeric[~trained].drop(
        columns=["steps_run", "member_step", "train_flops", "flops_student", "flops_members", "flops_teacher",
                 "flops_evaluation"]).isna().any().any()
    compute = metrics.set_index(["round", "model"])
    ensemble, students = compute.xs("ensemble", level="model"), compute.xs("student", level="model")
    assert (ensemble["parameters"] == students["parameters"].cumsum()).all()  # members add up
    assert (ensemble["train_flops"] == students["train_flops"].cumsum()).all()  # so does their training (online)
    parts = ensemble[["flops_student", "flops_members", "flops_teacher", "flops_evaluation"]]
    assert (parts.sum(axis=1) == ensemble["train_flops"]).all() and (ensemble["non_embedding_parameters"] > 0).all()
    assert (ensemble["inference_flops_per_token"] == students["inference_flops_per_token"].cumsum()).all()
    assert (ensemble["critical_path_layers"] == 1).all() and (ensemble["member_parameters"] == 22112).all()
    # Round 1 trains through round 0's frozen member: one forward more than round 0 on the same tokens.
    assert students.loc[1, "train_flops"] > students.loc[0, "train_flops"] > 0
    assert compute.loc[(0, "teacher"), "parameters"] > compute.loc[(0, "student"), "parameters"]
    assert pd.isna(compute.loc[(0, "teacher"), "train_flops"]) and compute.loc[(0, "student_untrained"),
                                                                                "train_flops"] == 0
    assert (metrics[trained]["stop_reason"] == "cap").all() and (metrics[trained]["steps_run"] == 3).all()
    assert metrics[~trained][["steps_run", "member_step", "stop_reason"]].isna().all().all()
    row = metrics.set_index(["round", "model"])
    assert row.loc[(0, "teacher"), "gap_closed"] == pytest.approx(1.0)
    assert row.loc[(0, "student_untrained"), "gap_closed"] == pytest.approx(0.0)
    start, teacher = row.loc[(0, "student_untrained"), "ce"], row.loc[(0, "teacher"), "ce"]
    assert row.loc[(1, "ensemble"), "gap_closed"] == pytest.approx((start - row.loc[(1, "ensemble"), "ce"]) /
                                                                   (start - teacher))
    assert row.loc[(1, "ensemble"), "diversity"] > 0 and row.loc[(1, "student"), "diversity"] == 0
    assert ((metrics["ece"] >= 0) & (metrics["ece"] <= 1)).all()
    samples = pd.read_csv(run_dir / "samples.csv", keep_default_na=False)
    assert list(zip(samples["round"], samples["model"])) == [(0, "student"), (0, "ensemble"), (1, "student"),
                                                             (1, "ensemble")]
    assert samples["new_tokens"].between(1, 8).all()  # the test preset's sample_max_new_tokens


def test_a_weighted_run_fits_and_saves_member_weights(tiny_teacher_dir, tmp_path):
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--combine", "weighted", "--total_rounds", "3")) == 0
    run_dir = only_run_dir(tmp_path)
    weights = json.loads((run_dir / "manifest.json").read_text())["weights"]
    assert len(weights) == 3 and sum(weights) == pytest.approx(1.0) and all(0 <= w <= 1 for w in weights)
    assert ModelEnsemble.from_pretrained(run_dir / "ensemble").config.weights == pytest.approx(weights)


def test_an_additive_run_starts_each_new_member_at_zero_and_adds_it_with_eta(tiny_teacher_dir, tmp_path):
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--combine", "additive", "--eta", "0.5")) == 0
    run_dir = only_run_dir(tmp_path)
    assert json.loads((run_dir / "manifest.json").read_text())["weights"] == [1.0, 0.5]
    metrics = pd.read_csv(run_dir / "metrics.csv").set_index(["round", "model"])
    vocab = len(build_tokenizer("chatml"))
    assert metrics.loc[(1, "student_untrained"), "ce"] == pytest.approx(math.log(vocab), rel=1e-5)  # zero logits
    assert ModelEnsemble.from_pretrained(run_dir / "ensemble").config.weights == [1.0, 0.5]


def test_the_independent_baseline_trains_each_student_alone(tiny_teacher_dir, tmp_path, monkeypatch):
    frozen_members_seen = []

    class RecordingTrainer(main.DistillationTrainer):
        def __init__(self, *args, members, **kwargs):
            frozen_members_seen.append(len(members))
            super().__init__(*args, members=members, **kwargs)

    monkeypatch.setattr(main, "DistillationTrainer", RecordingTrainer)
    assert main.main(cli_args(tiny_teacher_dir, tmp_path / "independent", "--baseline", "independent")) == 0
    assert main.main(cli_args(tiny_teacher_dir, tmp_path / "method")) == 0
    assert frozen_members_seen == [0, 0, 0, 1]  # the baseline's two rounds, then the method's
    metrics = pd.read_csv(only_run_dir(tmp_path / "independent") / "metrics.csv")
    assert metrics[metrics["model"] == "ensemble"]["ensemble_size"].tolist() == [1, 2]


@pytest.mark.parametrize("baseline, layers", [("single_matched", 1), ("single_large", 2)])
def test_single_model_baselines_train_one_student_for_the_ensembles_steps(tiny_teacher_dir, tmp_path, baseline,
                                                                         layers):
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--baseline", baseline)) == 0  # test preset: 2 x 3 steps
    run_dir = only_run_dir(tmp_path)
    assert pd.read_csv(run_dir / "train_log.csv")["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert set(pd.read_csv(run_dir / "metrics.csv")["round"]) == {0}
    member = json.loads((run_dir / "ensemble" / "member_0" / "config.json").read_text())
    assert member["num_hidden_layers"] == layers


def test_a_preempted_single_model_baseline_resumes_to_its_full_step_count(tiny_teacher_dir, tmp_path, monkeypatch):
    """single_matched trains total_rounds x steps_per_round steps: a checkpoint at step steps_per_round is not
    the end of its round."""
    with monkeypatch.context() as patch:
        patch.setattr(main.processes, "StopOnSignal", stop_at_step(3))
        assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--baseline", "single_matched")) == 75
    run_dir = only_run_dir(tmp_path)
    assert main.main(["--resume", str(run_dir)]) == 0
    assert pd.read_csv(run_dir / "train_log.csv")["step"].tolist() == [1, 2, 3, 4, 5, 6]


EARLY_STOPPING = ("--eval_steps", "1", "--early_stopping_patience", "2", "--early_stopping_examples", "4",
                  "--steps_per_round", "6", "--total_rounds", "1")


def test_early_stopping_keeps_the_best_state_and_records_why_the_round_stopped(tiny_teacher_dir, tmp_path):
    """Patience counts only improvements of more than 1 nat here: none comes, so the round stops at step 2 (patience
    2). Its member is still the lowest held-out CE evaluated: step 2's, lower than the start's (which step 1, at the
    warm-up's learning rate of 0, leaves as it was), as the log's step 2 says."""
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, *EARLY_STOPPING, "--early_stopping_min_delta", "1")) == 0
    run_dir = only_run_dir(tmp_path)
    log = pd.read_csv(run_dir / "train_log.csv")
    assert list(log["step"]) == [1, 2] and log["heldout_ce"].notna().all()
    metrics = pd.read_csv(run_dir / "metrics.csv").set_index("model")
    for model in records.TRAINED_ROWS:
        assert (metrics.loc[model, "steps_run"], metrics.loc[model, "member_step"],
                metrics.loc[model, "stop_reason"]) == (2, 2, "plateau")
    config = main.config_lib.load_saved_config(run_dir / "config.yaml")
    tokenizer = main.utils.load_tokenizer(str(tiny_teacher_dir))
    data, _ = main.preprocess_dataset.prepare_for_run(config, tokenizer)
    assert len(data["early_stop"]) == 4 and len(data["train"]) == 32 - 4
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["examples"] == {name: len(split) for name, split in data.items()}  # what a study reports
    member = main.utils.load_causal_lm(str(run_dir / "ensemble" / "member_0"))
    teacher = main.utils.load_causal_lm(str(tiny_teacher_dir))
    ce = main.evaluate({"member": [member]}, teacher, data["early_stop"], main.PaddingCollator(tokenizer.pad_token_id),
                       4, len(tokenizer))["member"]["ce"]
    assert ce == pytest.approx(log["heldout_ce"].iloc[1], abs=2e-6) != pytest.approx(log["heldout_ce"].iloc[0])
    assert log["heldout_ce"].iloc[1] < log["heldout_ce"].iloc[0]


def test_every_evaluation_scores_in_chunks_of_eval_chunk_size(tiny_teacher_dir, tmp_path, monkeypatch):
    """The early-stopping evaluations (mixture_ce), the round's metrics and a weighted run's weight fit (evaluate)
    all hold at most eval_chunk_size positions' logits at once (the demo's memory bound)."""
    chunk_sizes = {"mixture_ce": [], "evaluate": []}

    def recording(score):
        def score_recorded(*args, **kwargs):
            chunk_sizes[score.__name__].append(kwargs.get("chunk_size"))
            return score(*args, **kwargs)
        return score_recorded

    monkeypatch.setattr(main, "mixture_ce", recording(main.mixture_ce))
    monkeypatch.setattr(main, "evaluate", recording(main.evaluate))
    monkeypatch.setattr(evaluation, "evaluate", recording(evaluation.evaluate))
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, *EARLY_STOPPING, "--combine", "weighted",
                              "--total_rounds", "2", "--eval_chunk_size", "3")) == 0
    assert len(chunk_sizes["mixture_ce"]) > 4 and set(chunk_sizes["mixture_ce"]) == {3}
    # each round's metrics, and round 1's weight fit
    assert len(chunk_sizes["evaluate"]) >= 3 and set(chunk_sizes["evaluate"]) == {3}


def test_early_stopping_without_a_plateau_runs_to_the_cap(tiny_teacher_dir, tmp_path):
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, *EARLY_STOPPING, "--early_stopping_patience", "6")) == 0
    metrics = pd.read_csv(only_run_dir(tmp_path) / "metrics.csv").set_index("model")
    assert (metrics.loc["student", "steps_run"], metrics.loc["student", "stop_reason"]) == (6, "cap")


def test_a_round_resumed_mid_way_keeps_its_early_stopping_state(tiny_teacher_dir, tmp_path, monkeypatch):
    """Preempted at step 2 (two evaluations without improvement on the start so far), resumed: it stops at step 3
    (patience 3) as an uninterrupted run does; killed after the plateau's checkpoint but before the member's save,
    a resume trains no further step and keeps the starting student."""
    settings = (*EARLY_STOPPING, "--early_stopping_min_delta", "1", "--early_stopping_patience", "3")
    assert main.main(cli_args(tiny_teacher_dir, tmp_path / "whole", *settings)) == 0
    whole = final_metrics(tmp_path / "whole")
    with monkeypatch.context() as patch:
        patch.setattr(main.processes, "StopOnSignal", stop_at_step(2))
        assert main.main(cli_args(tiny_teacher_dir, tmp_path / "resumed", *settings)) == processes.EXIT_PREEMPTED
    run_dir = only_run_dir(tmp_path / "resumed")
    assert train.resumed_state(run_dir / "checkpoints" / "round_0" / "checkpoint-2")["bad_evaluations"] == 2
    assert main.main(["--resume", str(run_dir)]) == 0
    pd.testing.assert_frame_equal(final_metrics(tmp_path / "resumed").drop(columns="seconds"),
                                  whole.drop(columns="seconds"))

    with monkeypatch.context() as patch:  # the plateau's checkpoint is written, then the process dies
        patch.setattr(main, "saved_member", lambda *args: (_ for _ in ()).throw(SystemExit("killed")))
        with pytest.raises(SystemExit, match="killed"):
            main.main(cli_args(tiny_teacher_dir, tmp_path / "killed", *settings))
    run_dir = only_run_dir(tmp_path / "killed")
    assert main.main(["--resume", str(run_dir)]) == 0
    assert list(pd.read_csv(run_dir / "train_log.csv")["step"]) == [1, 2, 3]
    pd.testing.assert_frame_equal(final_metrics(tmp_path / "killed").drop(columns="seconds"),
                                  whole.drop(columns="seconds"))


def test_runs_of_other_seeds_and_data_seeds_share_the_test_set_and_seeds_share_the_teacher_cache(tiny_teacher_dir,
                                                                                                    tmp_path):
    """The test split depends on test_seed alone, so runs of other data seeds are scored on the same examples
    (paired differences); data_seed picks the training sample (and so the teacher cache)."""
    for seed, data_seed, test_seed in ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)):
        assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--teacher_mode", "topk", "--cache_k", "8",
                                  "--total_rounds", "1", "--seed", str(seed), "--data_seed", str(data_seed),
                                  "--test_seed", str(test_seed))) == 0
    runs = sorted(run_dirs(tmp_path), key=lambda path: int(path.name[4:]))
    teacher_ce = [pd.read_csv(run / "metrics.csv").set_index("model").loc["teacher", "ce"] for run in runs]
    assert teacher_ce[0] == teacher_ce[1] == teacher_ce[2] != teacher_ce[3]  # the same test set, or not
    students = [pd.read_csv(run / "metrics.csv").set_index("model").loc["student", "ce"] for run in runs]
    assert students[0] != students[1]  # the seed still changes the initialisation and the order
    assert len(list((tmp_path / "cache" / "teacher_cache").iterdir())) == 3  # seeds 0 and 1 share one cache
    assert [json.loads((run / "manifest.json").read_text())["data_seed"] for run in runs] == [0, 0, 1, 0]


@pytest.mark.parametrize("baseline,teacher_mode", [("single_matched", "online"), ("single_large", "online"),
                                                   ("single_matched", "topk")])
def test_a_flop_matched_baseline_spends_the_ensembles_training_flops(tiny_teacher_dir, tmp_path, baseline,
                                                                     teacher_mode):
    """baseline_budget=flops: the one student takes as many steps as fit the training FLOPs of the ensemble it
    stands for (which spends more than its steps alone: it runs its frozen members), and no more. With a cached
    teacher both are charged the whole build, so the single model's steps are what is left after its own build."""
    mode = ["--teacher_mode", teacher_mode, "--cache_k", "8"]
    assert main.main(cli_args(tiny_teacher_dir, tmp_path / "ensemble", *mode)) == 0
    assert main.main(cli_args(tiny_teacher_dir, tmp_path / "single", *mode, "--baseline", baseline,
                              "--baseline_budget", "flops")) == 0
    ensemble = final_metrics(tmp_path / "ensemble").xs("ensemble", level="model").iloc[-1]
    single = final_metrics(tmp_path / "single").loc[(0, "ensemble")]
    per_step = (single["train_flops"] - single["flops_teacher"] * (teacher_mode == "topk")) / single["steps_run"]
    # The cap comes from the mean example's tokens, the spend from the batches' own: they differ by a few %.
    slack = 0.02 * ensemble["train_flops"]
    assert single["train_flops"] - slack <= ensemble["train_flops"] < single["train_flops"] + per_step * 1.01 + slack
    if baseline == "single_large":
        assert single["parameters"] > ensemble["parameters"] / 2 and single["steps_run"] < 6  # deeper: fewer


def test_members_train_on_disjoint_shards_and_the_manifest_says_which(tiny_teacher_dir, tmp_path, monkeypatch):
    seen = []

    class RecordingTrainer(main.DistillationTrainer):
        def __init__(self, *args, train_dataset, **kwargs):
            seen.append(sorted(list(train_dataset["example_id"])))
            super().__init__(*args, train_dataset=train_dataset, **kwargs)

    monkeypatch.setattr(main, "DistillationTrainer", RecordingTrainer)
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--member_data", "shard", "--teacher_mode", "topk",
                              "--cache_k", "8")) == 0
    assert [len(ids) for ids in seen] == [16, 16] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(32))  # the cache's keys: rows of the whole training split
    manifest = json.loads((only_run_dir(tmp_path) / "manifest.json").read_text())
    assert manifest["member_data"] == {"0": "shard 0 of 2 (order seed 0)", "1": "shard 1 of 2 (order seed 0)"}


def test_each_early_stopping_evaluation_records_the_test_ce_and_the_flops_spent_so_far(tiny_teacher_dir, tmp_path):
    """The learning curve against FLOPs: every evaluation's spend (steps, frozen members, evaluations, the cache
    build charged once) rises, and the last one of a round is what metrics.csv charges the round's models. An
    ensemble of 1 inside a 2-round run is charged exactly what a 1-round run is: the whole build, once."""
    settings = ["--teacher_mode", "topk", "--cache_k", "8", "--eval_steps", "1", "--early_stopping_examples", "4",
                "--early_stopping_patience", "5", "--lr_scheduler", "wsd", "--warmup_steps", "1"]
    assert main.main(cli_args(tiny_teacher_dir, tmp_path / "two", *settings)) == 0
    assert main.main(cli_args(tiny_teacher_dir, tmp_path / "one", *settings, "--total_rounds", "1")) == 0
    log = pd.read_csv(only_run_dir(tmp_path / "two") / "train_log.csv")
    curve = log.dropna(subset=["heldout_ce"])
    assert list(curve["step"]) == [1, 2, 3, 1, 2, 3] and curve["test_ce"].notna().all()
    assert curve["train_flops"].is_monotonic_increasing and (curve["flops_evaluation"].diff().dropna() > 0).all()
    parts = curve[["flops_student", "flops_members", "flops_teacher", "flops_evaluation"]]
    assert np.allclose(parts.sum(axis=1), curve["train_flops"])
    assert (curve.loc[curve["round"] == 0, "flops_members"] == 0).all() and curve["flops_members"].iloc[-1] > 0
    metrics = final_metrics(tmp_path / "two")
    for round_index in (0, 1):
        last = curve[curve["round"] == round_index].iloc[-1]
        assert metrics.loc[(round_index, "ensemble"), "train_flops"] == pytest.approx(last["train_flops"], rel=1e-9)
        kept = curve[(curve["round"] == round_index)
                     & (curve["step"] == metrics.loc[(round_index, "ensemble"), "member_step"])]
        if len(kept):  # the test CE of the weights the round kept (step 0's evaluation is not logged)
            assert metrics.loc[(round_index, "ensemble"), "ce"] == pytest.approx(kept["test_ce"].iloc[0], rel=1e-5)
    one = final_metrics(tmp_path / "one")
    assert one.loc[(0, "ensemble"), "train_flops"] == metrics.loc[(0, "ensemble"), "train_flops"]
    assert metrics.loc[(0, "ensemble"), "flops_teacher"] == metrics.loc[(1, "ensemble"), "flops_teacher"] > 0


FREED_PROBE = """
import json, sys, weakref
sys.path.insert(0, "tests")
from conftest import run_test_preset
import main, train, utils
from pathlib import Path

optimizers, alive_at_evaluation, fixed = [], [], []
create_optimizer = train.DistillationTrainer.create_optimizer

def recorded_optimizer(self, model=None):
    optimizer = create_optimizer(self, model)
    optimizers.append((weakref.ref(self), weakref.ref(optimizer)))
    return optimizer

evaluate_round = main.evaluate_round

def recorded_evaluation(*args, **kwargs):
    alive_at_evaluation.append([ref() is not None for pair in optimizers for ref in pair])
    return evaluate_round(*args, **kwargs)

release = utils.return_freed_buffers_to_the_system
train.DistillationTrainer.create_optimizer = recorded_optimizer
main.evaluate_round = recorded_evaluation
utils.return_freed_buffers_to_the_system = lambda: fixed.append(release())
run_test_preset(Path(sys.argv[1]))
print(json.dumps({"alive_at_evaluation": alive_at_evaluation, "fixed": len(fixed)}))
"""


def test_a_rounds_trainer_and_optimizer_are_freed_before_its_evaluation(tmp_path):
    """The Trainer and its optimizer hold reference cycles: the round collects them once training ends, so the
    optimizer's states are not resident through the evaluation (nor the next round). The run also fixes glibc's
    mmap threshold first (utils.return_freed_buffers_to_the_system), before anything large is allocated. In a
    process of its own: what earlier tests leave in this one (torch.compile's caches, say) may hold objects too."""
    result = subprocess.run([sys.executable, "-c", FREED_PROBE, str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["alive_at_evaluation"] == [[False, False], [False, False, False, False]]
    assert found["fixed"] == 1


def test_the_mmap_threshold_is_fixed_where_glibc_allocates():
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        assert utils.return_freed_buffers_to_the_system() is False
    else:
        assert utils.return_freed_buffers_to_the_system() is True
