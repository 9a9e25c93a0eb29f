"""Distil a teacher LLM into an ensemble of small students, one student per round.

Each round trains a fresh student with the hybrid loss computed *through* the frozen ensemble of the earlier
students (losses.py), adds it to the ensemble, and evaluates the student, the ensemble and (once) the teacher on
the held-out split. Everything a run writes goes to runs/YYYY-MM-DD/run_N/:
    config.yaml      the resolved configuration          manifest.json   each round's status, members
    metrics.csv      one row per model and round          train_log.csv   hybrid, KL, NLL, lr, grad norm per log
    ensemble/        the ensemble (ModelEnsemble.from_pretrained), member_r/ = round r's student + tokenizer
                     with its own code (loads without this project) and model card (README.md)
    samples.csv      answers to fixed prompts per round   *.png           figures (plot.py), at the end
Every setting and its default is in config.py (presets: demo, the default, for a laptop CPU; paper; test).

Usage:
    python main.py                                   # the demo: embedded SmolLM2 teacher + ShareGPT, on CPU
    python main.py --preset paper --dry_run          # validate the full-scale config and print its plan
    python main.py --preset paper --prepare_only     # only prepare (tokenize) its data: a CPU job before the GPUs
    python main.py --preset paper --alpha 0.7 --total_rounds 6     # one GPU
    python main.py --config my_run.yaml --steps_per_round 200
    python main.py --resume runs/2026-11-29/run_3    # continue a run; completed rounds are skipped
    python main.py --combine weighted                # fit each new member's weight (also: additive, --eta)
    python main.py --baseline single_matched         # baselines: independent | single_matched | single_large
    accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 4 main.py --preset paper
                                                     # several GPUs on one node (data parallel)
    accelerate launch --config_file accelerate_configs/ddp.yaml --num_machines 2 --machine_rank 0 \\
        --main_process_ip HOST --main_process_port 29500 --num_processes 16 main.py --preset paper
                                                     # two nodes: the same command on each, with its machine_rank
    sbatch train.sh --preset paper                   # a SLURM cluster; sbatch --nodes=2 train.sh ... for nodes
"""

import argparse
import copy
import dataclasses
import functools
import gc
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoConfig

import compute
import config as config_lib
import dry_run
import embedded
import files
import model_card
import plot
import preprocess_dataset
import processes
import run_state
import students
import teacher_cache
import tracking
import utils
from ensemble import WEIGHTED_MODES, ModelEnsemble, weights_with_new_member
from evaluation import SAMPLE_PROMPTS, evaluate, evaluation_teacher, new_member_weight, sample_answers
from losses import LossSettings
from model_io import PaddingCollator, check_logits_at
from train import (TRAIN_LOG_COLUMNS, CsvTrainLogCallback, DistillationTrainer, EarlyStopping, NonFiniteLossError,
                   SpendMeter, resumed_state, round_schedule, training_arguments)

TRAINING_COLUMNS = ("steps_run", "member_step", "stop_reason")  # from a member's training record
METRIC_COLUMNS = ["round", "model", "ensemble_size", "ce", "perplexity", "kl_teacher", "top1_agreement", "ece",
                  "gap_closed", "diversity", "num_tokens", "seconds", *TRAINING_COLUMNS, *compute.COLUMNS]
