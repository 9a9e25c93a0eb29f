"""bench_inference.py at its smallest sizes: every configuration measured at every batch size, ratios from the rows."""

import json
import math

import pytest

from benchmarks import bench_inference

CONFIGURATIONS = ["one member", "ensemble, one after another", "ensemble, at once (threads)",
                  "single model, 2x the layers", "ensemble, a process each (gloo)"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_inference") / "results.json"
    results = bench_inference.main(["--size", "tiny", "--vocab_size", "512", "--batch_sizes", "1", "3",
                                    "--new_tokens", "4", "--repeats", "1", "--json", str(path)])
    return results, path


def test_every_configuration_is_measured_at_every_batch_size(smoke):
    results, path = smoke
    assert list(results["rows"]) == CONFIGURATIONS
    for rows in results["rows"].values():
        assert [row["batch"] for row in rows] == [1, 3]
        for row in rows:
            assert all(math.isfinite(row[key]) and row[key] > 0
                       for key in ("prefill_ms", "decode_ms_per_token", "tokens_per_second"))
            assert row["tokens_per_second"] == pytest.approx(row["batch"] * 1000 / row["decode_ms_per_token"])
    assert json.loads(path.read_text())["rows"] == results["rows"]


def test_ratios_are_each_configurations_decode_latency_over_one_members(smoke):
    results, _ = smoke
    one = {row["batch"]: row["decode_ms_per_token"] for row in results["rows"]["one member"]}
    for name, rows in results["rows"].items():
        for row in rows:
            assert results["decode_latency_vs_one_member"][name][str(row["batch"])] == \
                pytest.approx(row["decode_ms_per_token"] / one[row["batch"]])


def test_the_single_model_has_about_the_ensembles_parameters_and_the_exchange_its_bytes(smoke):
    results, _ = smoke
    parameters = results["parameters"]
    assert parameters["ensemble"] == 2 * parameters["member"]
    assert 0.7 < parameters["single model"] / parameters["ensemble"] <= 1.0  # the embeddings are not doubled
    assert results["bytes_per_token_and_process"] == {"full row": 4 * 512, "top-64": 64 * 4 + 4 * (2 * 64 + 1)}
