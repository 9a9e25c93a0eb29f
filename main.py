"""Distil a teacher LLM into an ensemble of small students, one student per round.

Each round trains a fresh student with the hybrid loss computed *through* the frozen ensemble of the earlier
students (losses.py), adds it to the ensemble, and evaluates the student, the ensemble and (once) the teacher on
the held-out split. Everything a run writes goes to runs/YYYY-MM-DD/run_N/:
    config.yaml      the resolved configuration          manifest.json   each round's status, members
    metrics.csv      one row per model and round          train_log.csv   hybrid, KL, NLL, lr, grad norm per log
    ensemble/        the ensemble (ModelEnsemble.from_pretrained), member_r/ = round r's student + tokenizer
    samples.csv      answers to fixed prompts per round   *.png           figures (plot.py), at the end

Usage:
    python main.py                                   # the demo: embedded SmolLM2 teacher + ShareGPT, on CPU
    python main.py --preset paper --dry_run          # validate the full-scale config and print its plan
    python main.py --preset paper --alpha 0.7 --total_rounds 6
    python main.py --config my_run.yaml --steps_per_round 200
    python main.py --resume runs/2026-11-29/run_3    # continue a run; completed rounds are skipped
    python main.py --combine weighted                # fit each new member's weight (also: additive, --eta)
    python main.py --baseline single_matched         # baselines: independent | single_matched | single_large
    accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 4 main.py --preset paper
                                                     # several GPUs on one node (data parallel)
    sbatch train.sh --preset paper                   # a SLURM cluster; sbatch --nodes=2 train.sh ... for nodes
"""

import argparse
import copy
import dataclasses
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
from ensemble import WEIGHTED_MODES, ModelEnsemble, training_mixture_weights, weights_with_new_member
from evaluation import CachedTeacher, evaluate, fit_new_member_weight
from losses import LossSettings
from train import (TRAIN_LOG_COLUMNS, CsvTrainLogCallback, DistillationTrainer, NonFiniteLossError, PaddingCollator,
                   check_logits_at, training_arguments)

METRIC_COLUMNS = ["round", "model", "ensemble_size", "ce", "perplexity", "kl_teacher", "top1_agreement", "ece",
                  "gap_closed", "diversity", "num_tokens", "seconds"]
SAMPLE_COLUMNS = ["round", "model", "prompt", "answer", "new_tokens"]
DEFAULT_PRESET = "demo"
SINGLE_MODEL_BASELINES = ("single_matched", "single_large")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # an abbreviation would pass for a key: --lr would silently set lr_scheduler
        usage="python main.py [--preset NAME] [--config FILE] [--resume RUN_DIR] [--dry_run] [--KEY VALUE ...]")
    # No argparse default: a resume compares a --preset it is given with the run's settings, so "not given" must
    # differ from "demo".
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help=f"base settings: {', '.join(sorted(config_lib.PRESETS))} (default: {DEFAULT_PRESET})")
    parser.add_argument("--config", dest="config_file", default=None, help="YAML file of config overrides")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in this folder")
    parser.add_argument("--dry_run", action="store_true", help="validate the config, print the plan, and stop")
    parser.add_argument("--job_id", default=None, help="a scheduler's job id (train.sh passes SLURM's): a requeued "
                        "job with the same id resumes the run it started instead of starting a new one")
    config_lib.add_config_arguments(parser)
    args, unknown = parser.parse_known_args(argv)
    refuse_unknown_arguments(unknown)
    return args


def refuse_unknown_arguments(unknown: list[str]) -> None:
    """Arguments argparse did not recognise are a ConfigError naming them (exit 2, like a YAML file's unknown key)."""
    if not unknown:
        return
    keys = [token[2:].split("=")[0] for token in unknown if token.startswith("--")]
    config_lib.check_keys(dict.fromkeys(keys), "the command line")
    raise config_lib.ConfigError(f"unexpected command-line argument(s) {unknown}: settings are given as --KEY VALUE; "
                                 "`python main.py --help` lists them")


