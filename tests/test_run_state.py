"""run_state: atomic files, complete checkpoints only, disk-space refusal, preemption signals."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import run_state
from conftest import accelerate_launch


def test_only_complete_checkpoints_count(tmp_path):
    for step, state in [(2, "{}"), (4, '{"global_st'), (6, None)]:  # 4: cut short; 6: state never written
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-final").mkdir()
    assert run_state.latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert run_state.latest_complete_checkpoint(tmp_path / "missing") is None


def test_replacing_rows_drops_a_round_and_a_cut_short_row(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("round,model,ce\n0,student,1.5\n1,student,1.2\n1,ensem")  # killed mid-row
    run_state.replace_csv_rows(path, ["round", "model", "ce"], lambda row: row["round"] != "1",
                               [{"round": 1, "model": "student", "ce": 1.1}])
    assert path.read_text().splitlines() == ["round,model,ce", "0,student,1.5", "1,student,1.1"]
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv"]  # no temporary file left


def test_manifest_writes_are_atomic_and_round_status_defaults_to_pending(tmp_path):
    manifest = run_state.new_manifest("abc", 3)
    manifest["rounds"]["0"] = "done"
    run_state.write_manifest(tmp_path, manifest)
    assert run_state.load_manifest(tmp_path) == manifest
    assert run_state.round_status(manifest, 0) == "done" and run_state.round_status(manifest, 1) == "pending"
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]
    assert run_state.load_manifest(tmp_path / "elsewhere") is None


def test_not_enough_disk_names_the_bytes_needed(tmp_path, monkeypatch):
    monkeypatch.setattr(run_state.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(run_state.DiskSpaceError, match="1,000 bytes free, but the next checkpoints need about "
                                                       "240,000 bytes \\(10,000 parameters"):
        run_state.check_disk_space(tmp_path, 10_000)
    monkeypatch.undo()
    run_state.check_disk_space(tmp_path, 10)  # a real disk has room for 240 bytes


def test_a_preemption_signal_stops_training_at_the_step_boundary():
    preemption = run_state.PreemptionSignal()
    previous = {signum: signal.getsignal(signum) for signum in preemption.SIGNALS}
    try:
        preemption.install()
        callback = run_state.StopOnSignal(preemption)
        control = type("Control", (), {"should_save": False, "should_training_stop": False})()
        args = type("Args", (), {"device": torch.device("cpu")})()
        callback.on_step_end(args, None, control)
        assert not control.should_save and not control.should_training_stop
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal: still one clean stop
        callback.on_step_end(args, None, control)
        assert control.should_save and control.should_training_stop
        assert preemption.received == signal.SIGTERM
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_saving_a_member_leaves_a_complete_folder_only(tmp_path, tokenizer, tiny_llama):
    run_state.save_member_atomically(tiny_llama, tokenizer, tmp_path / "member_0")
    assert sorted(os.listdir(tmp_path)) == ["member_0"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "member_0"))
    assert json.loads((tmp_path / "member_0" / "config.json").read_text())["model_type"] == "llama"


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    """Only process 1 receives SIGUSR1; both stop after the first step (process 0 alone training on would wait
    forever for process 1's gradients) and both report the run as preempted."""
    out = tmp_path / "out.pt"
    accelerate_launch([str(Path(__file__).parent / "distributed_probe.py"), str(out), "--batch_size", "2",
                       "--grad_accum", "2", "--max_steps", "3", "--signal_rank", "1", "--work_dir", str(tmp_path)],
                      2, tmp_path, timeout=180)  # without the agreement, process 0 waits forever
    result = torch.load(out)
    assert result["steps_done"] == [1, 1]
    assert result["stopped_by_signal"] == [True, True]
