"""The students: each round's student built (copied teacher layers, random, or pretrained) or only described (its
model config, or a skeleton on the meta device), and the settings a single-model baseline's round is trained with."""

import dataclasses

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from config import SINGLE_MODEL_BASELINES, ConfigError
import utils
from slm_ensembles import compute


def build_student(config, teacher, tokenizer, round_index: int):
    """A fresh student for `round_index`; later rounds differ by seed (and by copied layers), so members differ."""
    torch.manual_seed(config.round_seed(round_index))
    if config.student_init == "pretrained":
        return utils.load_causal_lm(config.student_model, torch.float32, config.trust_remote_code)
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


def round_settings(config, teacher, tokenizer, train_tokens: compute.TokenCount, examples: int, num_processes: int):
    """What each round's student is built and trained with: the config itself, or a single-model baseline's
    (baseline_round_config), whose cap under baseline_budget flops is the steps that spend the ensemble's
    capped training FLOPs (flop_matched_config) on the training split (`train_tokens` in `examples`)."""
    round_config = baseline_round_config(config, teacher.config.num_hidden_layers)
    if config.baseline in SINGLE_MODEL_BASELINES and config.baseline_budget == "flops":
        return flop_matched_config(config, round_config, teacher, tokenizer, train_tokens, examples, num_processes)
    return round_config


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
