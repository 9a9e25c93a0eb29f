"""DistillationTrainer: the loss it trains on, what gets gradients, and invariance to how a step is split."""

import copy
import errno
import math
import os
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import TrainerCallback

from conftest import accelerate_launch, build_tiny_llama
from model_io import PaddingCollator, cut_to_vocab, hidden_at, logits_at, output_head
from preprocess_dataset import tokenize_conversation
from train import CsvTrainLogCallback, DistillationTrainer, gradients_are_finite
from slm_ensembles import files, students
from slm_ensembles.losses import LossSettings, hybrid_loss_sums, hybrid_loss_terms, next_token_targets, predictor_mask
from trl import SFTConfig


@pytest.fixture
def examples(tokenizer, chats):
    rows = [tokenize_conversation(chat["messages"], tokenizer, max_length=64) for chat in chats[:8]]
    return Dataset.from_list([row for row in rows if row is not None])


@pytest.fixture
def batch(tokenizer, examples):
    return PaddingCollator(tokenizer.pad_token_id)([examples[i] for i in range(4)])


def make_trainer(student, teacher, members, tokenizer, dataset, tmp_path, **args):
    settings = args.pop("settings", LossSettings(alpha=0.5, temperature=2.0))
    chunk_size = args.pop("chunk_size", 0)
    compile_loss = args.pop("compile_loss", False)
    args_schedule, args_spend = args.pop("schedule", None), args.pop("spend", None)
    callbacks = args.pop("callbacks", None)
    config = SFTConfig(**{**dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="no",
                                 remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                                 max_length=None, bf16=False, activation_checkpointing=False), **args})
    return DistillationTrainer(student, teacher, members, settings, len(tokenizer), config, dataset, tokenizer,
                               chunk_size=chunk_size, compile_loss=compile_loss, schedule=args_schedule,
                               spend=args_spend, callbacks=callbacks)


def with_attention_dropout(model, probability: float):
    """`model` in train mode with attention dropout (tiny models are built in eval mode, and without dropout)."""
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = probability
    return model.train()


def test_with_members_only_the_student_gets_gradients_and_frozen_models_run_without_dropout(tokenizer, examples,
                                                                                             batch, tmp_path):
    teacher = build_tiny_llama(tokenizer, seed=1, hidden_size=48)
    members = [build_tiny_llama(tokenizer, seed=2), build_tiny_llama(tokenizer, seed=3)]
    student = build_tiny_llama(tokenizer, seed=4).train()
    # The loss with the same frozen models, built without dropout.
    expected = make_trainer(student, copy.deepcopy(teacher), copy.deepcopy(members), tokenizer, examples,
                            tmp_path / "reference").compute_loss(student, batch).item()
    # Handed over in train mode with dropout: the trainer's freezing must switch it off.
    teacher, *members = (with_attention_dropout(model, 0.5) for model in (teacher, *members))
    trainer = make_trainer(student, teacher, members, tokenizer, examples, tmp_path)
    assert not any(module.training for model in (teacher, *members) for module in model.modules())
    loss = trainer.compute_loss(student, batch)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert trainer.compute_loss(student, batch).item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for m in [teacher, *members] for p in m.parameters())


def test_trainer_loss_is_the_hybrid_loss_per_supervised_token(tokenizer, examples, batch, tmp_path):
    teacher, member, student = (build_tiny_llama(tokenizer, seed=s) for s in (1, 2, 3))
    trainer = make_trainer(student, teacher, [member], tokenizer, examples, tmp_path)
    positions = predictor_mask(batch["labels"])
    with torch.no_grad():
        loss = trainer.compute_loss(student, batch)
        full = [m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[positions]
                for m in (student, teacher, member)]
    targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
    expected = hybrid_loss_sums(full[0], full[1], [full[2]], targets, trainer.settings)
    assert loss.item() == pytest.approx(expected.total.item() / targets.numel(), rel=1e-5)