def resolve_config(args: argparse.Namespace) -> config_lib.Config:
    """The run's config: for a new run, the preset, YAML file and command line layered (config.build_config); for
    --resume, the run's saved config.yaml (see resumed_config); for a requeued --job_id, that of the run the job
    started, if it started one."""
    overrides = {key: value for key, value in vars(args).items()
                 if key not in ("preset", "config_file", "resume", "dry_run", "job_id")}
    if args.resume is not None:
        return resumed_config(Path(args.resume), stated_settings(args, overrides))
    config = config_lib.build_config(args.preset or DEFAULT_PRESET, args.config_file, overrides)
    if args.job_id is not None:
        # Looked for under the output_root the whole command line gives (a YAML file may set it).
        args.resume = run_state.find_run_of_job(config.output_root, args.job_id)
        if args.resume is not None:
            # A requeued job repeats its command line: the run's saved config is the one that counts.
            return resumed_config(Path(args.resume), {})
    return config


@dataclasses.dataclass(frozen=True)
class Stated:
    """A setting a resume's --preset, --config or command line states, and where it was stated."""

    value: object
    source: str  # for messages: "--preset test", "--config FILE", "the command line"
    from_preset: bool = False


def stated_settings(args: argparse.Namespace, overrides: dict) -> dict[str, Stated]:
    """The settings a resume's --preset, --config and command line state (later ones override earlier ones, as for
    a new run)."""
    stated = {}
    if args.preset is not None:
        stated.update({key: Stated(value, f"--preset {args.preset}", from_preset=True)
                       for key, value in config_lib.preset_values(args.preset).items()})
    if args.config_file is not None:
        stated.update({key: Stated(value, f"--config {args.config_file}")
                       for key, value in config_lib.read_yaml(args.config_file).items()})
    stated.update({key: Stated(value, "the command line") for key, value in overrides.items()})
    return stated


def resumed_config(run_dir: Path, stated: dict[str, Stated]) -> config_lib.Config:
    """The saved config of the run in `run_dir`. A stated setting that differs from it is refused, naming the key:
    a run continues with the settings it started with, except a total_rounds stated on the command line or in a
    YAML file (see check_total_rounds_change). A preset's total_rounds is compared like the rest of it: restating
    the preset a run started from must not add rounds to it."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise config_lib.ConfigError(
            f"--resume {str(run_dir)!r} is not a run folder (it has no config.yaml): pass the folder of a run, "
            f"runs/YYYY-MM-DD/run_N, which holds config.yaml and {run_state.MANIFEST}")
    manifest = run_state.load_manifest(run_dir)
    if manifest is None:
        raise config_lib.ConfigError(f"--resume {str(run_dir)!r} has a config.yaml but no {run_state.MANIFEST}: "
                                     "it did not get past its setup; start a new run instead")
    saved = config_lib.load_saved_config(saved_path)
    types_by_key = config_lib.field_types()
    wanted = {key: dataclasses.replace(setting, value=config_lib.coerce(key, setting.value, types_by_key[key]))
              for key, setting in stated.items()}
    new_total = None
    if "total_rounds" in wanted and not wanted["total_rounds"].from_preset:
        new_total = wanted.pop("total_rounds").value
    conflicts = [f"{setting.source} sets {key} = {setting.value!r}, but the run was started with {key} = "
                 f"{getattr(saved, key)!r}" for key, setting in wanted.items() if setting.value != getattr(saved, key)]
    if conflicts:
        raise config_lib.ConfigError(f"--resume {str(run_dir)!r}: {'; '.join(conflicts)}. A run continues with the "
                                     "settings it was started with (only total_rounds may change, on the command "
                                     "line or in a YAML file); leave these out, or start a new run")
    if new_total is None or new_total == saved.total_rounds:
        return saved
    check_total_rounds_change(run_dir, saved, new_total, manifest)
    resumed = dataclasses.replace(saved, total_rounds=new_total)
    resumed.validate()
    print(f"total_rounds: {saved.total_rounds} -> {new_total}")
    return resumed


def check_total_rounds_change(run_dir: Path, saved: config_lib.Config, total_rounds: int, manifest: dict) -> None:
    """A resumed run may get more rounds, or fewer down to the rounds it has started; not so a single-model
    baseline, whose one student's step count (and size, for single_large) total_rounds sets."""
    if saved.baseline in SINGLE_MODEL_BASELINES:
        raise config_lib.ConfigError(
            f"--resume {str(run_dir)!r}: total_rounds cannot change for the {saved.baseline} baseline: it sets the "
            f"step count{' and size' if saved.baseline == 'single_large' else ''} of the baseline's one student; "
            "start a new run")
    started = [int(index) for index, status in manifest["rounds"].items() if status != "pending"]
    if started and total_rounds <= max(started):
        raise config_lib.ConfigError(f"--resume {str(run_dir)!r}: total_rounds = {total_rounds}, but the run has "
                                     f"started {max(started) + 1} rounds; give at least {max(started) + 1}")


