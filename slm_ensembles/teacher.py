"""The run's teacher: its folder and tokenizer, the checks its settings must pass before anything heavy loads, and
the model the rounds hold (the whole teacher, or its output head alone when a cache stands in for its body)."""

import functools

import torch
from transformers import AutoConfig

import config as config_lib
import utils
from model_io import check_logits_at
from slm_ensembles import embedded, students, teacher_cache
from slm_ensembles.evaluation import evaluation_teacher


def check_model_folders(config: config_lib.Config) -> None:
    """Refuse a teacher or student_model meant as a local folder that is not one, before anything loads (the hub
    would be asked for it instead, and answer with a message about repository names)."""
    utils.check_model_folder("teacher", config.teacher)
    if config.student_init == "pretrained":
        utils.check_model_folder("student_model", config.student_model)

def teacher_tokenizer(config: config_lib.Config, state) -> tuple[str, object]:
    """The teacher's local folder and its tokenizer (the run's). A pretrained student's vocabulary is checked
    against the tokenizer here, before anything else loads."""
    with state.main_process_first():  # a first-use conversion of the embedded teacher happens once
        teacher_path = embedded.resolve_teacher(config.teacher, config.cache_dir)
    tokenizer = utils.load_tokenizer(teacher_path, config.trust_remote_code)
    if config.student_init == "pretrained":
        utils.check_student_tokenizer(tokenizer, config.student_model, config.teacher, config.trust_remote_code)
    return teacher_path, tokenizer

def check_fits_teacher(config: config_lib.Config, teacher_path: str, vocab_size: int) -> None:
    """Refuse settings the teacher cannot meet, from its tokenizer (`vocab_size` tokens) and its config.json, before
    the data is prepared and any weights load: a top-k cache of more entries than the vocabulary, and students that
    copy layers the teacher lacks."""
    if config.teacher_mode == "topk" and config.cache_k > vocab_size:
        raise config_lib.ConfigError(f"config key 'cache_k' = {config.cache_k} is more than the teacher's vocabulary "
                                     f"of {vocab_size} tokens: give at most {vocab_size}")
    if config.student_init == "teacher_layers":
        layers = AutoConfig.from_pretrained(teacher_path, trust_remote_code=config.trust_remote_code).num_hidden_layers
        # The layers the rounds copy: a single_large baseline spreads its own over the teacher.
        students.check_teacher_layers(students.baseline_round_config(config, layers).teacher_layers, layers)

def whole_teacher(config: config_lib.Config, teacher_path: str, tokenizer, state) -> torch.nn.Module:
    """The teacher, frozen, its weights loaded straight onto this process's device."""
    teacher = utils.load_causal_lm(teacher_path, utils.frozen_dtype(config.dtype, state.device),
                                   config.trust_remote_code, state.device).eval()
    utils.check_vocab_fits(teacher, len(tokenizer), config.teacher)
    check_logits_at(teacher, len(tokenizer))
    return teacher

def rounds_teacher(config: config_lib.Config, teacher_path: str, tokenizer, state,
                   load_whole_teacher) -> torch.nn.Module:
    """The teacher as the rounds need it: the whole model when they run it (online, or students copied from its
    layers); with a cached teacher_mode, its output head alone (model_io.OutputHeadOnly), which projects the cached
    hidden states: a 7B teacher then costs its head's 1 GB on each GPU, not 15 GB."""
    if config.rounds_run_the_teacher():
        return load_whole_teacher()
    head = utils.load_output_head(teacher_path, utils.frozen_dtype(config.dtype, state.device), state.device,
                                  config.trust_remote_code)
    utils.check_vocab_fits(head, len(tokenizer), config.teacher)
    return head


def run_teachers(config: config_lib.Config, teacher_path: str, tokenizer, data: dict, collator, state,
                 preemption) -> tuple:
    """The teacher as the rounds hold it (rounds_teacher), its cache of the training split (topk and hidden modes;
    else None) and what evaluation reads (evaluation.evaluation_teacher). The whole teacher loads at most once, and
    only where the rounds run it or a cache is still to be built. teacher_cache.BuildPreempted when a signal
    stopped a cache's build between two pieces, which are kept for the next run."""
    load_whole_teacher = functools.cache(functools.partial(whole_teacher, config, teacher_path, tokenizer, state))
    teacher = rounds_teacher(config, teacher_path, tokenizer, state, load_whole_teacher)
    cache = teacher_cache.training_cache(config, load_whole_teacher, teacher.dtype, teacher_path, tokenizer,
                                         data["train"], collator, state, preemption)
    evaluated = evaluation_teacher(config, teacher, load_whole_teacher, cache, data, collator, state)
    return teacher, cache, evaluated
