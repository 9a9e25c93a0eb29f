"""main.py end to end with the `test` preset: rounds, run folder, metrics, resume, and refusals."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import main
import run_state
from conftest import DATA_DIR, accelerate_launch, build_tiny_llama, build_tokenizer
from ensemble import ModelEnsemble

REPO = Path(__file__).resolve().parents[1]


def cli_args(teacher_dir, tmp_path, *extra):
    return ["--preset", "test", "--teacher", str(teacher_dir), "--dataset", str(DATA_DIR / "chats.jsonl"),
            "--output_root", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"), *extra]


def only_run_dir(tmp_path) -> Path:
    (run_dir,) = (tmp_path / "runs").glob("*/run_*")
    return run_dir


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
                                       "grad_norm_kl", "grad_norm_nll", "epoch"]
    assert list(train_log["round"]) == [0, 0, 0, 1, 1, 1] and list(train_log["step"]) == [1, 2, 3, 1, 2, 3]
    assert train_log.notna().all().all()
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


def test_resume_refuses_a_changed_setting_and_a_non_run_folder(tiny_teacher_dir, tmp_path):
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--total_rounds", "1")) == 0
    run_dir = only_run_dir(tmp_path)
    before = (run_dir / "metrics.csv").read_text()
    with pytest.raises(main.config_lib.ConfigError, match="changes \\['alpha'\\]"):
        main.main(["--resume", str(run_dir), "--alpha", "0.9"])
    with pytest.raises(main.config_lib.ConfigError, match="is not a run folder"):
        main.main(["--resume", str(tmp_path)])
    assert (run_dir / "metrics.csv").read_text() == before


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
def test_a_cached_teacher_trains_like_the_online_teacher(tiny_teacher_dir, tmp_path, cache_args):
    assert main.main(cli_args(tiny_teacher_dir, tmp_path / "online")) == 0
    assert main.main(cli_args(tiny_teacher_dir, tmp_path / "cached", *cache_args)) == 0
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


# --- surviving interruption ---------------------------------------------------------------------------------------

def test_two_processes_give_the_run_of_one_process(tiny_teacher_dir, tmp_path):
    """accelerate launch on 2 processes x 1 micro-batch = 1 process x 2 micro-batches (the same global batches): the
    same training log and the same metrics (evaluation scores each of the 7 test examples once, split 4 + 3), in
    one run folder written by the main process; both processes build the teacher cache, one shard each."""
    common = ("--teacher_mode", "topk", "--cache_k", "400", "--cache_value_dtype", "float16", "--test_size", "7")
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


def round_done(tmp_path, round_index) -> bool:
    dirs = run_dirs(tmp_path)
    manifest = dirs[0] / "manifest.json" if dirs else None
    return bool(manifest and manifest.is_file() and
                json.loads(manifest.read_text())["rounds"].get(str(round_index)) == "done")


def member_saved(tmp_path, round_index) -> bool:
    dirs = run_dirs(tmp_path)
    return bool(dirs) and (dirs[0] / "ensemble" / f"member_{round_index}" / "config.json").exists()


KILL_MOMENTS = {
    "during training": lambda tmp_path: train_log_rows(tmp_path) >= 2,
    "during a checkpoint write": lambda tmp_path: partial_checkpoint_exists(tmp_path),
    "during evaluation": lambda tmp_path: member_saved(tmp_path, 0),
    "between rounds": lambda tmp_path: round_done(tmp_path, 0),
}


@pytest.fixture(scope="module")
def uninterrupted_metrics(tiny_teacher_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, *RESUMABLE)) == 0
    return final_metrics(tmp_path)


def assert_same_finished_run(tmp_path, reference: pd.DataFrame) -> None:
    (run_dir,) = run_dirs(tmp_path)
    metrics = final_metrics(tmp_path)
    assert not metrics.index.duplicated().any()
    assert list(metrics.index) == list(reference.index)  # every round, every model, once
    pd.testing.assert_frame_equal(metrics.drop(columns="seconds"), reference.drop(columns="seconds"), rtol=1e-4,
                                  atol=1e-3)  # gap_closed divides by the tiny teacher's small gap
    train_log = pd.read_csv(run_dir / "train_log.csv")
    assert list(zip(train_log["round"], train_log["step"])) == [(r, s) for r in (0, 1) for s in range(1, 7)]
    assert json.loads((run_dir / "manifest.json").read_text())["rounds"] == {"0": "done", "1": "done"}
    assert len(ModelEnsemble.from_pretrained(run_dir / "ensemble")) == 2
    assert not (run_dir / "checkpoints" / "round_0").exists()  # a finished round keeps only its member


@pytest.mark.parametrize("moment", list(KILL_MOMENTS))
def test_sigkill_at_any_moment_then_resume_finishes_the_same_run(tiny_teacher_dir, tmp_path, uninterrupted_metrics,
                                                                 moment):
    process = start_run(tiny_teacher_dir, tmp_path)
    try:
        wait_for(process, lambda: KILL_MOMENTS[moment](tmp_path))
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    (run_dir,) = run_dirs(tmp_path)
    resume_until_done(run_dir)
    assert_same_finished_run(tmp_path, uninterrupted_metrics)


def test_sigterm_checkpoints_exits_for_requeue_and_resumes(tiny_teacher_dir, tmp_path, uninterrupted_metrics):
    process = start_run(tiny_teacher_dir, tmp_path)
    wait_for(process, lambda: train_log_rows(tmp_path) >= 2)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGUSR1)  # a second signal while it saves changes nothing
    assert process.wait(timeout=300) == run_state.EXIT_PREEMPTED
    (run_dir,) = run_dirs(tmp_path)
    assert run_state.latest_complete_checkpoint(run_dir / "checkpoints" / "round_0") is not None
    assert json.loads((run_dir / "manifest.json").read_text())["rounds"]["0"] == "training"
    resume_until_done(run_dir)
    assert_same_finished_run(tmp_path, uninterrupted_metrics)


def test_a_round_killed_after_its_last_checkpoint_is_not_trained_further(tiny_teacher_dir, tmp_path,
                                                                          uninterrupted_metrics):
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
    assert_same_finished_run(tmp_path, uninterrupted_metrics)


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


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


BAD_DATA = {
    "a missing path": (None, "no such file"),
    "no conversations": ([{"text": "hello"}] * 20, "no 'messages' (role/content turns) or 'conversations'"),
    "an unknown role": ([{"messages": [{"role": "robot", "content": "beep"}]}] * 20, "unknown role value(s) ['robot']"),
    "no assistant turn": ([{"messages": [{"role": "user", "content": "hi"}]}] * 20, "no example is left"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_refused_before_any_run_folder_changes(tiny_teacher_dir, tmp_path, existing_run, case):
    records, message = BAD_DATA[case]
    dataset = tmp_path / "missing.jsonl" if records is None else write_jsonl(tmp_path / "bad.jsonl", records)
    args = cli_args(tiny_teacher_dir, tmp_path)
    args[args.index("--dataset") + 1] = str(dataset)
    with pytest.raises(main.preprocess_dataset.DataError, match=f"{dataset}") as error:
        main.main(args)
    assert message in str(error.value)
    assert snapshot(tmp_path / "runs") == existing_run


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
    monkeypatch.setattr(run_state.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(run_state.DiskSpaceError, match="1,000 bytes free, but the next checkpoints need about"):
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
    command = cli_args(tiny_teacher_dir, tmp_path, "--total_rounds", "1", "--job_id", "4242")
    assert main.main(command) == 0
    (run_dir,) = run_dirs(tmp_path)
    assert json.loads((run_dir / "manifest.json").read_text())["job_id"] == "4242"
    before = (run_dir / "metrics.csv").read_text()
    assert main.main(command) == 0  # the same job again: its run is found and has nothing left to do
    assert run_dirs(tmp_path) == [run_dir] and (run_dir / "metrics.csv").read_text() == before
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--total_rounds", "1", "--job_id", "4243")) == 0
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
    assert list(metrics.columns) == main.METRIC_COLUMNS
    numeric = metrics.drop(columns="model")
    assert all(pd.api.types.is_numeric_dtype(numeric[c]) for c in numeric) and not numeric.isna().any().any()
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

    class StopAtStep3(run_state.StopOnSignal):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                self.preemption.received = signal.SIGUSR1
            return super().on_step_end(args, state, control, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(main.run_state, "StopOnSignal", StopAtStep3)
        assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--baseline", "single_matched")) == 75
    run_dir = only_run_dir(tmp_path)
    assert main.main(["--resume", str(run_dir)]) == 0
    assert pd.read_csv(run_dir / "train_log.csv")["step"].tolist() == [1, 2, 3, 4, 5, 6]