def test_unsupervised_positions_contribute_nothing(tokenizer, examples, batch, tmp_path):
    teacher, student = build_tiny_llama(tokenizer, seed=1), build_tiny_llama(tokenizer, seed=2)
    trainer = make_trainer(student, teacher, [], tokenizer, examples, tmp_path)
    with torch.no_grad():
        loss = trainer.compute_loss(student, batch)
        # Tokens after each sequence's last supervised position cannot influence supervised positions (causal
        # attention), and their own predictions are masked: rewriting them must leave the loss unchanged.
        changed = {k: v.clone() for k, v in batch.items()}
        for row in range(len(changed["labels"])):
            supervised = (changed["labels"][row] != -100).nonzero().flatten()
            last = supervised.max().item() if len(supervised) else 0
            changed["input_ids"][row, last + 1:] = 7
            changed["labels"][row, last + 1:] = -100
        changed_loss = trainer.compute_loss(student, changed)
    assert changed_loss.item() == pytest.approx(loss.item(), rel=1e-6)


def train_one_step(tokenizer, dataset, tmp_path, batch_size, grad_accum):
    teacher = build_tiny_llama(tokenizer, seed=1, hidden_size=48)
    member = build_tiny_llama(tokenizer, seed=2)
    student = build_tiny_llama(tokenizer, seed=3).train()
    start = copy.deepcopy(student.state_dict())
    trainer = make_trainer(student, teacher, [member], tokenizer, dataset, tmp_path / f"{batch_size}x{grad_accum}",
                           per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
                           max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
                           max_grad_norm=1e9, seed=0, data_seed=0, logging_steps=1)
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "hybrid" in entry)
    update = {k: student.state_dict()[k] - start[k] for k in start}
    return logged, update


def test_one_micro_batch_of_8_equals_8_micro_batches_of_1(tokenizer, examples, tmp_path):
    dataset = examples.select(range(8))
    logged_a, update_a = train_one_step(tokenizer, dataset, tmp_path, batch_size=8, grad_accum=1)
    logged_b, update_b = train_one_step(tokenizer, dataset, tmp_path, batch_size=1, grad_accum=8)
    assert logged_a["hybrid"] == pytest.approx(logged_b["hybrid"], rel=1e-5)
    assert logged_a["kl"] == pytest.approx(logged_b["kl"], rel=1e-5)
    assert logged_a["nll"] == pytest.approx(logged_b["nll"], rel=1e-5)
    for key in update_a:  # with SGD at lr 1 the update is minus the gradient
        torch.testing.assert_close(update_a[key], update_b[key], atol=1e-5, rtol=1e-4)
    assert any(update_a[key].abs().sum() > 0 for key in update_a)


def test_training_log_rows_reach_the_csv(tokenizer, examples, tmp_path):
    teacher, student = build_tiny_llama(tokenizer, seed=1), build_tiny_llama(tokenizer, seed=2)
    callback = CsvTrainLogCallback(tmp_path / "train_log.csv", round_index=0)
    trainer = make_trainer(student, teacher, [], tokenizer, examples, tmp_path, per_device_train_batch_size=2,
                           max_steps=4, logging_steps=2, learning_rate=1e-3)
    trainer.add_callback(callback)
    trainer.train()
    lines = (tmp_path / "train_log.csv").read_text().strip().splitlines()
    assert lines[0] == ("round,step,hybrid,kl,nll,learning_rate,grad_norm,grad_norm_kl,grad_norm_nll,epoch,heldout_ce,"
                        "test_ce,train_flops,flops_student,flops_members,flops_teacher,flops_evaluation")
    assert [line.split(",")[1] for line in lines[1:]] == ["2", "4"]
    hybrid, kl, nll = (float(v) for v in lines[1].split(",")[2:5])
    assert hybrid == pytest.approx(0.5 * 4.0 * kl + 0.5 * nll, rel=1e-4)  # alpha 0.5, T = 2


def test_a_train_log_row_the_disk_has_no_room_for_stops_with_the_folder_and_bytes_and_leaves_no_part_of_it(
        tmp_path, monkeypatch):
    """The disk fills up halfway through a row: the write stops with DiskSpaceError (exit code 2), and the log is
    cut back to the rows before it, with no half row that a resume would read as damage."""
    path = tmp_path / "train_log.csv"
    callback = CsvTrainLogCallback(path, round_index=0)

    def log(step):
        state = type("State", (), {"is_world_process_zero": True, "global_step": step})()
        callback.on_log(None, state, None, logs={"hybrid": 1.5, "kl": 0.25, "nll": 1.25})

    log(1)
    earlier = path.read_bytes()
    write = os.write

    def half_then_full(fd, data):
        write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", half_then_full)
        with pytest.raises(files.DiskSpaceError) as error:
            log(2)
    assert str(error.value).startswith(f"{tmp_path}: the disk is full: writing train_log.csv failed ([Errno 28] No "
                                       "space left on device); about ")
    assert "what it held before is kept" in str(error.value)
    assert path.read_bytes() == earlier
    log(2)  # once there is room: the row the error said it needed
    needed = int(re.search(r"about ([0-9,]+) bytes are needed there", str(error.value)).group(1).replace(",", ""))
    assert path.read_bytes()[:len(earlier)] == earlier and path.stat().st_size == len(earlier) + needed
    assert [row["step"] for row in files.read_csv_rows(path)] == ["1", "2"]


