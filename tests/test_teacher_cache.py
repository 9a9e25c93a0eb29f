"""The teacher cache: what it stores equals the teacher's outputs, its size, and that it is never misused."""

import shutil

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

import preprocess_dataset
import teacher_cache
from conftest import build_tiny_llama
from losses import divergence_sum, predictor_mask, sparse_divergence_sum
from preprocess_dataset import tokenize_conversation
from teacher_cache import (CacheIncompleteError, CacheMismatchError, TeacherCache, build_cache, cache_identity,
                           index_dtype, teacher_fingerprint, with_example_ids, with_tail_bucket, write_metadata)
from train import PaddingCollator, hidden_at, logits_at, output_head

NUM_EXAMPLES = 12
MAX_LENGTH = 128
KINDS = ("forward_kl", "reverse_kl", "jsd")


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
    return {"teacher": "tiny", "teacher_fingerprint": "f" * 64, "tokenizer_hash": "t" * 64,
            "dataset_fingerprint": dataset._fingerprint, "max_length": MAX_LENGTH}


@pytest.fixture(scope="module")
def reference(teacher, dataset, collator, vocab_size):
    """Per example: the teacher's logits [n, V] and final hidden states [n, H] at its supervised positions."""
    outputs = {}
    with torch.no_grad():
        for example_id in range(len(dataset)):
            batch = collator([dataset[example_id]])
            args = (batch["input_ids"], batch["attention_mask"], predictor_mask(batch["labels"]))
            outputs[example_id] = (logits_at(teacher, *args, vocab_size).float(), hidden_at(teacher, *args).float())
    return outputs


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


SHUFFLED_IDS = [7, 0, 11, 3, 4, 9, 1, 10, 2, 8, 6, 5]


# --- round trips ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value_dtype", ["uint8", "float16"])
def test_topk_targets_are_the_teachers_top_k_at_the_temperature(tmp_path, teacher, dataset, collator, identity,
                                                                  vocab_size, reference, value_dtype):
    cache_dir = build(tmp_path, teacher, dataset, collator, identity, vocab_size, value_dtype=value_dtype)
    cache = TeacherCache.open(cache_dir, {"mode": "topk", "k": 16, "temperature": 2.0, "value_dtype": value_dtype})
    log_probs, indices, tail_log_prob = cache.topk_targets(SHUFFLED_IDS)

    true_log_probs = torch.log_softmax(reference_rows(reference, SHUFFLED_IDS) / 2.0, dim=-1)
    true_top = true_log_probs.topk(16, dim=-1)
    assert log_probs.shape == indices.shape == (true_log_probs.shape[0], 16)
    assert log_probs.dtype == torch.float32 and indices.dtype == torch.int64
    assert tail_log_prob.shape == (len(log_probs),)
    assert torch.equal(indices, true_top.indices)
    error = (log_probs - true_top.values).abs()
    if value_dtype == "uint8":
        step = (true_top.values[:, :1] - true_top.values[:, -1:]) / 255
        assert (error <= step).all()  # half a step, on a range widened to float16 by at most a few step fractions
        assert error.max() > 1e-4  # it really is quantized
    else:
        assert error.max() < 2e-3
    true_tail = torch.log1p(-true_top.values.exp().sum(-1))
    assert torch.allclose(tail_log_prob, true_tail, atol=2e-2)
    total_mass = log_probs.exp().sum(-1) + tail_log_prob.exp()
    assert torch.allclose(total_mass, torch.ones_like(total_mass), atol=1e-5)


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


def test_full_vocabulary_topk_has_an_empty_tail_and_sums_to_one(tmp_path, teacher, dataset, collator, identity,
                                                                 vocab_size):
    cache_dir = build(tmp_path, teacher, dataset, collator, identity, vocab_size, k=vocab_size)
    log_probs, indices, tail_log_prob = TeacherCache.open(cache_dir, {}).topk_targets([2, 5])
    assert torch.isneginf(tail_log_prob).all()
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(len(log_probs)), atol=1e-5)
    assert torch.equal(indices.sort(-1).values, torch.arange(vocab_size).expand_as(indices))


def test_tail_is_floored_when_quantized_mass_exceeds_one():
    log_probs = torch.log(torch.tensor([[0.7, 0.4], [0.5, 0.2]]))  # masses 1.1 and 0.7
    top, tail = with_tail_bucket(log_probs, full_vocabulary=False)
    assert tail.exp().tolist() == pytest.approx([teacher_cache.TAIL_MASS_FLOOR, 0.3], rel=1e-4)
    assert (top.exp().sum(-1) + tail.exp()).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert top[1].exp().tolist() == pytest.approx([0.5, 0.2], rel=1e-5)  # untouched when the mass is below one


