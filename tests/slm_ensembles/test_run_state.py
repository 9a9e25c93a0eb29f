"""run_state: atomic files, complete checkpoints only, disk-space refusal, preemption signals."""

import csv
import dataclasses
import datetime
import errno
import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import checksums
import config as config_lib
import utils
from conftest import accelerate_launch, build_tiny_llama, damage_second_half, free_disk, write_remote_code_config
from slm_ensembles import compute, files, processes, run_state, students


def test_only_complete_checkpoints_count(tmp_path):
    for step, state in [(2, "{}"), (4, '{"global_st'), (6, None)]:  # 4: cut short; 6: state never written
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-final").mkdir()
    assert run_state.latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert run_state.latest_complete_checkpoint(tmp_path / "missing") is None


def test_with_several_processes_a_checkpoint_needs_every_process_rng_state(tmp_path):
    """Process 0 writes trainer_state.json without waiting for the others' RNG files: a kill can leave it without
    rng_state_1.pth, and a process resumed without its RNG state would draw other random numbers."""
    rng_files = {2: ["rng_state_0.pth", "rng_state_1.pth"], 4: ["rng_state_0.pth"],  # 4: process 1's RNG never written
             6: ["rng_state.pth"]}  # 6: written by a single process
    for step, names in rng_files.items():
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in [*names, "trainer_state.json"]:
            (folder / name).write_text("{}")
    assert run_state.latest_complete_checkpoint(tmp_path, num_processes=2) == tmp_path / "checkpoint-6"
    (tmp_path / "checkpoint-6" / "trainer_state.json").unlink()
    assert run_state.latest_complete_checkpoint(tmp_path, num_processes=2) == tmp_path / "checkpoint-2"
    assert run_state.latest_complete_checkpoint(tmp_path, num_processes=3) is None
    assert run_state.latest_complete_checkpoint(tmp_path, num_processes=1) == tmp_path / "checkpoint-4"


def checkpoint_with_checksums(folder: Path, step: int) -> Path:
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (checkpoint / "optimizer.pt").write_bytes(bytes(range(256)) * 8)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    files.write_checksums(checkpoint)
    return checkpoint


CHECKPOINT_DAMAGE = {  # what is done to checkpoint-2: the file, the change, and what the warning says of it
    "model cut short": ("model.safetensors", lambda path: path.write_bytes(bytes(range(256)) * 2),
                        ": holds 512 bytes, but 1,024 when it was written"),
    "optimizer overwritten, same size": ("optimizer.pt", lambda path: path.write_bytes(bytes(2048)),
                                         ": holds 2,048 bytes with sha256 "),
    "trainer state emptied": ("trainer_state.json", lambda path: path.write_text(""),
                              ": holds 0 bytes, but 18 when it was written"),
    "model removed": ("model.safetensors", lambda path: path.unlink(), " is missing"),
    "checksums overwritten": (checksums.CHECKSUMS, lambda path: path.write_bytes(b"\xff" * 10), " is unreadable"),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_a_damaged_checkpoint_is_passed_over_for_the_newest_intact_one_by_name(tmp_path, damage, capsys):
    older, newest = (checkpoint_with_checksums(tmp_path, step) for step in (1, 2))
    assert run_state.latest_complete_checkpoint(tmp_path) == newest
    name, change, problem = CHECKPOINT_DAMAGE[damage]
    change(newest / name)
    assert run_state.latest_complete_checkpoint(tmp_path) == older
    warning = capsys.readouterr().out
    assert warning.startswith(f"warning: {newest / name}{problem}")
    assert warning.endswith(f": checkpoint {newest} is damaged, so the round resumes from an older one (or from its "
                            "start) and writes it again\n")
    change(older / name)
    assert run_state.latest_complete_checkpoint(tmp_path) is None


def test_the_newest_checkpoint_is_the_one_of_the_highest_step_not_the_last_name(tmp_path):
    checkpoint_with_checksums(tmp_path, 9)
    tenth = checkpoint_with_checksums(tmp_path, 10)
    (tmp_path / "checkpoint-notes").mkdir()  # not a step: ignored
    assert run_state.latest_complete_checkpoint(tmp_path) == tenth
    assert run_state.latest_complete_checkpoint(tmp_path / "missing") is None


def test_a_checkpoint_written_before_checksums_is_taken_as_before(tmp_path):
    recorded = checkpoint_with_checksums(tmp_path, 1)
    unrecorded = checkpoint_with_checksums(tmp_path, 2)
    (unrecorded / checksums.CHECKSUMS).unlink()
    (unrecorded / "model.safetensors").write_bytes(b"other bytes")  # nothing tells this from its first content
    assert run_state.latest_complete_checkpoint(tmp_path) == unrecorded
    (unrecorded / "trainer_state.json").unlink()  # and without its trainer state it is incomplete, as before
    assert run_state.latest_complete_checkpoint(tmp_path) == recorded


def test_a_damaged_member_is_refused_by_name(tmp_path, tokenizer, tiny_llama):
    member = tmp_path / "member_0"
    run_state.save_member_atomically(tiny_llama, tokenizer, member, {"steps_run": 3})
    recorded = json.loads((member / checksums.CHECKSUMS).read_text())
    assert sorted(recorded) == sorted(path.name for path in member.iterdir() if path.name != checksums.CHECKSUMS)
    files.check_intact(member, "delete it")
    weights = member / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[:-8] + bytes(8))  # the last weights zeroed: it still loads, silently wrong
    with pytest.raises(config_lib.ConfigError) as error:
        files.check_intact(member, "delete it")
    assert str(error.value) == (f"{weights}: holds {len(intact):,} bytes with sha256 "
                                f"{checksums.file_record(weights)['sha256']}, but had sha256 "
                                f"{recorded['model.safetensors']['sha256']} when it was written: {member} is damaged "
                                "and nothing was loaded from it; delete it")


