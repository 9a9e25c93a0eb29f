"""Inference speed of an ensemble, measured side by side in one run: one member alone, the ensemble with its members
one after another, at once (a thread each), and spread over processes (a process each, torchrun), and a single model
of about the ensemble's parameters. Prefill latency, per-token decode latency and tokens per second, at batch 1 and
a larger batch, greedy decoding with a KV cache; and the bytes each process sends per token when spread out.

    python -m benchmarks.bench_inference                                   # SmolLM2-135M-shaped members, 1 thread per member
    python -m benchmarks.bench_inference --size tiny --new_tokens 8        # seconds, for a smoke test
    python -m benchmarks.bench_inference --size 0.5b --vocab_size 151936 --device cuda   # one GPU per member, if there are as
                                                                              # many; else the members share GPU 0

Every model has random weights (speed does not depend on them) and reads random prompts. Each configuration gets the
threads one member gets (--threads, per member): one member and the one-after-another ensemble run on that many,
the concurrent ensemble on that many per member thread, the distributed one on that many per process. Decode latency
is (time of prompt + 1 + N tokens - time of prompt + 1 token) / N, each time the median of --repeats runs (or the
fastest: --statistic min). Every run decodes all N tokens (no end-of-sequence stops it). The results are printed and
written as JSON (--json). `study.py SPEC --latency` times a study's saved models with the same functions
(`timed_generation` in one process, `distributed_rows` over processes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ensemble import ModelEnsemble
from benchmarks.bench import SIZES
from slm_ensembles import distributed_ensemble

REPO = Path(__file__).resolve().parents[1]  # torchrun starts the workers as a module from here
EXCHANGE_K = 64  # the top-k exchange's default (score.py, generate.py)
STATISTICS = {"median": statistics.median, "min": min}  # how --repeats timings make one


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="135m", choices=sorted(SIZES), help="each member's shape")
    parser.add_argument("--vocab_size", type=int, default=49_152, help="SmolLM2's by default")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--statistic", choices=sorted(STATISTICS), default="median",
                        help="each timing over --repeats runs: their median, or the fastest (min: best of)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per member (per process)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: member i on GPU i when there are as many GPUs (else all on GPU 0); the process "
                             "per member needs a GPU each and is skipped without")
    parser.add_argument("--json", default="bench_inference.json", help="write the results here ('' to skip)")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # a distributed process
    return parser.parse_args(argv)


def random_member(size: str, vocab_size: int, seed: int, layer_factor: int = 1) -> LlamaForCausalLM:
    """A random Llama of `size`'s shape; `layer_factor` times its layers (a single model as large as an ensemble)."""
    hidden, layers, heads, kv_heads, mlp = SIZES[size]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers * layer_factor,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=mlp,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # every run decodes all its tokens
    return model


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def timed_generation(model, batch_size: int, options) -> dict:
    """Prefill and per-token decode latency (ms, each the median of options.repeats runs, or the fastest with
    options.statistic "min") and decode tokens per second. Greedy, every token decoded: no end-of-sequence token
    stops a run early (a trained model's would), which a short output would show as an error."""
    generator = torch.Generator().manual_seed(batch_size)
    prompt = torch.randint(1, options.vocab_size, (batch_size, options.prompt_tokens), generator=generator)
    prompt = prompt.to(model.device)
    statistic = STATISTICS[options.statistic]

    def seconds(new_tokens: int) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                    do_sample=False, pad_token_id=0, eos_token_id=None)
        if prompt.device.type == "cuda":
            torch.cuda.synchronize()
        if output.shape[1] != prompt.shape[1] + new_tokens:
            raise RuntimeError(f"generation stopped after {output.shape[1] - prompt.shape[1]} of {new_tokens} "
                               f"tokens: the timing would not be per token")
        return time.perf_counter() - started

    seconds(2)  # warm-up
    prefill = statistic([seconds(1) for _ in range(options.repeats)])
    whole = statistic([seconds(1 + options.new_tokens) for _ in range(options.repeats)])
    per_token = max(whole - prefill, 1e-9) / options.new_tokens
    return {"batch": batch_size, "prefill_ms": 1000 * prefill, "decode_ms_per_token": 1000 * per_token,
            "tokens_per_second": batch_size / per_token}


def member_devices(options) -> list[torch.device]:
    """Member i's device: the CPU, GPU i when there is one per member, else GPU 0 for all."""
    if options.device == "cpu":
        return [torch.device("cpu")] * options.members
    if torch.cuda.device_count() >= options.members:
        return [torch.device("cuda", i) for i in range(options.members)]
    return [torch.device("cuda", 0)] * options.members


