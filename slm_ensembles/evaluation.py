"""Held-out evaluation of the teacher, single students and ensembles, on exactly the tokens the loss trains on.

Every model is scored at the supervised positions of the test split (position t predicting token t+1), with
numbers that mean the same for every model:
    ce              mean next-token cross-entropy, nats per supervised token
    perplexity      exp(ce)
    kl_teacher      mean KL(p_teacher || p_model) at T = 1, nats per supervised token
    top1_agreement  share of positions where the model's argmax equals the teacher's
    ece             expected calibration error of the top-1 prediction against the true next token (15 bins)
    diversity       mean KL(p_i || p_j) over ordered pairs of an ensemble's members, nats per token (0: one model)
The share of the teacher gap closed is computed from these by main.py (it needs the untrained student's CE).

The teacher is a model, or a `CachedTeacher`: the model with its final hidden states on the evaluated splits read
from hidden-mode teacher caches (teacher_cache.py), so that evaluating runs only its output head, never its body.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from accelerate.utils import reduce
from torch.utils.data import DataLoader

from ensemble import combine_logits
from model_io import hidden_at, output_head
from slm_ensembles.answer_text import shown_answer
from slm_ensembles.losses import next_token_targets, predictor_mask
from slm_ensembles.teacher_cache import TeacherCache, evaluation_caches, with_example_ids


ECE_BINS = 15  # equal-width confidence bins of the expected calibration error
# Per-predictor sums, one float64 vector each: CE, KL to the teacher, top-1 agreement, member diversity, then the
# ECE bins' counts, summed confidences and correct top-1 predictions.
CE, KL, AGREE, DIVERSITY, BINS = 0, 1, 2, 3, 4
NUM_SUMS = BINS + 3 * ECE_BINS


@dataclasses.dataclass(frozen=True)
class CachedTeacher:
    """The teacher, with its final hidden states on some splits cached (hidden mode, one cache per split)."""

    model: torch.nn.Module  # its output head turns the cached states into logits
    caches: tuple[TeacherCache, ...]

    def cache_for(self, dataset) -> TeacherCache:
        """The cache of `dataset` (the split as prepared, before with_example_ids), found by its fingerprint."""
        for cache in self.caches:
            if cache.metadata["dataset_fingerprint"] == dataset._fingerprint:
                return cache
        cached = ", ".join(str(cache.cache_dir) for cache in self.caches) or "none"
        raise ValueError(f"no teacher cache holds the split being evaluated (fingerprint {dataset._fingerprint}; "
                         f"cached splits: {cached}): cache it (hidden mode) or evaluate with the teacher model")


def evaluation_teacher(config, teacher, load_teacher, train_cache: TeacherCache | None, data: dict, collator,
                       state):
    """The teacher as a run's evaluation and weight fit get it: with a cached teacher_mode (a `train_cache`), the
    model with its final hidden states on the held-out splits of `data` cached once (teacher_cache.py), so that
    no round runs its body again (`load_teacher()` gives the whole teacher to build them); with the online teacher,
    the model."""
    if train_cache is None:
        return teacher
    held_out = {name: split for name, split in data.items() if name != "train"}
    return CachedTeacher(teacher, evaluation_caches(config, load_teacher, train_cache, held_out, collator, state))


@torch.no_grad()
def evaluate(predictors: dict[str, list], teacher, dataset, collator, batch_size: int, vocab_size: int,
             combine: str = "logits", chunk_size: int = 1024, state=None,
             weights: dict[str, list[float]] | None = None) -> dict[str, dict[str, float]]:
    """Metrics for each named predictor: a list of models whose logits are combined (one model = itself).

    `teacher` is the teacher model or a CachedTeacher holding a cache of `dataset`; in the second case the teacher's
    body never runs, also where it is one of the predictors. `weights` gives the coefficients of predictors combined
    by a weighted or additive `combine`. Each distinct model's body runs once per batch, however many predictors
    share it (an ensemble and its members); the output heads run on `chunk_size` positions at a time, so no
    (positions x vocabulary) tensor larger than a chunk is held, even at a 151,936-token vocabulary.

    With several processes (`state`, an accelerate PartialState), each scores its own contiguous shard of the
    split and the sums are added up: every example is scored exactly once, nothing is dropped or repeated, and
    every process returns the same numbers as one process would.
    """
    weights = weights or {}
    teacher_model, teacher_states = teacher, None
    if isinstance(teacher, CachedTeacher):
        teacher_model, teacher_states = teacher.model, teacher.cache_for(dataset)
        dataset = with_example_ids(dataset)  # the key the cache is read with; kept through sharding
    models = {id(model): model for members in predictors.values() for model in members}
    models[id(teacher_model)] = teacher_model
    cached = {} if teacher_states is None else {id(teacher_model): teacher_states}
    # The sums stay on the teacher's device until the end: no host sync per chunk and predictor.
    device = next(teacher_model.parameters()).device
    sums = {name: torch.zeros(NUM_SUMS, dtype=torch.float64, device=device) for name in predictors}
    num_tokens = 0
    for logits, targets in chunk_logits(models, dataset, collator, batch_size, vocab_size, chunk_size, state, cached):
        add_chunk_metrics(sums, predictors, logits, logits[id(teacher_model)], targets, combine, weights)
        num_tokens += len(targets)
        del logits
    if state is not None and state.num_processes > 1:
        sums, num_tokens = sum_over_processes(sums, num_tokens)
    if num_tokens == 0:
        raise ValueError("the evaluation split has no supervised token to score")
    return {name: metrics_from_sums(s.cpu(), num_tokens) for name, s in sums.items()}


@torch.no_grad()
def mixture_ce(members: list, dataset, collator, batch_size: int, vocab_size: int, combine: str = "logits",
               chunk_size: int = 1024, state=None, weights: list[float] | None = None) -> float:
    """The CE of `members` combined, the number `evaluate` gives such a predictor, bit for bit (the same chunks,
    sums and order), without the teacher or the other metrics: what early stopping reads at every evaluation. The
    teacher's head, its KL and the members' pairwise KL cost more than the small members' own forwards."""
    models = {id(model): model for model in members}
    device = next(members[0].parameters()).device
    sums = {"mixture": torch.zeros(NUM_SUMS, dtype=torch.float64, device=device)}
    num_tokens = 0
    for logits, targets in chunk_logits(models, dataset, collator, batch_size, vocab_size, chunk_size, state):
        member_logits = [logits[id(model)].to(device) for model in members]
        log_probs = F.log_softmax(combine_logits(member_logits, combine, weights), dim=-1)
        sums["mixture"][CE] += F.nll_loss(log_probs, targets.to(device), reduction="sum")
        num_tokens += len(targets)
        del logits, member_logits, log_probs
    if state is not None and state.num_processes > 1:
        sums, num_tokens = sum_over_processes(sums, num_tokens)
    if num_tokens == 0:
        raise ValueError("the evaluation split has no supervised token to score")
    return sums["mixture"][CE].item() / num_tokens


