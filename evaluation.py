"""Held-out evaluation of the teacher, single students and ensembles, on exactly the tokens the loss trains on.

Every model is scored at the supervised positions of the test split (position t predicting token t+1), with
numbers that mean the same for every model:
    ce              mean next-token cross-entropy, nats per supervised token
    perplexity      exp(ce)
    kl_teacher      mean KL(p_teacher || p_model) at T = 1, nats per supervised token
    top1_agreement  share of positions where the model's argmax equals the teacher's
"""

import math

import torch
import torch.nn.functional as F
from accelerate.utils import reduce
from torch.utils.data import DataLoader

from ensemble import combine_logits
from losses import kl_sum, next_token_targets, nll_sum, predictor_mask
from train import hidden_at, output_head


@torch.no_grad()
def evaluate(predictors: dict[str, list], teacher, dataset, collator, batch_size: int, vocab_size: int,
             combine: str = "logits", chunk_size: int = 1024, state=None) -> dict[str, dict[str, float]]:
    """Metrics for each named predictor: a list of models whose logits are combined (one model = itself).

    Each distinct model's body runs once per batch, however many predictors share it (an ensemble and its
    members); the output heads run on `chunk_size` positions at a time, so no (positions x vocabulary) tensor
    larger than a chunk is held, even at a 151,936-token vocabulary.

    With several processes (`state`, an accelerate PartialState), each scores its own contiguous shard of the
    split and the sums are added up: every example is scored exactly once, nothing is dropped or repeated, and
    every process returns the same numbers as one process would.
    """
    models = {id(model): model for members in predictors.values() for model in members}
    models[id(teacher)] = teacher
    for model in models.values():
        model.eval()
    if state is not None and state.num_processes > 1:
        dataset = dataset.shard(state.num_processes, state.process_index, contiguous=True)
    sums = {name: dict.fromkeys(("ce", "kl", "agree"), 0.0) for name in predictors}
    num_tokens = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator):
        positions = predictor_mask(batch["labels"])
        if not positions.any():
            continue
        hidden = {key: hidden_at(model, batch["input_ids"], batch["attention_mask"], positions)
                  for key, model in models.items()}
        heads = {key: output_head(model, vocab_size) for key, model in models.items()}
        targets = next_token_targets(batch["labels"])
        for start in range(0, len(targets), chunk_size):
            rows = slice(start, start + chunk_size)
            logits = {key: heads[key](hidden[key][rows]).float() for key in models}
            add_chunk_metrics(sums, predictors, logits, logits[id(teacher)], targets[rows], combine)
        num_tokens += targets.numel()
    if state is not None and state.num_processes > 1:
        sums, num_tokens = sum_over_processes(sums, num_tokens, teacher_device=next(teacher.parameters()).device)
    if num_tokens == 0:
        raise ValueError("the evaluation split has no supervised token to score")
    return {name: {"ce": s["ce"] / num_tokens, "perplexity": math.exp(min(s["ce"] / num_tokens, 700.0)),
                   "kl_teacher": s["kl"] / num_tokens, "top1_agreement": s["agree"] / num_tokens,
                   "num_tokens": num_tokens}
            for name, s in sums.items()}


def add_chunk_metrics(sums: dict, predictors: dict[str, list], logits: dict, teacher_logits: torch.Tensor,
                      targets: torch.Tensor, combine: str) -> None:
    """Add one chunk of positions to every predictor's sums of CE, KL to the teacher and top-1 agreement."""
    device = teacher_logits.device
    targets = targets.to(device)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    teacher_top1 = teacher_logits.argmax(dim=-1)
    for name, members in predictors.items():
        combined = combine_logits([logits[id(m)].to(device) for m in members], combine)
        sums[name]["ce"] += nll_sum(combined, targets).item()
        sums[name]["kl"] += kl_sum(teacher_log_probs, F.log_softmax(combined, dim=-1)).item()
        sums[name]["agree"] += (combined.argmax(dim=-1) == teacher_top1).sum().item()


def sum_over_processes(sums: dict, num_tokens: int, teacher_device) -> tuple[dict, int]:
    """Every process's sums and token count added up (in float64, so the order of addition does not matter)."""
    names, keys = list(sums), ("ce", "kl", "agree")
    local = torch.tensor([[sums[name][key] for key in keys] for name in names] + [[num_tokens, 0, 0]],
                         dtype=torch.float64, device=teacher_device)
    total = reduce(local, reduction="sum").tolist()
    return {name: dict(zip(keys, total[i])) for i, name in enumerate(names)}, int(total[-1][0])
