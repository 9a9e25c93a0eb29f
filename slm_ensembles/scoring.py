"""Scoring a model on given target tokens, one path for an ensemble and a single model alike: a single causal LM is
scored as a one-member ensemble (`as_ensemble`), whose combined logits are the model's own. The output heads run on
`chunk_size` scored positions at a time, so no (positions x vocabulary) tensor larger than a chunk is held, however
long the input or large the vocabulary. score.py and the lm-eval adapter score through here; the run's evaluation
(evaluation.py) combines members' logits with the same `combine_logits` and treats a single model as a one-member
list, but runs each distinct model's body once for many predictors, which a one-model scorer cannot."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ensemble import ModelEnsemble
from model_io import cut_to_vocab


def as_ensemble(model) -> ModelEnsemble:
    """`model` itself when it is an ensemble (an ensemble spread over processes included); any other causal LM as a
    one-member ensemble (combine "logits": the mean of one, the model's logits bit for bit, uncut). The model is
    frozen and put in eval mode, as every ensemble member is."""
    return model if isinstance(model, ModelEnsemble) else ModelEnsemble.from_members([model])


def member_logits_in_chunks(ensemble, hidden: Sequence[torch.Tensor],
                            chunk_size: int) -> Iterator[tuple[slice, list[torch.Tensor]]]:
    """(rows, each member's logits [n, V] at those rows) for consecutive chunks of at most `chunk_size` of the N
    scored positions whose final hidden states [N, H_k] `hidden` holds (`ensemble.member_hidden_states`)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    count = len(hidden[0])
    for start in range(0, count, chunk_size):
        rows = slice(start, min(start + chunk_size, count))
        yield rows, ensemble.member_head_logits([states[rows] for states in hidden])


def target_log_probs(ensemble, hidden: Sequence[torch.Tensor], targets: torch.Tensor, chunk_size: int,
                     vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [N], whether each target is the argmax [N]) at the N scored positions, on the CPU: the
    ensemble's combined logits, cut to `vocab_size` when one is given, a chunk at a time."""
    log_probs, greedy = [], []
    for rows, member_logits in member_logits_in_chunks(ensemble, hidden, chunk_size):
        logits = ensemble.combined(member_logits)
        logits = logits if vocab_size is None else cut_to_vocab(logits, vocab_size)
        chunk_log_probs = torch.log_softmax(logits, dim=-1)
        chunk_targets = targets[rows].to(chunk_log_probs.device)
        log_probs.append(chunk_log_probs.gather(-1, chunk_targets[:, None])[:, 0])
        greedy.append(chunk_log_probs.argmax(dim=-1) == chunk_targets)
    return torch.cat(log_probs).cpu(), torch.cat(greedy).cpu()
