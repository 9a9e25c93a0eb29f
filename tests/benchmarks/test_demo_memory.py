"""benchmarks/demo_memory.py: a run's peak resident memory by phase (the figures themselves are measured, never asserted)."""

import json

from benchmarks import demo_memory
from conftest import DATA_DIR, build_tiny_llama, build_tokenizer


def test_the_probe_reports_every_phase_of_a_run_and_writes_its_json(tmp_path):
    tokenizer = build_tokenizer("chatml")
    build_tiny_llama(tokenizer, seed=11, hidden_size=48).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    output = tmp_path / "memory.json"
    results = demo_memory.main(["--json", str(output), "--preset", "test", "--teacher", str(tmp_path / "teacher"),
                                "--dataset", str(DATA_DIR / "chats.jsonl"), "--output_root", str(tmp_path / "runs"),
                                "--cache_dir", str(tmp_path / "cache")])
    assert results["exit_code"] == 0
    assert json.loads(output.read_text()) == results
    assert {"data", "teacher", "training", "evaluation", "saving", "samples", "report"} <= set(results["phases"])
    assert results["peak_mib"] == max(phase["peak_mib"] for phase in results["phases"].values()) > 0
    assert len(results["rss_after_each_training_step_mib"]) == 2 * 3  # the test preset: 2 rounds x 3 steps
    # the timeline follows the run: data, then the teacher, then each round's training before its evaluation
    order = [entry["phase"] for entry in results["timeline"]]
    assert order.index("data") < order.index("teacher") < order.index("training") < order.index("evaluation")
    assert order.count("evaluation") == 2
