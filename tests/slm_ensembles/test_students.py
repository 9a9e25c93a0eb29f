"""students: students built from teacher layers, at random or pretrained; their skeletons; single-model baselines."""

import pytest
import torch

from config import build_config
from conftest import build_tiny_llama, build_tokenizer
import utils
from slm_ensembles import compute, students


def test_teacher_layer_students_copy_the_chosen_layers_and_shift_per_round(tokenizer):
    teacher = build_tiny_llama(tokenizer, num_layers=6)
    config = build_config("demo", None, {"teacher_layers": "0,2,3,5", "teacher_layers_shift": 1})
    assert students.student_layer_indices(config, 0, 6) == [0, 2, 3, 5]
    assert students.student_layer_indices(config, 1, 6) == [0, 3, 4, 5]
    assert students.student_layer_indices(config, 5, 6) == [0, 4, 5]  # clamped inside (first, last); duplicates merged
    student = students.build_student(config, teacher, tokenizer, round_index=1)
    assert student.config.num_hidden_layers == 4
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for student_layer, teacher_layer in enumerate([0, 3, 4, 5]):
        key = f"model.layers.{student_layer}.mlp.up_proj.weight"
        assert torch.equal(student_state[key], teacher_state[key.replace(f".{student_layer}.", f".{teacher_layer}.")])
    assert torch.equal(student_state["model.embed_tokens.weight"], teacher_state["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="outside the teacher's 6 layers"):
        students.student_layer_indices(build_config("demo", None, {"teacher_layers": "0,9"}), 0, 6)


def test_random_students_differ_by_round_and_share_the_vocabulary(tokenizer):
    teacher = build_tiny_llama(tokenizer)
    config = build_config("test")
    first, second = (students.build_student(config, teacher, tokenizer, r) for r in (0, 1))
    assert first.config.vocab_size == len(tokenizer) and first.config.hidden_size == 32
    assert not torch.equal(first.model.embed_tokens.weight, second.model.embed_tokens.weight)
    again = students.build_student(config, teacher, tokenizer, 0)
    assert torch.equal(first.model.embed_tokens.weight, again.model.embed_tokens.weight)  # seeded


def test_start_at_zero_gives_zero_logits_keeps_the_embeddings_and_survives_saving(tmp_path):
    tokenizer = build_tokenizer("chatml")
    model = build_tiny_llama(tokenizer)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    students.start_at_zero(model)
    ids = torch.tensor([[3, 5, 7]])
    assert torch.count_nonzero(model(input_ids=ids).logits) == 0
    torch.testing.assert_close(model.get_input_embeddings().weight, embeddings)
    model.save_pretrained(tmp_path)
    loaded = utils.load_causal_lm(str(tmp_path), torch.float32)
    assert torch.count_nonzero(loaded(input_ids=ids).logits) == 0
    torch.testing.assert_close(loaded.get_input_embeddings().weight, embeddings)


def test_spread_layer_indices_spans_the_teacher():
    assert students.spread_layer_indices(4, 30) == [0, 10, 19, 29]
    assert students.spread_layer_indices(40, 30) == list(range(30))
    assert students.spread_layer_indices(1, 30) == [0]


@pytest.mark.parametrize("student_init", ["random", "teacher_layers", "pretrained"])
def test_a_students_skeleton_has_its_parameters_and_no_weights(tmp_path, tokenizer, student_init, monkeypatch):
    teacher = build_tiny_llama(tokenizer, hidden_size=48, num_layers=4)
    pretrained = tmp_path / "student"
    build_tiny_llama(tokenizer, hidden_size=40, num_layers=3).save_pretrained(pretrained)
    config = build_config("test", overrides=dict(student_init=student_init, teacher_layers=[0, 2, 3],
                                                 student_model=str(pretrained)))
    built = [compute.parameter_count(students.build_student(config, teacher, tokenizer, r)) for r in (0, 1)]
    monkeypatch.setattr(utils, "load_causal_lm", lambda *args, **kwargs: pytest.fail("weights were loaded"))
    skeletons = [students.student_skeleton(config, teacher, tokenizer, r) for r in (0, 1)]
    assert [compute.parameter_count(skeleton) for skeleton in skeletons] == built
    assert all(p.is_meta for skeleton in skeletons for p in skeleton.parameters())
    assert len(set(built)) == 1 and built[0] > 0


def test_single_model_baselines_get_the_ensembles_steps_and_single_large_its_depth(tokenizer):
    config = build_config("test", overrides=dict(total_rounds=3, steps_per_round=5))
    assert students.baseline_round_config(config, 30) is config
    matched = students.baseline_round_config(build_config("test", overrides=dict(
        total_rounds=3, steps_per_round=5, baseline="single_matched")), 30)
    assert (matched.steps_per_round, matched.student_num_layers) == (15, 1)
    large = students.baseline_round_config(build_config("test", overrides=dict(
        total_rounds=3, steps_per_round=5, baseline="single_large")), 30)
    assert (large.steps_per_round, large.student_num_layers) == (15, 3)
    copied = students.baseline_round_config(build_config("test", overrides=dict(
        total_rounds=3, baseline="single_large", student_init="teacher_layers", teacher_layers=[0, 29])), 30)
    assert copied.teacher_layers == students.spread_layer_indices(6, 30) and copied.teacher_layers_shift == 0