def test_a_saved_student_is_loaded_in_float32_only_when_intact_and_its_training_record_read(tmp_path, tokenizer,
                                                                                              tiny_llama):
    member = tmp_path / "member_0"
    run_state.save_member_atomically(tiny_llama.to(torch.bfloat16), tokenizer, member, {"steps_run": 3})
    loaded = run_state.load_intact(member, "delete it", False, torch.device("cpu"))
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    for (name, saved), (_, back) in zip(tiny_llama.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(back, saved.float(), msg=name)
    assert run_state.training_record(member) == {"steps_run": 3}
    assert run_state.training_record(tmp_path / "saved_without_one") == {}
    damage_second_half(member / "model.safetensors")
    with pytest.raises(config_lib.ConfigError, match=r"model.safetensors: holds .* is damaged and nothing was "
                                                     r"loaded from it; delete it$"):
        run_state.load_intact(member, "delete it", False, torch.device("cpu"))


def test_the_earlier_members_are_loaded_frozen_in_round_order(tmp_path, tokenizer):
    members = [build_tiny_llama(tokenizer, seed=seed) for seed in (1, 2)]
    for index, member in enumerate(members):
        member.save_pretrained(tmp_path / "ensemble" / f"member_{index}")
    config = config_lib.build_config("test", overrides={"dtype": "bfloat16"})
    manifest = {"members": ["ensemble/member_0", "ensemble/member_1"]}
    loaded = run_state.earlier_members(config, tmp_path, manifest, torch.device("cpu"))
    assert len(loaded) == 2 and all(not model.training and model.dtype == torch.bfloat16 for model in loaded)
    for model, member in zip(loaded, members):
        torch.testing.assert_close(model.lm_head.weight, member.lm_head.weight.bfloat16())
    assert run_state.earlier_members(config, tmp_path, {"members": []}, torch.device("cpu")) == ()
    auto = dataclasses.replace(config, dtype="auto")  # bf16 where this CPU computes it natively, else fp32
    (model,) = run_state.earlier_members(auto, tmp_path, {"members": ["ensemble/member_0"]}, torch.device("cpu"))
    assert model.dtype == utils.frozen_dtype("auto", torch.device("cpu"))


def test_a_member_whose_code_comes_with_it_is_loaded_only_when_its_code_is_trusted(tmp_path, tokenizer, tiny_llama):
    """A student of a remote-code model family (auto_map, as some hub models) is saved with its code; resuming or
    freezing it passes the run's trust_remote_code on to the loader, and without trust it is refused."""
    write_remote_code_config(tmp_path, tiny_llama.config.to_dict(), "remote_llama_member")
    remote = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path, trust_remote_code=True),
                                              trust_remote_code=True)
    run_state.save_member_atomically(remote, tokenizer, tmp_path / "ensemble" / "member_0", {"steps_run": 1})
    manifest = {"members": ["ensemble/member_0"]}
    untrusted = config_lib.build_config("test")
    assert not untrusted.trust_remote_code
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # before any trusted load registers its class
        run_state.load_intact(tmp_path / "ensemble" / "member_0", "delete it", False, torch.device("cpu"))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        run_state.earlier_members(untrusted, tmp_path, manifest, torch.device("cpu"))
    resumed = run_state.load_intact(tmp_path / "ensemble" / "member_0", "delete it", True, torch.device("cpu"))
    trusted = dataclasses.replace(untrusted, trust_remote_code=True)
    (frozen,) = run_state.earlier_members(trusted, tmp_path, manifest, torch.device("cpu"))
    assert type(resumed).__name__ == type(frozen).__name__ == "RemoteLlamaForCausalLM"
    torch.testing.assert_close(resumed.lm_head.weight, remote.lm_head.weight)  # resumed in float32, frozen in bf16


def test_a_requeued_job_finds_the_run_it_started_by_its_id(tmp_path):
    for name, job_id in (("run_1", "41"), ("run_2", None), ("run_3", "42")):
        (tmp_path / "2026-12-01" / name).mkdir(parents=True)
        run_state.write_manifest(tmp_path / "2026-12-01" / name, run_state.new_manifest("abc", 0, 0, 1, job_id))
    assert run_state.find_run_of_job(tmp_path, "42") == str(tmp_path / "2026-12-01" / "run_3")
    assert run_state.find_run_of_job(tmp_path, 41) == str(tmp_path / "2026-12-01" / "run_1")  # as SLURM gives it
    assert run_state.find_run_of_job(tmp_path, "43") is None


def test_a_round_the_disk_cannot_hold_is_refused_before_the_run_folder_exists(tmp_path, monkeypatch, tiny_teacher_dir):
    config = config_lib.build_config("test", overrides={"output_root": str(tmp_path / "new" / "runs"),
                                                        "keep_checkpoints": 2})
    teacher, tokenizer = utils.load_causal_lm(str(tiny_teacher_dir)), utils.load_tokenizer(str(tiny_teacher_dir))
    skeleton = students.student_skeleton(config, teacher, tokenizer)
    needed = run_state.round_bytes(skeleton, tokenizer, config)
    monkeypatch.setattr(files.shutil, "disk_usage", free_disk(needed - 1))
    with pytest.raises(files.DiskSpaceError) as error:
        run_state.check_disk_before_the_run_folder(config, None, config, teacher, tokenizer)
    assert str(error.value) == (
        f"{tmp_path / 'new' / 'runs'}: {needed - 1:,} bytes free, but about {needed:,} bytes are needed for a round's "
        f"checkpoints, best weights and member ({compute.parameter_count(skeleton):,} parameters with their "
        "optimizer state, 2 checkpoints kept); free some space or point output_root elsewhere")
    assert list((tmp_path / "new" / "runs").iterdir()) == []  # the output folder, its parents, no run folder
    monkeypatch.setattr(files.shutil, "disk_usage", free_disk(needed))
    run_state.check_disk_before_the_run_folder(config, None, config, teacher, tokenizer)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    monkeypatch.setattr(files.shutil, "disk_usage", free_disk(needed - 1))
    with pytest.raises(files.DiskSpaceError, match=f"^{re.escape(str(resumed))}: "):  # a resume's own folder
        run_state.check_disk_before_the_run_folder(config, resumed, config, teacher, tokenizer)


def test_manifest_writes_are_atomic_and_list_every_planned_round(tmp_path):
    manifest = run_state.new_manifest("abc", 3, 5, rounds=2, job_id="42")
    assert manifest["rounds"] == {"0": "pending", "1": "pending"}
    manifest["rounds"]["0"] = "done"
    run_state.write_manifest(tmp_path, manifest)
    assert run_state.load_manifest(tmp_path) == manifest
    assert run_state.round_status(manifest, 0) == "done" and run_state.round_status(manifest, 1) == "pending"
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]
    assert run_state.load_manifest(tmp_path / "elsewhere") is None
    # A grown total_rounds adds pending rounds and keeps the statuses of the others.
    assert run_state.planned_rounds({"0": "done", "1": "training"}, 3) == {"0": "done", "1": "training",
                                                                          "2": "pending"}


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir())


@pytest.mark.parametrize("shape, slack", [({}, 1.25), ({"hidden_size": 8, "num_layers": 12}, 1.5)],
                         ids=["few_large_tensors", "many_small_tensors"])
def test_the_disk_estimates_hold_a_real_checkpoint_and_member_and_count_the_checkpoints_kept(tmp_path, tokenizer,
                                                                                              chats, shape, slack):
    """A checkpoint written by the trainer of the rounds (with its checksums) and a member folder, measured: each
    estimate is at least what was written and less than `slack` times it (the optimizer's file, half as much above
    it). Of many small tensors (12 layers 8 wide) each file's per-tensor records make about half of the checkpoint,
    where the estimate's margins weigh most."""
    from datasets import Dataset
    from trl import SFTConfig

    from slm_ensembles.losses import LossSettings
    from preprocess_dataset import tokenize_conversation
    from train import DistillationTrainer

    rows = [tokenize_conversation(chat["messages"], tokenizer, max_length=64) for chat in chats[:4]]
    args = SFTConfig(output_dir=str(tmp_path / "checkpoints"), use_cpu=True, report_to=[], max_steps=1,
                     save_strategy="steps", save_steps=1, per_device_train_batch_size=2, remove_unused_columns=False,
                     dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, bf16=False,
                     activation_checkpointing=False)
    student = build_tiny_llama(tokenizer, **shape).train()
    DistillationTrainer(student, None, [], LossSettings(alpha=0.0), len(tokenizer), args,
                        Dataset.from_list([row for row in rows if row is not None]), tokenizer,
                        callbacks=[run_state.RecordChecksums()]).train()
    checkpoint = tmp_path / "checkpoints" / "checkpoint-1"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / checksums.CHECKSUMS).is_file()
    written = folder_bytes(checkpoint)
    assert written <= run_state.checkpoint_bytes(student, tokenizer) < slack * written
    moments = (run_state.checkpoint_bytes(student, tokenizer) - run_state.member_bytes(student, tokenizer)
               - run_state.TRAINER_FILES_BYTES)  # the estimate's part for the optimizer's file, which it fits closer
    optimizer = (checkpoint / "optimizer.pt").stat().st_size
    assert optimizer <= moments < (1 + (slack - 1) / 2) * optimizer
    run_state.save_member_atomically(student, tokenizer, tmp_path / "member_0", {"steps_run": 1})
    written = folder_bytes(tmp_path / "member_0")
    assert written <= run_state.member_bytes(student, tokenizer) < slack * written

    one_checkpoint, member = run_state.checkpoint_bytes(student, tokenizer), run_state.member_bytes(student, tokenizer)
    kept_2 = config_lib.build_config("test", overrides={"keep_checkpoints": 2})
    assert run_state.round_bytes(student, tokenizer, kept_2) == 3 * one_checkpoint + member  # written, then pruned
    kept_4 = config_lib.build_config("test", overrides={"keep_checkpoints": 4, "eval_steps": 1})
    assert run_state.round_bytes(student, tokenizer, kept_4) == 5 * one_checkpoint + 2 * member  # and the best


