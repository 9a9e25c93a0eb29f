#!/bin/bash
# The GPU check: what no CPU test can show, in one short script for the moment a CUDA GPU is at hand (under
# 10 minutes on one H100/H200-class GPU). Each step's figures go to results/gpu_*.json; the script goes on after a
# failed step and exits 1 if any failed.
#
#   bash gpu_check.sh --pack                   # here, first: what the GPU machine lacks, into .gpu_check/
#   bash gpu_check.sh                          # on a machine with one CUDA GPU, from the project folder
#   GPU_CHECK_SIZE=tiny bash gpu_check.sh      # the same steps at toy sizes, on CPU (the test suite runs this)
#
# The GPU machine may have no network and its own Python (3.12) with its own torch, but not our transformers, TRL
# or datasets: --pack downloads those wheels (for CPython 3.12, manylinux) and 600 of the embedded chats into
# .gpu_check/, which travels with the project; the check installs the wheels over that Python's own torch.
#
# 1. the CUDA-only tests (pytest -m cuda)                                  -> results/gpu_tests.json
# 2. benchmarks/bench.py at GPU sizes: Qwen2.5-1.5B- and 0.5B-shaped random-weight models at Qwen's vocabulary (no download),
#    the compiled loss, the best loss_chunk_size on this GPU                -> results/gpu_bench.json
# 3. a paper-shaped run: a random 1.5B-shaped teacher through the top-k cache, 0.5B-shaped students, bf16, the
#    compiled loss, gradient checkpointing, batch 8 x 1024 tokens, 2 rounds of a few steps -> results/gpu_run.json
# 4. benchmarks/bench_inference.py: 2 Qwen2.5-0.5B-shaped members decoding, one after another and at once (on one GPU: the
#    process per member needs a GPU each)                                  -> results/gpu_bench_inference.json
set -uo pipefail
cd "$(dirname "$0")" || exit 1
PACK=${GPU_CHECK_PACK:-.gpu_check}  # where --pack puts what travels to the GPU machine
# Ours where the GPU machine's differ (transformers, huggingface_hub) or are missing (the rest): pure-Python wheels
# but for the two compiled ones. torch, numpy, pandas, pyarrow, scipy, tokenizers, safetensors are the machine's.
WHEELS=(transformers==5.24.0 trl==1.16.0 datasets==5.2.0 accelerate==1.15.0 huggingface_hub==2.4.0 dill==0.4.1
        multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0 pyyaml==6.0.3)
if [ "${1:-}" = "--pack" ]; then
  mkdir -p "$PACK/wheels"
  if [ "${GPU_CHECK_PACK_WHEELS:-1}" = 1 ]; then
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$PACK/wheels" "${WHEELS[@]}" || exit 1
  fi
  python -c "import itertools, sys; from slm_ensembles import embedded
lines = open(embedded.resolve_dataset(embedded.EMBEDDED_DATASET, '.cache'))
open(sys.argv[1], 'w').writelines(itertools.islice(lines, 600))" "$PACK/chats.jsonl" || exit 1
  echo "packed into $PACK: $(ls "$PACK/wheels" | wc -l) wheels, $(wc -l < "$PACK/chats.jsonl") chats ($(du -sh "$PACK" | cut -f1))"
  exit 0