def print_plan(config: config_lib.Config, run_dir: Path | None) -> None:
    tokens_per_step = config.batch_size * config.grad_accum * config.max_length
    print("Plan")
    print(f"  teacher       {config.teacher}")
    student = config.student_model if config.student_init == "pretrained" else f"{config.student_init} init"
    print(f"  students      {student}, one per round, {config.total_rounds} rounds x {config.steps_per_round} steps")
    if config.baseline != "none":
        print(f"  baseline      {config.baseline}: " + {
            "independent": "each student distilled alone, then combined",
            "single_matched": f"one student, {config.total_rounds * config.steps_per_round} steps",
            "single_large": f"one student {config.total_rounds}x as deep, "
                            f"{config.total_rounds * config.steps_per_round} steps"}[config.baseline])
    print(f"  data          {config.dataset} ({config.max_examples or 'all'} conversations, {config.test_size} held "
          f"out, max {config.max_length} tokens)")
    print(f"  teacher mode  {config.teacher_mode}" + (f" (k = {config.cache_k}, {config.cache_value_dtype})"
                                                    if config.teacher_mode == "topk" else ""))
    print(f"  loss          {config.alpha} * T^2 * {config.divergence}(teacher || mixture) + {1 - config.alpha:g} * "
          f"NLL({config.nll_target}), T = {config.temperature}, members combined by {config.combine}"
          + (f" (eta {config.eta})" if config.combine == "additive" else "")
          + (", KL scaled by the ensemble's size" if config.kl_scale == "ensemble_size" else ""))
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


def prepare_teacher_cache(config, teacher, teacher_path: str, tokenizer, split, collator, state):
    """The teacher's outputs on the training split `split` in the config's teacher_mode (None for the online
    teacher), computed once and reused by every round (and every run with the same teacher, data and settings)."""
    if config.teacher_mode == "online":
        return None
    with state.main_process_first():  # one process hashes the teacher's weights, the others read its memo
        identity = teacher_cache.cache_identity(teacher_path, tokenizer, split, config.max_length, teacher.dtype,
                                                Path(config.cache_dir) / teacher_cache.FINGERPRINT_MEMO_FILE)
    return open_or_build_teacher_cache(config, teacher, identity, len(tokenizer), split, collator, state,
                                       config.teacher_mode, "teacher_cache")


def open_or_build_teacher_cache(config, teacher, identity: dict, vocab_size: int, split, collator, state, mode: str,
                                folder: str):
    """The cache of the teacher's outputs on `split` (whose cache_identity is `identity`) in `mode`, in a folder of
    cache_dir/`folder` named by its settings: opened when it exists, else built by every process first."""
    expected = {**identity, "mode": mode, "vocab_size": vocab_size}
    if mode == "topk":
        expected.update(k=config.cache_k, temperature=config.temperature, value_dtype=config.cache_value_dtype)
    key_fields = {**expected, "format_version": teacher_cache.FORMAT_VERSION}  # a new format gets a new folder
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(config.cache_dir) / folder / f"{mode}-{key}"
    try:
        return teacher_cache.TeacherCache.open(cache_dir, expected)
    except teacher_cache.CacheIncompleteError:
        print(f"building the teacher cache ({mode}) in {cache_dir}")
    teacher_cache.build_cache(teacher, teacher_cache.with_example_ids(split), cache_dir,
                              mode=mode, k=config.cache_k, temperature=config.temperature,
                              vocab_size=vocab_size, batch_size=config.eval_batch_size, collator=collator,
                              metadata=identity, rank=state.process_index, world_size=state.num_processes,
                              value_dtype=config.cache_value_dtype)
    state.wait_for_everyone()
    if state.is_main_process:
        teacher_cache.write_metadata(cache_dir, identity)
    state.wait_for_everyone()
    return teacher_cache.TeacherCache.open(cache_dir, expected)