TRAINED_ROWS = ("student", "ensemble")  # the rows of a round that its training record (steps, stop) belongs to
SAMPLE_COLUMNS = ["round", "model", "prompt", "answer", "new_tokens"]


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a run builds once, before its first round; each round returns the run with its member added."""

    config: config_lib.Config
    round_config: config_lib.Config  # what each round's student is built and trained with (baselines differ)
    state: object  # accelerate's PartialState: this process, its device, the others
    preemption: processes.PreemptionSignal
    tokenizer: object
    teacher: torch.nn.Module
    evaluated_teacher: object  # what evaluation reads: the teacher, or its hidden states cached (CachedTeacher)
    cache: teacher_cache.TeacherCache | None  # the teacher's outputs on the training split (topk/hidden mode)
    data: dict  # train, test and the slices held out of train (weight_fit, early_stop)
    train_tokens: compute.TokenCount  # the training split's
    spend_rule: compute.SpendRule  # how what the rounds spend is charged (compute.py)
    collator: PaddingCollator
    folder: Path
    manifest: dict
    trackers: list  # experiment trackers that take each round's metric rows (main process; tracking.py)
    members: tuple = ()  # the frozen students of the rounds done
    weights: list | None = None  # one coefficient per member (weighted and additive combine modes)

    @property
    def device(self) -> torch.device:
        return self.state.device

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def rounds_left(self) -> list[int]:
        return [index for index in range(self.config.rounds_to_run())
                if run_state.round_status(self.manifest, index) != "done"]


def main(argv=None) -> int:
    """Run or resume a distillation: 0 when done, EXIT_PREEMPTED when a signal stopped it (the same command then
    continues it). The preemption handler is in place from the first line, so a signal during setup is not lost."""
    with processes.PreemptionSignal() as preemption:
        run = setup(parse_args(argv), preemption)
        if not isinstance(run, Run):
            return run  # an exit code: a dry run, or a signal during setup
        for round_index in run.rounds_left():
            student, untrained = new_student(run, round_index)
            student = trained_student(run, round_index, student)
            if student is None:
                return processes.EXIT_PREEMPTED  # checkpointed: the same command continues the round
            run = with_member(run, student)
            rows = evaluate_round(run, round_index, untrained)
            run = record_round(run, round_index, rows)
            if preemption.received_anywhere(run.device):
                return processes.EXIT_PREEMPTED
        report(run)
    return 0


# --- setup ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    return config_lib.parse_command_line(argv, __doc__)


def setup(args: argparse.Namespace, preemption: processes.PreemptionSignal) -> Run | int:
    """Everything the rounds need, built once: config, processes, teacher and tokenizer, data, teacher caches, run
    folder (new or resumed), earlier members. Whatever can refuse the run (config, data, disk) does so before a run
    folder is created or touched. An exit code instead of a run for a dry run, --prepare_only or a signal during
    setup."""
    config, resume_dir = resolve_config(args)
    tracking.tracker_names(config.report_to)  # an unknown tracker is refused before anything loads
    check_model_folders(config)
    if args.dry_run:
        print_plan(config, resume_dir)
        print("\n".join(dry_run.prediction_lines(config)))
        return 0
    if args.prepare_only:
        return prepare_only(config)
    utils.return_freed_buffers_to_the_system()  # before anything large is allocated: resident memory stays flat
    state = utils.process_state(config.device, config.process_group_timeout_minutes)
    teacher_path, tokenizer = teacher_tokenizer(config, state)
    check_fits_teacher(config, teacher_path, len(tokenizer))
    with state.main_process_first():  # the first process prepares and caches the data, the others read it
        data, counts = preprocess_dataset.prepare_for_run(config, tokenizer)
    if preempted_during_setup(preemption, state.device, "the rest of the setup"):
        return processes.EXIT_PREEMPTED
    # Loaded at most once, and only where the rounds run it or a teacher cache is still to be built.
    load_whole_teacher = functools.cache(functools.partial(whole_teacher, config, teacher_path, tokenizer, state))
    teacher = rounds_teacher(config, teacher_path, tokenizer, state, load_whole_teacher)
    collator = PaddingCollator(tokenizer.pad_token_id)
    try:
        cache = teacher_cache.training_cache(config, load_whole_teacher, teacher.dtype, teacher_path, tokenizer,
                                             data["train"], collator, state, preemption)
    except teacher_cache.BuildPreempted as stopped:  # stopped between two pieces, which are kept for the next run
        print(f"{stopped} (exit code {processes.EXIT_PREEMPTED})")
        return processes.EXIT_PREEMPTED
    evaluated_teacher = evaluation_teacher(config, teacher, load_whole_teacher, cache, data, collator, state)
    train_tokens = compute.TokenCount(*preprocess_dataset.token_totals(data["train"]))  # for the compute accounting
    round_config = round_settings(config, teacher, tokenizer, train_tokens, len(data["train"]), state.num_processes)
    check_disk_before_the_run_folder(config, resume_dir, round_config, teacher, tokenizer)
    if preempted_during_setup(preemption, state.device, "the run folder is written"):
        return processes.EXIT_PREEMPTED
    folder, manifest = run_state.open_run(config, resume_dir, args.job_id, state, chosen_preset(args))
    print_plan(config, folder, counts, data)
    if state.is_main_process:
        run_state.remove_finished_rounds_checkpoints(folder, manifest)
        run_state.restore_metric_rows(folder, METRIC_COLUMNS, manifest)
    trackers = (tracking.round_trackers(config.report_to, config.tracker_project, folder, run_name(folder, config))
                if state.is_main_process else [])
    members = earlier_members(config, folder, manifest, state.device)
    return Run(config=config, round_config=round_config, state=state, preemption=preemption, tokenizer=tokenizer,
               teacher=teacher, evaluated_teacher=evaluated_teacher, cache=cache, data=data,
               train_tokens=train_tokens, spend_rule=spend_rule(config, teacher, train_tokens, data),
               collator=collator,
               folder=folder, manifest=manifest, trackers=trackers, members=members,
               weights=(manifest.get("weights") or []) if config.combine in WEIGHTED_MODES else None)


def resolve_config(args: argparse.Namespace) -> tuple[config_lib.Config, Path | None]:
    """The run's config and, when it continues a run, that run's folder. A new run layers the preset, YAML file and
    command line (config.build_config); --resume continues with the run's saved config.yaml, refusing any other
    setting (run_state.resumed_config); a requeued --job_id resumes the run the job started, if it started one."""
    overrides = config_lib.command_line_settings(args)
    if args.resume is not None:
        stated = run_state.stated_settings(args.preset, args.config_file, overrides)
        return run_state.resumed_config(Path(args.resume), stated, args.preset), Path(args.resume)
    config = config_lib.build_config(chosen_preset(args), args.config_file, overrides)
    if args.job_id is not None:
        # Looked for under the output_root the whole command line gives (a YAML file may set it).
        started = run_state.find_run_of_job(config.output_root, args.job_id)
        if started is not None:  # a requeued job repeats its command line: the run's saved config counts
            return run_state.resumed_config(Path(started), {}), Path(started)
    return config, None


def chosen_preset(args: argparse.Namespace) -> str:
    """The preset a new run starts from: --preset, or the default one."""
    return args.preset or config_lib.DEFAULT_PRESET


def check_model_folders(config: config_lib.Config) -> None:
    """Refuse a teacher or student_model meant as a local folder that is not one, before anything loads (the hub
    would be asked for it instead, and answer with a message about repository names)."""
    utils.check_model_folder("teacher", config.teacher)
    if config.student_init == "pretrained":
        utils.check_model_folder("student_model", config.student_model)


def prepare_only(config: config_lib.Config) -> int:
    """--prepare_only: the run's data prepared into the folder setup reads it from, by this process alone and with
    the teacher's tokenizer only (no weights, no GPU), so that a CPU job can do it before the GPU job; exit code 0."""
    tokenizer = utils.load_tokenizer(embedded.resolve_teacher(config.teacher, config.cache_dir),
                                     config.trust_remote_code)
    _, counts = preprocess_dataset.prepare_for_run(config, tokenizer)
    print(f"prepared data: {preprocess_dataset.run_data_folder(config, tokenizer)}")
    print(preprocess_dataset.describe_counts(counts))
    return 0


