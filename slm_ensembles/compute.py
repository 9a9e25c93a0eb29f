"""Compute accounting: the FLOPs of training and running an ensemble of students, against single models at equal cost;
and the teacher cache's size and a training process's GPU memory, predicted before a run (dry_run.py).

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
- **Body and head**: the trainer runs a model's body on every token of a batch (padding excluded from the count:
  it is not model work) and its head only at supervised positions (model_io.py). Tokens are counted batch by batch
  as the steps run (`TokenCount`: tokens, supervised positions, and the sum of squared sequence lengths for the
  attention term), not estimated from the mean example.
- **Training** = 3 x forward for the trained student (forward + backward: 2 x forward for the gradients with
  respect to activations and weights), 1 x forward for every frozen model. The optimizer step, gradient clipping,
  gradient-checkpointing recomputation and the per-term gradient norms of logged steps are not counted (model
  FLOPs, as for MFU), nor is the weight fit of combine=weighted.
- **Evaluation** that training uses (early stopping's held-out CE, every eval_steps) is charged: a forward of every
  evaluated model (the student and the frozen members) on the early-stopping slice; early stopping reads only
  their mixture's CE, so no teacher runs there.
  Test-set evaluations are measurement, not method, and are not charged.
- **The teacher**: `online` runs its forward on every training token, every round. `topk` / `hidden` run its body
  once over the training split to build the cache (topk: with its head at every supervised position); **the whole
  build is charged once to every run that reads the cache**, whatever its rounds, as if it were built for that run
  alone (an ensemble of k inside a longer run bears all of it, like a single model). In `hidden` mode every round
  still applies the teacher's head at each supervised position. No teacher (alpha = 0): pass teacher=None.
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
    """What the FLOP and memory formulas need of one decoder LM (see `model_shape`)."""

    parameters: int  # distinct parameters, embeddings included (a tied head counts once)
    embedding_parameters: int  # embedding tables (token, learned positions) and an untied output head
    head_parameters: int  # the output head's matmul: vocab x hidden, counted whether tied or not
    num_layers: int  # decoder layers (num_hidden_layers)
    attention_width: int  # d_attn = num_attention_heads x head_dim
    # The widths the activation memory depends on; FLOP counts need none of them, so hand-made shapes for FLOPs
    # may leave them 0.
    hidden_size: int = 0
    intermediate_size: int = 0  # the MLP's width
    key_value_width: int = 0  # num_key_value_heads x head_dim: the width of the keys, and of the values

    @property
    def non_embedding_parameters(self) -> int:
        return self.parameters - self.embedding_parameters

    @property
    def vocab_size(self) -> int:
        """The output head's rows: the width of the logits."""
        return self.head_parameters // self.hidden_size


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

    A config is built on the meta device (meta_model): no weight is allocated. Parameters are distinct
    (model.parameters() counts a tied head once); embedding parameters are those of every nn.Embedding and of the
    output head when it is not tied to one.
    """
    if isinstance(model_or_config, ModelShape):
        return model_or_config
    model = model_or_config
    if not isinstance(model, torch.nn.Module):
        model = meta_model(model_or_config, trust_remote_code)
    head = model.get_output_embeddings()
    embedding = {id(p): p.numel() for module in model.modules() if isinstance(module, torch.nn.Embedding)
                 for p in module.parameters(recurse=False)}
    embedding.update({id(p): p.numel() for p in head.parameters(recurse=False)})
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    key_value_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return ModelShape(parameters=sum(p.numel() for p in model.parameters()),
                      embedding_parameters=sum(embedding.values()), head_parameters=head.weight.numel(),
                      num_layers=config.num_hidden_layers, attention_width=config.num_attention_heads * head_dim,
                      hidden_size=config.hidden_size,
                      # 0 for a config that names its MLP's width otherwise: the FLOP counts never need it
                      intermediate_size=getattr(config, "intermediate_size", 0),
                      key_value_width=key_value_heads * head_dim)


def meta_model(config, trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM a transformers config describes, built on the meta device: no weight is allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


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
    """One forward as the trainer runs it: the body on `sequence_tokens` of sequences `context` long, the head on
    `supervised_tokens`."""
    return measured_forward_flops(shape, TokenCount.uniform(sequence_tokens, supervised_tokens, context))


# --- training -----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TokenCount:
    """The tokens some forward passes ran on, counted batch by batch (padding excluded):
    sequence: tokens a model's body ran on; supervised: positions its head ran at; squared: the sum over sequences
    of length^2, for the causal attention term (a sequence of L tokens attends to about L^2 / 2 positions)."""

    sequence: int = 0
    supervised: int = 0
    squared: int = 0

    def __add__(self, other: "TokenCount") -> "TokenCount":
        return TokenCount(self.sequence + other.sequence, self.supervised + other.supervised,
                          self.squared + other.squared)

    def times(self, factor: int) -> "TokenCount":
        return TokenCount(self.sequence * factor, self.supervised * factor, self.squared * factor)

    @classmethod
    def uniform(cls, sequence_tokens: int, supervised_tokens: int, context: int) -> "TokenCount":
        """Sequences all `context` tokens long: an estimate where the batches are not known yet."""
        return cls(sequence_tokens, supervised_tokens, sequence_tokens * context)

    @classmethod
    def of_batch(cls, attention_mask: torch.Tensor, supervised_positions: torch.Tensor) -> "TokenCount":
        """A batch's count: its attention mask's tokens and its supervised positions."""
        lengths = attention_mask.sum(dim=1).long()
        return cls(int(lengths.sum()), int(supervised_positions.sum()), int((lengths * lengths).sum()))


def measured_forward_flops(shape: ModelShape, tokens: TokenCount) -> int:
    """2 N * sequence + 2 n_layers d_attn * squared + 2 V H * supervised: one forward over counted batches (with
    every sequence `context` long, squared = sequence x context and this is `forward_flops`)."""
    return (2 * shape.non_embedding_parameters * tokens.sequence
            + 2 * shape.num_layers * shape.attention_width * tokens.squared
            + head_forward_flops_per_token(shape) * tokens.supervised)


def teacher_cache_build_flops(teacher: ModelShape, teacher_mode: str, cache_tokens: TokenCount) -> int:
    """The teacher's one pass over the training split that builds its cache: the body on every token, plus (topk)
    the head at every supervised position; 0 for an online teacher."""
    _check_teacher_mode(teacher_mode)
    if teacher_mode == "online":
        return 0
    head_tokens = cache_tokens.supervised if teacher_mode == "topk" else 0
    return measured_forward_flops(teacher, dataclasses.replace(cache_tokens, supervised=head_tokens))


def round_training_flops(student: ModelShape, tokens: TokenCount, members: Sequence[ModelShape] = (),
                         teacher: ModelShape | None = None, teacher_mode: str = "online") -> RoundFlops:
    """The training FLOPs of one round over the `tokens` its steps ran on (every process):

        student = 3 * forward(student)
        members = sum over frozen members of forward(member)       (the method; a baseline passes none)
        teacher = forward(teacher)                                  online
                = 0                                                 topk (its cache build is charged once a run)
                = 2 V H * supervised                                hidden (its head on the cached states)
    with forward = measured_forward_flops."""
    _check_teacher_mode(teacher_mode)
    student_flops = BACKWARD_FACTOR * measured_forward_flops(student, tokens)
    member_flops = sum(measured_forward_flops(member, tokens) for member in members)
    teacher_flops = 0
    if teacher is not None and teacher_mode == "online":
        teacher_flops = measured_forward_flops(teacher, tokens)
    elif teacher is not None and teacher_mode == "hidden":
        teacher_flops = head_forward_flops_per_token(teacher) * tokens.supervised
    return RoundFlops(student=student_flops, members=member_flops, teacher=teacher_flops)


def run_training_flops(students: Sequence[ModelShape], tokens: TokenCount | Sequence[TokenCount], *,
                       through_ensemble: bool = True, teacher: ModelShape | None = None,
                       teacher_mode: str = "online", cache_tokens: TokenCount | None = None) -> list[float]:
    """Cumulative training FLOPs of a run's ensemble after each round: element r is the cache build (charged in
    full once, whatever the run's rounds) plus rounds 0..r.

    students[r] is round r's student. through_ensemble=True (the method, baseline none): round r also runs the
    forwards of students[:r], frozen; False (baseline independent): each student trains alone. `tokens`: one count
    for every round, or one per round.
    """
    per_round = list(tokens) if isinstance(tokens, Sequence) else [tokens] * len(students)
    if len(per_round) != len(students):
        raise ValueError(f"tokens gives {len(per_round)} counts for {len(students)} rounds")
    total = float(charged_cache_build(teacher, teacher_mode, cache_tokens))
    cumulative = []
    for index, (student, counted) in enumerate(zip(students, per_round)):
        total += round_training_flops(student, counted, students[:index] if through_ensemble else (), teacher,
                                      teacher_mode).total
        cumulative.append(total)
    return cumulative


def charged_cache_build(teacher: ModelShape | None, teacher_mode: str, cache_tokens: TokenCount | None) -> int:
    """The cache build a run is charged: all of it, once (0 without a teacher or with an online one)."""
    if teacher is None or teacher_mode == "online":
        return 0
    if cache_tokens is None:
        raise ValueError(f"teacher_mode {teacher_mode!r} needs the cache build's cache_tokens")
    return teacher_cache_build_flops(teacher, teacher_mode, cache_tokens)


@dataclasses.dataclass(frozen=True)
class SpendRule:
    """How a run's spend is charged, fixed at its setup: the teacher (None: alpha = 0) and its mode, the one-off
    `build_flops` (the teacher cache's build, and the cached teacher states of the early-stopping slice), and the
    early-stopping slice's tokens, which every evaluation runs the evaluated models on."""

    teacher: ModelShape | None
    teacher_mode: str
    build_flops: int
    evaluation_tokens: TokenCount

    @classmethod
    def for_run(cls, teacher: ModelShape | None, teacher_mode: str, cache_tokens: TokenCount,
                evaluation_tokens: TokenCount) -> "SpendRule":
        """A run's rule: the teacher cache's build over the training split (`cache_tokens`) and, with a cached
        teacher, its states of the early-stopping slice (`evaluation_tokens`), which the run caches with its other
        held-out splits."""
        build = charged_cache_build(teacher, teacher_mode, cache_tokens)
        if teacher is not None and teacher_mode != "online":
            build += measured_forward_flops(teacher, dataclasses.replace(evaluation_tokens, supervised=0))
        return cls(teacher, teacher_mode, build, evaluation_tokens)

    def round_parts(self, student: ModelShape, members: Sequence[ModelShape], tokens: TokenCount,
                    evaluations: int) -> list[float]:
        """One round's spend by part (SPEND_PARTS): its training over `tokens` through `members`, and its
        `evaluations` early-stopping evaluations of the student with those members (evaluation.mixture_ce)."""
        trained = round_training_flops(student, tokens, members, self.teacher, self.teacher_mode)
        per_evaluation = sum(measured_forward_flops(model, self.evaluation_tokens) for model in (student, *members))
        return [float(trained.student), float(trained.members), float(trained.teacher),
                float(evaluations * per_evaluation)]

    def columns(self, rounds: Sequence[Sequence[float]]) -> dict:
        """train_flops and its parts for the rounds' spends (each SPEND_PARTS), the build charged once."""
        parts = [float(sum(values)) for values in zip(*rounds)] if rounds else [0.0] * len(SPEND_PARTS)
        parts[SPEND_PARTS.index("flops_teacher")] += self.build_flops
        return spend_columns(parts)


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

COLUMNS = ("parameters", "non_embedding_parameters", "member_parameters", "train_flops", "flops_student",
           "flops_members", "flops_teacher", "flops_evaluation", "inference_flops_per_token", "critical_path_layers")
SPEND_PARTS = ("flops_student", "flops_members", "flops_teacher", "flops_evaluation")  # train_flops is their sum


def spend_columns(parts: Sequence[float]) -> dict:
    """train_flops and its SPEND_PARTS from the parts (student, members, teacher, evaluation)."""
    return {"train_flops": float(sum(parts)), **{name: float(value) for name, value in zip(SPEND_PARTS, parts)}}


def metric_columns(members: Sequence[ModelShape], round_spends: Sequence[Sequence[float]], *, context: int,
                   rule: SpendRule) -> dict[str, dict]:
    """The compute columns (COLUMNS) of the metric rows of the round that added members[-1], by row model.

    members[r] is round r's student; round_spends[r] what round r spent (SPEND_PARTS, measured as it trained). The
    teacher's row has no train_flops (it was trained elsewhere); the untrained student's is 0; the student's is the
    one-off build and its own round; the ensemble's, the build and every round so far (SpendRule.columns).
    """
    def of(models: Sequence[ModelShape], spent: dict) -> dict:
        return {"parameters": sum(m.parameters for m in models),
                "non_embedding_parameters": sum(m.non_embedding_parameters for m in models),
                "member_parameters": max(m.parameters for m in models), **spent,
                "inference_flops_per_token": ensemble_inference_flops_per_token(models, context),
                "critical_path_layers": critical_path_depth(models)}

    student = members[-1]
    columns = {"student_untrained": of([student], spend_columns([0.0] * len(SPEND_PARTS))),
               "student": of([student], rule.columns(round_spends[-1:])),
               "ensemble": of(members, rule.columns(round_spends))}
    if rule.teacher is not None:
        columns["teacher"] = of([rule.teacher], dict.fromkeys(["train_flops", *SPEND_PARTS]))
    return columns


# --- disk and GPU memory --------------------------------------------------------------------------------------------

GB = 1e9  # the unit predictions are printed in
# Before the data is prepared, the share of an example's max_length tokens assumed supervised (assistant tokens):
# the paper preset's ~1e8 supervised tokens in ~198k conversations of up to 1,024 tokens are about half.
ASSUMED_SUPERVISED_SHARE = 0.5
INDEX_BYTES_PER_EXAMPLE = 16  # a cache shard's example_ids.npy and offsets.npy hold one int64 each per example
STUDENT_BYTES_PER_PARAMETER = 16  # the trained student's fp32 weights (4), gradients (4), AdamW's two moments (8)
# bf16 autocast casts each weight once per forward and keeps the cast until the autocast region ends (or, without
# gradient checkpointing, until backward, which reads it); gradients accumulated over micro-batches are alive then.
AUTOCAST_COPY_BYTES_PER_PARAMETER = 2
# The chunked loss's memory per supervised position and vocabulary entry: every member's, the student's and the
# mixture's logits and their gradients. Measured on CPU under bf16 autocast in the last round of 8 (7 members, top-k
# teacher): see the paper preset's loss_chunk_size in config.py.
LOSS_BYTES_PER_LOGIT = 33
# What one decoder layer saves for its backward, in bytes per token: a * hidden + b * MLP width + c * (attention
# width + key/value width), with (a, b, c) by precision. Counted with torch's saved-tensor hooks on Llama layers with
# SDPA attention (transformers' default: a fused kernel keeps no sequence x sequence matrix), where it fits the
# counts exactly but for 4 bytes per attention head (the log-sum-exp) and per norm (the inverse RMS), under 1% left
# out; tests/test_compute.py checks it. Under bf16 autocast the norms' inputs and outputs stay fp32 and the matmuls'
# inputs are bf16 copies (queries, keys, values and the attention's output: c = 2 + 2); in fp32 all are 4 bytes.
LAYER_ACTIVATION_BYTES = {"bf16": (26, 8, 4), "fp32": (24, 16, 8)}
# With gradient checkpointing a layer keeps only its input, the fp32 residual stream, and rebuilds the rest in its
# backward, one layer at a time.
LAYER_INPUT_BYTES_PER_WIDTH = 4


class ProcessMemory(NamedTuple):
    """A training process's GPU memory by part, in bytes; `total` is their sum."""

    teacher: int  # the whole teacher, or its output head alone when its outputs are cached
    student: int  # the trained student: fp32 weights, gradients, AdamW moments (and its bf16 copy under autocast)
    members: int  # the frozen members of the last round
    activations: int  # what the student's forward keeps for backward, at a full micro-batch
    loss_chunk: int  # the chunked loss at one chunk of supervised positions

    @property
    def total(self) -> int:
        return sum(self)


def predicted_cache_bytes(bytes_per_position: int, positions: int, examples: int) -> int:
    """positions x bytes_per_position + 16 B per example: a teacher cache of `positions` supervised positions in
    `examples` examples. Left out: the few KiB of .npy headers and JSON records."""
    return positions * bytes_per_position + examples * INDEX_BYTES_PER_EXAMPLE


def estimated_supervised_positions(examples: int, max_length: int) -> int:
    """examples x max_length x ASSUMED_SUPERVISED_SHARE: the supervised positions of data not yet prepared."""
    return round(examples * max_length * ASSUMED_SUPERVISED_SHARE)


def layer_activation_bytes_per_token(shape: ModelShape, bf16: bool) -> int:
    """a * hidden + b * MLP width + c * (attention width + key/value width): what one decoder layer keeps for
    backward per token (LAYER_ACTIVATION_BYTES)."""
    a, b, c = LAYER_ACTIVATION_BYTES["bf16" if bf16 else "fp32"]
    return (a * shape.hidden_size + b * shape.intermediate_size
            + c * (shape.attention_width + shape.key_value_width))


def activation_bytes(shape: ModelShape, tokens: int, gradient_checkpointing: bool, bf16: bool) -> int:
    """What the trained model's forward over `tokens` keeps for backward:
        tokens x layers x layer                                   without gradient checkpointing
        tokens x (layers x 4 x hidden + layer)                    with it: every layer's fp32 input, and one layer
                                                                  rebuilt at a time
    with layer = layer_activation_bytes_per_token."""
    layer = layer_activation_bytes_per_token(shape, bf16)
    if gradient_checkpointing:
        return tokens * (shape.num_layers * LAYER_INPUT_BYTES_PER_WIDTH * shape.hidden_size + layer)
    return tokens * shape.num_layers * layer


def predicted_memory_per_process(student: ModelShape, teacher: ModelShape, *, whole_teacher: bool,
                                 members: Sequence[ModelShape], batch_size: int, max_length: int,
                                 gradient_checkpointing: bool, loss_chunk_size: int, bf16: bool) -> ProcessMemory:
    """The GPU memory of a process training the last round's student through its frozen `members`:
        teacher     = teacher parameters (whole_teacher) or its head's V x H x frozen bytes
        student     = student parameters x (16 + 2 under bf16 autocast)
        members     = sum of members' parameters x frozen bytes
        activations = activation_bytes at batch_size x max_length tokens (a micro-batch padded to the full length)
        loss_chunk  = loss_chunk_size (0: a whole micro-batch's positions) x the student's vocabulary x 33
    with frozen bytes 2 in bf16 (which also means the student trains under bf16 autocast), else 4."""
    frozen_bytes = 2 if bf16 else 4
    teacher_weights = teacher.parameters if whole_teacher else teacher.head_parameters
    student_bytes = STUDENT_BYTES_PER_PARAMETER + (AUTOCAST_COPY_BYTES_PER_PARAMETER if bf16 else 0)
    tokens = batch_size * max_length
    return ProcessMemory(
        teacher=teacher_weights * frozen_bytes, student=student.parameters * student_bytes,
        members=sum(member.parameters for member in members) * frozen_bytes,
        activations=activation_bytes(student, tokens, gradient_checkpointing, bf16),
        loss_chunk=(loss_chunk_size or tokens) * student.vocab_size * LOSS_BYTES_PER_LOGIT)