def evaluation_teacher(config, teacher, train_cache, data, collator, state):
    """The teacher as the evaluation and the weight fit get it: with a cached teacher_mode (`train_cache`, the
    training split's cache, is not None), the model with its final hidden states on the test split (and the
    weight-fit slice) cached once, so that no round runs its body again; with the online teacher, the model.

    These caches belong to the training cache's teacher, tokenizer and max length: their identity is its own, with
    each split's fingerprint, so nothing is hashed again."""
    if train_cache is None:
        return teacher
    return CachedTeacher(teacher, tuple(
        open_or_build_teacher_cache(config, teacher, teacher_cache.identity_for_split(train_cache.metadata, data[name]),
                                    train_cache.metadata["vocab_size"], data[name], collator, state, "hidden",
                                    "teacher_eval_cache")
        for name in ("test", "weight_fit") if name in data))


def split_off_weight_fit(data, config) -> dict:
    """combine=weighted: the last `weight_fit_examples` training examples become the slice new members' weights are
    fitted on (they are not trained on); otherwise the data as it is."""
    if config.combine != "weighted":
        return data
    train, held_out = data["train"], config.weight_fit_examples
    if len(train) <= held_out:
        raise preprocess_dataset.DataError(
            f"combine=weighted holds out weight_fit_examples={held_out} training examples, but the training split "
            f"has {len(train)}: lower weight_fit_examples or raise max_examples")
    return {**data, "train": train.select(range(len(train) - held_out)),
            "weight_fit": train.select(range(len(train) - held_out, len(train)))}


def rounds_to_run(config) -> int:
    """Single-model baselines train one student instead of total_rounds of them."""
    return 1 if config.baseline in SINGLE_MODEL_BASELINES else config.total_rounds


def baseline_round_config(config, teacher):
    """The settings each round's student is built and trained with.

    single_matched: one student trained for the ensemble's total steps (total_rounds x steps_per_round).
    single_large: that, with total_rounds times the layers (random init: student_num_layers; teacher_layers: as many
    teacher layers, spread from first to last, as the teacher has). Otherwise the config itself.
    """
    if config.baseline not in SINGLE_MODEL_BASELINES:
        return config
    changes = {"steps_per_round": config.steps_per_round * config.total_rounds}
    if config.baseline == "single_large":
        if config.student_init == "random":
            changes["student_num_layers"] = config.student_num_layers * config.total_rounds
        else:
            changes["teacher_layers"] = utils.spread_layer_indices(len(config.teacher_layers) * config.total_rounds,
                                                                   teacher.config.num_hidden_layers)
            changes["teacher_layers_shift"] = 0
    return dataclasses.replace(config, **changes)


def new_member_weight(config, members, weights, student, teacher, data, collator, vocab_size, state) -> float:
    """The new member's coefficient: fitted (weighted), eta (additive, after the first), or 1.

    (Additive runs always train through the ensemble: the config refuses additive with the independent baseline.)
    """
    if config.combine == "weighted" and members:
        weight, candidates = fit_new_member_weight(members, weights, student, teacher, data["weight_fit"], collator,
                                                   config.eval_batch_size, vocab_size, state)
        print(f"new member's weight {weight:.2f}: CE {candidates[weight]:.4f} on the weight-fit slice "
              f"(previous ensemble {candidates[0.0]:.4f})")
        return weight
    if config.combine == "additive" and members:
        return config.eta
    return 1.0


def add_gap_closed(rows: list[dict], metrics_path: Path) -> None:
    """Each row's share of the teacher gap closed, (CE_start - CE) / (CE_start - CE_teacher), CE_start being round
    0's untrained student (from `rows` or the rows written before)."""
    known = pd.read_csv(metrics_path).to_dict("records") if metrics_path.is_file() else []
    ce = {(int(row["round"]), row["model"]): row["ce"] for row in [*known, *rows]}
    start, teacher = ce[(0, "student_untrained")], ce[(0, "teacher")]
    for row in rows:
        row["gap_closed"] = (start - row["ce"]) / (start - teacher) if start != teacher else 0.0


