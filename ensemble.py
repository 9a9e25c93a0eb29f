"""ModelEnsemble: a frozen set of causal LMs that predicts with the combination of its members' logits.

The same `combine_logits` primitive is used by training (the loss through the mixture), evaluation and generation,
so all three agree on what "the ensemble" means. `ModelEnsemble` is a Hugging Face model: `generate` works on it, and
`save_pretrained` stores each member as a standalone model folder, and this module's own code beside them, so that
the folder loads without this project (`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`).
Loading checks the ensemble's folder and each member's against its checksums.json, where it has one, before any
weights are read: a damaged file is refused by name (checksums.DamagedFolderError), in the project or out of it.
"""

import contextlib
import copy
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedConfig,
                          PreTrainedModel)
from transformers.cache_utils import Cache, DynamicCache
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from checksums import check_intact
from model_io import IGNORE_INDEX, cut_to_vocab, hidden_at, output_head

COMBINE_MODES = ("logits", "probs", "weighted", "additive")
WEIGHTED_MODES = ("weighted", "additive")  # combinations with one coefficient per member

# A saved ensemble's folder holds this module as MODELLING_FILE, and its config.json names the classes in it, so that
# Hugging Face's Auto classes load the folder with trust_remote_code=True where this project is not installed.
MODELLING_MODULE = "modeling_slm_ensemble"
MODELLING_FILE = f"{MODELLING_MODULE}.py"
AUTO_MAP = {"AutoConfig": f"{MODELLING_MODULE}.EnsembleConfig",
            "AutoModelForCausalLM": f"{MODELLING_MODULE}.ModelEnsemble"}
# What a refusal of a damaged saved folder (checksums.check_intact) tells its reader to do.
DAMAGED_ADVICE = ("restore the folder from an intact copy (its checksums.json records each file's size and sha256 as "
                  "it was saved), or train the ensemble again")


def combine_logits(logits: Sequence[torch.Tensor], mode: str = "logits",
                   weights: Sequence[float | torch.Tensor] | None = None) -> torch.Tensor:
    """Combine members' logits (each [..., V]) into the mixture's logits, in fp32.

    - "logits": the mean of the logits, z_mix = (z_1 + ... + z_K) / K (a normalised geometric mean of probabilities).
    - "probs": the mean of the probabilities, returned as log-probabilities:
      log p_mix = logsumexp_k log p_k - log K. Log-probabilities are valid logits (softmax gives p_mix back).
    - "weighted" and "additive": z_mix = w_1 z_1 + ... + w_K z_K with one coefficient per member (`weights`).
      Weighted ensembles fit each new member's weight (the weights sum to 1); additive ones add each new member's
      logits with coefficient eta on top of the earlier ones (boosting in logit space).
    """
    if not logits:
        raise ValueError("combine_logits needs at least one member's logits")
    if mode in WEIGHTED_MODES:
        if weights is None or len(weights) != len(logits):
            raise ValueError(f"combine={mode!r} needs one weight per member: got {weights!r} for {len(logits)}")
        total = weights[0] * logits[0].float()
        for weight, z in zip(weights[1:], logits[1:]):
            total = total + weight * z.float()
        return total
    if mode == "logits":
        total = logits[0].float()
        for z in logits[1:]:
            total = total + z.float()
        return total / len(logits)
    if mode == "probs":
        log_probs = torch.stack([torch.log_softmax(z.float(), dim=-1) for z in logits])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(logits))
    raise ValueError(f"unknown ensemble combine mode {mode!r}: use one of {COMBINE_MODES}")


def training_mixture_weights(combine: str, previous_weights: Sequence[float], eta: float) -> tuple[float, ...] | None:
    """The coefficients of (new student, member_1, ..., member_n) in a round's loss; None for unweighted modes.

    weighted: the student trains at the share an average would give it, 1/(n+1), the earlier members keep their
    fitted proportions; its real weight is fitted after training. additive: the student is added with eta on top
    of the earlier members (a first student has nothing to add to, and gets 1).
    """
    if combine not in WEIGHTED_MODES:
        return None
    if not previous_weights:
        return (1.0,)
    if combine == "weighted":
        share = 1.0 / (len(previous_weights) + 1)
        return (share, *((1 - share) * w for w in previous_weights))
    return (eta, *previous_weights)


