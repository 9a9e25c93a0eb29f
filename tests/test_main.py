"""main.py end to end with the `test` preset: rounds, run folder, metrics, resume, and refusals."""

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

import main
from conftest import DATA_DIR, build_tiny_llama, build_tokenizer
from ensemble import ModelEnsemble

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny random teacher saved as a normal Hugging Face folder, with its tokenizer and chat template."""
    path = tmp_path_factory.mktemp("teacher")
    tokenizer = build_tokenizer("chatml")
    build_tiny_llama(tokenizer, seed=11, hidden_size=48).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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
    assert list(train_log.columns) == ["round", "step", "hybrid", "kl", "nll", "learning_rate", "grad_norm", "epoch"]
    assert list(train_log["round"]) == [0, 0, 0, 1, 1, 1] and list(train_log["step"]) == [1, 2, 3, 1, 2, 3]
    assert train_log["hybrid"].notna().all() and train_log["grad_norm"].notna().all()

    ensemble = ModelEnsemble.from_pretrained(run_dir / "ensemble")
    assert len(ensemble) == 2 and ensemble.config.combine == "logits"
    assert "Metrics on the held-out split" in result.stdout and "2 member(s): ensemble" in result.stdout


def test_resume_skips_finished_rounds_and_adds_new_ones(tiny_teacher_dir, tmp_path):
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--total_rounds", "1")) == 0
    run_dir = only_run_dir(tmp_path)
    first = pd.read_csv(run_dir / "metrics.csv")
    assert main.main(["--resume", str(run_dir), "--total_rounds", "2"]) == 0
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
    pd.testing.assert_frame_equal(cached.drop(columns="seconds"), online.drop(columns="seconds"), rtol=1e-3)
    # The training losses are the sharper check: a top-k cache with k < V gives a KL an order of magnitude off.
    online_log, cached_log = (pd.read_csv(only_run_dir(tmp_path / name) / "train_log.csv")
                              for name in ("online", "cached"))
    for column in ("hybrid", "kl", "nll"):
        pd.testing.assert_series_equal(cached_log[column], online_log[column], rtol=1e-3)
    (cache_dir,) = (tmp_path / "cached" / "cache" / "teacher_cache").iterdir()
    assert (cache_dir / "metadata.json").is_file()