def teacher_tokenizer(config: config_lib.Config, state) -> tuple[str, object]:
    """The teacher's local folder and its tokenizer (the run's). A pretrained student's vocabulary is checked
    against the tokenizer here, before anything else loads."""
    with state.main_process_first():  # a first-use conversion of the embedded teacher happens once
        teacher_path = embedded.resolve_teacher(config.teacher, config.cache_dir)
    tokenizer = utils.load_tokenizer(teacher_path, config.trust_remote_code)
    if config.student_init == "pretrained":
        utils.check_student_tokenizer(tokenizer, config.student_model, config.teacher, config.trust_remote_code)
    return teacher_path, tokenizer


def check_fits_teacher(config: config_lib.Config, teacher_path: str, vocab_size: int) -> None:
    """Refuse settings the teacher cannot meet, from its tokenizer (`vocab_size` tokens) and its config.json, before
    the data is prepared and any weights load: a top-k cache of more entries than the vocabulary, and students that
    copy layers the teacher lacks."""
    if config.teacher_mode == "topk" and config.cache_k > vocab_size:
        raise config_lib.ConfigError(f"config key 'cache_k' = {config.cache_k} is more than the teacher's vocabulary "
                                     f"of {vocab_size} tokens: give at most {vocab_size}")
    if config.student_init == "teacher_layers":
        layers = AutoConfig.from_pretrained(teacher_path, trust_remote_code=config.trust_remote_code).num_hidden_layers
        # The layers the rounds copy: a single_large baseline spreads its own over the teacher.
        students.check_teacher_layers(students.baseline_round_config(config, layers).teacher_layers, layers)


def whole_teacher(config: config_lib.Config, teacher_path: str, tokenizer, state) -> torch.nn.Module:
    """The teacher, frozen, its weights loaded straight onto this process's device."""
    teacher = utils.load_causal_lm(teacher_path, utils.frozen_dtype(config.dtype, state.device),
                                   config.trust_remote_code, state.device).eval()
    utils.check_vocab_fits(teacher, len(tokenizer), config.teacher)
    check_logits_at(teacher, len(tokenizer))
    return teacher


