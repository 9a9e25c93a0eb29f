"""Distil a teacher LLM into an ensemble of small students, one student per round.

Each round trains a fresh student with the hybrid loss computed *through* the frozen ensemble of the earlier
students (losses.py), adds it to the ensemble, and evaluates the student, the ensemble and (once) the teacher on
the held-out split. Everything a run writes goes to runs/YYYY-MM-DD/run_N/:
    config.yaml      the resolved configuration          manifest.json   each round's status, members
    metrics.csv      one row per model and round          train_log.csv   hybrid, KL, NLL, lr, grad norm per log
    ensemble/        the ensemble (ModelEnsemble.from_pretrained), member_r/ = round r's student + tokenizer
                     with its own code (loads without this project) and model card (README.md); --push_to_hub
                     OWNER/NAME uploads it to the Hub after the last round (push.py)
    samples.csv      answers to fixed prompts per round   *.png           figures (plot.py), at the end
Every setting and its default is in config.py (presets: demo, the default, for a laptop CPU; paper; test).

Usage:
    python main.py                                   # the demo: embedded SmolLM2 teacher + ShareGPT, on CPU
    python main.py --preset paper --dry_run          # validate the full-scale config and print its plan
    python main.py --preset paper --prepare_only     # only prepare (tokenize) its data: a CPU job before the GPUs
    python main.py --preset paper --alpha 0.7 --total_rounds 6     # one GPU
    python main.py --config my_run.yaml --steps_per_round 200
    python main.py --resume runs/2026-11-29/run_3    # continue a run; completed rounds are skipped
    python main.py --push_to_hub my-name/slm-ensemble   # then upload ensemble/ (private, a branch per run)
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
import time
from pathlib import Path

import pandas as pd
import torch

import config as config_lib
from ensemble import WEIGHTED_MODES, ModelEnsemble, weights_with_new_member
from model_io import PaddingCollator
import plot
import preprocess_dataset
import push as push_lib
from train import (TRAIN_LOG_COLUMNS, CsvTrainLogCallback, DistillationTrainer, EarlyStopping, NonFiniteLossError,
                   SpendMeter, resumed_state, round_schedule, trained_steps, training_arguments)
import utils
from slm_ensembles import (compute, dry_run, embedded, files, processes, records, run_state, students, teacher_cache,
                           tracking)
from slm_ensembles import teacher as teacher_lib
from slm_ensembles.evaluation import evaluate, mixture_ce, new_member_weight
from slm_ensembles.losses import LossSettings
from slm_ensembles.run_layout import RunLayout

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
    def layout(self) -> RunLayout:
        return RunLayout(self.folder)

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
        utils.return_freed_buffers_to_the_system()  # before anything large is allocated: resident memory stays flat
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
        if run.config.push_to_hub and run.state.is_main_process:
            push_lib.push_finished_run(run.folder, run.config.push_to_hub)
    return 0


# --- setup ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    return config_lib.parse_command_line(argv, __doc__)


def setup(args: argparse.Namespace, preemption: processes.PreemptionSignal) -> Run | int:
    """Everything the rounds need, built once: config, processes, teacher, data, caches, run folder (new or resumed),
    earlier members. Whatever can refuse the run (config, data, disk) does so before a run folder is created or
    touched. An exit code instead of a run for a dry run, --prepare_only or a signal during setup."""
    config, resume_dir = run_state.resolve_config(args)
    tracking.tracker_names(config.report_to)  # an unknown tracker is refused before anything loads
    teacher_lib.check_model_folders(config)
    if args.dry_run:
        print("\n".join([*config_lib.plan_lines(config, resume_dir), *dry_run.prediction_lines(config)]))
        return 0
    if args.prepare_only:
        preprocess_dataset.prepare_only(config)
        return 0
    if config.push_to_hub:
        push_lib.hub_token()  # a push with no token is refused now, not after the last round
    state = utils.process_state(config.device, config.process_group_timeout_minutes)
    teacher_path, tokenizer = teacher_lib.teacher_tokenizer(config, state)
    teacher_lib.check_fits_teacher(config, teacher_path, len(tokenizer))
    with state.main_process_first():  # the first process prepares and caches the data, the others read it
        data, counts = preprocess_dataset.prepare_for_run(config, tokenizer)
    if processes.preempted_during_setup(preemption, state.device, "the rest of the setup"):
        return processes.EXIT_PREEMPTED
    collator = PaddingCollator(tokenizer.pad_token_id)
    try:
        teacher, cache, evaluated_teacher = teacher_lib.run_teachers(config, teacher_path, tokenizer, data, collator,
                                                                     state, preemption)
    except teacher_cache.BuildPreempted as stopped:  # stopped between two pieces, which are kept for the next run
        print(f"{stopped} (exit code {processes.EXIT_PREEMPTED})")
        return processes.EXIT_PREEMPTED
    train_tokens = preprocess_dataset.token_count(data["train"])  # for the compute accounting
    round_config = students.round_settings(config, teacher, tokenizer, train_tokens, len(data["train"]),
                                           state.num_processes)
    run_state.check_disk_before_the_run_folder(config, resume_dir, round_config, teacher, tokenizer)
    if processes.preempted_during_setup(preemption, state.device, "the run folder is written"):
        return processes.EXIT_PREEMPTED
    folder, manifest = run_state.open_run(config, resume_dir, args.job_id, state, run_state.chosen_preset(args),
                                          {name: len(split) for name, split in data.items()})
    print("\n".join(config_lib.plan_lines(config, folder, preprocess_dataset.describe_prepared(counts, data))))
    if state.is_main_process:
        run_state.remove_finished_rounds_checkpoints(folder, manifest)
        run_state.restore_metric_rows(folder, records.METRIC_COLUMNS, manifest)
    trackers = tracking.run_trackers(config, folder) if state.is_main_process else []
    members = run_state.earlier_members(config, folder, manifest, state.device)
    teacher_shape = compute.model_shape(teacher.config, config.trust_remote_code) if config.alpha > 0 else None
    spend_rule = compute.SpendRule.for_run(teacher_shape, config.teacher_mode, train_tokens,
                                           preprocess_dataset.token_count(data.get("early_stop")))
    return Run(config=config, round_config=round_config, state=state, preemption=preemption, tokenizer=tokenizer,
               teacher=teacher, evaluated_teacher=evaluated_teacher, cache=cache, data=data,
               train_tokens=train_tokens, spend_rule=spend_rule, collator=collator, folder=folder, manifest=manifest,
               trackers=trackers, members=members,
               weights=(manifest.get("weights") or []) if config.combine in WEIGHTED_MODES else None)


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
    member_dir = run.layout.member(round_index)
    if (member_dir / "config.json").is_file():  # saved atomically: a member folder is always complete
        print(f"round {round_index}: trained earlier, evaluating {member_dir}")
        return run_state.load_intact(member_dir, f"delete it, and --resume saves round {round_index}'s member again "
                                     "from its checkpoints", run.config.trust_remote_code, run.device)
    run_state.check_disk_for_a_round(run.folder, student, run.tokenizer, run.config)
    resume_from = run_state.latest_complete_checkpoint(run.layout.checkpoints(round_index),
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
    steps_run = trained_steps(distillation_trainer(run, round_index, student, stopper, meter), resume_from)
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
    weights = None if settings.mixture_weights is None else list(settings.mixture_weights)

    def scores(student) -> dict:
        ce = {name: mixture_ce([student, *frozen], run.data[name], run.collator, run.config.eval_batch_size,
                               run.vocab_size, run.config.combine, chunk_size=run.config.eval_chunk_size,
                               state=run.state, weights=weights) for name in ("early_stop", "test")}
        student.train()  # mixture_ce() left it in eval mode
        meter.evaluations += 1
        return {"heldout_ce": ce["early_stop"], "test_ce": ce["test"],
                **spent_so_far(run, round_index, student, frozen, meter)}

    def save_best(student) -> None:
        if run.state.is_main_process:
            run_state.save_member_atomically(student, run.tokenizer, run.layout.best(round_index))

    return EarlyStopping(run.config.eval_steps, run.config.early_stopping_patience,
                         run.config.early_stopping_min_delta, scores, save_best, **resumed_state(resume_from),
                         schedule=round_schedule(run.round_config))


def spent_so_far(run: Run, round_index: int, student, frozen: list, meter: SpendMeter) -> dict:
    """train_flops and its parts spent by the run up to now: the earlier rounds' (their members' records), this
    round's so far (`meter`, counted across processes: every process calls this at the same step), the build."""
    earlier = [run_state.training_record(run.folder / path)["flops"] for path in run.manifest["members"]]
    return run.spend_rule.columns([*earlier, meter.round_parts(run.spend_rule, student, frozen)])


