"""Benchmarks of the distillation path, every comparison measured side by side in one run, reported as ratios.

    python bench.py                                   # small CPU settings, a few minutes; prints a table
    python bench.py --json bench.json                 # also write the numbers as JSON
    python bench.py --teacher_size 1.5b --student_size 0.5b --max_length 1024 --batch_size 8   # realistic, GPU

1. step throughput (supervised tokens/s) on identical models, data, batch and length:
   ours with the cached teacher, ours with the online teacher, TRL's GKDTrainer in its supervised setting
   (lmbda=0, beta=0, i.e. forward KL on dataset sequences), and plain TRL SFTTrainer as the floor;
2. loss-path peak memory at Qwen's 151,936-token vocabulary: chunked against naive (full logits);
3. teacher-cache bytes per supervised token, and the KL error of the cache against the dense teacher;
4. step time with 3 frozen members (round 4) relative to none (round 1);
5. wall time of 3 rounds with the cached teacher (cache build included) against the online teacher.

Models are random-weight Llamas built from a config (no download), at the sizes the flags choose; the data is
real chat data (the embedded ShareGPT when installed, else the test fixture) tokenized with a real chat template.
"""

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
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

import teacher_cache
import utils
from losses import LossSettings, divergence_sum, predictor_mask, sparse_divergence_sum
from preprocess_dataset import tokenize_conversation
from train import DistillationTrainer, PaddingCollator, hidden_at, logits_at, output_head, training_arguments

SIZES = {  # hidden, layers, heads, kv heads, MLP width
    "tiny": (128, 2, 2, 1, 344),
    "small": (256, 4, 4, 2, 704),
    "135m": (576, 30, 9, 3, 1536),  # SmolLM2-135M's shape
    "0.5b": (896, 24, 14, 2, 4864),  # Qwen2.5-0.5B's shape
    "1.5b": (1536, 28, 12, 2, 8960),  # Qwen2.5-1.5B's shape
}
QWEN_VOCAB = 151_936


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher_size", default="135m", choices=sorted(SIZES))
    parser.add_argument("--student_size", default="small", choices=sorted(SIZES))
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--cache_k", type=int, default=64)
    parser.add_argument("--chunk_size", type=int, default=128, help="positions per loss chunk on the chunked path")
    parser.add_argument("--mem_tokens", type=int, default=4096, help="positions in the memory test (4 x 1024)")
    parser.add_argument("--round_steps", type=int, default=12, help="steps per round for the 3-round wall time")
    parser.add_argument("--json", default=None, help="write the results here too")
    return parser.parse_args(argv)


# --- setup --------------------------------------------------------------------------------------------------------

def bench_assets(num_chats: int):
    """A real chat tokenizer, real conversations and the real teacher's folder when the embedded packages are
    installed; else the test fixtures' tokenizer and chats, and no teacher folder."""
    import embedded
    from config import EMBEDDED_DATASET, EMBEDDED_TEACHER

    try:
        teacher_dir = embedded.resolve_teacher(EMBEDDED_TEACHER, ".cache")
        with open(embedded.resolve_dataset(EMBEDDED_DATASET, ".cache")) as f:
            chats = [json.loads(line) for _, line in zip(range(num_chats), f)]
        return utils.load_tokenizer(teacher_dir), chats, teacher_dir
    except embedded.MissingPackageError:
        sys.path.insert(0, str(Path(__file__).parent / "tests"))
        from conftest import build_tokenizer, load_chats

        return build_tokenizer("chatml"), load_chats(), None


def random_llama(size: str, vocab_size: int, tokenizer, seed: int, dtype=torch.float32):
    hidden, layers, heads, kv_heads, mlp = SIZES[size]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=mlp,
                         max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).to(dtype)


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def bench_args(options, output_dir, steps):
    """The Trainer settings shared by every trainer in the comparison."""
    class Knobs:  # the subset of the run config that training_arguments reads
        steps_per_round, batch_size, grad_accum, learning_rate = steps, options.batch_size, 1, 1e-4
        lr_scheduler, warmup_ratio, weight_decay, max_grad_norm = "constant", 0.0, 0.0, 1.0
        logging_steps, seed, gradient_checkpointing, save_steps, keep_checkpoints = 1000, 0, False, 10_000, 1
    device = utils.select_device("auto")
    return training_arguments(Knobs, output_dir, 0, use_cpu=device.type == "cpu",
                              bf16=utils.use_bf16_autocast("auto", device))


