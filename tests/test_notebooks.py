"""notebooks/analysis.ipynb runs on a real run folder, so it cannot rot."""

import io
import json
import shutil
from pathlib import Path

import matplotlib
import pytest
import yaml
from matplotlib.figure import Figure

from conftest import DATA_DIR, build_tiny_llama, build_tokenizer
import main

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


def run_notebook(run_dirs) -> dict:
    """Execute the notebook's code cells as Jupyter would, on run_dirs; returns the namespace they leave."""
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4
    namespace = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        # IPython line magics (%matplotlib inline) mean nothing to plain Python
        source = "".join(line for line in "".join(cell["source"]).splitlines(keepends=True)
                         if not line.lstrip().startswith("%"))
        exec(compile(source, str(NOTEBOOK), "exec"), namespace)  # noqa: S102 - the project's own notebook
        if "RUN_DIRS = " in source:
            namespace["RUN_DIRS"] = run_dirs  # point it at the runs made here
    return namespace


def check_renders(figure):
    assert isinstance(figure, Figure)
    png = io.BytesIO()
    figure.savefig(png, format="png")
    assert png.getvalue()[:8] == b"\x89PNG\r\n\x1a\n" and len(png.getvalue()) > 10_000


def test_the_analysis_notebook_runs_on_a_finished_run(finished_run, tmp_path):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.close("all")
    namespace = run_notebook([finished_run])
    metrics, train_log = namespace["metrics"], namespace["train_log"]
    assert set(metrics["model"]) == {"teacher", "student_untrained", "student", "ensemble"}
    assert set(metrics["run"]) == {f"{finished_run.parent.name}/{finished_run.name}"}
    assert metrics["gap_closed"].notna().all()  # from the run, or computed from its CE
    assert metrics.loc[metrics["model"] == "teacher", "gap_closed"].tolist() == pytest.approx([1.0])
    assert len(train_log) == 6 and sorted(set(train_log["round"])) == [0, 1]
    summary = namespace["summary"].iloc[0]
    ensemble_ce = metrics.loc[metrics["model"] == "ensemble", "ce"].tolist()
    assert summary["final ensemble CE"] == ensemble_ce[-1]
    assert summary["teacher CE"] == metrics.loc[metrics["model"] == "teacher", "ce"].item()

    # plot.py's figures of one run, drawn from its numbers, without pyplot's global figures
    figures = namespace["figures"]
    assert list(figures) == ["ce_vs_ensemble_size", "training_curves", "gap_closed"]
    (ax,) = figures["ce_vs_ensemble_size"].axes
    assert list(ax.lines[0].get_ydata()) == pytest.approx(ensemble_ce)
    assert [len(ax.lines) for ax in figures["training_curves"].axes] == [2, 2, 2]  # two rounds
    assert len(figures["gap_closed"].axes[0].patches) == 4  # student and ensemble bars at sizes 1 and 2
    for figure in figures.values():
        check_renders(figure)
    assert plt.get_fignums() == []

    # several runs: the comparison figures; a copy with another alpha stands for a second run
    other = tmp_path / "runs" / "2099-01-01" / "run_1"
    other.mkdir(parents=True)
    for name in ("metrics.csv", "train_log.csv"):
        shutil.copy(finished_run / name, other / name)
    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    (other / "config.yaml").write_text(yaml.safe_dump({**config, "alpha": 0.9}))
    namespace = run_notebook([finished_run, other])
    assert set(namespace["metrics"]["label"]) == {f"alpha={config['alpha']:g}", "alpha=0.9"}
    assert len(namespace["train_log"]) == 12
    figures = namespace["figures"]
    assert list(figures) == ["ce_vs_ensemble_size", "final_ce"]
    assert len(figures["ce_vs_ensemble_size"].axes[0].lines) == 3  # two runs and the teacher
    assert len(figures["final_ce"].axes[0].patches) == 2
    for figure in figures.values():
        check_renders(figure)
    assert plt.get_fignums() == []