def final_state(run: Run, round_index: int, checkpoint: Path | None) -> torch.nn.Module:
    """The round's final student: the best weights early stopping kept, or else `checkpoint`'s (checked when it was
    chosen: run_state.latest_complete_checkpoint)."""
    if not run.config.eval_steps:
        return utils.load_causal_lm(str(checkpoint), torch.float32, run.config.trust_remote_code).to(run.device)
    return run_state.load_intact(run.layout.best(round_index),
                                 f"round {round_index}'s best weights are lost: delete "
                                 f"{run.layout.checkpoints(round_index)}, and --resume trains the round again",
                                 run.config.trust_remote_code, run.device)


def distillation_trainer(run: Run, round_index: int, student: torch.nn.Module, stopper: EarlyStopping | None,
                         meter: SpendMeter) -> DistillationTrainer:
    """The Trainer of the round's student: through the frozen members (the method), or alone (the baselines). Its
    learning-rate schedule is the one early stopping begins the decay of, where both are on."""
    frozen, settings = round_loss(run)
    return DistillationTrainer(
        model=student, teacher=run.teacher, members=frozen, settings=settings, vocab_size=run.vocab_size,
        args=training_arguments(run.round_config, run.layout.checkpoints(round_index), round_index,
                                use_cpu=run.device.type == "cpu",
                                bf16=utils.use_bf16_autocast(run.config.dtype, run.device),
                                run_name=tracking.run_name(run.folder, run.config.output_root)),
        train_dataset=member_data(run, round_index), processing_class=run.tokenizer,
        callbacks=[*([stopper] if stopper else []),  # before the log's writer: it adds its scores to the log
                   meter,  # after the stopper, which may ask for the checkpoint the meter syncs before
                   CsvTrainLogCallback(run.layout.train_log, round_index),
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
    training = {"steps_run": steps_run, "member_step": stopper.best_step if stopper else steps_run,
                "stop_reason": reason or "cap", "flops": meter.round_parts(run.spend_rule, student, frozen)}
    if run.state.is_main_process:
        run_state.save_member_atomically(student, run.tokenizer, run.layout.member(round_index),
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
        run_state.restore_metric_rows(run.folder, records.METRIC_COLUMNS, run.manifest)
    predictors = {"student_untrained": [untrained], "student": [run.members[-1]], "ensemble": list(run.members)}
    sizes = {"teacher": 0, "student_untrained": 1, "student": 1, "ensemble": len(run.members)}
    if not run.manifest["teacher_evaluated"]:
        predictors = {"teacher": [run.teacher], **predictors}
    weights = None if run.weights is None else {**{name: [1.0] for name in predictors}, "ensemble": run.weights}
    started = time.time()
    results = evaluate(predictors, run.evaluated_teacher, run.data["test"], run.collator, run.config.eval_batch_size,
                       run.vocab_size, run.config.combine, chunk_size=run.config.eval_chunk_size, state=run.state,
                       weights=weights)
    seconds = round(time.time() - started, 2)
    return [{"round": round_index, "model": name, "ensemble_size": sizes[name], **metrics, "seconds": seconds}
            for name, metrics in results.items()]


def record_round(run: Run, round_index: int, rows: list[dict]) -> Run:
    """The round written down (metric rows, the ensemble's configs, sample answers, then the manifest that marks it
    done, with the rows as written: the journal a damaged metrics.csv is restored from), and the run with that
    manifest: every process keeps it in memory (it decides what the next round evaluates); one writes the files."""
    rows = records.recorded_rows(rows, run.folder, run.manifest, round_index, members=run.members,
                                 train_tokens=run.train_tokens, examples=len(run.data["train"]),
                                 spend_rule=run.spend_rule)
    written = files.csv_text_rows(records.METRIC_COLUMNS, rows)
    manifest = run_state.finished_round(run.manifest, round_index,
                                        str(run.layout.member(round_index).relative_to(run.folder)),
                                        run.weights, written, member_data_description(run, round_index))
    if run.state.is_main_process:
        tracking.log_round(run.trackers, round_index, rows)
        ensemble = ModelEnsemble.from_members(list(run.members), run.config.combine, run.vocab_size,
                                              weights=run.weights)
        records.write_round(run.folder, round_index, written, manifest, ensemble, run.tokenizer, run.config)
    ce = {row["model"]: row["ce"] for row in rows}
    print(f"round {round_index}: student ce {ce['student']:.4f} (untrained {ce['student_untrained']:.4f}), "
          f"ensemble of {len(run.members)} ce {ce['ensemble']:.4f}")
    return dataclasses.replace(run, manifest=manifest)


# --- report ---------------------------------------------------------------------------------------------------------

def report(run: Run) -> None:
    """The metrics table, the ensemble against its best member, and the figures; then processes leave together
    (one leaving early can abort the other)."""
    if run.state.is_main_process:
        run_state.restore_metric_rows(run.folder, records.METRIC_COLUMNS, run.manifest)  # damaged since the last round
        print("\n" + plot.metrics_summary(pd.read_csv(run.layout.metrics)))
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
                                                 teacher_cache.CacheMismatchError, files.DiskSpaceError,
                                                 push_lib.NotPushableError),
                                 failures=(NonFiniteLossError, push_lib.HubUnreachableError))


if __name__ == "__main__":
    processes.exit_process(run_from_command_line())
