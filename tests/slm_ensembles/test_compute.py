"""compute.py against hand counts: parameters and forward FLOPs of tiny Llamas, a measured forward, and the round,
run, inference and FLOP-matched arithmetic written out by hand."""

import dataclasses

import numpy as np
import pytest
import torch
from datasets import Dataset
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from conftest import build_tiny_llama, write_remote_code_config
from model_io import PaddingCollator
import preprocess_dataset
from preprocess_dataset import tokenize_conversation
from slm_ensembles import compute, teacher_cache
from slm_ensembles.compute import ModelShape


def tiny_llama_config(**changes) -> LlamaConfig:
    settings = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, vocab_size=16, intermediate_size=12,
                    tie_word_embeddings=True)
    return LlamaConfig(**{**settings, **changes})


# --- parameters, by hand --------------------------------------------------------------------------------------------

# hidden 8, 2 heads of 4, 2 key/value heads, vocabulary 16, MLP 12, tied head:
EMBEDDING = 16 * 8  # 128, the head shares it
ATTENTION = 8 * 8 + 8 * 8 + 8 * 8 + 8 * 8  # q, k, v (2 kv heads x 4 = 8 wide), o: 256
MLP = 8 * 12 + 8 * 12 + 12 * 8  # gate, up, down: 288
NORMS = 8 + 8  # input and post-attention RMSNorm weights
LAYER = ATTENTION + MLP + NORMS  # 560
FINAL_NORM = 8
TIED_TOTAL = EMBEDDING + 2 * LAYER + FINAL_NORM  # 1256
NON_EMBEDDING = 2 * LAYER + FINAL_NORM  # 1128


def test_parameters_of_a_tiny_tied_llama_by_hand():
    assert (TIED_TOTAL, NON_EMBEDDING) == (1256, 1128)
    shape = compute.model_shape(tiny_llama_config())
    assert shape == ModelShape(parameters=1256, embedding_parameters=128, head_parameters=128, num_layers=2,
                               attention_width=8, hidden_size=8, intermediate_size=12, key_value_width=8)
    assert shape.vocab_size == 16
    assert compute.parameter_count(tiny_llama_config()) == 1256
    assert compute.non_embedding_parameter_count(tiny_llama_config()) == 1128


def test_an_untied_head_is_an_embedding_and_a_model_counts_like_its_config():
    config = tiny_llama_config(tie_word_embeddings=False)
    assert compute.parameter_count(config) == 1256 + 16 * 8  # the head's own 128
    assert compute.non_embedding_parameter_count(config) == 1128  # unchanged: the head is not counted in N
    torch.manual_seed(0)
    assert compute.model_shape(AutoModelForCausalLM.from_config(config)) == compute.model_shape(config)




@pytest.mark.parametrize("count, expected", [(compute.parameter_count, 1256),
                                             (compute.non_embedding_parameter_count, 1128)])
def test_a_model_whose_code_comes_with_its_folder_is_counted_only_when_its_code_is_trusted(tmp_path, count, expected):
    """A config naming its model class by auto_map (code in the model's folder, as a hub model with remote code):
    the counts build it only with trust_remote_code, passed on, and refuse it by default. A model type of its own
    per case: once built with trust, transformers registers the class for the rest of the process."""
    from transformers import AutoConfig

    write_remote_code_config(tmp_path, tiny_llama_config().to_dict(), f"remote_llama_{count.__name__}")
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(config).__name__ == "RemoteLlamaConfig"
    for untrusted in (count, compute.model_shape, compute.meta_model):
        with pytest.raises(ValueError, match="trust_remote_code"):
            untrusted(config)
    assert count(config, trust_remote_code=True) == expected


