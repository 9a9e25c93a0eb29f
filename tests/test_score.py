"""score.py: a run's saved ensemble scored on the run's own test split, in one process or spread over several."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import damage_second_half, run_test_preset
import score
from slm_ensembles import files
from slm_ensembles.processes import EXIT_BAD_INPUT, run_command
from slm_ensembles.run_layout import RunLayout

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return run_test_preset(tmp_path_factory.mktemp("score"), "--combine", "probs")


def reported(run_dir) -> float:
    rows = files.read_csv_rows(run_dir / RunLayout.METRICS)
    return float([row for row in rows if row["model"] == "ensemble" and row["ensemble_size"] == "2"][-1]["ce"])


def torchrun(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def printed_ce(stdout: str) -> float:
    return float(re.search(r"held-out CE of the 2-member ensemble: ([0-9.]+)", stdout).group(1))


def test_the_saved_ensemble_scores_what_the_run_reported(run_dir, capsys):
    result = score.main([str(run_dir)])
    # The same positions and combination; fp32 kernels of a reloaded model may differ in the last bits.
    assert result.ce == pytest.approx(reported(run_dir), rel=1e-5)
    assert result.num_tokens > 100
    out = capsys.readouterr().out
    assert f"the run reported:                  {reported(run_dir):.6f}" in out


def test_members_run_at_once_score_the_same(run_dir):
    assert score.main([str(run_dir), "--concurrent"]).ce == pytest.approx(score.main([str(run_dir)]).ce, rel=1e-7)


def test_two_processes_score_what_the_run_reported_and_the_top_k_exchange_says_what_it_costs(run_dir):
    exact = torchrun(["score.py", str(run_dir), "--distributed"])
    assert exact.returncode == 0, exact.stderr[-3000:]
    assert printed_ce(exact.stdout) == pytest.approx(score.main([str(run_dir)]).ce, rel=1e-6)
    assert exact.stdout.count("held-out CE") == 1  # printed once, by rank 0
    top_k = torchrun(["score.py", str(run_dir), "--distributed", "--exchange", "topk", "--exchange_k", "8"])
    assert top_k.returncode == 0, top_k.stderr[-3000:]
    assert re.search(r"greedy token differs from the exact path at [0-9.]+% of positions", top_k.stdout)
    assert "bytes per token and process: top-k sends 100, receives 100" in top_k.stdout  # 8 x 4 + (2 x 8 + 1) x 4


def test_a_folder_that_is_not_a_run_is_refused_by_name(tmp_path):
    result = subprocess.run([sys.executable, "score.py", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{tmp_path}: not a run folder (no config.yaml)" in result.stderr


def test_a_damaged_member_is_refused_naming_the_file_before_its_weights_load(run_dir, tmp_path, capsys):
    copy = tmp_path / "run_1"
    shutil.copytree(run_dir / "ensemble", copy / "ensemble")
    for name in ("config.yaml", RunLayout.METRICS):
        shutil.copy(run_dir / name, copy / name)
    assert score.main([str(copy)]).ce == pytest.approx(reported(run_dir), rel=1e-5)  # the copy is intact
    weights = copy / "ensemble" / "member_0" / "model.safetensors"
    damage_second_half(weights)
    capsys.readouterr()
    assert run_command(lambda: score.main([str(copy)]), score.REFUSALS) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert "held-out CE" not in captured.out
    assert captured.err.startswith(f"error: {weights}: holds ")
    assert "is damaged and nothing was loaded from it; restore the folder from an intact copy" in captured.err
