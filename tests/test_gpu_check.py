"""gpu_check.sh, at toy sizes on CPU (GPU_CHECK_SIZE=tiny): every step of the GPU check runs and writes its figures,
so the script that runs the moment a GPU is at hand has been executed end to end before."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_check(tmp_path, **environment) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path / "results"), "TMPDIR": str(tmp_path), **environment}
    return subprocess.run(["bash", str(REPO / "gpu_check.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)


def test_the_gpu_check_runs_every_step_at_toy_sizes_and_writes_its_figures(tmp_path):
    """Rehearsed as on the GPU machine: packed first (the chats it trains on; the wheels are left out here, since
    they are for another Python), then run with that pack."""
    pack = {"GPU_CHECK_PACK": str(tmp_path / "pack")}
    packed = subprocess.run(["bash", str(REPO / "gpu_check.sh"), "--pack"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **pack, "GPU_CHECK_PACK_WHEELS": "0"}, timeout=600)
    assert packed.returncode == 0, packed.stderr[-3000:]
    assert len((tmp_path / "pack" / "chats.jsonl").read_text().splitlines()) == 600
    result = run_check(tmp_path, GPU_CHECK_SIZE="tiny", **pack)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"data          {tmp_path / 'pack' / 'chats.jsonl'} (" in result.stdout  # the run's plan: packed chats
    results = tmp_path / "results"
    tests = json.loads((results / "gpu_tests.json").read_text())
    assert tests["tests"] >= 1 and tests["failures"] == tests["errors"] == 0  # the cuda tests, skipped on CPU
    bench = json.loads((results / "gpu_bench.json").read_text())
    assert bench["settings"]["teacher_size"] == "tiny"
    run = json.loads((results / "gpu_run.json").read_text())
    assert run["rounds"] == 2 and run["steps"] == 4 and run["finite_losses"]
    assert set(run["ce"]) >= {"teacher", "student", "ensemble"}
    inference = json.loads((results / "gpu_bench_inference.json").read_text())
    assert inference["settings"]["size"] == "tiny" and "ensemble, a process each (gloo)" in inference["rows"]
    assert [p for p in tmp_path.iterdir() if p.name.startswith("gpu_check.")] == []  # its scratch folder is gone


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_the_paper_sized_check_refuses_a_machine_without_cuda(tmp_path):
    result = run_check(tmp_path)
    assert result.returncode == 2 and "no CUDA device" in result.stderr
    assert not (tmp_path / "results" / "gpu_bench.json").exists()
