"""Compute accounting: the FLOPs of training and running an ensemble of students, against single models at equal cost.

Pure functions of model shapes (parameter counts, depth, attention width) and token counts; nothing here runs a
model. The conventions (docs/compute.md states them once):

- **Forward FLOPs per token** (Kaplan et al. 2020, Table 1; 2 FLOPs per multiply-add):
      C_fwd(context) = 2 * (N + V * H) + 2 * n_layers * context * d_attn
  N: non-embedding parameters (every distinct parameter but the embedding tables and an untied head; norms
  included); V * H: the output head's matmul (its vocab x hidden weight, counted whether tied or not);
  d_attn = num_attention_heads * head_dim. The attention term is Kaplan's `2 n_layer n_ctx d_attn`: the QK^T and
  attention-times-V products (4 * d_attn per attended position and layer) over a causal token's average
  context / 2 attended positions. Chinchilla (Hoffmann et al. 2022, App. F) counts the full square, twice this
  term; a kernel that computes the masked square does that work. Not counted: embedding lookups, softmax, norms'
  and activations' elementwise work, rotary embeddings, the logits' softmax and the loss.
- **Body and head**: the trainer runs a model's body (everything before the output head) on every token of the
  padded batch, prompt and padding included, and its head only at supervised positions (model_io.py). So every
  count takes `sequence_tokens` (the padded tokens of the batches run: batches x batch size x padded length), for
  body work, and `supervised_tokens` (positions whose next token is supervised), for head work.
- **Training** = 3 x forward for the trained student (forward + backward: 2 x forward for the gradients with
  respect to activations and weights), 1 x forward for every frozen model. The optimizer step, gradient clipping,
  gradient-checkpointing recomputation and the per-term gradient norms of logged steps are not counted (model
  FLOPs, as for MFU), nor is evaluation, nor the weight fit of combine=weighted (a forward pass of the ensemble on
  a small held-out slice, like evaluation).
- **The teacher**: `online` runs its forward on every training token, every round. `topk` / `hidden` run its body
  once over the training split to build the cache (topk: with its head at every supervised position); the build
  is shared equally by the rounds that read the cache, and in `hidden` mode every round still applies the
  teacher's head at each supervised position. No teacher (alpha = 0): pass teacher=None.
- **Inference**: an ensemble's FLOPs per token are its members' forwards summed (the combination of logits is not
  counted); its critical-path depth is the largest member's layer count (members run side by side).
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

TEACHER_MODES = ("online", "topk", "hidden")
BACKWARD_FACTOR = 3  # forward + backward of a trained model, in forwards


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the FLOP formulas need of one decoder LM (see `model_shape`)."""

    parameters: int  # distinct parameters, embeddings included (a tied head counts once)
    embedding_parameters: int  # embedding tables (token, learned positions) and an untied output head
    head_parameters: int  # the output head's matmul: vocab x hidden, counted whether tied or not
    num_layers: int  # decoder layers (num_hidden_layers)
    attention_width: int  # d_attn = num_attention_heads x head_dim

    @property
    def non_embedding_parameters(self) -> int:
        return self.parameters - self.embedding_parameters


class RoundFlops(NamedTuple):
    """One round's training FLOPs by model; `total` is their sum."""

    student: float  # forward + backward of the trained student
    members: float  # forwards of the frozen members (the method trains through them; baselines have none)
    teacher: float  # online forwards, or the round's share of the cache build plus (hidden) its head

    @property
    def total(self) -> float:
        return self.student + self.members + self.teacher


# --- parameters ---------------------------------------------------------------------------------------------------

