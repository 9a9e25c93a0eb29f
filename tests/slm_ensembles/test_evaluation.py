"""evaluate: every metric against a computation written plainly here, chunked or not, with the teacher run or cached;
mixture_ce, early stopping's CE: evaluate's, bit for bit, without the teacher."""

import math

import pytest
import torch
from datasets import Dataset

from conftest import build_tiny_llama
from model_io import PaddingCollator
from preprocess_dataset import tokenize_conversation
from slm_ensembles.answer_text import shown_answer
from slm_ensembles.evaluation import (WEIGHT_GRID, CachedTeacher, evaluate, fit_new_member_weight, mixture_ce,
                                      sample_answers)
from slm_ensembles.teacher_cache import TeacherCache, build_cache, write_metadata


@pytest.fixture
def test_split(tokenizer, chats):
    return Dataset.from_list([tokenize_conversation(c["messages"], tokenizer, 64) for c in chats[:6]])


def reference_metrics(model_logits_fn, teacher, dataset, collator, members=()):
    """Per supervised position, one at a time: CE, KL(teacher || model), top-1 agreement, the ECE over 15
    confidence bins, and the mean pairwise KL between `members` (models whose logits the predictor combines)."""
    ce = kl = agree = count = diversity = 0.0
    bins = [[0.0, 0.0, 0.0] for _ in range(15)]  # count, confidence, correct
    for example in dataset:
        batch = collator([example])
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"]).logits[0]
            model_logits = model_logits_fn(batch["input_ids"])
            member_logits = [m(input_ids=batch["input_ids"]).logits[0] for m in members]
        labels = batch["labels"][0]
        for t in range(len(labels) - 1):
            if labels[t + 1] == -100:
                continue
            log_q = torch.log_softmax(model_logits[t].double(), -1)
            log_p = torch.log_softmax(teacher_logits[t].double(), -1)
            ce -= log_q[labels[t + 1]].item()
            kl += (log_p.exp() * (log_p - log_q)).sum().item()
            agree += float(model_logits[t].argmax() == teacher_logits[t].argmax())
            confidence = log_q.exp().max().item()
            b = min(int(confidence * 15), 14)
            bins[b][0] += 1
            bins[b][1] += confidence
            bins[b][2] += float(log_q.argmax() == labels[t + 1])
            pairs = [(i, j) for i in range(len(members)) for j in range(len(members)) if i != j]
            for i, j in pairs:
                log_i = torch.log_softmax(member_logits[i][t].double(), -1)
                log_j = torch.log_softmax(member_logits[j][t].double(), -1)
                diversity += (log_i.exp() * (log_i - log_j)).sum().item() / len(pairs)
            count += 1
    ece = sum(abs(correct - conf) for n, conf, correct in bins) / count
    return {"ce": ce / count, "kl_teacher": kl / count, "top1_agreement": agree / count, "ece": ece,
            "diversity": diversity / count, "num_tokens": count}


