"""model_io: the padding collator, logits at selected positions only, and the cut to the tokenizer's vocabulary."""

import pytest
import torch

from conftest import build_tiny_llama
from model_io import PaddingCollator, check_logits_at, cut_to_vocab, hidden_at, logits_at, output_head
from preprocess_dataset import tokenize_conversation
from slm_ensembles.losses import predictor_mask


@pytest.fixture
def examples(tokenizer, chats):
    """The first chats as preprocessing tokenizes them (conversations with nothing supervised left out)."""
    rows = [tokenize_conversation(chat["messages"], tokenizer, max_length=64) for chat in chats[:8]]
    return [row for row in rows if row is not None]


def test_collator_pads_right_and_masks_padding(tokenizer, examples):
    batch = PaddingCollator(tokenizer.pad_token_id)([examples[0], examples[1]])
    lengths = [len(examples[0]["input_ids"]), len(examples[1]["input_ids"])]
    assert batch["input_ids"].shape == (2, max(lengths))
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["labels"][row, n:] == -100).all()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()


def test_selected_head_logits_equal_the_full_forward(tokenizer, examples):
    batch = PaddingCollator(tokenizer.pad_token_id)(examples[:4])
    model = build_tiny_llama(tokenizer, vocab_size=len(tokenizer) + 8)  # padded embedding rows, as in Qwen2.5
    positions = predictor_mask(batch["labels"])
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        selected = logits_at(model, batch["input_ids"], batch["attention_mask"], positions, len(tokenizer))
    assert selected.shape == (positions.sum().item(), len(tokenizer))
    torch.testing.assert_close(selected, full[positions][:, : len(tokenizer)], atol=1e-5, rtol=1e-5)
    check_logits_at(model, len(tokenizer))  # passes for a known architecture


def test_an_output_head_without_a_vocabulary_keeps_the_heads_full_width(tokenizer, examples):
    batch = PaddingCollator(tokenizer.pad_token_id)(examples[:2])
    model = build_tiny_llama(tokenizer, vocab_size=len(tokenizer) + 8)
    positions = batch["attention_mask"].bool()
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        uncut = output_head(model, None)(hidden_at(model, batch["input_ids"], batch["attention_mask"], positions))
    assert uncut.shape == (positions.sum().item(), len(tokenizer) + 8)
    torch.testing.assert_close(uncut, full[positions], atol=1e-5, rtol=1e-5)


def test_logits_are_cut_to_the_vocabulary_and_never_padded():
    logits = torch.randn(3, 12)
    assert cut_to_vocab(logits, 10).shape == (3, 10)
    with pytest.raises(ValueError, match="share one tokenizer"):
        cut_to_vocab(logits, 13)