def test_a_config_that_names_no_head_dim_key_value_heads_or_mlp_width_by_hand():
    """GPT-2's config has none of head_dim, num_key_value_heads and intermediate_size: heads of hidden/heads, every
    head its own key and value, and an MLP width of 0 (the FLOP counts never read it). Learned positions are an
    embedding too."""
    config = GPT2Config(n_embd=8, n_head=2, n_layer=2, vocab_size=16, n_positions=32, bos_token_id=0, eos_token_id=0)
    assert not any(hasattr(config, name) for name in ("head_dim", "num_key_value_heads", "intermediate_size"))
    tokens, positions = 16 * 8, 32 * 8  # 128 (the head shares it) and 256
    layer = (8 + 8) + (8 * 24 + 24) + (8 * 8 + 8) + (8 + 8) + (8 * 32 + 32) + (32 * 8 + 8)  # norms, qkv, o, MLP 4x
    assert compute.model_shape(config) == ModelShape(
        parameters=tokens + positions + 2 * layer + (8 + 8), embedding_parameters=tokens + positions,
        head_parameters=tokens, num_layers=2, attention_width=8, hidden_size=8, intermediate_size=0,
        key_value_width=8)


def test_parameters_with_grouped_query_attention_and_a_set_head_dim_by_hand():
    # 2 query heads of 6 (d_attn 12, wider than hidden 8), 1 key/value head, untied head.
    config = tiny_llama_config(num_key_value_heads=1, head_dim=6, tie_word_embeddings=False)
    layer = (8 * 12 + 8 * 6 + 8 * 6 + 12 * 8) + (8 * 12 + 8 * 12 + 12 * 8) + (8 + 8)  # 288 + 288 + 16 = 592
    assert compute.model_shape(config) == ModelShape(parameters=16 * 8 * 2 + 2 * layer + 8,  # 1448
                                                     embedding_parameters=256, head_parameters=128, num_layers=2,
                                                     attention_width=12, hidden_size=8, intermediate_size=12,
                                                     key_value_width=6)


# --- forward FLOPs ---------------------------------------------------------------------------------------------------

def test_forward_flops_per_token_by_hand():
    shape = compute.model_shape(tiny_llama_config())
    # context 10: 2 N = 2 * 1128; attention 2 * 2 layers * 10 * 8 = 320; head 2 * 16 * 8 = 256
    assert compute.body_forward_flops_per_token(shape, context=10) == 2256 + 320
    assert compute.head_forward_flops_per_token(shape) == 256
    assert compute.forward_flops_per_token(shape, context=10) == 2832
    # the body on 7 padded tokens, the head on 3 supervised ones
    assert compute.forward_flops(shape, sequence_tokens=7, supervised_tokens=3, context=10) == 2576 * 7 + 256 * 3


@pytest.mark.parametrize("changes", [{}, {"num_key_value_heads": 1, "head_dim": 6, "tie_word_embeddings": False}])
def test_the_formula_matches_a_measured_forward(changes):
    """torch's FlopCounterMode counts a real forward's matmuls (eager attention). They are our count, less the norms'
    weights (2 FLOPs each per token in 2 N, no matmul), with the attention over the full masked square: 4 * d_attn
    per layer and position pair, i.e. our Kaplan term at twice the sequence length (docs/compute.md)."""
    config = tiny_llama_config(attn_implementation="eager", **changes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    length = 5
    with FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 16, (1, length)))
    norm_weights = 2 * (8 + 8) + 8
    shape = compute.model_shape(model)
    assert counter.get_total_flops() == (compute.forward_flops(shape, length, length, context=2 * length)
                                         - 2 * norm_weights * length)


# --- rounds and runs, by hand ---------------------------------------------------------------------------------------

# Shapes chosen for round numbers. At context 10:
#   student: body 2 * 50 + 2 * 2 * 10 * 4 = 260 a token, head 2 * 20 = 40 a supervised token
#   teacher: body 2 * 500 + 2 * 4 * 10 * 8 = 1640 a token, head 2 * 100 = 200 a supervised token
STUDENT = ModelShape(parameters=70, embedding_parameters=20, head_parameters=20, num_layers=2, attention_width=4)
TEACHER = ModelShape(parameters=600, embedding_parameters=100, head_parameters=100, num_layers=4, attention_width=8)
TOKENS = compute.TokenCount.uniform(1000, 300, context=10)  # one round's
CACHE = compute.TokenCount.uniform(1100, 300, context=10)  # the training split the cache is built over

