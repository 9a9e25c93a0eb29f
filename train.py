"""DistillationTrainer: TRL's SFTTrainer, with the hybrid loss computed through the frozen ensemble.

The trainer keeps everything the Trainer gives (optimizer, scheduler, accelerate devices and processes, gradient
accumulation, clipping, logging, callbacks, progress bar) and replaces only the loss: see losses.py. Logits are
computed only at supervised positions (hidden states selected before the output head: model_io.py), so a batch never
holds (batch x length x vocabulary) logits for the prompt tokens.
"""

import dataclasses
import gc
import json
import math
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel as unwrap_model
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from trl import SFTConfig, SFTTrainer

from model_io import PaddingCollator, hidden_at, output_head, trained_hidden_at
from slm_ensembles import files, run_state
from slm_ensembles.compute import SpendRule, TokenCount, model_shape
from slm_ensembles.losses import (LossSettings, LossSums, Projection, SparseTarget, chunked_hybrid_loss_sums,
                                  compile_loss_terms, hybrid_loss_terms, next_token_targets, predictor_mask)
from slm_ensembles.tracking import trainer_report_to


def gradients_are_finite(gradients: list[torch.Tensor]) -> bool:
    """Whether every gradient entry is finite, read back from the device once rather than once per tensor.

    A gradient's L2 norm is not finite when one of its entries is not, and also when its sum of squares overflows,
    which the gradient clipping before the step would see as an infinite norm too. _foreach_norm computes all the
    norms in a few fused kernels.
    """
    if not gradients:
        return True
    norms = torch._foreach_norm(gradients)
    return bool(torch.isfinite(torch.stack(norms)).all())


class NonFiniteLossError(RuntimeError):
    """Training kept producing NaN or infinite losses or gradients."""


