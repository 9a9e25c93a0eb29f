"""generate.py: chat with a saved ensemble or one member, streamed."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_tokenizer, damage_second_half, run_test_preset
from ensemble import ModelEnsemble
import generate
from slm_ensembles import distributed_ensemble
from slm_ensembles.answer_text import shown_answer
from slm_ensembles.processes import EXIT_BAD_INPUT, run_command


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return run_test_preset(tmp_path_factory.mktemp("generate"))


def test_the_answer_is_streamed_and_is_the_ensembles_greedy_decode(run_dir, capsys):
    capsys.readouterr()
    answer = generate.main([str(run_dir), "Tell me the capital of France.", "--max_new_tokens", "8"])
    assert answer and capsys.readouterr().out.strip() == answer.strip()
    tokenizer = build_tokenizer("chatml")
    ensemble = ModelEnsemble.from_pretrained(run_dir / "ensemble")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me the capital of France."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    expected = ensemble.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert answer == shown_answer(tokenizer, expected[0, prompt["input_ids"].shape[1]:])


def test_one_member_answers_alone_and_a_missing_ensemble_is_explained(run_dir, tmp_path):
    torch.manual_seed(0)
    alone = generate.main([str(run_dir), "Hello", "--member", "1", "--max_new_tokens", "6"])
    assert isinstance(alone, str)
    with pytest.raises(FileNotFoundError, match="no saved ensemble here"):
        generate.main([str(tmp_path), "Hello"])


def test_a_member_folder_is_loaded_as_the_single_model_it_is(run_dir):
    member_folder = run_dir / "ensemble" / "member_0"
    alone = generate.main([str(member_folder), "Hello", "--max_new_tokens", "6"])
    assert alone == generate.main([str(run_dir), "Hello", "--member", "0", "--max_new_tokens", "6"])
    with pytest.raises(generate.MemberError, match=r"--member 0: .*member_0 holds a single 'llama' model"):
        generate.main([str(member_folder), "Hello", "--member", "0"])


def test_a_member_that_does_not_exist_is_refused_naming_those_that_do(run_dir):
    with pytest.raises(generate.MemberError, match=r"--member 5: the ensemble in .* has 2 member\(s\), numbered 0 to"):
        generate.main([str(run_dir), "Hello", "--member", "5"])
    with pytest.raises(generate.MemberError, match="--member -1"):
        generate.main([str(run_dir), "Hello", "--member", "-1"])


@pytest.fixture(scope="module")
def damaged_run(run_dir, tmp_path_factory):
    """A copy of the run's ensemble whose member_1 has other bytes in the second half of its weights (the same
    size): what its checksums.json records no longer."""
    copy = tmp_path_factory.mktemp("damaged") / "run_1"
    shutil.copytree(run_dir / "ensemble", copy / "ensemble")
    damage_second_half(copy / "ensemble" / "member_1" / "model.safetensors")
    return copy


def test_a_damaged_member_is_refused_naming_the_file_with_exit_code_2_and_no_traceback(damaged_run):
    """As a new user would run it: the command line, not main()."""
    weights = damaged_run / "ensemble" / "member_1" / "model.safetensors"
    result = subprocess.run([sys.executable, "generate.py", str(damaged_run), "Hello", "--max_new_tokens", "2"],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-3000:]
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert f"error: {weights}: holds " in result.stderr
    assert "is damaged and nothing was loaded from it; restore the folder from an intact copy" in result.stderr


@pytest.mark.parametrize("where", [["{run}", "--member", "1"], ["{run}/ensemble/member_1"]],
                         ids=["--member", "the member's folder"])
def test_a_damaged_member_loaded_alone_is_refused_too(damaged_run, where, capsys):
    argv = [part.format(run=damaged_run) for part in where]
    assert run_command(lambda: generate.main([argv[0], "Hello", *argv[1:]]), generate.REFUSALS) == EXIT_BAD_INPUT
    weights = damaged_run / "ensemble" / "member_1" / "model.safetensors"
    assert capsys.readouterr().err.startswith(f"error: {weights}: holds ")
    assert generate.main([str(damaged_run), "Hello", "--member", "0", "--max_new_tokens", "2"])  # member_0 is intact


class RecordingHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_generating_logs_no_warning_about_the_ensembles_model_type(run_dir):
    """transformers' loggers do not propagate to the root logger (caplog's): listen on theirs."""
    handler = RecordingHandler()
    logging.getLogger("transformers").addHandler(handler)
    try:
        generate.main([str(run_dir), "Hello", "--max_new_tokens", "2"])
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [message for message in handler.messages if "to instantiate a model of type" in message]


def test_two_processes_decode_the_one_process_answer(run_dir):
    expected = generate.main([str(run_dir), "Hello", "--max_new_tokens", "12"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "generate.py", str(run_dir), "Hello", "--max_new_tokens", "12", "--distributed"],
                            cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == expected.strip()  # streamed once, by rank 0


def test_distributed_without_a_launcher_is_told_how_to_launch(run_dir, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(distributed_ensemble.LaunchError, match="launch it with torchrun"):
        generate.main([str(run_dir), "Hello", "--distributed"])