def test_the_student_runs_under_autocast_when_bf16_is_on(tokenizer, examples, tmp_path, monkeypatch):
    import train

    seen = []
    original = train.trained_hidden_at

    def recording_hidden_at(model, *args):  # the student's hidden states; its head runs in the same context
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(model, *args)

    monkeypatch.setattr(train, "trained_hidden_at", recording_hidden_at)
    teacher, student = build_tiny_llama(tokenizer, seed=1), build_tiny_llama(tokenizer, seed=2)
    trainer = make_trainer(student, teacher, [], tokenizer, examples, tmp_path, per_device_train_batch_size=2,
                           max_steps=1, bf16=True)
    trainer.train()
    assert seen == [True]


def plain_autograd_loss_and_gradients(student, teacher, members, batch, settings, vocab_size):
    """The loss per supervised token and every student parameter's gradient, by plain autograd through the full
    forward's logits (the student's gradients are cleared afterwards)."""
    positions = predictor_mask(batch["labels"])
    targets = next_token_targets(batch["labels"])

    def logits(model):
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return cut_to_vocab(full[positions], vocab_size)

    with torch.no_grad():
        frozen = [logits(model) for model in (teacher, *members)]
    loss = hybrid_loss_sums(logits(student), frozen[0], frozen[1:], targets, settings).total / len(targets)
    loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    return loss.item(), gradients


@pytest.mark.parametrize("own_head", [False, True])
def test_the_loss_path_equals_plain_autograd_in_value_and_gradients(tokenizer, examples, batch, tmp_path, own_head):
    """Chunked or not: the loss and every student parameter's gradient, with the head tied to the input embeddings
    (its gradient is the head's part plus the embeddings') or, for combine=additive, the student's own head that
    starts at zero (students.start_at_zero)."""
    teacher, member = build_tiny_llama(tokenizer, seed=1, hidden_size=48), build_tiny_llama(tokenizer, seed=2)
    settings = LossSettings(alpha=0.5, temperature=2.0)
    if own_head:
        settings = LossSettings(alpha=0.5, temperature=2.0, combine="additive", mixture_weights=(1.0, 1.0))
    assert predictor_mask(batch["labels"]).sum() % 4 != 0 and predictor_mask(batch["labels"]).sum() > 3 * 4
    for chunk_size in (0, 4):  # 4 does not divide the number of positions: the last chunk is partial
        student = build_tiny_llama(tokenizer, seed=3).train()
        if own_head:
            students.start_at_zero(student)
        head = student.get_output_embeddings().weight
        assert (head is student.get_input_embeddings().weight) != own_head
        expected_loss, expected = plain_autograd_loss_and_gradients(student, teacher, [member], batch, settings,
                                                                     len(tokenizer))
        trainer = make_trainer(student, teacher, [member], tokenizer, examples, tmp_path, chunk_size=chunk_size,
                               settings=settings)
        loss = trainer.compute_loss(student, batch)
        loss.backward()
        assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
        for name, parameter in student.named_parameters():
            torch.testing.assert_close(parameter.grad, expected[name], atol=1e-5, rtol=1e-5)
        assert head.grad.abs().sum() > 0


