"""Helpers shared by the scripts: devices and dtypes, model and tokenizer loading, students, run folders, CSV rows."""

import dataclasses
import datetime
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

import compute
from config import SINGLE_MODEL_BASELINES, Config, ConfigError
import files
from model_io import OutputHeadOnly


class TokenizerMismatchError(ValueError):
    """Teacher and student do not share a tokenizer, so their logits cannot be compared position by position."""


# --- devices and dtypes -------------------------------------------------------------------------------------------

def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config key 'device' = 'cuda' but no CUDA GPU is visible: use --device cpu or auto")
    return torch.device(name)


def process_state(device_name: str = "auto",
                  timeout_minutes: int = Config.process_group_timeout_minutes):
    """This process's accelerate state (process index, count, device) under any launcher.

    Several CPU processes need cpu=True to form a (gloo) process group: accelerate's default groups GPU processes
    only, and would leave each CPU process alone. On GPUs each process gets its own device, `state.device`.
    The group's collectives fail after `timeout_minutes`: long enough for the others to wait while the first
    process prepares the data (NCCL's default, 10 minutes, is not for 200k conversations).
    """
    from accelerate import PartialState

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # The student's output head runs outside its forward and members are saved by one process: both need the
        # whole, unsharded weights.
        raise ConfigError(
            "FSDP is not supported: launch with accelerate_configs/ddp.yaml (data parallel). Students up to a few "
            "billion parameters fit one GPU with their optimizer states; with --teacher_mode topk the teacher's "
            "targets come from its cache during training")
    return PartialState(cpu=select_device(device_name).type == "cpu",
                        timeout=datetime.timedelta(minutes=timeout_minutes))


def summed_over_processes(state):
    """A function that adds a list of integers up across `state`'s processes (a collective every process calls at
    the same point), or None for one process, where there is nothing to add."""
    if state.num_processes == 1:
        return None
    from accelerate.utils import reduce

    def total(values: list[int]) -> list[int]:
        return reduce(torch.tensor(values, dtype=torch.int64, device=state.device), reduction="sum").tolist()
    return total


def leave_process_group() -> None:
    """Destroy the process group, if any: a gloo group still alive at interpreter exit can abort a finished process
    ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def frozen_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of frozen models (teacher, members): under auto, bf16 where the hardware computes it natively."""
    if name == "auto":
        return torch.bfloat16 if supports_bf16(device) else torch.float32
    return getattr(torch, name)


def supports_bf16(device: torch.device) -> bool:
    """A GPU with bf16, or a CPU with native bf16 matrix instructions (AVX512-BF16, AMX): 2-3x faster there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def use_bf16_autocast(name: str, device: torch.device) -> bool:
    """Students keep fp32 master weights and train under bf16 autocast when frozen models run in bf16."""
    return frozen_dtype(name, device) == torch.bfloat16


# --- models and tokenizers ----------------------------------------------------------------------------------------

def load_tokenizer(name: str, trust_remote_code: bool = False, require_chat_template: bool = True):
    """`name`'s tokenizer; with `require_chat_template`, refused unless it has a chat template (the one that formats
    conversations: the teacher's)."""
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out of every loss anyway
    if require_chat_template and not tokenizer.chat_template:
        raise ValueError(f"the tokenizer of {name!r} has no chat template; use an instruct/chat model's tokenizer")
    return tokenizer


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                   device: torch.device | str | None = None):
    """A causal LM from a hub name or a folder, from safetensors only (no pickle); with a `device`, its weights are
    loaded straight onto it (a 7B teacher never passes through host memory whole)."""
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True,
                                                trust_remote_code=trust_remote_code,
                                                device_map=None if device is None else str(device))


def load_output_head(name: str, dtype: torch.dtype, device: torch.device | str,
                     trust_remote_code: bool = False) -> OutputHeadOnly:
    """The output head of the causal LM `name` alone (model_io.OutputHeadOnly), read from its safetensors file
    onto `device`: the rest of the weights are never read. The head's tensor is found under any name the model
    gives it (a tied head is stored as the input embedding)."""
    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    meta_head = skeleton.get_output_embeddings()
    names = [key for key, parameter in skeleton.named_parameters(remove_duplicate=False)
             if parameter is meta_head.weight]
    weight = read_safetensors_tensor(name, names)
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    head.weight = torch.nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
    return OutputHeadOnly(config, head).eval()


def read_safetensors_tensor(name: str, candidates: list[str]) -> torch.Tensor:
    """The first of the tensor names `candidates` found in the safetensors weights of model `name` (a folder or a
    downloaded hub model; sharded or not), read alone."""
    index_file = cached_file(name, SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False)
    if index_file is not None:
        weight_map = json.loads(Path(index_file).read_text())["weight_map"]
        file_names = {key: weight_map[key] for key in candidates if key in weight_map}
    else:
        file_names = dict.fromkeys(candidates, SAFE_WEIGHTS_NAME)
    for key, file_name in file_names.items():
        with safe_open(cached_file(name, file_name), framework="pt") as weights:
            if key in weights.keys():
                return weights.get_tensor(key)
    raise ValueError(f"{name}: none of {', '.join(candidates)} is in its safetensors weights; load the whole model")


