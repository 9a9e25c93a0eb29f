"""Configuration: layering of defaults, presets, YAML and command line; every bad value names its key."""

import pytest
import torch

import config as config_lib
from config import Config, ConfigError, build_config, load_saved_config, save_config, use_compiled_loss


def test_demo_is_the_default_and_validates():
    config = build_config()
    assert config == Config()
    assert config.teacher == config_lib.EMBEDDED_TEACHER and config.dataset == config_lib.EMBEDDED_DATASET


def test_layers_apply_in_order(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("alpha: 0.9\ntotal_rounds: 5\nteacher_layers: [0, 3, 7]\n")
    config = build_config("test", str(yaml_file), {"alpha": "0.7"})
    assert config.alpha == 0.7  # command line beats YAML
    assert config.total_rounds == 5  # YAML beats preset (test has 2)
    assert config.student_hidden_size == 32  # preset beats default
    assert config.teacher_layers == [0, 3, 7]


def test_command_line_strings_are_typed():
    config = build_config("demo", None, {"teacher_layers": "0,5,9", "max_examples": "none",
                                         "gradient_checkpointing": "true", "steps_per_round": "12"})
    assert config.teacher_layers == [0, 5, 9]
    assert config.max_examples is None
    assert config.gradient_checkpointing is True
    assert config.steps_per_round == 12


@pytest.mark.parametrize("key,value,message", [
    ("alpha", 1.5, "'alpha' = 1.5 must lie in [0, 1]"),
    ("alpha", -0.1, "'alpha' = -0.1 must lie in [0, 1]"),
    ("temperature", 0, "'temperature' = 0.0 must be > 0"),
    ("total_rounds", 0, "'total_rounds' = 0 must be >= 1"),
    ("eval_chunk_size", 0, "'eval_chunk_size' = 0 must be >= 1"),
    ("divergence", "tvd", "'divergence' = 'tvd' must be one of forward_kl, reverse_kl, jsd"),
    ("steps_per_round", "many", "'steps_per_round' = 'many' is not a valid int"),
    ("steps_per_round", 2.5, "'steps_per_round' = 2.5 is not a valid int"),
    ("gradient_checkpointing", "maybe", "'gradient_checkpointing' = 'maybe' is not a valid bool"),
    ("student_init", "pretrained", "'student_model' = None must name a model"),
    ("compile_loss", "sometimes", "'compile_loss' = 'sometimes' must be auto, on or off"),
])
def test_bad_values_name_their_key(key, value, message):
    with pytest.raises(ConfigError) as error:
        build_config("demo", None, {key: value})
    assert message in str(error.value)


def test_unknown_keys_and_presets_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key\\(s\\) 'alpah' in the command line"):
        build_config("demo", None, {"alpah": 0.5})
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("learning_rate: 0.001\nlearnig_rate: 0.01\n")
    with pytest.raises(ConfigError, match=f"'learnig_rate' in config file '{yaml_file}'"):
        build_config("demo", str(yaml_file))
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        build_config("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("demo", str(tmp_path / "missing.yaml"))


def test_every_preset_validates():
    for name in config_lib.PRESETS:
        build_config(name).validate()


def test_paper_preset_describes_the_full_scale_run():
    paper = build_config("paper")
    assert (paper.teacher, paper.student_model) == ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct")
    assert (paper.dataset, paper.max_examples, paper.test_size) == ("allenai/tulu-3-sft-mixture", 200_000, 2_000)
    assert (paper.max_length, paper.dtype, paper.device) == (1024, "bfloat16", "cuda")


def test_saved_config_round_trips(tmp_path):
    config = build_config("test", None, {"alpha": 0.25, "teacher_layers": "1,2"})
    save_config(config, tmp_path / "config.yaml")
    assert load_saved_config(tmp_path / "config.yaml") == config
    assert config.fingerprint() != build_config("test").fingerprint()


def test_compile_loss_is_auto_in_every_preset_and_auto_means_cuda_only():
    assert all(build_config(name).compile_loss == "auto" for name in config_lib.PRESETS)
    assert use_compiled_loss("auto", "cuda") and use_compiled_loss("auto", "cuda:1")
    assert use_compiled_loss("auto", torch.device("cuda", 0)) and not use_compiled_loss("auto", torch.device("cpu"))
    assert not use_compiled_loss("auto", "cpu")
    assert use_compiled_loss("on", "cpu") and not use_compiled_loss("off", "cuda")
    with pytest.raises(ConfigError, match="'compile_loss' = 'yes' must be auto, on or off"):
        use_compiled_loss("yes", "cuda")


def test_compile_loss_reads_unquoted_on_and_off_from_yaml(tmp_path):
    """YAML 1.1 reads an unquoted off as the boolean false; the key still gets the word it was written with."""
    for word in ("on", "off"):
        yaml_file = tmp_path / f"{word}.yaml"
        yaml_file.write_text(f"compile_loss: {word}\n")
        config = build_config("test", str(yaml_file))
        assert config.compile_loss == word
        save_config(config, tmp_path / "saved.yaml")
        assert load_saved_config(tmp_path / "saved.yaml").compile_loss == word


@pytest.mark.parametrize("key", ["temperature", "alpha", "learning_rate", "eta", "early_stopping_min_delta"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_non_finite_float_is_refused_naming_its_key(key, value):
    with pytest.raises(ConfigError, match=rf"config key '{key}' = {value} must be a finite number"):
        build_config("test", None, {key: value})