def test_every_head_runs_once_per_loss_chunk_in_a_training_step(tokenizer, examples, batch, tmp_path):
    """Forward and backward of a logged step (per-term gradient norms included): each frozen head runs once per
    chunk, and so does the student's, plus once in its wrapper's forward (logits_to_keep=1, ignored)."""
    teacher = build_tiny_llama(tokenizer, seed=1, hidden_size=48)
    members = [build_tiny_llama(tokenizer, seed=seed) for seed in (2, 3, 4)]
    student = build_tiny_llama(tokenizer, seed=5).train()
    calls = {}
    for name, model in (("teacher", teacher), ("member", members[0]), ("member", members[1]), ("member", members[2]),
                        ("student", student)):
        model.get_output_embeddings().register_forward_hook(
            lambda module, args, output, name=name: calls.update({name: calls.get(name, 0) + 1}))
    trainer = make_trainer(student, teacher, members, tokenizer, examples, tmp_path, chunk_size=4, logging_steps=1)
    trainer.compute_loss(student, batch).backward()
    num_chunks = math.ceil(predictor_mask(batch["labels"]).sum().item() / 4)
    assert num_chunks > 3 and "grad_norm_kl_sq" in trainer._parts_by_step[0]
    assert calls == {"teacher": num_chunks, "member": 3 * num_chunks, "student": num_chunks + 1}


def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop_the_round(tokenizer, examples, tmp_path,
                                                                           monkeypatch):
    import train

    teacher, student = build_tiny_llama(tokenizer, seed=1), build_tiny_llama(tokenizer, seed=2)
    trainer = make_trainer(student, teacher, [], tokenizer, examples, tmp_path, per_device_train_batch_size=2,
                           max_steps=6, learning_rate=1e-2, disable_tqdm=True)  # its bar is never closed here
    original = train.DistillationTrainer.compute_loss
    poisoned_steps = {1, 3, 4, 5}  # 0-based global step at which the loss is NaN
    snapshots = {}

    def sometimes_nan(self, model, inputs, **kwargs):
        snapshots[self.state.global_step] = copy.deepcopy(model.state_dict())
        loss = original(self, model, inputs, **kwargs)
        return loss * float("nan") if self.state.global_step in poisoned_steps else loss

    monkeypatch.setattr(train.DistillationTrainer, "compute_loss", sometimes_nan)
    with pytest.raises(train.NonFiniteLossError, match="round 0: 3 non-finite steps in a row up to step 6"):
        trainer.train()
    # Step 2 (0-based 1) was skipped: the weights after it equal those before it; step 3 trained normally.
    for key in snapshots[1]:
        torch.testing.assert_close(snapshots[2][key], snapshots[1][key], rtol=0, atol=0)
    assert any(not torch.equal(snapshots[3][key], snapshots[2][key]) for key in snapshots[2])


def test_a_round_whose_every_step_was_skipped_is_refused_not_finished(tokenizer, examples, tmp_path, monkeypatch):
    """Two steps, both non-finite: fewer than the three in a row that stop a round, but nothing was trained, so the
    untrained student must not become a member."""
    import train

    teacher, student = build_tiny_llama(tokenizer, seed=1), build_tiny_llama(tokenizer, seed=2)
    trainer = make_trainer(student, teacher, [], tokenizer, examples, tmp_path, per_device_train_batch_size=2,
                           max_steps=2, disable_tqdm=True)
    original = train.DistillationTrainer.compute_loss
    monkeypatch.setattr(train.DistillationTrainer, "compute_loss",
                        lambda self, model, inputs, **kwargs: original(self, model, inputs, **kwargs) * float("nan"))
    with pytest.raises(train.NonFiniteLossError, match="round 0: every one of its 2 steps was non-finite"):
        trainer.train()


def test_gradients_are_finite_flags_any_nan_or_infinite_entry():
    finite = [torch.randn(3, 4), torch.randn(5).bfloat16(), torch.zeros(2, dtype=torch.float64)]
    assert gradients_are_finite(finite) and gradients_are_finite([])
    for bad in (float("nan"), float("inf"), float("-inf")):
        for index in range(len(finite)):
            gradients = [g.clone() for g in finite]
            gradients[index].view(-1)[-1] = bad
            assert not gradients_are_finite(gradients), (bad, index)