STUDENT_ROUND = 816_000  # 3 * (260 * 1000 + 40 * 300)
MEMBER = 272_000  # 260 * 1000 + 40 * 300
ONLINE_TEACHER = 1_700_000  # 1640 * 1000 + 200 * 300
TOPK_BUILD = 1_864_000  # 1640 * 1100 + 200 * 300
HIDDEN_BUILD = 1_804_000  # 1640 * 1100, no head
HIDDEN_HEAD = 60_000  # 200 * 300, every round


def test_tokens_are_counted_per_batch_without_padding_and_with_each_sequences_length():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    supervised = torch.tensor([[False, True, False, False, False], [False, False, True, True, False]])
    count = compute.TokenCount.of_batch(mask, supervised)
    assert count == compute.TokenCount(sequence=8, supervised=3, squared=3 * 3 + 5 * 5)
    assert count + count == count.times(2) == compute.TokenCount(16, 6, 68)
    # the attention term follows each sequence's own length: 2 * layers * d_attn * (3^2 + 5^2)
    assert compute.measured_forward_flops(STUDENT, count) == 2 * 50 * 8 + 2 * 2 * 4 * 34 + 40 * 3


def test_one_round_by_hand():
    flops = compute.round_training_flops(STUDENT, TOKENS, members=[STUDENT, STUDENT], teacher=TEACHER)
    assert flops == (816_000, 2 * 272_000, 1_700_000)
    assert flops.total == 816_000 + 544_000 + 1_700_000
    alone = compute.round_training_flops(STUDENT, TOKENS)  # alpha = 0: no teacher
    assert alone == (STUDENT_ROUND, 0, 0)


def test_a_three_round_method_run_against_the_independent_baseline_online():
    method = compute.run_training_flops([STUDENT] * 3, TOKENS, teacher=TEACHER)
    rounds = [STUDENT_ROUND + members * MEMBER + ONLINE_TEACHER for members in (0, 1, 2)]
    assert rounds == [2_516_000, 2_788_000, 3_060_000]
    assert method == [2_516_000, 5_304_000, 8_364_000]
    independent = compute.run_training_flops([STUDENT] * 3, TOKENS, teacher=TEACHER, through_ensemble=False)
    assert independent == [2_516_000, 5_032_000, 7_548_000]
    assert method[-1] - independent[-1] == 3 * MEMBER  # rounds 1 and 2 run 1 and 2 frozen members


def test_a_cached_teacher_is_built_once_and_charged_in_full_to_every_run_whatever_its_rounds():
    topk = compute.run_training_flops([STUDENT] * 3, TOKENS, teacher=TEACHER, teacher_mode="topk", cache_tokens=CACHE)
    assert topk == [TOPK_BUILD + 816_000, TOPK_BUILD + 2 * 816_000 + 272_000,
                    TOPK_BUILD + 3 * 816_000 + 3 * 272_000]
    one_round = compute.run_training_flops([STUDENT], TOKENS, teacher=TEACHER, teacher_mode="topk",
                                           cache_tokens=CACHE)
    assert one_round[0] == topk[0]  # a 1-round run and the first member of a 3-round run bear the same build
    hidden = compute.run_training_flops([STUDENT] * 3, TOKENS, teacher=TEACHER, teacher_mode="hidden",
                                        through_ensemble=False, cache_tokens=CACHE)
    assert hidden[-1] == 3 * (816_000 + HIDDEN_HEAD) + HIDDEN_BUILD
    assert compute.round_training_flops(STUDENT, TOKENS, teacher=TEACHER, teacher_mode="topk").teacher == 0
    with pytest.raises(ValueError, match="cache_tokens"):
        compute.run_training_flops([STUDENT], TOKENS, teacher=TEACHER, teacher_mode="topk")