SAMPLE_PROMPTS = ("What is the capital of France?", "Give me three tips for a good night's sleep.",
                  "Write a short poem about the sea.", "Explain what a neural network is in two sentences.")


@torch.no_grad()
def write_sample_answers(path: Path, round_index: int, models: dict, tokenizer, config) -> None:
    """Greedy answers of each model to the first `sample_answers` fixed prompts, appended to samples.csv."""
    rows = []
    for prompt in SAMPLE_PROMPTS[:config.sample_answers]:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        for name, model in models.items():
            inputs = inputs.to(next(model.parameters()).device)
            output = model.generate(**inputs, max_new_tokens=config.sample_max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
            new_tokens = output[0, inputs["input_ids"].shape[1]:]
            answer = tokenizer.decode(new_tokens, skip_special_tokens=True)
            # An answer that ends at once (end of turn first) is empty: the token count tells it from a failure.
            rows.append({"round": round_index, "model": name, "prompt": prompt, "answer": answer.strip(),
                         "new_tokens": len(new_tokens)})
    if rows:
        run_state.replace_csv_rows(path, SAMPLE_COLUMNS, lambda row: int(row["round"]) != round_index, rows)


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
    """Run or resume a distillation; the exit code is 0 when done, EXIT_PREEMPTED when stopped by a signal.

    The preemption handler is in place from the first line, so a signal during the setup (teacher, data, teacher
    cache: minutes to hours) is not lost; the handlers main() replaced are back when it returns.
    """
    preemption = run_state.PreemptionSignal().install()
    try:
        return distil(argv, preemption)
    finally:
        preemption.restore()


def preempted_during_setup(preemption: run_state.PreemptionSignal, device, next_step: str) -> bool:
    """Whether a signal has come (to any process) before `next_step`: the run then stops, nothing written."""
    if not preemption.received_anywhere(device):
        return False
    print(f"preempted during setup: stopping before {next_step}, with nothing written (exit code "
          f"{run_state.EXIT_PREEMPTED}); run the same command again to continue")
    return True


def distil(argv, preemption: run_state.PreemptionSignal) -> int:
    """main() once its preemption handler is in place."""
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
        data = split_off_weight_fit(prepare_data(config, tokenizer), config)
    print(f"data: {len(data['train'])} training and {len(data['test'])} test examples")
    if preempted_during_setup(preemption, device, "the rest of the setup"):
        return run_state.EXIT_PREEMPTED
    collator = PaddingCollator(tokenizer.pad_token_id)
    cache = prepare_teacher_cache(config, teacher, teacher_path, tokenizer, data["train"], collator, state)
    evaluated_teacher = evaluation_teacher(config, teacher, cache, data, collator, state)
    train_split = teacher_cache.with_example_ids(data["train"])
    settings = LossSettings(alpha=config.alpha, temperature=config.temperature, divergence=config.divergence,
                            jsd_beta=config.jsd_beta, nll_target=config.nll_target, combine=config.combine)

    # Checked before the run folder exists, so a run that cannot write its checkpoints leaves nothing behind.
    round_config = baseline_round_config(config, teacher)  # the config itself, except for single-model baselines
    first_student = utils.build_student(round_config, teacher, tokenizer, 0)
    output_folder = Path(args.resume) if args.resume else Path(config.output_root)
    output_folder.mkdir(parents=True, exist_ok=True)
    check_disk_for_a_round(output_folder, utils.count_parameters(first_student))
    del first_student
    if preempted_during_setup(preemption, device, "the run folder is written"):
        return run_state.EXIT_PREEMPTED

    run_dir, manifest = open_run(args, config, state)
    print_plan(config, run_dir)
    ensemble_dir = run_dir / "ensemble"
    members = [utils.load_causal_lm(str(run_dir / path), frozen_dtype, config.trust_remote_code).to(device).eval()
               for path in manifest["members"]]
    weights = (manifest.get("weights") or []) if config.combine in WEIGHTED_MODES else None  # one per member
    # The baselines' students train alone (independent) or are one model (single_*); the method's train through the
    # frozen ensemble of earlier members.
    through_ensemble = config.baseline == "none"

    # --- rounds -------------------------------------------------------------------------------------------------
    for round_index in range(rounds_to_run(config)):
        if run_state.round_status(manifest, round_index) == "done":
            print(f"round {round_index}: done earlier, skipped")
            if state.is_main_process:  # a kill right after the manifest write leaves the checkpoints behind
                shutil.rmtree(run_dir / "checkpoints" / f"round_{round_index}", ignore_errors=True)
            continue
        print(f"\n=== round {round_index + 1}/{rounds_to_run(config)}: {len(members)} frozen member(s) ===")
        student = utils.build_student(round_config, teacher, tokenizer, round_index).to(device)
        utils.check_vocab_fits(student, vocab_size, f"round {round_index} student")
        if config.combine == "additive" and members and through_ensemble:
            utils.start_at_zero(student)  # the round starts exactly where the previous one ended
        # The untrained copy is scored with the trained models below, so each round runs the teacher once.
        untrained = copy.deepcopy(student).to(frozen_dtype).eval().requires_grad_(False)

        checkpoint_dir = run_dir / "checkpoints" / f"round_{round_index}"
        member_dir = ensemble_dir / f"member_{round_index}"
        if (member_dir / "config.json").is_file():  # saved atomically: training finished, evaluation did not
            print(f"round {round_index}: trained earlier, evaluating {member_dir}")
            student = utils.load_causal_lm(str(member_dir), torch.float32, config.trust_remote_code).to(device)
        else:
            check_disk_for_a_round(run_dir, utils.count_parameters(student))
            resume_from = run_state.latest_complete_checkpoint(checkpoint_dir, state.num_processes)
            if state.is_main_process:
                manifest["rounds"][str(round_index)] = "training"
                run_state.write_manifest(run_dir, manifest)
                # Log rows written after the checkpoint we resume from are logged again by the resumed steps.
                last_step = run_state.checkpoint_step(resume_from) if resume_from else 0
                run_state.replace_csv_rows(run_dir / "train_log.csv", TRAIN_LOG_COLUMNS, lambda row: int(
                    row["round"]) != round_index or int(row["step"]) <= last_step, [])
            frozen = members if through_ensemble else []
            round_settings = dataclasses.replace(
                settings, mixture_weights=training_mixture_weights(config.combine, weights if frozen else [], config.eta),
                kl_scale=float(len(frozen) + 1) if config.kl_scale == "ensemble_size" else 1.0)
            trainer = DistillationTrainer(
                model=student, teacher=teacher, members=frozen, settings=round_settings, vocab_size=vocab_size,
                args=training_arguments(round_config, checkpoint_dir, round_index, use_cpu=device.type == "cpu",
                                        bf16=utils.use_bf16_autocast(config.dtype, device)),
                train_dataset=train_split, processing_class=tokenizer,
                callbacks=[CsvTrainLogCallback(run_dir / "train_log.csv", round_index),
                           run_state.StopOnSignal(preemption),  # before the disk check: it may decide to save
                           run_state.CheckDiskBeforeSave(
                               run_dir, run_state.checkpoint_bytes(utils.count_parameters(student)))],
                chunk_size=config.loss_chunk_size, teacher_cache=cache, round_index=round_index,
                compile_loss=config_lib.use_compiled_loss(config.compile_loss, device))
            if resume_from and run_state.checkpoint_step(resume_from) >= round_config.steps_per_round:
                # Killed after the last step's checkpoint but before the member was saved: nothing left to train
                # (resuming the Trainer from its final checkpoint would run one step more).
                student = utils.load_causal_lm(str(resume_from), torch.float32, config.trust_remote_code).to(device)
            else:
                if resume_from:
                    print(f"round {round_index}: resuming from {resume_from.name}")
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
                if preemption.received_anywhere(device):
                    return run_state.EXIT_PREEMPTED
            if state.is_main_process:
                run_state.save_member_atomically(student, tokenizer, member_dir)
        student = student.to(frozen_dtype).eval().requires_grad_(False)
        new_weights = weights_with_new_member(config.combine, weights or [],
                                              new_member_weight(config, members, weights, student, evaluated_teacher,
                                                                data, collator, vocab_size, state))
        members.append(student)

        predictors = {"student_untrained": [untrained], "student": [student], "ensemble": members}
        sizes = {"teacher": 0, "student_untrained": 1, "student": 1, "ensemble": len(members)}
        if not manifest["teacher_evaluated"]:
            predictors = {"teacher": [teacher], **predictors}  # once per run
        eval_weights = None if new_weights is None else {
            **{name: [1.0] for name in predictors}, "ensemble": new_weights}
        started = time.time()
        results = evaluate(predictors, evaluated_teacher, data["test"], collator, config.eval_batch_size,
                           vocab_size, config.combine, state=state, weights=eval_weights)
        del untrained
        if state.is_main_process:
            # This round's rows replace any that an interrupted evaluation of it left behind.
            rows = metric_rows(round_index, results, sizes, time.time() - started)
            add_gap_closed(rows, run_dir / "metrics.csv")
            run_state.replace_csv_rows(run_dir / "metrics.csv", METRIC_COLUMNS,
                                       lambda row: int(row["round"]) != round_index, rows)
            # The ensemble folder is complete after every round: ModelEnsemble.from_pretrained(ensemble_dir) works.
            ensemble = ModelEnsemble.from_members(members, config.combine, vocab_size, weights=new_weights)
            ensemble.save_configs(ensemble_dir, tokenizer)
            write_sample_answers(run_dir / "samples.csv", round_index, {"student": student, "ensemble": ensemble},
                                 tokenizer, config)
        # Every process keeps the same manifest in memory (it decides what the next round evaluates); one writes it.
        manifest["members"].append(str(member_dir.relative_to(run_dir)))
        manifest["weights"] = weights = new_weights
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
        if config.plots:
            import plot

            for figure in plot.plot_run(run_dir):
                print(f"figure: {figure}")
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


def check_disk_for_a_round(folder: Path, parameters: int) -> None:
    """Refuse to start a round whose checkpoints cannot be written: two at once (the newest is written before the
    oldest is pruned). Each write is checked again just before it happens (run_state.CheckDiskBeforeSave)."""
    run_state.check_disk_space(folder, 2 * run_state.checkpoint_bytes(parameters),
                               f"the next checkpoints ({parameters:,} parameters with their optimizer state)",
                               "free some space or point output_root elsewhere")


def open_run(args, config, state) -> tuple[Path, dict]:
    """The run folder and its manifest: a new folder (never an existing one), or the one being resumed."""
    if args.resume:
        return resume_run(Path(args.resume), config, state)
    manifest = run_state.new_manifest(config.fingerprint(), config.seed, rounds_to_run(config), args.job_id)
    run_dir = None
    if state.is_main_process:  # one process picks the folder, so every process agrees on it
        run_dir = utils.new_run_dir(config.output_root)
        write_run_config(config, run_dir)
        run_state.write_manifest(run_dir, manifest)
    (run_dir,) = broadcast_object_list([run_dir])
    return run_dir, manifest


def resume_run(run_dir: Path, config, state) -> tuple[Path, dict]:
    """The resumed run's folder and manifest (both checked by resolve_config). A total_rounds changed on this
    command line is written into config.yaml and the manifest (fingerprint, pending rounds), so a later plain
    --resume, after a preemption, still trains every round."""
    manifest = run_state.load_manifest(run_dir)
    updated = {**manifest, "config_fingerprint": config.fingerprint(),
               "rounds": run_state.planned_rounds(manifest["rounds"], rounds_to_run(config))}
    if updated != manifest and state.is_main_process:
        # config.yaml first: after a kill between the two writes, the next resume finds the manifest out of date
        # and writes both again.
        write_run_config(config, run_dir)
        run_state.write_manifest(run_dir, updated)
    return run_dir, updated


def write_run_config(config, run_dir: Path) -> None:
    """config.yaml, atomically: a resume reads it back."""
    run_state.write_atomically(run_dir / "config.yaml", config_lib.config_yaml(config))


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
