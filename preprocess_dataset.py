"""Turn chat data into tokenized examples whose labels supervise the assistant turns only.

Usage:

    python preprocess_dataset.py --dataset allenai/tulu-3-sft-mixture --tokenizer Qwen/Qwen2.5-0.5B-Instruct \
        --max_examples 200000 --test_size 2000 --max_length 1024 --output_dir data/tulu_qwen

`--dataset` is a hub dataset name or a local path: a .json, .jsonl or .parquet file, or a folder (one written by
`save_to_disk`, or a folder of data files). Conversations are read from a `messages` column (role/content, as in
allenai/tulu-3-sft-mixture) or a ShareGPT `conversations` column (from/value). `--test_size` is a count (2000) or a
fraction (0.05). Rerunning with the same settings reuses the existing output folder. `--num_proc` sets the processes
that tokenize (default 0: the CPUs the job may use, one for small data); it changes the speed, never the output.

The output folder holds a DatasetDict {"train", "test"} with columns `input_ids` and `labels` (-100 on every token
that is not part of an assistant turn; no padding, the collator pads) and a metadata.json with the settings and counts.
"""

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.exceptions import DatasetGenerationError
from transformers import AutoTokenizer

import utils
from model_io import IGNORE_INDEX
from slm_ensembles import embedded
from slm_ensembles.compute import TokenCount
from slm_ensembles.files import looks_like_local_path, publish_folder, remove_dead_staging, staging

logger = logging.getLogger(__name__)

# Bump when the tokenization or labelling rules change, so folders written by older code are rebuilt, not reused.
FORMAT_VERSION = 1

METADATA_FILE = "metadata.json"

# Accepted role names (ShareGPT spellings included) and the role each one becomes.
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
CANONICAL_ROLES = {"system", "user", "assistant"}

# Columns that may hold the conversations, in order of preference, and the (role, content) keys a turn may use.
CONVERSATION_COLUMNS = ("messages", "conversations")
TURN_KEYS = (("role", "content"), ("from", "value"))

LOCAL_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}