def weights_with_new_member(combine: str, previous_weights: Sequence[float], new_weight: float) -> list[float] | None:
    """The ensemble's coefficients once the new member joins with `new_weight` (weighted: the others shrink by
    1 - new_weight, so the weights still sum to 1; additive: the others stay)."""
    if combine not in WEIGHTED_MODES:
        return None
    if combine == "weighted":
        return [*((1 - new_weight) * w for w in previous_weights), new_weight]
    return [*previous_weights, new_weight]


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of labels[:, t + 1] under logits[:, t], over positions not labelled IGNORE_INDEX."""
    predictions = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = labels[:, 1:].to(logits.device).reshape(-1)
    return F.cross_entropy(predictions, targets, ignore_index=IGNORE_INDEX)


class EnsembleConfig(PreTrainedConfig):
    """Configuration of a ModelEnsemble: where its members are saved, and how their predictions are combined.

    - member_subfolders: one folder per member, relative to the ensemble's folder, each a standalone Hugging Face model.
    - combine: one of COMBINE_MODES (see `combine_logits`).
    - weights: one coefficient per member for the weighted and additive modes (None for the others).
    - vocab_size: the shared tokenizer's vocabulary. Members' logits are cut to it, because real models pad their
      embedding matrices to different sizes (Qwen2.5-7B has 152,064 rows, Qwen2.5-0.5B 151,936). None: no cut, and
      all members must then produce logits of the same width.
    """

    model_type = "slm_ensemble"

    member_subfolders: list[str] = field(default_factory=list)
    combine: str = "logits"
    vocab_size: int | None = None
    weights: list[float] | None = None

    def __post_init__(self, **kwargs):
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"unknown ensemble combine mode {self.combine!r}: use one of {COMBINE_MODES}")
        if self.combine in WEIGHTED_MODES and self.weights is None:
            raise ValueError(f"combine={self.combine!r} needs `weights`, one per member")
        super().__post_init__(**kwargs)


# Known to AutoConfig, so that loaders reading any folder's config.json through it recognise an ensemble's: unknown,
# AutoTokenizer.from_pretrained(ensemble folder) falls back to the bare PreTrainedConfig, whose model_type is "", and
# warns "You are using a model of type `slm_ensemble` to instantiate a model of type ``". The first class registered
# keeps the name: a saved folder's copy of this module (MODELLING_FILE), loaded later with trust_remote_code, must not
# take it from the project's own, whose code checks AutoConfig's answers with isinstance.
if EnsembleConfig.model_type not in CONFIG_MAPPING:
    AutoConfig.register(EnsembleConfig.model_type, EnsembleConfig)


class NotAnEnsembleError(ValueError):
    """A folder given as a saved ensemble holds something else: a single model's folder, or no member at all."""


class EnsembleCache(Cache):
    """The KV caches of an ensemble's members, one per member: each member reads and extends only its own.

    Generation's bookkeeping (sequence length, cropping, beam reordering, ...) acts on the concatenation of the
    members' cache layers, so the inherited `Cache` methods apply to every member's cache at once.
    """

    def __init__(self, member_caches: Sequence[Cache]):
        # `Cache.__init__` is not called: this cache owns no layers, `layers` is a view of the members' layers.
        self.member_caches = list(member_caches)

    @classmethod
    def for_members(cls, members: Sequence[PreTrainedModel]) -> "EnsembleCache":
        """Empty dynamic caches, each laid out for its member's own architecture."""
        return cls([DynamicCache(config=member.config) for member in members])

    @property
    def layers(self) -> list:
        """All members' cache layers, member after member."""
        return [layer for cache in self.member_caches for layer in cache.layers]

    @property
    def is_compileable(self) -> bool:
        # For a compileable cache, `prepare_inputs_for_generation` builds one 4D attention mask from the ensemble's
        # config; members have architectures of their own and must each build their mask from the 2D one.
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(member_caches={self.member_caches})"


