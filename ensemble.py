"""ModelEnsemble: a frozen set of causal LMs that predicts with the combination of its members' logits.

The same `combine_logits` primitive is used by training (the loss through the mixture), evaluation and generation,
so all three agree on what "the ensemble" means.
"""

import math
from collections.abc import Sequence

import torch

COMBINE_MODES = ("logits", "probs")


def combine_logits(logits: Sequence[torch.Tensor], mode: str = "logits") -> torch.Tensor:
    """Combine members' logits (each [..., V]) into the mixture's logits, in fp32.

    - "logits": the mean of the logits, z_mix = (z_1 + ... + z_K) / K (a normalised geometric mean of probabilities).
    - "probs": the mean of the probabilities, returned as log-probabilities:
      log p_mix = logsumexp_k log p_k - log K. Log-probabilities are valid logits (softmax gives p_mix back).
    """
    if not logits:
        raise ValueError("combine_logits needs at least one member's logits")
    if mode == "logits":
        total = logits[0].float()
        for z in logits[1:]:
            total = total + z.float()
        return total / len(logits)
    if mode == "probs":
        log_probs = torch.stack([torch.log_softmax(z.float(), dim=-1) for z in logits])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(logits))
    raise ValueError(f"unknown ensemble combine mode {mode!r}: use one of {COMBINE_MODES}")
