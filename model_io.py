"""How the project reads a causal LM's outputs: its final hidden states and logits at chosen positions only (the
output head applied to the selected hidden states, with the model's own output transforms, cut to the tokenizer's
vocabulary), and how it pads a batch of tokenized examples (`PaddingCollator`, labels padded with IGNORE_INDEX).
"""

import torch
# transformers' unwrap is accelerate's where it is installed; this module also ships, beside the ensemble's code
# (ensemble.modelling_code), to places that have only torch and transformers.
from transformers.modeling_utils import unwrap_model

IGNORE_INDEX = -100  # the label of positions excluded from the loss, as in Hugging Face models (their losses skip it)


class PaddingCollator:
    """Pads a list of {"input_ids", "labels"} examples on the right, to the longest in the batch."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.as_tensor(example["input_ids"])
            labels[row, :n] = torch.as_tensor(example["labels"])
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if "example_id" in examples[0]:  # the row index a teacher cache is keyed by
            batch["example_id"] = torch.tensor([example["example_id"] for example in examples])
        return batch


def cut_to_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Drop logit columns beyond the tokenizer's vocabulary (padded embedding rows), never pad with zeros."""
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"a model produces {logits.shape[-1]} logits, narrower than the vocabulary ({vocab_size} "
                         "tokens): teacher, students and ensemble members must share one tokenizer")
    return logits[..., :vocab_size]


def hidden_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The model's final hidden states [N, H] (after its last norm) at the True entries of `positions` [B, L]."""
    device = next(model.parameters()).device
    hidden = model.base_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                              use_cache=False).last_hidden_state
    return hidden[positions.to(device)]


def trained_hidden_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
    """hidden_at for the model being trained, which the Trainer may have wrapped (DDP, FSDP).

    The wrapper's own forward must run: DDP arms its gradient all-reduce there, so calling the inner model directly
    would leave every process with its own, unsynchronised gradients. The final hidden states are read off the base
    model's output by a hook; the model's head runs on one position only (logits_to_keep=1) and is ignored.
    """
    base = unwrap_model(model).base_model
    captured = []
    hook = base.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        device = next(model.parameters()).device
        model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False,
              logits_to_keep=1)
    finally:
        hook.remove()
    return captured[-1][positions.to(device)]


class OutputHeadOnly(torch.nn.Module):
    """A causal LM's output head and config without its body: all a run needs of a teacher whose outputs on every
    split are cached (the head projects the cached hidden states; shapes and FLOPs come from the config), at a
    fraction of the teacher's memory. Running its body is an error."""

    def __init__(self, config, head: torch.nn.Module):
        super().__init__()
        self.config = config
        self.lm_head = head

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def forward(self, *args, **kwargs):
        raise RuntimeError("only the teacher's output head is loaded (its outputs are cached); nothing should run "
                           "its body: load the whole teacher (utils.load_causal_lm) for that")


def output_head(model, vocab_size: int | None):
    """hidden [n, H] -> logits [n, vocab_size]: the model's head, its output transforms, cut to the vocabulary
    (None: the head's full width, as the model's forward returns it)."""
    head = model.get_output_embeddings()

    def project(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(device=head.weight.device, dtype=head.weight.dtype)  # cached states are fp32
        logits = apply_logit_transforms(model.config, head(hidden))
        return logits if vocab_size is None else cut_to_vocab(logits, vocab_size)

    return project


def logits_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
              vocab_size: int) -> torch.Tensor:
    """The model's logits [N, vocab_size] at the True entries of `positions` [B, L] only.

    The body runs on the whole batch; the output head only on the selected hidden states, which saves the head's
    compute and the logits memory for every unsupervised position.
    """
    return output_head(model, vocab_size)(hidden_at(model, input_ids, attention_mask, positions))


def apply_logit_transforms(config, logits: torch.Tensor) -> torch.Tensor:
    """What some architectures do to the head's output inside forward (Cohere scales, Gemma soft-caps)."""
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def check_logits_at(model, vocab_size: int) -> None:
    """Refuse a model for which the selected-head path differs from its own forward (an unknown output transform)."""
    probe = torch.arange(1, 9).unsqueeze(0) % vocab_size
    mask = torch.ones_like(probe, dtype=torch.bool)
    with torch.no_grad():
        full = cut_to_vocab(model(input_ids=probe.to(model.device)).logits[0], vocab_size).float()
        selected = logits_at(model, probe, torch.ones_like(probe), mask, vocab_size).float()
    if not torch.allclose(full, selected, atol=1e-3, rtol=1e-3):
        raise ValueError(f"{type(model).__name__}: logits from its hidden states and output head differ from its "
                         "forward's; this architecture applies an output transform the trainer does not know")
