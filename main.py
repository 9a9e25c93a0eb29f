"""Distil a teacher LLM into an ensemble of small students, one student per round.

Each round trains a fresh student with the hybrid loss computed *through* the frozen ensemble of the earlier
students (losses.py), adds it to the ensemble, and evaluates the student, the ensemble and (once) the teacher on
the held-out split. Everything a run writes goes to runs/YYYY-MM-DD/run_N/:
    config.yaml      the resolved configuration          manifest.json   rounds done, member folders
    metrics.csv      one row per model and round          train_log.csv   hybrid, KL, NLL, lr, grad norm per log
    ensemble/        the ensemble (ModelEnsemble.from_pretrained), member_r/ = round r's student + tokenizer

Usage:
    python main.py                                   # the demo: embedded SmolLM2 teacher + ShareGPT, on CPU
    python main.py --preset paper --dry_run          # validate the full-scale config and print its plan
    python main.py --preset paper --alpha 0.7 --total_rounds 6
    python main.py --config my_run.yaml --steps_per_round 200
    python main.py --resume runs/2026-11-29/run_3    # continue a run; completed rounds are skipped
    accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 4 main.py --preset paper
                                                     # several GPUs on one node (data parallel)
    sbatch train.sh --preset paper                   # a SLURM cluster; sbatch --nodes=2 train.sh ... for nodes
"""

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from accelerate.utils import broadcast_object_list

import config as config_lib
import embedded
import preprocess_dataset
import run_state
import teacher_cache
import utils
from ensemble import ModelEnsemble
from evaluation import evaluate
from losses import LossSettings
from train import (TRAIN_LOG_COLUMNS, CsvTrainLogCallback, DistillationTrainer, NonFiniteLossError, PaddingCollator,
                   check_logits_at, training_arguments)

METRIC_COLUMNS = ["round", "model", "ensemble_size", "ce", "perplexity", "kl_teacher", "top1_agreement",
                  "num_tokens", "seconds"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="python main.py [--preset NAME] [--config FILE] [--resume RUN_DIR] [--dry_run] [--KEY VALUE ...]")
    parser.add_argument("--preset", default="demo", choices=sorted(config_lib.PRESETS), help="base settings")
    parser.add_argument("--config", dest="config_file", default=None, help="YAML file of config overrides")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in this folder")
    parser.add_argument("--dry_run", action="store_true", help="validate the config, print the plan, and stop")
    parser.add_argument("--job_id", default=None, help="a scheduler's job id (train.sh passes SLURM's): a requeued "
                        "job with the same id resumes the run it started instead of starting a new one")
    config_lib.add_config_arguments(parser)
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> config_lib.Config:
    overrides = {key: value for key, value in vars(args).items()
                 if key not in ("preset", "config_file", "resume", "dry_run", "job_id")}
    if args.resume is None and args.job_id is not None:
        args.resume = run_state.find_run_of_job(overrides.get("output_root", config_lib.Config.output_root),
                                                args.job_id)
        if args.resume is not None:
            overrides = {}  # a requeued job repeats its command line: the run's saved config is the one that counts
    if args.resume is None:
        return config_lib.build_config(args.preset, args.config_file, overrides)
    saved = Path(args.resume) / "config.yaml"
    if not saved.is_file():
        raise config_lib.ConfigError(f"--resume {args.resume!r} is not a run folder: it has no config.yaml")
    if run_state.load_manifest(Path(args.resume)) is None:
        raise config_lib.ConfigError(f"--resume {args.resume!r} has a config.yaml but no {run_state.MANIFEST}: "
                                     "it did not get past its setup; start a new run instead")
    values = config_lib.read_yaml(saved)
    conflicting = sorted(k for k, v in overrides.items() if k != "total_rounds" and
                         config_lib.coerce(k, v, config_lib.field_types()[k]) != values.get(k))
    if conflicting:
        raise config_lib.ConfigError(f"--resume {args.resume!r}: the command line changes {conflicting}, which the "
                                     "run was started with; only total_rounds may change on resume")
    values.update(overrides)
    return config_lib.config_from_dict(values, source=str(saved))


