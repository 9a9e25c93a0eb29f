"""What a run will cost, predicted before anything heavy loads: the teacher cache's size on disk and a training
process's GPU memory in the last round, by part (main.py --dry_run prints them after the plan).

Predicted from the models' configs (config.json, read from a model folder or the hub cache), the teacher's tokenizer
and, when the run's data is prepared already, its training split's supervised tokens; the arithmetic is compute.py's
(docs/compute.md). Nothing is downloaded, converted, loaded or written; what cannot be read so is said instead of
raised: a dry run always finishes.
"""

import types

from transformers import AutoConfig, AutoTokenizer

import config as config_lib
import preprocess_dataset
from slm_ensembles import compute, students, teacher_cache


def prediction_lines(config: config_lib.Config) -> list[str]:
    """--dry_run's predictions, one line each: the teacher cache's size (none for the online teacher) and a training
    process's GPU memory; or one line that says why they cannot be made here."""
    if config.teacher == config_lib.EMBEDDED_TEACHER:
        return ["  predictions   none for the embedded teacher: its model folder is made on first use, not by a dry "
                "run"]
    names = [config.teacher, *([config.student_model] if config.student_init == "pretrained" else [])]
    configs = {name: local_model_config(name, config.trust_remote_code) for name in names}
    missing = [name for name, found in configs.items() if found is None]
    if missing:
        return [needs_configs_line(missing)]
    teacher_config = configs[config.teacher]
    tokenizer = local_tokenizer(config.teacher, config.trust_remote_code)
    round_config = students.baseline_round_config(config, teacher_config.num_hidden_layers)
    if config.student_init == "pretrained":
        student_config = configs[config.student_model]
    elif config.student_init == "random" and tokenizer is None:
        return [f"  predictions   need the tokenizer of {config.teacher!r} (a random student's vocabulary): "
                f"`hf download {config.teacher}` fetches the model's files"]
    else:
        try:  # student_model_config reads only the teacher's config
            student_config = students.student_model_config(round_config, types.SimpleNamespace(config=teacher_config),
                                                        tokenizer)
        except ValueError as error:  # teacher_layers outside the teacher's: the run would stop on it too
            return [f"  predictions   none: {error}"]
    teacher = compute.model_shape(teacher_config, config.trust_remote_code)
    student = compute.model_shape(student_config, config.trust_remote_code)
    cache = [] if config.teacher_mode == "online" else [cache_prediction_line(config, teacher, tokenizer)]
    return [*cache, memory_prediction_line(config, teacher, student)]


def local_model_config(name: str, trust_remote_code: bool):
    """The transformers config of model `name` from its folder or the hub cache (never downloaded); None when it is
    in neither."""
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # in no folder or hub cache; a folder without a config.json
        return None


def local_tokenizer(name: str, trust_remote_code: bool):
    """Model `name`'s tokenizer from its folder or the hub cache (never downloaded), under the name a run loads it
    by (its name_or_path names the run's data folder); None when its files are in neither."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # no such files; a folder whose tokenizer files are missing
        return None
    # Given a config.json alone, transformers makes an empty tokenizer rather than fail. A run's tokenizer has a chat
    # template (utils.load_tokenizer requires one): one without is not it.
    return tokenizer if tokenizer.chat_template else None


def needs_configs_line(names: list[str]) -> str:
    """What to fetch so that the predictions can be made: the config.json of each model in `names`."""
    return (f"  predictions   need the config of {' and '.join(map(repr, names))}, in no folder or hub cache here "
            "(a few KB each): " + "; ".join(f"`hf download {name} config.json`" for name in names))


def cache_prediction_line(config: config_lib.Config, teacher: compute.ModelShape, tokenizer) -> str:
    """The training split's teacher cache: its bytes per supervised token x their count, read from the prepared
    data or, before it is prepared, estimated from max_examples and max_length."""
    per_token = teacher_cache.cache_bytes_per_position(
        config.teacher_mode, vocab_size=teacher.vocab_size if tokenizer is None else len(tokenizer),
        hidden_size=teacher.hidden_size, k=config.cache_k, value_dtype=config.cache_value_dtype)
    prepared = prepared_training_tokens(config, tokenizer)
    if prepared is not None:
        examples, positions = prepared
        source = f"from the prepared data: {positions:,} supervised tokens in {examples:,} examples x {per_token} B"
    elif config.max_examples is None:
        return (f"  teacher cache {config.teacher_mode}: {per_token} B per supervised token; the size needs their "
                "count: `python main.py --prepare_only` prepares the data, then the dry run reads it")
    else:
        examples = config.max_examples - config.test_size
        positions = compute.estimated_supervised_positions(examples, config.max_length)
        source = (f"estimated: {examples:,} examples x {config.max_length:,} tokens x "
                  f"{compute.ASSUMED_SUPERVISED_SHARE:.0%} supervised x {per_token} B")
    size = compute.predicted_cache_bytes(per_token, positions, examples)
    return f"  teacher cache {config.teacher_mode}: ~{readable_bytes(size)} ({source})"


def prepared_training_tokens(config: config_lib.Config, tokenizer) -> tuple[int, int] | None:
    """The examples and supervised tokens of the training split a run would cache, when its data is prepared in its
    run_data_folder already; otherwise None. The embedded data is not looked for: naming its folder recovers it."""
    if tokenizer is None or config.dataset == config_lib.EMBEDDED_DATASET:
        return None
    try:
        data, _ = preprocess_dataset.load_dataset_dir(preprocess_dataset.run_data_folder(config, tokenizer))
        train = preprocess_dataset.held_out_slices(data, config)["train"]
    except preprocess_dataset.DataError:  # not prepared (or too small for its held-out slices: the run says so)
        return None
    return len(train), preprocess_dataset.token_count(train).supervised


def memory_prediction_line(config: config_lib.Config, teacher: compute.ModelShape,
                           student: compute.ModelShape) -> str:
    """A training process's GPU memory in the last round, by part."""
    members = config.rounds_to_run() - 1
    whole_teacher = config.rounds_run_the_teacher()  # else the rounds hold its head alone (teacher.rounds_teacher)
    bf16 = config.dtype != "float32"  # auto: bf16 on a GPU that has it (utils.frozen_dtype), as every recent one does
    memory = compute.predicted_memory_per_process(
        student, teacher, whole_teacher=whole_teacher, members=[student] * members, batch_size=config.batch_size,
        max_length=config.max_length, gradient_checkpointing=config.gradient_checkpointing,
        loss_chunk_size=config.loss_chunk_size, bf16=bf16)
    parts = [f"{'teacher' if whole_teacher else 'teacher head'} {readable_bytes(memory.teacher)}",
             f"student {readable_bytes(memory.student)} (weights, grads, AdamW{', bf16 copy' if bf16 else ''})",
             f"{members} member{'' if members == 1 else 's'} {readable_bytes(memory.members)}",
             f"activations {readable_bytes(memory.activations)}"
             + (" (checkpointed)" if config.gradient_checkpointing else ""),
             f"loss chunk {readable_bytes(memory.loss_chunk)}"]
    return f"  GPU memory    ~{readable_bytes(memory.total)} per process: " + ", ".join(parts)


def readable_bytes(count: int) -> str:
    """`count` bytes in the largest of GB (10^9 bytes), MB and kB that it holds a tenth of, with one decimal."""
    for unit, size in (("GB", compute.GB), ("MB", 1e6), ("kB", 1e3)):
        if count >= size / 10:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"
