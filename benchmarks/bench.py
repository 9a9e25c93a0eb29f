"""Benchmarks of the distillation path, every comparison measured side by side in one run, reported as ratios.

    python -m benchmarks.bench                                   # small CPU settings, a few minutes; prints a table
    python -m benchmarks.bench --json ''                         # the same without writing bench.json
    python -m benchmarks.bench --teacher_size 1.5b --student_size 0.5b --vocab_size 151936 --max_length 1024 --batch_size 8
                                                      # realistic sizes, on a GPU

1. step throughput (supervised tokens/s) on identical models, data, batch, length and data order:
   ours with the cached teacher, ours with the online teacher, TRL's GKDTrainer in its supervised setting
   (lmbda=0, beta=0, i.e. forward KL on dataset sequences), and plain TRL SFTTrainer as the floor. Every trainer
   gets the same tokenized dataset and our PaddingCollator, and its rate counts the supervised tokens of the batches
   its own timed steps trained on;
2. loss-path peak memory at Qwen's 151,936-token vocabulary: naive (full logits) against chunked, at several chunk
   sizes including the config's default (CUDA allocator peak on a GPU, peak resident memory on CPU);
3. teacher-cache bytes per supervised token (from the files on disk), and the KL error of the cache against the
   dense teacher;
4. step time with 3 frozen members (round 4) relative to none (round 1);
5. wall time of 3 rounds with the cached teacher (cache build included) against the online teacher;
6. the loss path's forward and backward time at several chunk sizes, side by side, and the fastest: the best
   loss_chunk_size on the machine the bench runs on;
7. one early-stopping evaluation of a student with 3 frozen members (round 4's), as a round runs it every
   eval_steps: the mixture's CE alone (evaluation.mixture_ce) against every metric of `evaluate` with the teacher's
   hidden states cached (its head, the KL to it, the members' pairwise KL, calibration), the same CE from both.

Models are random-weight Llamas built from a config (no download), at the sizes the flags choose; the data is
real chat data (the embedded ShareGPT when installed, else the test fixture) tokenized with a real chat template.
The results are printed and written as JSON (bench.json unless --json says otherwise).
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, TrainerCallback

from config import EMBEDDED_DATASET, EMBEDDED_TEACHER, Config
from model_io import PaddingCollator, hidden_at, logits_at, output_head
from preprocess_dataset import tokenize_conversation
from train import DistillationTrainer, training_arguments
import utils
from slm_ensembles import embedded, teacher_cache
from slm_ensembles.evaluation import CachedTeacher, evaluate, mixture_ce
from slm_ensembles.losses import (LossSettings, Projection, chunked_hybrid_loss_sums, compile_loss_terms,
                                  divergence_sum, hybrid_loss_terms, predictor_mask, sparse_divergence_sum)

SIZES = {  # hidden, layers, heads, kv heads, MLP width
    "tiny": (128, 2, 2, 1, 344),
    "small": (256, 4, 4, 2, 704),
    "135m": (576, 30, 9, 3, 1536),  # SmolLM2-135M's shape
    "0.5b": (896, 24, 14, 2, 4864),  # Qwen2.5-0.5B's shape
    "1.5b": (1536, 28, 12, 2, 8960),  # Qwen2.5-1.5B's shape
}
QWEN_VOCAB = 151_936
REPO = Path(__file__).resolve().parents[1]  # the project's modules, and the tests' tiny-model builders
FROZEN_MEMBERS = 3  # round 4 trains through three frozen members
TARGETS = {  # ratio: (comparison, target), from the issue; the memory target applies at every chunk size
    "cached_tokens_per_s_over_gkd": (">=", 2.0),
    "cached_step_over_sft_step": ("<=", 1.3),
    "chunked_memory_over_naive": ("<=", 0.15),
    "round4_step_over_round1_step": ("<=", 1.5),
    "online_3_rounds_over_cached_3_rounds": (">=", 2.0),
    # early stopping's evaluations took two thirds of a study run's time on this CPU (py-spy): at most half of that
    "ce_only_evaluation_over_every_metric": ("<=", 0.5),
}
SWEEP_CHUNK_SIZES = (64, 128, 256, 512, 1024, 2048)  # item 6's sizes, besides 0 (one chunk)
SWEEP_REPEATS = 2  # item 6's timed runs per chunk size, after a warm-up; the fastest counts


def parse_args(argv=None):
    default_chunk = Config().loss_chunk_size
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher_size", default="135m", choices=sorted(SIZES))
    parser.add_argument("--student_size", default="small", choices=sorted(SIZES))
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="vocabulary of the random models and the cache (default: the tokenizer's; e.g. 151936 "
                             "for Qwen's); must hold every token id, so at least the tokenizer's size")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--cache_k", type=int, default=64)
    parser.add_argument("--chunk_size", type=int, default=default_chunk,
                        help="positions per loss chunk in our trainer (default: the config's loss_chunk_size)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our per-chunk loss function")
    parser.add_argument("--mem_tokens", type=int, default=4096, help="positions in the memory test (4 x 1024)")
    parser.add_argument("--mem_vocab_size", type=int, default=QWEN_VOCAB, help="vocabulary of the memory test")
    parser.add_argument("--chunk_sizes", type=int, nargs="+", default=sorted({128, 256, default_chunk}),
                        help="chunk sizes of the memory test (default: 128, 256 and the config's loss_chunk_size)")
    parser.add_argument("--sweep_chunk_sizes", type=int, nargs="+", default=None,
                        help="chunk sizes whose loss-path time item 6 compares (0: one chunk; default: 0 and each of "
                             f"{', '.join(map(str, SWEEP_CHUNK_SIZES))} below a micro-batch's batch_size x max_length "
                             "positions)")
    parser.add_argument("--round_steps", type=int, default=0,
                        help="steps per round for the 3-round wall time (0: one pass over the cached data, as a real "
                             "round makes)")
    parser.add_argument("--json", default="bench.json", help="write the results here ('' to skip)")
    parser.add_argument("--save_random_teacher", metavar="DIR", default=None,
                        help="only save a random-weight teacher of --teacher_size and --vocab_size, with the bench's "
                             "chat tokenizer, as a model folder main.py can load (gpu_check.sh's paper-shaped run)")
    options = parser.parse_args(argv)
    if any(size <= 0 for size in options.chunk_sizes):
        parser.error(f"--chunk_sizes {options.chunk_sizes}: every size must be > 0 (the naive path is always measured)")
    if any(size < 0 for size in options.sweep_chunk_sizes or ()):
        parser.error(f"--sweep_chunk_sizes {options.sweep_chunk_sizes}: every size must be >= 0 (0: one chunk)")
    return options


# --- setup --------------------------------------------------------------------------------------------------------

def bench_assets(num_chats: int):
    """A real chat tokenizer, real conversations and the real teacher's folder when the embedded packages are
    installed; else the test fixtures' tokenizer and chats, and no teacher folder."""
    try:
        teacher_dir = embedded.resolve_teacher(EMBEDDED_TEACHER, ".cache")
        with open(embedded.resolve_dataset(EMBEDDED_DATASET, ".cache")) as f:
            chats = [json.loads(line) for _, line in zip(range(num_chats), f)]
        return utils.load_tokenizer(teacher_dir), chats, teacher_dir
    except embedded.MissingPackageError:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import build_tokenizer, load_chats

        return build_tokenizer("chatml"), load_chats(), None