def print_plan(config: config_lib.Config, run_dir: Path | None) -> None:
    tokens_per_step = config.batch_size * config.grad_accum * config.max_length
    print("Plan")
    print(f"  teacher       {config.teacher}")
    student = config.student_model if config.student_init == "pretrained" else f"{config.student_init} init"
    print(f"  students      {student}, one per round, {config.total_rounds} rounds x {config.steps_per_round} steps")
    print(f"  data          {config.dataset} ({config.max_examples or 'all'} conversations, {config.test_size} held "
          f"out, max {config.max_length} tokens)")
    print(f"  teacher mode  {config.teacher_mode}" + (f" (k = {config.cache_k}, {config.cache_value_dtype})"
                                                    if config.teacher_mode == "topk" else ""))
    print(f"  loss          {config.alpha} * T^2 * {config.divergence}(teacher || mixture) + {1 - config.alpha:g} * "
          f"NLL({config.nll_target}), T = {config.temperature}, members combined by {config.combine}")
    print(f"  optimisation  batch {config.batch_size} x accumulation {config.grad_accum} (up to {tokens_per_step} "
          f"tokens/step), lr {config.learning_rate} {config.lr_scheduler}, device {config.device}, dtype {config.dtype}")
    print(f"  output        {run_dir or Path(config.output_root) / 'YYYY-MM-DD' / 'run_N'}")


def prepare_data(config, tokenizer):
    """The tokenized train/test split, built once per (source, tokenizer, settings) and cached."""
    source = embedded.resolve_dataset(config.dataset, config.cache_dir)
    key = json.dumps([source, tokenizer.name_or_path, config.max_length, config.test_size, config.seed,
                      config.max_examples, config.dataset_split])
    name = Path(source.rstrip("/")).name.replace(".", "_") + "-" + hashlib.sha256(key.encode()).hexdigest()[:10]
    return preprocess_dataset.prepare_dataset(
        source, tokenizer, Path(config.cache_dir) / "datasets" / name, max_length=config.max_length,
        test_size=config.test_size, seed=config.seed, max_examples=config.max_examples, split=config.dataset_split)


def prepare_teacher_cache(config, teacher, teacher_path: str, tokenizer, train_split, collator, state):
    """The teacher's targets for the training split, computed once and reused by every round (and every run with
    the same teacher, data and settings); None for the online teacher."""
    if config.teacher_mode == "online":
        return None
    identity = teacher_cache.cache_identity(teacher_path, tokenizer, train_split, config.max_length)
    expected = {**identity, "mode": config.teacher_mode, "vocab_size": len(tokenizer)}
    if config.teacher_mode == "topk":
        expected.update(k=config.cache_k, temperature=config.temperature, value_dtype=config.cache_value_dtype)
    key = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(config.cache_dir) / "teacher_cache" / f"{config.teacher_mode}-{key}"
    try:
        return teacher_cache.TeacherCache.open(cache_dir, expected)
    except teacher_cache.CacheIncompleteError:
        print(f"building the teacher cache ({config.teacher_mode}) in {cache_dir}")
    teacher_cache.build_cache(teacher, teacher_cache.with_example_ids(train_split), cache_dir,
                              mode=config.teacher_mode, k=config.cache_k, temperature=config.temperature,
                              vocab_size=len(tokenizer), batch_size=config.eval_batch_size, collator=collator,
                              metadata=identity, rank=state.process_index, world_size=state.num_processes,
                              value_dtype=config.cache_value_dtype)
    state.wait_for_everyone()
    if state.is_main_process:
        teacher_cache.write_metadata(cache_dir, identity)
    state.wait_for_everyone()
    return teacher_cache.TeacherCache.open(cache_dir, expected)


def metric_rows(round_index: int, results: dict, sizes: dict, seconds: float) -> list[dict]:
    """One row per evaluated model; `seconds` is the whole evaluation pass, shared by its rows."""
    return [{"round": round_index, "model": name, "ensemble_size": sizes[name], **metrics,
             "seconds": round(seconds, 2)} for name, metrics in results.items()]


def print_final_table(metrics_path: Path) -> None:
    table = pd.read_csv(metrics_path)
    shown = table[["round", "model", "ensemble_size", "ce", "perplexity", "kl_teacher", "top1_agreement"]]
    print("\nMetrics on the held-out split (ce and kl_teacher in nats per supervised token)")
    print(shown.to_string(index=False, formatters={"ce": "{:.4f}".format, "perplexity": "{:.4g}".format,
                                                    "kl_teacher": "{:.4f}".format, "top1_agreement": "{:.4f}".format}))
    members = table[table["model"] == "student"].set_index("round")["ce"]
    print("\nThe ensemble against its best single member (ce; a positive gain means the ensemble is better)")
    for round_index, row in table[table["model"] == "ensemble"].set_index("round").iterrows():
        best = members.loc[:round_index].min()
        print(f"  {int(row['ensemble_size'])} member(s): ensemble {row['ce']:.4f}, best member {best:.4f}, "
              f"gain {best - row['ce']:+.4f}")


