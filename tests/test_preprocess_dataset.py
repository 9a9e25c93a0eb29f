"""Tests of preprocess_dataset: assistant-only labels for three chat template families, loading, splitting, caching."""

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
from conftest import DATA_DIR, build_tokenizer

from config import build_config
import preprocess_dataset
from preprocess_dataset import (DataError, build_dataset, describe_counts, load_conversations, load_dataset_dir, main,
                                prepare_dataset, save_dataset, tokenize_conversation)
from slm_ensembles import processes

TEMPLATES = ("chatml", "llama3", "tulu")
LONG_ENOUGH = 10_000  # a max_length that truncates nothing in the fixture


@pytest.fixture(scope="module", params=TEMPLATES)
def any_tokenizer(request):
    return build_tokenizer(request.param)


@pytest.fixture
def chats_file(tmp_path, chats):
    return write_jsonl(tmp_path / "chats.jsonl", chats)


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def supervised_runs(example) -> list[list[int]]:
    """The labels' contiguous runs of supervised tokens, checking each supervised label is its input token."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label == -100:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(label)
    return runs + [current] if current else runs


def first_supervised_position(example) -> int:
    return next(i for i, label in enumerate(example["labels"]) if label != -100)


def assistant_contents(messages) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


# ---------------------------------------------------------------------------------------------------------------------
# tokenize_conversation
# ---------------------------------------------------------------------------------------------------------------------

def test_labels_are_exactly_each_assistant_turn_and_its_end_of_turn(any_tokenizer, chats):
    for chat in chats:
        messages = chat["messages"]
        example = tokenize_conversation(messages, any_tokenizer, LONG_ENOUGH)

        decoded_runs = [any_tokenizer.decode(run) for run in supervised_runs(example)]
        assert decoded_runs == [content + any_tokenizer.eos_token for content in assistant_contents(messages)]
        # The input is the template's text, tokenized without extra special tokens.
        assert any_tokenizer.decode(example["input_ids"]) == any_tokenizer.apply_chat_template(messages, tokenize=False)


def test_every_assistant_turn_of_a_three_turn_chat_is_supervised_and_nothing_else(tokenizer, chats):
    messages = chats[2]["messages"]  # chat-002: user, assistant, user, assistant, user, assistant
    example = tokenize_conversation(messages, tokenizer, LONG_ENOUGH)

    assert [tokenizer.decode(run) for run in supervised_runs(example)] == [
        "Put the egg in boiling water for about nine minutes, then cool it in cold water.<|im_end|>",
        "Yes, I am fairly sure. put the egg in boiling water for about nine minutes, then cool it in cold water."
        "<|im_end|>",
        "Of course. In short, put the egg in boiling water for about nine minutes, then cool it in cold water."
        "<|im_end|>",
    ]
    pairs = zip(example["input_ids"], example["labels"], strict=True)
    unsupervised = [token for token, label in pairs if label == -100]
    assert tokenizer.decode(unsupervised) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nCould you explain how to boil an egg?<|im_end|>\n<|im_start|>assistant\n\n"
        "<|im_start|>user\nAre you sure?<|im_end|>\n<|im_start|>assistant\n\n"
        "<|im_start|>user\nThanks! One more detail please.<|im_end|>\n<|im_start|>assistant\n\n"
    )


@pytest.mark.parametrize("template", ["chatml", "tulu"])
def test_newline_after_the_end_of_turn_token_is_not_supervised(template, chats):
    tokenizer = build_tokenizer(template)
    example = tokenize_conversation(chats[1]["messages"], tokenizer, LONG_ENOUGH)
    eos_positions = [i for i, label in enumerate(example["labels"]) if label == tokenizer.eos_token_id]

    assert len(eos_positions) == 2
    for position in eos_positions:
        assert tokenizer.decode(example["input_ids"][position + 1]) == "\n"
        assert example["labels"][position + 1] == -100


def test_system_turn_is_not_supervised(any_tokenizer, chats):
    messages = chats[3]["messages"]  # chat-003 starts with a system turn
    assert messages[0]["role"] == "system"
    example = tokenize_conversation(messages, any_tokenizer, LONG_ENOUGH)

    supervised_text = "".join(any_tokenizer.decode(run) for run in supervised_runs(example))
    assert supervised_text == "12 plus 30 is 42." + any_tokenizer.eos_token


def test_truncation_keeps_a_prefix_of_the_full_example(any_tokenizer, chats):
    messages = chats[1]["messages"]
    full = tokenize_conversation(messages, any_tokenizer, LONG_ENOUGH)
    cut_at = len(full["input_ids"]) - 5

    truncated = tokenize_conversation(messages, any_tokenizer, cut_at)

    assert len(truncated["input_ids"]) == cut_at
    assert truncated["input_ids"] == full["input_ids"][:cut_at]
    assert truncated["labels"] == full["labels"][:cut_at]


def test_example_with_only_the_prompt_left_after_truncation_is_none(any_tokenizer, chats):
    messages = chats[0]["messages"]
    prompt_length = first_supervised_position(tokenize_conversation(messages, any_tokenizer, LONG_ENOUGH))

    assert tokenize_conversation(messages, any_tokenizer, prompt_length) is None
    one_more = tokenize_conversation(messages, any_tokenizer, prompt_length + 1)
    assert sum(label != -100 for label in one_more["labels"]) == 1


def test_conversation_without_assistant_turn_is_none(tokenizer):
    assert tokenize_conversation([{"role": "user", "content": "Hello?"}], tokenizer, LONG_ENOUGH) is None


def test_template_that_rewrites_earlier_turns_is_rejected(chats):
    # Like reasoning templates that drop earlier turns' thoughts: partial renders are not prefixes of the full one.
    tokenizer = copy.deepcopy(build_tokenizer("chatml"))
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}(earlier answer){% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(DataError, match="not prefix-consistent"):
        tokenize_conversation(chats[1]["messages"], tokenizer, LONG_ENOUGH)


# ---------------------------------------------------------------------------------------------------------------------
# load_conversations
# ---------------------------------------------------------------------------------------------------------------------

def test_sharegpt_conversations_match_the_messages_version(chats):
    sharegpt = load_conversations(str(DATA_DIR / "sharegpt.json"))
    tokenizer = build_tokenizer("llama3")

    assert sharegpt.column_names == ["messages"]
    assert sharegpt["messages"] == [chat["messages"] for chat in chats[:12]]
    for converted, chat in zip(sharegpt["messages"], chats[:12], strict=True):
        assert (tokenize_conversation(converted, tokenizer, LONG_ENOUGH)
                == tokenize_conversation(chat["messages"], tokenizer, LONG_ENOUGH))


def save_json(path, records):
    path.write_text(json.dumps(records))
    return str(path)


def save_parquet(path, records):
    datasets.Dataset.from_list(records).to_parquet(str(path))
    return str(path)


def save_dataset_folder(path, records):
    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return str(path)


def save_data_files_folder(path, records):
    """A folder of data files, like a local clone of a hub dataset repository."""
    path.mkdir()
    write_jsonl(path / "train.jsonl", records)
    return str(path)


@pytest.mark.parametrize("writer, name", [(save_json, "chats.json"), (write_jsonl, "chats.jsonl"),
                                          (save_parquet, "chats.parquet"), (save_dataset_folder, "saved"),
                                          (save_data_files_folder, "repository")])
def test_loads_every_local_format(writer, name, tmp_path, chats):
    source = writer(tmp_path / name, chats[:10])

    loaded = load_conversations(source)

    assert loaded.column_names == ["messages"]  # the "id" column is dropped
    assert loaded["messages"] == [chat["messages"] for chat in chats[:10]]


def test_loads_the_requested_split_of_a_saved_dataset_dict(tmp_path, chats):
    splits = datasets.DatasetDict(train=datasets.Dataset.from_list(chats[:5]),
                                  validation=datasets.Dataset.from_list(chats[5:8]))
    splits.save_to_disk(str(tmp_path / "splits"))

    loaded = load_conversations(str(tmp_path / "splits"), split="validation")

    assert loaded["messages"] == [chat["messages"] for chat in chats[5:8]]
    with pytest.raises(DataError, match=r"no split 'dev'.*\['train', 'validation'\]"):
        load_conversations(str(tmp_path / "splits"), split="dev")


def test_hub_names_go_to_load_dataset_with_the_split(monkeypatch, chats):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(chats[:3])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_conversations("allenai/tulu-3-sft-mixture", split="test")

    assert calls == [("allenai/tulu-3-sft-mixture", "test")]
    assert len(loaded) == 3


def test_aliased_roles_in_messages_are_renamed(tmp_path):
    records = [{"messages": [{"role": "human", "content": "Hi"}, {"role": "gpt", "content": "Hello"}]}]

    loaded = load_conversations(write_jsonl(tmp_path / "aliases.jsonl", records))

    assert loaded["messages"] == [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.parquet", "missing_folder"])
def test_missing_local_path_is_named(name, tmp_path):
    missing = str(tmp_path / name)
    with pytest.raises(DataError, match="no such file") as error:
        load_conversations(missing)
    assert missing in str(error.value)


def save_text(path, text):
    path.write_text(text)
    return str(path)


def rowless_messages() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"messages": []}, features=preprocess_dataset.MESSAGES_FEATURES)


def save_rowless_parquet(path):
    rowless_messages().to_parquet(str(path))
    return str(path)


def save_rowless_folder(path):
    rowless_messages().save_to_disk(str(path))
    return str(path)


def save_dict_with_an_empty_train_split(path):
    datasets.DatasetDict({"train": rowless_messages(), "test": datasets.Dataset.from_dict(
        {"messages": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]},
        features=preprocess_dataset.MESSAGES_FEATURES)}).save_to_disk(str(path))
    return str(path)


def rowless_hub_dataset(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: rowless_messages())
    return "someone/empty-chats"


EMPTY_SOURCES = {  # each makes a source in tmp_path (or a hub name, with monkeypatch) and returns its name
    "an empty .jsonl file": lambda tmp_path, monkeypatch: save_text(tmp_path / "empty.jsonl", ""),
    "a .jsonl file of blank lines": lambda tmp_path, monkeypatch: save_text(tmp_path / "blank.jsonl", "\n  \n\n"),
    "an empty list in a .json file": lambda tmp_path, monkeypatch: save_text(tmp_path / "empty.json", "[ \n]\n"),
    "a .parquet file without rows": lambda tmp_path, monkeypatch: save_rowless_parquet(tmp_path / "empty.parquet"),
    "a hub dataset without rows": lambda tmp_path, monkeypatch: rowless_hub_dataset(monkeypatch),
    "a save_to_disk folder without rows": lambda tmp_path, monkeypatch: save_rowless_folder(tmp_path / "saved"),
    "an empty split of a saved DatasetDict": lambda tmp_path, monkeypatch: save_dict_with_an_empty_train_split(
        tmp_path / "saved_dict"),
}


@pytest.mark.parametrize("case", list(EMPTY_SOURCES))
def test_a_source_without_conversations_is_named_with_what_to_do(case, tmp_path, monkeypatch):
    source = EMPTY_SOURCES[case](tmp_path, monkeypatch)
    with pytest.raises(DataError) as error:
        load_conversations(source)
    assert str(error.value).startswith(f"{source}: holds no conversations")
    assert "Point --dataset at data with at least one conversation" in str(error.value)


def test_a_json_list_with_records_is_not_taken_for_an_empty_one(tmp_path, chats):
    source = save_text(tmp_path / "spaced.json", "\n [\n" + json.dumps(chats[0])[:-1] + "}]\n")
    assert load_conversations(source)["messages"] == [chats[0]["messages"]]


def test_no_conversation_column_lists_the_columns_found(tmp_path):
    source = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "response": "Hello"}])
    with pytest.raises(DataError) as error:
        load_conversations(source)
    message = str(error.value)
    assert source in message
    assert "['prompt', 'response']" in message
    assert "'messages'" in message and "'conversations'" in message


def test_unknown_sharegpt_role_names_the_value_and_field(tmp_path):
    records = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep"}]}]
    source = save_json(tmp_path / "robots.json", records)
    with pytest.raises(DataError) as error:
        load_conversations(source)
    message = str(error.value)
    assert source in message
    assert "'conversations[].from'" in message
    assert "['robot']" in message
    assert "Rename or remove those turns" in message


def test_unknown_messages_role_names_the_value_and_field(tmp_path):
    records = [{"messages": [{"role": "user", "content": "Weather?"}, {"role": "tool", "content": "{}"},
                             {"role": "assistant", "content": "Sunny."}]}]
    with pytest.raises(DataError, match=r"'messages\[\]\.role' has unknown role value\(s\) \['tool'\]"):
        load_conversations(write_jsonl(tmp_path / "tools.jsonl", records))


# ---------------------------------------------------------------------------------------------------------------------
# build_dataset
# ---------------------------------------------------------------------------------------------------------------------

def test_build_counts_drops_and_supervised_tokens(tmp_path, tokenizer, chats):
    not_user_first = [
        {"messages": [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Hello"},
                      {"role": "assistant", "content": "How can I help?"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Ready."}]},
    ]
    no_assistant = [{"messages": [{"role": "user", "content": "Anyone there?"}]}]
    source = write_jsonl(tmp_path / "mixed.jsonl", chats + not_user_first + no_assistant)

    dataset, metadata = build_dataset(source, tokenizer, max_length=LONG_ENOUGH, test_size=5, seed=0)

    assert metadata["counts"] == {
        "loaded": 51, "dropped_not_user_first": 2, "not_sampled": 0, "dropped_no_supervised_tokens": 1,
        "dropped_no_assistant_turn": 1, "dropped_too_long": 0, "kept": 48, "cut_at_max_length": 0,
        "train": 43, "test": 5,
        "supervised_tokens": {name: sum(label != -100 for labels in dataset[name]["labels"] for label in labels)
                              for name in ("train", "test")},
    }
    assert metadata["counts"]["supervised_tokens"]["train"] > 0
    assert dataset["train"].column_names == ["input_ids", "labels"]
    assert metadata["source"] == source
    assert metadata["split"] == "train"
    assert metadata["max_length"] == LONG_ENOUGH
    assert metadata["seed"] == 0
    assert metadata["test_size"] == 5
    assert metadata["max_examples"] is None
    assert metadata["chat_template_sha256"] == hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()


def test_examples_whose_answer_is_cut_off_are_dropped(chats_file, tokenizer, chats):
    prompt_lengths = [first_supervised_position(tokenize_conversation(chat["messages"], tokenizer, LONG_ENOUGH))
                      for chat in chats]
    max_length = sorted(prompt_lengths)[len(prompt_lengths) // 2]
    expected_dropped = sum(length >= max_length for length in prompt_lengths)
    assert 0 < expected_dropped < len(chats)

    dataset, metadata = build_dataset(chats_file, tokenizer, max_length=max_length, test_size=2, seed=0)

    assert metadata["counts"]["dropped_no_supervised_tokens"] == expected_dropped
    assert metadata["counts"]["dropped_too_long"] == expected_dropped
    assert metadata["counts"]["dropped_no_assistant_turn"] == 0
    assert metadata["counts"]["train"] + metadata["counts"]["test"] == len(chats) - expected_dropped
    cut = sum(len(ids) == max_length for part in dataset.values() for ids in part["input_ids"])
    assert metadata["counts"]["cut_at_max_length"] == cut > 0
    assert describe_counts(metadata["counts"]) == (
        f"{len(chats)} conversations loaded, {len(chats) - expected_dropped} kept; dropped: 0 not opening with a "
        f"user turn, 0 without an assistant turn, {expected_dropped} too long (no assistant token within "
        f"max_length); {cut} kept examples cut at max_length")
    for part in dataset.values():
        assert max(len(ids) for ids in part["input_ids"]) == max_length
        assert all(any(label != -100 for label in labels) for labels in part["labels"])


def test_nothing_left_after_filtering_says_what_to_do(chats_file, tokenizer):
    with pytest.raises(DataError) as error:
        build_dataset(chats_file, tokenizer, max_length=5, test_size=2, seed=0)
    message = str(error.value)
    assert chats_file in message
    assert "no example is left" in message
    assert "48 loaded" in message
    assert "Raise --max_length" in message


def test_split_is_deterministic_by_seed(chats_file, tokenizer):
    first, _ = build_dataset(chats_file, tokenizer, max_length=LONG_ENOUGH, test_size=6, seed=0)
    again, _ = build_dataset(chats_file, tokenizer, max_length=LONG_ENOUGH, test_size=6, seed=0)
    other, _ = build_dataset(chats_file, tokenizer, max_length=LONG_ENOUGH, test_size=6, seed=1)

    assert first["test"]["input_ids"] == again["test"]["input_ids"]
    assert first["train"]["input_ids"] == again["train"]["input_ids"]
    assert first["test"]["input_ids"] != other["test"]["input_ids"]
    assert len(first["train"]) + len(first["test"]) == 48
    assert not {tuple(ids) for ids in first["test"]["input_ids"]} & {tuple(ids) for ids in first["train"]["input_ids"]}


def test_a_test_seed_fixes_the_test_split_across_data_seeds_and_sample_sizes(chats_file, tokenizer):
    """Paired comparisons: runs of other data seeds and transfer-set sizes are scored on the same test examples,
    while their training samples differ and never hold a test example."""
    def build(seed, max_examples):
        return build_dataset(chats_file, tokenizer, max_length=LONG_ENOUGH, test_size=6, seed=seed,
                             max_examples=max_examples, test_seed=7)[0]

    runs = [build(0, 20), build(1, 20), build(0, 40)]
    tests = [tuple(map(tuple, run["test"]["input_ids"])) for run in runs]
    trains = [set(map(tuple, run["train"]["input_ids"])) for run in runs]
    assert tests[0] == tests[1] == tests[2] and len(tests[0]) == 6
    assert trains[0] != trains[1] and len(trains[0]) == 14 and len(trains[2]) == 34
    assert all(not set(tests[0]) & train for train in trains)
    other_test = build_dataset(chats_file, tokenizer, max_length=LONG_ENOUGH, test_size=6, seed=0, max_examples=20,
                               test_seed=8)[0]
    assert tuple(map(tuple, other_test["test"]["input_ids"])) != tests[0]


def test_a_test_split_that_leaves_nothing_to_train_on_is_refused(chats_file, tokenizer):
    with pytest.raises(preprocess_dataset.DataError, match="Lower --test_size"):
        build_dataset(chats_file, tokenizer, max_length=LONG_ENOUGH, test_size=48, seed=0, test_seed=0)


def test_test_size_as_a_fraction(chats_file, tokenizer):
    dataset, metadata = build_dataset(chats_file, tokenizer, max_length=LONG_ENOUGH, test_size=0.25, seed=0)
    assert (len(dataset["train"]), len(dataset["test"])) == (36, 12)
    assert metadata["test_size"] == 0.25


def test_test_size_larger_than_the_data_is_a_data_error(chats_file, tokenizer):
    with pytest.raises(DataError, match="test_size=100 needs more examples than the 48"):
        build_dataset(chats_file, tokenizer, max_length=LONG_ENOUGH, test_size=100, seed=0)


def test_max_examples_samples_before_tokenizing(chats_file, tokenizer, chats):
    dataset, metadata = build_dataset(chats_file, tokenizer, max_length=LONG_ENOUGH, test_size=2, seed=0,
                                      max_examples=10)
    again, _ = build_dataset(chats_file, tokenizer, max_length=LONG_ENOUGH, test_size=2, seed=0, max_examples=10)

    assert (metadata["counts"]["train"], metadata["counts"]["test"]) == (8, 2)
    assert metadata["counts"]["loaded"] == 48
    assert dataset["train"]["input_ids"] == again["train"]["input_ids"]
    every_example = {tuple(tokenize_conversation(chat["messages"], tokenizer, LONG_ENOUGH)["input_ids"])
                     for chat in chats}
    assert {tuple(ids) for part in dataset.values() for ids in part["input_ids"]} <= every_example


# ---------------------------------------------------------------------------------------------------------------------
# Saving, loading and reusing
# ---------------------------------------------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path, chats_file, tokenizer):
    dataset, metadata = build_dataset(chats_file, tokenizer, max_length=128, test_size=4, seed=0)

    save_dataset(dataset, metadata, tmp_path / "out")
    loaded, loaded_metadata = load_dataset_dir(tmp_path / "out")

    assert loaded_metadata == metadata
    for name in ("train", "test"):
        assert loaded[name]["input_ids"] == dataset[name]["input_ids"]
        assert loaded[name]["labels"] == dataset[name]["labels"]


def test_load_dataset_dir_without_metadata_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_dataset_dir(tmp_path)


def test_saved_examples_are_not_padded(tmp_path, chats_file, tokenizer):
    prepared = prepare_dataset(chats_file, tokenizer, tmp_path / "out", max_length=LONG_ENOUGH, test_size=4, seed=0)

    lengths = [len(ids) for ids in prepared["train"]["input_ids"]]
    assert len(set(lengths)) > 10
    assert all(tokenizer.pad_token_id not in ids for ids in prepared["train"]["input_ids"])
    assert [len(labels) for labels in prepared["train"]["labels"]] == lengths


@pytest.fixture
def counted_builds(monkeypatch):
    builds = []
    original = preprocess_dataset.build_dataset

    def counting_build(*args, **kwargs):
        builds.append(kwargs["max_length"])
        return original(*args, **kwargs)

    monkeypatch.setattr(preprocess_dataset, "build_dataset", counting_build)
    return builds


def test_prepare_reuses_a_matching_folder_and_rebuilds_when_max_length_changes(tmp_path, chats_file, tokenizer,
                                                                               counted_builds):
    output_dir = tmp_path / "prepared"
    settings = dict(test_size=4, seed=0, max_examples=20)

    first = prepare_dataset(chats_file, tokenizer, output_dir, max_length=128, **settings)
    reused = prepare_dataset(chats_file, tokenizer, str(output_dir), max_length=128, **settings)
    # A freshly loaded tokenizer (no truncation state left by earlier calls) must match the folder too.
    prepare_dataset(chats_file, build_tokenizer("chatml"), output_dir, max_length=128, **settings)
    rebuilt = prepare_dataset(chats_file, tokenizer, output_dir, max_length=96, **settings)

    assert counted_builds == [128, 96]
    assert reused["train"]["input_ids"] == first["train"]["input_ids"]
    assert max(len(ids) for ids in rebuilt["train"]["input_ids"]) == 96
    assert load_dataset_dir(output_dir)[1]["max_length"] == 96
    assert sorted(path.name for path in tmp_path.iterdir()) == ["chats.jsonl", "prepared"]  # no staging folders left


def test_prepare_rebuilds_for_a_different_tokenizer(tmp_path, chats_file, tokenizer, counted_builds):
    output_dir = tmp_path / "prepared"
    prepare_dataset(chats_file, tokenizer, output_dir, max_length=128, test_size=4, seed=0)
    llama3 = build_tokenizer("llama3")

    prepared = prepare_dataset(chats_file, llama3, output_dir, max_length=128, test_size=4, seed=0)

    assert len(counted_builds) == 2
    assert llama3.eos_token_id in prepared["train"]["labels"][0]


def test_a_killed_preparations_staging_folder_is_removed_by_the_next_one(tmp_path, chats_file, tokenizer):
    output_dir = tmp_path / "prepared"
    prepare_dataset(chats_file, tokenizer, output_dir, max_length=128, test_size=4, seed=0)
    leftover = tmp_path / ".prepared.partial-k1ll3d"  # what a preparation killed before its rename leaves
    leftover.mkdir()
    (leftover / "dataset_dict.json").write_text("{}")
    prepare_dataset(chats_file, tokenizer, output_dir, max_length=128, test_size=4, seed=0)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["chats.jsonl", "prepared"]


def test_a_failed_save_leaves_the_previous_dataset_and_no_partial_folder(tmp_path, chats_file, tokenizer,
                                                                         monkeypatch):
    output_dir = tmp_path / "prepared"
    prepare_dataset(chats_file, tokenizer, output_dir, max_length=128, test_size=4, seed=0)

    def save_then_die(dataset, metadata, staging):
        dataset.save_to_disk(str(staging))
        raise KeyboardInterrupt  # the run is killed before metadata.json is written

    monkeypatch.setattr(preprocess_dataset, "save_dataset", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(chats_file, tokenizer, output_dir, max_length=96, test_size=4, seed=0)

    assert load_dataset_dir(output_dir)[1]["max_length"] == 128
    assert sorted(path.name for path in tmp_path.iterdir()) == ["chats.jsonl", "prepared"]


def test_prepare_refuses_to_replace_a_folder_it_did_not_write(tmp_path, chats_file, tokenizer):
    output_dir = tmp_path / "notes"
    output_dir.mkdir()
    (output_dir / "todo.txt").write_text("keep me")

    with pytest.raises(DataError, match="refusing to replace it"):
        prepare_dataset(chats_file, tokenizer, output_dir, max_length=128, test_size=4, seed=0)
    assert (output_dir / "todo.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------

def test_command_line_prepares_and_prints_the_counts(tmp_path, chats_file, tokenizer, capsys, monkeypatch):
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    mapped = fresh_datasets_cache(monkeypatch, tmp_path / "datasets_cache")

    main(["--dataset", chats_file, "--tokenizer", str(tmp_path / "tokenizer"), "--output_dir", str(tmp_path / "out"),
          "--max_length", "128", "--test_size", "0.25", "--seed", "3", "--num_proc", "2"])

    dataset, metadata = load_dataset_dir(tmp_path / "out")
    assert (len(dataset["train"]), len(dataset["test"])) == (36, 12)
    assert (metadata["max_length"], metadata["seed"], metadata["test_size"]) == (128, 3, 0.25)
    printed = capsys.readouterr().out
    assert "train: 36 examples" in printed
    assert "test: 12 examples" in printed
    assert f"{metadata['counts']['supervised_tokens']['train']} supervised tokens" in printed
    assert maps_run_by_two_workers(mapped) == 1  # --num_proc 2 tokenized in two workers


def test_members_train_on_all_the_data_on_disjoint_shards_or_on_bootstrap_samples():
    from datasets import Dataset

    from preprocess_dataset import describe_member_data, member_split

    train = Dataset.from_dict({"example_id": list(range(10))})
    def ids(member_data, round_index, data_seed=0):
        return list(member_split(train, member_data, round_index, 3, data_seed)["example_id"])

    assert ids("all", 2) == list(range(10))
    shards = [ids("shard", r) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10)) and [len(s) for s in shards] == [4, 3, 3]  # disjoint, whole
    assert shards != [ids("shard", r, data_seed=1) for r in range(3)]  # data_seed decides
    samples = [ids("bootstrap", r) for r in range(2)]
    assert all(len(sample) == 10 and len(set(sample)) < 10 for sample in samples) and samples[0] != samples[1]
    assert ids("bootstrap", 1) == samples[1]  # reproducible
    assert describe_member_data("shard", 1, 3, 0) == "shard 1 of 3 (order seed 0)"


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizing in several processes
# ---------------------------------------------------------------------------------------------------------------------

def fresh_datasets_cache(monkeypatch, folder: Path) -> Path:
    """Point datasets' cache of mapped data at the new `folder`: nothing mapped earlier is reused, and the files a
    map's workers write there can be counted (maps_run_by_two_workers)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", folder)
    return folder