def check_same_tokenizer(teacher_tokenizer, student_tokenizer, teacher_name: str, student_name: str) -> None:
    """Refuse students whose tokenizer differs from the teacher's (padded embedding rows are fine: see cut_to_vocab)."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()))[:3]
        raise TokenizerMismatchError(
            f"teacher {teacher_name!r} ({len(teacher_vocab)} tokens) and student {student_name!r} "
            f"({len(student_vocab)} tokens) have different tokenizers (e.g. {differing}); pick a student from the "
            "teacher's model family")


def check_student_tokenizer(teacher_tokenizer, student_model: str, teacher_name: str, trust_remote_code: bool) -> None:
    """Refuse a pretrained student (hub name or folder) whose tokenizer is not the teacher's, or that has none.

    Only the teacher's chat template ever formats conversations, so the student's tokenizer needs none (a base model
    with the teacher's vocabulary is a fine student): only the vocabularies are compared (check_same_tokenizer).
    """
    try:
        student_tokenizer = load_tokenizer(student_model, trust_remote_code, require_chat_template=False)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())  # transformers' messages span several lines
        raise TokenizerMismatchError(
            f"cannot load the tokenizer of student {student_model!r} ({reason}); a pretrained student needs the "
            f"tokenizer of teacher {teacher_name!r} (its vocabulary; no chat template needed) saved with its weights: "
            "tokenizer.save_pretrained(folder)") from error
    check_same_tokenizer(teacher_tokenizer, student_tokenizer, teacher_name, student_model)


def check_model_folder(key: str, name: str) -> None:
    """Refuse the model setting `key` = `name` when it is meant as a local folder (looks_like_local_path) that is
    not one: loading would ask the hub for it instead."""
    if files.looks_like_local_path(name) and not Path(name).is_dir():
        raise ConfigError(f"config key {key!r} = {name!r}: no such folder. Give the folder of a saved model (its "
                          "config.json, weights and tokenizer) or a hub name (owner/name)")


def check_vocab_fits(model, vocab_size: int, name: str) -> None:
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise TokenizerMismatchError(f"model {name!r} has {rows} output rows but the tokenizer has {vocab_size} "
                                     "tokens: it was not trained with this tokenizer")


# --- students -----------------------------------------------------------------------------------------------------

def build_student(config, teacher, tokenizer, round_index: int):
    """A fresh student for `round_index`; later rounds differ by seed (and by copied layers), so members differ."""
    torch.manual_seed(config.round_seed(round_index))
    if config.student_init == "pretrained":
        return load_causal_lm(config.student_model, torch.float32, config.trust_remote_code)
    if config.student_init == "random":
        return AutoModelForCausalLM.from_config(random_student_config(config, teacher.config, tokenizer),
                                                dtype=torch.float32)
    return teacher_layers_student(teacher, student_layer_indices(config, round_index,
                                                                 teacher.config.num_hidden_layers))


def baseline_round_config(config, num_teacher_layers: int):
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
            changes["teacher_layers"] = spread_layer_indices(len(config.teacher_layers) * config.total_rounds,
                                                             num_teacher_layers)
            changes["teacher_layers_shift"] = 0
    return dataclasses.replace(config, **changes)


def student_model_config(config, teacher, tokenizer, round_index: int = 0):
    """The transformers config of `round_index`'s student, without building it."""
    if config.student_init == "pretrained":
        return AutoConfig.from_pretrained(config.student_model, trust_remote_code=config.trust_remote_code)
    if config.student_init == "random":
        return random_student_config(config, teacher.config, tokenizer)
    return teacher_layers_config(teacher.config, student_layer_indices(config, round_index,
                                                                       teacher.config.num_hidden_layers))


def student_skeleton(config, teacher, tokenizer, round_index: int = 0):
    """`round_index`'s student built from its model config on the meta device: its parameters' shapes, with no
    weight allocated or loaded."""
    return compute.meta_model(student_model_config(config, teacher, tokenizer, round_index), config.trust_remote_code)


def flop_matched_config(config, round_config, teacher, tokenizer, train_tokens: compute.TokenCount, examples: int,
                        num_processes: int):
    """A single-model baseline's `round_config` whose cap is the steps that spend the training FLOPs of the ensemble
    it stands for at that ensemble's cap (compute.py): total_rounds students of `config`, each steps_per_round steps
    through the frozen earlier ones, with the same teacher, whose cache build both are charged in full. A step's
    tokens are its examples x the training split's mean example (`train_tokens` over `examples`). A cap, not a
    spend: the ensemble's rounds may stop earlier (study.py compares spends, read off learning curves)."""
    per_step = config.batch_size * config.grad_accum * num_processes
    step_tokens = compute.TokenCount(train_tokens.sequence * per_step // examples,
                                     train_tokens.supervised * per_step // examples,
                                     train_tokens.squared * per_step // examples)
    teacher_shape = compute.model_shape(teacher.config, config.trust_remote_code) if config.alpha > 0 else None
    members = [compute.model_shape(student_model_config(config, teacher, tokenizer, index))
               for index in range(config.total_rounds)]
    budget = compute.run_training_flops(members, step_tokens.times(config.steps_per_round), teacher=teacher_shape,
                                        teacher_mode=config.teacher_mode, cache_tokens=train_tokens)[-1]
    single = compute.model_shape(student_model_config(round_config, teacher, tokenizer))
    one_step = compute.round_training_flops(single, step_tokens, teacher=teacher_shape,
                                            teacher_mode=config.teacher_mode).total
    build = compute.charged_cache_build(teacher_shape, config.teacher_mode, train_tokens)
    steps = compute.flop_matched_steps(budget, one_step, fixed_flops=build)
    return dataclasses.replace(round_config, steps_per_round=max(steps, 1))


def random_student_config(config, teacher_config, tokenizer):
    """The model config of a small randomly initialised model of the teacher's architecture and vocabulary."""
    return AutoConfig.for_model(
        teacher_config.model_type,
        vocab_size=len(tokenizer),
        hidden_size=config.student_hidden_size,
        num_hidden_layers=config.student_num_layers,
        num_attention_heads=config.student_num_heads,
        num_key_value_heads=config.student_num_kv_heads,
        intermediate_size=config.student_intermediate_size,
        max_position_embeddings=max(config.max_length, 128),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def start_at_zero(model) -> None:
    """Give `model` its own output head, all zeros, so its logits start at exactly 0.

    combine=additive: a new member adds nothing to the ensemble until it has learned something, so a round starts
    where the previous one ended. A head tied to the input embeddings is untied first (zeroing it would zero the
    embeddings too); the model still saves and loads as a plain Hugging Face model, now with its own head.
    """
    tied = model.get_output_embeddings()
    head = torch.nn.Linear(tied.in_features, tied.out_features, bias=False, device=tied.weight.device,
                           dtype=tied.weight.dtype)
    torch.nn.init.zeros_(head.weight)
    model.config.tie_word_embeddings = False
    model.set_output_embeddings(head)


def spread_layer_indices(count: int, num_teacher_layers: int) -> list[int]:
    """`count` teacher layers spread evenly from the first to the last (all of them if count exceeds them)."""
    if count >= num_teacher_layers:
        return list(range(num_teacher_layers))
    if count == 1:
        return [0]
    return sorted({round(i * (num_teacher_layers - 1) / (count - 1)) for i in range(count)})


def student_layer_indices(config, round_index: int, num_teacher_layers: int) -> list[int]:
    """The teacher layers a round's student copies: the configured ones, the inner ones shifted by round*shift.

    The first and last configured layers stay fixed (they matter most for embeddings and head); inner layers are
    shifted so members start from different sub-networks.
    """
    layers = list(config.teacher_layers)
    check_teacher_layers(layers, num_teacher_layers)
    shift = round_index * config.teacher_layers_shift
    inner = [min(max(i + shift, layers[0] + 1), layers[-1] - 1) for i in layers[1:-1]]
    shifted = [layers[0], *inner, layers[-1]] if len(layers) > 1 else layers
    return sorted(set(shifted))


def check_teacher_layers(layers: list[int], num_teacher_layers: int) -> None:
    """Refuse teacher_layers that name a layer the teacher (of `num_teacher_layers` layers) lacks."""
    outside = [i for i in layers if not 0 <= i < num_teacher_layers]
    if outside:
        raise ConfigError(f"config key 'teacher_layers' = {layers} names layer(s) {outside} outside the teacher's "
                          f"{num_teacher_layers} layers: give indices from 0 to {num_teacher_layers - 1}")


def teacher_layers_config(teacher_config, layers: list[int]):
    """The teacher's model config with only the given layers."""
    student_config = teacher_config.__class__.from_dict(teacher_config.to_dict())
    student_config.num_hidden_layers = len(layers)
    if getattr(student_config, "layer_types", None) is not None:
        student_config.layer_types = [teacher_config.layer_types[i] for i in layers]
    return student_config


def teacher_layers_student(teacher, layers: list[int]):
    """A student of the teacher's architecture with its embeddings, final norm, head and a subset of its layers."""
    student = AutoModelForCausalLM.from_config(teacher_layers_config(teacher.config, layers), dtype=torch.float32)
    teacher_state = teacher.state_dict()
    student_state = {}
    for key in student.state_dict():
        source_key = key
        parts = key.split(".")
        if "layers" in parts:
            position = parts.index("layers") + 1
            parts[position] = str(layers[int(parts[position])])
            source_key = ".".join(parts)
        student_state[key] = teacher_state[source_key].detach().to(torch.float32)
    student.load_state_dict(student_state)
    return student
