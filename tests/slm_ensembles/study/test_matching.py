"""matching: a single model matched to an ensemble's size by its depth, its width or the teacher layers it copies,
against the parameters of students built for real; a size no candidate reaches is refused by name."""

import dataclasses

import pytest

from slm_ensembles import students
from slm_ensembles.study.grid import StudyError
from slm_ensembles.study.matching import ensemble_size_value, teacher_parts
from slm_ensembles.study.spec import load_spec
from study_runs import write_spec


def matched_points(tmp_path, teacher, match, single=None, ensemble=None):
    families = [dict(name="method", settings=dict(total_rounds=2, **(ensemble or {}))),
                dict(name="one", kind="single", settings=dict(total_rounds=1, **(single or {})), match=match)]
    spec = write_spec(tmp_path / "spec.yaml", families, settings=dict(teacher=str(teacher)), seeds=[0])
    return {p.family: p for p in load_spec(spec).points}


def real_parameters(config, round_index, additive):
    """A round's student built for real (students.build_student's model config, start_at_zero for a later additive
    member): its distinct parameters."""
    import transformers

    teacher, tokenizer = teacher_parts(config.teacher, str(config.cache_dir), False)
    model = transformers.AutoModelForCausalLM.from_config(students.student_model_config(config, teacher, tokenizer,
                                                                                     round_index))
    if additive and round_index > 0:
        students.start_at_zero(model)
    return sum(p.numel() for p in model.parameters())


def test_a_random_single_model_is_matched_by_its_depth(tiny_teacher_dir, tmp_path):
    points = matched_points(tmp_path, tiny_teacher_dir, dict(axis="non_embedding_parameters", family="method"))
    one = points["one"]  # the ensemble of 2 one-layer students has the non-embedding parameters of 2 layers
    assert one.config.student_num_layers == 2 and one.settings["student_num_layers"] == 2
    assert "(matched non_embedding_parameters" in one.label and "to method x2" in one.label
    additive = dataclasses.replace(points["method"].config, combine="additive")
    target = ensemble_size_value(additive, "parameters", 2)
    assert target == real_parameters(additive, 0, True) + real_parameters(additive, 1, True)  # an untied head


def test_a_random_single_model_is_matched_by_its_width_where_depth_cannot_reach_the_total(tiny_teacher_dir,
                                                                                         tmp_path):
    """Embeddings dominate a small random student (the study preset's: 3.1M of its 3.24M parameters), so an
    ensemble's total is out of reach of any depth; here wider members stand for that: the match widens the single
    model (MLP and heads in proportion)."""
    points = matched_points(tmp_path, tiny_teacher_dir, dict(axis="parameters", family="method"),
                            ensemble=dict(student_hidden_size=256, student_intermediate_size=512))
    one, method = points["one"].config, points["method"].config
    assert one.student_hidden_size > method.student_hidden_size and one.student_num_layers == method.student_num_layers
    assert one.student_hidden_size % one.student_num_heads == 0
    assert one.student_num_heads % one.student_num_kv_heads == 0
    target = ensemble_size_value(method, "parameters", 2)
    assert abs(real_parameters(one, 0, False) - target) <= 0.1 * target


def test_a_teacher_layers_single_model_copies_layers_spread_from_first_to_last(tiny_teacher_dir, tmp_path):
    layers = dict(student_init="teacher_layers", teacher_layers=[0])
    points = matched_points(tmp_path, tiny_teacher_dir, dict(axis="non_embedding_parameters", family="method"),
                            single=layers, ensemble=layers)
    assert points["one"].config.teacher_layers == [0, 1] and points["one"].config.teacher_layers_shift == 0


@pytest.mark.parametrize("match, single, message", [
    (dict(axis="parameters", family="method", size=4), dict(student_init="teacher_layers", teacher_layers=[0]),
     r"family 'one': no size of this family reaches parameters [\d,]+ \(family 'method' at 4 members\) within "
     r"10%; the nearest is [\d,]+ \(teacher_layers=0,1, teacher_layers_shift=0\)"),
    (dict(axis="flops", family="method"), {}, "match needs axis"),
    (dict(axis="parameters", family="nope"), {}, "match names 'nope', which is no ensemble family"),
])
def test_a_match_no_size_can_reach_is_refused_by_name(tiny_teacher_dir, tmp_path, match, single, message):
    with pytest.raises(StudyError, match=message):
        matched_points(tmp_path, tiny_teacher_dir, match, single=single)