def checked_vocab_size(requested: int | None, tokenizer) -> int:
    """The models' vocabulary: the tokenizer's unless --vocab_size asks for more (ids beyond it are never used)."""
    if requested is None:
        return len(tokenizer)
    if requested < len(tokenizer):
        raise ValueError(f"--vocab_size {requested} is smaller than the tokenizer's {len(tokenizer)} tokens: its ids "
                         f"would fall outside the models' embeddings; pass at least {len(tokenizer)}")
    return requested


def random_llama(size: str, vocab_size: int, tokenizer, seed: int, dtype=torch.float32):
    hidden, layers, heads, kv_heads, mlp = SIZES[size]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=mlp,
                         max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).to(dtype)


def bench_teacher(options, vocab_size: int, teacher_dir, tokenizer, dtype):
    """The real SmolLM2 (realistic distributions) when it is available at the requested size and vocabulary, else a
    random Llama; returns the model and its description."""
    if (options.teacher_size == "135m" and teacher_dir is not None
            and AutoConfig.from_pretrained(teacher_dir).vocab_size == vocab_size):
        return utils.load_causal_lm(teacher_dir, dtype).eval(), str(teacher_dir)
    return random_llama(options.teacher_size, vocab_size, tokenizer, seed=1, dtype=dtype).eval(), "random"