def rounds_teacher(config: config_lib.Config, teacher_path: str, tokenizer, state,
                   load_whole_teacher) -> torch.nn.Module:
    """The teacher as the rounds need it: the whole model when they run it (online, or students copied from its
    layers); with a cached teacher_mode, its output head alone (model_io.OutputHeadOnly), which projects the cached
    hidden states: a 7B teacher then costs its head's 1 GB on each GPU, not 15 GB."""
    if config.rounds_run_the_teacher():
        return load_whole_teacher()
    head = utils.load_output_head(teacher_path, utils.frozen_dtype(config.dtype, state.device), state.device,
                                  config.trust_remote_code)
    utils.check_vocab_fits(head, len(tokenizer), config.teacher)
    return head


def round_settings(config: config_lib.Config, teacher: torch.nn.Module, tokenizer, train_tokens: compute.TokenCount,
                   examples: int, num_processes: int) -> config_lib.Config:
    """What each round's student is built and trained with: the config itself, or a single-model baseline's
    (students.baseline_round_config), whose cap under baseline_budget flops is the steps that spend the ensemble's
    capped training FLOPs (students.flop_matched_config) on the training split (`train_tokens` in `examples`)."""
    round_config = students.baseline_round_config(config, teacher.config.num_hidden_layers)
    if config.baseline in config_lib.SINGLE_MODEL_BASELINES and config.baseline_budget == "flops":
        return students.flop_matched_config(config, round_config, teacher, tokenizer, train_tokens, examples,
                                         num_processes)
    return round_config


def spend_rule(config: config_lib.Config, teacher: torch.nn.Module, train_tokens: compute.TokenCount,
               data: dict) -> compute.SpendRule:
    """How the run's spend is charged (compute.SpendRule): the teacher's shape, its cache build over the training
    split (and, cached, its states of the early-stopping slice), the early-stopping slice's tokens."""
    shape = compute.model_shape(teacher.config, config.trust_remote_code) if config.alpha > 0 else None
    early_stop = compute.TokenCount(*preprocess_dataset.token_totals(data["early_stop"])) if "early_stop" in data \
        else compute.TokenCount()
    build = compute.charged_cache_build(shape, config.teacher_mode, train_tokens)
    if shape is not None and config.teacher_mode != "online":
        build += compute.measured_forward_flops(shape, dataclasses.replace(early_stop, supervised=0))
    return compute.SpendRule(shape, config.teacher_mode, build, early_stop)


def check_disk_before_the_run_folder(config: config_lib.Config, resume_dir: Path | None,
                                     round_config: config_lib.Config, teacher: torch.nn.Module, tokenizer) -> None:
    """Refuse a run whose output folder's disk cannot hold a round of its student (run_state.check_disk_for_a_round,
    sized from the student's skeleton: nothing allocated). Checked before the run folder exists, so a run that
    cannot write its checkpoints leaves nothing behind."""
    output_folder = resume_dir or Path(config.output_root)
    output_folder.mkdir(parents=True, exist_ok=True)
    run_state.check_disk_for_a_round(output_folder, students.student_skeleton(round_config, teacher, tokenizer),
                                     tokenizer, config)


def preempted_during_setup(preemption: processes.PreemptionSignal, device, next_step: str) -> bool:
    """Whether a signal has come (to any process) before `next_step`: the run then stops, nothing written."""
    if not preemption.received_anywhere(device):
        return False
    print(f"preempted during setup: stopping before {next_step}, with nothing written (exit code "
          f"{processes.EXIT_PREEMPTED}); run the same command again to continue")
    return True


def print_plan(config: config_lib.Config, run_dir: Path | None, counts: dict | None = None,
               data: dict | None = None) -> None:
    """What the run will do; with the prepared data, what preparing it kept and dropped."""
    summary = None if counts is None else (preprocess_dataset.describe_counts(counts) + "; examples: " + ", ".join(
        f"{len(split)} {name}" for name, split in data.items()))
    print("\n".join(config_lib.plan_lines(config, run_dir, summary)))


def run_name(folder: Path, config: config_lib.Config) -> str:
    """The run's name in trackers: its folder below output_root (YYYY-MM-DD/run_N)."""
    return str(folder.relative_to(config.output_root)) if folder.is_relative_to(config.output_root) else folder.name


