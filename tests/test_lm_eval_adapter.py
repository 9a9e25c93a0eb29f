"""lm_eval_adapter.py: lm-evaluation-harness on an ensemble, a member or the teacher, offline, on tiny models."""

import json
import math
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from checksums import DamagedFolderError
from conftest import build_tiny_llama, build_tokenizer, damage_second_half
from ensemble import COMBINE_MODES, WEIGHTED_MODES, ModelEnsemble
import lm_eval_adapter
from lm_eval_adapter import DEFAULT_TASKS_DIR, CausalLMAdapter, cut_at_stop, make_lm, run_models, task_manager
from utils import load_causal_lm
from slm_ensembles import files
from slm_ensembles.processes import EXIT_BAD_INPUT, run_command

LOCAL_TASKS = ["slm_tiny_mc", "slm_tiny_gen", "slm_tiny_ppl"]
PAIRS = [
    ("Question: What is 2 + 3?\nAnswer:", " 5"),
    ("Hi ", "there friend, how are you?"),  # the trailing space moves to the continuation
    ("", "hello"),  # an empty context: the prefix token conditions the continuation
    ("The capital of France is", " Paris, a city on the Seine."),
]


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval")


def scrambled_llama(tokenizer, seed):
    """A tiny Llama whose layers have large random weights: unlike a freshly initialised one (whose tied head just
    repeats the last token), it decodes varied text, so that stopping strings have something to stop."""
    model = build_tiny_llama(tokenizer, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for parameter in model.model.layers.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def members(tokenizer):
    return [scrambled_llama(tokenizer, seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def ensemble(tokenizer, members):
    return ModelEnsemble.from_members(members, vocab_size=len(tokenizer))


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def full_forward_score(model, tokens, n, vocab_size=None):
    """(log p of the last n of `tokens` given the ones before, whether each of them is the argmax), from one
    unpadded forward pass and its full [length, vocabulary] logits (cut to `vocab_size` when given)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0, :, :vocab_size].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    length = len(tokens) - 1
    total = sum(log_probs[length - n + j, tokens[-n + j]].item() for j in range(n))
    greedy = all(int(log_probs[length - n + j].argmax()) == tokens[-n + j] for j in range(n))
    return total, greedy


def manual_log_prob(model, tokens, n):
    """log p of the last n of `tokens` given the ones before, from one unpadded forward pass."""
    return full_forward_score(model, tokens, n)[0]


# --- loglikelihood ------------------------------------------------------------------------------------------------

def test_loglikelihood_sums_the_continuations_log_probs_under_the_combined_logits(tokenizer, ensemble):
    adapter = CausalLMAdapter(ensemble, tokenizer, batch_size=2)  # two batches, padded
    results = adapter.loglikelihood(PAIRS)
    assert len(results) == len(PAIRS)
    for (context, continuation), (log_prob, greedy) in zip(PAIRS, results, strict=True):
        context_ids, continuation_ids = adapter.encode_pair(context, continuation)
        if context:  # tokenized as one string, split after the (space-stripped) context's tokens
            stripped = context.rstrip()
            assert context_ids == ids(tokenizer, stripped)
            assert context_ids + continuation_ids == ids(tokenizer, context + continuation)
        else:
            assert context_ids == [tokenizer.bos_token_id]
            assert continuation_ids == ids(tokenizer, continuation)
        expected = manual_log_prob(ensemble, context_ids + continuation_ids, len(continuation_ids))
        assert log_prob == pytest.approx(expected, abs=1e-5)
        assert log_prob < 0 and isinstance(greedy, bool)
    assert adapter.loglikelihood([("Hi", ""), ("", "")]) == [(0.0, True), (0.0, True)]  # nothing to score


def test_a_one_member_ensemble_scores_as_its_member_alone(tokenizer, members):
    alone = CausalLMAdapter(members[0], tokenizer, batch_size=3).loglikelihood(PAIRS)
    single = ModelEnsemble.from_members([members[0]], vocab_size=len(tokenizer))
    as_ensemble = CausalLMAdapter(single, tokenizer, batch_size=3).loglikelihood(PAIRS)
    for (a, greedy_a), (b, greedy_b) in zip(alone, as_ensemble, strict=True):
        assert a == pytest.approx(b, abs=1e-5) and greedy_a == greedy_b
    both = CausalLMAdapter(ModelEnsemble.from_members(members, vocab_size=len(tokenizer)), tokenizer)
    assert abs(both.loglikelihood(PAIRS[:1])[0][0] - alone[0][0]) > 1e-3  # the second member changes the score


def test_the_greedy_flag_is_true_exactly_for_the_argmax_continuation(tokenizer, ensemble):
    adapter = CausalLMAdapter(ensemble, tokenizer)
    context = ids(tokenizer, "Question: What is the capital of France?\nAnswer:")
    greedy, sequence = [], list(context)
    with torch.no_grad():
        for _ in range(4):
            logits = ensemble(input_ids=torch.tensor([sequence])).logits[0, -1]
            greedy.append(int(logits.argmax()))
            sequence.append(greedy[-1])
        runner_up = int(ensemble(input_ids=torch.tensor([context + greedy[:-1]])).logits[0, -1].topk(2).indices[1])
    first_changed = [int(greedy[0] + 1) % len(tokenizer)] + greedy[1:]
    results = adapter.loglikelihood_tokens([(context, greedy), (context, greedy[:-1] + [runner_up]),
                                            (context, first_changed)])
    assert [flag for _, flag in results] == [True, False, False]
    assert results[0][0] > results[1][0]  # the argmax token is likelier than the runner-up
    assert results[0][0] == pytest.approx(manual_log_prob(ensemble, context + greedy, 4), abs=1e-5)


def test_a_context_longer_than_max_length_is_cut_from_the_left(tokenizer, ensemble):
    adapter = CausalLMAdapter(ensemble, tokenizer, max_length=8)
    context, continuation = ids(tokenizer, "one two three four five six seven eight nine"), ids(tokenizer, " ten")
    assert len(context) + len(continuation) > 9
    ((log_prob, _),) = adapter.loglikelihood_tokens([(context, continuation)])
    kept = (context + continuation)[-9:]
    assert log_prob == pytest.approx(manual_log_prob(ensemble, kept, len(continuation)), abs=1e-5)
    with pytest.raises(ValueError, match="longer than max_length"):
        adapter.loglikelihood_tokens([(context, context)])


# --- scoring through the chunked output heads ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", [*COMBINE_MODES, "single model"])
def test_chunked_scores_equal_the_full_logits_path(tokenizer, members, kind):
    """Every combine mode, and a single model with a padded head cut to the vocabulary: the same log-likelihoods
    and greedy flags as from the full logits of a plain forward."""
    vocab_size = len(tokenizer)
    if kind == "single model":
        model = build_tiny_llama(tokenizer, seed=5, vocab_size=vocab_size + 8)
    else:
        weights = [0.3, 0.9] if kind in WEIGHTED_MODES else None
        model = ModelEnsemble.from_members(members, combine=kind, vocab_size=vocab_size, weights=weights)
    # Chunks of 5 positions straddle the rows of a batch; max_length 24 cuts contexts and rolls windows.
    adapter = CausalLMAdapter(model, tokenizer, batch_size=3, max_length=24, chunk_size=5, vocab_size=vocab_size)
    context, greedy = ids(tokenizer, "What is 2 + 3?"), []  # short enough not to be cut
    for _ in range(3):
        with torch.no_grad():
            greedy.append(int(model(input_ids=torch.tensor([context + greedy])).logits[0, -1, :vocab_size].argmax()))
    pairs = [adapter.encode_pair(*pair) for pair in PAIRS] + [(context, greedy)]
    expected = [full_forward_score(model, (c + k)[-(adapter.max_length + 1):], len(k), vocab_size) for c, k in pairs]
    results = adapter.loglikelihood_tokens(pairs)
    assert results[-1][1] is True  # the greedy continuation is recognised as such
    for (log_prob, flag), (reference, reference_flag) in zip(results, expected, strict=True):
        assert log_prob == pytest.approx(reference, abs=1e-4) and flag == reference_flag
    windows = adapter.rolling_windows(ids(tokenizer, LONG_TEXT))
    assert len(windows) > 1
    (rolling,) = adapter.loglikelihood_rolling([(LONG_TEXT,)])
    assert rolling == pytest.approx(sum(full_forward_score(model, tokens, n, vocab_size)[0] for tokens, n in windows),
                                    abs=1e-3)


def test_scoring_never_makes_more_than_a_chunk_of_logits_however_long_the_text(tokenizer):
    """Every call of a member's output head is recorded: a long rolling text and a long context are scored with
    at most chunk_size positions of logits at a time, where the full forward makes length x vocabulary at once."""
    members = [build_tiny_llama(tokenizer, seed=seed, vocab_size=4096) for seed in (3, 4)]  # wide padded heads
    ensemble = ModelEnsemble.from_members(members, combine="probs", vocab_size=len(tokenizer))
    chunk_size = 16
    adapter = CausalLMAdapter(ensemble, tokenizer, batch_size=2, chunk_size=chunk_size)
    head_calls = []  # (positions, width) of the logits each call of a member's head makes
    hooks = [member.get_output_embeddings().register_forward_hook(
        lambda module, args, output: head_calls.append((output.shape[:-1].numel(), output.shape[-1])))
        for member in members]
    try:
        text = " ".join([LONG_TEXT] * 12)
        tokens = ids(tokenizer, text)
        assert len(tokens) > adapter.max_length > 10 * chunk_size  # several long windows
        adapter.loglikelihood_rolling([(text,)])
        assert max(positions for positions, _ in head_calls) == chunk_size
        assert {width for _, width in head_calls} == {4096}
        assert sum(positions for positions, _ in head_calls) == 2 * len(tokens)  # each token once, per member
        head_calls.clear()
        adapter.loglikelihood_tokens([(tokens[:200], tokens[200:230])])
        assert max(positions for positions, _ in head_calls) <= chunk_size
        assert sum(positions for positions, _ in head_calls) == 2 * 30  # the continuation's positions only
        head_calls.clear()
        with torch.no_grad():
            ensemble(input_ids=torch.tensor([tokens[:adapter.max_length]]))
        assert max(positions for positions, _ in head_calls) == adapter.max_length  # what the full path makes
    finally:
        for hook in hooks:
            hook.remove()


def test_a_model_whose_forward_changes_its_logits_beyond_its_head_is_refused(tokenizer, monkeypatch):
    model = build_tiny_llama(tokenizer)
    forward = model.forward

    def doubled(*args, **kwargs):  # an output transform that scoring through the head would miss
        output = forward(*args, **kwargs)
        output.logits = output.logits * 2
        return output

    monkeypatch.setattr(model, "forward", doubled)
    with pytest.raises(ValueError, match="output transform"):
        CausalLMAdapter(model, tokenizer)


# --- max_length ---------------------------------------------------------------------------------------------------

def test_the_default_max_length_is_capped_at_the_training_length_and_a_longer_one_is_kept_with_a_warning(tokenizer,
                                                                                                      ensemble):
    assert CausalLMAdapter(ensemble, tokenizer).max_length == 256  # the members' max_position_embeddings
    assert CausalLMAdapter(ensemble, tokenizer, train_max_length=64).max_length == 64
    assert CausalLMAdapter(ensemble, tokenizer, train_max_length=1024).max_length == 256  # never past the model's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CausalLMAdapter(ensemble, tokenizer, max_length=48, train_max_length=64).max_length == 48
    with pytest.warns(UserWarning, match=r"max_length 128 exceeds the run's training length \(64 tokens\)"):
        assert CausalLMAdapter(ensemble, tokenizer, max_length=128, train_max_length=64).max_length == 128


# --- loglikelihood_rolling ----------------------------------------------------------------------------------------

LONG_TEXT = "Hello there, how are you doing today? I am fine, thanks, and you, my dear friend from far away?"


def test_rolling_loglikelihood_is_the_sum_of_every_tokens_log_prob(tokenizer, ensemble):
    adapter = CausalLMAdapter(ensemble, tokenizer, batch_size=2)
    tokens = ids(tokenizer, LONG_TEXT)
    assert len(tokens) + 1 <= adapter.max_length  # one window
    sequence = [tokenizer.bos_token_id] + tokens
    with torch.no_grad():
        log_probs = torch.log_softmax(ensemble(input_ids=torch.tensor([sequence[:-1]])).logits[0], dim=-1)
    expected = sum(log_probs[t, sequence[t + 1]].item() for t in range(len(tokens)))
    short, long_, empty = adapter.loglikelihood_rolling([("Hi",), (LONG_TEXT,), ("",)])
    assert long_ == pytest.approx(expected, abs=1e-4)
    assert short == pytest.approx(manual_log_prob(ensemble, [tokenizer.bos_token_id] + ids(tokenizer, "Hi"),
                                                  len(ids(tokenizer, "Hi"))), abs=1e-5)
    assert empty == 0.0


def test_rolling_windows_follow_lm_evals_definition_when_the_text_is_longer_than_max_length(lm_eval, tokenizer,
                                                                                            ensemble):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    max_length = 8
    adapter = CausalLMAdapter(ensemble, tokenizer, batch_size=3, max_length=max_length)
    tokens = ids(tokenizer, LONG_TEXT)
    windows = adapter.rolling_windows(tokens)
    assert len(windows) >= 3 and sum(n for _, n in windows) == len(tokens)  # every token scored once
    assert all(len(window) - 1 <= max_length for window, _ in windows)
    expected = 0.0
    for context, predicted in map(make_disjoint_window, get_rolling_token_windows(
            token_list=tokens, prefix_token=tokenizer.bos_token_id, max_seq_len=max_length, context_len=1)):
        window = (context + predicted)[-(max_length + 1):]
        expected += manual_log_prob(ensemble, window, len(predicted))
    (result,) = adapter.loglikelihood_rolling([(LONG_TEXT,)])
    assert result == pytest.approx(expected, abs=1e-4)
    # Short windows lose context: the score differs from the one-window score.
    (full,) = CausalLMAdapter(ensemble, tokenizer).loglikelihood_rolling([(LONG_TEXT,)])
    assert abs(result - full) > 1e-3


# --- generate_until -----------------------------------------------------------------------------------------------

def greedy_text(model, tokenizer, prompt, max_new_tokens):
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_generate_until_stops_at_an_until_string_and_is_the_ensembles_own_greedy_decode(tokenizer, ensemble,
                                                                                       monkeypatch):
    prompt = "Question: What is the capital of France?\nAnswer:"
    full = greedy_text(ensemble, tokenizer, prompt, 16)
    # A stop string that first occurs a few characters in, away from partial (undecodable) bytes.
    k = next(k for k in range(3, len(full) - 2) if "\ufffd" not in full[k:k + 2] and full.find(full[k:k + 2]) == k)
    until = full[k:k + 2]
    lengths = []
    generate = ensemble.generate

    def counting_generate(*args, **kwargs):
        output = generate(*args, **kwargs)
        lengths.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output

    monkeypatch.setattr(ensemble, "generate", counting_generate)
    adapter = CausalLMAdapter(ensemble, tokenizer)
    stopped, unstopped = adapter.generate_until([(prompt, {"until": [until, "never appears"], "max_gen_toks": 16}),
                                                 (prompt, {"until": [], "max_gen_toks": 16})])
    assert stopped == full[:k] and stopped != full
    assert unstopped == full
    assert lengths[0] < 16 and lengths[1] == 16  # generation itself stopped early, not just the text
    assert cut_at_stop("abcXdeY", ["Y", "X"]) == "abc"


def test_a_batch_of_prompts_generates_each_as_alone(tokenizer, ensemble):
    prompts = ["Hi", "Question: What is 7 - 4?\nAnswer:", "Tell me a story about a cat", "Question:"]
    adapter = CausalLMAdapter(ensemble, tokenizer, batch_size=3)  # left-padded batches of different lengths
    answers = adapter.generate_until([(p, {"until": ["\n"], "max_gen_toks": 6}) for p in prompts])
    expected = [cut_at_stop(greedy_text(ensemble, tokenizer, p, 6), ["\n"]) for p in prompts]
    assert answers == expected
    assert len(set(answers)) > 1


def test_a_single_model_scores_and_generates_exactly_as_lm_evals_own_hf_backend(lm_eval, tokenizer, members):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model = members[1]
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=24)
    ours = make_lm(model, tokenizer, batch_size=3, max_length=24)
    assert isinstance(ours, lm_eval.api.model.LM)
    pairs = PAIRS + [("a " * 30, " b c d e f")]  # the last one is cut to max_length
    assert sum(map(len, ours.encode_pair(*pairs[-1]))) > ours.max_length + 1
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    for (a, greedy_a), (b, greedy_b) in zip(ours.loglikelihood(requests), reference.loglikelihood(requests),
                                            strict=True):
        assert a == pytest.approx(b, abs=1e-5) and greedy_a == greedy_b
    texts = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate([LONG_TEXT, "short"])]
    assert ours.loglikelihood_rolling(texts) == pytest.approx(reference.loglikelihood_rolling(texts), abs=1e-4)
    prompts = [Instance("generate_until", {}, (p, {"until": ["e", "\n"], "max_gen_toks": 5}), i)
               for i, p in enumerate(["Hello", "Question: what is", "A"])]
    assert ours.generate_until(prompts) == reference.generate_until(prompts)


# --- tasks and simple_evaluate ------------------------------------------------------------------------------------

def test_the_local_tasks_data_is_well_formed():
    with open(DEFAULT_TASKS_DIR / "slm_tiny_qa.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    assert len(docs) >= 20
    for doc in docs:
        assert doc["question"].strip() and len(set(doc["choices"])) == len(doc["choices"]) >= 2
        assert 0 <= doc["answer"] < len(doc["choices"])
    for name in LOCAL_TASKS:
        config = yaml.safe_load((DEFAULT_TASKS_DIR / f"{name}.yaml").read_text())
        assert config["task"] == name and config["dataset_path"] == "json"


def test_the_task_mirror_makes_local_data_paths_absolute(tmp_path):
    folder = tmp_path / "tasks"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "data.jsonl").write_text('{"x": 1}\n')
    (folder / "sub" / "t.yaml").write_text("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                           "    test: data.jsonl\nprocess_docs: !function utils.process\n")
    mirror = lm_eval_adapter.resolved_task_folder(folder)
    _, loader, _ = lm_eval_adapter._yaml_io()
    config = yaml.load((mirror / "sub" / "t.yaml").read_text(), Loader=loader)
    assert isinstance(config["process_docs"], lm_eval_adapter._FunctionRef)  # still a !function tag
    assert config["process_docs"] == "utils.process"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(folder / "sub" / "data.jsonl")
    assert (mirror / "sub" / "data.jsonl").read_text() == '{"x": 1}\n'
    assert "data_files:\n    test: data.jsonl" in (folder / "sub" / "t.yaml").read_text()  # the original is kept
    shutil.rmtree(mirror.parent)


def test_simple_evaluate_runs_the_repositorys_tasks_offline_from_any_directory(lm_eval, tokenizer, ensemble,
                                                                               tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the tasks' data paths must not depend on the working directory
    manager = task_manager(include_defaults=False)
    assert set(LOCAL_TASKS) <= set(manager.all_tasks) and "slm_tiny" in manager.all_tags
    lm = make_lm(ensemble, tokenizer, batch_size=4)
    limit = 6
    results = lm_eval.simple_evaluate(model=lm, tasks=LOCAL_TASKS, task_manager=manager, limit=limit,
                                      log_samples=False, bootstrap_iters=10)
    scores = results["results"]
    assert {task: results["n-samples"][task]["effective"] for task in LOCAL_TASKS} == dict.fromkeys(LOCAL_TASKS, limit)
    for task, key in [("slm_tiny_mc", "acc,none"), ("slm_tiny_mc", "acc_norm,none"),
                      ("slm_tiny_gen", "exact_match,strip")]:
        assert 0.0 <= scores[task][key] <= 1.0
    assert 1.0 < scores["slm_tiny_ppl"]["word_perplexity,none"] < math.inf
    assert 1.0 < scores["slm_tiny_ppl"]["byte_perplexity,none"] < math.inf
    assert scores["slm_tiny_ppl"]["bits_per_byte,none"] == pytest.approx(
        math.log2(scores["slm_tiny_ppl"]["byte_perplexity,none"]))
    # The multiple-choice accuracy is the share of questions whose right choice the adapter scores highest.
    with open(DEFAULT_TASKS_DIR / "slm_tiny_qa.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f][:limit]
    correct = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        scores_by_choice = [lp for lp, _ in lm.loglikelihood([(context, " " + c) for c in doc["choices"]])]
        correct += int(max(range(len(scores_by_choice)), key=scores_by_choice.__getitem__) == doc["answer"])
    assert scores["slm_tiny_mc"]["acc,none"] == pytest.approx(correct / limit)
    rows = lm_eval_adapter.results_to_rows(results, "ensemble")
    assert {(r["task"], r["metric"], r["filter"]) for r in rows} == {
        ("slm_tiny_mc", "acc", "none"), ("slm_tiny_mc", "acc_norm", "none"), ("slm_tiny_gen", "exact_match", "strip"),
        ("slm_tiny_ppl", "word_perplexity", "none"), ("slm_tiny_ppl", "byte_perplexity", "none"),
        ("slm_tiny_ppl", "bits_per_byte", "none")}


def test_lm_evals_own_hf_backend_reads_a_saved_ensemble_folder_and_scores_as_the_adapter(lm_eval, tokenizer,
                                                                                          members, tmp_path):
    """`lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True` on a saved ensemble folder: lm-eval
    loads it through the folder's own code (auto_map) and its tokenizer files, and scores every request of an offline
    task as the project's adapter does."""
    folder = tmp_path / "ensemble"
    ModelEnsemble.from_members(members, vocab_size=len(tokenizer)).save_pretrained(folder, tokenizer)
    manager = task_manager(include_defaults=False)
    limit = 8
    common = dict(tasks=["slm_tiny_mc"], task_manager=manager, limit=limit, log_samples=True, bootstrap_iters=10)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},trust_remote_code=True,"
                                     "dtype=float32", device="cpu", batch_size=2, **common)
    assert type(theirs["config"]["model"]) is str and theirs["config"]["model"] == "hf"
    ours = lm_eval.simple_evaluate(model=make_lm(ModelEnsemble.from_pretrained(folder), tokenizer, batch_size=3),
                                   **common)

    def scores(results):  # each request's log-likelihood and greedy flag, by document and choice
        return {(sample["doc_id"], index): response[0]
                for sample in results["samples"]["slm_tiny_mc"]
                for index, response in enumerate(sample["resps"])}

    theirs_scores, ours_scores = scores(theirs), scores(ours)
    assert len(theirs_scores) >= 2 * limit and theirs_scores.keys() == ours_scores.keys()
    for key, (log_prob, greedy) in theirs_scores.items():
        assert float(ours_scores[key][0]) == pytest.approx(float(log_prob), abs=1e-4), key
        assert bool(ours_scores[key][1]) == bool(greedy), key
    for metric in ("acc,none", "acc_norm,none"):
        assert theirs["results"]["slm_tiny_mc"][metric] == ours["results"]["slm_tiny_mc"][metric]
    print(f"slm_tiny_mc acc over {limit}: lm-eval hf {theirs['results']['slm_tiny_mc']['acc,none']}, adapter "
          f"{ours['results']['slm_tiny_mc']['acc,none']}; largest log-likelihood difference "
          f"{max(abs(float(ours_scores[k][0]) - float(v[0])) for k, v in theirs_scores.items()):.2e}")


# --- a run folder -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_teacher_dir):
    run = tmp_path_factory.mktemp("lm_eval_run") / "runs" / "2026-01-01" / "run_1"
    tokenizer = build_tokenizer("chatml")
    members = [build_tiny_llama(tokenizer, seed=20 + r) for r in range(3)]
    ModelEnsemble.from_members(members, vocab_size=len(tokenizer)).save_pretrained(run / "ensemble", tokenizer)
    rows = [(0, "teacher", 0, 1.5)]
    for round_index, ce in enumerate([3.0, 2.5, 2.8]):  # round 1's student is the best member
        rows += [(round_index, "student", 1, ce), (round_index, "ensemble", round_index + 1, ce - 0.3)]
    pd.DataFrame(rows, columns=["round", "model", "ensemble_size", "ce"]).to_csv(run / "metrics.csv", index=False)
    config = {"teacher": str(tiny_teacher_dir), "cache_dir": str(run.parent / "cache"), "dtype": "float32",
              "trust_remote_code": False, "max_length": 128}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_evaluate_run_writes_one_table_for_teacher_best_member_and_ensemble(lm_eval, run_dir, tiny_teacher_dir,
                                                                             capsys, monkeypatch):
    assert lm_eval_adapter.best_member(run_dir) == (1, run_dir / "ensemble" / "member_1")
    max_lengths = []  # of each model's lm: the run's max_length (128), not the models' 256 positions

    def recording_make_lm(*args, **kwargs):
        lm = make_lm(*args, **kwargs)
        max_lengths.append(lm.max_length)
        return lm

    monkeypatch.setattr(lm_eval_adapter, "make_lm", recording_make_lm)
    assert lm_eval_adapter.main([str(run_dir), "--tasks", ",".join(LOCAL_TASKS), "--limit", "3",
                                 "--no_default_tasks", "--device", "cpu", "--bootstrap_iters", "10"]) == 0
    printed = capsys.readouterr().out
    assert "best_member" in printed and "slm_tiny_mc" in printed
    assert max_lengths == [128] * 3
    table = pd.read_csv(run_dir / "lm_eval.csv")
    assert list(table.columns) == lm_eval_adapter.RESULT_COLUMNS
    paths = table.groupby("model")["path"].first().to_dict()
    assert paths == {"teacher": str(tiny_teacher_dir), "best_member": str(run_dir / "ensemble" / "member_1"),
                     "ensemble": str(run_dir / "ensemble")}
    for model in lm_eval_adapter.MODEL_KINDS:
        rows = table[table["model"] == model]
        assert set(zip(rows["task"], rows["metric"], strict=True)) >= {
            ("slm_tiny_mc", "acc"), ("slm_tiny_gen", "exact_match"), ("slm_tiny_ppl", "bits_per_byte")}
        assert (rows["samples"] == 3).all()
    bits = table[table["metric"] == "bits_per_byte"].set_index("model")["value"]
    assert len(set(bits.round(8))) == 3  # three different models were evaluated
    # The best member's row is member_1 evaluated alone.
    member = load_causal_lm(str(run_dir / "ensemble" / "member_1"))
    tokenizer = build_tokenizer("chatml")
    direct = lm_eval.simple_evaluate(model=make_lm(member, tokenizer, vocab_size=len(tokenizer)),
                                     tasks=["slm_tiny_ppl"], task_manager=task_manager(include_defaults=False),
                                     limit=3, log_samples=False, bootstrap_iters=10)
    assert bits["best_member"] == pytest.approx(direct["results"]["slm_tiny_ppl"]["bits_per_byte,none"], rel=1e-6)


def test_the_ensemble_is_loaded_one_member_per_given_device_and_scores_the_same(run_dir, tokenizer):
    (kind, _, placed, _), = run_models(run_dir, torch.float32, torch.device("cpu"), kinds=["ensemble"],
                                       member_devices=["cpu", "cpu", "cpu"])
    (_, _, together, _), = run_models(run_dir, torch.float32, torch.device("cpu"), kinds=["ensemble"])
    placed.concurrent = True  # as on three GPUs: one thread per member
    pairs = [("The capital of France is", " Paris"), ("Hello", " there, friend")]
    scores = CausalLMAdapter(placed, tokenizer).loglikelihood(pairs)
    expected = CausalLMAdapter(together, tokenizer).loglikelihood(pairs)
    assert [log_prob for log_prob, _ in scores] == pytest.approx([log_prob for log_prob, _ in expected], abs=1e-6)
    assert [greedy for _, greedy in scores] == [greedy for _, greedy in expected]
    with pytest.raises(ValueError, match="2 device maps given for 3 members"):
        next(run_models(run_dir, torch.float32, torch.device("cpu"), kinds=["ensemble"], member_devices=["cpu"] * 2))


@pytest.fixture
def recorded_run(run_dir, tmp_path):
    """A copy of the run folder whose members have their checksums.json, as a run saves them."""
    copy = tmp_path / "run_1"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("lm_eval.csv"))
    for member in sorted((copy / "ensemble").glob("member_*")):
        files.write_checksums(member)
    return copy