@pytest.mark.parametrize("chunk_size", [1024, 5])
def test_metrics_match_a_position_by_position_reference(tokenizer, test_split, chunk_size):
    teacher, first, second = (build_tiny_llama(tokenizer, seed=s) for s in (1, 2, 3))
    collator = PaddingCollator(tokenizer.pad_token_id)
    results = evaluate({"teacher": [teacher], "student": [first], "ensemble": [first, second]}, teacher, test_split,
                       collator, batch_size=4, vocab_size=len(tokenizer), chunk_size=chunk_size)

    def ensemble_logits(input_ids):
        return (first(input_ids=input_ids).logits[0] + second(input_ids=input_ids).logits[0]) / 2

    expected = {"student": reference_metrics(lambda ids: first(input_ids=ids).logits[0], teacher, test_split, collator),
                "ensemble": reference_metrics(ensemble_logits, teacher, test_split, collator, [first, second])}
    for name, metrics in expected.items():
        for key, value in metrics.items():
            assert results[name][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
        assert results[name]["perplexity"] == pytest.approx(math.exp(results[name]["ce"]))
    assert results["teacher"]["kl_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert results["teacher"]["top1_agreement"] == 1.0
    assert results["ensemble"]["ce"] != pytest.approx(results["student"]["ce"], rel=1e-4)
    assert results["ensemble"]["diversity"] > 0 and results["student"]["diversity"] == 0.0
    assert 0 < results["student"]["ece"] < 1


def test_evaluate_scores_models_left_in_train_mode_with_dropout_off(tokenizer, test_split):
    """Models come from training in train mode; with dropout in their config, evaluate must switch it off (eval
    mode), else the metrics are noisy and worse than the model's."""
    teacher, student = (build_tiny_llama(tokenizer, seed=s) for s in (1, 2))
    student.config.attention_dropout = 0.5
    for layer in student.model.layers:
        layer.self_attn.attention_dropout = 0.5
    collator = PaddingCollator(tokenizer.pad_token_id)
    expected = reference_metrics(lambda ids: student(input_ids=ids).logits[0], teacher, test_split, collator)
    teacher.train(), student.train()
    results = evaluate({"student": [student]}, teacher, test_split, collator, batch_size=4,
                       vocab_size=len(tokenizer))
    assert results["student"]["ce"] == pytest.approx(expected["ce"], rel=1e-5)
    assert results["student"]["kl_teacher"] == pytest.approx(expected["kl_teacher"], rel=1e-5, abs=1e-6)
    assert not teacher.training and not student.training


def test_weighted_predictors_combine_with_their_weights(tokenizer, test_split):
    teacher, first, second = (build_tiny_llama(tokenizer, seed=s) for s in (1, 2, 3))
    collator = PaddingCollator(tokenizer.pad_token_id)
    results = evaluate({"w0": [first, second], "w1": [first, second], "w.3": [first, second], "second": [second]},
                       teacher, test_split, collator, batch_size=4, vocab_size=len(tokenizer), combine="weighted",
                       weights={"w0": [1.0, 0.0], "w1": [0.0, 1.0], "w.3": [0.7, 0.3], "second": [1.0]})
    alone = evaluate({"first": [first]}, teacher, test_split, collator, batch_size=4, vocab_size=len(tokenizer))
    assert results["w0"]["ce"] == pytest.approx(alone["first"]["ce"], rel=1e-6)
    assert results["w1"]["ce"] == pytest.approx(results["second"]["ce"], rel=1e-6)
    expected = reference_metrics(lambda ids: 0.7 * first(input_ids=ids).logits[0] + 0.3 * second(input_ids=ids).logits[0],
                                 teacher, test_split, collator)
    assert results["w.3"]["ce"] == pytest.approx(expected["ce"], rel=1e-5)


def test_the_fitted_weight_is_the_best_candidate_and_never_worse_than_leaving_the_member_out(tokenizer, test_split):
    teacher, first, second = (build_tiny_llama(tokenizer, seed=s) for s in (1, 2, 3))
    collator = PaddingCollator(tokenizer.pad_token_id)
    weight, ce = fit_new_member_weight([first], [1.0], second, teacher, test_split, collator, 4, len(tokenizer))
    assert set(ce) == set(WEIGHT_GRID)
    assert ce[weight] == min(ce.values()) <= ce[0.0]
    direct = evaluate({"mix": [first, second]}, teacher, test_split, collator, 4, len(tokenizer), "weighted",
                      weights={"mix": [1 - weight, weight]})
    assert ce[weight] == pytest.approx(direct["mix"]["ce"], rel=1e-6)
    alone = evaluate({"first": [first]}, teacher, test_split, collator, 4, len(tokenizer))
    assert ce[0.0] == pytest.approx(alone["first"]["ce"], rel=1e-6)


@pytest.mark.parametrize("combine,weights", [("logits", None), ("probs", None), ("weighted", [0.7, 0.3]),
                                             ("additive", [1.0, 0.5])])
@pytest.mark.parametrize("chunk_size", [1024, 5])
def test_mixture_ce_is_evaluates_ce_bit_for_bit_without_the_teacher(tokenizer, test_split, combine, weights,
                                                                    chunk_size, monkeypatch):
    """Early stopping reads mixture_ce every eval_steps: the number evaluate gives the mixture (==, not approx: a
    run's early-stopping decisions and learning curves stay those of the runs before it), its members left in eval
    mode, the teacher never run."""
    teacher, first, second = (build_tiny_llama(tokenizer, seed=s) for s in (1, 2, 3))
    for layer in first.model.layers:
        layer.self_attn.attention_dropout = 0.5
    collator = PaddingCollator(tokenizer.pad_token_id)
    for members, member_weights in (([first, second], weights), ([second], weights and weights[:1])):
        expected = evaluate({"mixture": members}, teacher, test_split, collator, 4, len(tokenizer), combine,
                            chunk_size=chunk_size, weights={"mixture": member_weights})["mixture"]["ce"]
        first.train(), second.train()
        never_run_the_body(teacher, monkeypatch)
        assert mixture_ce(members, test_split, collator, 4, len(tokenizer), combine, chunk_size=chunk_size,
                          weights=member_weights) == expected
        assert not any(member.training for member in members)
        monkeypatch.undo()


def test_mixture_ce_of_a_split_with_nothing_to_score_is_refused(tokenizer, test_split):
    unsupervised = test_split.map(lambda example: {"labels": [-100] * len(example["labels"])})
    with pytest.raises(ValueError, match="^the evaluation split has no supervised token to score$"):
        mixture_ce([build_tiny_llama(tokenizer, seed=2)], unsupervised, PaddingCollator(tokenizer.pad_token_id), 4,
                   len(tokenizer))


def hidden_cache(teacher, dataset, collator, vocab_size, folder):
    """A hidden-mode teacher cache of `dataset`, opened."""
    build_cache(teacher, dataset, folder, mode="hidden", k=0, temperature=1.0, vocab_size=vocab_size, batch_size=4,
                collator=collator, metadata={"dataset_fingerprint": dataset._fingerprint})
    write_metadata(folder, {})
    return TeacherCache.open(folder, {"mode": "hidden"})


def never_run_the_body(model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the teacher's body ran, though its hidden states are cached")

    monkeypatch.setattr(model.base_model, "forward", refuse)


def test_a_teacher_cached_as_hidden_states_gives_the_models_metrics_without_running_its_body(tokenizer, test_split,
                                                                                             tmp_path, monkeypatch):
    teacher, first, second = (build_tiny_llama(tokenizer, seed=s) for s in (1, 2, 3))
    collator = PaddingCollator(tokenizer.pad_token_id)
    predictors = {"teacher": [teacher], "student": [first], "ensemble": [first, second]}
    online = evaluate(predictors, teacher, test_split, collator, batch_size=4, vocab_size=len(tokenizer))
    other_split = test_split.select(range(3))
    cached_teacher = CachedTeacher(teacher, (
        hidden_cache(teacher, other_split, collator, len(tokenizer), tmp_path / "other"),
        hidden_cache(teacher, test_split, collator, len(tokenizer), tmp_path / "test")))

    never_run_the_body(teacher, monkeypatch)
    cached = evaluate(predictors, cached_teacher, test_split, collator, batch_size=3, vocab_size=len(tokenizer),
                      chunk_size=5)
    for name, metrics in online.items():
        assert metrics["num_tokens"] == cached[name]["num_tokens"]
        for key in ("ce", "kl_teacher", "ece", "diversity"):  # the cached states are the model's, to fp16 rounding
            assert cached[name][key] == pytest.approx(metrics[key], rel=1e-3, abs=1e-5), (name, key)
        # fp16 rounding may flip one near tie between the teacher's two best tokens, no more.
        assert cached[name]["top1_agreement"] == pytest.approx(metrics["top1_agreement"],
                                                               abs=1.5 / metrics["num_tokens"]), name
    assert cached["teacher"]["kl_teacher"] == pytest.approx(0.0, abs=1e-6)  # the teacher against itself, exactly
    weight, ce = fit_new_member_weight([first], [1.0], second, cached_teacher, test_split, collator, 4, len(tokenizer))
    assert ce[0.0] == pytest.approx(online["student"]["ce"], rel=1e-6)  # the students' CE never depends on the teacher
    with pytest.raises(ValueError, match="no teacher cache holds the split"):
        evaluate(predictors, cached_teacher, test_split.select(range(4)), collator, 4, len(tokenizer))


def test_sample_answers_are_each_models_greedy_continuation_of_the_chat_prompt(tokenizer):
    models = {"a": build_tiny_llama(tokenizer, seed=1), "b": build_tiny_llama(tokenizer, seed=2)}
    rows = sample_answers(models, tokenizer, ["Hello there", "Why?"], max_new_tokens=5)
    assert [(row["model"], row["prompt"]) for row in rows] == [("a", "Hello there"), ("b", "Hello there"),
                                                                ("a", "Why?"), ("b", "Why?")]
    for row in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
        tokens = prompt["input_ids"]
        for _ in range(5):  # greedy decoding, step by step
            tokens = torch.cat([tokens, models[row["model"]](input_ids=tokens).logits[:, -1:].argmax(-1)], 1)
        new = tokens[0, prompt["input_ids"].shape[1]:]
        if tokenizer.eos_token_id in new.tolist():
            new = new[:new.tolist().index(tokenizer.eos_token_id) + 1]
        assert row["new_tokens"] == len(new)
        assert row["answer"] == shown_answer(tokenizer, new).strip()  # its text, or a line listing its tokens


def previous_chunk_metrics(sums, predictors, logits, teacher_logits, targets, combine, weights):
    """add_chunk_metrics as it was before it kept logits in the models' dtype and freed its temporaries early (every
    logits tensor fp32, losses.kl_sum and losses.nll_sum): the numbers the demo's metrics.csv was made with."""
    import torch.nn.functional as F
    from ensemble import combine_logits
    from slm_ensembles.evaluation import AGREE, BINS, CE, DIVERSITY, ECE_BINS, KL
    from slm_ensembles.losses import kl_sum, nll_sum

    logits = {key: value.float() for key, value in logits.items()}
    teacher_logits = teacher_logits.float()
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    teacher_top1 = teacher_logits.argmax(dim=-1)
    for name, members in predictors.items():
        member_logits = [logits[id(m)] for m in members]
        if len(member_logits) < 2:
            diversity = 0.0
        else:
            log_probs = [F.log_softmax(z, dim=-1) for z in member_logits]
            pairs = [(i, j) for i in range(len(log_probs)) for j in range(len(log_probs)) if i != j]
            diversity = sum(kl_sum(log_probs[i], log_probs[j]) for i, j in pairs) / len(pairs)
        combined = combine_logits(member_logits, combine, weights.get(name))
        log_probs = F.log_softmax(combined, dim=-1)
        total = sums[name]
        total[CE] += nll_sum(combined, targets)
        total[KL] += kl_sum(teacher_log_probs, log_probs)
        top1_log_prob, top1 = log_probs.max(dim=-1)
        total[AGREE] += (top1 == teacher_top1).sum()
        total[DIVERSITY] += diversity
        confidence = top1_log_prob.exp()
        bins = torch.clamp((confidence * ECE_BINS).long(), max=ECE_BINS - 1)
        total[BINS:BINS + ECE_BINS] += torch.bincount(bins, minlength=ECE_BINS)
        total[BINS + ECE_BINS:BINS + 2 * ECE_BINS] += torch.bincount(
            bins, weights=confidence.double(), minlength=ECE_BINS)
        total[BINS + 2 * ECE_BINS:] += torch.bincount(bins, weights=(top1 == targets).double(), minlength=ECE_BINS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("combine", ["logits", "probs", "weighted"])
def test_chunk_metrics_are_bit_for_bit_those_of_the_fp32_computation(dtype, combine):
    """The lighter add_chunk_metrics (logits kept in the heads' dtype, temporaries freed early, KL's product taken
    in place, CE from the log-probabilities it already has) changes no metric in any bit."""
    from slm_ensembles.evaluation import NUM_SUMS, add_chunk_metrics

    generator = torch.Generator().manual_seed(0)
    rows, vocab = 96, 5003
    models = [torch.nn.Identity() for _ in range(4)]  # stand-ins: only their ids key the logits
    teacher, *members = models
    logits = {id(m): (3 * torch.randn(rows, vocab, generator=generator)).to(dtype) for m in models}
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    predictors = {"teacher": [teacher], "one": [members[0]], "ensemble": members, "pair": members[1:]}
    weights = {"teacher": [1.0], "one": [1.0], "ensemble": [0.5, 0.3, 0.2], "pair": [0.7, 0.3]} \
        if combine == "weighted" else {}
    new, old = ({name: torch.zeros(NUM_SUMS, dtype=torch.float64) for name in predictors} for _ in range(2))
    add_chunk_metrics(new, predictors, logits, logits[id(teacher)], targets, combine, weights)
    previous_chunk_metrics(old, predictors, logits, logits[id(teacher)], targets, combine, weights)
    for name in predictors:
        assert torch.equal(new[name], old[name]), name


def test_the_in_place_kl_and_the_nll_from_log_probabilities_equal_the_losses_bit_for_bit():
    import torch.nn.functional as F
    from slm_ensembles.evaluation import kl_sum_no_grad
    from slm_ensembles.losses import kl_sum, nll_sum

    generator = torch.Generator().manual_seed(1)
    p, q = (F.log_softmax(4 * torch.randn(64, 3001, generator=generator), dim=-1) for _ in range(2))
    assert torch.equal(kl_sum_no_grad(p, q), kl_sum(p, q))
    logits = 4 * torch.randn(64, 3001, generator=generator)
    targets = torch.randint(0, 3001, (64,), generator=generator)
    assert torch.equal(F.nll_loss(F.log_softmax(logits, dim=-1), targets, reduction="sum"), nll_sum(logits, targets))


def test_evaluate_keeps_no_fp32_copy_of_a_bf16_models_logits(tokenizer, test_split, monkeypatch):
    """Each chunk's logits reach add_chunk_metrics in the heads' dtype: bf16 frozen models' logits take half the
    bytes of fp32 copies, which the metrics make one at a time."""
    from slm_ensembles import evaluation

    models = [build_tiny_llama(tokenizer, seed=seed).to(torch.bfloat16).eval() for seed in (0, 1)]
    seen = []
    add_chunk_metrics = evaluation.add_chunk_metrics

    def recording(sums, predictors, logits, *args):
        seen.extend(value.dtype for value in logits.values())
        return add_chunk_metrics(sums, predictors, logits, *args)

    monkeypatch.setattr(evaluation, "add_chunk_metrics", recording)
    results = evaluate({"student": [models[1]]}, models[0], test_split, PaddingCollator(tokenizer.pad_token_id),
                       batch_size=3, vocab_size=len(tokenizer))
    assert seen and set(seen) == {torch.bfloat16}
    assert math.isfinite(results["student"]["ce"])