def earlier_members(config: config_lib.Config, folder: Path, manifest: dict, device: torch.device) -> tuple:
    """The frozen students of the rounds the run finished before (none for a new run), in the frozen dtype on
    `device`, in round order."""
    frozen_dtype = utils.frozen_dtype(config.dtype, device)
    return tuple(utils.load_causal_lm(str(folder / path), frozen_dtype, config.trust_remote_code).to(device).eval()
                 for path in manifest["members"])


# --- a round --------------------------------------------------------------------------------------------------------

def new_student(run: Run, round_index: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A fresh student for the round, on the device, and a frozen copy of it: the untrained student is scored with
    the trained models, so each round runs the teacher once."""
    print(f"\n=== round {round_index + 1}/{run.config.rounds_to_run()}: {len(run.members)} frozen member(s) ===")
    student = students.build_student(run.round_config, run.teacher, run.tokenizer, round_index).to(run.device)
    utils.check_vocab_fits(student, run.vocab_size, f"round {round_index} student")
    if run.config.combine == "additive" and run.members and run.config.baseline == "none":
        students.start_at_zero(student)  # the round starts exactly where the previous one ended
    untrained = copy.deepcopy(student).to(utils.frozen_dtype(run.config.dtype, run.device))
    return student, untrained.eval().requires_grad_(False)


def trained_student(run: Run, round_index: int, student: torch.nn.Module) -> torch.nn.Module | None:
    """The round's trained student, whichever way it comes to exist: its saved member (training finished earlier,
    evaluation did not), its final state (killed before the member was saved), or `student` trained now (from the
    round's newest checkpoint, if any). With early stopping, the final state is the best one evaluated. None when a
    signal stopped the training; it checkpointed first."""
    member_dir = run_state.member_folder(run.folder, round_index)
    if (member_dir / "config.json").is_file():  # saved atomically: a member folder is always complete
        files.check_intact(member_dir, f"delete it, and --resume saves round {round_index}'s member again from "
                                           "its checkpoints")
        print(f"round {round_index}: trained earlier, evaluating {member_dir}")
        return utils.load_causal_lm(str(member_dir), torch.float32, run.config.trust_remote_code).to(run.device)
    run_state.check_disk_for_a_round(run.folder, student, run.tokenizer, run.config)
    resume_from = run_state.latest_complete_checkpoint(run_state.checkpoint_folder(run.folder, round_index),
                                                       run.state.num_processes)
    if run.state.is_main_process:
        run_state.mark_round_training(run.folder, run.manifest, round_index, resume_from, TRAIN_LOG_COLUMNS)
    meter = SpendMeter(utils.summed_over_processes(run.state), **resumed_state(resume_from, SpendMeter))
    stopper = early_stopping(run, round_index, resume_from, meter)
    steps = run_state.checkpoint_step(resume_from) if resume_from else 0
    if steps >= run.round_config.steps_per_round or (stopper and stopper.stop_reason):
        # Finished before the kill: resuming the Trainer from its final checkpoint would run one step more.
        return saved_member(run, round_index, final_state(run, round_index, resume_from), steps, stopper, meter)
    if resume_from:
        print(f"round {round_index}: resuming from {resume_from.name}")
    trainer = distillation_trainer(run, round_index, student, stopper, meter)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    steps_run = trainer.state.global_step
    # The Trainer and its optimizer hold reference cycles (the optimizer's guarded step refers back to both), so
    # dropping them frees nothing until the garbage collector runs: collected now, the optimizer's states and the
    # Trainer's buffers are gone before the round's evaluation, not whenever a collection happens to come.
    del trainer
    gc.collect()
    if run.preemption.received_anywhere(run.device):
        return None
    run.state.wait_for_everyone()  # the best state is saved by the main process
    best = final_state(run, round_index, None) if stopper else student
    return saved_member(run, round_index, best, steps_run, stopper, meter)


def round_loss(run: Run) -> tuple[list, LossSettings]:
    """The frozen members a round's student trains through (the method: every earlier member; the baselines:
    none), and the loss it trains with."""
    frozen = list(run.members) if run.config.baseline == "none" else []
    return frozen, LossSettings.for_round(run.config, run.weights if frozen else [], len(frozen))


def early_stopping(run: Run, round_index: int, resume_from: Path | None,
                   meter: SpendMeter) -> EarlyStopping | None:
    """The round's early stopping (None when eval_steps is 0), resumed in the state `resume_from` holds: it watches
    the held-out CE (the early_stop slice) of the mixture the student trains in, and keeps its best weights. Each
    evaluation also records the mixture's test CE (for the learning curve, never for a choice) and the FLOPs spent
    so far (`meter`); with lr_scheduler=wsd, a plateau begins the round's decay (its `schedule`)."""
    if not run.config.eval_steps:
        return None
    frozen, settings = round_loss(run)
    weights = None if settings.mixture_weights is None else {"mixture": list(settings.mixture_weights)}

    def scores(student) -> dict:
        ce = {name: evaluate({"mixture": [student, *frozen]}, run.evaluated_teacher, run.data[name], run.collator,
                             run.config.eval_batch_size, run.vocab_size, run.config.combine, state=run.state,
                             weights=weights)["mixture"]["ce"] for name in ("early_stop", "test")}
        student.train()  # evaluate() left it in eval mode
        meter.evaluations += 1
        return {"heldout_ce": ce["early_stop"], "test_ce": ce["test"],
                **spent_so_far(run, round_index, student, frozen, meter)}

    def save_best(student) -> None:
        if run.state.is_main_process:
            run_state.save_member_atomically(student, run.tokenizer, run_state.best_folder(run.folder, round_index))

    return EarlyStopping(run.config.eval_steps, run.config.early_stopping_patience,
                         run.config.early_stopping_min_delta, scores, save_best, **resumed_state(resume_from),
                         schedule=round_schedule(run.round_config))


