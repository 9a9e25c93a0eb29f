"""evaluate: every metric against a computation written plainly here, chunked or not."""

import math

import pytest
import torch
from datasets import Dataset

from conftest import build_tiny_llama
from evaluation import evaluate
from preprocess_dataset import tokenize_conversation
from train import PaddingCollator


@pytest.fixture
def test_split(tokenizer, chats):
    return Dataset.from_list([tokenize_conversation(c["messages"], tokenizer, 64) for c in chats[:6]])


def reference_metrics(model_logits_fn, teacher, dataset, collator):
    """Per supervised position, one at a time: CE, KL(teacher || model), top-1 agreement."""
    ce = kl = agree = count = 0.0
    for example in dataset:
        batch = collator([example])
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"]).logits[0]
            model_logits = model_logits_fn(batch["input_ids"])
        labels = batch["labels"][0]
        for t in range(len(labels) - 1):
            if labels[t + 1] == -100:
                continue
            log_q = torch.log_softmax(model_logits[t].double(), -1)
            log_p = torch.log_softmax(teacher_logits[t].double(), -1)
            ce -= log_q[labels[t + 1]].item()
            kl += (log_p.exp() * (log_p - log_q)).sum().item()
            agree += float(model_logits[t].argmax() == teacher_logits[t].argmax())
            count += 1
    return {"ce": ce / count, "kl_teacher": kl / count, "top1_agreement": agree / count, "num_tokens": count}


@pytest.mark.parametrize("chunk_size", [1024, 5])
def test_metrics_match_a_position_by_position_reference(tokenizer, test_split, chunk_size):
    teacher, first, second = (build_tiny_llama(tokenizer, seed=s) for s in (1, 2, 3))
    collator = PaddingCollator(tokenizer.pad_token_id)
    results = evaluate({"teacher": [teacher], "student": [first], "ensemble": [first, second]}, teacher, test_split,
                       collator, batch_size=4, vocab_size=len(tokenizer), chunk_size=chunk_size)

    def ensemble_logits(input_ids):
        return (first(input_ids=input_ids).logits[0] + second(input_ids=input_ids).logits[0]) / 2

    expected = {"student": reference_metrics(lambda ids: first(input_ids=ids).logits[0], teacher, test_split, collator),
                "ensemble": reference_metrics(ensemble_logits, teacher, test_split, collator)}
    for name, metrics in expected.items():
        for key, value in metrics.items():
            assert results[name][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
        assert results[name]["perplexity"] == pytest.approx(math.exp(results[name]["ce"]))
    assert results["teacher"]["kl_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert results["teacher"]["top1_agreement"] == 1.0
    assert results["ensemble"]["ce"] != pytest.approx(results["student"]["ce"], rel=1e-4)