def model_shape(model_or_config, trust_remote_code: bool = False) -> ModelShape:
    """The shape of a model (a transformers PreTrainedModel) or of the model a transformers config describes.

    A config is built on the meta device (`AutoModelForCausalLM.from_config`): no weight is allocated. Parameters are
    distinct (model.parameters() counts a tied head once); embedding parameters are those of every nn.Embedding and of
    the output head when it is not tied to one.
    """
    if isinstance(model_or_config, ModelShape):
        return model_or_config
    model = model_or_config
    if not isinstance(model, torch.nn.Module):
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_or_config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    embedding = {id(p): p.numel() for module in model.modules() if isinstance(module, torch.nn.Embedding)
                 for p in module.parameters(recurse=False)}
    embedding.update({id(p): p.numel() for p in head.parameters(recurse=False)})
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(parameters=sum(p.numel() for p in model.parameters()),
                      embedding_parameters=sum(embedding.values()), head_parameters=head.weight.numel(),
                      num_layers=config.num_hidden_layers, attention_width=config.num_attention_heads * head_dim)


def parameter_count(model_or_config, trust_remote_code: bool = False) -> int:
    """Distinct parameters, embeddings included (a tied head counts once)."""
    return model_shape(model_or_config, trust_remote_code).parameters


def non_embedding_parameter_count(model_or_config, trust_remote_code: bool = False) -> int:
    """Kaplan's N: distinct parameters less the embedding tables and an untied output head (norms included)."""
    return model_shape(model_or_config, trust_remote_code).non_embedding_parameters


# --- forward FLOPs ------------------------------------------------------------------------------------------------

def body_forward_flops_per_token(shape: ModelShape, context: int) -> int:
    """2 * N + 2 * n_layers * context * d_attn: the body's forward FLOPs per token at sequence length `context`."""
    return 2 * shape.non_embedding_parameters + 2 * shape.num_layers * context * shape.attention_width


def head_forward_flops_per_token(shape: ModelShape) -> int:
    """2 * V * H: the output head's matmul, per position it is applied at."""
    return 2 * shape.head_parameters


def forward_flops_per_token(shape: ModelShape, context: int) -> int:
    """2 * (N + V * H) + 2 * n_layers * context * d_attn: body and head, the Kaplan et al. (2020) forward count."""
    return body_forward_flops_per_token(shape, context) + head_forward_flops_per_token(shape)


def forward_flops(shape: ModelShape, sequence_tokens: int, supervised_tokens: int, context: int) -> int:
    """One forward as the trainer runs it: the body on `sequence_tokens`, the head on `supervised_tokens`."""
    return (body_forward_flops_per_token(shape, context) * sequence_tokens
            + head_forward_flops_per_token(shape) * supervised_tokens)


# --- training -----------------------------------------------------------------------------------------------------

def teacher_cache_build_flops(teacher: ModelShape, teacher_mode: str, cache_sequence_tokens: int,
                              cache_supervised_tokens: int, context: int) -> int:
    """The teacher's one pass over the training split that builds its cache: the body on every token of the build's
    padded batches, plus (topk) the head at every supervised position; 0 for an online teacher."""
    _check_teacher_mode(teacher_mode)
    if teacher_mode == "online":
        return 0
    head_tokens = cache_supervised_tokens if teacher_mode == "topk" else 0
    return forward_flops(teacher, cache_sequence_tokens, head_tokens, context)


