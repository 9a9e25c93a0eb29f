"""Evaluate a saved ensemble, one of its members or the teacher with lm-evaluation-harness (an optional dependency).

    python lm_eval_adapter.py runs/2026-11-29/run_1 --tasks slm_tiny_mc,slm_tiny_gen,slm_tiny_ppl
    python lm_eval_adapter.py runs/2026-11-29/run_1 --tasks hellaswag,arc_easy --limit 200 --output arc.csv
    python lm_eval_adapter.py runs/2026-11-29/run_1 --tasks slm_tiny --models ensemble,best_member

The command evaluates the run's teacher, its best member (the round's student with the lowest held-out ce in
metrics.csv) and its ensemble, prints one table (a column per model) and writes it as CSV, one row per
(model, task, metric): model, path, task, metric, filter, value, stderr, samples (default RUN_DIR/lm_eval.csv).
Task names are lm-eval's own or the repository's offline tasks in lm_eval_tasks/ (`slm_tiny` runs all of these).

From Python, any causal LM (a ModelEnsemble or a single Hugging Face model) becomes an lm-eval model:

    import lm_eval
    from lm_eval_adapter import EnsembleLM, task_manager
    from ensemble import ModelEnsemble
    from utils import load_tokenizer

    ensemble = ModelEnsemble.from_pretrained("runs/2026-11-29/run_1/ensemble")
    lm = EnsembleLM(ensemble, load_tokenizer("runs/2026-11-29/run_1/ensemble"), batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=["slm_tiny_mc"], task_manager=task_manager())

What the three request types compute (single process; the model stays where it is, inputs go to `model.device`):
- loglikelihood (context, continuation): the sum of log p(token) over the continuation's tokens, and whether each
  one is the argmax at its position. Tokenized as lm-eval's Hugging Face backend does: trailing whitespace of the
  context moves to the continuation, context + continuation is encoded as one string and the continuation is
  what follows the context's own token count. An empty context is replaced by the prefix token (BOS, or EOS when
  the tokenizer has none). At most max_length tokens are fed: a long context is cut from the left.
- loglikelihood_rolling (text,): the log-likelihood of the whole text after the prefix token, in windows of
  max_length tokens when it is longer (every token scored exactly once; the last window gets full context).
- generate_until (context, gen_kwargs): the model's own `generate()`, greedy, at most `max_gen_toks` new tokens,
  stopped as soon as every row has produced one of the `until` strings (or EOS); the answer is cut before the
  first `until` string. Prompts are left-padded; the context is cut from the left to max_length - max_gen_toks.
Scoring batches are right-padded with attention masks; requests are sorted by length to limit padding. Each model
(each member, for an ensemble) runs its body on the batch and its output head only on the positions scored (the
continuation; every target of a rolling window), `chunk_size` positions at a time, combining members as the
ensemble's forward does: the logits held at once are chunk_size x vocabulary per member, never length x vocabulary.
max_length defaults to the models' own limit capped at the run's training length (config key max_length).

Nothing is imported from lm-eval until it is needed: without it, `EnsembleLM`, `task_manager` and the command
raise "lm-eval is not installed: pip install lm-eval". The `CausalLMAdapter` core works without it.
"""

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
import weakref
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from checksums import DamagedFolderError
from ensemble import EnsembleConfig, ModelEnsemble, load_member
from model_io import check_logits_at
from utils import frozen_dtype, load_causal_lm, load_tokenizer, select_device
from slm_ensembles import embedded
from slm_ensembles.processes import run_command
from slm_ensembles.run_layout import RunLayout
from slm_ensembles.scoring import as_ensemble, target_log_probs

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_TASKS_DIR = REPO_ROOT / "lm_eval_tasks"
LM_EVAL_MISSING = "lm-eval is not installed: pip install lm-eval"
MODEL_KINDS = ("teacher", "best_member", "ensemble")
RESULT_COLUMNS = ["model", "path", "task", "metric", "filter", "value", "stderr", "samples"]
DEFAULT_MAX_LENGTH = 2048  # when neither the argument nor the model's config gives one
# Scored positions per output-head call: the logits held at once are chunk x vocabulary per member (at 151,936
# tokens, 0.6 GB in fp32), whatever the length of the text.
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_MAX_GEN_TOKS = 256


