"""A single model matched to an ensemble's size: the size setting (teacher layers copied, or a random student's
depth or width) whose parameters, or non-embedding parameters, come closest to the ensemble family's at its size.
The sizes are counted on the meta device from the teacher's config, so nothing heavy loads."""

from __future__ import annotations

import dataclasses
import functools
import types

from transformers import AutoConfig, AutoTokenizer

import config as config_lib
from slm_ensembles import compute, embedded, students
from slm_ensembles.study.grid import Family, StudyError, cli_value

MATCH_RTOL = 0.10  # a matched single model further than this from its target is refused
RANDOM_DEPTHS = range(1, 65)  # the layers a random student matched to an ensemble may have
RANDOM_WIDTHS = range(32, 2049, 32)  # or its width: where embeddings dominate, only width reaches a total


def match_family(family: Family, families: list[Family]) -> Family:
    """`family` with the size setting whose single model's axis value (parameters or non-embedding parameters) is
    the closest to the named ensemble family's at its size: refused when none is within MATCH_RTOL."""
    match, what = family.match, f"family {family.name!r}"
    ensemble = next((f for f in families if f.name == match["family"] and f.kind == "ensemble"), None)
    if ensemble is None:
        raise StudyError(f"{what}: match names {match['family']!r}, which is no ensemble family of this spec")
    configs = [family_config(ensemble, combo) for combo in ensemble.combos]
    size = match.get("size") or configs[0].total_rounds
    targets = sorted({ensemble_size_value(config, match["axis"], size) for config in configs})
    if len(targets) > 1:
        raise StudyError(f"{what}: the grid points of {ensemble.name!r} have different {match['axis']} ({targets}) "
                         f"at {size} members: match one family of one size")
    target = targets[0]
    candidates = size_candidates(family_config(family, family.combos[0]), match["axis"])
    setting, value = min(candidates, key=lambda candidate: abs(candidate[1] - target))
    if abs(value - target) > MATCH_RTOL * target:
        raise StudyError(f"{what}: no size of this family reaches {match['axis']} {target:,} (family "
                         f"{ensemble.name!r} at {size} members) within {MATCH_RTOL:.0%}; the nearest is {value:,} "
                         f"({', '.join(f'{k}={cli_value(v)}' for k, v in setting.items())})")
    note = f"(matched {match['axis']} {value:,} to {ensemble.name} x{size}: {target:,})"
    return dataclasses.replace(family, settings={**family.settings, **setting}, label_note=note,
                               match={**match, "size": size})


def family_config(family: Family, combo: dict) -> config_lib.Config:
    try:
        return config_lib.build_config(family.preset, overrides={k: cli_value(v) for k, v in
                                                                 {**family.settings, **combo}.items()})
    except config_lib.ConfigError as error:
        raise StudyError(f"family {family.name!r}: {error}") from error


@functools.lru_cache(maxsize=None)
def teacher_parts(teacher: str, cache_dir: str, trust_remote_code: bool):
    """(the teacher's model config as an object with a `config`, its tokenizer): what a student's shape depends
    on; only a spec with `match` needs them."""
    path = embedded.resolve_teacher(teacher, cache_dir)
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return types.SimpleNamespace(config=model_config), tokenizer


def student_shape(config: config_lib.Config, round_index: int):
    """A round's student's compute.ModelShape, from its model config on the meta device (no weight allocated)."""
    teacher, tokenizer = teacher_parts(config.teacher, str(config.cache_dir), config.trust_remote_code)
    model_config = students.student_model_config(config, teacher, tokenizer, round_index)
    return model_config, compute.model_shape(model_config, config.trust_remote_code)


def ensemble_size_value(config: config_lib.Config, axis: str, size: int) -> int:
    """An ensemble of `size` members' parameters (or non-embedding parameters): its rounds' students summed; with
    combine additive every member after the first gets its own output head (students.start_at_zero unties a tied
    one), which counts as embedding parameters."""
    total = 0
    for round_index in range(size):
        model_config, shape = student_shape(config, round_index)
        total += getattr(shape, axis)
        untied = round_index > 0 and config.combine == "additive" and getattr(model_config, "tie_word_embeddings",
                                                                              False)
        total += shape.head_parameters if untied and axis == "parameters" else 0
    return total


def size_candidates(config: config_lib.Config, axis: str) -> list[tuple[dict, int]]:
    """(size setting, axis value) for every size a single model of `config`'s family can take: teacher_layers
    students copy 1 to all of the teacher's layers (spread from first to last); random students have 1 to 64
    layers at their width, or their depth at a width of 32 to 2,048 (the MLP's width and the heads' count scaled
    with it, so its head size stays the family's)."""
    if config.student_init == "teacher_layers":
        teacher, _ = teacher_parts(config.teacher, str(config.cache_dir), config.trust_remote_code)
        layers = teacher.config.num_hidden_layers
        settings = [{"teacher_layers": students.spread_layer_indices(n, layers), "teacher_layers_shift": 0}
                    for n in range(1, layers + 1)]
    elif config.student_init == "random":
        settings = [{"student_num_layers": n} for n in RANDOM_DEPTHS] + [
            widened(config, width) for width in RANDOM_WIDTHS if width != config.student_hidden_size]
    else:
        raise StudyError(f"match sizes students of student_init teacher_layers or random, not "
                         f"{config.student_init!r}")
    return [(setting, getattr(student_shape(dataclasses.replace(config, **setting), 0)[1], axis))
            for setting in settings]


def widened(config: config_lib.Config, width: int) -> dict:
    """A random student's settings at another `width`: MLP and heads scaled in proportion (at least one head, its
    key/value heads dividing its heads), so the shape stays the family's."""
    scale = width / config.student_hidden_size
    heads = max(1, round(config.student_num_heads * scale))
    while width % heads:
        heads -= 1
    kv_heads = max(1, min(heads, round(config.student_num_kv_heads * scale)))
    while heads % kv_heads:
        kv_heads -= 1
    return {"student_hidden_size": width, "student_intermediate_size": max(1, round(
        config.student_intermediate_size * scale)), "student_num_heads": heads, "student_num_kv_heads": kv_heads}
