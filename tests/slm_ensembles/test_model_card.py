"""The model card of a run's ensemble: the Hub reads its metadata and held-out results back, and a resumed run that
adds a round rewrites it."""

import os
import re
import subprocess
import sys

import pandas as pd
from conftest import run_test_preset
from huggingface_hub import ModelCard

from config import EMBEDDED_DATASET, EMBEDDED_TEACHER, build_config
import main
from slm_ensembles import model_card


def test_a_run_writes_a_card_the_hub_reads_back_and_a_resume_that_adds_a_round_rewrites_it(tmp_path):
    run_dir = run_test_preset(tmp_path)
    card_path = run_dir / "ensemble" / "README.md"
    assert_card_matches_the_run(card_path, run_dir, rounds=2)
    card = ModelCard.load(card_path)
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert card.data.base_model == str(tmp_path / "teacher")
    assert card.data.tags == ["distillation", "ensemble", "slm-ensembles"]
    assert "`member_1/`" in card.text
    assert_loading_lines_run(card.text, run_dir, tmp_path / "modules")

    assert main.main(["--resume", str(run_dir), "--total_rounds", "3"]) == 0
    assert_card_matches_the_run(card_path, run_dir, rounds=3)


def assert_card_matches_the_run(card_path, run_dir, rounds):
    """The card's model-index holds metrics.csv's ensemble CE at every size, and its body one line per member."""
    card = ModelCard.load(card_path)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    ensemble = metrics[metrics["model"] == "ensemble"].sort_values("round")
    assert [result.metric_value for result in card.data.eval_results] == list(ensemble["ce"])
    assert len(ensemble) == rounds
    assert [f"ensemble of {size}" in result.metric_name
            for result, size in zip(card.data.eval_results, ensemble["ensemble_size"])] == [True] * rounds


def assert_loading_lines_run(card_text, run_dir, modules_cache):
    """The card's Python block runs as written beside the folder, in a Python that cannot import the project."""
    (code,) = re.findall(r"```python\n(.*?)```", card_text, re.S)
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
                   "HF_MODULES_CACHE": str(modules_cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=run_dir, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def metric_rows():
    """metrics.csv's rows of a 2-round run, as csv reads them (text)."""
    rows = [("0", "teacher", "0", "2.5"), ("0", "student", "1", "4.0"), ("0", "ensemble", "1", "4.0"),
            ("1", "student", "1", "4.5"), ("1", "ensemble", "2", "3.5")]
    return [{"round": r, "model": m, "ensemble_size": size, "ce": ce, "parameters": "1000", "train_flops": "2e9"}
            for r, m, size, ce in rows]


def test_the_card_tells_each_rounds_stop_the_best_member_and_the_hub_names_of_embedded_assets():
    config = build_config("test", overrides={"teacher": EMBEDDED_TEACHER, "dataset": EMBEDDED_DATASET,
                                             "combine": "weighted"})
    records = [{"steps_run": 7, "member_step": 4, "stop_reason": "plateau", "flops": [1e9, 0, 5e8, 5e8]}, {}]
    text = model_card.model_card(config, metric_rows(), records, weights=[0.4, 0.6], folder_name="my_ensemble")
    card = ModelCard(text)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.datasets == ["anon8231489123/ShareGPT_Vicuna_unfiltered"]
    assert [result.metric_value for result in card.data.eval_results] == [4.0, 3.5]
    assert "| 0 | 7 | 4 | a plateau (3 held-out evaluations without improvement) | 2e+09 |" in text
    assert "| 1 |  |  |  |  |" in text  # a member saved without a training record
    assert "| 2 | 3.5000 | 2.5000 | 4.0000 |" in text  # the best member so far is round 0's
    assert "`member_1/`: 1,000 parameters, coefficient 0.6" in text
    assert 'from_pretrained("my_ensemble", trust_remote_code=True)' in text