def test_a_member_save_the_disk_cannot_take_keeps_the_member_saved_before_and_a_killed_saves_leftovers_go(
        tmp_path, tokenizer, tiny_llama, monkeypatch):
    """Saving a member again (a resumed round): a write that fails for want of disk stops with DiskSpaceError saying
    where, how much and what to do, and the member saved before is still there, intact. A staging folder left by a
    save that was killed is cleared, not carried into the member."""
    member = tmp_path / "ensemble" / "member_0"
    run_state.save_member_atomically(tiny_llama, tokenizer, member, {"steps_run": 1})
    before = file_bytes(member)
    retrained = build_tiny_llama(tokenizer, seed=1)

    def full_after_the_config(directory, *args, **kwargs):
        Path(directory).mkdir()
        (Path(directory) / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / "model.safetensors"))

    with monkeypatch.context() as patch:
        patch.setattr(retrained, "save_pretrained", full_after_the_config)
        patch.setattr(files.shutil, "disk_usage", free_disk(1000))
        with pytest.raises(files.DiskSpaceError) as error:
            run_state.save_member_atomically(retrained, tokenizer, member, {"steps_run": 2})
    needed = run_state.member_bytes(retrained, tokenizer)
    assert str(error.value) == (
        f"{member.parent}: the disk is full: writing member_0 failed ([Errno 28] No space left on device: "
        f"'{member.parent / 'member_0.tmp' / 'model.safetensors'}'); about {needed:,} bytes are needed there, 1,000 "
        "are free; what was saved before is kept: free some space, then continue the run with `python main.py "
        "--resume` and its run folder")
    assert file_bytes(member) == before
    files.check_intact(member, "delete it")

    (member.parent / "member_0.tmp" / "stale.bin").write_bytes(b"from the killed save")
    run_state.save_member_atomically(retrained, tokenizer, member, {"steps_run": 2})
    assert sorted(os.listdir(member.parent)) == ["member_0"]
    assert "stale.bin" not in os.listdir(member) and run_state.training_record(member) == {"steps_run": 2}
    files.check_intact(member, "delete it")


def test_a_full_disk_while_the_ensemble_configs_are_written_keeps_the_previous_rounds_files(tmp_path, tokenizer,
                                                                                            tiny_llama, monkeypatch):
    """Round 1's configs: the tokenizer's write fails halfway for want of disk. The run stops with DiskSpaceError
    (exit code 2) naming the folder and the bytes needed, and the folder still holds round 0's ensemble, whole."""
    from ensemble import ModelEnsemble

    folder = tmp_path / "ensemble"
    members = [tiny_llama, build_tiny_llama(tokenizer, seed=1)]
    for index, member in enumerate(members):
        member.save_pretrained(folder / f"member_{index}")
    run_state.save_ensemble_configs(ModelEnsemble.from_members(members[:1], vocab_size=len(tokenizer)), tokenizer,
                                    folder)
    round_0 = file_bytes(folder)
    save_tokenizer = tokenizer.save_pretrained

    def half_then_full(directory, *args, **kwargs):
        save_tokenizer(directory, *args, **kwargs)
        written = Path(directory) / "tokenizer.json"
        written.write_bytes(written.read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(written))

    round_1 = ModelEnsemble.from_members(members, vocab_size=len(tokenizer))
    with monkeypatch.context() as patch:
        patch.setattr(tokenizer, "save_pretrained", half_then_full)
        with pytest.raises(files.DiskSpaceError) as error:
            run_state.save_ensemble_configs(round_1, tokenizer, folder)
    assert str(error.value).startswith(f"{folder}: the disk is full: writing the ensemble's configs failed ([Errno "
                                       "28] No space left on device: ")
    needed = run_state.saved_tokenizer_bytes(tokenizer) + run_state.CONFIG_BYTES
    assert f"; about {needed:,} bytes are needed there" in str(error.value)
    assert str(error.value).endswith(" are free; the previous round's are kept: free some space, then "
                                     "continue the run with `python main.py --resume` and its run folder")
    assert file_bytes(folder) == round_0 and sorted(os.listdir(folder)) == sorted([*round_0, "member_0", "member_1"])
    assert json.loads((folder / "config.json").read_text())["member_subfolders"] == ["member_0"]
    run_state.save_ensemble_configs(round_1, tokenizer, folder)  # once there is room
    assert json.loads((folder / "config.json").read_text())["member_subfolders"] == ["member_0", "member_1"]
    assert ".configs.tmp" not in os.listdir(folder)


def test_the_disk_is_checked_before_each_checkpoint_write(tmp_path, monkeypatch):
    callback = run_state.CheckDiskBeforeSave(tmp_path, checkpoint_bytes=5000)
    args = type("Args", (), {"device": torch.device("cpu")})()
    state = type("State", (), {"global_step": 7})()
    control = type("Control", (), {"should_save": False, "should_training_stop": False})()
    monkeypatch.setattr(files.shutil, "disk_usage", free_disk(4999))
    assert callback.on_step_end(args, state, control) is control  # no write this step: nothing to check
    control.should_save = True
    with pytest.raises(files.DiskSpaceError) as error:
        callback.on_step_end(args, state, control)
    assert str(error.value).startswith(f"{tmp_path}: 4,999 bytes free, but about 5,000 bytes are needed for the "
                                       "checkpoint of step 7; training stopped before writing it, the earlier "
                                       "checkpoints are kept")
    assert f"python main.py --resume {tmp_path}" in str(error.value)
    monkeypatch.setattr(files.shutil, "disk_usage", free_disk(5000))
    assert callback.on_step_end(args, state, control) is control and control.should_save


def test_a_full_disk_on_another_process_stops_this_one_at_the_same_step_saying_where(tmp_path, monkeypatch):
    callback = run_state.CheckDiskBeforeSave(tmp_path, checkpoint_bytes=5000)
    args = type("Args", (), {"device": torch.device("cpu")})()
    state = type("State", (), {"global_step": 7})()
    control = type("Control", (), {"should_save": True, "should_training_stop": False})()
    monkeypatch.setattr(files.shutil, "disk_usage", free_disk(10 ** 9))  # room here
    asked = []
    monkeypatch.setattr(processes, "any_process", lambda flag, device: asked.append((flag, device)) or True)
    with pytest.raises(files.DiskSpaceError) as error:
        callback.on_step_end(args, state, control)
    assert str(error.value) == (f"another process found too little free disk for the checkpoint of step 7 in "
                                f"{tmp_path}; see its message")
    assert asked == [(False, torch.device("cpu"))]  # this process's own finding, on the training device