def bench_dataset(chats, tokenizer, max_length: int):
    """The chats as our preprocessing tokenizes them (conversations with nothing supervised dropped), with the
    `example_id` column a teacher cache is keyed by."""
    rows = [tokenize_conversation(chat["messages"], tokenizer, max_length) for chat in chats]
    return teacher_cache.with_example_ids(Dataset.from_list([row for row in rows if row is not None]))


def bench_args(options, output_dir, steps):
    """The Trainer settings shared by every trainer in the comparison: one batch per step, the same seed and data
    order, no checkpoints."""
    settings = Config(steps_per_round=steps, batch_size=options.batch_size, learning_rate=1e-4,
                      lr_scheduler="constant", warmup_ratio=0.0, logging_steps=1000, save_steps=10_000,
                      keep_checkpoints=1)
    device = utils.select_device("auto")
    return training_arguments(settings, output_dir, 0, use_cpu=device.type == "cpu",
                              bf16=utils.use_bf16_autocast("auto", device))


# --- 1, 4, 5: throughput -----------------------------------------------------------------------------------------

class StepTimer(TrainerCallback):
    """Wall time of every optimizer step."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


class SupervisedTokenCounter:
    """Wraps a trainer's collator and records, batch by batch in the order they are built, how many tokens each
    batch supervises: labels != -100 after the causal shift, the positions every trainer here puts a loss on."""

    def __init__(self, collator):
        self.collator = collator
        self.counts: list[int] = []

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        self.counts.append(int(predictor_mask(batch["labels"]).sum()))
        return batch


def timed_training(trainer) -> dict:
    """Train, timing every step; the first step pays for warm-up and is left out of every figure.

    The dataloader builds batches in the order steps consume them and bench_args gives one batch per step, so the
    k-th batch built is step k's (the loader may build one more ahead, which is never counted).
    """
    timer, counter = StepTimer(), SupervisedTokenCounter(trainer.data_collator)
    trainer.add_callback(timer)
    trainer.data_collator = counter
    trainer.train()
    seconds = timer.times[1:]
    tokens = sum(counter.counts[1:len(timer.times)])
    return {"step_seconds": statistics.mean(seconds), "tokens_per_second": tokens / sum(seconds),
            "supervised_tokens": tokens}


def ours_trainer(options, student, teacher, members, dataset, tokenizer, output_dir, steps, cache=None):
    """Our DistillationTrainer; the online teacher when `cache` is None."""
    return DistillationTrainer(student, teacher, members, LossSettings(), options.vocab_size,
                               bench_args(options, output_dir, steps), dataset, tokenizer,
                               chunk_size=options.chunk_size, teacher_cache=cache, compile_loss=options.compile)


def sft_trainer(options, student, dataset, tokenizer, output_dir):
    from trl import SFTTrainer

    return SFTTrainer(student, args=bench_args(options, output_dir, options.steps + 1), train_dataset=dataset,
                      processing_class=tokenizer, data_collator=PaddingCollator(tokenizer.pad_token_id))


def gkd_trainer(options, student, teacher, dataset, tokenizer, output_dir):
    """TRL's GKDTrainer in its supervised setting (lmbda=0: never the student's own generations; beta=0: forward KL),
    with every Trainer setting of the others and our dataset and collator. GKDTrainer respects a given collator and
    always skips dataset preparation, so it trains on exactly the batches the others do."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the experimental-API notice, printed at import
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    shared = bench_args(options, output_dir, options.steps + 1)
    args = GKDConfig(**{field.name: getattr(shared, field.name) for field in dataclasses.fields(shared) if field.init},
                     lmbda=0.0, beta=0.0, temperature=1.0)
    return GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                      train_dataset=dataset, data_collator=PaddingCollator(tokenizer.pad_token_id))


def throughput(make_trainer) -> dict:
    """timed_training of the trainer that make_trainer(output_dir) builds, in a temporary output folder."""
    with tempfile.TemporaryDirectory() as output_dir:
        return timed_training(make_trainer(output_dir))