def distributed_rows(folder: Path, options) -> list[dict]:
    """The ensemble saved in `folder` timed at each of options.batch_sizes, run as options.members processes under
    torchrun (one member each when it has as many; rank 0's timings), each on options.threads threads."""
    out = folder / "distributed.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(options.members), "--module", "benchmarks.bench_inference",
               "--worker", str(folder), "--json", str(out), "--device", options.device,
               "--batch_sizes", *map(str, options.batch_sizes), "--prompt_tokens", str(options.prompt_tokens),
               "--new_tokens", str(options.new_tokens), "--repeats", str(options.repeats),
               "--statistic", options.statistic,
               "--threads", str(options.threads), "--vocab_size", str(options.vocab_size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(options.threads)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"the distributed run failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def worker(options) -> None:
    """One process of the distributed measurement: its member, the others' over gloo (or NCCL)."""
    torch.set_num_threads(options.threads)
    processes = distributed_ensemble.start_processes(device=options.device)
    ensemble = distributed_ensemble.DistributedEnsemble.from_pretrained(options.worker, processes)
    rows = [timed_generation(ensemble, batch, options) for batch in options.batch_sizes]
    if processes.rank == 0:
        Path(options.json).write_text(json.dumps(rows))
    torch.distributed.destroy_process_group()


def main(argv=None) -> dict:
    options = parse_args(argv)
    if options.worker is not None:
        worker(options)
        return {}
    torch.set_num_threads(options.threads)
    devices = member_devices(options)
    members = [random_member(options.size, options.vocab_size, seed).to(device)
               for seed, device in zip(range(options.members), devices)]
    single = random_member(options.size, options.vocab_size, seed=100, layer_factor=options.members).to(devices[0])
    models = {
        "one member": members[0],
        "ensemble, one after another": ModelEnsemble.from_members(members, vocab_size=options.vocab_size,
                                                                  concurrent=False),
        "ensemble, at once (threads)": ModelEnsemble.from_members(members, vocab_size=options.vocab_size,
                                                                  concurrent=True),
        f"single model, {options.members}x the layers": single,
    }
    rows = {name: [timed_generation(model, batch, options) for batch in options.batch_sizes]
            for name, model in models.items()}
    if options.device == "cpu" or torch.cuda.device_count() >= options.members:
        with tempfile.TemporaryDirectory() as folder:
            models["ensemble, one after another"].save_pretrained(folder)
            backend = "gloo" if options.device == "cpu" else "NCCL"
            rows[f"ensemble, a process each ({backend})"] = distributed_rows(Path(folder), options)
    results = {
        "settings": {key: value for key, value in vars(options).items() if key not in ("json", "worker")},
        "parameters": {"member": parameters(members[0]), "ensemble": sum(map(parameters, members)),
                       "single model": parameters(single)},
        "rows": rows,
        "decode_latency_vs_one_member": {
            name: {str(b): r["decode_ms_per_token"] / one["decode_ms_per_token"]
                   for b, r, one in zip(options.batch_sizes, model_rows, rows["one member"], strict=True)}
            for name, model_rows in rows.items()},
        "bytes_per_token_and_process": {"full row": 4 * options.vocab_size,
                                        f"top-{EXCHANGE_K}": distributed_ensemble.top_k_bytes(EXCHANGE_K, options.members)},
    }
    print_table(results, options)
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_table(results: dict, options) -> None:
    print(f"{options.members} members of shape {options.size} ({results['parameters']['member']:,} parameters each), "
          f"{options.threads} thread(s) per member, prompt {options.prompt_tokens}, {options.new_tokens} new tokens")
    print(f"{'model':36} {'batch':>5} {'prefill ms':>11} {'decode ms/token':>16} {'tokens/s':>9} {'vs member':>10}")
    for name, model_rows in results["rows"].items():
        for row in model_rows:
            ratio = results["decode_latency_vs_one_member"][name][str(row["batch"])]
            print(f"{name:36} {row['batch']:>5} {row['prefill_ms']:>11.1f} {row['decode_ms_per_token']:>16.2f} "
                  f"{row['tokens_per_second']:>9.1f} {ratio:>9.2f}x")
    sent = results["bytes_per_token_and_process"]
    print("bytes each process sends per token: " + ", ".join(f"{key} {value:,}" for key, value in sent.items()))


if __name__ == "__main__":
    main()
