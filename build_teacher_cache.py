"""Build a teacher cache from the command line: a job of its own, before the runs that read it.

Usage:

    python build_teacher_cache.py --teacher PATH --data_dir PREPARED_DATASET_DIR --output_dir DIR \
        --mode topk --k 64 --temperature 1.0 --batch_size 8
    accelerate launch --num_processes 4 build_teacher_cache.py ...     # one shard per process, same arguments

A run uses the cache in DIR with `main.py --teacher_cache_dir DIR` when it was built for the run's teacher (the same
--teacher and --dtype), data (--data_dir: the folder `main.py --prepare_only` prints) and settings (--mode, --k,
--temperature, --value_dtype); otherwise the run refuses it, naming the field. `--data_dir` is a folder written by
preprocess_dataset.py; `--split` (default train) picks its split. What the cache holds, and how a build survives
preemption: slm_ensembles/teacher_cache.py.
"""

import argparse
import sys
from pathlib import Path

from model_io import PaddingCollator
import preprocess_dataset
import utils
from slm_ensembles import files, processes, teacher_cache


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher folder or downloaded hub name (safetensors)")
    parser.add_argument("--data_dir", required=True, help="a folder written by preprocess_dataset.py, or the one "
                        "`main.py --prepare_only` prints, for a run's cache")
    parser.add_argument("--split", default="train", help="split of the prepared dataset to cache")
    parser.add_argument("--output_dir", required=True, help="the cache folder (a run reads it with "
                        "--teacher_cache_dir); the teacher's weight hashes are remembered next to it, in "
                        f"{teacher_cache.FINGERPRINT_MEMO_FILE}")
    parser.add_argument("--mode", default="topk", choices=teacher_cache.MODES)
    parser.add_argument("--k", type=int, default=64, help="topk: log-probabilities kept per position")
    parser.add_argument("--temperature", type=float, default=1.0, help="topk: the training temperature T")
    parser.add_argument("--value_dtype", default="uint8", choices=teacher_cache.VALUE_DTYPES,
                        help="topk: storage of the values")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dtype", default="auto", help="teacher dtype: auto, float32, bfloat16 or float16 (for a "
                        "run's cache, the run's dtype: auto picks by device)")
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Open the cache the arguments describe, or build it (or continue its build): 0 once it is complete,
    processes.EXIT_PREEMPTED when a signal stopped the build (the same command then continues it)."""
    with processes.PreemptionSignal() as preemption:  # first: a signal while the teacher loads is not lost
        args = parse_args(argv)
        state = utils.process_state()
        data, data_metadata = preprocess_dataset.load_dataset_dir(args.data_dir)
        dataset = data[args.split]
        tokenizer = utils.load_tokenizer(args.teacher, args.trust_remote_code)
        teacher_dtype = utils.frozen_dtype(args.dtype, state.device)
        with state.main_process_first():  # one process hashes the weights, the others read its memo
            memo = Path(args.output_dir).resolve().parent / teacher_cache.FINGERPRINT_MEMO_FILE
            identity = teacher_cache.cache_identity(args.teacher, tokenizer, dataset, data_metadata["max_length"],
                                                    teacher_dtype, memo)
        if identity["tokenizer_hash"] != data_metadata["tokenizer_sha256"]:
            raise SystemExit(f"error: {args.data_dir} was tokenized with another tokenizer than the teacher's")
        settings = teacher_cache.cache_settings(args.mode, len(tokenizer), args.k, args.temperature,
                                                args.value_dtype)
        def load_teacher():
            return utils.load_causal_lm(args.teacher, teacher_dtype, args.trust_remote_code, state.device)

        try:
            teacher_cache.open_or_build(args.output_dir, load_teacher, dataset, identity, settings,
                                        batch_size=args.batch_size, collator=PaddingCollator(tokenizer.pad_token_id),
                                        state=state, preemption=preemption)
        except teacher_cache.BuildPreempted as stopped:
            print(stopped)
            return processes.EXIT_PREEMPTED
    if state.is_main_process:
        print(f"teacher cache ({args.mode}) of {len(dataset)} examples in {args.output_dir}: runs read it with "
              f"--teacher_cache_dir {args.output_dir}")
    return 0


def run_from_command_line(argv=None) -> int:
    """main() with the exit codes a launcher acts on, as main.py's (processes.run_command): 0 done, 2 bad input (a
    cache built for other settings, which is kept, or too little disk), 75 preempted."""
    return processes.run_command(lambda: main(argv),
                                 refusals=(teacher_cache.CacheMismatchError, files.DiskSpaceError))


if __name__ == "__main__":
    sys.exit(run_from_command_line())