# --- size -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value_dtype", "payload_bytes"), [("uint8", 64 * 2 + 64 + 4), ("float16", 64 * 2 + 64 * 2)])
def test_bytes_per_supervised_token_at_k_64(tmp_path, teacher, dataset, collator, identity, vocab_size, value_dtype,
                                            payload_bytes):
    cache_dir = build(tmp_path, teacher, dataset, collator, identity, vocab_size, k=64, value_dtype=value_dtype)
    shard_dir = cache_dir / "shard_00000"
    positions = TeacherCache.open(cache_dir, {}).metadata["num_positions"]
    arrays = [np.load(path, mmap_mode="r") for path in shard_dir.glob("*.npy")]
    payload = sum(array.nbytes for array in arrays if array.shape[0] == positions)
    files = sum(path.stat().st_size for path in shard_dir.iterdir())
    assert payload / positions == payload_bytes
    # Besides the payload: 16 bytes per example (its id and offset) and under 2 KiB of .npy headers and shard.json.
    assert files <= payload + 16 * (len(dataset) + 1) + 2048
    print(f"{value_dtype}: {files / positions:.2f} bytes per supervised token over {positions} tokens")
    if value_dtype == "uint8":
        assert files / positions <= 200


def test_index_dtype_is_the_narrowest_that_holds_the_vocabulary():
    assert index_dtype(49_152) == np.uint16 and index_dtype(65_536) == np.uint16
    assert index_dtype(65_537) == np.uint32 and index_dtype(152_064) == np.uint32


# --- sparse divergences -----------------------------------------------------------------------------------------------

def sparse_targets(teacher_logits, k, temperature):
    top = torch.log_softmax(teacher_logits / temperature, dim=-1).topk(k, dim=-1)
    return with_tail_bucket(top.values, full_vocabulary=k == teacher_logits.shape[-1])[0], top.indices


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_divergence_equals_the_dense_one_when_k_is_the_vocabulary(kind):
    torch.manual_seed(0)
    teacher_logits, model_logits = torch.randn(6, 50) * 3, torch.randn(6, 50) * 3
    log_probs, indices = sparse_targets(teacher_logits, 50, temperature=2.0)
    tail = torch.full((6,), float("-inf"))

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
    full = sparse_targets(teacher_logits, 200, temperature=1.0)[0]
    top_k = torch.log_softmax(teacher_logits, dim=-1).topk(32, dim=-1)
    log_probs, tail = with_tail_bucket(top_k.values, full_vocabulary=False)
    assert full.exp().sum(-1).allclose(torch.ones(8))

    dense = divergence_sum(teacher_logits, model_logits, kind)
    sparse = sparse_divergence_sum(log_probs, top_k.indices, tail, model_logits, kind)
    assert 0 < sparse.item() <= dense.item() + 1e-5  # merging tokens into buckets never increases a divergence
    assert sparse.item() > 0.8 * dense.item()
    sparse.backward()
    assert torch.isfinite(model_logits.grad).all() and model_logits.grad.abs().sum() > 0


def test_sparse_divergence_gradients_are_finite_with_an_empty_tail():
    torch.manual_seed(2)
    teacher_logits, model_logits = torch.randn(3, 10), torch.randn(3, 10).requires_grad_()
    log_probs, indices = sparse_targets(teacher_logits, 10, temperature=1.0)
    tail = torch.full((3,), float("-inf"))
    total = sum(sparse_divergence_sum(log_probs, indices, tail, model_logits, kind) for kind in KINDS)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(model_logits.grad).all()


# --- refusals ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "wanted"), [("temperature", 1.0), ("k", 32), ("teacher_fingerprint", "0" * 64),
                                               ("dataset_fingerprint", "other"), ("mode", "hidden")])
def test_a_cache_built_for_other_settings_is_refused(tmp_path, teacher, dataset, collator, identity, vocab_size, field,
                                                     wanted):
    cache_dir = build(tmp_path, teacher, dataset, collator, identity, vocab_size)
    expected = {**identity, "mode": "topk", "k": 16, "temperature": 2.0, "value_dtype": "uint8", field: wanted}
    with pytest.raises(CacheMismatchError) as error:
        TeacherCache.open(cache_dir, expected)
    cached = {**identity, "mode": "topk", "k": 16, "temperature": 2.0}[field]
    assert field in str(error.value) and repr(cached) in str(error.value) and repr(wanted) in str(error.value)
    assert "rebuild" in str(error.value)


