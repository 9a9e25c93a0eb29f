"""The teacher cache: what it stores equals the teacher's outputs, its size, and that it is never misused."""

import datetime
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

import build_teacher_cache
import checksums
import config as config_lib
from conftest import DATA_DIR, build_tiny_llama, hub_commit, publish_to_hub_cache
import main
from model_io import PaddingCollator, hidden_at, logits_at, output_head
import preprocess_dataset
from preprocess_dataset import tokenize_conversation
import utils
from slm_ensembles import files, processes, teacher_cache
from slm_ensembles import teacher as teacher_lib
from slm_ensembles.losses import divergence_sum, predictor_mask, sparse_divergence_sum
from slm_ensembles.teacher_cache import (BuildPreempted, CacheCorruptError, CacheIncompleteError, CacheMismatchError,
                                         TeacherCache, build_cache, cache_identity, decode_token_ids, decode_top_k,
                                         encode_token_ids, encode_top_k, identity_for_split, normalised_top_k,
                                         teacher_fingerprint, top_k_with_tail, with_example_ids, write_metadata)

ROOT = Path(__file__).resolve().parents[2]
NUM_EXAMPLES = 12
MAX_LENGTH = 128
KINDS = ("forward_kl", "reverse_kl", "jsd")
QWEN_VOCAB = 151_936


@pytest.fixture(scope="module")
def dataset(tokenizer, chats):
    rows = [tokenize_conversation(chat["messages"], tokenizer, max_length=MAX_LENGTH) for chat in chats]
    return Dataset.from_list([row for row in rows if row is not None][:NUM_EXAMPLES])


@pytest.fixture(scope="module")
def teacher(tokenizer):
    # Padded embedding rows beyond the tokenizer, as in Qwen2.5: the cache must cut them like the trainer does.
    return build_tiny_llama(tokenizer, seed=3, vocab_size=len(tokenizer) + 8)


@pytest.fixture(scope="module")
def vocab_size(tokenizer):
    return len(tokenizer)


@pytest.fixture(scope="module")
def collator(tokenizer):
    return PaddingCollator(tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def identity(dataset):
    return {"teacher": "tiny", "teacher_fingerprint": "f" * 64, "teacher_dtype": "float32",
            "tokenizer_hash": "t" * 64, "dataset_fingerprint": dataset._fingerprint, "max_length": MAX_LENGTH}


def reference_outputs(teacher, dataset, collator, vocab_size):
    """Per example: the teacher's logits [n, V] and final hidden states [n, H] at its supervised positions."""
    outputs = {}
    with torch.no_grad():
        for example_id in range(len(dataset)):
            batch = collator([dataset[example_id]])
            args = (batch["input_ids"], batch["attention_mask"], predictor_mask(batch["labels"]))
            outputs[example_id] = (logits_at(teacher, *args, vocab_size).float(), hidden_at(teacher, *args).float())
    return outputs


@pytest.fixture(scope="module")
def reference(teacher, dataset, collator, vocab_size):
    return reference_outputs(teacher, dataset, collator, vocab_size)


def build(tmp_path, teacher, dataset, collator, identity, vocab_size, *, name="cache", world_size=1, ranks=None,
          batch_size=5, **settings):
    """Build every shard (or `ranks`) of a cache and finish it; returns the folder."""
    settings = {"mode": "topk", "k": 16, "temperature": 2.0, **settings}
    cache_dir = tmp_path / name
    for rank in range(world_size) if ranks is None else ranks:
        build_cache(teacher, dataset, cache_dir, vocab_size=vocab_size, batch_size=batch_size, collator=collator,
                    metadata=identity, rank=rank, world_size=world_size, **settings)
    if ranks is None:
        write_metadata(cache_dir, identity)
    return cache_dir


def reference_rows(reference, example_ids, which=0):
    return torch.cat([reference[example_id][which] for example_id in example_ids])


def assert_close_to_the_teacher(log_probs, tail, true_log_probs, true_tail, value_dtype, noise=0.0):
    """The cached top-k log-probabilities are the teacher's to their storage's precision: half a uint8 step or half a
    float16 ulp each, as much again for the quantized values' own mass (rescaling removes it), plus the shift that
    rescaling to the stored tail's complement adds. `noise`: the teacher's own float noise between batchings."""
    rescaling = (torch.log1p(-tail.double().exp()) - torch.log1p(-true_tail.exp())).abs().unsqueeze(-1)
    error = (log_probs.double() - true_log_probs).abs() - rescaling
    if value_dtype == "uint8":
        precision = (true_log_probs.max(-1, keepdim=True).values - true_log_probs.min(-1, keepdim=True).values) / 255
    else:
        precision = true_log_probs.abs().max(-1, keepdim=True).values * 2.0 ** -10
    assert (error <= precision + noise).all()
    return error


def true_top_k(logits, k, temperature=1.0):
    """In float64: the top-k log-probabilities and ids in ascending id order, and the log of the rest's mass."""
    log_probs = torch.log_softmax(logits.double() / temperature, dim=-1)
    ids = log_probs.topk(k, dim=-1).indices.sort(dim=-1).values
    rest = torch.ones_like(log_probs, dtype=torch.bool).scatter_(-1, ids, False)
    tail = torch.where(rest, log_probs, float("-inf")).logsumexp(dim=-1)
    return log_probs.gather(-1, ids), ids, tail


SHUFFLED_IDS = [7, 0, 11, 3, 4, 9, 1, 10, 2, 8, 6, 5]


# --- round trips ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value_dtype", ["uint8", "float16"])
def test_topk_targets_are_the_teachers_top_k_at_the_temperature(tmp_path, teacher, dataset, collator, identity,
                                                                  vocab_size, reference, value_dtype):
    cache_dir = build(tmp_path, teacher, dataset, collator, identity, vocab_size, value_dtype=value_dtype)
    cache = TeacherCache.open(cache_dir, {"mode": "topk", "k": 16, "temperature": 2.0, "value_dtype": value_dtype})
    log_probs, indices, tail_log_prob = cache.topk_targets(SHUFFLED_IDS)

    true_log_probs, true_ids, true_tail = true_top_k(reference_rows(reference, SHUFFLED_IDS), 16, temperature=2.0)
    assert log_probs.shape == indices.shape == (true_log_probs.shape[0], 16)
    assert log_probs.dtype == torch.float32 and indices.dtype == torch.int64
    assert tail_log_prob.shape == (len(log_probs),)
    assert torch.equal(indices, true_ids)
    # The tail is the teacher's own, to float16's 11 significant bits of its log.
    assert torch.allclose(tail_log_prob.double(), true_tail, rtol=2e-3, atol=1e-4)
    total_mass = log_probs.double().exp().sum(-1) + tail_log_prob.double().exp()
    assert torch.allclose(total_mass, torch.ones_like(total_mass), atol=1e-5)
    error = assert_close_to_the_teacher(log_probs, tail_log_prob, true_log_probs, true_tail, value_dtype)
    assert error.max() > 1e-4  # it really is stored with less precision than fp32


def test_hidden_states_reproduce_the_teachers_hidden_states_and_logits(tmp_path, teacher, dataset, collator, identity,
                                                                       vocab_size, reference):
    cache_dir = build(tmp_path, teacher, dataset, collator, identity, vocab_size, mode="hidden")
    cache = TeacherCache.open(cache_dir, {"mode": "hidden", **identity})
    assert cache.metadata["temperature"] is None and cache.metadata["k"] is None
    hidden = cache.hidden_states(SHUFFLED_IDS)

    true_hidden = reference_rows(reference, SHUFFLED_IDS, which=1)
    assert hidden.shape == true_hidden.shape and hidden.dtype == torch.float32
    assert torch.allclose(hidden, true_hidden, rtol=1e-3, atol=1e-3)  # float16: 11 significant bits
    with torch.no_grad():
        logits = output_head(teacher, vocab_size)(hidden)
    assert torch.allclose(logits, reference_rows(reference, SHUFFLED_IDS), atol=1e-2)
    with pytest.raises(ValueError, match="hidden"):
        cache.topk_targets([0])


def test_hidden_states_that_overflow_float16_are_refused_not_stored_as_infinities(tmp_path, tokenizer, dataset,
                                                                                 collator, identity, vocab_size):
    """A teacher whose final hidden states exceed float16's range (65,504) cannot be cached in the hidden mode: its
    first batch is refused with what to do, where a silent cast would store infinities the trainer then learns from."""
    loud = build_tiny_llama(tokenizer, seed=3, vocab_size=len(tokenizer) + 8)
    with torch.no_grad():
        loud.model.norm.weight.fill_(1e5)  # the final RMSNorm scales unit-RMS states to about 1e5
    with warnings.catch_warnings(), pytest.raises(ValueError) as error:
        warnings.simplefilter("error")  # and no numpy overflow warning before it
        build(tmp_path, loud, dataset, collator, identity, vocab_size, mode="hidden")
    assert str(error.value) == "the teacher's hidden states overflow float16; use the topk mode for this teacher"


def test_full_vocabulary_topk_has_an_empty_tail_and_sums_to_one(tmp_path, teacher, dataset, collator, identity,
                                                                 vocab_size):
    cache_dir = build(tmp_path, teacher, dataset, collator, identity, vocab_size, k=vocab_size)
    log_probs, indices, tail_log_prob = TeacherCache.open(cache_dir, {}).topk_targets([2, 5])
    assert torch.isneginf(tail_log_prob).all()
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(len(log_probs)), atol=1e-5)
    assert torch.equal(indices, torch.arange(vocab_size).expand_as(indices))