def spent_so_far(run: Run, round_index: int, student, frozen: list, meter: SpendMeter) -> dict:
    """train_flops and its parts spent by the run up to now: the earlier rounds' (their members' records), this
    round's so far (`meter`, counted across processes: every process calls this at the same step), the build."""
    earlier = [run_state.training_record(run.folder / path)["flops"] for path in run.manifest["members"]]
    current = run.spend_rule.round_parts(compute.model_shape(student), [compute.model_shape(m) for m in frozen],
                                         meter.sync(), meter.evaluations)
    return run.spend_rule.columns([*earlier, current])


def final_state(run: Run, round_index: int, checkpoint: Path | None) -> torch.nn.Module:
    """The round's final student: the best weights early stopping kept, or else `checkpoint`'s (checked when it was
    chosen: run_state.latest_complete_checkpoint)."""
    folder = checkpoint
    if run.config.eval_steps:
        folder = run_state.best_folder(run.folder, round_index)
        files.check_intact(folder, f"round {round_index}'s best weights are lost: delete "
                                       f"{run_state.checkpoint_folder(run.folder, round_index)}, and --resume trains "
                                       "the round again")
    return utils.load_causal_lm(str(folder), torch.float32, run.config.trust_remote_code).to(run.device)


def distillation_trainer(run: Run, round_index: int, student: torch.nn.Module, stopper: EarlyStopping | None,
                         meter: SpendMeter) -> DistillationTrainer:
    """The Trainer of the round's student: through the frozen members (the method), or alone (the baselines). Its
    learning-rate schedule is the one early stopping begins the decay of, where both are on."""
    frozen, settings = round_loss(run)
    return DistillationTrainer(
        model=student, teacher=run.teacher, members=frozen, settings=settings, vocab_size=run.vocab_size,
        args=training_arguments(run.round_config, run_state.checkpoint_folder(run.folder, round_index), round_index,
                                use_cpu=run.device.type == "cpu",
                                bf16=utils.use_bf16_autocast(run.config.dtype, run.device),
                                run_name=run_name(run.folder, run.config)),
        train_dataset=member_data(run, round_index), processing_class=run.tokenizer,
        callbacks=[*([stopper] if stopper else []),  # before the log's writer: it adds its scores to the log
                   meter,  # after the stopper, which may ask for the checkpoint the meter syncs before
                   CsvTrainLogCallback(run.folder / "train_log.csv", round_index),
                   processes.StopOnSignal(run.preemption),  # before the disk check: it may decide to save
                   run_state.CheckDiskBeforeSave(run.folder, run_state.checkpoint_bytes(student, run.tokenizer)),
                   run_state.RecordChecksums(),
                   *tracking.trainer_callbacks(run.config.report_to, run.folder, round_index,
                                               run.state.is_main_process)],
        chunk_size=run.config.loss_chunk_size, teacher_cache=run.cache, round_index=round_index,
        compile_loss=config_lib.use_compiled_loss(run.config.compile_loss, run.device),
        schedule=stopper.schedule if stopper else round_schedule(run.round_config), spend=meter)