def three_rounds_seconds(options, make_student, teacher, members, dataset, tokenizer, cache=None) -> float:
    """Wall time of rounds 1-3 (round r trains through r - 1 frozen members), trainer set-up included."""
    steps = options.round_steps or math.ceil(len(dataset) / options.batch_size)
    started = time.perf_counter()
    for round_index in range(3):
        with tempfile.TemporaryDirectory() as output_dir:
            ours_trainer(options, make_student(), teacher, members[:round_index], dataset, tokenizer, output_dir,
                         steps, cache).train()
    return time.perf_counter() - started


# --- 2: loss-path memory ------------------------------------------------------------------------------------------

def resident_bytes(field: str) -> int:
    """This process's resident memory of one /proc/self/status line: "VmRSS:" (now) or "VmHWM:" (its peak)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def loss_path_probe(chunk_size: int, positions: int, student_hidden: int, teacher_hidden: int, vocab_size: int,
                    device: str) -> int:
    """Peak memory added by one forward and backward of the hybrid loss, in this process; loss_path_peak_bytes runs
    it alone in a fresh process (_PROBE_CHILD), so that nothing another measurement freed can be reused unseen.

    The heads, the hidden states and the student head's weight gradient (which every training step holds, whatever
    its loss path) are allocated before the peak is reset, so only the loss path's own memory is measured. A warm-up
    on two positions runs first: the first backward pages in library code and sets up thread pools and library
    workspaces, tens of MiB that are no part of the loss path's memory. On CPU the peak is the resident set: Linux
    resets its peak (VmHWM) to the current size when "5" is written to /proc/self/clear_refs. On CUDA it is the
    caching allocator's peak of allocated bytes.
    """
    device = torch.device(device)
    torch.manual_seed(0)
    student_head = torch.nn.Linear(student_hidden, vocab_size, bias=False, device=device)
    teacher_head = torch.nn.Linear(teacher_hidden, vocab_size, bias=False, device=device).requires_grad_(False)
    student_states = torch.randn(positions, student_hidden, device=device, requires_grad=True)
    teacher_states = torch.randn(positions, teacher_hidden, device=device)
    targets = torch.randint(0, vocab_size, (positions,), device=device)
    student_head.weight.grad = torch.zeros_like(student_head.weight)

    def loss_path(student_states, teacher_states, targets, chunk_size):
        sums = chunked_hybrid_loss_sums(Projection(student_states, student_head),
                                        Projection(teacher_states, teacher_head), [], targets, LossSettings(),
                                        chunk_size)
        sums.total.backward()

    loss_path(student_states[:2].detach().requires_grad_(), teacher_states[:2], targets[:2], min(chunk_size, 1))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        student_head.weight.grad.fill_(1.0).zero_()  # touch every page: zeros_like may map them lazily
        before = resident_bytes("VmRSS:")
        Path("/proc/self/clear_refs").write_text("5")
    loss_path(student_states, teacher_states, targets, chunk_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return resident_bytes("VmHWM:") - before


# What the fresh process of each measurement runs: loss_path_probe's keyword arguments come as JSON in argv[1], the
# peak goes to stdout as JSON.
_PROBE_CHILD = ("import json, sys; from benchmarks import bench; "
                "print(json.dumps(bench.loss_path_probe(**json.loads(sys.argv[1]))))")


def loss_path_peak_bytes(chunk_size: int, positions: int, student_hidden: int, teacher_hidden: int,
                         vocab_size: int = QWEN_VOCAB, device: str = "cpu") -> int:
    """Peak memory added by one forward and backward of the hybrid loss over `positions` supervised positions,
    measured in a fresh process (see loss_path_probe); chunk_size 0 is the naive path (full logits)."""
    settings = {"chunk_size": chunk_size, "positions": positions, "student_hidden": student_hidden,
                "teacher_hidden": teacher_hidden, "vocab_size": vocab_size, "device": device}
    result = subprocess.run([sys.executable, "-c", _PROBE_CHILD, json.dumps(settings)], capture_output=True,
                            text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"the loss-path memory probe failed for {settings}:\n{result.stderr[-2000:]}")
    return int(result.stdout.strip().splitlines()[-1])


def loss_path_memory(options) -> dict:
    """Item 2: the naive path's peak and each chunk size's, one fresh process at a time."""
    device = utils.select_device("auto").type
    sizes = {"positions": options.mem_tokens, "student_hidden": SIZES[options.student_size][0],
             "teacher_hidden": SIZES[options.teacher_size][0], "vocab_size": options.mem_vocab_size,
             "device": device}
    return {**sizes, "measure": "CUDA allocated bytes" if device == "cuda" else "resident bytes",
            "naive": loss_path_peak_bytes(0, **sizes),
            "chunked": {str(chunk): loss_path_peak_bytes(chunk, **sizes) for chunk in options.chunk_sizes}}


# --- 6: the fastest chunk size ------------------------------------------------------------------------------------

def swept_chunk_sizes(requested: list[int] | None, positions: int) -> list[int]:
    """The chunk sizes item 6 times: those requested, else 0 (one chunk) and each of SWEEP_CHUNK_SIZES that splits
    `positions` into several chunks (a larger one would time the same single chunk as 0)."""
    return requested or [0, *(size for size in SWEEP_CHUNK_SIZES if size < positions)]


def fastest_seconds(run, device: torch.device) -> float:
    """The fastest of SWEEP_REPEATS timed calls of run(), after one untimed warm-up (which also compiles)."""
    run()
    times = []
    for _ in range(SWEEP_REPEATS):
        if device.type == "cuda":  # kernels run asynchronously: time them, not their launches
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times)


def chunk_size_sweep(options, dtype) -> dict:
    """Item 6: seconds of one forward and backward of the loss path at each chunk size, and the fastest size.

    The loss path is a training step's without members: the student's head under the training's autocast, the
    frozen teacher's head in its dtype, the loss (compiled with --compile) and its gradients, over a full
    micro-batch's positions (batch_size x max_length) at the bench's vocabulary and hidden sizes. A size that runs
    out of GPU memory gets None, and is no candidate.
    """
    device = utils.select_device("auto")
    positions = options.batch_size * options.max_length
    torch.manual_seed(0)
    student_head = torch.nn.Linear(SIZES[options.student_size][0], options.vocab_size, bias=False, device=device)
    teacher_head = torch.nn.Linear(SIZES[options.teacher_size][0], options.vocab_size, bias=False, device=device,
                                   dtype=dtype).requires_grad_(False)
    student_states = torch.randn(positions, student_head.in_features, device=device, requires_grad=True)
    teacher = Projection(torch.randn(positions, teacher_head.in_features, device=device, dtype=dtype), teacher_head)
    targets = torch.randint(0, options.vocab_size, (positions,), device=device)
    loss_terms = compile_loss_terms() if options.compile else hybrid_loss_terms

    def loss_path(chunk_size: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=utils.use_bf16_autocast("auto", device)):
            sums = chunked_hybrid_loss_sums(Projection(student_states, student_head), teacher, [], targets,
                                            LossSettings(), chunk_size, loss_terms)
        sums.total.backward()

    seconds = {}
    for chunk_size in swept_chunk_sizes(options.sweep_chunk_sizes, positions):
        try:
            seconds[str(chunk_size)] = fastest_seconds(lambda: loss_path(chunk_size), device)
        except torch.OutOfMemoryError:  # one chunk of a GPU-sized micro-batch may not fit
            seconds[str(chunk_size)] = None
    fitting = {int(size): time_taken for size, time_taken in seconds.items() if time_taken is not None}
    return {"positions": positions, "vocab_size": options.vocab_size, "seconds": seconds,
            "best_chunk_size": min(fitting, key=fitting.get)}


# --- 3: cache size and error --------------------------------------------------------------------------------------

def cache_bytes_per_token(cache_dir: Path, num_tokens: int) -> float:
    """Bytes on disk per cached position: every file of the cache except its JSON records (a few hundred bytes of
    settings, whatever the cache's size), so any array layout is counted in full."""
    data = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file() and f.suffix != ".json")
    return data / num_tokens