def require_lm_eval():
    """The lm_eval package, or an ImportError that says how to install it."""
    try:
        import lm_eval
        import lm_eval.api.model
        import lm_eval.tasks
    except ImportError as error:
        raise ImportError(LM_EVAL_MISSING) from error
    return lm_eval


# --- the scoring core ---------------------------------------------------------------------------------------------

class CausalLMAdapter:
    """lm-eval's three request types on a causal LM and its tokenizer, with no dependency on lm-eval itself.

    `model` is a ModelEnsemble or any Hugging Face causal LM, a single one scored as a one-member ensemble
    (scoring.py, the scorer score.py uses too): through its members' final hidden states and output heads, combined
    as the ensemble's forward combines them, applied only to the positions being scored, `chunk_size` at a time. It
    generates with model.generate(...). Requests are lm-eval `Instance`s or anything with `.args`, or the bare
    argument tuples.

    - batch_size: sequences per forward pass (and per generate call).
    - max_length: the longest input fed to the model; default: the smallest max_position_embeddings of the
      model (of every member, for an ensemble), else DEFAULT_MAX_LENGTH, capped at train_max_length.
    - train_max_length: the length the model was trained on (a run's max_length): it caps the default max_length,
      and an explicit max_length beyond it is kept with a warning.
    - chunk_size: scored positions per output-head call, which bounds the logits held at once to chunk_size x
      vocabulary (per member) however long the input.
    - vocab_size: cut the logits to this many columns before the softmax (an ensemble already cuts to its config's
      vocab_size); give it to compare single models with padded embedding rows to the ensemble on equal terms.
    - add_bos_token: put the tokenizer's BOS token before every context (off: chat models' tokenizers add none).
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, vocab_size: int | None = None,
                 add_bos_token: bool = False, name: str | None = None, train_max_length: int | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__()  # lm-eval's LM.__init__ when mixed into EnsembleLM
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        if add_bos_token and tokenizer.bos_token_id is None:
            raise ValueError("add_bos_token=True but the tokenizer has no BOS token")
        self.model = model
        if hasattr(model, "eval"):
            model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self._max_length = resolve_max_length(max_length, model, train_max_length)
        self.max_gen_toks = int(max_gen_toks)
        self.vocab_size = vocab_size
        self.chunk_size = int(chunk_size)
        self.scored = as_ensemble(model)  # a single model is scored as a one-member ensemble (scoring.py)
        for part in self.scored.members:
            # Scores come from hidden states and heads, not the forward: refuse an output transform they would miss.
            check_logits_at(part, part.get_output_embeddings().weight.shape[0])
        self.add_bos_token = add_bos_token
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__

    # --- properties lm-eval and its loggers read ---

    @property
    def device(self) -> torch.device:
        return getattr(self.model, "device", torch.device("cpu"))

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token that conditions an empty context and the first token of a rolling text: BOS, else EOS."""
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or "tokenizer").replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_name": self.name, "max_length": self.max_length, "adapter_batch_size": self.batch_size}

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # --- tokenization ---

    def tok_encode(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens added (BOS is added by the callers, with add_bos_token)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens), split as lm-eval's Hugging Face backend splits them."""
        if not context:
            return [self.prefix_token_id], self.tok_encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        context_ids = self.tok_encode(context)
        bos = [self.tokenizer.bos_token_id] if self.add_bos_token else []
        return bos + context_ids, whole[len(context_ids):]

    # --- scoring ---

    @torch.no_grad()
    def score_windows(self, windows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """For each (tokens, n): the summed log-probability of the last n tokens given all tokens before them, and
        whether each of those n tokens is the argmax at its position. len(tokens) - 1 is what the model reads;
        the output heads run on the n scored positions only, chunk_size at a time (scoring.target_log_probs)."""
        for tokens, n in windows:
            if not 0 <= n < len(tokens) or len(tokens) - 1 > self.max_length:
                raise ValueError(f"cannot score the last {n} of {len(tokens)} tokens with at most "
                                 f"{self.max_length} input tokens")
        # Nothing to score (an empty continuation): log-probability 0, trivially greedy.
        results: list[tuple[float, bool] | None] = [(0.0, True) if n == 0 else None for _, n in windows]
        order = sorted((i for i, (_, n) in enumerate(windows) if n > 0), key=lambda i: -len(windows[i][0]))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = max(len(windows[i][0]) - 1 for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            positions = torch.zeros((len(batch), width), dtype=torch.bool)
            targets = []
            for row, i in enumerate(batch):
                tokens, n = windows[i]
                length = len(tokens) - 1
                input_ids[row, :length] = torch.tensor(tokens[:-1], dtype=torch.long)
                attention_mask[row, :length] = 1
                positions[row, length - n:length] = True
                targets.extend(tokens[-n:])
            hidden = self.scored.member_hidden_states(input_ids, attention_mask, positions)
            log_probs, greedy = target_log_probs(self.scored, hidden, torch.tensor(targets, dtype=torch.long),
                                                 self.chunk_size, self.vocab_size)
            # Scored positions come row by row, so each window's are the next n of them.
            counts = [windows[i][1] for i in batch]
            for i, row_log_probs, row_greedy in zip(batch, log_probs.split(counts), greedy.split(counts),
                                                    strict=True):
                results[i] = (float(row_log_probs.sum().item()), bool(row_greedy.all()))
        return results

    def loglikelihood_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is greedy) for token-level (context, continuation) pairs."""
        windows = []
        for context_ids, continuation_ids in pairs:
            if not context_ids:
                raise ValueError("a context needs at least one token (use the prefix token for an empty one)")
            if len(continuation_ids) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation_ids)} tokens is longer than max_length "
                                 f"{self.max_length}")
            tokens = (list(context_ids) + list(continuation_ids))[-(self.max_length + 1):]
            windows.append((tokens, len(continuation_ids)))
        return self.score_windows(windows)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*_request_args(request)) for request in requests]
        return self.loglikelihood_tokens(pairs)

    def rolling_windows(self, token_ids: list[int]) -> list[tuple[list[int], int]]:
        """The (tokens, n) windows scoring every token of `token_ids` once, after the prefix token: consecutive
        blocks of max_length targets, each window holding up to max_length inputs before its last target."""
        sequence = [self.prefix_token_id] + list(token_ids)
        windows = []
        for start in range(1, len(sequence), self.max_length):
            end = min(start + self.max_length, len(sequence))
            windows.append((sequence[max(0, end - 1 - self.max_length):end], end - start))
        return windows

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        owners, windows = [], []
        for index, request in enumerate(requests):
            (text,) = _request_args(request)
            for window in self.rolling_windows(self.tok_encode(text)):
                owners.append(index)
                windows.append(window)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self.score_windows(windows), strict=True):
            totals[owner] += log_prob
        return totals

    # --- generation ---

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [_request_args(request) for request in requests]
        groups: dict[str, list[int]] = {}
        for index, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs or {}, sort_keys=True, default=str), []).append(index)
        answers: list[str | None] = [None] * len(args)
        for indices in groups.values():
            gen_kwargs = dict(args[indices[0]][1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else [s for s in until if s]
            max_gen_toks = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            if max_gen_toks >= self.max_length:
                raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room for a context in max_length "
                                 f"{self.max_length}")
            # Longest prompts first, so that each batch pads little.
            indices = sorted(indices, key=lambda i: -len(args[i][0]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                texts = self.generate_batch([args[i][0] for i in chunk], until, max_gen_toks)
                for i, text in zip(chunk, texts, strict=True):
                    answers[i] = text
        return answers

    def generate_batch(self, contexts: list[str], until: list[str], max_gen_toks: int) -> list[str]:
        """Greedy answers to `contexts` (one left-padded batch), each cut before its first `until` string."""
        bos = [self.tokenizer.bos_token_id] if self.add_bos_token else []
        prompts = []
        for context in contexts:
            ids = bos + self.tok_encode(context) if context else [self.prefix_token_id]
            prompts.append(ids[-(self.max_length - max_gen_toks):])
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
        stopping = StoppingCriteriaList([_UntilCriteria(self.tokenizer, until, width)]) if until else None
        output = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            max_new_tokens=max_gen_toks, do_sample=False, pad_token_id=pad_id, stopping_criteria=stopping,
        )
        # A row ends at its first EOS (generate pads it after that); padding after a row stopped on an `until`
        # string falls after that string, which is cut off anyway.
        eos_ids = _eos_ids(self.model, self.tokenizer)
        answers = []
        for row in output[:, width:].tolist():
            end = next((k for k, token in enumerate(row) if token in eos_ids), len(row))
            answers.append(cut_at_stop(self.tokenizer.decode(row[:end], skip_special_tokens=True), until))
        return answers


def cut_at_stop(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any of the `until` strings."""
    cut = min((position for s in until if (position := text.find(s)) >= 0), default=len(text))
    return text[:cut]


class _UntilCriteria(StoppingCriteria):
    """A stopping criterion: a row is done once its new tokens decode to text containing an `until` string."""

    def __init__(self, tokenizer, until: list[str], prompt_length: int):
        self.tokenizer, self.until, self.prompt_length = tokenizer, until, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = [any(s in self.tokenizer.decode(row[self.prompt_length:], skip_special_tokens=True)
                    for s in self.until) for row in input_ids.tolist()]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _eos_ids(model, tokenizer) -> set[int]:
    """Every EOS token id the model's generation config or the tokenizer names."""
    ids = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _request_args(request) -> tuple:
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


def _parts(model) -> list:
    """The models whose bodies and heads compute `model`'s predictions: an ensemble's members, else the model."""
    return list(model.members) if isinstance(model, ModelEnsemble) else [model]


def resolve_max_length(max_length: int | None, model, train_max_length: int | None) -> int:
    """The adapter's max_length: an explicit `max_length` as given (with a warning beyond `train_max_length`), else
    the model's own limit capped at `train_max_length`: a Qwen2.5 config allows 32,768 positions, far beyond the
    length a run trains on, and a window that long costs memory in the model's body for nothing it learned."""
    if max_length:
        if train_max_length and max_length > train_max_length:
            warnings.warn(f"max_length {max_length} exceeds the run's training length ({train_max_length} tokens): "
                          "the students never trained on the positions beyond it", stacklevel=2)
        return int(max_length)
    limit = model_max_length(model)
    return min(limit, int(train_max_length)) if train_max_length else limit


def model_max_length(model) -> int:
    """The smallest max_position_embeddings (or n_positions) of the model, of every member for an ensemble."""
    lengths = []
    for part in _parts(model):
        config = getattr(part, "config", None)
        if config is None:
            continue
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                lengths.append(value)
                break
    return min(lengths) if lengths else DEFAULT_MAX_LENGTH


# --- the lm-eval model class, defined on first use ----------------------------------------------------------------

_LAZY_CLASSES: dict[str, type] = {}


def _define_ensemble_lm() -> type:
    require_lm_eval()
    from lm_eval.api.model import LM

    class EnsembleLM(CausalLMAdapter, LM):
        """An lm-eval model (`lm_eval.api.model.LM`) scoring and generating with a ModelEnsemble or a single
        causal LM: see `CausalLMAdapter` for the arguments and the module's docstring for what it computes."""

    EnsembleLM.__module__ = __name__
    EnsembleLM.__qualname__ = "EnsembleLM"
    return EnsembleLM


def __getattr__(name: str):
    """`EnsembleLM` subclasses lm-eval's LM, so it is defined (and lm-eval imported) when first asked for."""
    if name == "EnsembleLM":
        if name not in _LAZY_CLASSES:
            _LAZY_CLASSES[name] = _define_ensemble_lm()
        return _LAZY_CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_lm(model, tokenizer, **kwargs):
    """An EnsembleLM (an lm-eval model) for `model` and `tokenizer`; keyword arguments as for CausalLMAdapter."""
    return __getattr__("EnsembleLM")(model, tokenizer, **kwargs)


# --- local task folders -------------------------------------------------------------------------------------------

class _FunctionRef(str):
    """The value of a `!function` tag in a task YAML, kept as written."""


def _yaml_io():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    class Dumper(yaml.SafeDumper):
        pass

    Loader.add_constructor("!function", lambda loader, node: _FunctionRef(loader.construct_scalar(node)))
    Dumper.add_representer(_FunctionRef, lambda dumper, value: dumper.represent_scalar("!function", str(value)))
    return yaml, Loader, Dumper


def _absolute(value, base: Path):
    """data_files with every relative path made absolute against `base` (a str, a list or a split -> files dict)."""
    if isinstance(value, str):
        return value if "://" in value or os.path.isabs(value) else str((base / value).resolve())
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if isinstance(value, dict):
        return {key: _absolute(v, base) for key, v in value.items()}
    return value


def resolved_task_folder(folder: str | Path) -> Path:
    """A temporary mirror of a task folder in which relative local data paths are absolute, so the tasks load from
    any working directory: in every YAML, `dataset_kwargs.data_files` entries and a `dataset_path` starting with
    ./ or ../ are resolved against the YAML's own folder. Other files are linked (or copied) unchanged."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"task folder {folder} does not exist")
    yaml, Loader, Dumper = _yaml_io()
    mirror = Path(tempfile.mkdtemp(prefix="slm_lm_eval_tasks-")) / folder.name
    for source in sorted(folder.rglob("*")):
        if source.is_dir() or "__pycache__" in source.parts:
            continue
        target = mirror / source.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        config = None
        if source.suffix in (".yaml", ".yml"):
            try:
                config = yaml.load(source.read_text(encoding="utf-8"), Loader=Loader)
            except yaml.YAMLError:
                config = None  # tags other than !function: left as written
        if isinstance(config, dict) and _resolve_local_paths(config, source.parent):
            target.write_text(yaml.dump(config, Dumper=Dumper, sort_keys=False, allow_unicode=True),
                              encoding="utf-8")
            continue
        try:
            target.symlink_to(source)
        except OSError:
            shutil.copy2(source, target)
    return mirror


def _resolve_local_paths(config: dict, base: Path) -> bool:
    """Make a task config's local data paths absolute in place; whether anything changed."""
    changed = False
    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("data_files") is not None:
        resolved = _absolute(kwargs["data_files"], base)
        changed = resolved != kwargs["data_files"]
        kwargs["data_files"] = resolved
    path = config.get("dataset_path")
    if isinstance(path, str) and path.startswith(("./", "../")):
        config["dataset_path"] = str((base / path).resolve())
        changed = True
    return changed


def task_manager(include_path: str | Path | list | None = DEFAULT_TASKS_DIR, include_defaults: bool = True):
    """An lm-eval TaskManager knowing the tasks of `include_path` (folders; relative data paths resolved, see
    `resolved_task_folder`) and, with include_defaults, lm-eval's own tasks (indexing those takes a few seconds)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is None:
        folders = []
    elif isinstance(include_path, (list, tuple)):
        folders = list(include_path)
    else:
        folders = [include_path]
    mirrors = [resolved_task_folder(folder) for folder in folders]
    manager = TaskManager(include_path=[str(m) for m in mirrors] or None, include_defaults=include_defaults)
    for mirror in mirrors:
        weakref.finalize(manager, shutil.rmtree, str(mirror.parent), True)  # gone with the manager
    return manager


def results_to_rows(results: dict, model: str, path: str = "") -> list[dict]:
    """One row per (task, metric, filter) of simple_evaluate's results, with its stderr and sample count."""
    rows = []
    samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        count = samples.get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, separator, filter_name = key.partition(",")
            if not separator or metric.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append({"model": model, "path": path, "task": task, "metric": metric, "filter": filter_name,
                         "value": _number(value), "stderr": _number(stderr), "samples": count})
    return rows


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan  # lm-eval writes "N/A" where it has no stderr


# --- a run folder: teacher, best member, ensemble -----------------------------------------------------------------

def read_run_config(run_dir: str | Path) -> dict:
    import yaml

    path = RunLayout(Path(run_dir)).config
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (is this a run folder runs/YYYY-MM-DD/run_N?)")
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def best_member(run_dir: str | Path) -> tuple[int, Path]:
    """(round, folder) of the run's best member: the round whose student alone has the lowest ce in metrics.csv."""
    import pandas as pd

    run_dir = Path(run_dir)
    path = RunLayout(run_dir).metrics
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.csv, so no member can be chosen as the best")
    metrics = pd.read_csv(path)
    students = metrics[metrics["model"] == "student"].dropna(subset=["ce"])
    if students.empty:
        raise ValueError(f"{path}: no row with model == 'student' and a ce value")
    round_index = int(students.loc[students["ce"].idxmin(), "round"])
    folder = RunLayout(run_dir).member(round_index)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: the best member (round {round_index}) is not saved")
    return round_index, folder


def _local_path(value: str) -> str:
    """A relative path as written in a run's config: from the working directory if it exists there, else from the
    repository root (where main.py runs), else unchanged (a hub name, or a folder still to be made)."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return str(path)
    if (REPO_ROOT / path).exists():
        return str(REPO_ROOT / path)
    return value


def resolve_teacher_path(config: dict) -> str:
    """The folder (or hub name) of a run's teacher, converting the embedded one on first use."""
    teacher = str(config["teacher"])
    cache_dir = _local_path(str(config.get("cache_dir", ".cache")))
    return _local_path(embedded.resolve_teacher(teacher, cache_dir))


def _tokenizer_folder(folder: Path, fallback: Path) -> Path:
    return folder if (folder / "tokenizer_config.json").is_file() else fallback


def run_models(run_dir: str | Path, dtype: torch.dtype, device: torch.device, kinds=MODEL_KINDS,
               member_devices: list[str] | None = None):
    """Yield (kind, path, model, tokenizer) for the run's models, each loaded only when its turn comes; the
    ensemble's members on `member_devices`, one each (they then run at once), when given. The best member's folder
    and the ensemble's are checked against their checksums.json before they load (DamagedFolderError)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    trust = bool(config.get("trust_remote_code", False))
    ensemble_dir = RunLayout(run_dir).ensemble
    if not (ensemble_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no saved ensemble in ensemble/ (a run saves it after its first round)")
    for kind in kinds:
        if kind == "teacher":
            path = resolve_teacher_path(config)
            model = load_causal_lm(path, dtype, trust).to(device)
            tokenizer = load_tokenizer(path, trust)
        elif kind == "best_member":
            _, folder = best_member(run_dir)
            path = str(folder)
            model = load_member(folder, dtype=dtype, trust_remote_code=trust).to(device)
            tokenizer = load_tokenizer(str(_tokenizer_folder(folder, ensemble_dir)), trust)
        elif kind == "ensemble":
            path = str(ensemble_dir)
            model = ModelEnsemble.from_pretrained(ensemble_dir, dtype=dtype, trust_remote_code=trust,
                                                  device_map=member_devices)
            model = model if member_devices else model.to(device)
            tokenizer = load_tokenizer(path, trust)
        else:
            raise ValueError(f"unknown model {kind!r}: use some of {MODEL_KINDS}")
        yield kind, path, model, tokenizer


def evaluate_run(run_dir: str | Path, tasks: list[str], include_path=DEFAULT_TASKS_DIR, limit: int | float | None = None,
                 batch_size: int = 8, models=MODEL_KINDS, device: str = "auto", dtype: str | None = None,
                 max_length: int | None = None, num_fewshot: int | None = None, include_defaults: bool = True,
                 bootstrap_iters: int = 1000, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 member_devices: list[str] | None = None):
    """Evaluate the teacher, the best member and the ensemble of a run folder on lm-eval tasks.

    Returns a pandas DataFrame with one row per (model, task, metric): RESULT_COLUMNS. `dtype` defaults to the
    run's own (config key dtype, "auto": bf16 where the hardware computes it natively); logits are cut to the
    ensemble's vocab_size for every model, so all three normalise over the same tokens. `max_length` defaults to
    the run's own (config key max_length; see resolve_max_length), for all three models. Models are loaded one
    at a time and freed before the next.
    """
    import pandas as pd

    lm_eval = require_lm_eval()

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("no task given")
    config = read_run_config(run_dir)
    torch_device = select_device(device)
    torch_dtype = frozen_dtype(dtype or str(config.get("dtype", "auto")), torch_device)
    vocab_size = EnsembleConfig.from_pretrained(RunLayout(Path(run_dir)).ensemble).vocab_size
    manager = task_manager(include_path, include_defaults=include_defaults)
    rows = []
    for kind, path, model, tokenizer in run_models(run_dir, torch_dtype, torch_device, kinds=models,
                                                   member_devices=member_devices):
        lm = make_lm(model, tokenizer, batch_size=batch_size, max_length=max_length, vocab_size=vocab_size,
                     name=f"{kind}:{path}", train_max_length=config.get("max_length"), chunk_size=chunk_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, log_samples=False,
                                          bootstrap_iters=bootstrap_iters)
        rows.extend(results_to_rows(results, kind, path))
        del lm, model, results
        gc.collect()
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def wide_table(table):
    """The result table with one value column per model, for printing."""
    if table.empty:
        return table
    wide = table.pivot_table(index=["task", "metric", "filter"], columns="model", values="value", sort=False)
    return wide[[kind for kind in MODEL_KINDS if kind in wide.columns]
                + [c for c in wide.columns if c not in MODEL_KINDS]].reset_index()


# --- command line -------------------------------------------------------------------------------------------------

def _limit(value: str) -> int | float:
    number = float(value)
    return int(number) if number.is_integer() and number >= 1 else number


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder runs/YYYY-MM-DD/run_N")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names")
    parser.add_argument("--limit", type=_limit, default=None,
                        help="examples per task (a number below 1: a share of them)")
    parser.add_argument("--include_path", default=str(DEFAULT_TASKS_DIR),
                        help="folder of extra task YAMLs (default: the repository's lm_eval_tasks/)")
    parser.add_argument("--no_default_tasks", action="store_true",
                        help="do not index lm-eval's built-in tasks (faster, for local tasks only)")
    parser.add_argument("--models", default=",".join(MODEL_KINDS), help=f"comma-separated, from {MODEL_KINDS}")
    parser.add_argument("--output", default=None, help="CSV to write (default RUN_DIR/lm_eval.csv)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=None,
                        help="longest input (default: the run's max_length, or the models' own limit if smaller)")
    parser.add_argument("--chunk_size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="scored positions per output-head call: bounds the logits held at once")
    parser.add_argument("--num_fewshot", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--member_devices", default=None, metavar="DEV[,DEV...]",
                        help="the ensemble's members one per device (e.g. cuda:0,cuda:1): they then run at once")
    parser.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16 (default: the run's)")
    parser.add_argument("--bootstrap_iters", type=int, default=1000, help="bootstrap samples for stderrs")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        require_lm_eval()
    except ImportError as error:
        print(error, file=sys.stderr)
        return 2
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODEL_KINDS))
    if unknown:
        raise SystemExit(f"unknown --models {unknown}: use some of {MODEL_KINDS}")
    table = evaluate_run(args.run_dir, tasks, include_path=args.include_path or None, limit=args.limit,
                         batch_size=args.batch_size, models=models, device=args.device, dtype=args.dtype,
                         max_length=args.max_length, num_fewshot=args.num_fewshot,
                         include_defaults=not args.no_default_tasks, bootstrap_iters=args.bootstrap_iters,
                         chunk_size=args.chunk_size,
                         member_devices=args.member_devices.split(",") if args.member_devices else None)
    output = Path(args.output) if args.output else Path(args.run_dir) / "lm_eval.csv"
    output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(output, index=False)
    print(wide_table(table).to_string(index=False))
    print(f"wrote {len(table)} rows to {output}")
    return 0


# Bad input (a damaged member or ensemble folder): one line naming the file and exit code 2 (processes.run_command).
REFUSALS = (DamagedFolderError,)

if __name__ == "__main__":
    sys.exit(run_command(main, refusals=REFUSALS))