class DistillationTrainer(SFTTrainer):
    """Trains one student through the frozen ensemble of earlier members towards the teacher.

    `teacher` may be None when alpha = 0 (pure next-token loss). `members` are the frozen earlier students. With a
    `teacher_cache` (teacher_cache.TeacherCache) the teacher's body never runs: its targets come from the cache
    (top-k log-probabilities, or final hidden states put through the teacher's head), keyed by `example_id`.
    `compile_loss` runs the loss's per-chunk function through torch.compile (config.use_compiled_loss decides).
    """

    def __init__(self, model, teacher, members: list, settings: LossSettings, vocab_size: int, args: SFTConfig,
                 train_dataset, processing_class, callbacks=None, chunk_size: int = 0, teacher_cache=None,
                 round_index: int = 0, max_bad_steps: int = 3, compile_loss: bool = False,
                 schedule: "WarmupStableDecay | None" = None, spend: "SpendMeter | None" = None):
        super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         data_collator=PaddingCollator(processing_class.pad_token_id), callbacks=callbacks)
        self.settings = settings
        self.vocab_size = vocab_size
        self.schedule = schedule  # lr_scheduler=wsd: the learning rate's multiplier by step (None: args' scheduler)
        self.spend = spend  # counts the tokens each training batch runs on
        self.chunk_size = chunk_size  # supervised positions per loss chunk (0: the whole micro-batch at once)
        # Built once: compiled code is kept per compiled function, and each step reuses it. If the compiled code
        # fails, at any step, the rest of this trainer's steps use the eager loss (losses.CompiledLossTerms).
        self.loss_terms = compile_loss_terms() if compile_loss else hybrid_loss_terms
        self.teacher = self.freeze(teacher) if settings.alpha > 0 else None
        self.teacher_cache = teacher_cache
        self.round_index = round_index
        self.max_bad_steps = max_bad_steps
        self.bad_steps_in_a_row = 0
        self.good_steps = 0  # optimizer steps taken by this trainer (a resumed round counts from its checkpoint)
        self.members = [self.freeze(member) for member in members]
        self.checkpoint_bytes = run_state.checkpoint_bytes(model, processing_class)  # for a full disk's message
        # Our loss is already normalised by the optimizer step's supervised-token count (num_items_in_batch):
        # the Trainer must neither divide it by the accumulation steps nor skip counting the tokens.
        self.loss_is_scaled_for_ga = True
        self.model_accepts_loss_kwargs = True
        # The loss's parts of each optimizer step since the last log, keyed by the step they belong to (so that the
        # average is right however many micro-batches a step has, and after resuming from a checkpoint).
        self._parts_by_step: dict[int, dict[str, float]] = {}

    def train(self, *args, **kwargs):
        """Trainer.train, refusing a round in which every step was skipped as non-finite (fewer steps than
        `max_bad_steps`): its student is the untrained one, which must not become a member."""
        output = super().train(*args, **kwargs)
        if self.good_steps == 0 and self.bad_steps_in_a_row > 0:
            raise NonFiniteLossError(f"round {self.round_index}: every one of its {self.bad_steps_in_a_row} steps was "
                                     "non-finite and skipped, so nothing was trained; lower the learning rate or "
                                     "check the data and settings")
        return output

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The args' scheduler, or the warmup-stable-decay `schedule`: its multiplier object goes into LambdaLR,
        whose state_dict saves the object's attributes, so a resumed round keeps a decay its plateau began."""
        if self.schedule is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = LambdaLR(optimizer or self.optimizer, self.schedule)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with a step that skips non-finite gradients (see `guarded_step`)."""
        optimizer = super().create_optimizer(model)
        unguarded_step = optimizer.step
        optimizer.step = lambda *args, **kwargs: self.guarded_step(optimizer, unguarded_step, *args, **kwargs)
        return optimizer

    def guarded_step(self, optimizer, unguarded_step, *args, **kwargs):
        """Skip an optimizer step whose gradients are not finite (a NaN or infinite loss or gradient norm).

        The skip is reported with its step and round; `max_bad_steps` skips in a row stop the round with
        NonFiniteLossError, its checkpoints kept, rather than training on garbage.
        """
        gradients = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradients_are_finite(gradients):
            self.bad_steps_in_a_row = 0
            self.good_steps += 1
            return unguarded_step(*args, **kwargs)
        self.bad_steps_in_a_row += 1
        step = self.state.global_step + 1
        print(f"round {self.round_index} step {step}: non-finite loss or gradients, step skipped "
              f"({self.bad_steps_in_a_row} in a row)", flush=True)
        optimizer.zero_grad(set_to_none=True)
        if self.bad_steps_in_a_row >= self.max_bad_steps:
            raise NonFiniteLossError(f"round {self.round_index}: {self.bad_steps_in_a_row} non-finite steps in a row "
                                     f"up to step {step}; stopped. The last good checkpoint is kept in "
                                     f"{self.args.output_dir}; lower the learning rate or check the data")
        return None

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint write. One that fails for want of disk stops the round with
        files.DiskSpaceError, naming the folder and the bytes a checkpoint takes; the earlier checkpoints are
        kept, and this one, without its trainer_state.json or checksums.json, never counts as complete."""
        with files.refuse_full_disk(Path(self.args.output_dir), self.checkpoint_bytes,
                                        f"the checkpoint of step {self.state.global_step}",
                                        "the earlier checkpoints are kept: free some space, then continue the run "
                                        "with `python main.py --resume` and its run folder"):
            super()._save_checkpoint(model, trial)

    def freeze(self, model):
        model.eval().requires_grad_(False)
        if next(model.parameters()).device.type != self.accelerator.device.type:
            model.to(self.accelerator.device)
        return model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        positions = predictor_mask(labels)
        if model.training and self.spend is not None:
            self.spend.add_batch(TokenCount.of_batch(inputs["attention_mask"], positions))
        targets = next_token_targets(labels).to(self.accelerator.device)
        batch = (inputs["input_ids"], inputs["attention_mask"], positions)
        # The per-term gradient norms cost two extra backward passes per chunk (each term's gradient at the hidden
        # states alone): only on steps that will be logged.
        logged_step = model.training and (self.state.global_step + 1) % self.args.logging_steps == 0
        # hidden_at and the heads bypass the autocast wrapper that accelerate puts around model.forward for mixed
        # precision, so autocast is entered here (the loss itself is computed in fp32 inside it).
        with self.accelerator.autocast():
            inner_model = unwrap_model(model)
            # module: the head's parameters get their gradients through the fused loss (losses.py)
            student = Projection(trained_hidden_at(model, *batch), output_head(inner_model, self.vocab_size),
                                 module=inner_model.get_output_embeddings())
            with torch.no_grad():
                teacher = self.teacher_target(inputs, batch, len(targets)) if self.teacher is not None else None
                members = [self.frozen_projection(member, batch) for member in self.members]
            sums = chunked_hybrid_loss_sums(student, teacher, members, targets, self.settings, self.chunk_size,
                                            self.loss_terms, term_gradient_norms=logged_step)

        num_tokens = num_items_in_batch if num_items_in_batch is not None else sums.num_tokens
        num_tokens = torch.as_tensor(num_tokens, device=self.accelerator.device).clamp(min=1)
        loss = sums.total / num_tokens
        scale = 1.0
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens, and DDP averages gradients across processes.
            scale = self.accelerator.num_processes
            loss = loss * scale
        if model.training:
            self.add_loss_parts(sums, num_tokens, scale, logged_step)
        return (loss, {"hidden_states": student.hidden}) if return_outputs else loss

    def add_loss_parts(self, sums: LossSums, num_tokens: torch.Tensor, scale: float, logged_step: bool) -> None:
        """Add this micro-batch's KL and NLL (and, on logged steps, each term's squared gradient norm at the student's
        final hidden states) to its optimizer step's parts, read back from the device in one transfer.

        The squared gradient norms say how hard each term pulls the student: under logit averaging the distillation
        term's pull on a new member shrinks like 1/(n+1) (kl_scale=ensemble_size undoes it). The gradient is that of
        term / num_tokens (the step's supervised tokens), so its squared norm is the loss path's (see
        chunked_hybrid_loss_sums) divided by num_tokens^2; 0 when the loss path computed no gradients.
        Micro-batches and processes hold different positions, so squared norms add up.
        """
        values = {"kl": sums.divergence / num_tokens * scale, "nll": sums.nll / num_tokens * scale}
        if logged_step:
            for name, norm_sq in (("kl", sums.kl_gradient_norm_sq), ("nll", sums.nll_gradient_norm_sq)):
                values[f"grad_norm_{name}_sq"] = (norm_sq / num_tokens.float().pow(2) if norm_sq is not None
                                                  else torch.zeros_like(values["kl"]))
        parts = self._parts_by_step.setdefault(self.state.global_step, {})
        for key, value in zip(values, torch.stack(list(values.values())).tolist()):
            parts[key] = parts.get(key, 0.0) + value

    def teacher_target(self, inputs, batch, num_positions: int) -> Projection | SparseTarget:
        """The teacher's side of the divergence for this batch: online, or read from the cache."""
        if self.teacher_cache is None:
            return self.frozen_projection(self.teacher, batch)
        if "example_id" not in inputs:
            raise ValueError("a teacher cache needs the dataset's `example_id` column (the row index it is keyed by)")
        example_ids = inputs["example_id"].tolist()
        device = self.accelerator.device
        if self.teacher_cache.mode == "hidden":
            target = Projection(self.teacher_cache.hidden_states(example_ids).to(device),
                                output_head(self.teacher, self.vocab_size))
            rows = len(target.hidden)
        else:
            target = SparseTarget(*(t.to(device) for t in self.teacher_cache.topk_targets(example_ids)))
            rows = len(target.log_probs)
        self.teacher_cache.check_positions(rows, example_ids, num_positions)
        return target

    def frozen_projection(self, model, batch) -> Projection:
        """A frozen model's hidden states for this batch, on the student's device, and its head."""
        return Projection(hidden_at(model, *batch).to(self.accelerator.device), output_head(model, self.vocab_size))

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Add the loss's parts, averaged over the optimizer steps since the last log, to training logs."""
        if "loss" in logs and self._parts_by_step:
            for key in ("kl", "nll"):
                mean = sum(parts[key] for parts in self._parts_by_step.values()) / len(self._parts_by_step)
                value = torch.tensor(mean, device=self.accelerator.device)
                logs[key] = round(self.accelerator.reduce(value, reduction="mean").item(), 6)
            logs["hybrid"] = logs["loss"]
            logged = [parts for parts in self._parts_by_step.values() if "grad_norm_kl_sq" in parts]
            if logged:
                squares = torch.tensor([logged[-1]["grad_norm_kl_sq"], logged[-1]["grad_norm_nll_sq"]],
                                       device=self.accelerator.device)
                kl_norm, nll_norm = self.accelerator.reduce(squares, reduction="sum").sqrt().tolist()
                logs["grad_norm_kl"], logs["grad_norm_nll"] = round(kl_norm, 6), round(nll_norm, 6)
            self._parts_by_step.clear()
        for callback in self.callback_handler.callbacks:  # before any callback's on_log: every tracker gets them
            if isinstance(callback, EarlyStopping) and "loss" in logs:  # a step's log, not the closing summary
                logs.update(callback.logged_values(self.state.global_step))
        # SFTTrainer.log adds its own token metrics, which our compute_loss does not collect.
        super(SFTTrainer, self).log(logs, start_time)