def test_per_round_token_counts():
    # rounds whose batches differ
    second = compute.TokenCount.uniform(900, 300, context=10)
    run = compute.run_training_flops([STUDENT] * 2, [TOKENS, second])
    assert run == [816_000, 816_000 + 3 * (260 * 900 + 40 * 300) + (260 * 900 + 40 * 300)]
    with pytest.raises(ValueError, match="tokens gives 1 counts for 2 rounds"):
        compute.run_training_flops([STUDENT] * 2, [TOKENS])


def test_a_rounds_spend_adds_its_early_stopping_evaluations_and_the_run_is_charged_the_build_once():
    slice_tokens = compute.TokenCount.uniform(100, 30, context=10)  # one evaluation: 260 * 100 + 40 * 30 = 27_200
    rule = compute.SpendRule(TEACHER, "topk", build_flops=TOPK_BUILD, evaluation_tokens=slice_tokens)
    first = rule.round_parts(STUDENT, [], TOKENS, evaluations=4)
    assert first == [816_000, 0, 0, 4 * 27_200]
    second = rule.round_parts(STUDENT, [STUDENT], TOKENS, evaluations=2)  # the mixture: student and member
    assert second == [816_000, 272_000, 0, 2 * 2 * 27_200]
    columns = rule.columns([first, second])
    assert columns == {"train_flops": TOPK_BUILD + 2 * 816_000 + 272_000 + 8 * 27_200,
                       "flops_student": 2 * 816_000, "flops_members": 272_000, "flops_teacher": TOPK_BUILD,
                       "flops_evaluation": 8 * 27_200}
    online = compute.SpendRule(TEACHER, "online", build_flops=0, evaluation_tokens=slice_tokens)
    # early stopping reads the mixture's CE only: an online teacher does not run in its evaluations
    assert online.round_parts(STUDENT, [], TOKENS, evaluations=1)[3] == 27_200


def test_the_cache_build_is_nothing_online_and_the_body_pass_with_or_without_the_head_cached():
    """The three teacher modes' build, from the module's own function (a run with an online teacher never asks)."""
    assert compute.teacher_cache_build_flops(TEACHER, "online", CACHE) == 0
    assert compute.teacher_cache_build_flops(TEACHER, "topk", CACHE) == TOPK_BUILD
    assert compute.teacher_cache_build_flops(TEACHER, "hidden", CACHE) == HIDDEN_BUILD < TOPK_BUILD
    with pytest.raises(ValueError, match="unknown teacher_mode 'cached': use one of"):
        compute.teacher_cache_build_flops(TEACHER, "cached", CACHE)


def test_a_hidden_teacher_rounds_head_and_its_build_both_land_in_the_teacher_column():
    rule = compute.SpendRule(TEACHER, "hidden", build_flops=HIDDEN_BUILD,
                             evaluation_tokens=compute.TokenCount.uniform(100, 30, context=10))
    first = rule.round_parts(STUDENT, [], TOKENS, evaluations=0)
    assert first == [816_000, 0, HIDDEN_HEAD, 0]
    assert rule.columns([first, first])["flops_teacher"] == 2 * HIDDEN_HEAD + HIDDEN_BUILD
    # before any round (a run that stopped at once): the build alone, every other part zero
    assert rule.columns([]) == {"train_flops": HIDDEN_BUILD, "flops_student": 0.0, "flops_members": 0.0,
                                "flops_teacher": HIDDEN_BUILD, "flops_evaluation": 0.0}


def test_a_runs_spend_rule_charges_the_cache_build_and_the_cached_early_stopping_slice_once():
    slice_tokens = compute.TokenCount.uniform(100, 30, context=10)  # the teacher's body on it: 1640 * 100
    topk = compute.SpendRule.for_run(TEACHER, "topk", CACHE, slice_tokens)
    assert topk == compute.SpendRule(TEACHER, "topk", build_flops=TOPK_BUILD + 164_000, evaluation_tokens=slice_tokens)
    hidden = compute.SpendRule.for_run(TEACHER, "hidden", CACHE, slice_tokens)
    assert hidden.build_flops == HIDDEN_BUILD + 164_000 and hidden.teacher_mode == "hidden"
    assert compute.SpendRule.for_run(TEACHER, "online", None, slice_tokens).build_flops == 0  # nothing cached
    assert compute.SpendRule.for_run(None, "topk", None, slice_tokens) == compute.SpendRule(
        None, "topk", build_flops=0, evaluation_tokens=slice_tokens)  # alpha = 0: no teacher at all


