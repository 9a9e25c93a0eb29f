"""The hybrid distillation loss, computed through the ensemble that the new student joins.

Round r trains student s while the earlier members 1..n (n = r) stay frozen. With z the logits at a supervised
position, the mixture the loss sees is the one the ensemble will predict with:
    z_mix = combine(z_s, z_1, ..., z_n)          (mean of logits by default; see ensemble.combine_logits)
    loss  = kl_scale * alpha * T^2 * D(p_teacher^T, p_mix^T) + (1 - alpha) * NLL(z_mix or z_s)
(kl_scale is 1 unless the config asks for the ensemble's size, which undoes the 1/(n+1) by which averaging
shrinks the gradient reaching the new student.)
Tempering: p^T = softmax(z / T) for the logits z that each side outputs, the teacher's and the ensemble's (z_mix is
exactly what ModelEnsemble returns as its logits). With combine="probs" the ensemble outputs
log p_mix = logsumexp_k log_softmax(z_k) - log(n + 1), formed at T = 1, so the divergence sees
p_mix^T = p_mix^(1/T) / sum_v p_mix(v)^(1/T): the ensemble's own predictive distribution tempered, as the teacher's
side is the teacher's prediction tempered. It is not the mean of the members' tempered distributions,
mean_k softmax(z_k / T); the two agree at T = 1 only.
Both terms use the same shifted positions (position t predicts token t+1, for supervised tokens only), run in
fp32 whatever the model dtype, and are sums divided by the number of supervised tokens in the whole optimizer
step, so gradient accumulation and micro-batch size do not change the loss or its gradients.

`chunked_hybrid_loss_sums` computes the same sums from hidden states, chunk of positions by chunk: every model's
output head runs on one chunk at a time, and the student's chunk is recomputed in the backward pass instead of
stored, so no (positions x vocabulary) tensor larger than one chunk is ever held. The per-chunk function,
`hybrid_loss_terms`, can run through torch.compile (`compile_loss_terms`).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ensemble import combine_logits

IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class LossSettings:
    alpha: float = 0.5  # weight of the distillation term
    temperature: float = 1.0
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    nll_target: str = "mixture"  # or "student"
    combine: str = "logits"
    # combine="weighted"/"additive": the coefficients of (student, member_1, ..., member_n), in that order.
    mixture_weights: tuple[float, ...] | None = None
    kl_scale: float = 1.0  # multiplies the distillation term (the ensemble's size undoes averaging's 1/(n+1))


@dataclass
class LossSums:
    """Sums over a micro-batch's supervised positions; divide by the step's token count to get the loss."""

    total: torch.Tensor  # kl_term + nll_term, differentiable
    divergence: torch.Tensor  # detached sum of D (without T^2 or alpha)
    nll: torch.Tensor  # detached sum of the NLL
    num_tokens: int
    kl_term: torch.Tensor  # kl_scale * alpha * T^2 * divergence_sum, differentiable (for per-term gradient norms)
    nll_term: torch.Tensor  # (1 - alpha) * nll_sum, differentiable


class LossTerms(NamedTuple):
    """The hybrid loss's parts summed over some positions: what the per-chunk function returns (tensors only, so
    that torch.compile can trace it), added up over chunks and then turned into LossSums."""

    kl_term: torch.Tensor  # differentiable
    nll_term: torch.Tensor  # differentiable
    divergence: torch.Tensor  # detached
    nll: torch.Tensor  # detached

    def __add__(self, other: "LossTerms") -> "LossTerms":
        return LossTerms(*(mine + theirs for mine, theirs in zip(self, other)))

    def sums(self, num_tokens: int) -> LossSums:
        return LossSums(total=self.kl_term + self.nll_term, divergence=self.divergence, nll=self.nll,
                        num_tokens=num_tokens, kl_term=self.kl_term, nll_term=self.nll_term)


def predictor_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: True at positions t whose next token t+1 is supervised (the positions that get a loss)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """The supervised next tokens, in the order of `predictor_mask`'s True positions."""
    shifted = labels[:, 1:]
    return shifted[shifted != IGNORE_INDEX]