def median_step(timer: StepTimer) -> float:
    return statistics.median(timer.times[1:])  # the first step pays for warm-up


# --- 1, 4, 5: throughput -----------------------------------------------------------------------------------------

def time_ours(options, student, teacher, members, dataset, tokenizer, cache=None, steps=None) -> float:
    """Median step time of our DistillationTrainer (online teacher when `cache` is None)."""
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        trainer = DistillationTrainer(student, teacher, members, LossSettings(), len(tokenizer),
                                      bench_args(options, out, (steps or options.steps) + 1), dataset, tokenizer,
                                      callbacks=[timer], chunk_size=options.chunk_size, teacher_cache=cache)
        trainer.train()
    return median_step(timer)


def time_sft(options, student, dataset, tokenizer) -> float:
    from trl import SFTTrainer

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        SFTTrainer(student, args=bench_args(options, out, options.steps + 1), train_dataset=dataset,
                   processing_class=tokenizer, data_collator=PaddingCollator(tokenizer.pad_token_id),
                   callbacks=[timer]).train()
    return median_step(timer)


def time_gkd(options, student, teacher, chats, tokenizer) -> float:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    timer = StepTimer()
    base = bench_args(options, "unused", options.steps + 1).to_dict()
    with tempfile.TemporaryDirectory() as out:
        keep = {k: base[k] for k in ("per_device_train_batch_size", "learning_rate", "lr_scheduler_type",
                                     "max_grad_norm", "use_cpu", "bf16", "seed", "max_steps", "logging_steps")}
        args = GKDConfig(output_dir=out, lmbda=0.0, beta=0.0, temperature=1.0, max_length=options.max_length,
                         report_to=[], save_strategy="no", activation_checkpointing=False, **keep)
        GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                   train_dataset=Dataset.from_list([{"messages": chat["messages"]} for chat in chats]),
                   callbacks=[timer]).train()
    return median_step(timer)


# --- 2: loss-path memory ------------------------------------------------------------------------------------------