def round_training_flops(student: ModelShape, *, sequence_tokens: int, supervised_tokens: int, context: int,
                         members: Sequence[ModelShape] = (), teacher: ModelShape | None = None,
                         teacher_mode: str = "online", cache_sequence_tokens: int | None = None,
                         cache_supervised_tokens: int | None = None, rounds_sharing_cache: int = 1) -> RoundFlops:
    """The training FLOPs of one round over its `sequence_tokens` / `supervised_tokens` (all its steps, every process):

        student = 3 * forward(student)
        members = sum over frozen members of forward(member)       (the method; a baseline passes none)
        teacher = forward(teacher)                                  online
                = build / rounds_sharing_cache                      topk
                = build / rounds_sharing_cache + 2 V H * supervised_tokens    hidden
    with forward(m) = (2 N + 2 n_layers context d_attn) * sequence_tokens + 2 V H * supervised_tokens, and the build
    `teacher_cache_build_flops` over the cache's own token counts (the whole training split, in its build batches).
    """
    _check_teacher_mode(teacher_mode)
    student_flops = BACKWARD_FACTOR * forward_flops(student, sequence_tokens, supervised_tokens, context)
    member_flops = sum(forward_flops(member, sequence_tokens, supervised_tokens, context) for member in members)
    teacher_flops = 0
    if teacher is not None and teacher_mode == "online":
        teacher_flops = forward_flops(teacher, sequence_tokens, supervised_tokens, context)
    elif teacher is not None:
        if cache_sequence_tokens is None or cache_supervised_tokens is None or rounds_sharing_cache < 1:
            raise ValueError(f"teacher_mode {teacher_mode!r} needs the cache build's cache_sequence_tokens and "
                             "cache_supervised_tokens, and rounds_sharing_cache >= 1")
        build = teacher_cache_build_flops(teacher, teacher_mode, cache_sequence_tokens, cache_supervised_tokens,
                                          context)
        teacher_flops = build / rounds_sharing_cache
        if teacher_mode == "hidden":
            teacher_flops += head_forward_flops_per_token(teacher) * supervised_tokens
    return RoundFlops(student=student_flops, members=member_flops, teacher=teacher_flops)


def run_training_flops(students: Sequence[ModelShape], *, sequence_tokens: int | Sequence[int],
                       supervised_tokens: int | Sequence[int], context: int, through_ensemble: bool = True,
                       teacher: ModelShape | None = None, teacher_mode: str = "online",
                       cache_sequence_tokens: int | None = None, cache_supervised_tokens: int | None = None,
                       rounds_sharing_cache: int | None = None) -> list[float]:
    """Cumulative training FLOPs of a run's ensemble after each round: element r is the sum of rounds 0..r.

    students[r] is round r's student. through_ensemble=True (the method, baseline none): round r also runs the
    forwards of students[:r], frozen; False (baseline independent): each student trains alone. Token counts are
    per round, one number for every round or one per round. The cache build is shared by `rounds_sharing_cache`
    rounds (default: this run's rounds; more when other runs read the same cache).
    """
    rounds = len(students)
    sequence = _per_round(sequence_tokens, rounds, "sequence_tokens")
    supervised = _per_round(supervised_tokens, rounds, "supervised_tokens")
    cumulative, total = [], 0
    for index, student in enumerate(students):
        total += round_training_flops(
            student, sequence_tokens=sequence[index], supervised_tokens=supervised[index], context=context,
            members=students[:index] if through_ensemble else (), teacher=teacher, teacher_mode=teacher_mode,
            cache_sequence_tokens=cache_sequence_tokens, cache_supervised_tokens=cache_supervised_tokens,
            rounds_sharing_cache=rounds_sharing_cache or rounds).total
        cumulative.append(total)
    return cumulative


def single_model_training_flops(student: ModelShape, *, sequence_tokens: int, supervised_tokens: int, context: int,
                                teacher: ModelShape | None = None, teacher_mode: str = "online",
                                cache_sequence_tokens: int | None = None, cache_supervised_tokens: int | None = None,
                                rounds_sharing_cache: int = 1) -> float:
    """The training FLOPs of one model trained alone (single_matched, single_large) over all its tokens: one round
    without members, which bears the whole cache build unless other rounds share it."""
    return run_training_flops([student], sequence_tokens=sequence_tokens, supervised_tokens=supervised_tokens,
                              context=context, teacher=teacher, teacher_mode=teacher_mode,
                              cache_sequence_tokens=cache_sequence_tokens,
                              cache_supervised_tokens=cache_supervised_tokens,
                              rounds_sharing_cache=rounds_sharing_cache)[-1]