def chunk_logits(models: dict, dataset, collator, batch_size: int, vocab_size: int, chunk_size: int, state=None,
                 cached: dict | None = None):
    """Each chunk of at most `chunk_size` supervised positions of `dataset`, in order: every model's logits there
    (by key, in the model's dtype) and the targets. Models are put in eval mode; each body runs once per batch,
    except a model `cached` gives a TeacherCache for (its cached hidden states are read instead). With several
    processes (`state`), this process's contiguous shard of the split."""
    cached = cached or {}
    for model in models.values():
        model.eval()
    if state is not None and state.num_processes > 1:
        dataset = dataset.shard(state.num_processes, state.process_index, contiguous=True)
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator):
        positions = predictor_mask(batch["labels"])
        if not positions.any():
            continue
        hidden = {key: cached_hidden_states(cached[key], batch, positions) if key in cached
                  else hidden_at(model, batch["input_ids"], batch["attention_mask"], positions)
                  for key, model in models.items()}
        heads = {key: output_head(model, vocab_size) for key, model in models.items()}
        targets = next_token_targets(batch["labels"])
        for start in range(0, len(targets), chunk_size):
            rows = slice(start, start + chunk_size)
            # In the heads' own dtype (bf16 frozen models: half the bytes); read as fp32 where used (exact).
            yield {key: heads[key](hidden[key][rows]) for key in models}, targets[rows]