def divergence_sum(teacher_logits: torch.Tensor, model_logits: torch.Tensor, kind: str = "forward_kl",
                   temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Sum over rows of D between softmax(teacher/T) and softmax(model/T); inputs are [N, V] logits.

    forward_kl: KL(p_teacher || p_model)     reverse_kl: KL(p_model || p_teacher)
    jsd: beta * KL(p_teacher || m) + (1 - beta) * KL(p_model || m), with m = beta * p_teacher + (1 - beta) * p_model
    """
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_p_model = F.log_softmax(model_logits.float() / temperature, dim=-1)
    return divergence_from_log_probs(log_p_teacher, log_p_model, kind, beta, kl_sum)


def divergence_from_log_probs(log_p_teacher: torch.Tensor, log_p_model: torch.Tensor, kind: str, beta: float,
                              kl: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """D between two distributions given as log-probabilities over the same outcomes, with `kl` summing KL."""
    if kind == "forward_kl":
        return kl(log_p_teacher, log_p_model)
    if kind == "reverse_kl":
        return kl(log_p_model, log_p_teacher)
    if kind == "jsd":
        log_m = torch.logsumexp(torch.stack([log_p_teacher + math.log(beta), log_p_model + math.log1p(-beta)]), dim=0)
        return beta * kl(log_p_teacher, log_m) + (1 - beta) * kl(log_p_model, log_m)
    raise ValueError(f"unknown divergence {kind!r}: use one of {DIVERGENCES}")


def kl_sum(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL(p || q) from log-probabilities; 0 * log 0 counts as 0."""
    return torch.sum(torch.exp(log_p) * (log_p - log_q))


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of `targets` [N] under `logits` [N, V], in fp32."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


@dataclass
class SparseTarget:
    """A cached teacher: its top-k log-probabilities at the training temperature, their token ids, and the log of
    the remaining (tail) mass, per supervised position: a true distribution over k + 1 buckets."""

    log_probs: torch.Tensor  # [N, k]
    indices: torch.Tensor  # [N, k]
    tail_log_prob: torch.Tensor  # [N]

    def logits(self, rows: slice) -> "SparseTarget":
        return SparseTarget(self.log_probs[rows], self.indices[rows], self.tail_log_prob[rows])


def teacher_divergence_sum(teacher: "torch.Tensor | SparseTarget", mixture: torch.Tensor,
                           settings: LossSettings) -> torch.Tensor:
    """D(teacher || mixture) summed over positions, from dense teacher logits or a sparse cached target."""
    if isinstance(teacher, SparseTarget):
        return sparse_divergence_sum(teacher.log_probs, teacher.indices, teacher.tail_log_prob, mixture,
                                     settings.divergence, settings.temperature, settings.jsd_beta)
    return divergence_sum(teacher, mixture, settings.divergence, settings.temperature, settings.jsd_beta)


def hybrid_loss_sums(student_logits: torch.Tensor, teacher_logits: "torch.Tensor | SparseTarget | None",
                     member_logits: list[torch.Tensor], targets: torch.Tensor, settings: LossSettings) -> LossSums:
    """The hybrid loss's sums over N supervised positions.

    student_logits [N, V] carries gradients; teacher_logits [N, V] (or a SparseTarget; None when alpha = 0) and
    each of the frozen members' member_logits [N, V] do not. targets [N] are the next tokens.
    """
    return hybrid_loss_terms(student_logits, teacher_logits, member_logits, targets, settings).sums(targets.numel())


def hybrid_loss_terms(student_logits: torch.Tensor, teacher_logits: "torch.Tensor | SparseTarget | None",
                      member_logits: list[torch.Tensor], targets: torch.Tensor, settings: LossSettings) -> LossTerms:
    """`hybrid_loss_sums`'s parts, as the tensors-only function that runs on each chunk (and may be compiled)."""
    if member_logits or settings.mixture_weights is not None:
        # The ensemble's logits as ModelEnsemble computes them, at T = 1 (for combine="probs", log p_mix); the
        # divergence divides them by T, so it sees the ensemble's own prediction tempered (module docstring).
        mixture = combine_logits([student_logits, *member_logits], settings.combine, settings.mixture_weights)
    else:
        mixture = student_logits
    divergence = student_logits.new_zeros((), dtype=torch.float32)
    if settings.alpha > 0:
        divergence = teacher_divergence_sum(teacher_logits, mixture, settings)
    # The NLL is always computed: it is the metric users watch even when alpha = 1 gives it no weight.
    nll = nll_sum(mixture if settings.nll_target == "mixture" else student_logits, targets)
    kl_term = settings.kl_scale * settings.alpha * settings.temperature**2 * divergence
    nll_term = (1 - settings.alpha) * nll
    return LossTerms(kl_term=kl_term, nll_term=nll_term, divergence=divergence.detach(), nll=nll.detach())


LossTermsFunction = Callable[[torch.Tensor, "torch.Tensor | SparseTarget | None", list[torch.Tensor], torch.Tensor,
                              LossSettings], LossTerms]


def compile_loss_terms(backend: str | Callable = "inductor") -> LossTermsFunction:
    """`hybrid_loss_terms` through torch.compile, which fuses its memory-bound passes over the vocabulary (the
    softmaxes, exponentials, the divergence's products and sums, and their backward) into a few kernels.

    Build it once per trainer and pass it to `chunked_hybrid_loss_sums`: the compiled code is kept per returned
    function (isolate_recompiles), so each round's member count and settings get their own recompile budget instead
    of sharing one with every earlier round of the run. The row dimension is marked dynamic, so a shorter last
    chunk, or another micro-batch's number of positions, reuses the same compiled code. The output heads' matrix
    products stay outside: each is one library call already. fullgraph: a construct torch.compile cannot capture
    whole is an error here, not a silent slow path.
    """
    compiled = torch.compile(hybrid_loss_terms, backend=backend, fullgraph=True, isolate_recompiles=True)

    def compiled_loss_terms(student_logits: torch.Tensor, teacher_logits: "torch.Tensor | SparseTarget | None",
                            member_logits: list[torch.Tensor], targets: torch.Tensor,
                            settings: LossSettings) -> LossTerms:
        row_tensors = [student_logits, *member_logits, targets]
        if isinstance(teacher_logits, SparseTarget):
            row_tensors += [teacher_logits.log_probs, teacher_logits.indices, teacher_logits.tail_log_prob]
        elif teacher_logits is not None:
            row_tensors.append(teacher_logits)
        for tensor in row_tensors:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return compiled(student_logits, teacher_logits, member_logits, targets, settings)

    return compiled_loss_terms


@dataclass
class Projection:
    """Hidden states at supervised positions [N, H] and the output head that turns rows of them into logits."""

    hidden: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor]

    def logits(self, rows: slice) -> torch.Tensor:
        return self.head(self.hidden[rows])