# heldout_ce (early stopping's slice), test_ce and the FLOPs spent so far (train_flops and its parts, the run's
# rounds before included) are set on the rows of the steps early stopping evaluated: a learning curve against FLOPs.
EVALUATION_LOG_COLUMNS = ["heldout_ce", "test_ce", "train_flops", "flops_student", "flops_members", "flops_teacher",
                          "flops_evaluation"]
TRAIN_LOG_COLUMNS = ["round", "step", "hybrid", "kl", "nll", "learning_rate", "grad_norm", "grad_norm_kl",
                     "grad_norm_nll", "epoch", *EVALUATION_LOG_COLUMNS]


class WarmupStableDecay:
    """The learning rate's multiplier at a step (LambdaLR's lr_lambda): linear warmup over `warmup_steps`, then 1,
    then a 1 - sqrt decay to 0 (Hägele et al. 2024) from `decay_start` to `decay_end`.

    The decay begins at the plateau (early stopping calls `begin_decay`), lasting `decay_ratio` of the steps taken
    by then, or, for a round that reaches its cap first, in the cap's last `decay_ratio`. Until its decay begins a
    round's rate does not depend on its cap, so two rounds given different caps train alike until then. Only plain
    attributes: LambdaLR's state_dict saves them into each checkpoint.
    """

    def __init__(self, warmup_steps: int, cap: int, decay_ratio: float):
        self.warmup_steps, self.cap, self.decay_ratio = warmup_steps, cap, decay_ratio
        self.decay_end = cap
        self.decay_start = cap - max(1, round(decay_ratio * cap))
        self.plateau_step: int | None = None  # where a plateau began the decay (None: the cap's decay)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if step < self.decay_start:
            return 1.0
        return max(0.0, 1.0 - math.sqrt((step - self.decay_start) / max(1, self.decay_end - self.decay_start)))

    def begin_decay(self, step: int) -> bool:
        """Begin the decay at `step` (a plateau), unless it has begun already; whether it began now."""
        if step >= self.decay_start:
            return False
        self.decay_start, self.plateau_step = step, step
        self.decay_end = min(self.cap, step + max(1, round(self.decay_ratio * step)))
        return True