def test_a_preemption_signal_stops_training_at_the_step_boundary():
    preemption = processes.PreemptionSignal()
    try:
        preemption.install()
        callback = processes.StopOnSignal(preemption)
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
        preemption.restore()


def test_the_signal_handler_writes_without_print_and_main_gets_its_handlers_back(monkeypatch, capfd):
    """print() inside a handler can raise (a reentrant write to the buffered stdout the main code was writing to):
    the handler writes to the stderr file descriptor instead."""
    def no_print(*args, **kwargs):
        raise AssertionError("print() called from the signal handler")

    def test_handler(signum, frame):
        raise AssertionError("the test's own handler ran while PreemptionSignal was installed")

    previous = signal.signal(signal.SIGUSR1, test_handler)
    try:
        preemption = processes.PreemptionSignal().install()
        monkeypatch.setattr("builtins.print", no_print)
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # reported once
        monkeypatch.undo()
        preemption.restore()
        assert preemption.received == signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) is test_handler
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert capfd.readouterr().err.count(f"signal SIGUSR1: checkpointing at the next step, then exiting with code "
                                        f"{processes.EXIT_PREEMPTED}") == 1


def test_saving_a_member_leaves_a_complete_folder_only(tmp_path, tokenizer, tiny_llama):
    run_state.save_member_atomically(tiny_llama, tokenizer, tmp_path / "member_0")
    assert sorted(os.listdir(tmp_path)) == ["member_0"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "member_0"))
    assert json.loads((tmp_path / "member_0" / "config.json").read_text())["model_type"] == "llama"


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    """Only process 1 receives SIGUSR1; both stop after the first step (process 0 alone training on would wait
    forever for process 1's gradients) and both report the run as preempted. The checkpoint they write records
    every process's RNG state in its checksums, process 1's too, though it writes it 2 s after process 0 is done."""
    out = tmp_path / "out.pt"
    accelerate_launch([str(Path(__file__).resolve().parents[1] / "distributed_probe.py"), str(out), "--batch_size", "2",
                       "--grad_accum", "2", "--max_steps", "3", "--signal_rank", "1", "--slow_rank", "1",
                       "--work_dir", str(tmp_path)], 2, tmp_path, timeout=180)  # without the agreement, 0 waits forever
    result = torch.load(out)
    assert result["steps_done"] == [1, 1]
    assert result["stopped_by_signal"] == [True, True]
    checkpoint = tmp_path / "out_2" / "checkpoint-1"
    recorded = json.loads((checkpoint / checksums.CHECKSUMS).read_text())
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "optimizer.pt"} <= set(recorded)
    assert run_state.latest_complete_checkpoint(checkpoint.parent, num_processes=2) == checkpoint


def test_a_round_is_marked_training_and_its_log_rows_after_the_resumed_checkpoint_dropped(tmp_path):
    manifest = run_state.new_manifest("abc", 0, 0, 2)
    columns = ["round", "step", "loss"]
    files.replace_csv_rows(tmp_path / "train_log.csv", columns, lambda row: True,
                               [{"round": r, "step": s, "loss": 1.0} for r in (0, 1) for s in (1, 2, 3)])
    run_state.mark_round_training(tmp_path, manifest, 1, tmp_path / "checkpoint-2", columns)
    assert run_state.load_manifest(tmp_path)["rounds"] == {"0": "pending", "1": "training"}
    assert manifest["rounds"] == {"0": "pending", "1": "pending"}  # the caller's manifest is not changed
    with open(tmp_path / "train_log.csv") as f:
        kept = [(row["round"], row["step"]) for row in csv.DictReader(f)]
    assert kept == [("0", "1"), ("0", "2"), ("0", "3"), ("1", "1"), ("1", "2")]


LOG_REWRITES = {  # how the run rewrites each log: the training log when a round starts, samples.csv after a round
    "train_log.csv": lambda path, columns, rows: run_state.mark_round_training(
        path.parent, run_state.new_manifest("abc", 0, 0, 2), 1, None, columns),
    "samples.csv": lambda path, columns, rows: files.replace_csv_rows(path, columns,
                                                                          lambda row: row["round"] != "1", rows),
}


@pytest.mark.parametrize("name", list(LOG_REWRITES))
def test_a_log_that_is_not_utf8_is_moved_aside_as_it_is_by_name_and_started_afresh(tmp_path, name, capsys):
    path = tmp_path / name
    columns = ["round", "step", "answer"]
    files.write_csv_rows(path, columns, [{"round": 0, "step": 1, "answer": "a line\nand another"}])
    damaged = path.read_bytes().replace(b"another", b"an\xffther")
    path.write_bytes(damaged)
    new_rows = [{"round": 1, "step": 1, "answer": "new"}]
    LOG_REWRITES[name](path, columns, new_rows)
    (aside,) = tmp_path.glob(f"{name}.damaged-*")
    assert aside.read_bytes() == damaged
    assert files.read_csv_rows(path) == (files.csv_text_rows(columns, new_rows) if name == "samples.csv"
                                             else [])
    assert capsys.readouterr().err == (f"warning: {path} is not CSV text (bytes that are not UTF-8, say): moved as "
                                       f"it is to {aside}; {name} starts afresh with the rows written from now on\n")


def test_a_metrics_csv_that_is_not_utf8_is_restored_from_the_manifest(tmp_path, capsys):
    run_dir = written_run(tmp_path)
    columns = ["round", "model", "ce"]
    rows = files.csv_text_rows(columns, [{"round": 0, "model": "student", "ce": 1.5}])
    manifest = run_state.finished_round(run_state.load_manifest(run_dir), 0, "ensemble/member_0", None, rows)
    path = run_dir / "metrics.csv"
    files.write_csv_rows(path, columns, rows)
    whole = path.read_bytes()
    path.write_bytes(whole.replace(b"student", b"stud\xffnt"))
    run_state.restore_metric_rows(run_dir, columns, manifest)
    assert path.read_bytes() == whole
    assert capsys.readouterr().err == (f"warning: {path}: it is not CSV text; rewritten from the rows manifest.json "
                                       "recorded for the finished rounds, restoring round 0 student\n")


def test_a_finished_round_adds_its_member_and_leaves_no_checkpoints(tmp_path):
    manifest = run_state.new_manifest("abc", 0, 0, 2)
    rows = files.csv_text_rows(["round", "model", "ce"], [{"round": 0, "model": "student", "ce": 1.5}])
    done = run_state.finished_round(manifest, 0, "ensemble/member_0", [1.0], rows)
    assert done["rounds"] == {"0": "done", "1": "pending"} and done["members"] == ["ensemble/member_0"]
    assert done["weights"] == [1.0] and done["teacher_evaluated"] and not manifest["teacher_evaluated"]
    assert done["metric_rows"] == {"0": [{"round": "0", "model": "student", "ce": "1.5"}]}  # as metrics.csv holds them
    for index in (0, 1):
        (tmp_path / "checkpoints" / f"round_{index}" / "checkpoint-1").mkdir(parents=True)
    run_state.remove_finished_rounds_checkpoints(tmp_path, done)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round_1"]


class OneProcess:
    is_main_process = True


EXAMPLES = {"train": 7, "test": 3, "early_stop": 2}  # a run's split sizes, as main.py passes them


def written_run(tmp_path, **settings):
    """A run folder as open_run writes it (config.yaml and a manifest recording the settings), test preset."""
    config = config_lib.build_config("test", overrides={"output_root": str(tmp_path / "runs"), **settings})
    run_dir, _ = run_state.open_run(config, None, None, OneProcess(), "test", EXAMPLES)
    return run_dir