def test_the_compiled_loss_path_gives_the_eager_loss_and_gradients(tokenizer, examples, batch, tmp_path, monkeypatch):
    from slm_ensembles import losses
    import train

    counter = CompileCounterWithBackend("aot_eager")  # inductor's tracing, without its minutes of C++ builds
    monkeypatch.setattr(train, "compile_loss_terms", lambda: losses.compile_loss_terms(backend=counter))
    teacher, member = build_tiny_llama(tokenizer, seed=1, hidden_size=48), build_tiny_llama(tokenizer, seed=2)
    results = []
    for compile_loss in (False, True):
        student = build_tiny_llama(tokenizer, seed=3).train()
        trainer = make_trainer(student, teacher, [member], tokenizer, examples, tmp_path, chunk_size=4,
                               compile_loss=compile_loss)
        loss = trainer.compute_loss(student, batch)
        loss.backward()
        results.append((loss.item(), {name: p.grad.clone() for name, p in student.named_parameters()}))
    assert counter.frame_count >= 1 and trainer.loss_terms.failure is None  # the compiled function ran, unfailing
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("teacher_mode", ["online", "topk"])
def test_two_processes_take_the_same_step_as_one(tmp_path, teacher_mode):
    """2 processes x 2 micro-batches of 2 and 1 process x 4 micro-batches of 2 train on the same global batch: the
    loss and every gradient agree, which fails if a process normalises by its own tokens, skips DDP's gradient
    all-reduce, or scores one process's sequences with another's teacher outputs (upstream items 15 and 16)."""
    probe = str(Path(__file__).parent / "distributed_probe.py")
    steps = {}
    for num_processes, grad_accum in ((2, 2), (1, 4)):  # the 2-process run builds the topk cache, in two shards
        out = tmp_path / f"{num_processes}.pt"
        accelerate_launch([probe, str(out), "--batch_size", "2", "--grad_accum", str(grad_accum),
                           "--teacher_mode", teacher_mode, "--work_dir", str(tmp_path)], num_processes, tmp_path)
        steps[num_processes] = torch.load(out)
    two, one = steps[2], steps[1]
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    first, second = two["example_ids"]
    assert not set(first) & set(second) and sorted(first + second) == sorted(one["example_ids"][0]) == list(range(8))
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)
    for key in one["update"]:
        torch.testing.assert_close(two["update"][key], one["update"][key], atol=1e-5, rtol=1e-4)
    assert any(one["update"][key].abs().max() > 1e-3 for key in one["update"])
    if teacher_mode == "topk":
        assert sorted(p.name for p in (tmp_path / "cache" / "teacher_cache").iterdir().__next__().glob("shard_*")) \
            == ["shard_00000", "shard_00001"]


@pytest.mark.parametrize("kl_scale", [1.0, 3.0])
def test_each_terms_gradient_norm_at_the_student_hidden_states_is_recorded_on_logged_steps(tokenizer, examples,
                                                                                           batch, tmp_path, kl_scale):
    teacher, member, student = (build_tiny_llama(tokenizer, seed=s) for s in (1, 2, 3))
    student.train()  # the parts of the loss are recorded in training only
    settings = LossSettings(alpha=0.5, temperature=2.0, kl_scale=kl_scale)
    trainer = make_trainer(student, teacher, [member], tokenizer, examples, tmp_path, settings=settings,
                           logging_steps=1)
    trainer.compute_loss(student, batch)
    parts = trainer._parts_by_step[0]

    positions = predictor_mask(batch["labels"])
    hidden = hidden_at(student, batch["input_ids"], batch["attention_mask"], positions)
    targets = next_token_targets(batch["labels"])
    with torch.no_grad():
        frozen = [logits_at(m, batch["input_ids"], batch["attention_mask"], positions, len(tokenizer))
                  for m in (teacher, member)]
    terms = hybrid_loss_terms(output_head(student, len(tokenizer))(hidden), frozen[0], [frozen[1]], targets, settings)
    for name, term in (("kl", terms.kl_term), ("nll", terms.nll_term)):
        (gradient,) = torch.autograd.grad(term / len(targets), hidden, retain_graph=True)
        assert parts[f"grad_norm_{name}_sq"] == pytest.approx(gradient.pow(2).sum().item(), rel=1e-4)
    assert parts["grad_norm_kl_sq"] > 0 and parts["grad_norm_nll_sq"] > 0

    not_logged = make_trainer(student, teacher, [member], tokenizer, examples, tmp_path, settings=settings,
                              logging_steps=5)
    not_logged.compute_loss(student, batch)
    assert "grad_norm_kl_sq" not in not_logged._parts_by_step[0]  # only steps that are logged pay for it