def main(argv=None) -> int:
    # --- setup: everything that can refuse the run does so before any run folder is created or touched ---------
    args = parse_args(argv)
    config = resolve_config(args)
    if args.dry_run:
        print_plan(config, Path(args.resume) if args.resume else None)
        return 0
    check_launcher()
    state = utils.process_state(config.device)
    device = state.device
    with state.main_process_first():  # a first-use conversion of the embedded teacher happens once
        teacher_path = embedded.resolve_teacher(config.teacher, config.cache_dir)
    tokenizer = utils.load_tokenizer(teacher_path, config.trust_remote_code)
    vocab_size = len(tokenizer)
    if config.student_init == "pretrained":
        utils.check_same_tokenizer(tokenizer, utils.load_tokenizer(config.student_model, config.trust_remote_code),
                                   config.teacher, config.student_model)
    frozen_dtype = utils.frozen_dtype(config.dtype, device)
    teacher = utils.load_causal_lm(teacher_path, frozen_dtype, config.trust_remote_code).to(device).eval()
    utils.check_vocab_fits(teacher, vocab_size, config.teacher)
    check_logits_at(teacher, vocab_size)
    with state.main_process_first():  # the first process prepares and caches the data, the others read it
        data = prepare_data(config, tokenizer)
    print(f"data: {len(data['train'])} training and {len(data['test'])} test examples")
    collator = PaddingCollator(tokenizer.pad_token_id)
    cache = prepare_teacher_cache(config, teacher, teacher_path, tokenizer, data["train"], collator, state)
    train_split = teacher_cache.with_example_ids(data["train"])
    settings = LossSettings(alpha=config.alpha, temperature=config.temperature, divergence=config.divergence,
                            jsd_beta=config.jsd_beta, nll_target=config.nll_target, combine=config.combine)

    # Checked before the run folder exists, so a run that cannot write its checkpoints leaves nothing behind.
    first_student = utils.build_student(config, teacher, tokenizer, 0)
    output_folder = Path(args.resume) if args.resume else Path(config.output_root)
    output_folder.mkdir(parents=True, exist_ok=True)
    run_state.check_disk_space(output_folder, utils.count_parameters(first_student))
    del first_student

    run_dir, manifest = open_run(args, config, state)
    print_plan(config, run_dir)
    preemption = run_state.PreemptionSignal().install()
    ensemble_dir = run_dir / "ensemble"
    members = [utils.load_causal_lm(str(run_dir / path), frozen_dtype).to(device).eval()
               for path in manifest["members"]]

    # --- rounds -------------------------------------------------------------------------------------------------
    for round_index in range(config.total_rounds):
        if run_state.round_status(manifest, round_index) == "done":
            print(f"round {round_index}: done earlier, skipped")
            if state.is_main_process:  # a kill right after the manifest write leaves the checkpoints behind
                shutil.rmtree(run_dir / "checkpoints" / f"round_{round_index}", ignore_errors=True)
            continue
        print(f"\n=== round {round_index + 1}/{config.total_rounds}: {len(members)} frozen member(s) ===")
        student = utils.build_student(config, teacher, tokenizer, round_index).to(device)
        utils.check_vocab_fits(student, vocab_size, f"round {round_index} student")
        # The untrained copy is scored with the trained models below, so each round runs the teacher once.
        untrained = copy.deepcopy(student).to(frozen_dtype).eval().requires_grad_(False)

        checkpoint_dir = run_dir / "checkpoints" / f"round_{round_index}"
        member_dir = ensemble_dir / f"member_{round_index}"
        if (member_dir / "config.json").is_file():  # saved atomically: training finished, evaluation did not
            print(f"round {round_index}: trained earlier, evaluating {member_dir}")
            student = utils.load_causal_lm(str(member_dir), torch.float32).to(device)
        else:
            run_state.check_disk_space(run_dir, utils.count_parameters(student))
            resume_from = run_state.latest_complete_checkpoint(checkpoint_dir)
            if state.is_main_process:
                manifest["rounds"][str(round_index)] = "training"
                run_state.write_manifest(run_dir, manifest)
                # Log rows written after the checkpoint we resume from are logged again by the resumed steps.
                last_step = run_state.checkpoint_step(resume_from) if resume_from else 0
                run_state.replace_csv_rows(run_dir / "train_log.csv", TRAIN_LOG_COLUMNS, lambda row: int(
                    row["round"]) != round_index or int(row["step"]) <= last_step, [])
            trainer = DistillationTrainer(
                model=student, teacher=teacher, members=members, settings=settings, vocab_size=vocab_size,
                args=training_arguments(config, checkpoint_dir, round_index, use_cpu=device.type == "cpu",
                                        bf16=utils.use_bf16_autocast(config.dtype, device)),
                train_dataset=train_split, processing_class=tokenizer,
                callbacks=[CsvTrainLogCallback(run_dir / "train_log.csv", round_index),
                           run_state.StopOnSignal(preemption)],
                chunk_size=config.loss_chunk_size, teacher_cache=cache, round_index=round_index)
            if resume_from and run_state.checkpoint_step(resume_from) >= config.steps_per_round:
                # Killed after the last step's checkpoint but before the member was saved: nothing left to train
                # (resuming the Trainer from its final checkpoint would run one step more).
                student = utils.load_causal_lm(str(resume_from), torch.float32).to(device)
            else:
                if resume_from:
                    print(f"round {round_index}: resuming from {resume_from.name}")
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
                if preemption.received_anywhere(device):
                    return run_state.EXIT_PREEMPTED
            if state.is_main_process:
                run_state.save_member_atomically(student, tokenizer, member_dir)
        student = student.to(frozen_dtype).eval().requires_grad_(False)
        members.append(student)

        predictors = {"student_untrained": [untrained], "student": [student], "ensemble": members}
        sizes = {"teacher": 0, "student_untrained": 1, "student": 1, "ensemble": len(members)}
        if not manifest["teacher_evaluated"]:
            predictors = {"teacher": [teacher], **predictors}  # once per run
        started = time.time()
        results = evaluate(predictors, teacher, data["test"], collator, config.eval_batch_size, vocab_size,
                           config.combine, state=state)
        del untrained
        if state.is_main_process:
            # This round's rows replace any that an interrupted evaluation of it left behind.
            run_state.replace_csv_rows(run_dir / "metrics.csv", METRIC_COLUMNS,
                                       lambda row: int(row["round"]) != round_index,
                                       metric_rows(round_index, results, sizes, time.time() - started))
            # The ensemble folder is complete after every round: ModelEnsemble.from_pretrained(ensemble_dir) works.
            ModelEnsemble.from_members(members, config.combine, vocab_size).save_configs(ensemble_dir, tokenizer)
        # Every process keeps the same manifest in memory (it decides what the next round evaluates); one writes it.
        manifest["members"].append(str(member_dir.relative_to(run_dir)))
        manifest["rounds"][str(round_index)] = "done"
        manifest["teacher_evaluated"] = True
        if state.is_main_process:
            run_state.write_manifest(run_dir, manifest)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the member is the round's final state
        print(f"round {round_index}: student ce {results['student']['ce']:.4f} "
              f"(untrained {results['student_untrained']['ce']:.4f}), "
              f"ensemble of {len(members)} ce {results['ensemble']['ce']:.4f}")
        if preemption.received_anywhere(device):
            return run_state.EXIT_PREEMPTED

    # --- report -------------------------------------------------------------------------------------------------
    if state.is_main_process:
        print_final_table(run_dir / "metrics.csv")
        print(f"\nrun folder: {run_dir}")
    state.wait_for_everyone()  # processes leave the group together (one leaving early can abort the other)
    return 0