def build_bench_caches(options, teacher, dataset, tokenizer, cache_root: Path) -> tuple[dict, dict]:
    """A top-k and a hidden-state cache of the training data; returns the caches and their build seconds."""
    caches, seconds = {}, {}
    identity = {"teacher": "bench", "dataset_fingerprint": dataset._fingerprint, "max_length": options.max_length}
    for mode in ("topk", "hidden"):
        started = time.perf_counter()
        teacher_cache.build_cache(teacher, dataset, cache_root / mode, mode=mode, k=options.cache_k, temperature=1.0,
                                  vocab_size=options.vocab_size, batch_size=options.batch_size,
                                  collator=PaddingCollator(tokenizer.pad_token_id), metadata=identity)
        teacher_cache.write_metadata(cache_root / mode, identity)
        caches[mode] = teacher_cache.TeacherCache.open(cache_root / mode, identity)
        seconds[mode] = time.perf_counter() - started
    return caches, seconds


def early_stopping_evaluation(options, teacher, mixture: list, dataset, tokenizer, cache_dir: Path) -> dict:
    """Item 7: seconds of one evaluation of `mixture` (a student and its frozen members) on `dataset` as a held-out
    split (without the training split's example ids), the CE alone and every metric with the teacher's states cached
    in `cache_dir` as a run caches them; the fastest of SWEEP_REPEATS after a warm-up. `same_ce`: whether both give
    the same CE, bit for bit."""
    collator = PaddingCollator(tokenizer.pad_token_id)
    held_out = dataset.remove_columns("example_id")
    split = {"dataset_fingerprint": held_out._fingerprint}
    teacher_cache.build_cache(teacher, held_out, cache_dir, mode="hidden", k=0, temperature=1.0,
                              vocab_size=options.vocab_size, batch_size=options.batch_size, collator=collator,
                              metadata=split)
    teacher_cache.write_metadata(cache_dir, split)
    cached_teacher = CachedTeacher(teacher, (teacher_cache.TeacherCache.open(cache_dir, split),))
    scored = {}

    def every_metric():
        scored["every_metric"] = evaluate({"mixture": mixture}, cached_teacher, held_out,
                                          collator, options.batch_size, options.vocab_size,
                                          chunk_size=options.chunk_size)["mixture"]["ce"]

    def ce_only():
        scored["ce_only"] = mixture_ce(mixture, held_out, collator, options.batch_size, options.vocab_size,
                                       chunk_size=options.chunk_size)

    device = next(mixture[0].parameters()).device
    seconds = {"every_metric": fastest_seconds(every_metric, device), "ce_only": fastest_seconds(ce_only, device)}
    return {"seconds": seconds, "members": len(mixture) - 1, "same_ce": scored["ce_only"] == scored["every_metric"]}