def test_early_stopping_keeps_the_best_and_stops_after_patience_evaluations_without_improvement():
    from transformers import TrainerControl, TrainerState

    from train import EarlyStopping

    scores = iter([5.0, 4.0, 3.95, 3.99, 3.9, 4.5])
    saved = []
    stopper = EarlyStopping(eval_steps=2, patience=2, min_delta=0.1, score=lambda model: {"heldout_ce": next(scores)},
                            save_best=lambda model: saved.append(model))
    state, stops = TrainerState(max_steps=100), []
    for step in range(1, 13):
        state.global_step = step
        control = stopper.on_step_end(None, state, TrainerControl(), model=f"weights at {step}")
        if control.should_training_stop:
            stops.append(step)
            assert control.should_save  # the checkpoint that tells a resumed run the round is over
            break
    # 5.0 (step 2) and 4.0 (step 4) improve by more than min_delta; 3.95 and 3.99 do not: stop at step 8. The
    # weights kept are still the lowest held-out CE evaluated, 3.95 at step 6.
    assert stops == [8] and saved == ["weights at 2", "weights at 4", "weights at 6"]
    assert (stopper.best_score, stopper.best_step, stopper.stop_reason) == (3.95, 6, "plateau")
    assert stopper.logged_values(8) == {"heldout_ce": 3.99} and stopper.logged_values(7) == {}
    restored = EarlyStopping(**stopper.state()["args"], **stopper.state()["attributes"])
    assert restored.state() == stopper.state()


def test_early_stopping_keeps_the_start_when_no_evaluation_beats_it_and_not_on_resume():
    """A round's starting point is its first candidate: with an additive member starting at zero, a round that only
    overfits leaves the ensemble as it was. A resumed round keeps the best its checkpoint recorded."""
    from transformers import TrainerControl, TrainerState

    from train import EarlyStopping

    scores = iter([6.4, 6.45, 6.5, 6.6])
    saved = []
    stopper = EarlyStopping(eval_steps=2, patience=3, min_delta=0.0, score=lambda model: {"heldout_ce": next(scores)},
                            save_best=lambda model: saved.append(model))
    state = TrainerState(max_steps=100)
    stopper.on_train_begin(None, state, TrainerControl(), model="weights at 0")
    assert stopper.logged_values(0) == {"heldout_ce": 6.4}
    for step in range(1, 7):
        state.global_step = step
        control = stopper.on_step_end(None, state, TrainerControl(), model=f"weights at {step}")
    assert control.should_training_stop and saved == ["weights at 0"]
    assert (stopper.best_score, stopper.best_step) == (6.4, 0)
    resumed = EarlyStopping(eval_steps=2, patience=3, min_delta=0.0, score=lambda model: pytest.fail("scored"),
                            save_best=lambda model: pytest.fail("saved"), best_score=6.3, best_step=4)
    state.global_step = 4
    resumed.on_train_begin(None, state, TrainerControl(), model="weights at 4")
    assert (resumed.best_score, resumed.best_step) == (6.3, 4)


def test_early_stopping_evaluates_at_the_last_step_too():
    from transformers import TrainerControl, TrainerState

    from train import EarlyStopping

    evaluated = []
    stopper = EarlyStopping(eval_steps=4, patience=3, min_delta=0.0, score=lambda model: evaluated.append(model) or {"heldout_ce": 1.0},
                            save_best=lambda model: None)
    state = TrainerState(max_steps=6)
    for step in range(1, 7):
        state.global_step = step
        stopper.on_step_end(None, state, TrainerControl(), model=step)
    assert evaluated == [4, 6]


# --- the learning-rate schedule and the spend -------------------------------------------------------------------------

class ParameterTrace(TrainerCallback):
    """The student's flattened parameters and learning rate after every optimizer step."""

    def __init__(self):
        self.parameters, self.rates = [], []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.parameters.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
        self.rates.append(optimizer.param_groups[0]["lr"])


