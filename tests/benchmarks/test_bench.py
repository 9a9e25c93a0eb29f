"""bench.py at its smallest sizes: every item measured, the trainers compared on the same batches, JSON written."""

import json
import math

import pytest
import torch

from conftest import build_tokenizer
from model_io import IGNORE_INDEX
from benchmarks import bench
from slm_ensembles.losses import next_token_targets

SMOKE_ARGS = ["--student_size", "tiny", "--teacher_size", "tiny", "--batch_size", "2", "--max_length", "64",
              "--steps", "2", "--round_steps", "2", "--mem_tokens", "512", "--mem_vocab_size", "8192",
              "--chunk_sizes", "64"]
TRAINERS = ["sft", "ours_cached_topk", "ours_cached_hidden", "ours_online", "gkd", "ours_cached_topk_3_members"]


def numeric_leaves(tree, path=""):
    """(path, value) of every number in a nested dict."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from numeric_leaves(value, f"{path}/{key}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    json_path = tmp_path_factory.mktemp("bench") / "results.json"
    return bench.main([*SMOKE_ARGS, "--json", str(json_path)]), json_path


def test_every_item_is_measured_with_finite_positive_numbers(smoke):
    results, _ = smoke
    for figure in ("step_seconds", "tokens_per_second", "supervised_tokens"):
        assert sorted(results[figure]) == sorted(TRAINERS)
    assert sorted(results["cache_bytes_per_token"]) == sorted(results["cache_kl_error"]) == ["hidden", "topk"]
    assert sorted(results["three_rounds_seconds"]) == ["cache_build", "cached_with_build", "online"]
    assert list(results["loss_path_peak_bytes"]["chunked"]) == ["64"]
    assert sorted(results["ratios"]) == sorted(["cached_tokens_per_s_over_gkd", "cached_step_over_sft_step",
                                                "chunked_memory_over_naive_at_64", "round4_step_over_round1_step",
                                                "online_3_rounds_over_cached_3_rounds",
                                                "ce_only_evaluation_over_every_metric"])
    evaluation = results["early_stopping_evaluation"]
    assert evaluation["members"] == bench.FROZEN_MEMBERS and evaluation["same_ce"] is True
    assert sorted(evaluation["seconds"]) == ["ce_only", "every_metric"]
    measured = {key: value for key, value in results.items() if key not in ("settings", "teacher")}
    for path, value in numeric_leaves(measured):
        assert math.isfinite(value), path
        # A cache can reproduce the dense KL exactly (relative error 0), and the fastest chunk size can be 0 (one
        # chunk); every other figure is a size or a rate.
        assert value >= 0 if path.endswith(("relative_error", "best_chunk_size")) else value > 0, path


def test_every_trainer_is_timed_on_the_same_supervised_tokens(smoke):
    results, _ = smoke
    # Same dataset, collator, seed and batch size: the timed steps of every trainer hold the same batches.
    assert len(set(results["supervised_tokens"].values())) == 1
    for trainer in TRAINERS:
        expected = results["supervised_tokens"][trainer] / results["settings"]["steps"] / results["step_seconds"][
            trainer]
        assert results["tokens_per_second"][trainer] == pytest.approx(expected)


def test_the_memory_and_cache_figures_are_plausible(smoke):
    results, _ = smoke
    memory = results["loss_path_peak_bytes"]
    assert memory["chunked"]["64"] < memory["naive"]
    # The hidden cache stores the teacher's final hidden states as float16: 2 bytes per dimension, plus indexes.
    teacher_hidden = bench.SIZES["tiny"][0]
    assert 2 * teacher_hidden <= results["cache_bytes_per_token"]["hidden"] < 2.2 * teacher_hidden


def test_the_chunk_size_sweep_reports_the_fastest_swept_size(smoke, capsys):
    results, _ = smoke
    sweep = results["loss_chunk_size_sweep"]
    # 2 x 64 positions: one chunk (0), and the default sweep's only size that splits them
    assert (sweep["positions"], list(sweep["seconds"])) == (128, ["0", "64"])
    best = sweep["best_chunk_size"]
    assert sweep["seconds"][str(best)] == min(sweep["seconds"].values())
    bench.print_report(results, "")
    assert f"best loss_chunk_size on this machine: {best}\n" in capsys.readouterr().out


def test_the_json_file_holds_the_returned_results(smoke):
    results, json_path = smoke
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(results))


def test_the_supervised_token_counter_counts_shifted_labels():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX], [7, IGNORE_INDEX, 8, 9]])
    counter = bench.SupervisedTokenCounter(lambda examples: {"labels": labels})
    batch = counter([{"input_ids": [1]}])
    assert batch["labels"] is labels  # the wrapped collator's batch, passed on unchanged
    assert counter.counts == [next_token_targets(labels).numel()]


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused():
    tokenizer = build_tokenizer("chatml")
    assert bench.checked_vocab_size(None, tokenizer) == len(tokenizer)
    assert bench.checked_vocab_size(len(tokenizer) + 7, tokenizer) == len(tokenizer) + 7
    with pytest.raises(ValueError, match="--vocab_size"):
        bench.checked_vocab_size(len(tokenizer) - 1, tokenizer)