def cached_hidden_states(cache: TeacherCache, batch: dict, positions: torch.Tensor) -> torch.Tensor:
    """The teacher's cached final hidden states [N, H] at the batch's supervised positions (`positions` [B, L])."""
    example_ids = batch["example_id"].tolist()
    states = cache.hidden_states(example_ids)
    cache.check_positions(len(states), example_ids, int(positions.sum()))
    return states


def metrics_from_sums(sums: torch.Tensor, num_tokens: int) -> dict[str, float]:
    """A predictor's metrics from its sums: every value a number, per supervised token where it is a mean."""
    ce = sums[CE].item() / num_tokens
    counts, confidences, correct = sums[BINS:].view(3, ECE_BINS)
    # ECE: the token-weighted mean over confidence bins of |accuracy - confidence| of the top-1 prediction.
    ece = (correct - confidences).abs().sum().item() / num_tokens
    return {"ce": ce, "perplexity": math.exp(min(ce, 700.0)), "kl_teacher": sums[KL].item() / num_tokens,
            "top1_agreement": sums[AGREE].item() / num_tokens, "ece": ece,
            "diversity": sums[DIVERSITY].item() / num_tokens, "num_tokens": num_tokens}


def add_chunk_metrics(sums: dict, predictors: dict[str, list], logits: dict, teacher_logits: torch.Tensor,
                      targets: torch.Tensor, combine: str, weights: dict[str, list[float]]) -> None:
    """Add one chunk of positions to every predictor's sums (see NUM_SUMS for what they hold).

    `logits` (by model id) may be in the models' dtype: every value is computed from them in fp32. Memory: a chunk
    holds each model's logits, the teacher's log-probabilities and, at a time, one predictor's (or one ensemble's
    members') fp32 (positions x vocabulary) tensors, each freed as soon as its sums are taken."""
    device = teacher_logits.device
    targets = targets.to(device)
    teacher_logits = teacher_logits.float()
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    teacher_top1 = teacher_logits.argmax(dim=-1)
    del teacher_logits  # an fp32 copy, unless the teacher's head is fp32
    diversity = {}  # per set of members: predictors that differ only in weights share it
    for name, members in predictors.items():
        member_logits = [logits[id(m)].to(device) for m in members]
        key = tuple(id(m) for m in members)
        if key not in diversity:
            diversity[key] = mean_pairwise_kl_sum(member_logits)
        log_probs = F.log_softmax(combine_logits(member_logits, combine, weights.get(name)), dim=-1)
        del member_logits
        total = sums[name]
        total[CE] += F.nll_loss(log_probs, targets, reduction="sum")  # = nll_sum(combined): its log_softmax
        total[KL] += kl_sum_no_grad(teacher_log_probs, log_probs)
        top1_log_prob, top1 = log_probs.max(dim=-1)
        del log_probs
        total[AGREE] += (top1 == teacher_top1).sum()
        total[DIVERSITY] += diversity[key]
        confidence = top1_log_prob.exp()
        bins = torch.clamp((confidence * ECE_BINS).long(), max=ECE_BINS - 1)
        total[BINS:BINS + ECE_BINS] += torch.bincount(bins, minlength=ECE_BINS)
        total[BINS + ECE_BINS:BINS + 2 * ECE_BINS] += torch.bincount(
            bins, weights=confidence.double(), minlength=ECE_BINS)
        total[BINS + 2 * ECE_BINS:] += torch.bincount(
            bins, weights=(top1 == targets).double(), minlength=ECE_BINS)