def test_two_rounds_that_differ_only_in_their_cap_train_identically_until_the_smaller_ones_decay_begins(
        tokenizer, examples, tmp_path):
    """Warmup-stable-decay: warmup in steps, then a constant rate; only the decay (the cap's last quarter here)
    depends on the cap. A cosine schedule laid over the cap would differ from the first step."""
    from train import WarmupStableDecay

    traces = {}
    for cap in (8, 16):
        trace = ParameterTrace()
        trainer = make_trainer(build_tiny_llama(tokenizer, seed=2), build_tiny_llama(tokenizer, seed=1), [], tokenizer,
                               examples, tmp_path / str(cap), per_device_train_batch_size=2, max_steps=cap,
                               learning_rate=1e-2, logging_steps=100, seed=0, data_seed=0,
                               schedule=WarmupStableDecay(warmup_steps=2, cap=cap, decay_ratio=0.25),
                               callbacks=[trace])
        trainer.train()
        traces[cap] = trace
    small, large = traces[8], traces[16]
    assert small.rates[:6] == large.rates[:6] == [5e-3, 1e-2, 1e-2, 1e-2, 1e-2, 1e-2]  # the small cap decays from 6
    for step in range(6):  # steps 1..6, before the 8-step round's decay changes its rate
        assert torch.equal(small.parameters[step], large.parameters[step]), f"step {step + 1}"
    assert small.rates[6] < large.rates[6] and not torch.equal(small.parameters[7], large.parameters[7])
    assert small.rates[-1] == 0.0  # 1 - sqrt decay to zero at the cap


def test_a_plateau_begins_the_decay_and_the_round_stops_when_it_ends_keeping_the_best():
    from transformers import TrainerControl, TrainerState

    from train import EarlyStopping, WarmupStableDecay

    schedule = WarmupStableDecay(warmup_steps=0, cap=1000, decay_ratio=0.25)
    scores = iter([5.0, 4.0, 4.0, 4.0, 3.5, 3.6, 3.4])
    stopper = EarlyStopping(eval_steps=4, patience=2, min_delta=0.01, score=lambda model: {"heldout_ce": next(scores)},
                            save_best=lambda model: None, schedule=schedule)
    state, evaluated_at, stopped_at = TrainerState(max_steps=1000), [], None
    for step in range(1, 40):
        state.global_step = step
        before = stopper.latest
        control = stopper.on_step_end(None, state, TrainerControl(), model=step)
        if stopper.latest is not before:
            evaluated_at.append(step)
        if control.should_training_stop:
            stopped_at = step
            break
    # no improvement at 12 and 16: the plateau at 16 begins a decay of 16 / 4 = 4 steps, to step 20, evaluated there
    assert (schedule.plateau_step, schedule.decay_start, schedule.decay_end) == (16, 16, 20)
    assert evaluated_at == [4, 8, 12, 16, 20] and stopped_at == 20 and stopper.stop_reason == "plateau"
    assert stopper.best_score == 3.5 and stopper.best_step == 20
    assert schedule(15) == 1.0 and schedule(16) == 1.0 and schedule(20) == 0.0 and 0 < schedule(18) < 1
    assert not schedule.begin_decay(30)  # a decay that has begun is not begun again


def test_a_begun_decay_survives_the_schedulers_checkpoint():
    """LambdaLR saves a callable object's attributes: a resumed round goes on with the decay its plateau began."""
    from torch.optim.lr_scheduler import LambdaLR

    from train import WarmupStableDecay

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupStableDecay(warmup_steps=2, cap=100, decay_ratio=0.5)
    scheduler = LambdaLR(optimizer, schedule)
    schedule.begin_decay(10)
    resumed_schedule = WarmupStableDecay(warmup_steps=2, cap=100, decay_ratio=0.5)
    LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), resumed_schedule).load_state_dict(
        scheduler.state_dict())
    assert (resumed_schedule.decay_start, resumed_schedule.decay_end, resumed_schedule.plateau_step) == (10, 15, 10)


def test_the_spend_meter_counts_every_trained_batchs_tokens_without_padding(tokenizer, examples, tmp_path):
    from slm_ensembles.compute import TokenCount
    from train import SpendMeter

    meter = SpendMeter()
    trainer = make_trainer(build_tiny_llama(tokenizer, seed=2), build_tiny_llama(tokenizer, seed=1), [], tokenizer,
                           examples, tmp_path, per_device_train_batch_size=2, max_steps=3, logging_steps=100,
                           spend=meter, callbacks=[meter])
    batches = []
    original = trainer.compute_loss
    trainer.compute_loss = lambda model, inputs, **kwargs: batches.append(inputs) or original(model, inputs, **kwargs)
    trainer.train()
    expected = TokenCount()
    for inputs in batches:
        lengths = inputs["attention_mask"].sum(dim=1)
        expected = expected + TokenCount(int(lengths.sum()), int((inputs["labels"][:, 1:] != -100).sum()),
                                         int((lengths ** 2).sum()))
    assert len(batches) == 3 and meter.tokens == expected  # synced at the last step