fi
if ls "$PACK"/wheels/*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    "$PACK"/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
DATA=()
if [ -f "$PACK/chats.jsonl" ]; then DATA=(--dataset "$PACK/chats.jsonl"); fi
SIZE=${GPU_CHECK_SIZE:-paper}
OUT=${GPU_CHECK_OUT:-results}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
failed=()

if [ "$SIZE" = "paper" ]; then
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU, or GPU_CHECK_SIZE=tiny on CPU')" || exit 2
  BENCH=(--teacher_size 1.5b --student_size 0.5b --vocab_size 151936 --max_length 1024 --batch_size 8 --compile
         --chunk_sizes 512 1024 2048 4096)
  TEACHER=(1.5b 151936)
  RUN=(--student_hidden_size 896 --student_num_layers 24 --student_num_heads 14 --student_num_kv_heads 2
       --student_intermediate_size 4864 --max_length 1024 --batch_size 8 --max_examples 600 --test_size 64
       --steps_per_round 8 --device cuda --dtype bfloat16 --compile_loss on --eval_batch_size 16)
  INFERENCE=(--size 0.5b --vocab_size 151936 --device cuda --batch_sizes 1 16)
else
  BENCH=(--teacher_size tiny --student_size tiny --vocab_size 50000 --max_length 64 --batch_size 2 --steps 1
         --mem_tokens 256 --mem_vocab_size 2048 --chunk_sizes 64 128)
  TEACHER=(tiny 50000)
  RUN=(--student_hidden_size 32 --student_num_layers 1 --student_num_heads 2 --student_num_kv_heads 1
       --student_intermediate_size 64 --max_length 64 --batch_size 2 --max_examples 40 --test_size 8
       --steps_per_round 2 --device cpu --dtype float32 --compile_loss off --eval_batch_size 8)
  INFERENCE=(--size tiny --vocab_size 512 --batch_sizes 1 --new_tokens 2 --repeats 1)
fi

echo "== 1/4 CUDA-only tests"
python -m pytest -q -m cuda -p no:cacheprovider --junitxml="$WORK/tests.xml" tests || failed+=(tests)
python - "$WORK/tests.xml" "$OUT/gpu_tests.json" <<'EOF' || failed+=(tests-report)
import json, sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot().iter("testsuite").__next__()
counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
json.dump({**counts, "seconds": float(suite.get("time", 0))}, open(sys.argv[2], "w"), indent=2)
print(counts)
EOF

echo "== 2/4 benchmarks/bench.py at ${SIZE} sizes"
python -m benchmarks.bench "${BENCH[@]}" --json "$OUT/gpu_bench.json" || failed+=(bench)

echo "== 3/4 a paper-shaped run"
python -m benchmarks.bench --save_random_teacher "$WORK/teacher" --teacher_size "${TEACHER[0]}" --vocab_size "${TEACHER[1]}" \
  || failed+=(teacher)
start=$(date +%s)
python main.py --teacher "$WORK/teacher" --student_init random --teacher_mode topk --gradient_checkpointing true \
  --total_rounds 2 --eval_steps 0 --sample_answers 0 --plots false --save_steps 4 --logging_steps 1 \
  --cache_dir "$WORK/cache" --output_root "$WORK/runs" "${DATA[@]}" "${RUN[@]}" || failed+=(run)
python - "$WORK/runs" "$OUT/gpu_run.json" "$(( $(date +%s) - start ))" <<'EOF' || failed+=(run-report)
import json, sys
from pathlib import Path
import pandas as pd
(run_dir,) = sorted(Path(sys.argv[1]).glob("*/run_*"))
metrics = pd.read_csv(run_dir / "metrics.csv")
log = pd.read_csv(run_dir / "train_log.csv")
final = metrics[(metrics["round"] == metrics["round"].max()) | (metrics["model"] == "teacher")]  # teacher: round 0
report = {"wall_seconds": int(sys.argv[3]), "rounds": int(metrics["round"].max()) + 1,
          "steps": int(log.groupby("round")["step"].max().sum()),
          "finite_losses": bool(log[["hybrid", "kl", "nll"]].notna().all().all()),
          "ce": dict(zip(final["model"], final["ce"].round(4))),
          "round_seconds": {int(r): float(s) for r, s in metrics.groupby("round")["seconds"].max().items()}}
json.dump(report, open(sys.argv[2], "w"), indent=2)
print(json.dumps(report, indent=2))
EOF

echo "== 4/4 inference: members one after another and at once"
python -m benchmarks.bench_inference "${INFERENCE[@]}" --json "$OUT/gpu_bench_inference.json" || failed+=(inference)

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: failed steps: ${failed[*]} (figures so far in $OUT/gpu_*.json)" >&2
  exit 1
fi
echo "gpu_check: every step passed; figures in $OUT/gpu_*.json"
