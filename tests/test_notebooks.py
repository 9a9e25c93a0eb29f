"""notebooks/analysis.ipynb runs on a real run folder, so it cannot rot."""

import json
from pathlib import Path

import matplotlib
import pytest

import main
from conftest import DATA_DIR, build_tiny_llama, build_tokenizer

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"


@pytest.fixture
def finished_run(tmp_path):
    teacher_dir = tmp_path / "teacher"
    tokenizer = build_tokenizer("chatml")
    build_tiny_llama(tokenizer, seed=11, hidden_size=48).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    assert main.main(["--preset", "test", "--teacher", str(teacher_dir), "--dataset", str(DATA_DIR / "chats.jsonl"),
                      "--output_root", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache")]) == 0
    (run_dir,) = (tmp_path / "runs").glob("*/run_*")
    return run_dir


def test_the_analysis_notebook_runs_on_a_finished_run(finished_run):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [("".join(c["source"]), c["cell_type"]) for c in json.loads(NOTEBOOK.read_text())["cells"]]
    namespace = {}
    for source, kind in cells:
        if kind == "code":
            exec(compile(source, str(NOTEBOOK), "exec"), namespace)  # noqa: S102 - the project's own notebook
            if "RUN_DIRS = " in source:
                namespace["RUN_DIRS"] = [finished_run]  # point it at the run made here
    assert set(namespace["metrics"]["model"]) == {"teacher", "student_untrained", "student", "ensemble"}
    assert len(namespace["train_log"]) == 6
    assert len(plt.get_fignums()) == 2
    plt.close("all")