def test_a_rounds_metric_columns_by_row_model_by_hand():
    wider = ModelShape(parameters=100, embedding_parameters=20, head_parameters=20, num_layers=3, attention_width=4)
    rule = compute.SpendRule(TEACHER, "topk", build_flops=TOPK_BUILD,
                             evaluation_tokens=compute.TokenCount.uniform(100, 30, context=10))
    first, second = [816_000.0, 0.0, 0.0, 108_800.0], [816_000.0, 272_000.0, 0.0, 54_400.0]
    columns = compute.metric_columns([wider, STUDENT], [first, second], context=10, rule=rule)
    # a token's forward: 2 (N + V H) + 2 n_layers context d_attn: STUDENT 2 (50 + 20) + 160, wider 2 (80 + 20) + 240
    student = dict(parameters=70, non_embedding_parameters=50, member_parameters=70,
                   inference_flops_per_token=300, critical_path_layers=2)
    assert columns["student_untrained"] == {**student, "train_flops": 0.0, "flops_student": 0.0,
                                            "flops_members": 0.0, "flops_teacher": 0.0, "flops_evaluation": 0.0}
    assert columns["student"] == {**student, "train_flops": TOPK_BUILD + 816_000 + 272_000 + 54_400,
                                  "flops_student": 816_000.0, "flops_members": 272_000.0,
                                  "flops_teacher": float(TOPK_BUILD), "flops_evaluation": 54_400.0}
    assert columns["ensemble"] == dict(
        parameters=170, non_embedding_parameters=130, member_parameters=100, inference_flops_per_token=740,
        critical_path_layers=3, train_flops=TOPK_BUILD + 2 * 816_000 + 272_000 + 163_200,
        flops_student=1_632_000.0, flops_members=272_000.0, flops_teacher=float(TOPK_BUILD),
        flops_evaluation=163_200.0)
    assert columns["teacher"] == dict(  # trained elsewhere: no training spend
        parameters=600, non_embedding_parameters=500, member_parameters=600, inference_flops_per_token=1840,
        critical_path_layers=4, train_flops=None, flops_student=None, flops_members=None, flops_teacher=None,
        flops_evaluation=None)
    later = compute.metric_columns([wider, STUDENT, STUDENT], [first, second, first], context=10, rule=rule)
    assert later["student"]["train_flops"] == TOPK_BUILD + 816_000 + 108_800  # its own round's, the last
    without_teacher = dataclasses.replace(rule, teacher=None)
    assert set(compute.metric_columns([STUDENT], [first], context=10, rule=without_teacher)) == {
        "student_untrained", "student", "ensemble"}


def test_an_online_teachers_forward_is_charged_to_every_round():
    online = compute.SpendRule(TEACHER, "online", build_flops=0,
                               evaluation_tokens=compute.TokenCount.uniform(100, 30, context=10))
    assert online.round_parts(STUDENT, [], TOKENS, evaluations=0) == [816_000, 0, ONLINE_TEACHER, 0]


def test_flop_matched_steps():
    # A single model matched to the online method run: a step of 100 tokens and 30 supervised costs
    # 3 * (260 * 100 + 40 * 30) + (1640 * 100 + 200 * 30) = 81_600 + 170_000.
    step = compute.round_training_flops(STUDENT, compute.TokenCount.uniform(100, 30, context=10), teacher=TEACHER).total
    assert step == 251_600
    assert compute.flop_matched_steps(8_364_000, step) == 33  # 33.24 rounded down (the method took 30 steps)
    assert compute.flop_matched_steps(5 * step, step) == 5
    assert compute.flop_matched_steps(5 * step - 1, step) == 4
    assert compute.flop_matched_steps(0.3, 0.1) == 3  # 2.9999999999999996 in floats
    # a one-off cost (a teacher cache build) comes off the budget first
    assert compute.flop_matched_steps(7 * step + 1000, step, fixed_flops=2 * step) == 5
    assert compute.flop_matched_steps(3 * step, step, fixed_flops=4 * step) == 0
    assert compute.flop_matched_steps(step, step) == 1  # exactly one step's budget buys that step
    with pytest.raises(ValueError, match="flops_per_step must be > 0, not 0"):
        compute.flop_matched_steps(1000, 0)