def member_data(run: Run, round_index: int):
    """The round's training data (config member_data), with the example ids that key the teacher cache."""
    print(f"round {round_index} trains on: {member_data_description(run, round_index)}")
    return preprocess_dataset.member_split(teacher_cache.with_example_ids(run.data["train"]), run.config.member_data,
                                           round_index, run.config.rounds_to_run(), run.config.data_seed)


def member_data_description(run: Run, round_index: int) -> str:
    return preprocess_dataset.describe_member_data(run.config.member_data, round_index, run.config.rounds_to_run(),
                                                   run.config.data_seed)


def saved_member(run: Run, round_index: int, student: torch.nn.Module, steps_run: int,
                 stopper: EarlyStopping | None, meter: SpendMeter) -> torch.nn.Module:
    """`student`, once saved (by one process) as the round's member folder, with the record of its training: the
    steps run, the step whose weights it has, why the round stopped (plateau, or the steps_per_round cap), and what
    it spent (compute.SPEND_PARTS: every step and evaluation it ran, whichever step's weights it keeps)."""
    reason = stopper.stop_reason if stopper else None
    frozen, _ = round_loss(run)
    flops = run.spend_rule.round_parts(compute.model_shape(student), [compute.model_shape(m) for m in frozen],
                                       meter.sync(), meter.evaluations)
    training = {"steps_run": steps_run, "member_step": stopper.best_step if stopper else steps_run,
                "stop_reason": reason or "cap", "flops": flops}
    if run.state.is_main_process:
        run_state.save_member_atomically(student, run.tokenizer, run_state.member_folder(run.folder, round_index),
                                         training)
    print(f"round {round_index}: {training['steps_run']} steps, stopped by the "
          f"{'plateau' if reason else 'cap'}; the member is step {training['member_step']}'s student")
    return student


def with_member(run: Run, student: torch.nn.Module) -> Run:
    """The run with `student` frozen into its ensemble, with its weight among the members."""
    student = student.to(utils.frozen_dtype(run.config.dtype, run.device)).eval().requires_grad_(False)
    weight = new_member_weight(run.config, list(run.members), run.weights, student, run.evaluated_teacher,
                               run.data.get("weight_fit"), run.collator, run.vocab_size, run.state)
    weights = weights_with_new_member(run.config.combine, run.weights or [], weight)
    return dataclasses.replace(run, members=(*run.members, student), weights=weights)


def evaluate_round(run: Run, round_index: int, untrained: torch.nn.Module) -> list[dict]:
    """The round's metric rows on the held-out split: the untrained and the trained student, the ensemble with its
    new member, and (once per run) the teacher. `seconds` is the whole evaluation pass, shared by its rows."""
    if run.state.is_main_process:
        # Damage since the run opened (resume repairs what it finds then) is repaired before the round's rows are
        # added; the other processes read the file only after the evaluation's collectives.
        run_state.restore_metric_rows(run.folder, METRIC_COLUMNS, run.manifest)
    predictors = {"student_untrained": [untrained], "student": [run.members[-1]], "ensemble": list(run.members)}
    sizes = {"teacher": 0, "student_untrained": 1, "student": 1, "ensemble": len(run.members)}
    if not run.manifest["teacher_evaluated"]:
        predictors = {"teacher": [run.teacher], **predictors}
    weights = None if run.weights is None else {**{name: [1.0] for name in predictors}, "ensemble": run.weights}
    started = time.time()
    results = evaluate(predictors, run.evaluated_teacher, run.data["test"], run.collator, run.config.eval_batch_size,
                       run.vocab_size, run.config.combine, state=run.state, weights=weights)
    seconds = round(time.time() - started, 2)
    return [{"round": round_index, "model": name, "ensemble_size": sizes[name], **metrics, "seconds": seconds}
            for name, metrics in results.items()]