def kl_sum_no_grad(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """losses.kl_sum, bit for bit (the same products, summed alike), with one (positions x vocabulary) temporary
    fewer: the difference is multiplied by p in place. Without gradients only (evaluation)."""
    difference = log_p - log_q
    return torch.sum(difference.mul_(torch.exp(log_p)))


def mean_pairwise_kl_sum(member_logits: list[torch.Tensor]) -> torch.Tensor | float:
    """Sum over positions of the mean KL(p_i || p_j) over ordered pairs of distinct members (0 for one member), from
    the members' logits in any dtype (read as fp32)."""
    if len(member_logits) < 2:
        return 0.0
    log_probs = [F.log_softmax(z.float(), dim=-1) for z in member_logits]
    pairs = [(i, j) for i in range(len(log_probs)) for j in range(len(log_probs)) if i != j]
    return sum(kl_sum_no_grad(log_probs[i], log_probs[j]) for i, j in pairs) / len(pairs)


def sum_over_processes(sums: dict, num_tokens: int) -> tuple[dict, int]:
    """Every process's sums and token count added up (in float64, so the order of addition does not matter)."""
    names = list(sums)
    device = sums[names[0]].device
    local = torch.stack([sums[name] for name in names] + [torch.full((NUM_SUMS,), float(num_tokens),
                                                                     dtype=torch.float64, device=device)])
    total = reduce(local, reduction="sum")
    return {name: total[i] for i, name in enumerate(names)}, int(total[-1][0].item())


SAMPLE_PROMPTS = ("What is the capital of France?", "Give me three tips for a good night's sleep.",
                  "Write a short poem about the sea.", "Explain what a neural network is in two sentences.")


@torch.no_grad()
def sample_answers(models: dict, tokenizer, prompts, max_new_tokens: int) -> list[dict]:
    """Each named model's greedy answer to each prompt (a user turn in the tokenizer's chat template): rows of
    model, prompt, answer and new_tokens. An answer with no text (whitespace, end of turn) says so and lists its
    tokens (answer_text.shown_answer), rather than leaving an empty or blank cell."""
    rows = []
    for prompt in prompts:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        for name, model in models.items():
            inputs = inputs.to(next(model.parameters()).device)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
            new_tokens = output[0, inputs["input_ids"].shape[1]:]
            rows.append({"model": name, "prompt": prompt, "answer": shown_answer(tokenizer, new_tokens).strip(),
                         "new_tokens": len(new_tokens)})
    return rows


WEIGHT_GRID = tuple(i / 20 for i in range(21))  # candidate weights of a new member, 0 included


def fit_new_member_weight(previous: list, previous_weights: list[float], new_member, teacher, dataset, collator,
                          batch_size: int, vocab_size: int, state=None,
                          chunk_size: int = 1024) -> tuple[float, dict[float, float]]:
    """The weight w of a new member that minimises CE on `dataset` for the mixture (1 - w) * previous + w * new.

    A search over WEIGHT_GRID, all candidates scored in one pass. w = 0 (the previous ensemble unchanged) is a
    candidate, so the fitted ensemble is never worse than the previous one on `dataset`. Returns w and the CE of
    every candidate. `teacher` as for `evaluate`: with a CachedTeacher, the teacher's body does not run.
    """
    members = [*previous, new_member]
    names = {w: f"w={w:.2f}" for w in WEIGHT_GRID}
    results = evaluate({names[w]: members for w in WEIGHT_GRID}, teacher, dataset, collator, batch_size,
                       vocab_size, "weighted", chunk_size=chunk_size, state=state,
                       weights={names[w]: [*((1 - w) * p for p in previous_weights), w] for w in WEIGHT_GRID})
    ce = {w: results[names[w]]["ce"] for w in WEIGHT_GRID}
    return min(WEIGHT_GRID, key=ce.__getitem__), ce


def new_member_weight(config, members: list, weights: list[float] | None, student, teacher, weight_fit, collator,
                      vocab_size: int, state=None) -> float:
    """A run's new member's coefficient among `members` (with `weights`): fitted on the `weight_fit` split
    (combine=weighted, see fit_new_member_weight), eta (additive, after the first member), or 1. (Additive runs
    always train through the ensemble: the config refuses additive with the independent baseline.)"""
    if config.combine == "weighted" and members:
        weight, candidates = fit_new_member_weight(members, weights, student, teacher, weight_fit, collator,
                                                   config.eval_batch_size, vocab_size, state, config.eval_chunk_size)
        print(f"new member's weight {weight:.2f}: CE {candidates[weight]:.4f} on the weight-fit slice "
              f"(previous ensemble {candidates[0.0]:.4f})")
        return weight
    if config.combine == "additive" and members:
        return config.eta
    return 1.0