def maps_run_by_two_workers(datasets_cache: Path) -> int:
    """The maps whose two workers each wrote their shard (CACHE_0000i_of_00002.arrow) into `datasets_cache`."""
    return len(list(datasets_cache.rglob("*_00001_of_00002.arrow")))


# The ShareGPT source is mapped twice (its turns renamed, then tokenized), the messages one once (tokenized).
@pytest.mark.parametrize("source, maps", [(DATA_DIR / "chats.jsonl", 1), (DATA_DIR / "sharegpt.json", 2)],
                         ids=["messages", "sharegpt"])
def test_two_tokenizing_processes_give_the_examples_and_fingerprints_of_one(source, maps, tmp_path, tokenizer,
                                                                            monkeypatch):
    def build(num_proc: int):
        mapped = fresh_datasets_cache(monkeypatch, tmp_path / f"datasets_cache_{num_proc}")
        return (*build_dataset(str(source), tokenizer, max_length=96, test_size=4, seed=0, num_proc=num_proc), mapped)

    one, one_metadata, _ = build(1)
    two, two_metadata, mapped = build(2)

    assert maps_run_by_two_workers(mapped) == maps
    assert two_metadata == one_metadata  # counts included: the workers drop what one process drops
    for split in ("train", "test"):
        assert two[split]["input_ids"] == one[split]["input_ids"]
        assert two[split]["labels"] == one[split]["labels"]
        assert two[split]._fingerprint == one[split]._fingerprint