def round_schedule(config) -> WarmupStableDecay | None:
    """The round's warmup-stable-decay multiplier with lr_scheduler=wsd, else None (the Trainer's own scheduler)."""
    if config.lr_scheduler != "wsd":
        return None
    return WarmupStableDecay(config.warmup_steps, config.steps_per_round, config.decay_ratio)


class SpendMeter(TrainerCallback, ExportableState):
    """Counts what a round spends as it trains: the tokens of every training batch (compute.TokenCount, padding
    excluded) and the early-stopping evaluations. Each process counts its own batches (`pending`); `sync` adds
    them up across processes (`sum_over_processes`, a collective every process calls at the same step) into
    `tokens`. It syncs before every checkpoint, so the count a checkpoint saves is the whole round's so far."""

    def __init__(self, sum_over_processes=None, tokens: dict | None = None, evaluations: int = 0):
        self.sum_over_processes = sum_over_processes or (lambda values: values)
        self.tokens = TokenCount(**(tokens or {}))
        self.evaluations = evaluations
        self.pending = TokenCount()

    def add_batch(self, count: TokenCount) -> None:
        self.pending = self.pending + count

    def sync(self) -> TokenCount:
        """The round's tokens so far, every process's batches counted."""
        pending = self.pending
        self.tokens = self.tokens + TokenCount(*self.sum_over_processes([pending.sequence, pending.supervised,
                                                                         pending.squared]))
        self.pending = TokenCount()
        return self.tokens

    def round_parts(self, rule: SpendRule, student, members: list) -> list[float]:
        """What the round has spent so far by part (compute.SPEND_PARTS), under `rule`: training `student` through
        `members` over the tokens synced now, and the evaluations counted."""
        return rule.round_parts(model_shape(student), [model_shape(member) for member in members], self.sync(),
                                self.evaluations)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_training_stop or state.global_step >= state.max_steps:
            self.sync()
        return control

    def state(self) -> dict:
        return {"args": {}, "attributes": {"tokens": dataclasses.asdict(self.tokens),
                                           "evaluations": self.evaluations}}