MESSAGES_FEATURES = datasets.Features(
    {"messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})}
)
TOKENIZED_FEATURES = datasets.Features(
    {"input_ids": datasets.List(datasets.Value("int64")), "labels": datasets.List(datasets.Value("int64"))}
)

# The settings that decide a prepared folder's content: prepare_dataset reuses a folder only when all of them match.
# The number of tokenizing processes is not one of them: the examples are the same whatever it is.
REUSE_KEYS = ("format_version", "source", "split", "chat_template_sha256", "tokenizer_sha256", "max_length",
              "test_size", "seed", "test_seed", "max_examples")


# num_proc=0 (auto): below this many conversations a map runs in this process, since starting workers (each
# receiving a copy of the tokenizer) costs more than they save on small data such as the demo's and the tests'.
PARALLEL_MIN_CONVERSATIONS = 5_000
# num_proc=0 (auto): the most workers started. At ~300 conversations/s each, 16 tokenize 200k conversations in under
# a minute; more mostly add start-up, memory (a tokenizer each) and shard files.
MAX_AUTO_PROCESSES = 16


class DataError(ValueError):
    """The input data cannot be used as given; the message names the source, the field and what to do."""


# ---------------------------------------------------------------------------------------------------------------------
# Loading conversations
# ---------------------------------------------------------------------------------------------------------------------

def load_conversations(source: str, split: str = "train", num_proc: int = 0) -> datasets.Dataset:
    """Load `source` as a Dataset with one column "messages": lists of {"role", "content"} turns.

    `source` is a hub dataset name or a local .json/.jsonl/.parquet file or folder. `split` picks the split of a hub
    dataset or of a folder holding several splits; a single file is one split and is read whole. `num_proc`: the
    processes that rename ShareGPT turns (see map_num_proc).
    """
    dataset = _load_raw(source, split)
    if len(dataset) == 0:
        raise DataError(_no_conversations(source))
    column = _conversation_column(dataset, source)
    role_key, content_key = _turn_keys(dataset.features[column], source, column)
    roles = _distinct_roles(dataset, column, role_key)
    unknown = sorted(roles - ROLE_ALIASES.keys(), key=str)
    if unknown:
        raise DataError(
            f"{source}: field '{column}[].{role_key}' has unknown role value(s) {unknown}; accepted roles are "
            f"{sorted(ROLE_ALIASES)}. Rename or remove those turns before preprocessing."
        )
    already_canonical = (column == "messages" and set(dataset.features[column].feature) == {"role", "content"}
                         and roles <= CANONICAL_ROLES)
    if already_canonical:
        # Keep the memory-mapped column as it is instead of copying a possibly multi-gigabyte dataset.
        return dataset.select_columns(["messages"])
    return dataset.map(
        _to_messages_batch, batched=True, input_columns=[column], remove_columns=dataset.column_names,
        features=MESSAGES_FEATURES, fn_kwargs={"role_key": role_key, "content_key": content_key},
        num_proc=map_num_proc(num_proc, len(dataset)), desc="Normalising conversations",
    )


def map_num_proc(num_proc: int, conversations: int) -> int | None:
    """datasets' map `num_proc` for a map over `conversations` conversations: `num_proc` workers when it is set
    (>= 1); when it is 0 (auto), the CPUs this job may use, up to MAX_AUTO_PROCESSES, or none for fewer than
    PARALLEL_MIN_CONVERSATIONS conversations. None (no workers) instead of 1: datasets starts a pool even for one."""
    if num_proc < 0:
        raise ValueError(f"num_proc = {num_proc} must be >= 0 (0: decide from the job's CPUs)")
    if num_proc == 0:
        num_proc = 1 if conversations < PARALLEL_MIN_CONVERSATIONS else min(_usable_cpus(), MAX_AUTO_PROCESSES)
    return num_proc if num_proc > 1 else None


def _usable_cpus() -> int:
    """The CPUs this process may run on: a SLURM job's or container's share, not the whole machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # macOS has no affinity mask


def _load_raw(source: str, split: str) -> datasets.Dataset:
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path, split, source)
    if path.suffix in LOCAL_FILE_BUILDERS:
        if not path.is_file():
            raise DataError(f"{source}: no such file. Check the --dataset path.")
        # `datasets` fails on a file without records with errors that do not say so (StopIteration, "corresponds
        # to no data").
        if _holds_no_records(path):
            raise DataError(_no_conversations(source))
        try:
            return datasets.load_dataset(LOCAL_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
        except (DatasetGenerationError, ValueError) as error:  # pyarrow's parse errors are ValueErrors
            bad = _first_bad_json_line(path) if path.suffix in (".json", ".jsonl") else None
            if bad is None:
                raise
            line, reason = bad
            raise DataError(f"{source}: invalid JSON at line {line} ({reason}). Fix or remove that line: each record "
                            "must be a JSON object (one per line in a .jsonl file).") from error
    if looks_like_local_path(source):
        raise DataError(f"{source}: no such file or folder. Check the --dataset path.")
    return datasets.load_dataset(source, split=split)


def _holds_no_records(path: Path) -> bool:
    """Whether a .json/.jsonl file is blank or an empty JSON list, or a .parquet file has no rows (reading only the
    start of a JSON file, or a parquet file's footer)."""
    if path.suffix == ".parquet":
        return pq.read_metadata(path).num_rows == 0
    start = ""
    with open(path, encoding="utf-8", errors="replace") as f:
        while len(start) < 2 and (chunk := f.read(1 << 16)):
            start += "".join(chunk.split())[:2]
    return start[:2] in ("", "[]")


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """The number of the first line of a JSON file that does not parse, and why: the first line of a JSON Lines file
    that is not one JSON object, or the line of a JSON array file's first syntax error; None when it parses (it is
    read only when `datasets` failed to, so a large file costs nothing here otherwise)."""
    data = path.read_bytes()
    if data.lstrip().startswith(b"["):  # one JSON document, an array of records
        try:
            json.loads(data)
        except UnicodeDecodeError as error:
            return data[:error.start].count(b"\n") + 1, str(error)
        except json.JSONDecodeError as error:
            return error.lineno, f"{error.msg}: column {error.colno}"
        return None
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except UnicodeDecodeError as error:
            return number, str(error)
        except json.JSONDecodeError as error:
            return number, f"{error.msg}: column {error.colno}"
        if not isinstance(record, dict):
            return number, "a JSON value that is not an object"
    return None


def _saved_without_rows(path: Path) -> bool:
    """Whether a `save_to_disk` Dataset folder holds no data file (`datasets` fails to load one with an IndexError)."""
    state = path / "state.json"
    return state.is_file() and not json.loads(state.read_text()).get("_data_files")


def _no_conversations(source: str) -> str:
    return (f"{source}: holds no conversations (it is empty). Point --dataset at data with at least one "
            f"conversation: records with a 'messages' list of role/content turns (or ShareGPT 'conversations'), "
            f"one JSON object per line in a .jsonl file.")


def _load_folder(path: Path, split: str, source: str) -> datasets.Dataset:
    written_by_save_to_disk = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    if not written_by_save_to_disk:
        # A folder of data files, e.g. a local clone of a hub dataset repository.
        return datasets.load_dataset(str(path), split=split)
    dataset_dict = path / "dataset_dict.json"
    if dataset_dict.is_file():  # one save_to_disk folder per split: load only the one asked for
        splits = json.loads(dataset_dict.read_text())["splits"]
        if split not in splits:
            raise DataError(f"{source}: has no split '{split}'; its splits are {sorted(splits)}. "
                            f"Pass one of them as --split.")
        path = path / split
    if _saved_without_rows(path):
        raise DataError(_no_conversations(source))
    return datasets.load_from_disk(str(path))


def _conversation_column(dataset: datasets.Dataset, source: str) -> str:
    for column in CONVERSATION_COLUMNS:
        if column in dataset.column_names:
            return column
    raise DataError(
        f"{source}: found columns {dataset.column_names} but no 'messages' (role/content turns) or 'conversations' "
        f"(ShareGPT from/value turns) column. Rename the column holding the conversations to one of these."
    )


def _turn_keys(feature, source: str, column: str) -> tuple[str, str]:
    """The (role, content) keys of the turns in `column`, after checking the column is a list of such turns."""
    turn = getattr(feature, "feature", None)
    keys = [pair for pair in TURN_KEYS if isinstance(turn, dict) and set(pair) <= set(turn)]
    if not keys:
        raise DataError(
            f"{source}: field '{column}' must be a list of role/content (or ShareGPT from/value) turns, found "
            f"{feature}. Convert the conversations to that shape."
        )
    role_key, content_key = keys[0]
    content_type = getattr(turn[content_key], "dtype", None)
    if content_type not in ("string", "large_string"):
        raise DataError(
            f"{source}: field '{column}[].{content_key}' must hold text, found {turn[content_key]}. "
            f"Flatten multi-part contents to strings first."
        )
    return role_key, content_key


def _distinct_roles(dataset: datasets.Dataset, column: str, role_key: str) -> set:
    """Every role value used in `column`, read through Arrow so that the contents are never decoded."""
    turns = pc.list_flatten(dataset.with_format("arrow")[column])
    return set(pc.unique(pc.struct_field(turns, role_key)).to_pylist())


def _to_messages_batch(conversations: list, role_key: str, content_key: str) -> dict:
    return {"messages": [
        [{"role": ROLE_ALIASES[turn[role_key]], "content": turn[content_key]} for turn in conversation]
        for conversation in conversations
    ]}


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizing one conversation
# ---------------------------------------------------------------------------------------------------------------------

def tokenize_conversation(messages, tokenizer, max_length: int) -> dict | None:
    """Tokenize a conversation with the chat template; labels are the assistant turns' tokens, -100 elsewhere.

    Each assistant turn's content and its end-of-turn token are supervised; system and user turns, role headers and
    whatever the template adds after the end-of-turn token are not. The conversation is truncated to `max_length`
    tokens. Returns {"input_ids", "labels"}, or None when no supervised token is left. The first non-system turn
    should be a user turn (build_dataset drops the other conversations).
    """
    text = _render(tokenizer, messages)
    spans = _assistant_spans(messages, tokenizer, text)
    # The template already wrote BOS and every other special token, so the tokenizer must not add its own.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                         max_length=max_length)
    input_ids = list(encoding["input_ids"])
    labels = [token if supervised else IGNORE_INDEX
              for token, supervised in zip(input_ids, _supervised_mask(encoding["offset_mapping"], spans), strict=True)]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def _render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def _assistant_spans(messages, tokenizer, text: str) -> list[tuple[int, int]]:
    """Character spans of `text` (the full render) holding each assistant turn up to its end-of-turn token.

    A turn starts where the render of the conversation before it, plus the generation prompt, ends, and it ends where
    the render of the conversation through it ends. This needs no generation markers in the template, but it does
    need every partial render to be a prefix of the full one.
    """
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], add_generation_prompt=True)
        through = _render(tokenizer, messages[:index + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError(
                f"the chat template of tokenizer '{tokenizer.name_or_path}' is not prefix-consistent: rendering the "
                f"conversation up to turn {index} does not give a prefix of the full render, so assistant turns "
                f"cannot be located. Use a tokenizer whose template renders earlier turns the same way whatever "
                f"follows them."
            )
        start, end = len(before), len(through)
        spans.append((start, _end_after_last_end_of_turn(text, start, end, tokenizer.eos_token)))
    return spans


def _end_after_last_end_of_turn(text: str, start: int, end: int, end_of_turn: str | None) -> int:
    """Move `end` back to just after the last end-of-turn token in text[start:end], if there is one.

    Templates follow the end-of-turn token with separators such as "\n"; they belong to the scaffolding and
    supervising them would teach the model to emit text after it has finished its turn.
    """
    if not end_of_turn:
        return end
    position = text.rfind(end_of_turn, start, end)
    return end if position == -1 else position + len(end_of_turn)


def _supervised_mask(offsets, spans: list[tuple[int, int]]) -> list[bool]:
    """For each token, whether its first character lies in one of the (sorted, disjoint) spans."""
    mask = []
    span_index = 0
    for token_start, _ in offsets:
        while span_index < len(spans) and spans[span_index][1] <= token_start:
            span_index += 1
        mask.append(span_index < len(spans) and spans[span_index][0] <= token_start)
    return mask


def _tokenize_batch(messages_batch: list, tokenizer, max_length: int) -> dict:
    """datasets.map helper: tokenize a batch, leaving out conversations without a supervised token."""
    examples = [tokenize_conversation(messages, tokenizer, max_length) for messages in messages_batch]
    kept = [example for example in examples if example is not None]
    return {"input_ids": [example["input_ids"] for example in kept], "labels": [example["labels"] for example in kept]}


# ---------------------------------------------------------------------------------------------------------------------
# Building, saving and reusing a dataset
# ---------------------------------------------------------------------------------------------------------------------

def build_dataset(source, tokenizer, *, max_length: int, test_size: int | float, seed: int,
                  max_examples: int | None = None, split: str = "train", num_proc: int = 0,
                  test_seed: int | None = None) -> tuple[datasets.DatasetDict, dict]:
    """Load, filter, sample, tokenize and split `source`; returns the {"train", "test"} DatasetDict and its metadata.
    `num_proc` processes tokenize (see map_num_proc); the result is the same for any number.

    With a `test_seed`, the test split is drawn first, by test_seed alone (_fixed_test_split), and `seed` samples
    the training split from the rest: runs of other seeds and other max_examples are scored on the same examples.
    Without one, `seed` samples max_examples conversations and splits them."""
    conversations = load_conversations(source, split, num_proc)
    loaded = len(conversations)
    user_first = _user_first_indices(conversations)
    conversations = conversations.select(user_first)
    test, drawn = None, 0
    if test_seed is not None:
        test, conversations, drawn = _fixed_test_split(conversations, held_out_count(test_size, max_examples,
                                                                                     len(user_first)),
                                                       test_seed, tokenizer, max_length, source)
    conversations = conversations.shuffle(seed=seed)
    if max_examples is not None:
        # Sample before tokenizing, so that a small run over a large source stays cheap.
        wanted = max_examples - (len(test) if test is not None else 0)
        conversations = conversations.select(range(min(max(wanted, 0), len(conversations))))
    tokenized = conversations.map(
        _tokenize_batch, batched=True, input_columns=["messages"], remove_columns=["messages"],
        features=TOKENIZED_FEATURES, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        num_proc=map_num_proc(num_proc, len(conversations)), desc="Tokenizing",
    )
    if len(tokenized) == 0:
        raise DataError(
            f"{source}: no example is left after filtering ({loaded} loaded, {loaded - len(user_first)} without a "
            f"user turn first, the rest without an assistant token within max_length={max_length}). Raise "
            f"--max_length, or check that the conversations' roles are user/assistant."
        )
    splits = _split(tokenized, test_size, seed, source) if test is None else {"train": tokenized, "test": test}
    dataset = datasets.DatasetDict({name: with_content_fingerprint(part) for name, part in splits.items()})
    sampled = len(conversations) + drawn
    without_assistant = len(conversations) - _count_with_assistant_turn(conversations)  # test draws not counted
    kept = len(dataset["train"]) + len(dataset["test"])
    counts = {
        "loaded": loaded,
        "dropped_not_user_first": loaded - len(user_first),
        "not_sampled": len(user_first) - sampled,
        "dropped_no_supervised_tokens": sampled - kept,
        "dropped_no_assistant_turn": without_assistant,
        "dropped_too_long": sampled - kept - without_assistant,
        "kept": kept,
        "cut_at_max_length": sum(_count_at_length(part, max_length) for part in dataset.values()),
        "train": len(dataset["train"]),
        "test": len(dataset["test"]),
        "supervised_tokens": {name: _count_supervised_tokens(part) for name, part in dataset.items()},
    }
    settings = _settings(source, tokenizer, max_length=max_length, test_size=test_size, seed=seed,
                         max_examples=max_examples, split=split, test_seed=test_seed)
    return dataset, {**settings, "tokenizer": tokenizer.name_or_path, "counts": counts}


def held_out_count(test_size: int | float, max_examples: int | None, available: int) -> int:
    """The test split's size in examples: test_size itself, or that share of the sample."""
    if isinstance(test_size, int):
        return test_size
    return max(1, round(test_size * min(max_examples or available, available)))


def _fixed_test_split(conversations: datasets.Dataset, wanted: int, test_seed: int, tokenizer, max_length: int,
                      source: str) -> tuple[datasets.Dataset, datasets.Dataset, int]:
    """(the test split, the conversations left for training, how many were drawn): conversations in test_seed's
    order are tokenized one by one until `wanted` examples are kept (those without a supervised token within
    max_length are dropped); every conversation after the last one drawn stays available for training."""
    order = np.random.default_rng(test_seed).permutation(len(conversations))
    examples, drawn = [], 0
    for index in order:
        if len(examples) == wanted:
            break
        drawn += 1
        example = tokenize_conversation(conversations[int(index)]["messages"], tokenizer, max_length)
        if example is not None:
            examples.append(example)
    if not examples:
        raise DataError(f"{source}: no example is left after filtering: none of its {len(order)} conversations with a "
                        f"user turn first has an assistant token within max_length={max_length}. Raise "
                        f"--max_length, or check that the conversations' roles are user/assistant.")
    if len(examples) < wanted or drawn == len(order):
        raise DataError(f"{source}: test_size needs {wanted} test examples and leaves no conversation to train on "
                        f"({len(examples)} test examples kept of {len(order)} conversations). Lower --test_size, or "
                        f"raise --max_length.")
    test = datasets.Dataset.from_list(examples, features=TOKENIZED_FEATURES)
    return test, conversations.select(np.sort(order[drawn:])), drawn


def content_fingerprint(table: pa.Table) -> str:
    """A hash of the examples themselves (every token of input_ids and labels, in order), the same however they
    are chunked. `datasets` fingerprints a split by how it was made (the source file's path and time included), so
    the same data prepared again would otherwise orphan the teacher caches keyed by it."""
    digest = hashlib.sha256()
    for name in TOKENIZED_FEATURES:
        column = table.column(name)
        digest.update(name.encode())
        for part in (pc.list_value_length(column), pc.list_flatten(column)):  # lengths, then tokens
            for chunk in part.chunks:
                digest.update(np.asarray(chunk, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def with_content_fingerprint(dataset: datasets.Dataset) -> datasets.Dataset:
    """`dataset` (its rows in order, made contiguous) fingerprinted by its content (content_fingerprint)."""
    contiguous = dataset.flatten_indices() if dataset._indices is not None else dataset
    return datasets.Dataset(contiguous.data, info=contiguous.info, split=contiguous.split,
                            fingerprint=content_fingerprint(contiguous.data.table))


def _user_first_indices(conversations: datasets.Dataset) -> list[int]:
    """Indices of the conversations whose first non-system turn is a user turn (reads only the roles)."""
    return [position for position, roles in enumerate(_roles(conversations))
            if next((role for role in roles if role != "system"), None) == "user"]


def _count_with_assistant_turn(conversations: datasets.Dataset) -> int:
    return sum("assistant" in roles for roles in _roles(conversations))


def _roles(conversations: datasets.Dataset):
    """Each conversation's list of roles, in order, read without decoding the messages' contents."""
    for chunk in conversations.with_format("arrow")["messages"].chunks:
        yield from pa.ListArray.from_arrays(chunk.offsets, pc.struct_field(chunk.values, "role")).to_pylist()


def _count_at_length(tokenized: datasets.Dataset, max_length: int) -> int:
    """Examples of exactly max_length tokens: cut there (or, rarely, exactly that long)."""
    lengths = pc.list_value_length(tokenized.with_format("arrow")["input_ids"])
    return pc.sum(pc.equal(lengths, max_length)).as_py() or 0


def describe_prepared(counts: dict, data: dict) -> str:
    """What preparing the data kept and dropped (describe_counts), and the examples of each split."""
    return describe_counts(counts) + "; examples: " + ", ".join(f"{len(split)} {name}" for name, split in data.items())


def describe_counts(counts: dict) -> str:
    """What preparing the data kept and dropped, by reason, from metadata.json's counts (older folders lack the
    finer counts: they show the reasons they recorded)."""
    dropped = {"not opening with a user turn": counts["dropped_not_user_first"]}
    if "dropped_no_assistant_turn" in counts:
        dropped.update({"without an assistant turn": counts["dropped_no_assistant_turn"],
                        "too long (no assistant token within max_length)": counts["dropped_too_long"]})
    else:
        dropped["without a supervised token"] = counts["dropped_no_supervised_tokens"]
    kept = counts.get("kept", counts["train"] + counts["test"])
    text = (f"{counts['loaded']} conversations loaded, {kept} kept"
            + (f" ({counts['not_sampled']} not sampled: max_examples)" if counts.get("not_sampled") else "")
            + "; dropped: " + ", ".join(f"{number} {reason}" for reason, number in dropped.items()))
    if "cut_at_max_length" in counts:
        text += f"; {counts['cut_at_max_length']} kept examples cut at max_length"
    return text


def _split(tokenized: datasets.Dataset, test_size: int | float, seed: int, source: str) -> datasets.DatasetDict:
    if isinstance(test_size, int) and not 0 < test_size < len(tokenized):
        raise DataError(
            f"{source}: test_size={test_size} needs more examples than the {len(tokenized)} left after filtering. "
            f"Lower --test_size, or raise --max_examples."
        )
    return tokenized.train_test_split(test_size=test_size, seed=seed)


def token_count(dataset: datasets.Dataset | None) -> TokenCount:
    """The tokens of every example of `dataset`, the supervised ones among them, and the sum of the examples'
    squared lengths (the attention term); none for no dataset (a split the run does not hold)."""
    if dataset is None:
        return TokenCount()
    lengths = pc.list_value_length(dataset.with_format("arrow")["input_ids"])
    squared = pc.sum(pc.multiply(pc.cast(lengths, "int64"), pc.cast(lengths, "int64"))).as_py() or 0
    return TokenCount(pc.sum(lengths).as_py() or 0, _count_supervised_tokens(dataset), squared)


def _count_supervised_tokens(dataset: datasets.Dataset) -> int:
    total = 0
    for batch in dataset.with_format("arrow").iter(batch_size=10_000):
        labels = pc.list_flatten(batch.column("labels"))
        total += pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0
    return total


def _settings(source, tokenizer, *, max_length, test_size, seed, max_examples, split, test_seed=None) -> dict:
    """The metadata entries listed in REUSE_KEYS."""
    return {
        "format_version": FORMAT_VERSION,
        "source": str(source),
        "split": split,
        "chat_template_sha256": _sha256(tokenizer.chat_template),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "max_length": max_length,
        "test_size": test_size,
        "seed": seed,
        "test_seed": test_seed,
        "max_examples": max_examples,
    }


def _sha256(value) -> str:
    # Chat templates are a string, or a dict of named templates for some tokenizers.
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """A hash of the vocabulary and tokenization rules, plus the special tokens the labelling relies on."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Truncation and padding are call-time state that tokenizing itself changes, not tokenization rules.
        rules = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        vocabulary = json.dumps(rules, sort_keys=True)
    else:
        vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha256({"vocabulary": vocabulary, "special_tokens": tokenizer.special_tokens_map})


def save_dataset(dataset: datasets.DatasetDict, metadata: dict, output_dir) -> None:
    """Write `dataset` with save_to_disk and `metadata` as metadata.json into `output_dir`."""
    output_dir = Path(output_dir)
    dataset.save_to_disk(str(output_dir))
    # Written last: a folder with a metadata file has all of its data.
    (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def load_dataset_dir(output_dir) -> tuple[datasets.DatasetDict, dict]:
    """Read back what save_dataset wrote."""
    output_dir = Path(output_dir)
    metadata = _read_metadata(output_dir)
    if metadata is None:
        raise DataError(f"{output_dir}: no {METADATA_FILE}, so it is not a prepared dataset. Run preprocess_dataset.py "
                        f"with --output_dir {output_dir} first.")
    return datasets.load_from_disk(str(output_dir)), metadata


def prepared_counts(output_dir) -> dict:
    """The counts (loaded, kept, dropped by reason, per split) of the prepared dataset in `output_dir`."""
    return _read_metadata(Path(output_dir))["counts"]


def _read_metadata(output_dir: Path) -> dict | None:
    path = output_dir / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def prepare_dataset(source, tokenizer, output_dir, *, max_length: int, test_size: int | float, seed: int,
                    max_examples: int | None = None, split: str = "train", num_proc: int = 0,
                    test_seed: int | None = None) -> datasets.DatasetDict:
    """Return the prepared dataset in `output_dir`, building and saving it (tokenized by `num_proc` processes)
    unless a matching one is already there."""
    output_dir = Path(output_dir)
    remove_dead_staging(output_dir)
    wanted = _settings(source, tokenizer, max_length=max_length, test_size=test_size, seed=seed,
                       max_examples=max_examples, split=split, test_seed=test_seed)
    existing = _read_metadata(output_dir)
    if existing is not None and {key: existing.get(key) for key in REUSE_KEYS} == wanted:
        logger.info("Reusing the prepared dataset in %s", output_dir)
        return datasets.load_from_disk(str(output_dir))
    if existing is None and output_dir.exists() and any(output_dir.iterdir()):
        raise DataError(f"{output_dir}: exists and is not a prepared dataset; refusing to replace it. Choose another "
                        f"--output_dir.")
    if existing is not None:
        changed = [key for key in REUSE_KEYS if existing.get(key) != wanted[key]]
        logger.info("Rebuilding the prepared dataset in %s: %s changed", output_dir, ", ".join(changed))
    dataset, metadata = build_dataset(source, tokenizer, max_length=max_length, test_size=test_size, seed=seed,
                                      max_examples=max_examples, split=split, num_proc=num_proc, test_seed=test_seed)
    _save_atomically(dataset, metadata, output_dir)
    return datasets.load_from_disk(str(output_dir))


def prepare_for_run(config, tokenizer) -> tuple[dict, dict]:
    """A run's splits of its config's data source, prepared once in its run_data_folder, and the counts of what
    preparing them kept and dropped (see describe_counts): train, test, and the slices held out of train (see
    held_out_slices)."""
    folder = run_data_folder(config, tokenizer)
    data = prepare_dataset(embedded.resolve_dataset(config.dataset, config.cache_dir), tokenizer, folder,
                           max_length=config.max_length, test_size=config.test_size, seed=config.data_seed,
                           max_examples=config.max_examples, split=config.dataset_split, num_proc=config.num_proc,
                           test_seed=config.test_seed)
    return held_out_slices(data, config), prepared_counts(folder)


def run_data_folder(config, tokenizer) -> Path:
    """The folder of cache_dir/datasets that holds a run's prepared data: one per (source, tokenizer, settings).
    data_seed picks the sample and the split, so runs that differ only in their seed share it (and the teacher
    cache built on it); num_proc changes only how fast it is made, so it is not part of the name."""
    source = embedded.resolve_dataset(config.dataset, config.cache_dir)
    key = json.dumps([source, tokenizer.name_or_path, config.max_length, config.test_size, config.data_seed,
                      config.test_seed, config.max_examples, config.dataset_split])
    name = Path(source.rstrip("/")).name.replace(".", "_") + "-" + hashlib.sha256(key.encode()).hexdigest()[:10]
    return Path(config.cache_dir) / "datasets" / name


def held_out_slices(data, config) -> dict:
    """The data with slices of the training split held out (never trained on), taken from its end: weight_fit, the
    last `weight_fit_examples` (combine=weighted: new members' weights are fitted on it), then early_stop, the
    `early_stopping_examples` before them (eval_steps > 0: the held-out CE early stopping watches)."""
    wanted = {"weight_fit": config.weight_fit_examples if config.combine == "weighted" else 0,
              "early_stop": config.early_stopping_examples if config.eval_steps > 0 else 0}
    train, slices = data["train"], {}
    for name, size in wanted.items():
        if not size:
            continue
        if len(train) <= size:
            raise DataError(f"{name} holds out {size} training examples, but the training split has {len(train)} "
                            f"left: lower {'weight_fit_examples' if name == 'weight_fit' else 'early_stopping_examples'}"
                            " or raise max_examples")
        slices[name] = train.select(range(len(train) - size, len(train)))
        train = train.select(range(len(train) - size))
    return {**data, "train": train, **slices}


def member_split(train: datasets.Dataset, member_data: str, round_index: int, rounds: int,
                 data_seed: int) -> datasets.Dataset:
    """Round `round_index`'s training data (see describe_member_data): `all` of `train`; its `shard` (the rows,
    shuffled once by data_seed, cut into `rounds` disjoint parts); or a `bootstrap` sample (as many rows, drawn with
    replacement by data_seed + round_index). Members that start from one model then still differ by their data.
    Rows keep their columns (a teacher cache's example_id among them)."""
    if member_data == "shard":
        return train.select(np.array_split(np.random.default_rng(data_seed).permutation(len(train)),
                                           rounds)[round_index])
    if member_data == "bootstrap":
        return train.select(np.random.default_rng(data_seed + round_index).integers(0, len(train), len(train)))
    return train


def describe_member_data(member_data: str, round_index: int, rounds: int, data_seed: int) -> str:
    """Which data member_split gives round `round_index`, in words (the manifest records it)."""
    return {"all": "all", "shard": f"shard {round_index} of {rounds} (order seed {data_seed})",
            "bootstrap": f"bootstrap sample (seed {data_seed + round_index})"}[member_data]


def _save_atomically(dataset: datasets.DatasetDict, metadata: dict, output_dir: Path) -> None:
    """Save into a staging folder beside it, then rename that: a killed run leaves no complete-looking folder, and
    the next preparation removes what it left (files.remove_dead_staging)."""

    def is_same_build(folder: Path) -> bool:
        existing = _read_metadata(folder)
        return existing is not None and all(existing.get(key) == metadata.get(key) for key in REUSE_KEYS)

    with staging(output_dir, folder=True) as staging_dir:
        save_dataset(dataset, metadata, staging_dir)
        publish_folder(staging_dir, output_dir, is_same_build)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------

def _count_or_fraction(value: str) -> int | float:
    try:
        return int(value)
    except ValueError:
        return float(value)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="hub dataset name, or a .json/.jsonl/.parquet file or folder")
    parser.add_argument("--tokenizer", required=True, help="tokenizer name or path (its chat template is used)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_length", type=int, default=1024, help="tokens per example, longer ones are truncated")
    parser.add_argument("--test_size", type=_count_or_fraction, default=2000, help="test examples: a count or fraction")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling and of the train/test split")
    parser.add_argument("--max_examples", type=int, default=None, help="sample this many conversations first")
    parser.add_argument("--split", default="train", help="split of the source to read")
    parser.add_argument("--num_proc", type=int, default=0, help="processes that tokenize (0: the job's CPUs, up to "
                        f"{MAX_AUTO_PROCESSES}; one below {PARALLEL_MIN_CONVERSATIONS} conversations)")
    args = parser.parse_args(argv)
    if args.num_proc < 0:
        parser.error(f"--num_proc {args.num_proc}: must be >= 0 (0: decide from the job's CPUs)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    prepare_dataset(args.dataset, tokenizer, args.output_dir, max_length=args.max_length, test_size=args.test_size,
                    seed=args.seed, max_examples=args.max_examples, split=args.split, num_proc=args.num_proc)
    counts = prepared_counts(args.output_dir)
    print(f"{args.dataset} -> {args.output_dir}")
    print(describe_counts(counts))
    for split_name in ("train", "test"):
        supervised = counts["supervised_tokens"][split_name]
        print(f"{split_name}: {counts[split_name]} examples, {supervised} supervised tokens")


def prepare_only(config) -> None:
    """main.py --prepare_only: the run's data prepared into the folder a run reads it from, by this process alone
    and with the teacher's tokenizer only (no weights, no GPU), so that a CPU job can do it before the GPU job."""
    tokenizer = utils.load_tokenizer(embedded.resolve_teacher(config.teacher, config.cache_dir),
                                     config.trust_remote_code)
    _, counts = prepare_for_run(config, tokenizer)
    print(f"prepared data: {run_data_folder(config, tokenizer)}")
    print(describe_counts(counts))


if __name__ == "__main__":
    main()