def test_a_runs_prepared_folder_does_not_depend_on_the_number_of_processes(tmp_path, tiny_teacher_dir,
                                                                          counted_builds, monkeypatch):
    from config import build_config
    from utils import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_teacher_dir))
    configs = [build_config("test", None, {"dataset": str(DATA_DIR / "chats.jsonl"), "num_proc": num_proc,
                                           "cache_dir": str(tmp_path / "cache")}) for num_proc in (2, 1)]
    mapped = fresh_datasets_cache(monkeypatch, tmp_path / "datasets_cache")

    assert preprocess_dataset.run_data_folder(configs[0], tokenizer) == preprocess_dataset.run_data_folder(
        configs[1], tokenizer)
    first, _ = preprocess_dataset.prepare_for_run(configs[0], tokenizer)
    assert maps_run_by_two_workers(mapped) == 1  # the config's num_proc reached the tokenizing
    second, _ = preprocess_dataset.prepare_for_run(configs[1], tokenizer)
    assert len(counted_builds) == 1  # the second found the first's folder
    assert second["train"]["input_ids"] == first["train"]["input_ids"]


def test_auto_tokenizes_in_this_process_for_small_data_and_on_the_jobs_cpus_for_large(monkeypatch):
    from preprocess_dataset import MAX_AUTO_PROCESSES, PARALLEL_MIN_CONVERSATIONS, map_num_proc

    large = PARALLEL_MIN_CONVERSATIONS
    monkeypatch.setattr(preprocess_dataset.os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    assert map_num_proc(0, large) == 6  # the CPUs this job may use (its affinity), not the machine's
    assert map_num_proc(0, large - 1) is None  # small data: no workers to start
    assert map_num_proc(3, 10) == 3 and map_num_proc(1, large) is None  # a set number is kept; 1 means no workers
    monkeypatch.setattr(preprocess_dataset.os, "sched_getaffinity", lambda pid: set(range(256)), raising=False)
    assert map_num_proc(0, large) == MAX_AUTO_PROCESSES
    monkeypatch.setattr(preprocess_dataset.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert map_num_proc(0, large) is None
    with pytest.raises(ValueError, match="num_proc = -1 must be >= 0"):
        map_num_proc(-1, large)


def test_a_negative_num_proc_is_refused_naming_the_key(capsys):
    from config import ConfigError, build_config

    with pytest.raises(ConfigError, match="'num_proc' = -2 must be >= 0"):
        build_config("demo", None, {"num_proc": -2})
    with pytest.raises(SystemExit):
        preprocess_dataset.parse_args(["--dataset", "d", "--tokenizer", "t", "--output_dir", "o", "--num_proc", "-1"])
    assert "--num_proc -1: must be >= 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Preparing a run's data first: main.py --prepare_only
# ---------------------------------------------------------------------------------------------------------------------

def test_prepare_only_writes_the_data_a_following_run_reads_without_tokenizing_again(tmp_path, tiny_teacher_dir,
                                                                                     counted_builds, monkeypatch,
                                                                                     capsys):
    import main
    import utils

    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(json.dumps({"teacher": str(tiny_teacher_dir), "dataset": str(DATA_DIR / "chats.jsonl"),
                                    "cache_dir": str(tmp_path / "cache"), "output_root": str(tmp_path / "runs")}))
    arguments = ["--preset", "test", "--config", str(run_yaml)]

    def refuse(*args, **kwargs):
        raise AssertionError("--prepare_only must not load model weights or start processes")

    with monkeypatch.context() as patch:
        patch.setattr(utils, "load_causal_lm", refuse)
        patch.setattr(utils, "process_state", refuse)
        assert main.main([*arguments, "--prepare_only"]) == 0
    printed = capsys.readouterr().out
    folder = Path(printed.split("prepared data: ", 1)[1].splitlines()[0])
    prepared, _ = load_dataset_dir(folder)
    assert folder.parent == tmp_path / "cache" / "datasets" and "conversations loaded" in printed
    assert len(counted_builds) == 1 and not (tmp_path / "runs").exists()  # prepared the data, started no run

    with processes.PreemptionSignal() as preemption:
        run = main.setup(main.parse_args(arguments), preemption)
    assert len(counted_builds) == 1  # the run found the prepared data: nothing was tokenized again
    assert run.data["test"]["input_ids"] == prepared["test"]["input_ids"]


def test_the_same_data_prepared_again_from_another_file_keeps_its_fingerprint(tmp_path):
    """The teacher caches are keyed by the splits' fingerprints: a copy of the source (another path, another time)
    prepared again must find them, and other content must not."""
    tokenizer = build_tokenizer("chatml")
    fingerprints = []
    for name, mtime in (("a", 1_000_000_000), ("b", 1_500_000_000)):
        source = tmp_path / name / "chats.jsonl"
        source.parent.mkdir()
        shutil.copy(DATA_DIR / "chats.jsonl", source)
        os.utime(source, (mtime, mtime))
        config = build_config("test", None, {"dataset": str(source), "cache_dir": str(tmp_path / name / "cache")})
        data, _ = preprocess_dataset.prepare_for_run(config, tokenizer)
        fingerprints.append({split: part._fingerprint for split, part in data.items()})
    assert fingerprints[0] == fingerprints[1]
    assert fingerprints[0]["train"] != fingerprints[0]["test"]


def test_a_content_fingerprint_ignores_chunking_and_sees_one_changed_token():
    table = pa.table({"input_ids": [[1, 2, 3], [4, 5]], "labels": [[-100, 2, 3], [-100, 5]]})
    rechunked = pa.Table.from_batches(table.to_batches(max_chunksize=1))
    assert rechunked.column("input_ids").num_chunks == 2
    assert preprocess_dataset.content_fingerprint(rechunked) == preprocess_dataset.content_fingerprint(table)
    moved = pa.table({"input_ids": [[1, 2], [3, 4, 5]], "labels": [[-100, 2], [3, -100, 5]]})  # same tokens, split
    changed = pa.table({"input_ids": [[1, 2, 3], [4, 6]], "labels": [[-100, 2, 3], [-100, 5]]})
    assert preprocess_dataset.content_fingerprint(moved) != preprocess_dataset.content_fingerprint(table)
    assert preprocess_dataset.content_fingerprint(changed) != preprocess_dataset.content_fingerprint(table)
