"""distributed_ensemble.py: an ensemble spread over processes (gloo on CPU) predicts as the one-process ensemble,
refuses processes that loaded different ensembles, and stops, naming the process, when one dies or stalls."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checksums import DamagedFolderError
from conftest import build_diverse_member, build_tokenizer, damage_second_half
import score
from slm_ensembles import distributed_ensemble, files
from distributed_ensemble_probe import greedy_answers, scoring_dataset
from ensemble import COMBINE_MODES, ModelEnsemble
from model_io import PaddingCollator

PROBE = Path(__file__).resolve().parents[1] / "distributed_ensemble_probe.py"
REPO = Path(__file__).resolve().parents[2]
WEIGHTS = [0.5, 0.3, 0.2]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("chatml")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """One saved 3-member ensemble per combine mode (the second member's head padded beyond the vocabulary), and
    what each predicts in one process: greedy answers and the CE of the chat fixture."""
    root = tmp_path_factory.mktemp("ensembles")
    members = [build_diverse_member(tokenizer, 0), build_diverse_member(tokenizer, 1, vocab_size=len(tokenizer) + 8),
               build_diverse_member(tokenizer, 2)]
    expected = {}
    for mode in COMBINE_MODES:
        weights = WEIGHTS if mode in ("weighted", "additive") else None
        ensemble = ModelEnsemble.from_members(members, combine=mode, vocab_size=len(tokenizer), weights=weights)
        ensemble.save_pretrained(root / mode, tokenizer)
        dataset = scoring_dataset(tokenizer)
        expected[mode] = {"answers": greedy_answers(ensemble, tokenizer),
                          "ce": score.score(ensemble, dataset, PaddingCollator(tokenizer.pad_token_id), 4).ce}
    return root, expected


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script_args: list[str], world_size: int, rank_args: dict | None = None) -> list[subprocess.Popen]:
    """`world_size` processes of a script, with the environment torchrun gives its workers; `rank_args` gives some
    ranks other arguments."""
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": ""}
        args = (rank_args or {}).get(rank, script_args)
        processes.append(subprocess.Popen([sys.executable, *map(str, args)], env=env, cwd=REPO, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return processes


def finish(processes: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """(exit code, stderr) of each process, killing any still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    results = []
    for process in processes:
        try:
            _, err = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
            results.append((None, err))
            continue
        results.append((process.returncode, err))
    return results


# --- splitting members ------------------------------------------------------------------------------------------


def test_members_are_split_in_contiguous_blocks_that_cover_them_once():
    for count in range(1, 7):
        for world in range(1, count + 1):
            blocks = [distributed_ensemble.members_of_rank(count, rank, world) for rank in range(world)]
            assert [i for block in blocks for i in block] == list(range(count))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    with pytest.raises(distributed_ensemble.LaunchError, match="3 processes for an ensemble of 2"):
        distributed_ensemble.members_of_rank(2, 0, 3)


def test_a_process_not_started_by_a_launcher_is_told_how_to_launch(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(distributed_ensemble.LaunchError, match="torchrun --nproc_per_node 2"):
        distributed_ensemble.launched_rank()
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed_ensemble.launched_rank() == (1, 2, 0)


# --- the top-k exchange ----------------------------------------------------------------------------------------


def top_k_candidates(parts, k):
    return torch.cat([part.topk(k, dim=-1).indices for part in parts], dim=-1)


def test_a_process_refuses_a_damaged_member_of_its_share_naming_the_file(tmp_path, saved):
    root, _ = saved
    folder = tmp_path / "ensemble"
    shutil.copytree(root / "logits", folder)
    for member in sorted(folder.glob("member_*")):
        files.write_checksums(member)
    weights = folder / "member_2" / "model.safetensors"
    damage_second_half(weights)
    alone = distributed_ensemble.Processes(rank=0, world_size=1, device=torch.device("cpu"), store=None, timeout_s=1)
    last = distributed_ensemble.Processes(rank=1, world_size=2, device=torch.device("cpu"), store=None, timeout_s=1)
    first = distributed_ensemble.Processes(rank=0, world_size=2, device=torch.device("cpu"), store=None, timeout_s=1)
    for processes in (alone, last):  # those whose share holds member_2
        with pytest.raises(DamagedFolderError, match=f"^{re.escape(str(weights))}: holds "):
            distributed_ensemble.DistributedEnsemble.from_pretrained(folder, processes)
    assert len(distributed_ensemble.DistributedEnsemble.from_pretrained(folder, first)) == 1  # member_0: intact
    files.write_checksums(folder)  # the ensemble's own files, checked by every process
    damage_second_half(folder / "generation_config.json")
    with pytest.raises(DamagedFolderError, match=f"^{re.escape(str(folder / 'generation_config.json'))}: holds "):
        distributed_ensemble.DistributedEnsemble.from_pretrained(folder, first)


def test_a_part_is_sent_as_its_values_at_the_candidates_and_the_mean_of_the_rest():
    part = torch.tensor([[0.5, 3.0, -1.0, 2.0, 1.0]])
    sent = distributed_ensemble.sparse_part(part, torch.tensor([[1, 3, 1]]))  # a candidate may repeat
    torch.testing.assert_close(sent.dense(5), torch.tensor([[1 / 6, 3.0, 1 / 6, 2.0, 1 / 6]]))
    torch.testing.assert_close(sent.dense(5).sum(-1), part.sum(-1))  # the part's total is kept


def test_a_log_mass_part_keeps_its_mass_and_every_token_a_candidate_is_the_part():
    log_mass = torch.log_softmax(torch.randn(4, 30, generator=torch.Generator().manual_seed(0)), dim=-1)
    sent = distributed_ensemble.sparse_part(log_mass, log_mass.topk(5, dim=-1).indices, log_space=True)
    torch.testing.assert_close(sent.dense(30).exp().sum(-1), torch.ones(4))
    every = torch.arange(30).expand(4, 30)
    torch.testing.assert_close(distributed_ensemble.sparse_part(log_mass, every, log_space=True).dense(30), log_mass)


def test_sums_are_exact_at_every_candidate_so_the_exact_winner_wins_when_it_is_one():
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randn(6, 50, generator=generator) for _ in range(3)]
    exact = {"sum": sum(parts), "log_sum_exp": torch.logsumexp(torch.stack(parts), dim=0)}
    reconstruct = {"sum": distributed_ensemble.top_k_sum, "log_sum_exp": distributed_ensemble.top_k_log_sum_exp}
    for name, function in reconstruct.items():
        candidates = top_k_candidates(parts, 3)
        sent = [distributed_ensemble.sparse_part(part, candidates, name == "log_sum_exp") for part in parts]
        approximate = function(sent, 50)
        torch.testing.assert_close(approximate.gather(-1, candidates), exact[name].gather(-1, candidates))
        winner_is_candidate = (candidates == exact[name].argmax(-1, keepdim=True)).any(-1)
        assert winner_is_candidate.any()
        assert torch.equal(approximate.argmax(-1)[winner_is_candidate], exact[name].argmax(-1)[winner_is_candidate])


# --- the same answers as one process ----------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3])
def test_processes_give_the_one_process_ensembles_greedy_answers_and_ce_in_every_mode(tmp_path, saved, world_size):
    root, expected = saved
    processes = launch([str(PROBE), str(tmp_path), *(str(root / mode) for mode in COMBINE_MODES)], world_size)
    outcomes = finish(processes, timeout=300)
    assert all(code == 0 for code, _ in outcomes), [err[-3000:] for _, err in outcomes]
    results = [json.loads((tmp_path / f"rank_{rank}.json").read_text()) for rank in range(world_size)]
    for mode in COMBINE_MODES:
        held = [i for result in results for i in result[mode]["members"]]
        assert held == [0, 1, 2]  # every member held once
        for result in results:
            got = result[mode]
            assert got["answers"] == expected[mode]["answers"], mode
            assert got["ce"] == pytest.approx(expected[mode]["ce"], rel=1e-6, abs=1e-6), mode
            # Top-4 of a 400-token vocabulary, measured against the exact path of the same pass (the tail is
            # flattened, so the CE differs); with every entry sent, it is the exact path.
            assert got["topk_exact_ce"] == pytest.approx(got["ce"], rel=1e-6)
            assert 0.0 <= got["topk_greedy_differs"] < 0.5 and got["topk_ce"] != got["ce"]
            assert got["topk_all_greedy_differs"] == 0.0
            assert got["topk_all_ce"] == pytest.approx(got["ce"], rel=1e-5)


# --- refused at start ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("difference", ["combine mode", "tokenizer"])
def test_processes_that_loaded_different_ensembles_are_refused_by_name(tmp_path, saved, difference):
    root, _ = saved
    if difference == "combine mode":
        other, what = root / "probs", "ensemble config.json"
    else:  # the same ensemble beside another tokenizer
        other, what = tmp_path / "other_tokenizer", "tokenizer vocabulary"
        ModelEnsemble.from_pretrained(root / "logits").save_pretrained(other, build_tokenizer("chatml", 300))
    processes = launch([PROBE, tmp_path / "out", root / "logits"], 2,
                       rank_args={1: [PROBE, tmp_path / "out", other]})
    for code, err in finish(processes, timeout=180):
        assert code == 2, err[-2000:]
        assert f"rank 1 ({other}) has a different {what} from rank 0 ({root / 'logits'})" in err, err[-2000:]
    assert not (tmp_path / "out").exists()  # nothing decoded


def test_a_dead_process_stops_the_others_within_the_time_out_naming_it(tmp_path, saved):
    root, _ = saved
    timeout = 20
    started = time.monotonic()
    processes = launch([str(PROBE), str(tmp_path), str(root / "logits"), "--timeout", str(timeout), "--fault",
                        "2:3:die"], 3)
    outcomes = finish(processes, timeout=180)
    elapsed = time.monotonic() - started
    assert outcomes[2][0] == -9  # killed
    for code, err in outcomes[:2]:
        assert code == 1, err[-2000:]
        assert "rank 2 of the ensemble's 3 processes stopped answering" in err, err[-2000:]
    assert elapsed < 60  # process start-up included; the survivors stop at once, not at the 20 s time-out


def test_a_stalled_process_stops_the_others_after_the_time_out_naming_it(tmp_path, saved):
    root, _ = saved
    timeout = 8
    processes = launch([str(PROBE), str(tmp_path), str(root / "logits"), "--timeout", str(timeout), "--fault",
                        "1:3:stall"], 2)
    outcome = finish(processes[:1], timeout=120)
    processes[1].kill()
    processes[1].communicate()
    code, err = outcome[0]
    assert code == 1, err[-2000:]
    assert "rank 1 of the ensemble's 2 processes stopped answering" in err
    assert f"past the {timeout} s time-out" in err