def check_launcher() -> None:
    """Refuse launchers this trainer does not support, before anything is loaded."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # The student's output head runs outside its forward and members are saved by one process: both need the
        # whole, unsharded weights.
        raise config_lib.ConfigError(
            "FSDP is not supported: launch with accelerate_configs/ddp.yaml (data parallel). Students up to a few "
            "billion parameters fit one GPU with their optimizer states; with --teacher_mode topk the teacher's "
            "targets come from its cache during training")


def open_run(args, config, state) -> tuple[Path, dict]:
    """The run folder and its manifest: a new folder (never an existing one), or the one being resumed."""
    if args.resume:
        return Path(args.resume), run_state.load_manifest(Path(args.resume))  # both checked by resolve_config
    manifest = run_state.new_manifest(config.fingerprint(), config.seed, args.job_id)
    run_dir = None
    if state.is_main_process:  # one process picks the folder, so every process agrees on it
        run_dir = utils.new_run_dir(config.output_root)
        config_lib.save_config(config, run_dir / "config.yaml")
        run_state.write_manifest(run_dir, manifest)
    (run_dir,) = broadcast_object_list([run_dir])
    return run_dir, manifest


def run_from_command_line() -> int:
    """main() with the exit codes a launcher acts on: 0 done, 1 failed, 2 bad input, 75 preempted."""
    try:
        return main()
    except (config_lib.ConfigError, preprocess_dataset.DataError, utils.TokenizerMismatchError,
            embedded.MissingPackageError, teacher_cache.CacheMismatchError, run_state.DiskSpaceError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2  # bad input: fix it and start again
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        utils.leave_process_group()


if __name__ == "__main__":
    exit_code = run_from_command_line()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Several processes: skip the interpreter's teardown, where one of them now and then aborts in a C++
        # destructor ("terminate called without an active exception") after everything has been written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)