def test_normalised_top_k_ignores_offsets_and_gives_the_top_k_the_mass_the_tail_leaves():
    log_probs = torch.log(torch.tensor([[0.5, 0.2], [0.3, 0.3]]))
    tail = torch.log(torch.tensor([0.3, 0.25]))
    expected = torch.tensor([[0.5, 0.2], [0.375, 0.375]])  # row 2: 0.6 scaled to the 0.75 the tail leaves
    for offset in (0.0, -7.5, 3.0):
        top = normalised_top_k(log_probs + offset, tail)
        assert torch.allclose(top.exp(), expected, atol=1e-6)
    full = normalised_top_k(log_probs + 2.0, torch.full((2,), float("-inf")))
    assert torch.allclose(full.exp(), torch.tensor([[5 / 7, 2 / 7], [0.5, 0.5]]), atol=1e-6)


# --- token ids beyond 65,536 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [400, 65_536, 65_537, QWEN_VOCAB, 4 * 65_536])
def test_token_ids_round_trip_exactly_at_any_vocabulary(vocab):
    generator = torch.Generator().manual_seed(vocab)
    edges = [i for i in (0, 65_535, 65_536, 65_537, 131_071, 131_072, 131_073, vocab - 1) if i < vocab]
    others = [i for i in torch.randperm(vocab, generator=generator)[:128].tolist() if i not in edges]
    rows = [torch.randperm(vocab, generator=generator)[:64] for _ in range(20)]
    rows.append(torch.tensor(edges + others[:64 - len(edges)]))  # every block boundary, both sides
    rows.append(torch.arange(vocab - 64, vocab))  # the last ids only
    ids = torch.stack([row.sort().values for row in rows])
    low_bits, block_starts = encode_token_ids(ids, vocab)
    assert low_bits.dtype == np.uint16 and block_starts.dtype == np.uint8
    assert block_starts.shape == (len(ids), -(-vocab // 65_536) - 1)
    assert torch.equal(decode_token_ids(low_bits, block_starts), ids)


def test_block_starts_widen_beyond_k_255():
    ids = torch.arange(65_536 - 100, 65_536 + 200).unsqueeze(0)  # 300 ids across the first block boundary
    low_bits, block_starts = encode_token_ids(ids, 70_000)
    assert block_starts.dtype == np.uint16 and block_starts.tolist() == [[100]]
    assert torch.equal(decode_token_ids(low_bits, block_starts), ids)


@pytest.fixture(scope="module")
def qwen_sized(tokenizer, dataset, collator):
    """A tiny teacher with Qwen's vocabulary, the first examples, and its logits there."""
    teacher = build_tiny_llama(tokenizer, seed=5, vocab_size=QWEN_VOCAB)
    examples = dataset.select(range(3))
    return teacher, examples, reference_outputs(teacher, examples, collator, QWEN_VOCAB)


def test_a_qwen_sized_vocabulary_caches_ids_above_65536_and_131072_exactly(tmp_path, qwen_sized, collator,
                                                                           identity):
    teacher, examples, reference = qwen_sized
    identity = {**identity, "dataset_fingerprint": examples._fingerprint}
    cache_dir = build(tmp_path, teacher, examples, collator, identity, QWEN_VOCAB, k=64, temperature=1.0)
    log_probs, indices, tail = TeacherCache.open(cache_dir, {"vocab_size": QWEN_VOCAB}).topk_targets([2, 0, 1])
    true_log_probs = torch.log_softmax(reference_rows(reference, [2, 0, 1]).double(), dim=-1)
    assert (indices[:, 1:] > indices[:, :-1]).all()  # ascending, so the block starts can recover the high bits
    assert ((indices >= 65_536) & (indices < 131_072)).any() and (indices >= 131_072).any()
    # The ids are the teacher's top-64 (to the float noise of batching) and carry their own log-probabilities.
    kth_largest = true_log_probs.topk(64, dim=-1).values[:, -1:]
    assert (true_log_probs.gather(-1, indices) >= kth_largest - 1e-5).all()
    rest = torch.ones_like(true_log_probs, dtype=torch.bool).scatter_(-1, indices, False)
    true_tail = torch.where(rest, true_log_probs, float("-inf")).logsumexp(-1)
    assert torch.allclose(tail.double(), true_tail, atol=1e-4)
    assert_close_to_the_teacher(log_probs, tail, true_log_probs.gather(-1, indices), true_tail, "uint8", noise=1e-5)


# --- size -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [400, 49_152, QWEN_VOCAB])
@pytest.mark.parametrize("value_dtype", ["uint8", "float16"])
def test_bytes_per_supervised_token_at_k_64(tmp_path, tokenizer, teacher, dataset, collator, identity, vocab,
                                            value_dtype):
    model, examples = (teacher, dataset) if vocab == len(tokenizer) else (
        build_tiny_llama(tokenizer, seed=5, vocab_size=vocab), dataset.select(range(3)))
    identity = {**identity, "dataset_fingerprint": examples._fingerprint}
    cache_dir = build(tmp_path, model, examples, collator, identity, vocab, k=64, value_dtype=value_dtype)
    shard_dir = cache_dir / "shard_00000"
    metadata = TeacherCache.open(cache_dir, {}).metadata
    positions = metadata["num_positions"]
    arrays = [np.load(path, mmap_mode="r") for path in shard_dir.glob("*.npy")]
    payload = sum(array.nbytes for array in arrays if array.shape[0] == positions)
    files = sum(path.stat().st_size for path in shard_dir.iterdir())
    # ids: 16 low bits each, plus one byte per further block of 65,536 ids; values: 1 byte each and the row's
    # float16 span, or float16 each; the tail's float16 log-mass.
    id_bytes = 2 * 64 + (-(-vocab // 65_536) - 1)
    expected = id_bytes + (64 + 2 if value_dtype == "uint8" else 2 * 64) + 2
    assert payload / positions == expected
    # Besides the payload: 16 bytes per example (its id and offset) and under 4 KiB of .npy headers and shard.json
    # (settings, and each file's size and sha256).
    assert files <= payload + 16 * (len(examples) + 1) + 4096
    print(f"V = {vocab}, {value_dtype}: {payload / positions:.0f} bytes per supervised token "
          f"({files / positions:.2f} with the fixed overhead of {positions} tokens)")
    if value_dtype == "uint8":
        assert payload / positions <= 200


# --- the tail ---------------------------------------------------------------------------------------------------------

def float16_outwards(values, direction):
    """`values` rounded to float16 towards `direction` (-inf or inf), back as float32."""
    values = values.numpy()
    rounded = values.astype(np.float16)
    overshoot = rounded > values if direction < 0 else rounded < values
    outwards = np.where(overshoot, np.nextafter(rounded, np.float16(direction)), rounded)
    return torch.from_numpy(outwards.astype(np.float32))


def tail_mass_as_rebuilt_before(top_log_probs):
    """The tail as the previous format rebuilt it: 1 - the top-k's mass after uint8 quantization with a per-row
    (min, max) range rounded outwards to float16, floored at 1e-6."""
    low = float16_outwards(top_log_probs.min(-1).values, -np.inf)
    high = float16_outwards(top_log_probs.max(-1).values, np.inf)
    step = ((high - low) / 255).unsqueeze(-1)
    codes = ((top_log_probs - low.unsqueeze(-1)) / step).round().clamp(0, 255)
    return (1 - (low.unsqueeze(-1) + codes * step).double().exp().sum(-1)).clamp(min=1e-6)


@pytest.mark.parametrize(("spread", "tail_range"), [(6.0, (1e-4, 1e-3)), (8.0, (1e-5, 1e-4))])
def test_a_peaked_teachers_tail_mass_is_kept_to_a_few_percent(spread, tail_range):
    """One token at 0.99; the others' logits spread like a trained LM's, so that the top-64 spans many nats."""
    torch.manual_seed(0)
    vocab, k, rows = 32_000, 64, 200
    logits = torch.randn(rows, vocab) * spread
    hot = torch.randint(vocab, (rows, 1))
    logits.scatter_(-1, hot, float("-inf"))
    # The hot token gets 0.99 of the mass: log(0.99 / 0.01) above the logsumexp of all the others.
    logits.scatter_(-1, hot, logits.logsumexp(-1, keepdim=True) + math.log(0.99 / 0.01))
    true_log_probs, _, true_tail = true_top_k(logits, k)
    assert tail_range[0] < true_tail.exp().median() < tail_range[1]

    log_probs, _, tail = decode_top_k(encode_top_k(*top_k_with_tail(logits, k, 1.0), vocab, "uint8"), "uint8")
    error = ((tail.double() - true_tail).exp() - 1).abs()
    error_before = (tail_mass_as_rebuilt_before(true_log_probs.float()) / true_tail.exp() - 1).abs()
    print(f"true tail {true_tail.exp().median():.2e}: relative error of the stored tail median {error.median():.2%} "
          f"(max {error.max():.2%}), of 1 - sum(top-k) median {error_before.median():.0%} "
          f"(max {error_before.max():.0%})")
    assert error.max() < 0.01
    assert error.median() < error_before.median() / 10
    total_mass = log_probs.double().exp().sum(-1) + tail.double().exp()
    assert torch.allclose(total_mass, torch.ones(rows, dtype=torch.float64), atol=1e-6)


# --- sparse divergences -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_sparse_divergence_equals_the_dense_one_when_k_is_the_vocabulary(kind):
    torch.manual_seed(0)
    teacher_logits, model_logits = torch.randn(6, 50) * 3, torch.randn(6, 50) * 3
    log_probs, indices, tail = top_k_with_tail(teacher_logits, 50, temperature=2.0)
    assert torch.isneginf(tail).all()

    dense_input = model_logits.clone().requires_grad_()
    dense = divergence_sum(teacher_logits, dense_input, kind, temperature=2.0, beta=0.3)
    dense.backward()
    sparse_input = model_logits.clone().requires_grad_()
    sparse = sparse_divergence_sum(log_probs, indices, tail, sparse_input, kind, temperature=2.0, beta=0.3)
    sparse.backward()
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-5)
    assert torch.allclose(sparse_input.grad, dense_input.grad, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_divergence_is_a_close_lower_bound_at_small_k(kind):
    torch.manual_seed(1)
    teacher_logits = torch.randn(8, 200) * 4  # peaked, as trained LMs are: the top-32 holds most of the mass
    model_logits = (teacher_logits + torch.randn(8, 200)).requires_grad_()
    log_probs, indices, tail = top_k_with_tail(teacher_logits, 32, temperature=1.0)
    assert torch.allclose(log_probs.exp().sum(-1) + tail.exp(), torch.ones(8))

    dense = divergence_sum(teacher_logits, model_logits, kind)
    sparse = sparse_divergence_sum(log_probs, indices, tail, model_logits, kind)
    assert 0 < sparse.item() <= dense.item() + 1e-5  # merging tokens into buckets never increases a divergence
    assert sparse.item() > 0.8 * dense.item()
    sparse.backward()
    assert torch.isfinite(model_logits.grad).all() and model_logits.grad.abs().sum() > 0


def test_sparse_divergence_gradients_are_finite_with_an_empty_tail():
    torch.manual_seed(2)
    teacher_logits, model_logits = torch.randn(3, 10), torch.randn(3, 10).requires_grad_()
    log_probs, indices, tail = top_k_with_tail(teacher_logits, 10, temperature=1.0)
    total = sum(sparse_divergence_sum(log_probs, indices, tail, model_logits, kind) for kind in KINDS)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(model_logits.grad).all()


# --- refusals ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "wanted"), [("temperature", 1.0), ("k", 32), ("teacher_fingerprint", "0" * 64),
                                               ("dataset_fingerprint", "other"), ("mode", "hidden"),
                                               ("tokenizer_hash", "0" * 64), ("max_length", 64),
                                               ("teacher_dtype", "bfloat16")])
def test_a_cache_built_for_other_settings_is_refused(tmp_path, teacher, dataset, collator, identity, vocab_size, field,
                                                     wanted):
    cache_dir = build(tmp_path, teacher, dataset, collator, identity, vocab_size)
    expected = {**identity, "mode": "topk", "k": 16, "temperature": 2.0, "value_dtype": "uint8", field: wanted}
    with pytest.raises(CacheMismatchError) as error:
        TeacherCache.open(cache_dir, expected)
    cached = {**identity, "mode": "topk", "k": 16, "temperature": 2.0}[field]
    assert field in str(error.value) and repr(cached) in str(error.value) and repr(wanted) in str(error.value)
    assert "rebuild" in str(error.value)


def test_a_teacher_dtype_other_than_the_teachers_is_refused_when_building(tmp_path, teacher, dataset, collator,
                                                                          identity, vocab_size):
    with pytest.raises(ValueError, match=r"teacher_dtype = 'bfloat16' .*\(teacher_dtype = 'float32'\)"):
        build(tmp_path, teacher, dataset, collator, {**identity, "teacher_dtype": "bfloat16"}, vocab_size)


def test_a_cache_without_metadata_or_with_a_missing_shard_is_refused(tmp_path, teacher, dataset, collator, identity,
                                                                     vocab_size):
    cache_dir = build(tmp_path, teacher, dataset, collator, identity, vocab_size, world_size=3, ranks=[0, 2])
    with pytest.raises(CacheIncompleteError) as error:
        TeacherCache.open(cache_dir, {})
    assert str(error.value) == (f"{cache_dir}: no metadata.json, so the cache was never finished (or is being "
                                "rebuilt); build every shard, then write_metadata, or run teacher_cache.py")
    with pytest.raises(CacheIncompleteError, match="missing shard_00001 of 3"):
        write_metadata(cache_dir, identity)
    one_of_three = build(tmp_path, teacher, dataset, collator, identity, vocab_size, name="one", world_size=3,
                         ranks=[0])
    with pytest.raises(CacheIncompleteError) as error:
        write_metadata(one_of_three, identity)
    assert str(error.value) == (f"{one_of_three}: incomplete cache, missing shard_00001, shard_00002 of 3 shards; "
                                "build them (rank/world_size) or rebuild it")
    with pytest.raises(CacheIncompleteError) as error:
        write_metadata(tmp_path / "nothing_built", identity)
    assert str(error.value) == f"{tmp_path / 'nothing_built'}: no finished shard; run build_cache for every rank first"

    build_cache(teacher, dataset, cache_dir, mode="topk", k=16, temperature=2.0, vocab_size=vocab_size, batch_size=5,
                collator=collator, metadata=identity, rank=1, world_size=3)
    write_metadata(cache_dir, identity)
    shutil.rmtree(cache_dir / "shard_00002")
    with pytest.raises(CacheIncompleteError, match=f"^{re.escape(str(cache_dir))}: incomplete cache, missing "
                                                   "shard_00002 of 3 shards"):
        TeacherCache.open(cache_dir, {})


def test_shards_built_with_different_settings_are_refused(tmp_path, teacher, dataset, collator, identity, vocab_size):
    cache_dir = build(tmp_path, teacher, dataset, collator, identity, vocab_size, world_size=2)
    metadata = (cache_dir / "metadata.json").read_text()
    build_cache(teacher, dataset, cache_dir, mode="topk", k=16, temperature=1.0, vocab_size=vocab_size, batch_size=5,
                collator=collator, metadata=identity, rank=1, world_size=2)
    assert not (cache_dir / "metadata.json").exists()  # a cache being rebuilt cannot be opened
    with pytest.raises(CacheIncompleteError) as error:
        write_metadata(cache_dir, identity)
    assert str(error.value) == (f"{cache_dir}: shard_00001 was built with other settings (temperature: 1.0 instead "
                                "of 2.0); rebuild the cache")
    (cache_dir / "metadata.json").write_text(metadata)  # a stale metadata.json over the rebuilt shard
    with pytest.raises(CacheIncompleteError, match="temperature: 1.0 instead of 2.0"):
        TeacherCache.open(cache_dir, {})
    record_file = cache_dir / "shard_00001" / "shard.json"  # a shard whose record lacks a setting and has another
    record = json.loads(record_file.read_text())
    record["settings"] = {**{key: value for key, value in record["settings"].items() if key != "value_dtype"},
                          "temperature": 2.0, "format": "old"}
    record_file.write_text(json.dumps(record))
    with pytest.raises(CacheIncompleteError) as error:
        write_metadata(cache_dir, identity)
    assert str(error.value) == (f"{cache_dir}: shard_00001 was built with other settings (format: 'old' instead of "
                                "None, value_dtype: None instead of 'uint8'); rebuild the cache")
    build_cache(teacher, dataset, cache_dir, mode="topk", k=16, temperature=2.0, vocab_size=vocab_size, batch_size=5,
                collator=collator, metadata=identity, rank=1, world_size=2)
    with pytest.raises(CacheMismatchError) as error:  # the identity asked for is not the shards'
        write_metadata(cache_dir, {**identity, "max_length": 64})
    assert str(error.value).startswith(f"{cache_dir}: the teacher cache was built with max_length = {MAX_LENGTH}, but "
                                       "this run wants max_length = 64")


def test_a_shard_another_process_published_first_for_the_same_plan_is_kept_and_ours_dropped(
        tmp_path, teacher, dataset, collator, identity, vocab_size):
    """Two processes built the same shard at once: the second to finish finds the first's in place, for the same
    plan, and keeps it (files and all) rather than replacing it."""
    theirs = build(tmp_path, teacher, dataset, collator, identity, vocab_size, name="theirs") / "shard_00000"
    ours = build(tmp_path, teacher, dataset, collator, identity, vocab_size, name="ours") / "shard_00000"
    (theirs / "kept.txt").write_text("theirs")
    plan = {key: value for key, value in json.loads((ours / "shard.json").read_text()).items()
            if key not in ("pieces_done", "files")}
    assert teacher_cache._publish(ours, theirs, plan) == theirs
    assert (theirs / "kept.txt").read_text() == "theirs" and not ours.exists()


def test_a_build_that_finds_its_shard_published_meanwhile_for_its_plan_keeps_that_one(
        tmp_path, teacher, dataset, collator, identity, vocab_size, monkeypatch):
    """Another process publishes the same shard while this build runs its pieces: this build keeps theirs."""
    theirs = build(tmp_path, teacher, dataset, collator, identity, vocab_size, name="theirs") / "shard_00000"
    (theirs / "kept.txt").write_text("theirs")
    cache_dir = tmp_path / "cache"
    real_build_piece = teacher_cache._build_piece

    def meanwhile_published(*args):
        real_build_piece(*args)
        if not (cache_dir / "shard_00000").exists():
            shutil.copytree(theirs, cache_dir / "shard_00000")

    monkeypatch.setattr(teacher_cache, "_build_piece", meanwhile_published)
    build(tmp_path, teacher, dataset, collator, identity, vocab_size)
    assert (cache_dir / "shard_00000" / "kept.txt").read_text() == "theirs"


def test_example_ids_that_are_not_row_indices_are_refused(tmp_path, teacher, dataset, collator, identity, vocab_size):
    build(tmp_path, teacher, with_example_ids(dataset), collator, identity, vocab_size)
    with pytest.raises(ValueError) as error:
        build(tmp_path, teacher, with_example_ids(dataset).shuffle(seed=0), collator, identity, vocab_size)
    assert str(error.value) == ("the dataset's example_id column is not its row index (was it shuffled or selected "
                                "after with_example_ids?); cache the prepared split itself")


def test_an_example_supervised_from_its_second_token_has_every_position_cached(tmp_path, teacher, tokenizer, collator,
                                                                               identity, vocab_size):
    """Labels on every token (a plain-text example, no prompt): the positions predicting tokens 1.. are all cached,
    the first label included."""
    ids = tokenizer("a plain text example with every token supervised").input_ids
    plain = Dataset.from_list([{"input_ids": ids, "labels": ids}])
    cache = TeacherCache.open(build(tmp_path, teacher, plain, collator, identity, vocab_size), {})
    assert cache.metadata["num_positions"] == len(ids) - 1


def test_metadata_is_written_through_the_projects_atomic_write(tmp_path, teacher, dataset, collator, identity,
                                                               vocab_size, monkeypatch):
    written = []
    atomic_write = files.write_atomically
    monkeypatch.setattr(files, "write_atomically",
                        lambda path, text: (written.append(path), atomic_write(path, text)))
    cache_dir = build(tmp_path, teacher, dataset, collator, identity, vocab_size)
    # The staging shard's record (one write as it starts, one per piece, one with its files' checksums), then it is
    # renamed into place; metadata.json last.
    assert written == [cache_dir / ".shard_00000.partial" / "shard.json"] * 3 + [cache_dir / "metadata.json"]
    assert json.loads((cache_dir / "metadata.json").read_text())["k"] == 16


def test_a_batch_of_other_data_than_the_cached_is_refused(tmp_path, teacher, dataset, collator, identity, vocab_size):
    cache = TeacherCache.open(build(tmp_path, teacher, dataset, collator, identity, vocab_size), {})
    example_ids = [0, 1]
    rows = len(cache.topk_targets(example_ids)[0])
    supervised = int(predictor_mask(collator([dataset[i] for i in example_ids])["labels"]).sum())
    cache.check_positions(rows, example_ids, supervised)
    # The same examples cut to half their length, as a shorter max length would: other positions than were cached.
    halves = collator([{key: value[:len(value) // 2] for key, value in dataset[i].items()} for i in example_ids])
    fewer = int(predictor_mask(halves["labels"]).sum())
    assert fewer != supervised
    message = (rf"{re.escape(str(cache.cache_dir))}: .* holds {rows} positions for examples \[0, 1\] but the batch "
               rf"has {fewer} ")
    with pytest.raises(ValueError, match=message + "supervised positions: the cache was built for other data; rebuild"):
        cache.check_positions(rows, example_ids, fewer)


def test_a_cache_with_fewer_positions_than_the_batch_is_refused(tmp_path, teacher, dataset, collator, identity,
                                                                vocab_size):
    """A cache built on shorter examples (a smaller max length) holds fewer rows than the batch supervises: reading
    it must be refused, not trained on with targets shifted against the positions."""
    halves = dataset.map(lambda row: {key: value[:len(value) // 2] for key, value in row.items()})
    cache = TeacherCache.open(build(tmp_path, teacher, halves, collator, identity, vocab_size), {})
    example_ids = [0, 1]
    rows = len(cache.topk_targets(example_ids)[0])
    supervised = int(predictor_mask(collator([dataset[i] for i in example_ids])["labels"]).sum())
    assert rows < supervised
    with pytest.raises(ValueError, match=rf"holds {rows} positions for examples \[0, 1\] but the batch has "
                                         rf"{supervised} supervised positions: the cache was built for other data"):
        cache.check_positions(rows, example_ids, supervised)


# --- shards and memory maps -------------------------------------------------------------------------------------------

def test_two_shards_read_back_as_one(tmp_path, teacher, dataset, collator, identity, vocab_size):
    one = TeacherCache.open(build(tmp_path, teacher, dataset, collator, identity, vocab_size, name="one",
                                  batch_size=1), {"world_size": 1})
    two_dir = tmp_path / "two"
    for rank in (1, 0):  # written separately, in any order, as by two processes
        build(tmp_path, teacher, dataset, collator, identity, vocab_size, name="two", world_size=2, ranks=[rank],
              batch_size=1)
    write_metadata(two_dir, identity)
    two = TeacherCache.open(two_dir, {"world_size": 2})
    assert sorted(p.name for p in two_dir.iterdir()) == ["metadata.json", "shard_00000", "shard_00001"]
    for expected, actual in zip(one.topk_targets(SHUFFLED_IDS), two.topk_targets(SHUFFLED_IDS)):
        assert torch.equal(expected, actual)
    assert one.metadata["num_positions"] == two.metadata["num_positions"]


def test_reading_uses_memory_maps(tmp_path, teacher, dataset, collator, identity, vocab_size):
    cache = TeacherCache.open(build(tmp_path, teacher, dataset, collator, identity, vocab_size), {})
    arrays = cache.shards[0]
    assert set(arrays) == {"example_ids", "offsets", "id_low_bits", "id_block_starts", "values", "value_spans",
                           "tail_log_prob"}
    assert all(isinstance(array, np.memmap) for array in arrays.values())
    assert arrays["example_ids"].dtype == arrays["offsets"].dtype == np.int64
    with pytest.raises(KeyError) as error:
        cache.topk_targets([99])
    last = cache.metadata["num_examples"] - 1
    assert error.value.args[0] == f"example 99 is not in the teacher cache (it holds rows 0..{last})"
    whole = cache.topk_targets([0])
    for part, nothing in zip(whole, cache.topk_targets([])):  # no example: no rows, each part's shape and type
        assert nothing.shape == (0, *part.shape[1:]) and nothing.dtype == part.dtype


# --- fingerprint and command line -------------------------------------------------------------------------------------

def weights_folder(folder, size=4 << 20, seed=0):
    """A teacher folder as the fingerprint sees it: config.json and a weights file of `size` random bytes."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(np.random.default_rng(seed).bytes(size))
    return folder


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def test_a_hub_teachers_fingerprint_is_its_snapshots_commit_and_a_local_folder_is_hashed_whatever_its_name(
        tmp_path, teacher, monkeypatch):
    """A hub name resolves to its downloaded snapshot, whose commit identifies its weights (the hub never changes a
    commit's files), without reading them; a local folder named like a commit, outside a snapshots folder, is no
    snapshot: it is hashed."""
    teacher.save_pretrained(tmp_path / "saved")
    publish_to_hub_cache(tmp_path / "hub", "owner/teacher", "main", tmp_path / "saved")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert teacher_fingerprint("owner/teacher") == f"hub-commit-{hub_commit('main')}"
    shutil.copytree(tmp_path / "saved", tmp_path / hub_commit("main"))
    assert teacher_fingerprint(str(tmp_path / hub_commit("main"))) == teacher_fingerprint(str(tmp_path / "saved"))
    with pytest.raises(ValueError) as error:
        teacher_fingerprint("owner/other")
    assert str(error.value) == ("teacher 'owner/other' is neither a local folder nor a downloaded hub model: load it "
                                "once (from_pretrained) or pass its local folder")
    asked = []

    def snapshot_download(name, **options):  # records how it is asked, then finds nothing, as offline
        asked.append(options)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not downloaded")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ValueError, match="neither a local folder"):
        teacher_fingerprint("owner/another")
    assert asked == [{"local_files_only": True}]  # never the network, even where the hub is reachable


def test_teacher_fingerprint_follows_the_weights(tmp_path, teacher):
    teacher.save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert teacher_fingerprint(str(tmp_path / "a")) == teacher_fingerprint(str(tmp_path / "b"))
    flip_byte(next((tmp_path / "b").glob("*.safetensors")), -1)
    assert teacher_fingerprint(str(tmp_path / "a")) != teacher_fingerprint(str(tmp_path / "b"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .safetensors"):
        teacher_fingerprint(str(tmp_path / "empty"))


def test_a_teacher_changed_only_in_the_middle_of_its_weights_is_refused(tmp_path, tokenizer, teacher, dataset,
                                                                        collator, vocab_size):
    original, changed = weights_folder(tmp_path / "original"), weights_folder(tmp_path / "changed")
    flip_byte(changed / "model.safetensors", 2 << 20)  # 2 MiB from either end
    built_for = cache_identity(str(original), tokenizer, dataset, MAX_LENGTH, torch.float32)
    wanted = cache_identity(str(changed), tokenizer, dataset, MAX_LENGTH, torch.float32)
    assert built_for["teacher_fingerprint"] != wanted["teacher_fingerprint"]
    cache_dir = build(tmp_path, teacher, dataset, collator, {**built_for, "teacher": "tiny"}, vocab_size)
    with pytest.raises(CacheMismatchError, match="teacher_fingerprint"):
        TeacherCache.open(cache_dir, {**wanted, "teacher": "tiny"})


def test_a_teacher_changed_only_in_its_config_json_is_refused(tmp_path, tokenizer, teacher, dataset, collator,
                                                              vocab_size):
    """config.json changes the logits (rope, vocabulary, special tokens) with the same weights: it is part of the
    teacher's identity, so a cache built before the edit is never reused after it."""
    folder = saved_teacher(tmp_path / "teacher", teacher, tokenizer)
    weights = {path.name: path.read_bytes() for path in folder.glob("*.safetensors")}
    built_for = cache_identity(str(folder), tokenizer, dataset, MAX_LENGTH, torch.float32)
    cache_dir = build(tmp_path, teacher, dataset, collator, built_for, vocab_size)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    assert config["eos_token_id"] != tokenizer.pad_token_id
    config["eos_token_id"] = tokenizer.pad_token_id  # another special token, as a re-released config might have
    config_file.write_text(json.dumps(config, indent=2))
    assert {path.name: path.read_bytes() for path in folder.glob("*.safetensors")} == weights  # weights untouched
    wanted = cache_identity(str(folder), tokenizer, dataset, MAX_LENGTH, torch.float32)
    assert wanted["teacher_fingerprint"] != built_for["teacher_fingerprint"]
    with pytest.raises(CacheMismatchError, match="teacher_fingerprint"):
        TeacherCache.open(cache_dir, wanted)
    TeacherCache.open(cache_dir, built_for)  # the identity it was built for still opens it


def test_the_identity_for_another_split_is_what_cache_identity_gives_that_split(tmp_path, tokenizer, dataset):
    folder, other_split = weights_folder(tmp_path / "teacher", size=1024), dataset.select(range(3))
    assert other_split._fingerprint != dataset._fingerprint
    identity = cache_identity(str(folder), tokenizer, dataset, MAX_LENGTH, torch.float32)
    metadata = {**identity, "mode": "topk", "k": 16, "num_positions": 5}  # a cache's metadata holds more fields
    assert identity_for_split(metadata, other_split) == cache_identity(str(folder), tokenizer, other_split,
                                                                       MAX_LENGTH, torch.float32)


def test_weight_hashes_are_remembered_by_path_size_and_modification_time(tmp_path):
    folder, memo = weights_folder(tmp_path / "teacher"), tmp_path / "memo.json"
    weights = folder / "model.safetensors"
    first = teacher_fingerprint(str(folder), memo)
    (entry,) = json.loads(memo.read_text()).values()
    assert entry["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()

    stat = weights.stat()
    flip_byte(weights, 100)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same path, size and time: the memo answers
    assert teacher_fingerprint(str(folder), memo) == first
    assert teacher_fingerprint(str(folder)) != first  # hashed again without the memo, the change shows
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert teacher_fingerprint(str(folder), memo) == teacher_fingerprint(str(folder)) != first


def test_each_teachers_weights_are_remembered_under_their_own_path_in_a_memo_made_where_asked(tmp_path,
                                                                                                monkeypatch):
    """Two teachers whose weights have the same size and modification time share a memo (in folders it makes),
    each hash under its own file's path; a fingerprint that hashes nothing new leaves the memo unwritten."""
    memo = tmp_path / "cache" / "not" / "made" / "memo.json"
    one, other = weights_folder(tmp_path / "one", seed=0), weights_folder(tmp_path / "other", seed=1)
    stat = (one / "model.safetensors").stat()
    os.utime(other / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert teacher_fingerprint(str(one), memo) == teacher_fingerprint(str(one))
    assert teacher_fingerprint(str(other), memo) == teacher_fingerprint(str(other)) != teacher_fingerprint(str(one))
    assert len(json.loads(memo.read_text())) == 2
    monkeypatch.setattr(teacher_cache.files, "write_atomically", lambda *args: pytest.fail("the memo was rewritten"))
    assert teacher_fingerprint(str(one), memo) == teacher_fingerprint(str(one))


def test_a_hub_snapshot_is_identified_by_its_commit(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshots = tmp_path / "models--org--teacher" / "snapshots"
    snapshot = weights_folder(snapshots / commit, size=1024)
    assert teacher_fingerprint(str(snapshot)) == f"hub-commit-{commit}"
    assert teacher_fingerprint(str(weights_folder(snapshots / ("f" * 40), size=1024))) == f"hub-commit-{'f' * 40}"
    shutil.copytree(snapshot, tmp_path / "copy")  # the same files outside a snapshot: their content decides
    assert not teacher_fingerprint(str(tmp_path / "copy")).startswith("hub-commit-")
    assert not teacher_fingerprint(str(tmp_path / "copy")).startswith("hub-commit")


def saved_teacher(folder, teacher, tokenizer):
    """The teacher saved as a model folder with its tokenizer."""
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def command_line_inputs(tmp_path, teacher, tokenizer, dataset):
    """The teacher saved as a folder with its tokenizer, and `dataset` as the train split of a prepared folder."""
    teacher_dir, data_dir = saved_teacher(tmp_path / "teacher", teacher, tokenizer), tmp_path / "data"
    data_metadata = {"tokenizer_sha256": preprocess_dataset.tokenizer_sha256(tokenizer), "max_length": MAX_LENGTH}
    preprocess_dataset.save_dataset(DatasetDict({"train": dataset, "test": dataset.select(range(2))}), data_metadata,
                                    data_dir)
    return teacher_dir, data_dir


def test_command_line_builds_a_cache_that_opens_for_its_settings(tmp_path, teacher, tokenizer, dataset):
    teacher_dir, data_dir = command_line_inputs(tmp_path, teacher, tokenizer, dataset)
    assert build_teacher_cache.main(["--teacher", str(teacher_dir), "--data_dir", str(data_dir), "--output_dir",
                               str(tmp_path / "cache"), "--k", "8", "--temperature", "1.5", "--batch_size", "4",
                               "--dtype", "float32"]) == 0

    train_split = preprocess_dataset.load_dataset_dir(data_dir)[0]["train"]
    expected = {**cache_identity(str(teacher_dir), tokenizer, train_split, MAX_LENGTH, torch.float32), "mode": "topk",
                "k": 8, "temperature": 1.5, "vocab_size": len(tokenizer)}
    log_probs, indices, _ = TeacherCache.open(tmp_path / "cache", expected).topk_targets([0, 1])
    supervised = sum(int((np.asarray(dataset[i]["labels"][1:]) != -100).sum()) for i in (0, 1))
    assert log_probs.shape == indices.shape == (supervised, 8)
    assert (tmp_path / teacher_cache.FINGERPRINT_MEMO_FILE).is_file()  # next to the cache


def test_command_line_reuses_a_matching_cache_and_refuses_another(tmp_path, teacher, tokenizer, dataset,
                                                                   monkeypatch):
    teacher_dir, data_dir = command_line_inputs(tmp_path, teacher, tokenizer, dataset)

    def command(k: str) -> list[str]:
        return ["--teacher", str(teacher_dir), "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "cache"),
                "--k", k, "--batch_size", "4", "--dtype", "float32"]

    builds = []
    real_build = teacher_cache.build_cache
    monkeypatch.setattr(teacher_cache, "build_cache", lambda *args, **kwargs: builds.append(kwargs["k"]) or
                        real_build(*args, **kwargs))
    build_teacher_cache.main(command("8"))
    build_teacher_cache.main(command("8"))  # the same settings: opened, not built again
    assert builds == [8]
    before = {path: path.stat().st_mtime_ns for path in (tmp_path / "cache").rglob("*")}
    with pytest.raises(teacher_cache.CacheMismatchError, match="built with k = 8, but this run wants k = 4"):
        build_teacher_cache.main(command("4"))  # other settings in the same folder: refused, the cache kept
    assert builds == [8]
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "cache").rglob("*")} == before


def test_a_cache_folder_is_named_by_every_setting_and_the_format(tmp_path):
    identity = {"teacher": "t", "teacher_fingerprint": "f", "dataset_fingerprint": "d"}
    settings = teacher_cache.cache_settings("topk", 100, 8, 1.0, "uint8")
    folder = teacher_cache.cache_folder(tmp_path, identity, settings)
    assert folder.parent == tmp_path and folder.name.startswith("topk-")
    assert teacher_cache.cache_folder(tmp_path, identity, dict(settings)) == folder
    others = [teacher_cache.cache_folder(tmp_path, {**identity, "dataset_fingerprint": "e"}, settings),
              teacher_cache.cache_folder(tmp_path, identity, {**settings, "k": 16}),
              teacher_cache.cache_folder(tmp_path, identity, teacher_cache.cache_settings("hidden", 100, 8, 1.0,
                                                                                          "uint8"))]
    assert len({folder, *others}) == 4
    assert teacher_cache.cache_settings("hidden", 100, 8, 1.0, "uint8") == {"mode": "hidden", "vocab_size": 100}
    assert teacher_cache.cache_settings("topk", 100, 8, 1.0, "float16") == {
        "mode": "topk", "vocab_size": 100, "k": 8, "temperature": 1.0, "value_dtype": "float16"}


# --- building in pieces: kills, preemption signals, other builds ------------------------------------------------------

PIECE = 3  # examples per piece here: the 12 examples make 4 pieces of 2 batches (batch size 2)


def piece_command(teacher_dir, data_dir, output_dir):
    return ["--teacher", str(teacher_dir), "--data_dir", str(data_dir), "--output_dir", str(output_dir), "--k", "8",
            "--batch_size", "2", "--dtype", "float32"]


@pytest.fixture
def teacher_calls(monkeypatch):
    """Pieces of PIECE examples, and the batches the teacher's body runs on, counted: one entry per batch."""
    monkeypatch.setattr(teacher_cache, "PIECE_EXAMPLES", PIECE)
    calls = []
    real_hidden_at = teacher_cache.hidden_at
    monkeypatch.setattr(teacher_cache, "hidden_at", lambda *args: calls.append(1) or real_hidden_at(*args))
    return calls


def files_in(folder):
    """Every file under `folder`, by relative path, with its bytes."""
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def pieces_done(cache_dir):
    return json.loads((cache_dir / ".shard_00000.partial" / "shard.json").read_text())["pieces_done"]


KILLED_BUILD = """
import sys
import time

import build_teacher_cache
from slm_ensembles import teacher_cache

teacher_cache.PIECE_EXAMPLES = {piece}
real_hidden_at = teacher_cache.hidden_at
calls = []


def hidden_at_then_hang(*args):
    calls.append(1)
    if len(calls) == {hang_at}:  # the first batch of the third piece: two pieces are published; wait to be killed
        open(sys.argv[1], "w").close()
        time.sleep(600)
    return real_hidden_at(*args)


teacher_cache.hidden_at = hidden_at_then_hang
sys.exit(build_teacher_cache.run_from_command_line(sys.argv[2:]))
"""


def test_a_killed_build_continues_at_its_first_missing_piece_and_equals_an_uninterrupted_one(
        tmp_path, teacher, tokenizer, dataset, teacher_calls):
    teacher_dir, data_dir = command_line_inputs(tmp_path, teacher, tokenizer, dataset)
    assert build_teacher_cache.main(piece_command(teacher_dir, data_dir, tmp_path / "uninterrupted")) == 0
    assert len(teacher_calls) == 8

    cache_dir, hanging = tmp_path / "cache", tmp_path / "hanging"
    environment = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # this process's float sums
    build = subprocess.Popen([sys.executable, "-c", KILLED_BUILD.format(piece=PIECE, hang_at=5), str(hanging),
                              *piece_command(teacher_dir, data_dir, cache_dir)], cwd=ROOT, env=environment)
    try:
        deadline = time.monotonic() + 180
        while not hanging.exists():
            assert build.poll() is None and time.monotonic() < deadline, "the build never reached its third piece"
            time.sleep(0.1)
    finally:
        build.kill()  # SIGKILL
        build.wait(timeout=60)
    assert pieces_done(cache_dir) == 2
    assert not (cache_dir / "shard_00000").exists() and not (cache_dir / "metadata.json").exists()

    teacher_calls.clear()
    assert build_teacher_cache.main(piece_command(teacher_dir, data_dir, cache_dir)) == 0
    assert len(teacher_calls) == 4  # pieces 3 and 4: the two published before the kill are kept, not recomputed
    assert sorted(path.name for path in cache_dir.iterdir()) == ["metadata.json", "shard_00000"]
    assert files_in(cache_dir) == files_in(tmp_path / "uninterrupted")


def test_a_preemption_signal_stops_the_build_between_pieces_and_a_live_build_is_waited_for(
        tmp_path, teacher, tokenizer, dataset, teacher_calls, monkeypatch, capsys):
    teacher_dir, data_dir = command_line_inputs(tmp_path, teacher, tokenizer, dataset)
    cache_dir = tmp_path / "cache"
    command = piece_command(teacher_dir, data_dir, cache_dir)
    counted_hidden_at = teacher_cache.hidden_at

    def signal_in_the_second_piece(*args):
        if len(teacher_calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return counted_hidden_at(*args)

    with monkeypatch.context() as patch:
        patch.setattr(teacher_cache, "hidden_at", signal_in_the_second_piece)
        assert build_teacher_cache.run_from_command_line(command) == processes.EXIT_PREEMPTED
    assert len(teacher_calls) == 4 and pieces_done(cache_dir) == 2  # the second piece finished, the third not begun
    assert "preempted with 2 of 4 pieces of shard_00000 built, which are kept" in capsys.readouterr().out
    assert not (cache_dir / "metadata.json").exists()

    # Another process holds the shard's lock: it is building it now. A build waits (here until it is preempted
    # too) and leaves that build's staging folder as it is.
    kept = files_in(cache_dir / ".shard_00000.partial")
    live_build = os.open(cache_dir / ".shard_00000.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(live_build, fcntl.LOCK_EX)
    real_try_lock = teacher_cache.files.try_lock

    def signal_while_waiting(path):
        held = real_try_lock(path)
        if held is None:
            os.kill(os.getpid(), signal.SIGUSR1)
        return held

    with monkeypatch.context() as patch:
        patch.setattr(teacher_cache.files, "try_lock", signal_while_waiting)
        assert build_teacher_cache.run_from_command_line(command) == processes.EXIT_PREEMPTED
    os.close(live_build)  # that build ends
    assert f"{cache_dir}: preempted while waiting for another build of this cache" in capsys.readouterr().out
    assert len(teacher_calls) == 4 and files_in(cache_dir / ".shard_00000.partial") == kept

    assert build_teacher_cache.run_from_command_line(command) == 0
    assert len(teacher_calls) == 8  # 4 more: the last two pieces
    assert sorted(path.name for path in cache_dir.iterdir()) == ["metadata.json", "shard_00000"]


class SignalAfter:
    """A preemption signal that has come after `checks` checks (received_anywhere, as PreemptionSignal's)."""

    def __init__(self, checks):
        self.checks = checks

    def received_anywhere(self, device):
        self.checks -= 1
        return self.checks < 0


def test_a_build_stopped_before_its_first_piece_is_started_again_whole(tmp_path, teacher, dataset, collator, identity,
                                                                      vocab_size, teacher_calls):
    """A signal before the first piece leaves the staging folder with its arrays allocated and no piece done: the
    next build takes nothing from it."""
    arguments = dict(mode="topk", k=16, temperature=2.0, vocab_size=vocab_size, batch_size=2, collator=collator,
                     metadata=identity, piece_examples=PIECE)
    with pytest.raises(BuildPreempted, match="with 0 of 4 pieces"):
        build_cache(teacher, dataset, tmp_path / "cache", preemption=SignalAfter(0), **arguments)
    (staging,) = (tmp_path / "cache").glob(".shard_00000.partial*")
    assert json.loads((staging / "shard.json").read_text())["pieces_done"] == 0
    teacher_calls.clear()
    build_cache(teacher, dataset, tmp_path / "cache", **arguments)
    assert len(teacher_calls) == 8  # every piece built
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == ["shard_00000"]


def test_a_collator_that_cuts_labels_is_refused_saying_how_many_positions_are_missing(tmp_path, teacher, dataset,
                                                                                        collator, identity,
                                                                                        vocab_size):
    """The second batch cut to 8 tokens: its supervised positions fall short of its examples' labels."""
    batches, cut = [], []

    def cutting_collator(examples):
        batch = collator(examples)
        batches.append(batch)
        if len(batches) == 2:
            batch = {name: value[:, :8] for name, value in batch.items()}
            cut.append(int(predictor_mask(batch["labels"]).sum()))
        return batch

    with pytest.raises(RuntimeError) as error:
        build_cache(teacher, dataset, tmp_path / "cache", mode="topk", k=16, temperature=2.0, vocab_size=vocab_size,
                    batch_size=2, collator=cutting_collator, metadata=identity)
    labelled = sum(int(np.count_nonzero(np.asarray(labels[1:]) != -100)) for labels in dataset["labels"][2:4])
    assert cut[0] < labelled
    assert str(error.value) == (f"the collated batch has {cut[0]} supervised positions, the examples' labels "
                                f"{labelled}: the collator must keep every label (no truncation)")


def test_a_continued_build_says_where_it_goes_on_and_needs_disk_only_for_the_pieces_left(
        tmp_path, teacher, dataset, collator, identity, vocab_size, teacher_calls, capsys, monkeypatch):
    cache_dir = tmp_path / "cache"
    arguments = dict(mode="topk", k=16, temperature=2.0, vocab_size=vocab_size, batch_size=2, collator=collator,
                     metadata=identity, piece_examples=PIECE)
    with pytest.raises(BuildPreempted) as error:
        build_cache(teacher, dataset, cache_dir, preemption=SignalAfter(2), **arguments)
    assert str(error.value) == (f"{cache_dir}: preempted with 2 of 4 pieces of shard_00000 built, which are kept: run "
                                "the same command again to continue the build")
    staging = cache_dir / ".shard_00000.partial"
    offsets = np.load(staging / "offsets.npy")
    settings = json.loads((staging / "shard.json").read_text())["settings"]
    needed = teacher_cache.payload_bytes(settings, int(offsets[-1] - offsets[2 * PIECE]))  # no ids or offsets again
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "disk_usage", lambda path: type("Usage", (), {"free": needed - 1})())
        with pytest.raises(files.DiskSpaceError, match=f"but about {needed:,} bytes are needed for the teacher "):
            build_cache(teacher, dataset, cache_dir, **arguments)
    capsys.readouterr()
    build_cache(teacher, dataset, cache_dir, **arguments)
    assert capsys.readouterr().out == f"{cache_dir}: continuing shard_00000 at piece 3 of 4\n"


def test_a_build_killed_after_its_last_piece_publishes_it_next_time_without_the_teacher(
        tmp_path, teacher, dataset, collator, identity, vocab_size, teacher_calls, capsys, monkeypatch):
    arguments = dict(mode="topk", k=16, temperature=2.0, vocab_size=vocab_size, batch_size=2, collator=collator,
                     metadata=identity, piece_examples=PIECE)
    with monkeypatch.context() as patch:
        patch.setattr(teacher_cache, "_publish", lambda *args: pytest.fail("killed before publishing"))
        with pytest.raises(pytest.fail.Exception):
            build_cache(teacher, dataset, tmp_path / "cache", **arguments)
    teacher_calls.clear()
    capsys.readouterr()
    build_cache(teacher, dataset, tmp_path / "cache", **arguments)
    assert teacher_calls == [] and capsys.readouterr().out == ""
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == ["shard_00000"]


@pytest.mark.parametrize("settings, message", [
    (dict(k=0), "k = 0 must be between 1 and the vocabulary size {V}"),
    (dict(k="V+1"), "k = {V1} must be between 1 and the vocabulary size {V}"),
    (dict(value_dtype="int4"), "unknown value_dtype 'int4': use one of ('uint8', 'float16')"),
    (dict(metadata_k=5), "metadata k = 5, temperature = 1.0 contradict the teacher and arguments build_cache is "
                         "given (k = 16, temperature = 2.0)"),
])
def test_a_build_with_impossible_settings_is_refused_saying_which(tmp_path, teacher, dataset, collator, identity,
                                                                  vocab_size, settings, message):
    settings = dict(settings)
    if settings.get("k") == "V+1":
        settings["k"] = vocab_size + 1
    metadata = ({**identity, "k": settings.pop("metadata_k"), "temperature": 1.0} if "metadata_k" in settings
                else identity)
    with pytest.raises(ValueError) as error:
        build(tmp_path, teacher, dataset, collator, metadata, vocab_size, **settings)
    assert str(error.value) == message.format(V=vocab_size, V1=vocab_size + 1)


def test_the_smallest_top_k_and_a_hidden_cache_with_no_value_dtype_build(tmp_path, teacher, dataset, collator,
                                                                         identity, vocab_size):
    """k = 1 is a top-k cache (the teacher's argmax and the rest as its tail); a hidden-state cache needs no value
    dtype (open_or_build gives it none) and records its float16."""
    one = TeacherCache.open(build(tmp_path, teacher, dataset, collator, identity, vocab_size, k=1, name="one"), {})
    assert one.topk_targets([0])[0].shape[1] == 1
    hidden = build(tmp_path, teacher, dataset, collator, identity, vocab_size, mode="hidden", value_dtype=None)
    assert TeacherCache.open(hidden, {}).metadata["value_dtype"] == "float16"


def test_an_unknown_cache_mode_is_refused_naming_the_modes(tmp_path, teacher, dataset, collator, identity, vocab_size):
    with pytest.raises(ValueError) as error:
        build(tmp_path, teacher, dataset, collator, identity, vocab_size, mode="online")
    assert str(error.value) == f"unknown cache mode 'online': use one of {teacher_cache.MODES}"


def test_a_leftover_for_other_settings_is_removed_and_a_published_shard_kept(tmp_path, teacher, dataset, collator,
                                                                            identity, vocab_size, teacher_calls):
    cache_dir = tmp_path / "cache"
    arguments = dict(mode="topk", k=16, vocab_size=vocab_size, batch_size=2, collator=collator, metadata=identity,
                     piece_examples=PIECE)
    with pytest.raises(BuildPreempted, match="with 2 of 4 pieces"):
        build_cache(teacher, dataset, cache_dir, temperature=2.0, preemption=SignalAfter(2), **arguments)
    (cache_dir / ".shard_00000.partial-k2b9x").mkdir()  # a staging folder an earlier version left behind
    teacher_calls.clear()
    build_cache(teacher, dataset, cache_dir, temperature=1.0, **arguments)
    assert len(teacher_calls) == 8  # nothing of the build at T = 2 was taken
    assert sorted(path.name for path in cache_dir.iterdir()) == ["shard_00000"]
    assert json.loads((cache_dir / "shard_00000" / "shard.json").read_text())["settings"]["temperature"] == 1.0
    build_cache(teacher, dataset, cache_dir, temperature=1.0, **arguments)
    assert len(teacher_calls) == 8  # published for the same settings: kept as it is


def test_a_preemption_while_main_builds_the_cache_exits_75_before_the_run_folder(tiny_teacher_dir, tmp_path,
                                                                                   teacher_calls, monkeypatch,
                                                                                   capsys):
    counted_hidden_at = teacher_cache.hidden_at

    def signal_in_the_first_piece(*args):
        if not teacher_calls:
            os.kill(os.getpid(), signal.SIGTERM)
        return counted_hidden_at(*args)

    monkeypatch.setattr(teacher_cache, "hidden_at", signal_in_the_first_piece)
    assert main.main(["--preset", "test", "--teacher", str(tiny_teacher_dir), "--dataset",
                      str(DATA_DIR / "chats.jsonl"), "--output_root", str(tmp_path / "runs"), "--cache_dir",
                      str(tmp_path / "cache"), "--teacher_mode", "topk"]) == processes.EXIT_PREEMPTED
    assert "preempted with 1 of 11 pieces of shard_00000 built" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()
    (cache_dir,) = (tmp_path / "cache" / "teacher_cache").iterdir()
    assert pieces_done(cache_dir) == 1


# --- integrity and disk -----------------------------------------------------------------------------------------------

def test_a_shard_missing_an_array_file_is_refused_naming_the_files(tmp_path, teacher, dataset, collator, identity,
                                                                    vocab_size):
    cache_dir = build(tmp_path, teacher, dataset, collator, identity, vocab_size)
    for name in ("values", "value_spans"):
        (cache_dir / "shard_00000" / f"{name}.npy").unlink()
    with pytest.raises(CacheIncompleteError) as error:
        TeacherCache.open(cache_dir, {})
    assert str(error.value) == f"{cache_dir / 'shard_00000'}: missing values, value_spans.npy; rebuild the cache"


def test_a_cache_file_changed_since_it_was_built_is_refused_naming_it(tmp_path, teacher, dataset, collator, identity,
                                                                     vocab_size, monkeypatch):
    cache_dir = build(tmp_path, teacher, dataset, collator, identity, vocab_size)
    values = cache_dir / "shard_00000" / "values.npy"
    intact = values.read_bytes()
    values.write_bytes(intact[:-64] + bytes(255 - code for code in intact[-64:]))  # other codes, the same size
    with pytest.raises(CacheCorruptError) as error:
        TeacherCache.open(cache_dir, {})
    assert str(error.value).startswith(f"{values}: holds {len(intact):,} bytes with sha256 ")
    assert f"delete {cache_dir} to rebuild the cache" in str(error.value)
    assert isinstance(error.value, CacheMismatchError)  # bad input: main.py exits with code 2

    values.write_bytes(intact)
    hashed = []
    real_file_record = checksums.file_record
    monkeypatch.setattr(checksums, "file_record", lambda path: hashed.append(path.name) or real_file_record(path))
    TeacherCache.open(cache_dir, {})
    TeacherCache.open(cache_dir, {})
    assert sorted(hashed) == sorted(path.name for path in values.parent.glob("*.npy"))  # once in this process

    shutil.rmtree(cache_dir)  # rebuilt in the same folder, with new records: read in full again, and refused
    build(tmp_path, teacher, dataset, collator, identity, vocab_size, temperature=1.0)
    rebuilt = values.read_bytes()
    values.write_bytes(rebuilt[:-64] + bytes(255 - code for code in rebuilt[-64:]))
    with pytest.raises(CacheCorruptError, match=f"^{re.escape(str(values))}: holds "):
        TeacherCache.open(cache_dir, {})


def test_a_builds_disk_need_is_summed_over_its_process_group(tmp_path):
    """Without a process group a process counts its own need; in a group of two (this process and another, as a
    two-process build runs) each gets the group's sum, 1 + 2, to check against the disk they share."""
    assert teacher_cache._sum_over_processes(7, torch.device("cpu")) == 7
    store, timeout = f"file://{tmp_path / 'store'}", datetime.timedelta(seconds=60)
    # The other process runs from the project's folder, as its commands do (a tool that wraps the code, such as
    # mutmut, finds its settings there).
    other = subprocess.Popen([sys.executable, "-c", (
        f"import datetime, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport torch\n"
        "from slm_ensembles import teacher_cache\n"
        f"torch.distributed.init_process_group('gloo', init_method={store!r}, rank=1, world_size=2, "
        f"timeout=datetime.timedelta(seconds={timeout.seconds}))\n"
        "print(teacher_cache._sum_over_processes(2, torch.device('cpu')))\n"
        "torch.distributed.destroy_process_group()\n")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        torch.distributed.init_process_group("gloo", init_method=store, rank=0, world_size=2, timeout=timeout)
        try:
            assert teacher_cache._sum_over_processes(1, torch.device("cpu")) == 3
        finally:
            torch.distributed.destroy_process_group()
        printed, errors = other.communicate(timeout=120)
    finally:
        other.kill()
    assert other.returncode == 0, errors
    assert printed.split() == ["3"]


@pytest.mark.parametrize("mode", ["topk", "hidden"])
def test_a_build_the_free_disk_cannot_hold_is_refused_before_it_writes(tmp_path, teacher, dataset, collator,
                                                                       identity, vocab_size, mode, monkeypatch):
    real_disk_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_disk_usage(path)._replace(free=1000))
    with pytest.raises(files.DiskSpaceError) as error:
        build(tmp_path, teacher, dataset, collator, identity, vocab_size, mode=mode)
    positions = sum(int(np.count_nonzero(np.asarray(labels[1:]) != -100)) for labels in dataset["labels"])
    # k = 16: the ids' low bits 2 x 16 B, uint8 values 16 B, the span and the tail 2 B each; hidden: 32 float16s.
    per_position = 52 if mode == "topk" else 64
    needed = per_position * positions + 8 * (2 * len(dataset) + 1)  # and each example's id and offset
    assert str(error.value) == (f"{tmp_path / 'cache'}: 1,000 bytes free, but about {needed:,} bytes are needed for "
                                "the teacher cache's pieces still to be written; free some space, or build the cache "
                                "on a larger disk (teacher_cache.py --output_dir) and point teacher_cache_dir at it")
    assert list((tmp_path / "cache").iterdir()) == []


# --- a run's cache in a folder of its own: teacher_cache_dir ----------------------------------------------------------

def run_with_cache_dir(tmp_path, teacher, tokenizer):
    """A run's config (the test preset, top-k at k = 8 and T = 1.5, the training cache in teacher_cache_dir); its
    teacher, tokenizer and training split, as main.py loads and prepares them; the folder of that prepared data."""
    config = config_lib.build_config("test", None, {
        "teacher": str(saved_teacher(tmp_path / "teacher", teacher, tokenizer)),
        "dataset": str(DATA_DIR / "chats.jsonl"), "cache_dir": str(tmp_path / "cache"), "teacher_mode": "topk",
        "cache_k": 8, "temperature": 1.5, "dtype": "float32", "teacher_cache_dir": str(tmp_path / "built")})
    state = utils.process_state()
    teacher_path, run_tokenizer = teacher_lib.teacher_tokenizer(config, state)
    run_teacher = teacher_lib.whole_teacher(config, teacher_path, run_tokenizer, state)
    train = preprocess_dataset.prepare_for_run(config, run_tokenizer)[0]["train"]
    return config, (teacher_path, run_tokenizer, run_teacher, train), preprocess_dataset.run_data_folder(
        config, run_tokenizer)


def build_for_the_run(config, data_dir, *options):
    """teacher_cache.py into the run's teacher_cache_dir, as a job before the run would: with the run's teacher,
    dtype and prepared data (main.py --prepare_only says where it is)."""
    assert build_teacher_cache.main(["--teacher", config.teacher, "--data_dir", str(data_dir), "--output_dir",
                               config.teacher_cache_dir, "--dtype", config.dtype, "--batch_size", "4", *options]) == 0


def test_a_cache_the_command_line_built_is_the_one_a_run_opens_from_teacher_cache_dir(tmp_path, teacher, tokenizer,
                                                                                      monkeypatch):
    config, (teacher_path, run_tokenizer, run_teacher, train), data_dir = run_with_cache_dir(tmp_path, teacher,
                                                                                             tokenizer)
    build_for_the_run(config, data_dir, "--k", "8", "--temperature", "1.5")
    monkeypatch.setattr(teacher_cache, "build_cache", lambda *args, **kwargs: pytest.fail("the run built a cache"))
    cache = teacher_cache.training_cache(config, lambda: run_teacher, run_teacher.dtype, teacher_path, run_tokenizer,
                                         train, PaddingCollator(run_tokenizer.pad_token_id), utils.process_state())
    assert cache.cache_dir == Path(config.teacher_cache_dir)
    assert cache.metadata["num_examples"] == len(train) and cache.metadata["k"] == 8
    assert cache.metadata["teacher"] == str(teacher_path)  # which teacher, said in words beside its fingerprint
    assert not (tmp_path / "cache" / "teacher_cache").exists()
    memo = json.loads((tmp_path / "cache" / teacher_cache.FINGERPRINT_MEMO_FILE).read_text())
    assert list(memo) == [str(Path(teacher_path) / "model.safetensors")]  # its hash kept for the next run


class ProcessInTurn:
    """Process `process_index` of `num_processes`, played one after another in this one: the part of accelerate's
    PartialState that open_or_build uses."""

    def __init__(self, process_index: int, num_processes: int):
        self.process_index, self.num_processes = process_index, num_processes
        self.is_main_process = process_index == 0

    def wait_for_everyone(self):
        pass


def test_each_process_builds_its_own_shard_in_the_caches_settings_and_the_main_one_finishes_it(
        tmp_path, teacher, tokenizer, chats, collator, identity, vocab_size, capsys):
    split = Dataset.from_list([row for row in (tokenize_conversation(chat["messages"], tokenizer, max_length=MAX_LENGTH)
                                               for chat in chats) if row is not None][:NUM_EXAMPLES])
    settings = teacher_cache.cache_settings("topk", vocab_size, 8, 2.0, "float16")

    def open_or_build(process_index):
        return teacher_cache.open_or_build(tmp_path / "cache", lambda: teacher, split, identity, settings,
                                           batch_size=5, collator=collator, state=ProcessInTurn(process_index, 2))

    with pytest.raises(CacheIncompleteError, match="no metadata.json"):  # the main process finishes it, not yet
        open_or_build(1)
    cache = open_or_build(0)
    assert capsys.readouterr().out == f"building the teacher cache (topk) in {tmp_path / 'cache'}\n" * 2
    assert cache.metadata["world_size"] == 2 and cache.metadata["value_dtype"] == "float16"
    assert cache.metadata["num_examples"] == len(split)
    open_or_build(1)  # finished: every process opens it, and nothing is built again
    assert capsys.readouterr().out == ""


def test_an_online_teacher_has_no_training_cache_and_nothing_is_hashed_or_loaded(tmp_path):
    config = config_lib.build_config("test", None, {"teacher_mode": "online", "cache_dir": str(tmp_path)})
    assert teacher_cache.training_cache(config, lambda: pytest.fail("the teacher was loaded"), torch.float32,
                                        "no/teacher", None, None, None, None) is None
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("option", "field", "built", "wanted"), [("--k", "k", 4, 8),
                                                                  ("--temperature", "temperature", 1.0, 1.5)])
def test_a_teacher_cache_dir_built_with_another_k_or_temperature_is_refused_naming_it(tmp_path, teacher, tokenizer,
                                                                                       option, field, built, wanted):
    config, (teacher_path, run_tokenizer, run_teacher, train), data_dir = run_with_cache_dir(tmp_path, teacher,
                                                                                             tokenizer)
    options = {"--k": "8", "--temperature": "1.5", option: str(built)}  # the run's, but for one
    build_for_the_run(config, data_dir, *[word for pair in options.items() for word in pair])
    kept = files_in(Path(config.teacher_cache_dir))
    with pytest.raises(CacheMismatchError) as error:
        teacher_cache.training_cache(config, lambda: run_teacher, run_teacher.dtype, teacher_path, run_tokenizer,
                                     train, PaddingCollator(run_tokenizer.pad_token_id), utils.process_state())
    message = str(error.value)
    assert message == (f"{config.teacher_cache_dir}: the teacher cache was built with {field} = {built!r}, but this "
                       f"run wants {field} = {wanted!r}; point teacher_cache_dir at a cache built for this run's "
                       "settings, or rebuild this one for them (delete the folder, then run again or build it with "
                       "teacher_cache.py)")
    assert files_in(Path(config.teacher_cache_dir)) == kept


def test_teacher_cache_dir_needs_a_cached_teacher_mode():
    with pytest.raises(config_lib.ConfigError, match="'teacher_cache_dir' = 'x' must name a folder, and needs "
                                                     "teacher_mode topk or hidden"):
        config_lib.build_config("test", None, {"teacher_cache_dir": "x"})


def test_quantized_log_probs_are_uint8_codes_over_each_rows_span_rounded_up_to_float16():
    """Row by row: code 0 at the row's min, 255 at its max where float16 holds the span exactly, a row of one value
    all 0; a span float16 cannot hold is rounded up (7.2 to 7.203), never down, so no code passes 255; and every
    value comes back within half a step."""
    log_probs = torch.tensor([[-1.0, -3.0, -2.5, -1.5, -2.0], [-0.5] * 5, [-0.1, -7.3, -4.2, -0.1, -5.0]])
    codes, spans = teacher_cache.quantize_log_probs(log_probs)
    assert codes.dtype == np.uint8 and spans.dtype == np.float16
    assert spans[0] == 2.0 and spans[1] == 0.0
    assert spans[2] == np.nextafter(np.float16(7.2), np.float16(np.inf)) and float(np.float16(7.2)) < 7.2
    # -2.0 is 127.49999 steps up in float32 steps, the ones dequantization multiplies by (127.5 in float64)
    assert codes[0].tolist() == [255, 0, 64, 191, 127] and codes[1].tolist() == [0] * 5
    assert codes[2, 1] == 0 and codes[2, 0] == codes[2, 3] == 255
    steps = torch.from_numpy(spans.astype(np.float32)).unsqueeze(-1) / teacher_cache.QUANTIZATION_LEVELS
    error = teacher_cache.dequantize_log_probs(codes, spans) - (log_probs - log_probs.min(-1, keepdim=True).values)
    assert (error.abs() <= steps / 2 + 1e-6).all()


def test_the_teachers_top_k_is_taken_chunk_by_chunk_over_every_position(teacher, vocab_size, monkeypatch):
    """More positions than the hidden size, in chunks of 8: every position is in one chunk; no position gives empty
    parts of each part's shape and type."""
    hidden = torch.randn(100, teacher.config.hidden_size, generator=torch.Generator().manual_seed(0))
    whole = teacher_cache.teacher_top_k(teacher, hidden, 4, 1.0, vocab_size)
    monkeypatch.setattr(teacher_cache, "HEAD_CHUNK_POSITIONS", 8)
    chunked = teacher_cache.teacher_top_k(teacher, hidden, 4, 1.0, vocab_size)
    assert chunked[0].shape == (100, 4) and hidden.shape[1] < 100
    for part, whole_part in zip(chunked, whole, strict=True):
        torch.testing.assert_close(part, whole_part)
    empty = teacher_cache.teacher_top_k(teacher, hidden[:0], 4, 1.0, vocab_size)
    assert [tuple(part.shape) for part in empty] == [(0, 4), (0, 4), (0,)]
    assert [part.dtype for part in empty] == [torch.float32, torch.int64, torch.float32]


def test_dequantized_values_are_the_codes_times_each_rows_step_in_float32():
    codes = np.array([[0, 1, 254, 255], [7, 0, 0, 3]], dtype=np.uint8)
    spans = np.array([3.0, 0.3], dtype=np.float16)  # stored as float16, the step is taken in float32
    steps = spans.astype(np.float32)[:, None] / np.float32(teacher_cache.QUANTIZATION_LEVELS)
    values = teacher_cache.dequantize_log_probs(codes, spans)
    assert values.dtype == torch.float32
    assert torch.equal(values, torch.from_numpy(codes.astype(np.float32) * steps))


def test_an_unknown_teacher_mode_has_no_cache_size():
    with pytest.raises(ValueError) as error:
        teacher_cache.cache_bytes_per_position("online", vocab_size=10, hidden_size=4, k=2, value_dtype="uint8")
    assert str(error.value) == f"teacher_mode 'online' has no cache: use one of {teacher_cache.MODES}"