# --- inference ------------------------------------------------------------------------------------------------------

def test_inference_flops_and_critical_path_of_members_of_different_depths():
    shallow = ModelShape(parameters=70, embedding_parameters=20, head_parameters=20, num_layers=2, attention_width=4)
    deep = ModelShape(parameters=170, embedding_parameters=20, head_parameters=20, num_layers=5, attention_width=4)
    middle = ModelShape(parameters=120, embedding_parameters=20, head_parameters=20, num_layers=3, attention_width=4)
    # per token at context 10: 2 N + 2 L 10 4 + 2 V H
    assert compute.ensemble_inference_flops_per_token([shallow, deep, middle], context=10) == (
        (100 + 160 + 40) + (300 + 400 + 40) + (200 + 240 + 40))
    assert compute.critical_path_depth([shallow, deep, middle]) == 5
    assert compute.critical_path_depth([shallow]) == 2
    assert compute.ensemble_inference_flops_per_token([shallow], context=10) == 300


# --- disk and GPU memory --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [dict(mode="topk", k=64, value_dtype="uint8"),
                                      dict(mode="topk", k=16, value_dtype="float16"),
                                      dict(mode="hidden", k=None, value_dtype="float16")])
def test_the_predicted_cache_size_is_the_size_of_a_cache_built(tmp_path, tokenizer, chats, settings):
    """Predicted from the supervised-token count the dry run reads off prepared data (token_count)."""
    rows = [tokenize_conversation(chat["messages"], tokenizer, max_length=128) for chat in chats]
    dataset = Dataset.from_list([row for row in rows if row is not None])
    identity = {"teacher": "tiny", "teacher_fingerprint": "f" * 64, "teacher_dtype": "float32",
                "tokenizer_hash": "t" * 64, "dataset_fingerprint": dataset._fingerprint, "max_length": 128}
    teacher_cache.build_cache(build_tiny_llama(tokenizer, hidden_size=64), dataset, tmp_path, temperature=1.0,
                              vocab_size=len(tokenizer), batch_size=8,
                              collator=PaddingCollator(tokenizer.pad_token_id), metadata=identity, **settings)
    teacher_cache.write_metadata(tmp_path, identity)
    per_position = teacher_cache.cache_bytes_per_position(settings["mode"], vocab_size=len(tokenizer), hidden_size=64,
                                                     k=settings["k"], value_dtype=settings["value_dtype"])
    assert per_position == {"uint8": 2 * 64 + 64 + 2 + 2, "float16": 2 * 16 + 2 * 16 + 2}[settings["value_dtype"]] \
        if settings["mode"] == "topk" else 2 * 64
    predicted = compute.predicted_cache_bytes(per_position, preprocess_dataset.token_count(dataset).supervised,
                                              len(dataset))
    arrays = sum(np.load(path, mmap_mode="r").nbytes for path in tmp_path.rglob("*.npy"))
    assert arrays - predicted == 8  # offsets.npy holds one entry more than the shard's examples
    files = sum(path.stat().st_size for path in tmp_path.rglob("*") if path.is_file())
    assert predicted == pytest.approx(files, rel=0.03)  # the rest: .npy headers, shard.json, metadata.json


def test_the_supervised_positions_of_data_not_yet_prepared_are_estimated_at_half_of_max_length():
    assert compute.estimated_supervised_positions(198_000, 1024) == 101_376_000