class EarlyStopping(TrainerCallback, ExportableState):
    """Stops a round once the student has stopped improving, keeping its best state.

    Every `eval_steps` optimizer steps, at the last step and where a decay ends, `score(model)` evaluates the
    student: a dict whose "heldout_ce" the round is judged by (lower is better), and whatever else it measured there
    (test_ce, FLOPs spent), which goes into the training logs with it (DistillationTrainer.log, then the CSV log and
    any tracker). An improvement of more than `min_delta` nats saves the weights (`save_best`). After `patience`
    evaluations in a row without one, training stops with stop_reason "plateau", checkpointing first so a resumed
    run knows the round has finished; with a warmup-stable-decay `schedule` whose decay has not begun, the plateau
    begins the decay instead, and the round stops when the decay ends. Its state goes into every checkpoint
    (trainer_state.json's stateful_callbacks), and a resumed round starts from it (`resumed_state`).
    """

    def __init__(self, eval_steps: int, patience: int, min_delta: float, score=None, save_best=None,
                 best_score: float = math.inf, best_step: int = 0, bad_evaluations: int = 0,
                 stop_reason: str | None = None, schedule: WarmupStableDecay | None = None,
                 reference: float | None = None):
        self.eval_steps, self.patience, self.min_delta = eval_steps, patience, min_delta
        self.score, self.save_best, self.schedule = score, save_best, schedule
        self.best_score, self.best_step, self.bad_evaluations = best_score, best_step, bad_evaluations
        self.reference = best_score if reference is None else reference  # the score patience measures gains from
        self.stop_reason = stop_reason
        self.latest: tuple[int, dict] | None = None  # (step, what score gave) of the newest evaluation, for the log

    def state(self) -> dict:
        return {"args": {"eval_steps": self.eval_steps, "patience": self.patience, "min_delta": self.min_delta},
                "attributes": {"best_score": self.best_score, "best_step": self.best_step,
                               "bad_evaluations": self.bad_evaluations, "stop_reason": self.stop_reason,
                               "reference": self.reference}}

    def evaluate(self, model, step: int) -> float:
        scores = self.score(model)
        self.latest = (step, scores)
        return scores["heldout_ce"]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """The round's starting point is scored and kept as the best so far, so a round that never improves on it
        ends where it began: with combine=additive (a new member starting at zero) the ensemble is then unchanged,
        never made worse by a member that only overfits. A resumed round has its best already."""
        if state.global_step == 0 and self.best_score == math.inf:
            self.best_score, self.best_step = self.evaluate(model, 0), 0
            self.reference = self.best_score
            self.save_best(model)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        decay_ends = self.schedule is not None and self.schedule.plateau_step is not None \
            and step >= self.schedule.decay_end
        if step % self.eval_steps and step < state.max_steps and not decay_ends:
            return control
        score = self.evaluate(model, step)
        control.should_log = True
        # Patience counts improvements of more than min_delta since the last such one (`reference`); the weights
        # kept are the lowest held-out CE evaluated, however small its gain (a decay's last hundredths count).
        self.bad_evaluations = 0 if score < self.reference - self.min_delta else self.bad_evaluations + 1
        if not self.bad_evaluations:
            self.reference = score
        if score < self.best_score:
            self.best_score, self.best_step = score, step
            self.save_best(model)
        if self.bad_evaluations >= self.patience and self.schedule is not None and self.schedule.begin_decay(step):
            self.bad_evaluations = 0  # the plateau begins the decay; the round goes on until it ends
        elif self.bad_evaluations >= self.patience or decay_ends:
            self.stop_reason = "plateau"
            control.should_training_stop = True
            control.should_save = True  # the checkpoint that tells a resumed run the round has finished
        return control

    def logged_values(self, step: int) -> dict:
        """What the training log gets at `step`: the evaluation's values, when it was evaluated then."""
        if not self.latest or self.latest[0] != step:
            return {}
        return {key: round(value, 6) if key.endswith("_ce") else value for key, value in self.latest[1].items()}


