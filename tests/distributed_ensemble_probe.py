"""One process of an ensemble spread over processes (distributed_ensemble.py): for each saved ensemble given, it
decodes the prompts greedily and scores the chat fixture, and writes what it got to OUT/rank_<r>.json. Launched by
tests/test_distributed_ensemble.py, once per process, with the environment torchrun would give:

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/distributed_ensemble_probe.py OUT FOLDER...

--fault RANK:CALL:die|stall makes process RANK kill itself (SIGKILL), or hang, at its CALL-th combination.
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, when run as a script

from slm_ensembles import distributed_ensemble  # noqa: E402
from conftest import load_chats  # noqa: E402
from model_io import PaddingCollator  # noqa: E402
from preprocess_dataset import tokenize_conversation  # noqa: E402
import score  # noqa: E402
from slm_ensembles.processes import run_command  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

PROMPTS = ["Hello there, how are you", "What is the capital of France? Tell me"]
NEW_TOKENS = 8


def scoring_dataset(tokenizer) -> Dataset:
    """The chat fixture tokenized for scoring (assistant turns supervised)."""
    rows = [tokenize_conversation(chat["messages"], tokenizer, max_length=64) for chat in load_chats()]
    return Dataset.from_list([row for row in rows if row is not None])


def greedy_answers(model, tokenizer) -> list[list[int]]:
    answers = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        output = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                pad_token_id=tokenizer.pad_token_id)
        answers.append(output[0, ids.shape[1]:].tolist())
    return answers


def with_fault(ensemble, fault: str):
    """The ensemble, its `combined` step replaced by one that dies or hangs at the given call on the given rank."""
    rank, call, kind = fault.split(":")
    if int(rank) != ensemble.processes.rank:
        return ensemble
    combined, calls = ensemble.combined, [0]

    def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(call):
            if kind == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        return combined(*args, **kwargs)

    ensemble.combined = faulty
    return ensemble


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--exchange_k", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--fault", default=None)
    args = parser.parse_args()
    processes = distributed_ensemble.start_processes(args.timeout)
    results = {}
    for folder in args.folders:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        distributed_ensemble.check_same_ensemble(processes,
                                                 distributed_ensemble.ensemble_description(folder, tokenizer))
        ensemble = distributed_ensemble.DistributedEnsemble.from_pretrained(folder, processes, "full",
                                                                            args.exchange_k)
        if args.fault:
            ensemble = with_fault(ensemble, args.fault)
        answers = greedy_answers(ensemble, tokenizer)
        dataset, collator = scoring_dataset(tokenizer), PaddingCollator(tokenizer.pad_token_id)
        exact = score.score(ensemble, dataset, collator, batch_size=4)
        ensemble.exchange = "topk"
        top_k = score.score(ensemble, dataset, collator, batch_size=4)
        ensemble.exchange_k = len(tokenizer)  # every entry sent: the top-k path must then be the exact one
        top_all = score.score(ensemble, dataset, collator, batch_size=4)
        results[folder.name] = {"members": list(ensemble.member_indices), "answers": answers,
                                "ce": exact.ce, "topk_ce": top_k.ce, "topk_exact_ce": top_k.exact_ce,
                                "topk_greedy_differs": top_k.greedy_differs, "topk_all_ce": top_all.ce,
                                "topk_all_greedy_differs": top_all.greedy_differs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank_{processes.rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    sys.exit(run_command(main, refusals=(distributed_ensemble.LaunchError, distributed_ensemble.MismatchedEnsembleError)))