def chunked_hybrid_loss_sums(student: Projection, teacher: Projection | SparseTarget | None,
                             members: list[Projection], targets: torch.Tensor, settings: LossSettings,
                             chunk_size: int, loss_terms: LossTermsFunction = hybrid_loss_terms) -> LossSums:
    """`hybrid_loss_sums` over chunks of `chunk_size` positions (0: one chunk), equal to it up to rounding.

    Each chunk's logits exist only while that chunk is computed; the student's are recomputed in the backward
    pass (activation checkpointing), so the memory of the loss path grows with the chunk, not with N.
    `loss_terms` is the per-chunk function: `hybrid_loss_terms`, or the compiled one from `compile_loss_terms`.
    """
    num_positions = targets.numel()
    if chunk_size <= 0 or num_positions <= chunk_size:
        rows = slice(0, num_positions)
        return loss_terms(student.logits(rows), teacher.logits(rows) if teacher is not None else None,
                          [member.logits(rows) for member in members], targets, settings).sums(num_positions)

    def chunk_terms(student_hidden: torch.Tensor, rows: slice) -> LossTerms:
        return loss_terms(student.head(student_hidden), teacher.logits(rows) if teacher is not None else None,
                          [member.logits(rows) for member in members], targets[rows], settings)

    total = None
    for start in range(0, num_positions, chunk_size):
        rows = slice(start, start + chunk_size)
        terms = checkpoint(chunk_terms, student.hidden[rows], rows, use_reentrant=False)
        total = terms if total is None else total + terms
    return total.sums(num_positions)


# ---------------------------------------------------------------------------------------------------------------------
# Sparse teacher targets: a cached top-k plus one tail bucket (teacher_cache.py)
# ---------------------------------------------------------------------------------------------------------------------

def sparse_divergence_sum(teacher_log_probs: torch.Tensor, teacher_indices: torch.Tensor,
                          teacher_tail_log_prob: torch.Tensor, model_logits: torch.Tensor, kind: str = "forward_kl",
                          temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Sum over rows of D between the teacher's and the model's distributions over k + 1 buckets.

    The buckets are the teacher's top-k tokens (teacher_indices [N, k], their log-probabilities teacher_log_probs
    [N, k]) and one tail bucket holding every other token (teacher_tail_log_prob [N], -inf when empty). The teacher's
    values are already at the temperature (cached that way); only model_logits [N, V] are divided by it here. D is
    as in `divergence_sum`, which this equals when k = V. Merging tokens into a bucket never increases a divergence,
    so with k < V this is a lower bound of the dense one, tight when the tail is small.
    """
    log_p_teacher = torch.cat([teacher_log_probs.float(), teacher_tail_log_prob.float().unsqueeze(-1)], dim=-1)
    log_p_model = bucket_log_probs(model_logits, teacher_indices, temperature)
    return divergence_from_log_probs(log_p_teacher, log_p_model, kind, beta, bucket_kl_sum)


def bucket_log_probs(logits: torch.Tensor, indices: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[N, k + 1] fp32: log softmax(logits / T) at the k `indices` of each row, then the log of all other mass.

    The tail is a logsumexp over the other columns, exact even when it is tiny (1 - sum would cancel). Columns in
    the top-k are masked with the lowest finite float, not -inf: an empty tail (k = V) is then a finite number
    whose exp is 0, and its gradient stays 0 instead of NaN.
    """
    log_probs = F.log_softmax(logits.float() / temperature, dim=-1)
    in_top_k = torch.zeros_like(log_probs, dtype=torch.bool).scatter_(-1, indices, True)
    tail = torch.logsumexp(log_probs.masked_fill(in_top_k, torch.finfo(log_probs.dtype).min), dim=-1)
    return torch.cat([log_probs.gather(-1, indices), tail.unsqueeze(-1)], dim=-1)


def bucket_kl_sum(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """`kl_sum` where buckets may be empty: a term with p = 0 is 0 (and so is its gradient), even where q = 0 too."""
    p = torch.exp(log_p)
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return torch.sum(p * log_ratio)