def test_the_memory_of_a_training_process_by_hand():
    student = compute.model_shape(tiny_llama_config())  # 1256 parameters, hidden 8, MLP 12, keys/values 8, V 16
    teacher = compute.model_shape(tiny_llama_config(num_hidden_layers=4, tie_word_embeddings=False))
    assert (teacher.parameters, teacher.head_parameters) == (128 + 4 * LAYER + FINAL_NORM + 128, 128) == (2504, 128)
    # bf16: a cached teacher's head, 2 members, a micro-batch of 2 x 10 tokens, chunks of 4 positions
    cached = compute.predicted_memory_per_process(
        student, teacher, whole_teacher=False, members=[student, student], batch_size=2, max_length=10,
        gradient_checkpointing=False, loss_chunk_size=4, bf16=True)
    layer = 26 * 8 + 8 * 12 + 4 * (8 + 8)  # 368 bytes a token: hidden, MLP, attention and key/value widths
    assert cached == (128 * 2, 1256 * (16 + 2), 2 * 1256 * 2, 20 * 2 * layer, 4 * 16 * 33)
    assert cached.total == 256 + 22_608 + 5_024 + 14_720 + 2_112
    # fp32: the whole teacher, no members, gradient checkpointing, no loss chunks (a micro-batch's 20 positions)
    online = compute.predicted_memory_per_process(
        student, teacher, whole_teacher=True, members=[], batch_size=2, max_length=10, gradient_checkpointing=True,
        loss_chunk_size=0, bf16=False)
    layer = 24 * 8 + 16 * 12 + 8 * (8 + 8)  # 512 bytes a token
    assert online == (2504 * 4, 1256 * 16, 0, 20 * (2 * 4 * 8 + layer), 20 * 16 * 33)


def saved_for_backward(config, layers: int, length: int, bf16: bool, checkpointing: bool) -> int:
    """Bytes of the tensors a forward of `layers` layers over 2 x `length` tokens keeps for backward (torch's
    saved-tensor hooks), each storage once, the model's own weights left out."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config.__class__(**{**config.to_dict(), "num_hidden_layers": layers}))
    if checkpointing:
        model.activation_checkpointing_enable()
    weights = {parameter.untyped_storage().data_ptr() for parameter in model.train().parameters()}
    saved = {}

    def keep(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor  # kept alive: no address is reused while counting
        return tensor

    with (torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
          torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor)):
        model.base_model(input_ids=torch.randint(0, config.vocab_size, (2, length)), use_cache=False)
    return sum(tensor.untyped_storage().nbytes() for pointer, tensor in saved.items() if pointer not in weights)


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("changes", [{}, {"num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 12}])
def test_the_activation_formula_matches_what_a_forward_keeps_for_backward(bf16, changes):
    """Per layer and token: the difference between 2 layers and 1 (embeddings and final norm cancel), at two lengths
    (a constant cancels: bf16 autocast's copies of the weights, counted with the student's parameters instead)."""
    config = tiny_llama_config(**{"hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "vocab_size": 64, "attn_implementation": "sdpa",
                                  **changes})
    shape = compute.model_shape(config)

    def per_layer_token(checkpointing):
        def layer(length):
            return (saved_for_backward(config, 2, length, bf16, checkpointing)
                    - saved_for_backward(config, 1, length, bf16, checkpointing))
        return (layer(32) - layer(16)) / (2 * 16)

    assert compute.layer_activation_bytes_per_token(shape, bf16) == pytest.approx(per_layer_token(False), rel=0.02)
    # With checkpointing a layer keeps only its input: the formula's stored part, one rebuilt layer aside.
    stored = (compute.activation_bytes(shape, 1, gradient_checkpointing=True, bf16=bf16)
              - compute.layer_activation_bytes_per_token(shape, bf16))
    assert stored == shape.num_layers * per_layer_token(True)
    assert compute.activation_bytes(shape, 10, gradient_checkpointing=False, bf16=bf16) == (
        10 * shape.num_layers * compute.layer_activation_bytes_per_token(shape, bf16))