def resumed_state(checkpoint: Path | None, callback: type = EarlyStopping) -> dict:
    """The attributes of a stateful `callback` (EarlyStopping, SpendMeter) a checkpoint holds (none when it has
    none: a round without early stopping)."""
    if checkpoint is None:
        return {}
    saved = json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("stateful_callbacks", {})
    return saved.get(callback.__name__, {}).get("attributes", {})


class CsvTrainLogCallback(TrainerCallback):
    """Appends one row per training log to a CSV file: hybrid loss, KL, NLL, learning rate, the gradient norm over
    the student's parameters, and each term's gradient norm at its final hidden states (see add_loss_parts).

    A row is appended whole or not at all: one the disk has no room for stops training with
    files.DiskSpaceError, the rows before it as they were (files.append_atomically).
    """

    def __init__(self, path: str | Path, round_index: int):
        self.path = Path(path)
        self.round_index = round_index

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "hybrid" not in logs:
            return
        row = {"round": self.round_index, "step": state.global_step, **{k: logs.get(k) for k in TRAIN_LOG_COLUMNS[2:]}}
        files.append_csv_rows(self.path, TRAIN_LOG_COLUMNS, [row])


def training_arguments(config, output_dir: str | Path, round_index: int, use_cpu: bool, bf16: bool,
                       run_name: str | None = None) -> SFTConfig:
    """The Trainer settings for one round, from the run config; `run_name` names the run in trackers."""
    return SFTConfig(
        output_dir=str(output_dir),
        run_name=run_name,
        max_steps=config.steps_per_round,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        # wsd: DistillationTrainer.create_scheduler puts in the round's WarmupStableDecay
        lr_scheduler_type="constant" if config.lr_scheduler == "wsd" else config.lr_scheduler,
        warmup_steps=0 if config.lr_scheduler == "wsd" else round(config.warmup_ratio * config.steps_per_round),
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        seed=config.round_seed(round_index),  # each round's student sees its own data order
        data_seed=config.round_seed(round_index),
        bf16=bf16,  # SFTConfig defaults to bf16 even on CPU: always say which
        activation_checkpointing=config.gradient_checkpointing,
        use_cpu=use_cpu,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.keep_checkpoints,
        report_to=trainer_report_to(config.report_to),
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # examples are truncated at preprocessing time
        average_tokens_across_devices=True,
        ddp_find_unused_parameters=False,  # every parameter gets a gradient: skip DDP's search for unused ones
    )


def trained_steps(trainer, resume_from: Path | None) -> int:
    """Train (from `resume_from`'s checkpoint, if any) and return the steps the Trainer has taken, the Trainer then
    freed. It and its optimizer hold reference cycles (the optimizer's guarded step refers back to both), so dropping
    the last reference frees nothing until the garbage collector runs: collected here, the optimizer's states and
    the Trainer's buffers are gone before the round's evaluation, not whenever a collection happens to come."""
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    steps = trainer.state.global_step
    del trainer
    gc.collect()
    return steps
