"""utils: safe loading, tokenizer checks, dtypes, the process group."""

import datetime
import re

import pytest
import torch

from config import ConfigError, build_config
from conftest import build_tiny_llama, build_tokenizer
import utils
from slm_ensembles import compute


def test_weights_load_from_safetensors_only(tmp_path, tokenizer):
    model = build_tiny_llama(tokenizer)
    pickled = tmp_path / "pickled"  # a folder whose weights are a pickle, which could run code when loaded
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError):
        utils.load_causal_lm(str(tmp_path / "pickled"))
    model.save_pretrained(tmp_path / "safe")
    assert compute.parameter_count(utils.load_causal_lm(str(tmp_path / "safe"))) == compute.parameter_count(model)


def test_tokenizers_must_match_but_padded_heads_are_fine(tokenizer):
    with pytest.raises(utils.TokenizerMismatchError, match="'teacher' .* and student 'student' .* have different"):
        utils.check_same_tokenizer(tokenizer, build_tokenizer("llama3"), "teacher", "student")
    utils.check_same_tokenizer(tokenizer, build_tokenizer("chatml"), "teacher", "student")
    utils.check_vocab_fits(build_tiny_llama(tokenizer, vocab_size=len(tokenizer) + 8), len(tokenizer), "padded")
    with pytest.raises(utils.TokenizerMismatchError, match="has 300 output rows but the tokenizer has 400"):
        utils.check_vocab_fits(build_tiny_llama(tokenizer, vocab_size=300), len(tokenizer), "small")


def save_student(folder, tokenizer=None):
    """A tiny pretrained student folder: the model's weights and config, and `tokenizer` when given."""
    model_tokenizer = tokenizer or build_tokenizer("chatml")
    build_tiny_llama(model_tokenizer).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_student_tokenizer_without_chat_template_is_accepted_when_its_vocabulary_is_the_teachers(tmp_path,
                                                                                                 tokenizer):
    base = build_tokenizer("chatml")
    base.chat_template = None  # a base model's tokenizer: the teacher's vocabulary, no template
    student = save_student(tmp_path / "base", base)
    utils.check_student_tokenizer(tokenizer, student, "teacher", trust_remote_code=False)
    other = build_tokenizer("llama3")
    other.chat_template = None
    with pytest.raises(utils.TokenizerMismatchError, match="'teacher' .* and student '.*other' .* have different"):
        utils.check_student_tokenizer(tokenizer, save_student(tmp_path / "other", other), "teacher", False)


def test_a_student_folder_without_a_tokenizer_is_refused_naming_it(tmp_path, tokenizer):
    student = save_student(tmp_path / "weights_only")
    with pytest.raises(utils.TokenizerMismatchError,
                       match=f"cannot load the tokenizer of student '{re.escape(student)}'.*teacher 'teacher'"):
        utils.check_student_tokenizer(tokenizer, student, "teacher", trust_remote_code=False)


def test_auto_dtype_is_bf16_only_where_the_hardware_has_it():
    cpu = torch.device("cpu")
    assert utils.frozen_dtype("float32", cpu) == torch.float32
    assert utils.frozen_dtype("auto", cpu) == (torch.bfloat16 if utils.supports_bf16(cpu) else torch.float32)
    assert utils.use_bf16_autocast("float32", cpu) is False


class _ProcessGroupStarted(Exception):
    """Raised by the stand-in for accelerate's PartialState: the test has what it was given."""


@pytest.fixture
def process_group_settings(monkeypatch):
    """What accelerate's PartialState is created with (it starts the process group); creating it stops the caller."""
    import accelerate

    given = {}

    def capture(**kwargs):
        given.update(kwargs)
        raise _ProcessGroupStarted

    monkeypatch.setattr(accelerate, "PartialState", capture)
    return given


def test_the_process_group_times_out_after_the_configured_minutes(process_group_settings):
    with pytest.raises(_ProcessGroupStarted):
        utils.process_state("cpu", timeout_minutes=90)
    assert process_group_settings == {"cpu": True, "timeout": datetime.timedelta(minutes=90)}


def test_a_run_sets_up_its_processes_with_its_configs_time_out(process_group_settings):
    import main

    with pytest.raises(_ProcessGroupStarted):
        main.main(["--preset", "test", "--process_group_timeout_minutes", "7"])
    assert process_group_settings["timeout"] == datetime.timedelta(minutes=7)
    assert build_config().process_group_timeout_minutes == 60  # the default covers preparing the paper's data


@pytest.mark.parametrize("minutes", [0, -5])
def test_a_process_group_timeout_under_a_minute_is_refused_naming_the_key(minutes):
    with pytest.raises(ConfigError, match=f"'process_group_timeout_minutes' = {minutes} must be >= 1"):
        build_config("demo", None, {"process_group_timeout_minutes": minutes})


@pytest.mark.parametrize(("tied", "shard_size"), [(True, None), (False, None), (False, "20KB")])
def test_the_output_head_alone_is_the_models_head_read_without_its_other_weights(tmp_path, monkeypatch, tied,
                                                                                  shard_size):
    """A tied head is stored as the input embedding, an untied one as lm_head; a sharded model is found through its
    index. Nothing else is loaded: the whole-model loader is never called, and its body cannot run."""
    tokenizer = build_tokenizer("chatml")
    model = build_tiny_llama(tokenizer, seed=4, vocab_size=len(tokenizer) + 8)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard_size is not None)
    monkeypatch.setattr(utils.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: pytest.fail("the whole model was loaded"))
    head = utils.load_output_head(str(tmp_path), torch.bfloat16, "cpu")
    assert head.dtype == torch.bfloat16 and head.config.num_hidden_layers == model.config.num_hidden_layers
    torch.testing.assert_close(head.get_output_embeddings().weight, model.lm_head.weight.to(torch.bfloat16),
                               rtol=0, atol=0)
    assert sum(p.numel() for p in head.parameters()) == model.lm_head.weight.numel()
    with pytest.raises(RuntimeError, match="only the teacher's output head is loaded"):
        head(input_ids=torch.tensor([[1, 2]]))