def test_a_damaged_best_member_is_refused_naming_the_file(recorded_run):
    (kind, path, _, _), = run_models(recorded_run, torch.float32, torch.device("cpu"), kinds=["best_member"])
    weights = recorded_run / "ensemble" / "member_1" / "model.safetensors"  # the best member
    assert path == str(weights.parent)
    damage_second_half(weights)
    with pytest.raises(DamagedFolderError, match=f"^{re.escape(str(weights))}: holds .* is damaged and nothing was "
                                                 "loaded from it; restore the folder from an intact copy"):
        next(run_models(recorded_run, torch.float32, torch.device("cpu"), kinds=["best_member"]))


def test_a_damaged_ensemble_member_stops_the_command_with_exit_code_2_naming_the_file(recorded_run, monkeypatch,
                                                                                     capsys):
    # lm-eval is needed only once the models are loaded: the refusal comes before (and is tested without it).
    monkeypatch.setattr(lm_eval_adapter, "require_lm_eval", lambda: None)
    monkeypatch.setattr(lm_eval_adapter, "task_manager", lambda *args, **kwargs: None)
    weights = recorded_run / "ensemble" / "member_2" / "model.safetensors"
    damage_second_half(weights)
    argv = [str(recorded_run), "--tasks", "slm_tiny_mc", "--models", "ensemble", "--device", "cpu"]
    assert run_command(lambda: lm_eval_adapter.main(argv), lm_eval_adapter.REFUSALS) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith(f"error: {weights}: holds ")
    assert not (recorded_run / "lm_eval.csv").exists()


def test_best_member_needs_student_rows(tmp_path):
    pd.DataFrame({"round": [0], "model": ["teacher"], "ce": [1.0]}).to_csv(tmp_path / "metrics.csv", index=False)
    with pytest.raises(ValueError, match="no row with model == 'student'"):
        lm_eval_adapter.best_member(tmp_path)


# --- lm-eval is optional ------------------------------------------------------------------------------------------

def test_without_lm_eval_the_module_imports_and_says_how_to_install_it(monkeypatch):
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "import lm_eval_adapter\n"
            "try:\n    lm_eval_adapter.EnsembleLM\nexcept ImportError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(lm_eval_adapter.__file__).parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "lm-eval is not installed: pip install lm-eval"
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        task_manager()