def file_bytes(folder: Path) -> dict:
    """The bytes of each file of `folder` (not of its subfolders), by name."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


CONFIG_DAMAGE = {
    "emptied": (lambda text: "", "(it is not a YAML mapping of settings)"),
    "cut to its first lines": (lambda text: "\n".join(text.splitlines()[:5]) + "\n", "max_examples is missing"),
    "overwritten with other bytes": (lambda text: "\x00\xff" * (len(text) // 2), "not a YAML mapping"),
    "edited": (lambda text: text.replace("learning_rate: 0.", "learning_rate: 9."), "learning_rate = 9."),
}


@pytest.mark.parametrize("damage", list(CONFIG_DAMAGE))
def test_a_damaged_config_yaml_is_refused_by_name_on_resume_and_nothing_is_rewritten(tmp_path, damage):
    run_dir = written_run(tmp_path)
    change, problem = CONFIG_DAMAGE[damage]
    path = run_dir / "config.yaml"
    path.write_bytes(change(path.read_text()).encode("latin-1"))
    before = file_bytes(run_dir)
    with pytest.raises(config_lib.ConfigError) as error:
        run_state.resumed_config(run_dir, {})
    assert str(error.value).startswith(f"{path} is not the configuration this run was written with")
    assert problem in str(error.value) and 'under "config": restore config.yaml' in str(error.value)
    assert file_bytes(run_dir) == before


def test_a_config_yaml_is_compared_setting_by_setting_as_its_types_read_it(tmp_path):
    run_dir = written_run(tmp_path, max_examples=None)
    path = run_dir / "config.yaml"
    text = path.read_text()
    assert "learning_rate: 0.001\n" in text and "max_examples: null\n" in text
    path.write_text(text.replace("learning_rate: 0.001\n", "learning_rate: '1e-3'\n"))  # text, the same number
    assert run_state.resumed_config(run_dir, {}).learning_rate == 0.001
    path.write_text(text.replace("max_examples: null\n", "max_examples: some\n").replace("\nseed: 0\n", "\nseed: 4\n"))
    with pytest.raises(config_lib.ConfigError) as error:
        run_state.resumed_config(run_dir, {})
    assert (f"{path} is not the configuration this run was written with (max_examples = 'some', but the run was "
            "written with max_examples = None; seed = 4, but the run was written with seed = 0): it was damaged or "
            "edited.") in str(error.value)


def test_an_intact_config_yaml_resumes_and_a_changed_total_rounds_is_not_damage(tmp_path):
    run_dir = written_run(tmp_path, total_rounds=2)
    assert run_state.resumed_config(run_dir, {}).total_rounds == 2
    path = run_dir / "config.yaml"  # as a resume growing the run leaves it when killed before its manifest
    path.write_text(path.read_text().replace("total_rounds: 2", "total_rounds: 3"))
    assert run_state.resumed_config(run_dir, {}).total_rounds == 3


@pytest.mark.parametrize("damage", ["", '{"rounds": {"0": "do', "[]", "\x00\xff\x00"])
def test_a_damaged_manifest_is_refused_by_name(tmp_path, damage):
    run_dir = written_run(tmp_path)
    (run_dir / "manifest.json").write_bytes(damage.encode("latin-1"))
    with pytest.raises(config_lib.ConfigError, match=f"{run_dir / 'manifest.json'} is damaged .*: the run's progress "
                                                     "cannot be read"):
        run_state.resumed_config(run_dir, {})


def test_metrics_csv_is_rewritten_only_when_rows_of_finished_rounds_are_lost_or_changed(tmp_path, capsys):
    run_dir = written_run(tmp_path)
    manifest = run_state.load_manifest(run_dir)
    path = run_dir / "metrics.csv"
    columns = ["round", "model", "ce"]
    run_state.restore_metric_rows(run_dir, columns, manifest)
    assert not path.exists() and capsys.readouterr().err == ""  # no round has finished: nothing to write
    rows = files.csv_text_rows(columns, [{"round": 0, "model": "student", "ce": 1.5}])
    manifest = run_state.finished_round(manifest, 0, "ensemble/member_0", None, rows)
    # Round 1 evaluated, killed before its manifest write: its row is no damage (the round is evaluated again).
    files.write_csv_rows(path, columns, [*rows, {"round": 1, "model": "student", "ce": 1.25}])
    whole = path.read_bytes()
    run_state.restore_metric_rows(run_dir, columns, manifest)
    assert path.read_bytes() == whole and capsys.readouterr().err == ""
    path.write_text("round,model,ce\n0,student,1.25\n")  # edited
    run_state.restore_metric_rows(run_dir, columns, manifest)
    assert path.read_text() == "round,model,ce\n0,student,1.5\n"
    assert capsys.readouterr().err == (f"warning: {path}: rows of finished rounds are missing or differ from the ones "
                                       "written; rewritten from the rows manifest.json recorded for the finished "
                                       "rounds, restoring round 0 student\n")


METRIC_COLUMNS = ["round", "model", "ce"]


def metric_rows(index: int, *models: str) -> list[dict]:
    """Round `index`'s metrics.csv rows of `models`, as a file holds them."""
    return files.csv_text_rows(METRIC_COLUMNS, [{"round": index, "model": model, "ce": 2.0 - index / 4}
                                                for model in models])


def finished_run(tmp_path, journaled: set[int], rounds: int = 2) -> tuple[Path, dict, list[dict]]:
    """A run whose first `rounds` rounds finished, its metrics.csv holding their rows; the manifest's journal keeps
    the rows of the `journaled` rounds only (the others finished before manifests kept one)."""
    run_dir = written_run(tmp_path)
    manifest = run_state.load_manifest(run_dir)
    rows = []
    for index in range(rounds):
        rows += metric_rows(index, "student", "ensemble")
        manifest = run_state.finished_round(manifest, index, f"ensemble/member_{index}", None,
                                            metric_rows(index, "student", "ensemble"))
    journal = {key: value for key, value in manifest.pop(run_state.METRIC_JOURNAL).items() if int(key) in journaled}
    if journal:
        manifest[run_state.METRIC_JOURNAL] = journal
    files.write_csv_rows(run_dir / "metrics.csv", METRIC_COLUMNS, rows)
    return run_dir, manifest, rows


def lost_rows_refusal(run_dir: Path, rounds: str, damage: str) -> str:
    return (f"{run_dir / 'metrics.csv'}: the rows of round(s) {rounds} are lost ({damage}), and "
            f"{run_dir / 'manifest.json'} predates the journal of metric rows that would restore them. Restore "
            f"metrics.csv from a copy, or recompute them in a new run with this run's settings (`python main.py "
            f"--config {run_dir / 'config.yaml'}`); nothing was changed")