@torch.no_grad()
def cache_kl_error(teacher, student, caches: dict, dataset, tokenizer, batch_size: int, vocab_size: int,
                   num_tokens: int) -> dict:
    """KL(teacher || student) per supervised token (`num_tokens` of them in `dataset`), from the dense online
    teacher and from each cache."""
    collator = PaddingCollator(tokenizer.pad_token_id)
    totals = {"dense": 0.0, **dict.fromkeys(caches, 0.0)}
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        positions = predictor_mask(batch["labels"])
        student_logits = logits_at(student, batch["input_ids"], batch["attention_mask"], positions, vocab_size)
        teacher_hidden = hidden_at(teacher, batch["input_ids"], batch["attention_mask"], positions)
        ids = batch["example_id"].tolist()
        totals["dense"] += divergence_sum(output_head(teacher, vocab_size)(teacher_hidden), student_logits).item()
        totals["topk"] += sparse_divergence_sum(*caches["topk"].topk_targets(ids), student_logits).item()
        cached_logits = output_head(teacher, vocab_size)(caches["hidden"].hidden_states(ids))
        totals["hidden"] += divergence_sum(cached_logits, student_logits).item()
    dense = totals["dense"] / num_tokens
    return {mode: {"dense": dense, "cache": totals[mode] / num_tokens,
                   "relative_error": abs(totals[mode] / num_tokens - dense) / dense} for mode in caches}


# --- the run ------------------------------------------------------------------------------------------------------

