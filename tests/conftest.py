"""Shared test fixtures: tiny tokenizers with real chat templates, tiny Llama models, small chat data.

Everything here is built in-process from a config, so the suite needs no model hub and no network.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

# The suite never reaches a model or dataset hub: anything that tries fails at once instead of hanging. Set before
# the libraries below import huggingface_hub, which reads these once, at its import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DATA_DIR = Path(__file__).parent / "data"


# Chat templates of the three families the preprocessing must handle. None of them has
# `{% generation %}` markers, which is the point: assistant spans are derived without them.
CHAT_TEMPLATES = {
    # ChatML as in SmolLM2 / Qwen2.5: a default system prompt is injected when none is given.
    "chatml": (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Llama 3: BOS inside the template, role headers, <|eot_id|> ends every turn.
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    # Tulu 3: plain-text role tags, the EOS token closes assistant turns only.
    "tulu": (
        "{% for m in messages %}{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}\n"
        "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
        "{% else %}<|assistant|>\n{{ m['content'] + eos_token }}\n{% endif %}"
        "{% if loop.last and add_generation_prompt %}<|assistant|>\n{% endif %}{% endfor %}"
    ),
}

SPECIAL_TOKENS = {
    "chatml": dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                   extra=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    "llama3": dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_pad|>",
                   extra=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                          "<|finetune_pad|>"]),
    "tulu": dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>",
                 extra=["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]),
}


def load_chats(name="chats.jsonl"):
    """The small chat fixture as a list of {"messages": [...]} records."""
    with open(DATA_DIR / name) as f:
        return [json.loads(line) for line in f]


def build_tokenizer(template="chatml", vocab_size=400):
    """A byte-level BPE tokenizer trained on the chat fixture, with the given family's chat template."""
    spec = SPECIAL_TOKENS[template]
    texts = [m["content"] for chat in load_chats() for m in chat["messages"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["extra"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=spec["bos_token"],
                                  eos_token=spec["eos_token"], pad_token=spec["pad_token"])
    tok.chat_template = CHAT_TEMPLATES[template]
    return tok


def build_tiny_llama(tokenizer, seed=0, hidden_size=32, num_layers=2, vocab_size=None):
    """A randomly initialised 2-layer Llama sharing `tokenizer`'s vocabulary (optionally padded beyond it)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


REMOTE_CONFIG_CODE = """from transformers import LlamaConfig


class RemoteLlamaConfig(LlamaConfig):
    model_type = "{model_type}"
"""
REMOTE_MODEL_CODE = """from transformers import LlamaForCausalLM

from .configuration_remote import RemoteLlamaConfig


class RemoteLlamaForCausalLM(LlamaForCausalLM):
    config_class = RemoteLlamaConfig
"""


def write_remote_code_config(folder: Path, llama_config: dict, model_type: str) -> None:
    """A Llama config in `folder` whose classes come from code beside it (auto_map), as a hub model with remote code.

    Give each test its own `model_type`: once built with trust, transformers registers the class for the process.
    """
    (folder / "configuration_remote.py").write_text(REMOTE_CONFIG_CODE.format(model_type=model_type))
    (folder / "modeling_remote.py").write_text(REMOTE_MODEL_CODE)
    (folder / "config.json").write_text(json.dumps({
        **llama_config, "model_type": model_type,
        "auto_map": {"AutoConfig": "configuration_remote.RemoteLlamaConfig",
                     "AutoModelForCausalLM": "modeling_remote.RemoteLlamaForCausalLM"}}))


def hub_commit(revision: str) -> str:
    """The commit hash publish_to_hub_cache gives `revision`."""
    return hashlib.sha1(revision.encode()).hexdigest()


def publish_to_hub_cache(cache: Path, repo_id: str, revision: str, folder: Path) -> None:
    """`folder` as branch `revision` of the Hub model `repo_id`, in a cache laid out as huggingface_hub lays it out
    (refs/BRANCH names a commit, snapshots/COMMIT holds its files), so that an offline from_pretrained reads it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hub_commit(revision)
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)


def build_diverse_member(tokenizer, seed, vocab_size=None):
    """A tiny Llama with large random weights.

    At the default initialisation a tiny tied-embedding Llama mostly predicts its input token again, so every member
    (and every ensemble) decodes the same repetitive text; large weights make members disagree and texts vary.
    """
    model = build_tiny_llama(tokenizer, seed=seed, vocab_size=vocab_size)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


def free_disk(free: int):
    """A stand-in for shutil.disk_usage that reports `free` bytes free on any disk."""
    return lambda path: type("Usage", (), {"free": free})()


def damage_second_half(path: Path) -> bytes:
    """Overwrite the second half of the file `path` with random bytes, keeping its size (a safetensors file keeps its
    header, so it still loads, into other weights): the damage only its checksums.json can tell. Its intact bytes."""
    intact = path.read_bytes()
    half = len(intact) // 2
    path.write_bytes(intact[:half] + os.urandom(len(intact) - half))
    return intact


def run_test_preset(tmp_path, *extra) -> Path:
    """A finished `test`-preset run (2 rounds) of a tiny teacher on the chat fixture, with `extra` settings; its
    folder."""
    import main

    tokenizer = build_tokenizer("chatml")
    build_tiny_llama(tokenizer, seed=11, hidden_size=48).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    assert main.main(["--preset", "test", "--teacher", str(tmp_path / "teacher"), "--dataset",
                      str(DATA_DIR / "chats.jsonl"), "--output_root", str(tmp_path / "runs"),
                      "--cache_dir", str(tmp_path / "cache"), *extra]) == 0
    (folder,) = (tmp_path / "runs").glob("*/run_*")
    return folder


@pytest.fixture(scope="session")
def chats():
    return load_chats()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer("chatml")


@pytest.fixture
def tiny_llama(tokenizer):
    return build_tiny_llama(tokenizer)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny random teacher saved as a normal Hugging Face folder, with its tokenizer and chat template."""
    path = tmp_path_factory.mktemp("teacher")
    tokenizer = build_tokenizer("chatml")
    build_tiny_llama(tokenizer, seed=11, hidden_size=48).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """One cache folder for the session's embedded assets (the teacher conversion takes ~20 s)."""
    return tmp_path_factory.mktemp("embedded_cache")


@pytest.fixture(scope="session")
def embedded_teacher_dir(embedded_cache):
    from slm_ensembles import embedded
    from config import EMBEDDED_TEACHER

    return Path(embedded.resolve_teacher(EMBEDDED_TEACHER, embedded_cache))


def accelerate_launch(script_and_args: list[str], num_processes: int, cwd, timeout: int = 600):
    """Run a script under `accelerate launch` with the project's own config files, as users launch main.py: the
    DDP config on `num_processes` CPU processes (gloo, since no GPU is visible), or the single-device one."""
    import subprocess
    import sys

    configs = Path(__file__).resolve().parents[1] / "accelerate_configs"
    if num_processes == 1:
        launch = ["--config_file", str(configs / "single_gpu.yaml")]
    else:
        launch = ["--config_file", str(configs / "ddp.yaml"), "--num_processes", str(num_processes),
                  "--main_process_port", "0"]  # a free port: tests may run side by side
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, *script_and_args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result