class ModelEnsemble(PreTrainedModel, GenerationMixin):
    """A frozen ensemble of causal LMs that predicts with `combine_logits` of its members' logits.

    Members may be any `AutoModelForCausalLM` sharing one tokenizer, each on its own device: inputs are moved to each
    member, logits come back to the first member's device (the ensemble's `device`). `generate` works as for any
    Hugging Face model; every member keeps its own KV cache (an `EnsembleCache`).

    `concurrent`: whether the members' forwards (and output heads) run at once, one thread per member, the
    combination waiting only for the slowest. None (the default) decides by placement: at once when the members sit
    on more than one device (one GPU each, say), one after another when they share one, where threads would only
    compete for it. Every path (forward and generation, `member_hidden_states` and `logits_from_hidden` for scoring
    and lm-eval) runs the same way, and both ways give the same numbers.
    """

    config_class = EnsembleConfig
    main_input_name = "input_ids"

    def __init__(self, config: EnsembleConfig, members: Sequence[PreTrainedModel] | None = None,
                 concurrent: bool | None = None):
        super().__init__(config)
        members = list(members or [])
        if len(members) != len(config.member_subfolders):
            raise ValueError(
                f"{len(members)} members given for {len(config.member_subfolders)} subfolders in the config"
            )
        self.members = nn.ModuleList()
        self._member_threads: ThreadPoolExecutor | None = None  # started on first concurrent use, one per member
        for member in members:
            self._attach(member)
        self.concurrent = concurrent
        # No `post_init()`: the ensemble has no weights of its own to initialise or tie, and its members were
        # initialised (or loaded) on their own.

    @classmethod
    def from_members(
        cls, members: Sequence[PreTrainedModel], combine: str = "logits", vocab_size: int | None = None,
        weights: Sequence[float] | None = None, concurrent: bool | None = None,
    ) -> "ModelEnsemble":
        """An ensemble of the given models, saved later in subfolders member_0, member_1, ...

        `weights`: one coefficient per member, for combine="weighted" or "additive".
        """
        weights = None if weights is None else [float(w) for w in weights]
        if weights is not None and len(weights) != len(members):
            raise ValueError(f"{len(weights)} weights for {len(members)} members")
        ensemble = cls(EnsembleConfig(combine=combine, vocab_size=vocab_size, weights=weights), concurrent=concurrent)
        for member in members:
            ensemble._attach(member)
            ensemble.config.member_subfolders.append(f"member_{len(ensemble) - 1}")
        return ensemble

    def add_model(self, model: PreTrainedModel, weight: float | None = None) -> None:
        """Append a member (frozen, in eval mode), saved later in the next `member_<i>` subfolder.

        Weighted and additive ensembles need the new member's `weight` (other weights are left as they are).
        """
        if self.config.combine in WEIGHTED_MODES:
            if weight is None:
                raise ValueError(f"combine={self.config.combine!r}: add_model needs the new member's weight")
            self.config.weights.append(float(weight))
        self._attach(model)
        self.config.member_subfolders.append(f"member_{len(self) - 1}")

    def _attach(self, member: PreTrainedModel) -> None:
        member.requires_grad_(False)
        member.eval()
        if not self.members:
            # Generation defaults (special tokens, sampling settings) follow the first member, so that an ensemble
            # generates like its members do.
            self.generation_config = copy.deepcopy(member.generation_config)
        self.members.append(member)
        if self._member_threads is not None:  # one thread too few now
            self._member_threads.shutdown(wait=False)
            self._member_threads = None

    def __len__(self) -> int:
        return len(self.members)

    def train(self, mode: bool = True) -> "ModelEnsemble":
        """Stay in eval mode whatever `mode` asks: the ensemble is a frozen inference object (no dropout, ever)."""
        return super().train(False)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: EnsembleCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **member_kwargs,
    ) -> CausalLMOutputWithPast:
        """Combined logits of all members (fp32, cut to `config.vocab_size`) and, with `labels`, their next-token NLL.

        `cache` (alias `past_key_values`) is an `EnsembleCache`; with `use_cache` and no cache, a new one is started.
        `use_cache` defaults to whether a cache was passed: a plain forward (training, evaluation) builds no cache.
        Other keyword arguments go to every member's forward.
        """
        if use_cache is None:
            use_cache = cache is not None
        if use_cache and cache is None:
            cache = EnsembleCache.for_members(self.members)
        logits = self.member_logits(
            input_ids, attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache,
            logits_to_keep=logits_to_keep, **member_kwargs,
        )
        combined = self.combined(logits)
        loss = next_token_nll(combined, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=combined, cache=cache)

    def combined(self, member_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The ensemble's logits from its members' (`combine_logits` with the config's mode and weights): the one
        place a prediction is combined, so that an ensemble spread over processes (distributed_ensemble.py) changes
        only this step."""
        return combine_logits(member_logits, self.config.combine, self.config.weights)

    def member_logits(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: EnsembleCache | None = None,
        **member_kwargs,
    ) -> list[torch.Tensor]:
        """Each member's logits, cut to `config.vocab_size`, on the first member's device.

        Other keyword arguments (e.g. `position_ids`) go to every member's forward.
        """
        if cache is not None and not isinstance(cache, EnsembleCache):
            raise TypeError(f"an ensemble needs an EnsembleCache (one cache per member), got {type(cache).__name__}")
        member_caches = cache.member_caches if cache is not None else [None] * len(self)
        logits = self.for_each_member(
            lambda member, member_cache: self._cut_to_vocab(
                self._run_member(member, member_cache, input_ids, attention_mask, **member_kwargs)),
            member_caches)
        return _same_width(logits)

    def member_hidden_states(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor,
                             positions: torch.Tensor) -> list[torch.Tensor]:
        """Each member's final hidden states [N, H_k] at the True entries of `positions` [B, L] (model_io.hidden_at),
        on the member's own device: what `logits_from_hidden` turns into the combined logits a chunk at a time."""
        return self.for_each_member(lambda member: hidden_at(member, input_ids, attention_mask, positions))

    def logits_from_hidden(self, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """The combined logits [n, V] (fp32, on the ensemble's device) at n positions, from each member's final
        hidden states [n, H_k] there: each member's output head (model_io.output_head, cut to `config.vocab_size`),
        then `combine_logits`. Equal to `forward`'s logits at those positions, but only n x V of them are made."""
        return self.combined(self.member_head_logits(hidden))

    def member_head_logits(self, hidden: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each member's logits [n, V] (cut to `config.vocab_size`, on the ensemble's device) from its final hidden
        states [n, H_k] (`member_hidden_states`): what `combined` turns into the ensemble's."""
        logits = self.for_each_member(
            lambda member, states: output_head(member, self.config.vocab_size)(states).to(self.device), hidden)
        return _same_width(logits)

    def runs_members_concurrently(self) -> bool:
        """Whether `for_each_member` runs the members at once: as `concurrent` says, else when they sit on more
        than one device."""
        if self.concurrent is not None:
            return self.concurrent and len(self) > 1
        return len({member.device for member in self.members}) > 1

    def for_each_member(self, work: Callable, *per_member: Sequence) -> list:
        """[work(member, *its entries of per_member) for each member], in member order: one after another, or at
        once, one thread per member (`runs_members_concurrently`).

        A thread starts with autograd's defaults, so each runs in its caller's grad and inference modes (generation's
        no_grad must hold there too), and with its member's GPU as the current device."""
        calls = list(zip(self.members, *per_member, strict=True))
        if not self.runs_members_concurrently():
            return [work(*call) for call in calls]
        grad_enabled, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def in_callers_modes(call):
            device = call[0].device
            with (torch.inference_mode(inference), torch.set_grad_enabled(grad_enabled),
                  torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()):
                return work(*call)

        return list(self._threads().map(in_callers_modes, calls))

    def _threads(self) -> ThreadPoolExecutor:
        """One thread per member, kept for the next call (a decoding step is too short to start threads in)."""
        if self._member_threads is None:
            self._member_threads = ThreadPoolExecutor(max_workers=len(self), thread_name_prefix="ensemble-member")
        return self._member_threads

    def _run_member(
        self,
        member: PreTrainedModel,
        member_cache: Cache | None,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None = None,
        **member_kwargs,
    ) -> torch.Tensor:
        """One member's logits, computed on its own device and brought back to the ensemble's device."""
        device = member.device
        output = member(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device) if attention_mask is not None else None,
            position_ids=position_ids.to(device) if position_ids is not None else None,
            cache=member_cache,
            **member_kwargs,
        )
        return output.logits.to(self.device)

    def _cut_to_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """A member's logits cut to `config.vocab_size` (model_io.cut_to_vocab); uncut when it is None."""
        vocab_size = self.config.vocab_size
        return logits if vocab_size is None else cut_to_vocab(logits, vocab_size)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # `generate` must not start a single DynamicCache laid out from the ensemble's config: `forward` starts an
        # EnsembleCache (one cache per member) itself.
        return False

    def save_pretrained(self, save_directory: str | os.PathLike, tokenizer=None, **member_save_kwargs) -> None:
        """Save each member as a standalone Hugging Face model in its subfolder, then the ensemble's configs.

        Keyword arguments (e.g. `max_shard_size`) go to every member's `save_pretrained`.
        """
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        for member, subfolder in zip(self.members, self.config.member_subfolders, strict=True):
            member.save_pretrained(save_directory / subfolder, **member_save_kwargs)
        self.save_configs(save_directory, tokenizer)

    def save_configs(self, save_directory: str | os.PathLike, tokenizer=None) -> None:
        """Write the ensemble's own files (config, generation config, tokenizer, and its code: `modelling_code`,
        named in config.json's auto_map), for members saved already.

        Training saves each member once, when its round ends; this completes the folder without rewriting them. The
        files are written to a staging folder inside it, then moved into place one by one: a write that fails (a full
        disk) leaves the files saved before as they were, never a config of the new members beside half a tokenizer.
        """
        save_directory = Path(save_directory)
        missing = [s for s in self.config.member_subfolders if not (save_directory / s / "config.json").is_file()]
        if missing:
            raise FileNotFoundError(f"{save_directory}: member folder(s) {missing} are not saved yet")
        staging = save_directory / ".configs.tmp"
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed
        try:
            config = copy.deepcopy(self.config)
            config.auto_map = AUTO_MAP
            config.save_pretrained(staging)
            for name, code in modelling_code().items():
                (staging / name).write_text(code)
            self.generation_config.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            for path in staging.iterdir():
                os.replace(path, save_directory / path.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *, config: EnsembleConfig | None = None,
        device_map=None, concurrent: bool | None = None, subfolder: str | None = None, **member_load_kwargs
    ) -> "ModelEnsemble":
        """Load an ensemble saved by `save_pretrained`, each member with `AutoModelForCausalLM.from_pretrained`, once
        the ensemble's folder and every member's are found intact against their checksums.json, where they have one
        (else DamagedFolderError, naming the file).

        `config`: the ensemble's config, when read already (AutoModelForCausalLM passes the one it read); None reads
        the folder's. `device_map` applies to every member, or is a list with one entry per member (e.g. one GPU
        each: the members then run at once, see `concurrent` in the class's docstring). Other keyword arguments (e.g.
        `dtype`, or a Hub repository's `revision`) go to every member's `from_pretrained`. `subfolder`: where the
        ensemble's folder is inside `pretrained_model_name_or_path` (a Hub repository's subfolder; callers such as
        lm-eval's HF backend pass "" for none), its members' folders then within it.
        """
        member_load_kwargs.setdefault("use_safetensors", True)  # never unpickle weights
        inside = f"{subfolder.strip('/')}/" if subfolder else ""
        folder = Path(pretrained_model_name_or_path) / inside
        check_intact(folder, DAMAGED_ADVICE)  # a local folder; a hub name has no record
        revision = {"revision": member_load_kwargs["revision"]} if member_load_kwargs.get("revision") else {}
        if config is None:
            config = saved_ensemble_config(pretrained_model_name_or_path, subfolder=inside, **revision)
        for member_subfolder in config.member_subfolders:  # all of them, before any member's weights are read
            check_intact(folder / member_subfolder, DAMAGED_ADVICE)
        device_maps = _one_per_member(device_map, len(config.member_subfolders))
        members = [
            AutoModelForCausalLM.from_pretrained(
                pretrained_model_name_or_path, subfolder=inside + member_subfolder, device_map=member_device_map,
                **member_load_kwargs
            )
            for member_subfolder, member_device_map in zip(config.member_subfolders, device_maps, strict=True)
        ]
        ensemble = cls(config, members, concurrent=concurrent)
        ensemble.generation_config = saved_generation_config(pretrained_model_name_or_path, ensemble.generation_config,
                                                             subfolder=inside, **revision)
        return ensemble


def saved_generation_config(folder: str | os.PathLike, built: GenerationConfig, subfolder: str = "",
                            **revision) -> GenerationConfig:
    """The generation config saved with the ensemble in `folder` (a local folder or a hub name); for a local folder
    saved without one (a study's records kept before they kept it), `built`: the one the ensemble was built with,
    its first member's."""
    local = Path(folder) / subfolder
    if local.is_dir() and not (local / "generation_config.json").is_file():
        return built
    return GenerationConfig.from_pretrained(folder, subfolder=subfolder, **revision)


def _same_width(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """Members' logits, refused when their widths differ (padded heads and no config vocab_size to cut them to)."""
    widths = {z.shape[-1] for z in logits}
    if len(widths) > 1:
        raise ValueError(f"members' logits have different widths {sorted(widths)}: set the config's vocab_size")
    return logits


def load_member(folder: str | os.PathLike, subfolder: str = "", **load_kwargs) -> PreTrainedModel:
    """One saved member (or any causal LM's folder, in `subfolder` of `folder`) with
    `AutoModelForCausalLM.from_pretrained`, from safetensors only, once its folder is found intact against its
    checksums.json, where it has one (else DamagedFolderError, naming the file). Keyword arguments go to
    `from_pretrained`."""
    check_intact(Path(folder) / subfolder, DAMAGED_ADVICE)
    load_kwargs.setdefault("use_safetensors", True)  # never unpickle weights
    return AutoModelForCausalLM.from_pretrained(folder, subfolder=subfolder, **load_kwargs)


def saved_ensemble_config(folder: str | os.PathLike, **location) -> EnsembleConfig:
    """The EnsembleConfig saved in `folder` (`location`: a Hub repository's subfolder or revision); NotAnEnsembleError
    when its config.json is another model's (a member's folder, say) or lists no member folder."""
    config_dict, _ = EnsembleConfig.get_config_dict(folder, **location)  # no unused keyword comes back from these
    model_type = config_dict.get("model_type")
    if model_type != EnsembleConfig.model_type:
        raise NotAnEnsembleError(
            f"{folder}: not a saved ensemble: its config.json has model_type {model_type!r}, where an ensemble's has "
            f"{EnsembleConfig.model_type!r} and lists its member folders (load a single model with "
            "AutoModelForCausalLM.from_pretrained)")
    config = EnsembleConfig.from_dict(config_dict)
    if not config.member_subfolders:
        raise NotAnEnsembleError(f"{folder}: the ensemble's config.json lists no member folder (member_subfolders)")
    return config


def modelling_code() -> dict[str, str]:
    """The Python files a saved ensemble's folder needs to load without this project, by file name: this module as
    MODELLING_FILE, with its imports of model_io and checksums made relative (transformers loads a folder's code as
    a package), and those two modules beside it. Read from the running sources at every save, so the folder's code
    never drifts from them."""
    imported = [Path(sys.modules[function.__module__].__file__) for function in (cut_to_vocab, check_intact)]
    own_code = Path(__file__).read_text()
    for module_file in imported:
        # Loaded from a saved folder, this module is MODELLING_FILE and its imports are relative already: no change.
        own_code = re.sub(rf"^from {module_file.stem} import ", f"from .{module_file.stem} import ", own_code,
                          flags=re.MULTILINE)
    return {MODELLING_FILE: own_code, **{module_file.name: module_file.read_text() for module_file in imported}}


def _one_per_member(device_map, member_count: int) -> list:
    """A list of `member_count` device maps: the given list, or one shared device map repeated."""
    if not isinstance(device_map, (list, tuple)):
        return [device_map] * member_count
    if len(device_map) != member_count:
        raise ValueError(f"{len(device_map)} device maps given for {member_count} members")
    return list(device_map)
