"""The one scorer: a single model is scored as a one-member ensemble, its numbers the model's own; chunks cover every
scored position once; an ensemble's targets are scored under its combined logits."""

import pytest
import torch

from conftest import build_diverse_member, build_tiny_llama
from ensemble import ModelEnsemble
from slm_ensembles.scoring import as_ensemble, member_logits_in_chunks, target_log_probs


def scored_batch(tokenizer, length=12, seed=0):
    """A batch of two sequences, the second padded; every real position after the first is scored."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, len(tokenizer), (2, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -4:] = 0
    positions = attention_mask.bool().clone()
    positions[:, 0] = False
    targets = torch.randint(3, len(tokenizer), (int(positions.sum()),), generator=generator)
    return input_ids, attention_mask, positions, targets


def test_a_single_model_scores_as_a_one_member_ensemble_with_its_own_log_probs(tokenizer):
    model = build_diverse_member(tokenizer, seed=1)
    input_ids, attention_mask, positions, targets = scored_batch(tokenizer)
    wrapped = as_ensemble(model)
    assert isinstance(wrapped, ModelEnsemble) and list(wrapped.members) == [model]
    hidden = wrapped.member_hidden_states(input_ids, attention_mask, positions)
    log_probs, greedy = target_log_probs(wrapped, hidden, targets, chunk_size=5)
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits[positions], -1)
    torch.testing.assert_close(log_probs, expected.gather(-1, targets[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy, expected.argmax(-1) == targets)


def test_an_ensemble_is_scored_as_it_is_under_its_combined_logits(tokenizer):
    members = [build_diverse_member(tokenizer, seed=s) for s in (1, 2)]
    ensemble = ModelEnsemble.from_members(members, combine="probs")
    assert as_ensemble(ensemble) is ensemble
    input_ids, attention_mask, positions, targets = scored_batch(tokenizer)
    hidden = ensemble.member_hidden_states(input_ids, attention_mask, positions)
    log_probs, _ = target_log_probs(ensemble, hidden, targets, chunk_size=4)
    with torch.no_grad():
        combined = ensemble(input_ids=input_ids, attention_mask=attention_mask).logits[positions]
    expected = torch.log_softmax(combined, -1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(log_probs, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_chunks_cover_every_scored_position_once_and_give_the_same_scores(tokenizer, chunk_size):
    ensemble = as_ensemble(build_tiny_llama(tokenizer, seed=3))
    input_ids, attention_mask, positions, targets = scored_batch(tokenizer)
    hidden = ensemble.member_hidden_states(input_ids, attention_mask, positions)
    rows = [r for r, logits in member_logits_in_chunks(ensemble, hidden, chunk_size)]
    assert [i for r in rows for i in range(r.start, r.stop)] == list(range(len(targets)))
    assert all(r.stop - r.start <= chunk_size for r in rows)
    whole, _ = target_log_probs(ensemble, hidden, targets, chunk_size=len(targets))
    chunked, _ = target_log_probs(ensemble, hidden, targets, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_the_vocabulary_cut_drops_padded_columns_before_the_softmax(tokenizer):
    padded = build_tiny_llama(tokenizer, seed=4, vocab_size=len(tokenizer) + 16)
    ensemble = as_ensemble(padded)
    input_ids, attention_mask, positions, targets = scored_batch(tokenizer)
    hidden = ensemble.member_hidden_states(input_ids, attention_mask, positions)
    cut, _ = target_log_probs(ensemble, hidden, targets, chunk_size=8, vocab_size=len(tokenizer))
    uncut, _ = target_log_probs(ensemble, hidden, targets, chunk_size=8)
    with torch.no_grad():
        logits = padded(input_ids=input_ids, attention_mask=attention_mask).logits[positions][:, :len(tokenizer)]
    torch.testing.assert_close(cut, torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0],
                               rtol=1e-5, atol=1e-5)
    assert (cut > uncut).all()  # the padded columns' mass is gone


def test_a_chunk_size_below_one_is_refused(tokenizer):
    ensemble = as_ensemble(build_tiny_llama(tokenizer))
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        next(member_logits_in_chunks(ensemble, [torch.zeros(3, 32)], 0))