def loss_path_peak_bytes(path: str, positions: int, chunk_size: int, hidden: int = 896) -> int:
    """Peak resident memory added by one forward+backward of the loss path, measured in a fresh process.

    Linux resets a process's peak RSS (VmHWM) when "5" is written to /proc/self/clear_refs: the peak is taken from
    just before the loss path runs, so model construction does not hide it. The head's weight gradient, which
    every training step holds whatever its loss path, is allocated before the measurement.
    """
    code = f"""
import torch
from losses import LossSettings, Projection, chunked_hybrid_loss_sums

def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

torch.manual_seed(0)
student_head = torch.nn.Linear({hidden}, {QWEN_VOCAB}, bias=False)
teacher_head = torch.nn.Linear({hidden}, {QWEN_VOCAB}, bias=False).requires_grad_(False)
student_hidden = torch.randn({positions}, {hidden}, requires_grad=True)
teacher_hidden = torch.randn({positions}, {hidden})
targets = torch.randint(0, {QWEN_VOCAB}, ({positions},))
# The head's weight gradient (hidden x vocabulary) exists in any training step: allocate it before measuring.
student_head.weight.grad = torch.empty_like(student_head.weight).fill_(1.0).zero_()  # touched: resident
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
sums = chunked_hybrid_loss_sums(Projection(student_hidden, student_head), Projection(teacher_hidden, teacher_head),
                                [], targets, LossSettings(), {chunk_size if path == "chunked" else 0})
sums.total.backward()
print(status("VmHWM:") - before)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent)
    return int(result.stdout.strip().splitlines()[-1])


# --- 3: cache size and error --------------------------------------------------------------------------------------

def cache_bytes_per_token(cache_dir: Path, num_tokens: int) -> float:
    data = sum(f.stat().st_size for f in cache_dir.rglob("*.npy") if f.name not in ("example_ids.npy", "offsets.npy"))
    return data / num_tokens


def main(argv=None):
    options = parse_args(argv)
    results = {"settings": vars(options)}
    tokenizer, chats, teacher_dir = bench_assets(num_chats=options.batch_size * (options.steps + 2) * 3)
    rows = [tokenize_conversation(chat["messages"], tokenizer, options.max_length) for chat in chats]
    dataset = Dataset.from_list([row for row in rows if row is not None])
    dataset = dataset.add_column("example_id", list(range(len(dataset))))
    supervised_per_step = options.batch_size * statistics.mean(
        sum(label != -100 for label in labels[1:]) for labels in dataset["labels"])
    vocab = len(tokenizer)
    device = utils.select_device("auto")
    dtype = utils.frozen_dtype("auto", device)
    if options.teacher_size == "135m" and teacher_dir is not None:
        teacher = utils.load_causal_lm(teacher_dir, dtype).eval()  # the real SmolLM2: realistic distributions
    else:
        teacher = random_llama(options.teacher_size, vocab, tokenizer, seed=1, dtype=dtype).eval()
    results["teacher"] = teacher_dir if options.teacher_size == "135m" and teacher_dir else "random"

    def fresh_student(seed=2):
        return random_llama(options.student_size, vocab, tokenizer, seed=seed)

    # 1, 3, 4: step times and the caches
    with tempfile.TemporaryDirectory() as cache_root:
        caches, build_seconds = build_bench_caches(options, teacher, dataset, tokenizer, Path(cache_root))
        step = {
            "sft": time_sft(options, fresh_student(), dataset, tokenizer),
            "ours_cached_topk": time_ours(options, fresh_student(), teacher, [], dataset, tokenizer, caches["topk"]),
            "ours_cached_hidden": time_ours(options, fresh_student(), teacher, [], dataset, tokenizer,
                                            caches["hidden"]),
            "ours_online": time_ours(options, fresh_student(), teacher, [], dataset, tokenizer),
            "gkd": time_gkd(options, fresh_student(), teacher, chats, tokenizer),
        }
        members = [fresh_student(seed=10 + i).eval() for i in range(3)]
        step["ours_cached_topk_3_members"] = time_ours(options, fresh_student(), teacher, members, dataset,
                                                       tokenizer, caches["topk"])
        results["step_seconds"] = step
        results["tokens_per_second"] = {k: supervised_per_step / v for k, v in step.items()}
        tokens = count_supervised(dataset)
        results["cache_bytes_per_token"] = {mode: cache_bytes_per_token(Path(cache_root) / mode, tokens)
                                            for mode in caches}
        results["cache_kl_error"] = cache_kl_error(teacher, fresh_student(), caches, dataset, tokenizer,
                                                   options.batch_size)

        # 5. three rounds: cached (its build included) against online
        started = time.perf_counter()
        for round_index in range(3):
            time_ours(options, fresh_student(), teacher, members[:round_index], dataset, tokenizer,
                      caches["topk"], steps=options.round_steps)
        cached_rounds = time.perf_counter() - started + build_seconds["topk"]
    started = time.perf_counter()
    for round_index in range(3):
        time_ours(options, fresh_student(), teacher, members[:round_index], dataset, tokenizer,
                  steps=options.round_steps)
    online_rounds = time.perf_counter() - started
    results["three_rounds_seconds"] = {"cached_with_build": cached_rounds, "online": online_rounds,
                                       "cache_build": build_seconds["topk"]}

    # 2. memory
    naive = loss_path_peak_bytes("naive", options.mem_tokens, options.chunk_size)
    chunked = loss_path_peak_bytes("chunked", options.mem_tokens, options.chunk_size)
    results["loss_path_peak_bytes"] = {"naive": naive, "chunked": chunked}

    results["ratios"] = {
        "cached_tokens_per_s_over_gkd": step["gkd"] / step["ours_cached_topk"],
        "cached_step_over_sft_step": step["ours_cached_topk"] / step["sft"],
        "chunked_memory_over_naive": chunked / naive,
        "round4_step_over_round1_step": step["ours_cached_topk_3_members"] / step["ours_cached_topk"],
        "online_3_rounds_over_cached_3_rounds": online_rounds / cached_rounds,
    }
    print_report(results)
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2))
    return results


def build_bench_caches(options, teacher, dataset, tokenizer, cache_root: Path) -> tuple[dict, dict]:
    """A top-k and a hidden-state cache of the training data; returns the caches and their build seconds."""
    caches, seconds = {}, {}
    identity = {"teacher": "bench", "dataset_fingerprint": dataset._fingerprint, "max_length": options.max_length}
    for mode in ("topk", "hidden"):
        started = time.perf_counter()
        teacher_cache.build_cache(teacher, dataset, cache_root / mode, mode=mode, k=options.cache_k, temperature=1.0,
                                  vocab_size=len(tokenizer), batch_size=options.batch_size,
                                  collator=PaddingCollator(tokenizer.pad_token_id), metadata=identity)
        teacher_cache.write_metadata(cache_root / mode, identity)
        caches[mode] = teacher_cache.TeacherCache.open(cache_root / mode, identity)
        seconds[mode] = time.perf_counter() - started
    return caches, seconds


@torch.no_grad()
def cache_kl_error(teacher, student, caches: dict, dataset, tokenizer, batch_size: int) -> dict:
    """KL(teacher || student) per supervised token, from the dense online teacher and from each cache."""
    collator, vocab = PaddingCollator(tokenizer.pad_token_id), len(tokenizer)
    totals = {"dense": 0.0, **dict.fromkeys(caches, 0.0)}
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        positions = predictor_mask(batch["labels"])
        student_logits = logits_at(student, batch["input_ids"], batch["attention_mask"], positions, vocab)
        teacher_hidden = hidden_at(teacher, batch["input_ids"], batch["attention_mask"], positions)
        ids = batch["example_id"].tolist()
        totals["dense"] += divergence_sum(output_head(teacher, vocab)(teacher_hidden), student_logits).item()
        totals["topk"] += sparse_divergence_sum(*caches["topk"].topk_targets(ids), student_logits).item()
        cached_logits = output_head(teacher, vocab)(caches["hidden"].hidden_states(ids))
        totals["hidden"] += divergence_sum(cached_logits, student_logits).item()
    tokens = count_supervised(dataset)
    dense = totals["dense"] / tokens
    return {mode: {"dense": dense, "cache": totals[mode] / tokens,
                   "relative_error": abs(totals[mode] / tokens - dense) / dense} for mode in caches}


def count_supervised(dataset) -> int:
    return sum(sum(label != -100 for label in labels[1:]) for labels in dataset["labels"])


def print_report(results: dict) -> None:
    step, tokens, ratios = results["step_seconds"], results["tokens_per_second"], results["ratios"]
    print("\n1. step throughput (supervised tokens/s; median step after warm-up)")
    for name in step:
        print(f"   {name:<24} {step[name]:8.3f} s/step {tokens[name]:10.1f} tokens/s")
    print("\n2. loss-path peak memory (naive: full logits; chunked: chunk by chunk, recomputed in backward)")
    memory = results["loss_path_peak_bytes"]
    print(f"   naive {memory['naive'] / 2**20:9.1f} MiB   chunked {memory['chunked'] / 2**20:9.1f} MiB")
    print("\n3. teacher cache")
    for mode, size in results["cache_bytes_per_token"].items():
        error = results["cache_kl_error"][mode]
        print(f"   {mode:<7} {size:7.1f} B/token   KL(teacher||student) dense {error['dense']:.5f} vs cache "
              f"{error['cache']:.5f} (relative error {error['relative_error']:.2e})")
    rounds = results["three_rounds_seconds"]
    print(f"\n5. three rounds: online {rounds['online']:.1f} s, cached {rounds['cached_with_build']:.1f} s "
          f"(of which cache build {rounds['cache_build']:.1f} s)")
    targets = {"cached_tokens_per_s_over_gkd": (">=", 2.0), "cached_step_over_sft_step": ("<=", 1.3),
               "chunked_memory_over_naive": ("<=", 0.15), "round4_step_over_round1_step": ("<=", 1.5),
               "online_3_rounds_over_cached_3_rounds": (">=", 2.0)}
    print("\nratios (measured side by side in this run)")
    for name, value in ratios.items():
        sign, target = targets[name]
        met = value >= target if sign == ">=" else value <= target
        print(f"   {name:<40} {value:7.3f}   target {sign} {target}   {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