def test_a_resume_is_refused_when_rows_no_journal_holds_are_lost_and_goes_on_when_a_journal_restores_them(tmp_path):
    run_dir, manifest, rows = finished_run(tmp_path, journaled={1})
    path = run_dir / "metrics.csv"
    run_state.check_metric_rows_recoverable(run_dir, manifest)  # every row there
    files.write_csv_rows(path, METRIC_COLUMNS, rows[:2])  # round 1's rows lost: its journal restores them
    run_state.check_metric_rows_recoverable(run_dir, manifest)
    run_state.restore_metric_rows(run_dir, METRIC_COLUMNS, manifest)
    assert files.read_csv_rows(path) == rows
    files.write_csv_rows(path, METRIC_COLUMNS, rows[2:])  # round 0's, which no journal holds
    intact = path.read_bytes()
    with pytest.raises(config_lib.ConfigError) as error:
        run_state.check_metric_rows_recoverable(run_dir, manifest)
    assert str(error.value) == lost_rows_refusal(
        run_dir, "0", "rows of finished rounds are missing or differ from the ones written")
    assert path.read_bytes() == intact
    path.write_text(path.read_text() + "0,student\n")  # round 0's row again, cut short
    with pytest.raises(config_lib.ConfigError, match=r"the rows of round\(s\) 0 are lost \(a row is cut short\)"):
        run_state.check_metric_rows_recoverable(run_dir, manifest)
    path.write_text(files.csv_text(METRIC_COLUMNS, rows) + "0,student\n")  # round 0's rows whole, and one cut
    with pytest.raises(config_lib.ConfigError, match=r"round\(s\) 0 are lost \(a row is cut short\)"):
        run_state.check_metric_rows_recoverable(run_dir, manifest)


@pytest.mark.parametrize("damage, words", [
    (lambda path: path.unlink(), "it is missing"),
    (lambda path: path.write_bytes(b"\xff\xfe round"), "it is not CSV text"),
    (lambda path: path.write_text("round,model,ce\n"), "it holds no rows"),
])
def test_a_manifest_without_a_journal_refuses_a_resume_naming_every_round_lost(tmp_path, damage, words):
    run_dir, manifest, _ = finished_run(tmp_path, journaled=set())
    assert run_state.METRIC_JOURNAL not in manifest
    run_state.check_metric_rows_recoverable(run_dir, manifest)
    intact = (run_dir / "metrics.csv").read_bytes()
    run_state.restore_metric_rows(run_dir, METRIC_COLUMNS, manifest)
    assert (run_dir / "metrics.csv").read_bytes() == intact
    damage(run_dir / "metrics.csv")
    with pytest.raises(config_lib.ConfigError) as error:
        run_state.check_metric_rows_recoverable(run_dir, manifest)
    assert str(error.value) == lost_rows_refusal(run_dir, "0, 1", words)


def test_rows_no_journal_holds_are_kept_as_the_file_holds_them_and_the_rest_restored_by_name(tmp_path, capsys):
    run_dir, manifest, rows = finished_run(tmp_path, journaled={1})
    path = run_dir / "metrics.csv"
    kept = [{**row, "ce": "9.0"} for row in rows[:2]]  # round 0's, edited: no journal tells it from its first text
    files.write_csv_rows(path, METRIC_COLUMNS, [*kept, *rows[2:], rows[3]])  # and a row of round 1 twice
    run_state.restore_metric_rows(run_dir, METRIC_COLUMNS, manifest)
    assert files.read_csv_rows(path) == [*kept, *rows[2:]]
    assert capsys.readouterr().err == (f"warning: {path}: rows of finished rounds are missing or differ from the ones "
                                       "written; rewritten from the rows manifest.json recorded for the finished "
                                       "rounds, restoring no row\n")
    run_dir, manifest, rows = finished_run(tmp_path / "journaled", journaled={0, 1})
    path = run_dir / "metrics.csv"
    path.unlink()
    run_state.restore_metric_rows(run_dir, METRIC_COLUMNS, manifest)
    assert files.read_csv_rows(path) == rows
    assert capsys.readouterr().err == (f"warning: {path}: it is missing; rewritten from the rows manifest.json "
                                       "recorded for the finished rounds, restoring round 0 student, round 0 "
                                       "ensemble, round 1 student, round 1 ensemble\n")


def test_the_rounds_done_are_in_numeric_order_past_ten():
    manifest = run_state.new_manifest("abc", 0, 0, 12)
    for index in (10, 2, 11, 9):
        manifest = run_state.finished_round(manifest, index, f"ensemble/member_{index}", None, [])
    assert run_state.done_rounds(manifest) == ["2", "9", "10", "11"]


def test_the_checkpoints_of_finished_rounds_are_removed_and_missing_ones_are_no_error(tmp_path):
    manifest = run_state.finished_round(run_state.new_manifest("abc", 0, 0, 3), 1, "ensemble/member_1", None, [])
    finished = checkpoint_with_checksums(tmp_path / "checkpoints" / "round_1", 4)
    training = checkpoint_with_checksums(tmp_path / "checkpoints" / "round_2", 4)
    layout = run_state.RunLayout(tmp_path)
    assert finished.parent == layout.checkpoints(1) and training.parent == layout.checkpoints(2)
    run_state.remove_finished_rounds_checkpoints(tmp_path, manifest)
    assert not layout.checkpoints(1).exists() and training.is_dir()
    run_state.remove_finished_rounds_checkpoints(tmp_path, manifest)  # round 1's are gone already: nothing to do


def test_run_folders_are_dated_numbered_and_never_reused(tmp_path):
    day = datetime.date(2026, 11, 29)
    first = run_state.new_run_dir(tmp_path, day)
    (tmp_path / "2026-11-29" / "run_7").mkdir()
    (tmp_path / "2026-11-29" / "notes").mkdir()
    second = run_state.new_run_dir(tmp_path, day)
    assert first == tmp_path / "2026-11-29" / "run_1"
    assert second == tmp_path / "2026-11-29" / "run_8"


