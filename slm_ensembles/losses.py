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

`chunked_hybrid_loss_sums` computes the same sums from hidden states, chunk of positions by chunk, together with the
student's gradients (as fused linear cross-entropy does): each chunk's logits come from every model's output head
once, the loss terms follow, and the chunk's gradients with respect to the student's hidden states and head
parameters are taken at once, in the forward pass. The backward pass only scales the stored gradients; nothing is
recomputed, so each frozen head runs once per chunk and so does the student's. The loss path holds one chunk's
logits at a time, plus an [N, H] gradient of the hidden states and one the size of the student's head (fp32), never
a (positions x vocabulary) tensor larger than one chunk. The per-chunk function, `hybrid_loss_terms`, can run
through torch.compile (`compile_loss_terms`).
"""

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ensemble import combine_logits, training_mixture_weights
from model_io import IGNORE_INDEX

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

    @classmethod
    def for_round(cls, config, frozen_weights, num_frozen: int) -> "LossSettings":
        """The loss of a round whose student trains through `num_frozen` frozen members, whose coefficients are
        `frozen_weights` (weighted and additive combine modes), from a run config (config.py)."""
        return cls(alpha=config.alpha, temperature=config.temperature, divergence=config.divergence,
                   jsd_beta=config.jsd_beta, nll_target=config.nll_target, combine=config.combine,
                   mixture_weights=training_mixture_weights(config.combine, frozen_weights, config.eta),
                   kl_scale=float(num_frozen + 1) if config.kl_scale == "ensemble_size" else 1.0)


@dataclass
class LossSums:
    """Sums over a micro-batch's supervised positions; divide by the step's token count to get the loss."""

    total: torch.Tensor  # kl_scale * alpha * T^2 * divergence + (1 - alpha) * nll, differentiable
    divergence: torch.Tensor  # detached sum of D (without T^2 or alpha)
    nll: torch.Tensor  # detached sum of the NLL
    num_tokens: int
    # Squared L2 norms of the gradients of the distillation and NLL terms of `total` at the student's hidden states
    # (detached), when `chunked_hybrid_loss_sums` was asked for them; None otherwise.
    kl_gradient_norm_sq: torch.Tensor | None = None
    nll_gradient_norm_sq: torch.Tensor | None = None


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
                        num_tokens=num_tokens)


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


def compile_loss_terms(backend: str | Callable = "inductor") -> "CompiledLossTerms":
    """`hybrid_loss_terms` through torch.compile, which fuses its memory-bound passes over the vocabulary (the
    softmaxes, exponentials, the divergence's products and sums, and their backward) into a few kernels.

    Build it once per trainer and pass it to `chunked_hybrid_loss_sums`: the compiled code is kept per returned
    function (isolate_recompiles), so each round's member count and settings get their own recompile budget instead
    of sharing one with every earlier round of the run. The row dimension is marked dynamic, so a shorter last
    chunk, or another micro-batch's number of positions, reuses the same compiled code. The output heads' matrix
    products stay outside: each is one library call already. fullgraph: a construct torch.compile cannot capture
    whole is an error here, not a silent slow path; that and any other failure of the compiled code, at any step,
    hand the loss to the eager `hybrid_loss_terms` for good (`CompiledLossTerms`).
    """
    return CompiledLossTerms(torch.compile(hybrid_loss_terms, backend=backend, fullgraph=True,
                                           isolate_recompiles=True))


class CompiledLossTerms:
    """A compiled `hybrid_loss_terms` (from `compile_loss_terms`) that gives way to the eager one when it fails.

    Compiled code can fail at any step, not only the first: a new chunk length or member count recompiles, the
    backward is compiled when it first runs, and a compiled kernel can fail when it first runs on the device. None
    of that should stop a run whose eager loss works, so `chunked_hybrid_loss_sums` computes each micro-batch's sums
    through `with_eager_fallback`. Forward and backward both run there: the fused loss takes its gradients in the
    forward pass.
    """

    def __init__(self, compiled: LossTermsFunction):
        self.compiled = compiled
        self.failure: Exception | None = None  # the compiled code's first failure; eager for good once set

    def compiled_loss_terms(self, student_logits: torch.Tensor, teacher_logits: "torch.Tensor | SparseTarget | None",
                            member_logits: list[torch.Tensor], targets: torch.Tensor,
                            settings: LossSettings) -> LossTerms:
        row_tensors = [student_logits, *member_logits, targets]
        if isinstance(teacher_logits, SparseTarget):
            row_tensors += [teacher_logits.log_probs, teacher_logits.indices, teacher_logits.tail_log_prob]
        elif teacher_logits is not None:
            row_tensors.append(teacher_logits)
        for tensor in row_tensors:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return self.compiled(student_logits, teacher_logits, member_logits, targets, settings)

    def with_eager_fallback(self, compute: Callable[[LossTermsFunction], LossSums]) -> LossSums:
        """compute(the compiled function) until it first fails; then, and from then on, compute(hybrid_loss_terms).

        The failed call is recomputed eagerly, so no step is lost, and one warning names the error. `compute` must
        leave nothing behind when it fails (the fused loss writes no .grad before its backward pass). An error the
        eager recompute raises too comes from the inputs, not the compiler: it is raised, and compiling stays on.
        """
        if self.failure is not None:
            return compute(hybrid_loss_terms)
        try:
            return compute(self.compiled_loss_terms)
        except Exception as error:
            result = compute(hybrid_loss_terms)
            self.failure = error
            warnings.warn(f"the compiled loss failed ({type(error).__name__}: {str(error).strip()}); that "
                          "micro-batch was recomputed with the eager loss, which is used from now on",
                          RuntimeWarning, stacklevel=2)
            return result


@dataclass
class Projection:
    """Hidden states at supervised positions [N, H] and the output head that turns rows of them into logits.

    `module` owns the head's parameters (default: `head` itself when it is a module). For the student it must hold
    every trainable parameter the head uses: the fused loss takes their gradients explicitly (see
    `chunked_hybrid_loss_sums`), and refuses a head that uses others.
    """

    hidden: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor]
    module: torch.nn.Module | None = None

    def logits(self, rows: slice) -> torch.Tensor:
        return self.head(self.hidden[rows])

    def trainable_parameters(self) -> tuple[torch.nn.Parameter, ...]:
        module = self.module if self.module is not None else self.head
        if not isinstance(module, torch.nn.Module):
            return ()
        return tuple(parameter for parameter in module.parameters() if parameter.requires_grad)


def loss_chunks(num_positions: int, chunk_size: int) -> list[slice]:
    """The rows of each chunk of `chunk_size` positions; one chunk of all of them when chunk_size is 0 or larger."""
    if chunk_size <= 0 or num_positions <= chunk_size:
        return [slice(0, num_positions)]
    return [slice(start, start + chunk_size) for start in range(0, num_positions, chunk_size)]


def chunked_hybrid_loss_sums(student: Projection, teacher: Projection | SparseTarget | None,
                             members: list[Projection], targets: torch.Tensor, settings: LossSettings,
                             chunk_size: int, loss_terms: LossTermsFunction | CompiledLossTerms = hybrid_loss_terms,
                             term_gradient_norms: bool = False) -> LossSums:
    """`hybrid_loss_sums` over chunks of `chunk_size` positions (0: one chunk), equal to it up to rounding.

    When gradients are wanted, each chunk's gradients with respect to the student's hidden states and its head's
    trainable parameters are computed in the forward pass, right after the chunk's loss (`FusedHybridLoss`), and
    the backward pass scales them by the gradient reaching `total`: no head runs twice. Memory: one chunk's logits
    and their loss's intermediates at a time, plus the stored fp32 gradients ([N, H] and the head's size).
    `loss_terms` is the per-chunk function: `hybrid_loss_terms`, or the compiled one from `compile_loss_terms`
    (which falls back to `hybrid_loss_terms` if it fails). `term_gradient_norms`: also return the squared norms of
    the distillation and NLL terms' gradients at the student's hidden states (each term's gradient is then also
    taken on its own, at the hidden rows only: two extra backward passes through the chunk's loss, none through the
    head's weight gradients).
    """
    if isinstance(loss_terms, CompiledLossTerms):
        return loss_terms.with_eager_fallback(lambda terms_function: chunked_hybrid_loss_sums(
            student, teacher, members, targets, settings, chunk_size, terms_function, term_gradient_norms))

    def chunk_terms(student_hidden: torch.Tensor, rows: slice) -> LossTerms:
        with torch.no_grad():  # the frozen models' logits need no graph, whatever the caller's grad mode
            teacher_logits = teacher.logits(rows) if teacher is not None else None
            member_logits = [member.logits(rows) for member in members]
        return loss_terms(student.head(student_hidden), teacher_logits, member_logits, targets[rows], settings)

    chunks = loss_chunks(targets.numel(), chunk_size)
    parameters = student.trainable_parameters()
    if not torch.is_grad_enabled() or not (student.hidden.requires_grad or parameters):
        with torch.no_grad():  # evaluation: the sums only
            terms = functools.reduce(LossTerms.__add__, (chunk_terms(student.hidden[rows], rows) for rows in chunks))
        return terms.sums(targets.numel())
    total, divergence, nll, kl_norm_sq, nll_norm_sq = FusedHybridLoss.apply(
        chunk_terms, chunks, term_gradient_norms, student.hidden, *parameters)
    sums = LossSums(total=total, divergence=divergence, nll=nll, num_tokens=targets.numel())
    if term_gradient_norms:
        sums.kl_gradient_norm_sq, sums.nll_gradient_norm_sq = kl_norm_sq, nll_norm_sq
    return sums


ChunkTermsFunction = Callable[[torch.Tensor, slice], LossTerms]


class FusedHybridLoss(torch.autograd.Function):
    """The hybrid loss summed over chunks, its gradients computed chunk by chunk in the forward pass.

    forward(chunk_terms, chunks, term_gradient_norms, hidden [N, H], *head_parameters) returns the total (the only
    differentiable output), the divergence and NLL sums, and the squared gradient norms of the distillation and NLL
    terms at `hidden` (zeros unless term_gradient_norms). chunk_terms(hidden rows, rows) gives one chunk's LossTerms
    through the student's head. The loss is linear in its gradients, so backward returns the stored ones times the
    incoming gradient. The head's parameters are inputs so that their gradients reach .grad the normal way, in the
    backward pass (where DDP's all-reduce hooks fire, and where a head tied to the input embeddings adds its part to
    theirs); autograd.grad inside forward leaves .grad alone.
    """

    @staticmethod
    def forward(ctx, chunk_terms: ChunkTermsFunction, chunks: list[slice], term_gradient_norms: bool,
                hidden: torch.Tensor, *parameters: torch.Tensor):
        # fp32 accumulators whatever the inputs' dtypes; cast back to each input's dtype in backward.
        hidden_gradient = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        parameter_gradients = [torch.zeros_like(parameter, dtype=torch.float32) for parameter in parameters]
        # total, divergence, nll, kl gradient norm^2, nll gradient norm^2
        sums = torch.zeros(5, dtype=torch.float32, device=hidden.device)
        for index, rows in enumerate(chunks):
            hidden_rows = hidden[rows].detach().requires_grad_()
            with torch.enable_grad():  # forward runs with gradients off
                terms = chunk_terms(hidden_rows, rows)
            if index == 0:
                refuse_untracked_parameters([terms.kl_term, terms.nll_term], [hidden_rows, *parameters])
            gradients, kl_norm_sq, nll_norm_sq = chunk_gradients(terms, [hidden_rows, *parameters],
                                                                 term_gradient_norms)
            hidden_gradient[rows] = gradients[0]  # chunks are disjoint rows: each is written once
            for accumulated, gradient in zip(parameter_gradients, gradients[1:]):
                accumulated.add_(gradient)
            sums += torch.stack([(terms.kl_term + terms.nll_term).detach().float(), terms.divergence.float(),
                                 terms.nll.float(), kl_norm_sq, nll_norm_sq])
        ctx.save_for_backward(hidden_gradient, *parameter_gradients)
        ctx.input_dtypes = [hidden.dtype, *(parameter.dtype for parameter in parameters)]
        total, *statistics = (value.clone() for value in sums.unbind())  # separate tensors, not views of one
        ctx.mark_non_differentiable(*statistics)
        return total, *statistics

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: torch.Tensor, *unused_grads: torch.Tensor):
        # Scaled in place: this runs first in the backward pass, while the body's saved activations are all alive,
        # where a scaled copy would add a head-sized tensor to the step's peak memory. The stored gradients serve
        # one backward; a second one through this graph (retain_graph) fails on autograd's in-place check.
        gradients = [stored.mul_(grad_total).to(dtype) if needed else None
                     for stored, dtype, needed in zip(ctx.saved_tensors, ctx.input_dtypes, ctx.needs_input_grad[3:])]
        return None, None, None, *gradients


def chunk_gradients(terms: LossTerms, inputs: Sequence[torch.Tensor],
                    term_gradient_norms: bool) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The gradients of a chunk's total (kl_term + nll_term) with respect to `inputs` (the hidden rows first), and
    the squared norms of each term's gradient at the hidden rows when asked (else zeros).

    Autocast is off here, as it is for the usual loss.backward() after the autocast forward: the backward ops run in
    the dtypes the forward ops ran in. Asked for the norms, each term's gradient is first taken at the hidden rows
    only (no weight-gradient product through the head), keeping the graph for the total's gradient, which is then
    taken exactly as when the norms are not asked for: callers ask on logged steps only.
    """
    zero = torch.zeros((), dtype=torch.float32, device=inputs[0].device)
    kl_norm_sq = nll_norm_sq = zero
    with torch.enable_grad(), torch.autocast(inputs[0].device.type, enabled=False):
        if term_gradient_norms:
            kl_norm_sq = hidden_gradient_norm_sq(terms.kl_term, inputs[0])
            nll_norm_sq = hidden_gradient_norm_sq(terms.nll_term, inputs[0])
        gradients = list(torch.autograd.grad(terms.kl_term + terms.nll_term, inputs))
    return gradients, kl_norm_sq, nll_norm_sq


def hidden_gradient_norm_sq(term: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The squared L2 norm (fp32) of d term / d hidden, keeping the graph for the total's gradient; 0 for a term that
    does not depend on it (the distillation term when alpha = 0)."""
    if not term.requires_grad:
        return torch.zeros((), dtype=torch.float32, device=hidden.device)
    (gradient,) = torch.autograd.grad(term, hidden, retain_graph=True)
    return gradient.float().pow(2).sum()


def refuse_untracked_parameters(losses: Sequence[torch.Tensor], tracked: Sequence[torch.Tensor]) -> None:
    """Raise if `losses` depend on a tensor that requires gradients other than `tracked`: the fused loss would
    silently give it none (a student head whose parameters its Projection's module does not hold)."""
    seen, pending, untracked = set(), [loss.grad_fn for loss in losses], []
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # AccumulateGrad nodes hold the leaf tensor they accumulate into
        if leaf is not None and not any(leaf is tensor for tensor in tracked):
            untracked.append(tuple(leaf.shape))
        pending.extend(next_node for next_node, _ in node.next_functions)
    if untracked:
        raise ValueError(f"the student's output head uses trainable tensors of shapes {untracked} that its "
                         "Projection does not list: pass the module that owns them as Projection(module=...)")


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
