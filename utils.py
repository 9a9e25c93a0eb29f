"""Devices, the process group and dtypes; loading models and tokenizers, and refusing ones that do not fit."""

import ctypes
import datetime
import json
import os
import platform
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

from config import Config, ConfigError
from model_io import OutputHeadOnly
from slm_ensembles import files


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


# glibc's M_MMAP_THRESHOLD (malloc.h), and the size from which host buffers get their own mapping (see below).
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024


def return_freed_buffers_to_the_system(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Have glibc give every host buffer of `threshold` bytes or more its own mapping, returned to the system the
    moment it is freed; whether it could (glibc only: elsewhere nothing changes).

    glibc maps large buffers on their own, but raises that size to the largest one freed so far (up to 32 MB). A
    training step on the CPU frees many logits chunks of 10-30 MB (loss_chunk_size rows x the vocabulary), so from
    the first step on they are carved out of the heap, whose holes glibc keeps rather than returning: the demo's
    resident memory grew by ~150 MB a step (the issue measured 13.1 GB after 3 x 60 steps) though what it holds
    stays flat (~1.9 GB).
    A fixed threshold turns that raising off. Smaller buffers (activations, per-layer tensors) stay on the heap."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


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