def test_a_run_folder_taken_by_another_run_at_the_same_moment_moves_on_to_the_next_number(tmp_path, monkeypatch):
    day = datetime.date(2026, 11, 29)
    (tmp_path / "2026-11-29" / "run_7").mkdir(parents=True)
    make_folder = Path.mkdir

    def another_run_takes_run_8(folder, *args, **kwargs):
        if folder.name == "run_8" and not folder.exists():
            make_folder(folder)  # between this run's look at the folders and its mkdir
            raise FileExistsError(str(folder))
        return make_folder(folder, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", another_run_takes_run_8)
    assert run_state.new_run_dir(tmp_path, day) == tmp_path / "2026-11-29" / "run_9"


def test_a_new_run_records_its_identity_settings_preset_and_data_and_a_resume_returns_its_folder_and_manifest(
        tmp_path):
    config = config_lib.build_config("test", overrides={"output_root": str(tmp_path), "seed": 3, "data_seed": 5,
                                                        "total_rounds": 2})
    run_dir, manifest = run_state.open_run(config, None, "42", OneProcess(), "test", EXAMPLES)
    assert run_dir.parent.parent == tmp_path and manifest == run_state.load_manifest(run_dir)
    assert manifest == {"config_fingerprint": config.fingerprint(), "seed": 3, "data_seed": 5, "job_id": "42",
                        "rounds": {"0": "pending", "1": "pending"}, "members": [], "teacher_evaluated": False,
                        "config": config.to_dict(), "preset": "test", "examples": EXAMPLES}
    grown = run_state.resumed_config(run_dir, {"total_rounds": run_state.Stated("3", "the command line")})
    resumed_dir, resumed = run_state.open_run(grown, run_dir, None, OneProcess(), "test", EXAMPLES)
    assert resumed_dir == run_dir and resumed == run_state.load_manifest(run_dir)
    assert resumed["rounds"] == {"0": "pending", "1": "pending", "2": "pending"}
    assert resumed["config_fingerprint"] == grown.fingerprint() != config.fingerprint()


def test_a_resume_records_the_split_sizes_in_a_manifest_written_before_they_were_kept(tmp_path):
    run_dir = written_run(tmp_path, total_rounds=2)
    older = {key: value for key, value in run_state.load_manifest(run_dir).items() if key != "examples"}
    run_state.write_manifest(run_dir, older)
    config = run_state.resumed_config(run_dir, {})
    assert run_state.open_run(config, run_dir, None, OneProcess(), "test", EXAMPLES)[1]["examples"] == EXAMPLES
    assert run_state.load_manifest(run_dir) == {**older, "examples": EXAMPLES}


def test_a_new_runs_settings_are_layered_and_a_requeued_job_resumes_the_run_it_started(tmp_path):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("alpha: 0.3\n")
    argv = ["--preset", "test", "--config", str(run_yaml), "--output_root", str(tmp_path / "runs"), "--job_id", "77"]
    config, resume_dir = run_state.resolve_config(config_lib.parse_command_line(argv, ""))
    assert resume_dir is None and config.alpha == 0.3 and config.output_root == str(tmp_path / "runs")
    run_dir, _ = run_state.open_run(config, None, "77", OneProcess(), "test", EXAMPLES)
    requeued, resume_dir = run_state.resolve_config(config_lib.parse_command_line(argv, ""))
    assert resume_dir == run_dir and requeued == config_lib.load_saved_config(run_dir / "config.yaml")
    other_job = run_state.resolve_config(config_lib.parse_command_line([*argv[:-1], "78"], ""))
    assert other_job[1] is None


def test_a_resume_command_line_is_checked_against_the_run_setting_by_setting(tmp_path):
    run_dir = written_run(tmp_path, total_rounds=2)

    def resolved(*argv):
        return run_state.resolve_config(config_lib.parse_command_line(["--resume", str(run_dir), *argv], ""))

    config, resume_dir = resolved()
    assert resume_dir == run_dir and config.total_rounds == 2
    with pytest.raises(config_lib.ConfigError, match="the command line sets learning_rate = 0.5"):
        resolved("--learning_rate", "0.5")
    with pytest.raises(config_lib.ConfigError, match="--preset demo is given, but the run was started from --preset"):
        resolved("--preset", "demo")
    more_rounds = tmp_path / "more.yaml"
    more_rounds.write_text("total_rounds: 3\n")
    assert resolved("--config", str(more_rounds))[0].total_rounds == 3
    run_dir = written_run(tmp_path / "longer", total_rounds=3)  # the test preset's own total_rounds is 2
    with pytest.raises(config_lib.ConfigError, match="--preset test sets total_rounds = 2, but the run was started "
                                                     "with total_rounds = 3"):
        resolved("--preset", "test")


# --- the manifest's records, key by key ------------------------------------------------------------------------------

def test_a_new_manifest_records_the_runs_identity_and_plans_every_round():
    assert run_state.new_manifest("abc", 3, 7, 2, job_id="42") == {
        "config_fingerprint": "abc", "seed": 3, "data_seed": 7, "job_id": "42",
        "rounds": {"0": "pending", "1": "pending"}, "members": [], "teacher_evaluated": False}
    assert run_state.round_status({"rounds": {"0": "done"}}, 1) == "pending"  # a grown run's new round


def test_a_finished_round_records_its_member_weights_data_rows_and_status():
    manifest = run_state.new_manifest("abc", 0, 0, 2)
    first = run_state.finished_round(manifest, 0, "ensemble/member_0", None, [{"ce": "1.5"}])
    second = run_state.finished_round(first, 1, "ensemble/member_1", [0.5, 0.5], [{"ce": "1.2"}], member_data="1/2")
    assert second["members"] == ["ensemble/member_0", "ensemble/member_1"] and second["weights"] == [0.5, 0.5]
    assert second["member_data"] == {"0": "all", "1": "1/2"}
    assert second[run_state.METRIC_JOURNAL] == {"0": [{"ce": "1.5"}], "1": [{"ce": "1.2"}]}
    assert second["rounds"] == {"0": "done", "1": "done"} and second["teacher_evaluated"] is True
    assert run_state.done_rounds(second) == ["0", "1"]


def test_a_damaged_manifest_is_refused_saying_why_and_that_nothing_changed(tmp_path):
    (tmp_path / "manifest.json").write_text('{"members": []}')
    with pytest.raises(config_lib.ConfigError, match=r"is damaged \(not a manifest\).*nothing was changed$"):
        run_state.load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"rounds": ')
    with pytest.raises(config_lib.ConfigError, match=r"is damaged \(Expecting value: line 1"):
        run_state.load_manifest(tmp_path)


def test_a_round_started_afresh_drops_its_logged_steps_and_a_resumed_one_keeps_those_before_its_checkpoint(tmp_path):
    columns = ["round", "step", "loss"]
    log = [{"round": "0", "step": "1", "loss": "3"}, {"round": "1", "step": "0", "loss": "2"},
           {"round": "1", "step": "1", "loss": "2"}, {"round": "1", "step": "2", "loss": "1"}]
    files.replace_csv_rows(tmp_path / "train_log.csv", columns, lambda row: False, log)
    manifest = run_state.new_manifest("abc", 0, 0, 2)
    run_state.mark_round_training(tmp_path, manifest, 1, tmp_path / f"{run_state.CHECKPOINT_PREFIX}1", columns)
    steps = [(row["round"], row["step"]) for row in csv.DictReader(open(tmp_path / "train_log.csv"))]
    assert steps == [("0", "1"), ("1", "0"), ("1", "1")]
    run_state.mark_round_training(tmp_path, manifest, 1, None, columns)  # no checkpoint: from step 0
    steps = [(row["round"], row["step"]) for row in csv.DictReader(open(tmp_path / "train_log.csv"))]
    assert steps == [("0", "1"), ("1", "0")]
    assert run_state.load_manifest(tmp_path)["rounds"]["1"] == "training"


def test_a_resume_keeps_the_runs_settings_refuses_other_ones_by_name_and_takes_a_new_total_rounds(tmp_path, capsys):
    run_dir = written_run(tmp_path, total_rounds=2)
    Stated = run_state.Stated
    saved_rate = run_state.resumed_config(run_dir, {}).learning_rate
    same = run_state.resumed_config(run_dir, {"learning_rate": Stated(str(saved_rate), "the command line")})
    assert same.total_rounds == 2 and same.learning_rate == saved_rate
    with pytest.raises(config_lib.ConfigError) as refused:  # a stated value read as the setting's type, then compared
        run_state.resumed_config(run_dir, {"learning_rate": Stated("0.5", "the command line")})
    assert str(refused.value).startswith(f"--resume {str(run_dir)!r}: the command line sets learning_rate = 0.5, but "
                                         f"the run was started with learning_rate = {saved_rate!r}")
    assert "leave these out, or start a new run" in str(refused.value)
    grown = run_state.resumed_config(run_dir, {"total_rounds": Stated("3", "the command line")})
    assert grown.total_rounds == 3 and "total_rounds: 2 -> 3" in capsys.readouterr().out
    with pytest.raises(config_lib.ConfigError, match="sets total_rounds = 3"):  # a preset's must not add rounds
        run_state.resumed_config(run_dir, {"total_rounds": Stated(3, "--preset test", from_preset=True)})
    with pytest.raises(config_lib.ConfigError, match="--preset demo is given, but the run was started from --preset"):
        run_state.resumed_config(run_dir, {}, preset="demo")


def test_a_resumes_stated_settings_say_where_each_came_from_later_ones_winning(tmp_path):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("alpha: 0.3\nlearning_rate: 0.002\n")
    stated = run_state.stated_settings("test", str(run_yaml), {"learning_rate": "0.5"})
    Stated = run_state.Stated
    assert stated["max_examples"] == Stated(config_lib.preset_values("test")["max_examples"], "--preset test",
                                            from_preset=True)
    assert stated["alpha"] == Stated(0.3, f"--config {run_yaml}")
    assert stated["learning_rate"] == Stated("0.5", "the command line")
    assert run_state.stated_settings(None, None, {}) == {}


def test_a_resume_refuses_every_conflict_at_once_the_preset_first_and_takes_a_new_push_to_hub(tmp_path):
    run_dir = written_run(tmp_path)
    Stated = run_state.Stated
    with pytest.raises(config_lib.ConfigError) as error:
        run_state.resumed_config(run_dir, {"learning_rate": Stated("0.5", "the command line"),
                                           "alpha": Stated(0.9, "--config run.yaml")}, preset="demo")
    saved = config_lib.load_saved_config(run_dir / "config.yaml")
    assert str(error.value) == (
        f"--resume {str(run_dir)!r}: --preset demo is given, but the run was started from --preset test; the command "
        f"line sets learning_rate = 0.5, but the run was started with learning_rate = {saved.learning_rate!r}; "
        f"--config run.yaml sets alpha = 0.9, but the run was started with alpha = {saved.alpha!r}. A run continues "
        "with the settings it was started with (only total_rounds may change, on the command line or in a YAML file, "
        "and push_to_hub); leave these out, or start a new run")
    with pytest.raises(config_lib.ConfigError, match="config key 'learning_rate' = 'fast' is not a valid float"):
        run_state.resumed_config(run_dir, {"learning_rate": Stated("fast", "the command line")})
    pushed = run_state.resumed_config(run_dir, {"push_to_hub": Stated("someone/ensemble", "the command line")})
    assert pushed.push_to_hub == "someone/ensemble" and pushed.learning_rate == saved.learning_rate
    assert run_state.resumed_config(run_dir, {"push_to_hub": Stated(None, "the command line")}) == saved


def test_a_resume_refuses_a_damaged_member_and_metric_rows_it_cannot_restore_before_changing_anything(
        tmp_path, tokenizer, tiny_llama):
    run_dir = written_run(tmp_path, total_rounds=2)
    manifest = run_state.finished_round(run_state.load_manifest(run_dir), 0, "ensemble/member_0", None, [])
    run_state.write_manifest(run_dir, manifest)
    run_state.save_member_atomically(tiny_llama, tokenizer, run_dir / "ensemble" / "member_0")
    assert run_state.resumed_config(run_dir, {}).total_rounds == 2
    damage_second_half(run_dir / "ensemble" / "member_0" / "model.safetensors")
    with pytest.raises(config_lib.ConfigError) as error:
        run_state.resumed_config(run_dir, {})
    assert str(error.value).startswith(f"{run_dir / 'ensemble' / 'member_0' / 'model.safetensors'}: holds ")
    assert str(error.value).endswith(" is damaged and nothing was loaded from it; later rounds were trained with it: "
                                     "restore it from a copy (its checksums.json says what it held), or start a new "
                                     "run")
    run_state.save_member_atomically(tiny_llama, tokenizer, run_dir / "ensemble" / "member_0")
    run_state.write_manifest(run_dir, {key: value for key, value in manifest.items()
                                       if key != run_state.METRIC_JOURNAL})  # a manifest from before the journal
    with pytest.raises(config_lib.ConfigError, match=r"the rows of round\(s\) 0 are lost \(it is missing\)"):
        run_state.resumed_config(run_dir, {})


@pytest.mark.parametrize("baseline, words", [("single_matched", ""), ("single_large", " and size")])
def test_a_single_model_baselines_total_rounds_cannot_change(tmp_path, baseline, words):
    saved = config_lib.build_config("test", overrides={"baseline": baseline})
    with pytest.raises(config_lib.ConfigError) as error:
        run_state.check_total_rounds_change(tmp_path, saved, 3, run_state.new_manifest("abc", 0, 0, 1))
    assert str(error.value) == (f"--resume {str(tmp_path)!r}: total_rounds cannot change for the {baseline} "
                                f"baseline: it sets the step count{words} of the baseline's one student; start a new "
                                "run")


def test_total_rounds_may_shrink_down_to_the_rounds_a_run_has_started(tmp_path):
    saved = config_lib.build_config("test", overrides={"total_rounds": 4})
    manifest = run_state.new_manifest("abc", 0, 0, 4)
    manifest["rounds"].update({"0": "done", "1": "training"})
    run_state.check_total_rounds_change(tmp_path, saved, 2, manifest)  # rounds 0 and 1 kept
    with pytest.raises(config_lib.ConfigError) as error:
        run_state.check_total_rounds_change(tmp_path, saved, 1, manifest)
    assert str(error.value) == (f"--resume {str(tmp_path)!r}: total_rounds = 1, but the run has started 2 rounds; "
                                "give at least 2")
    run_state.check_total_rounds_change(tmp_path, saved, 1, run_state.new_manifest("abc", 0, 0, 4))  # none started


def test_a_resume_refuses_fewer_rounds_than_it_has_started_naming_the_run(tmp_path, tokenizer, tiny_llama):
    run_dir = written_run(tmp_path, total_rounds=3)
    run_state.save_member_atomically(tiny_llama, tokenizer, run_dir / "ensemble" / "member_0")
    manifest = run_state.finished_round(run_state.load_manifest(run_dir), 0, "ensemble/member_0", None, [])
    manifest["rounds"]["1"] = "training"
    run_state.write_manifest(run_dir, manifest)
    with pytest.raises(config_lib.ConfigError) as error:
        run_state.resumed_config(run_dir, {"total_rounds": run_state.Stated("1", "the command line")})
    assert str(error.value) == (f"--resume {str(run_dir)!r}: total_rounds = 1, but the run has started 2 rounds; "
                                "give at least 2")


def test_a_resume_that_changes_nothing_writes_nothing(tmp_path):
    run_dir = written_run(tmp_path, total_rounds=2)
    config = run_state.resumed_config(run_dir, {})
    before = file_bytes(run_dir)

    class OtherProcess:
        is_main_process = False

    grown = run_state.resumed_config(run_dir, {"total_rounds": run_state.Stated("3", "the command line")})
    assert run_state.resumed_manifest(run_dir, config, OneProcess(), EXAMPLES) == run_state.load_manifest(run_dir)
    assert file_bytes(run_dir) == before  # nothing changed: nothing rewritten
    assert run_state.resumed_manifest(run_dir, grown, OtherProcess(), EXAMPLES)["config"] == grown.to_dict()
    assert file_bytes(run_dir) == before  # only the main process writes
    assert run_state.resumed_manifest(run_dir, grown, OneProcess(), EXAMPLES)["config"]["total_rounds"] == 3
    assert run_state.load_manifest(run_dir)["config"]["total_rounds"] == 3


def test_a_resume_of_a_folder_without_a_config_or_a_manifest_says_what_to_pass(tmp_path):
    with pytest.raises(config_lib.ConfigError, match=rf"--resume {re.escape(repr(str(tmp_path)))} is not a run folder"):
        run_state.resumed_config(tmp_path, {})
    run_dir = written_run(tmp_path)
    (run_dir / "manifest.json").unlink()
    with pytest.raises(config_lib.ConfigError) as error:
        run_state.resumed_config(run_dir, {})
    assert str(error.value) == (f"--resume {str(run_dir)!r} has a config.yaml but no manifest.json: it did not get "
                                "past its setup; start a new run instead")