def test_a_cache_without_metadata_or_with_a_missing_shard_is_refused(tmp_path, teacher, dataset, collator, identity,
                                                                     vocab_size):
    cache_dir = build(tmp_path, teacher, dataset, collator, identity, vocab_size, world_size=3, ranks=[0, 2])
    with pytest.raises(CacheIncompleteError, match="metadata.json"):
        TeacherCache.open(cache_dir, {})
    with pytest.raises(CacheIncompleteError, match="missing shard_00001 of 3"):
        write_metadata(cache_dir, identity)

    build_cache(teacher, dataset, cache_dir, mode="topk", k=16, temperature=2.0, vocab_size=vocab_size, batch_size=5,
                collator=collator, metadata=identity, rank=1, world_size=3)
    write_metadata(cache_dir, identity)
    shutil.rmtree(cache_dir / "shard_00002")
    with pytest.raises(CacheIncompleteError, match="missing shard_00002"):
        TeacherCache.open(cache_dir, {})


def test_shards_built_with_different_settings_are_refused(tmp_path, teacher, dataset, collator, identity, vocab_size):
    cache_dir = build(tmp_path, teacher, dataset, collator, identity, vocab_size, world_size=2)
    metadata = (cache_dir / "metadata.json").read_text()
    build_cache(teacher, dataset, cache_dir, mode="topk", k=16, temperature=1.0, vocab_size=vocab_size, batch_size=5,
                collator=collator, metadata=identity, rank=1, world_size=2)
    assert not (cache_dir / "metadata.json").exists()  # a cache being rebuilt cannot be opened
    with pytest.raises(CacheIncompleteError, match="shard_00001 was built with other settings .*temperature"):
        write_metadata(cache_dir, identity)
    (cache_dir / "metadata.json").write_text(metadata)  # a stale metadata.json over the rebuilt shard
    with pytest.raises(CacheIncompleteError, match="temperature: 1.0 instead of 2.0"):
        TeacherCache.open(cache_dir, {})


def test_example_ids_that_are_not_row_indices_are_refused(tmp_path, teacher, dataset, collator, identity, vocab_size):
    build(tmp_path, teacher, with_example_ids(dataset), collator, identity, vocab_size)
    with pytest.raises(ValueError, match="example_id"):
        build(tmp_path, teacher, with_example_ids(dataset).shuffle(seed=0), collator, identity, vocab_size)


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
    assert set(arrays) == {"example_ids", "offsets", "indices", "values", "ranges"}
    assert all(isinstance(array, np.memmap) for array in arrays.values())
    with pytest.raises(KeyError, match="example 99"):
        cache.topk_targets([99])


# --- fingerprint and command line -------------------------------------------------------------------------------------

def test_teacher_fingerprint_follows_the_weights(tmp_path, teacher):
    teacher.save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert teacher_fingerprint(str(tmp_path / "a")) == teacher_fingerprint(str(tmp_path / "b"))
    weights = next((tmp_path / "b").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert teacher_fingerprint(str(tmp_path / "a")) != teacher_fingerprint(str(tmp_path / "b"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .safetensors"):
        teacher_fingerprint(str(tmp_path / "empty"))


def test_command_line_builds_a_cache_that_opens_for_its_settings(tmp_path, teacher, tokenizer, dataset):
    teacher_dir, data_dir = tmp_path / "teacher", tmp_path / "data"
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    data_metadata = {"tokenizer_sha256": preprocess_dataset._tokenizer_sha256(tokenizer), "max_length": MAX_LENGTH}
    preprocess_dataset.save_dataset(DatasetDict({"train": dataset, "test": dataset.select(range(2))}), data_metadata,
                                    data_dir)
    teacher_cache.main(["--teacher", str(teacher_dir), "--data_dir", str(data_dir), "--output_dir",
                        str(tmp_path / "cache"), "--k", "8", "--temperature", "1.5", "--batch_size", "4",
                        "--dtype", "float32"])

    train_split = preprocess_dataset.load_dataset_dir(data_dir)[0]["train"]
    expected = {**cache_identity(str(teacher_dir), tokenizer, train_split, MAX_LENGTH), "mode": "topk", "k": 8,
                "temperature": 1.5, "vocab_size": len(tokenizer)}
    log_probs, indices, _ = TeacherCache.open(tmp_path / "cache", expected).topk_targets([0, 1])
    supervised = sum(int((np.asarray(dataset[i]["labels"][1:]) != -100).sum()) for i in (0, 1))
    assert log_probs.shape == indices.shape == (supervised, 8)