def save_random_teacher(folder, size: str, vocab_size: int, tokenizer) -> Path:
    """A random-weight teacher of `size` saved with `tokenizer` as a model folder: a paper-shaped run needs no
    download."""
    folder = Path(folder)
    random_llama(size, vocab_size, tokenizer, seed=1, dtype=torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv=None) -> dict:
    options = parse_args(argv)
    tokenizer, chats, teacher_dir = bench_assets(num_chats=options.batch_size * (options.steps + 2) * 3)
    options.vocab_size = checked_vocab_size(options.vocab_size, tokenizer)
    if options.save_random_teacher:
        folder = save_random_teacher(options.save_random_teacher, options.teacher_size, options.vocab_size, tokenizer)
        print(f"saved a random {options.teacher_size} teacher ({options.vocab_size} tokens) in {folder}")
        return {"saved_teacher": str(folder)}
    results = {"settings": vars(options)}
    dataset = bench_dataset(chats, tokenizer, options.max_length)
    dtype = utils.frozen_dtype("auto", utils.select_device("auto"))
    teacher, results["teacher"] = bench_teacher(options, options.vocab_size, teacher_dir, tokenizer, dtype)

    def fresh_student(seed=2):
        return random_llama(options.student_size, options.vocab_size, tokenizer, seed=seed)

    results |= trainer_results(options, teacher, dataset, tokenizer, fresh_student)

    # 2. memory
    results["loss_path_peak_bytes"] = loss_path_memory(options)
    # 6. the fastest chunk size
    results["loss_chunk_size_sweep"] = chunk_size_sweep(options, dtype)

    results["ratios"] = ratios(results)
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2) + "\n")
    print_report(results, options.json)
    return results


def trainer_results(options, teacher, dataset, tokenizer, fresh_student) -> dict:
    """Items 1, 3, 4, 5 and 7, measured on the same batches: every trainer's step throughput, the caches' bytes
    per token and their KL error, three rounds cached (their build included) against online, and an early-stopping
    evaluation."""
    results = {}
    members = [fresh_student(seed=10 + i).eval() for i in range(FROZEN_MEMBERS)]
    timed_steps = options.steps + 1  # one warm-up step, not counted

    # 1, 3, 4: step throughput and the caches
    with tempfile.TemporaryDirectory() as cache_root:
        caches, build_seconds = build_bench_caches(options, teacher, dataset, tokenizer, Path(cache_root))

        def ours(cache, frozen=()):
            return lambda out: ours_trainer(options, fresh_student(), teacher, list(frozen), dataset, tokenizer, out,
                                            timed_steps, cache)

        measured = {
            "sft": throughput(lambda out: sft_trainer(options, fresh_student(), dataset, tokenizer, out)),
            "ours_cached_topk": throughput(ours(caches["topk"])),
            "ours_cached_hidden": throughput(ours(caches["hidden"])),
            "ours_online": throughput(ours(None)),
            "gkd": throughput(lambda out: gkd_trainer(options, fresh_student(), teacher, dataset, tokenizer, out)),
            "ours_cached_topk_3_members": throughput(ours(caches["topk"], members)),
        }
        for name in ("step_seconds", "tokens_per_second", "supervised_tokens"):
            results[name] = {trainer: figures[name] for trainer, figures in measured.items()}
        tokens = caches["topk"].metadata["num_positions"]  # every supervised position of the dataset
        results["cache_bytes_per_token"] = {mode: cache_bytes_per_token(Path(cache_root) / mode, tokens)
                                            for mode in caches}
        results["cache_kl_error"] = cache_kl_error(teacher, fresh_student(), caches, dataset, tokenizer,
                                                   options.batch_size, options.vocab_size, tokens)
        # 7. an early-stopping evaluation of round 4's mixture
        results["early_stopping_evaluation"] = early_stopping_evaluation(
            options, teacher, [fresh_student(), *members], dataset, tokenizer, Path(cache_root) / "held_out")

        # 5. three rounds: cached (its build included) against online
        cached_rounds = three_rounds_seconds(options, fresh_student, teacher, members, dataset, tokenizer,
                                             caches["topk"]) + build_seconds["topk"]
    online_rounds = three_rounds_seconds(options, fresh_student, teacher, members, dataset, tokenizer)
    results["three_rounds_seconds"] = {"cached_with_build": cached_rounds, "online": online_rounds,
                                       "cache_build": build_seconds["topk"]}

    return results


def ratios(results: dict) -> dict:
    """The targets' ratios, each from figures measured side by side in this run."""
    step, rate, memory = results["step_seconds"], results["tokens_per_second"], results["loss_path_peak_bytes"]
    rounds, evaluation = results["three_rounds_seconds"], results["early_stopping_evaluation"]["seconds"]
    return {
        "cached_tokens_per_s_over_gkd": rate["ours_cached_topk"] / rate["gkd"],
        "cached_step_over_sft_step": step["ours_cached_topk"] / step["sft"],
        **{f"chunked_memory_over_naive_at_{chunk}": peak / memory["naive"] for chunk, peak in memory["chunked"].items()},
        "round4_step_over_round1_step": step["ours_cached_topk_3_members"] / step["ours_cached_topk"],
        "online_3_rounds_over_cached_3_rounds": rounds["online"] / rounds["cached_with_build"],
        "ce_only_evaluation_over_every_metric": evaluation["ce_only"] / evaluation["every_metric"],
    }


