"""Score a run's saved ensemble on the run's own test split: its held-out CE, recomputed from the saved folder and
set beside what metrics.csv reported, in one process or spread over several (decentralised inference).

    python score.py runs/2026-11-29/run_1
    python score.py runs/2026-11-29/run_1 --member_devices cuda:0,cuda:1          # members at once, a GPU each
    torchrun --nproc_per_node 2 score.py runs/2026-11-29/run_1 --distributed      # a process per share of members
    torchrun --nproc_per_node 2 score.py runs/2026-11-29/run_1 --distributed --exchange topk --exchange_k 64

The test split is rebuilt exactly as the run built it (its config.yaml: data source, data_seed, sizes), and scored
on the same positions with the same combination as the run's evaluation, so the CE equals the run's own up to the
order of floating-point sums. With --exchange topk it also scores the exact path in the same pass and prints how
often the greedy (argmax) token differs between the two and what each process sends per token. A member folder
damaged against its checksums.json is refused by name before its weights load (exit code 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from checksums import DamagedFolderError
import config as config_lib
from ensemble import ModelEnsemble, NotAnEnsembleError
from model_io import PaddingCollator
import preprocess_dataset
import utils
from slm_ensembles import distributed_ensemble, embedded, files
from slm_ensembles.losses import next_token_targets, nll_sum, predictor_mask
from slm_ensembles.processes import run_command
from slm_ensembles.run_layout import RunLayout
from slm_ensembles.scoring import member_logits_in_chunks


@dataclasses.dataclass(frozen=True)
class Score:
    """An ensemble's held-out CE on a split and, when it combined through the top-k exchange, the exact path's."""

    ce: float
    num_tokens: int
    exact_ce: float | None = None
    greedy_differs: float | None = None  # share of positions whose argmax differs from the exact path's


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder (it holds config.yaml, metrics.csv and ensemble/)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the run's eval_batch_size")
    parser.add_argument("--chunk_size", type=int, default=1024, help="positions per output-head call")
    distributed_ensemble.add_placement_args(parser)
    return parser.parse_args(argv)


def run_test_split(run_dir: Path) -> tuple[config_lib.Config, object, object]:
    """The run's config, its tokenizer (the teacher's, as the run loaded it) and its test split, prepared as the run
    prepared it (the same folder of cache_dir/datasets, reused when it is still there)."""
    if not (RunLayout(run_dir).config).is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml); pass runs/YYYY-MM-DD/run_N")
    config = config_lib.load_saved_config(RunLayout(run_dir).config)
    teacher_path = embedded.resolve_teacher(config.teacher, config.cache_dir)
    tokenizer = utils.load_tokenizer(teacher_path, config.trust_remote_code)
    data, _ = preprocess_dataset.prepare_for_run(config, tokenizer)
    return config, tokenizer, data["test"]


@torch.no_grad()
def score(ensemble: ModelEnsemble, dataset, collator, batch_size: int, chunk_size: int = 1024) -> Score:
    """The ensemble's held-out CE on `dataset` (nats per supervised token, summed in float64 as the run's
    evaluation sums it); with a top-k exchange, the exact path's CE and greedy agreement from the same pass."""
    compare = isinstance(ensemble, distributed_ensemble.DistributedEnsemble) and ensemble.exchange == "topk"
    totals = torch.zeros(3, dtype=torch.float64)  # CE, exact CE, positions whose argmax differs
    num_tokens = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator):
        positions = predictor_mask(batch["labels"])
        if not positions.any():
            continue
        hidden = ensemble.member_hidden_states(batch["input_ids"], batch["attention_mask"], positions)
        targets = next_token_targets(batch["labels"]).to(ensemble.device)
        for rows, member_logits in member_logits_in_chunks(ensemble, hidden, chunk_size):
            logits = ensemble.combined(member_logits)
            totals[0] += nll_sum(logits, targets[rows]).double().cpu()
            if compare:
                exact = ensemble.combined(member_logits, exchange="full")
                totals[1] += nll_sum(exact, targets[rows]).double().cpu()
                totals[2] += (exact.argmax(dim=-1) != logits.argmax(dim=-1)).sum().cpu()
        num_tokens += len(targets)
    if num_tokens == 0:
        raise ValueError("the test split has no supervised token to score")
    if not compare:
        return Score(float(totals[0] / num_tokens), num_tokens)
    return Score(float(totals[0] / num_tokens), num_tokens, float(totals[1] / num_tokens),
                 float(totals[2] / num_tokens))


def reported_ce(run_dir: Path, ensemble_size: int) -> float | None:
    """The CE metrics.csv reports for the run's ensemble of `ensemble_size` members (None if it has no such row)."""
    rows = files.read_csv_rows(RunLayout(run_dir).metrics) or []
    found = [row for row in rows if row["model"] == "ensemble" and int(row["ensemble_size"]) == ensemble_size]
    return float(found[-1]["ce"]) if found else None


def report_lines(run_dir: Path, ensemble, result: Score) -> list[str]:
    size = getattr(ensemble, "total_members", len(ensemble))
    lines = [f"held-out CE of the {size}-member ensemble: {result.ce:.6f} over {result.num_tokens} tokens"]
    reported = reported_ce(run_dir, size)
    if reported is not None:
        exact = result.ce if result.exact_ce is None else result.exact_ce
        lines.append(f"the run reported:                  {reported:.6f} (exact path minus reported: "
                     f"{exact - reported:+.2e})")
    if result.exact_ce is not None:
        sent = ensemble.exchanged_bytes_per_position()
        full = ensemble.exchanged_bytes_per_position("full")
        others = ensemble.processes.world_size - 1
        lines += [f"exact path (full rows):            {result.exact_ce:.6f}; top-{ensemble.exchange_k} changes the "
                  f"CE by {result.ce - result.exact_ce:+.2e}",
                  f"greedy token differs from the exact path at {100 * result.greedy_differs:.2f}% of positions",
                  f"bytes per token and process: top-k sends {sent:,}, receives {others * sent:,}; full rows "
                  f"send {full:,} (an all-reduce moves about twice that, both ways)"]
    return lines


def main(argv=None) -> Score:
    args = parse_args(argv)
    config, tokenizer, test = run_test_split(args.run_dir)
    folder = RunLayout(args.run_dir).ensemble
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{args.run_dir}: no saved ensemble in ensemble/ (a run saves it after its first "
                                "round)")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    ensemble = distributed_ensemble.placed_ensemble(folder, args, tokenizer,
                                                    utils.frozen_dtype(config.dtype, device))
    result = score(ensemble, test, PaddingCollator(tokenizer.pad_token_id),
                   args.batch_size or config.eval_batch_size, args.chunk_size)
    if not args.distributed or ensemble.processes.rank == 0:
        print("\n".join(report_lines(args.run_dir, ensemble, result)))
    return result


# Bad input (a damaged member folder among it): one line naming it and exit code 2 (processes.run_command).
REFUSALS = (FileNotFoundError, NotAnEnsembleError, config_lib.ConfigError, DamagedFolderError,
            distributed_ensemble.LaunchError, distributed_ensemble.MismatchedEnsembleError)

if __name__ == "__main__":
    sys.exit(run_command(main, refusals=REFUSALS))