def flop_matched_steps(flop_budget: float, flops_per_step: float, fixed_flops: float = 0) -> int:
    """floor((flop_budget - fixed_flops) / flops_per_step): the steps a model costing `flops_per_step` a step (e.g.
    `round_training_flops` of one step's tokens) can take within the budget, after a one-off cost such as its
    teacher cache build. 0 when the fixed cost alone exceeds the budget. A quotient within 1e-9 (relative) below a
    whole number counts as that number, so float rounding of an exact budget never loses a step."""
    if flops_per_step <= 0:
        raise ValueError(f"flops_per_step must be > 0, not {flops_per_step}")
    quotient = (flop_budget - fixed_flops) / flops_per_step
    if quotient <= 0:
        return 0
    return math.floor(quotient * (1 + 1e-9))


# --- inference ----------------------------------------------------------------------------------------------------

def ensemble_inference_flops_per_token(members: Sequence[ModelShape], context: int) -> int:
    """sum over members of 2 * (N + V * H) + 2 * n_layers * context * d_attn: every member's full forward per token
    (one member: a single model)."""
    return sum(forward_flops_per_token(member, context) for member in members)


def critical_path_depth(members: Sequence[ModelShape]) -> int:
    """max over members of num_layers: the layers a token passes one after another when the members run in
    parallel (one member: a single model's depth)."""
    return max(member.num_layers for member in members)


def _check_teacher_mode(teacher_mode: str) -> None:
    if teacher_mode not in TEACHER_MODES:
        raise ValueError(f"unknown teacher_mode {teacher_mode!r}: use one of {TEACHER_MODES}")


def _per_round(tokens: int | Sequence[int], rounds: int, name: str) -> list[int]:
    if isinstance(tokens, Sequence):
        if len(tokens) != rounds:
            raise ValueError(f"{name} gives {len(tokens)} counts for {rounds} rounds")
        return list(tokens)
    return [tokens] * rounds


# --- a run's metric rows ------------------------------------------------------------------------------------------

COLUMNS = ("parameters", "member_parameters", "train_flops", "inference_flops_per_token", "critical_path_layers")


def metric_columns(members: Sequence[ModelShape], round_tokens: Sequence[tuple[int, int]], *, context: int,
                   through_ensemble: bool, teacher: ModelShape | None, teacher_mode: str,
                   cache_tokens: tuple[int, int], rounds_sharing_cache: int) -> dict[str, dict]:
    """The compute columns (COLUMNS) of the metric rows of the round that added members[-1], by row model.

    members[r] is round r's student; round_tokens[r] its (sequence_tokens, supervised_tokens) trained on;
    cache_tokens the training split's, over which a cached teacher was run once. The teacher's row has no
    train_flops (it was trained elsewhere); the untrained student's is 0; the student's is its own round's training
    (its frozen members' forwards and its share of the teacher included); the ensemble's, every round's so far.
    """
    def flops_of_round(index: int) -> float:
        return round_training_flops(
            members[index], sequence_tokens=round_tokens[index][0], supervised_tokens=round_tokens[index][1],
            context=context, members=members[:index] if through_ensemble else (), teacher=teacher,
            teacher_mode=teacher_mode, cache_sequence_tokens=cache_tokens[0], cache_supervised_tokens=cache_tokens[1],
            rounds_sharing_cache=rounds_sharing_cache).total

    def of(models: Sequence[ModelShape], train_flops: float | None) -> dict:
        return {"parameters": sum(m.parameters for m in models),
                "member_parameters": max(m.parameters for m in models), "train_flops": train_flops,
                "inference_flops_per_token": ensemble_inference_flops_per_token(models, context),
                "critical_path_layers": critical_path_depth(models)}

    student = members[-1]
    columns = {"student_untrained": of([student], 0), "student": of([student], flops_of_round(len(members) - 1)),
               "ensemble": of(members, sum(flops_of_round(index) for index in range(len(members))))}
    if teacher is not None:
        columns["teacher"] = of([teacher], None)
    return columns