# --- the report ---------------------------------------------------------------------------------------------------

def target_verdict(value: float, comparison: str, target: float) -> str:
    """'met', or 'MISSED by x%' relative to the target."""
    met = value >= target if comparison == ">=" else value <= target
    if met:
        return "met"
    return f"MISSED by {abs(value / target - 1):.0%}" if math.isfinite(value) else "MISSED (not finite)"


def print_report(results: dict, json_path: str) -> None:
    step, rate, tokens = results["step_seconds"], results["tokens_per_second"], results["supervised_tokens"]
    settings = results["settings"]
    print(f"\n1. step throughput (supervised tokens/s over {settings['steps']} timed steps after a warm-up; "
          f"identical data, order, batch {settings['batch_size']} and max length {settings['max_length']})")
    for name in step:
        print(f"   {name:<28} {step[name]:8.3f} s/step {rate[name]:10.1f} tokens/s   ({tokens[name]} tokens)")

    memory = results["loss_path_peak_bytes"]
    print(f"\n2. loss-path peak memory ({memory['measure']} on {memory['device']}; {memory['positions']} positions, "
          f"vocabulary {memory['vocab_size']}, student hidden {memory['student_hidden']})")
    print(f"   naive (full logits)        {memory['naive'] / 2**20:9.1f} MiB")
    default_chunk = Config().loss_chunk_size
    for chunk, peak in memory["chunked"].items():
        note = "   (the config's default)" if int(chunk) == default_chunk else ""
        print(f"   chunked, {chunk:>5} positions  {peak / 2**20:9.1f} MiB   {peak / memory['naive']:6.1%} of naive{note}")

    print("\n3. teacher cache")
    for mode, size in results["cache_bytes_per_token"].items():
        error = results["cache_kl_error"][mode]
        print(f"   {mode:<7} {size:7.1f} B/token   KL(teacher||student) dense {error['dense']:.5f} vs cache "
              f"{error['cache']:.5f} (relative error {error['relative_error']:.2e})")

    print(f"\n4. step with {FROZEN_MEMBERS} frozen members {step['ours_cached_topk_3_members']:.3f} s against "
          f"{step['ours_cached_topk']:.3f} s with none")

    rounds = results["three_rounds_seconds"]
    print(f"\n5. three rounds: online {rounds['online']:.1f} s, cached {rounds['cached_with_build']:.1f} s "
          f"(of which cache build {rounds['cache_build']:.1f} s)")

    sweep = results["loss_chunk_size_sweep"]
    print(f"\n6. loss path by chunk size (one forward and backward over {sweep['positions']} positions, vocabulary "
          f"{sweep['vocab_size']}; fastest of {SWEEP_REPEATS} runs after a warm-up)")
    for chunk, seconds in sweep["seconds"].items():
        timing = f"{seconds:8.3f} s" if seconds is not None else "out of memory"
        note = "   (the config's default)" if int(chunk) == default_chunk else ""
        print(f"   chunk size {'0 (one chunk)' if chunk == '0' else chunk:>13}  {timing}{note}")
    print(f"   best loss_chunk_size on this machine: {sweep['best_chunk_size']}")

    evaluation = results["early_stopping_evaluation"]
    print(f"\n7. one early-stopping evaluation of a student with {evaluation['members']} frozen members (fastest of "
          f"{SWEEP_REPEATS} after a warm-up): the CE alone {evaluation['seconds']['ce_only']:.3f} s, every metric "
          f"{evaluation['seconds']['every_metric']:.3f} s; the same CE: {evaluation['same_ce']}")

    print("\nratios (measured side by side in this run)")
    for name, value in results["ratios"].items():
        comparison, target = TARGETS[name.partition("_at_")[0]]  # chunked_memory_over_naive_at_<chunk size>
        print(f"   {name:<40} {value:7.3f}   target {comparison} {target}   "
              f"{target_verdict(value, comparison, target)}")
    print(f"\nresults written as JSON to {Path(json_path).resolve()}" if json_path else
          "\nno JSON written (--json '')")


if __name__ == "__main__":
    main()