def record_round(run: Run, round_index: int, rows: list[dict]) -> Run:
    """The round written down (metric rows, the ensemble's configs, sample answers, then the manifest that marks it
    done, with the rows as written: the journal a damaged metrics.csv is restored from), and the run with that
    manifest: every process keeps it in memory (it decides what the next round evaluates); one writes the files."""
    rows = recorded_rows(run, round_index, rows)
    written = files.csv_text_rows(METRIC_COLUMNS, rows)
    manifest = run_state.finished_round(run.manifest, round_index,
                                        str(run_state.member_folder(run.folder, round_index).relative_to(run.folder)),
                                        run.weights, written, member_data_description(run, round_index))
    if run.state.is_main_process:
        tracking.log_round(run.trackers, round_index, rows)
        # This round's rows replace any that an interrupted evaluation of it left behind.
        files.replace_csv_rows(run.folder / run_state.METRICS, METRIC_COLUMNS,
                                   lambda row: int(row["round"]) != round_index, written)
        # The ensemble folder is complete after every round: ModelEnsemble.from_pretrained(ensemble_dir) works.
        ensemble = ModelEnsemble.from_members(list(run.members), run.config.combine, run.vocab_size,
                                              weights=run.weights)
        run_state.save_ensemble_configs(ensemble, run.tokenizer, run.folder / "ensemble")
        model_card.write_model_card(run.folder)
        write_sample_answers(run, round_index, {"student": run.members[-1], "ensemble": ensemble})
        run_state.write_manifest(run.folder, manifest)
        shutil.rmtree(run_state.checkpoint_folder(run.folder, round_index), ignore_errors=True)  # the member is the round's state
    ce = {row["model"]: row["ce"] for row in rows}
    print(f"round {round_index}: student ce {ce['student']:.4f} (untrained {ce['student_untrained']:.4f}), "
          f"ensemble of {len(run.members)} ce {ce['ensemble']:.4f}")
    return dataclasses.replace(run, manifest=manifest)


def recorded_rows(run: Run, round_index: int, rows: list[dict]) -> list[dict]:
    """The round's evaluation rows as metrics.csv records them: with the trained rows' training record (steps,
    stop), every row's compute columns and gap_closed. Every process computes them (the manifest it keeps holds
    them); the files they read are written before the evaluation's collectives, which every process has passed."""
    training = run_state.training_record(run_state.member_folder(run.folder, round_index))
    rows = [{**row, **{key: training[key] for key in TRAINING_COLUMNS if key in training}}
            if row["model"] in TRAINED_ROWS else row for row in rows]
    columns = compute_columns(run, [*(run.folder / path for path in run.manifest["members"]),
                                    run_state.member_folder(run.folder, round_index)])
    rows = [{**row, **columns.get(row["model"], {})} for row in rows]
    return plot.rows_with_gap_closed(rows, run.folder / run_state.METRICS)


def compute_columns(run: Run, member_folders: list[Path]) -> dict[str, dict]:
    """The compute columns of the round's rows (compute.metric_columns), by model, from what each round spent (its
    member's training record)."""
    spends = [run_state.training_record(folder)["flops"] for folder in member_folders]
    tokens = run.train_tokens
    return compute.metric_columns([compute.model_shape(member) for member in run.members], spends,
                                  context=round(tokens.sequence / len(run.data["train"])), rule=run.spend_rule)


def write_sample_answers(run: Run, round_index: int, models: dict) -> None:
    """Greedy answers of each model to the first `sample_answers` fixed prompts, written to samples.csv."""
    rows = sample_answers(models, run.tokenizer, SAMPLE_PROMPTS[:run.config.sample_answers],
                          run.config.sample_max_new_tokens)
    if rows:
        files.replace_csv_rows(run.folder / "samples.csv", SAMPLE_COLUMNS,
                                   lambda row: int(row["round"]) != round_index,
                                   [{"round": round_index, **row} for row in rows])


# --- report ---------------------------------------------------------------------------------------------------------

def report(run: Run) -> None:
    """The metrics table, the ensemble against its best member, and the figures; then processes leave together
    (one leaving early can abort the other)."""
    if run.state.is_main_process:
        run_state.restore_metric_rows(run.folder, METRIC_COLUMNS, run.manifest)  # damaged since the last round
        print("\n" + plot.metrics_summary(pd.read_csv(run.folder / run_state.METRICS)))
        for figure in plot.plot_run(run.folder) if run.config.plots else []:
            print(f"figure: {figure}")
        print(f"\nrun folder: {run.folder}")
    tracking.finish(run.trackers)
    run.state.wait_for_everyone()


def run_from_command_line() -> int:
    """main() with the exit codes a launcher acts on (processes.run_command): 0 done, 1 failed, 2 bad input,
    75 preempted."""
    return processes.run_command(main, refusals=(config_lib.ConfigError, preprocess_dataset.DataError,
                                                 utils.TokenizerMismatchError, embedded.MissingPackageError,
                                                 teacher_cache.CacheMismatchError, files.DiskSpaceError),
                                 failures=(NonFiniteLossError,))


if __name__ == "__main__":
    exit_code = run_from_command_line()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Several processes: skip the interpreter's teardown, where one of them now and then aborts in a C++
        # destructor ("terminate called without an active exception") after everything has been written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)
