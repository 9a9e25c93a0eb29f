"""Tests of the ensemble: the combine primitive, forward and loss, vocabulary cutting, freezing, save/load, generate."""

import errno
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import build_diverse_member, damage_second_half, publish_to_hub_cache
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, MistralConfig,
                          MistralForCausalLM, pipeline)
from transformers.cache_utils import DynamicCache
from transformers.dynamic_module_utils import get_imports
from transformers.generation.streamers import BaseStreamer

import checksums
from checksums import DamagedFolderError
import ensemble as ensemble_module
from ensemble import (AUTO_MAP, MODELLING_FILE, EnsembleCache, EnsembleConfig, ModelEnsemble, NotAnEnsembleError,
                      combine_logits, load_member, training_mixture_weights, weights_with_new_member)
import model_io
from slm_ensembles import files

PROMPTS = ["Hello there, how are you", "What is the capital of France? Tell me"]


@pytest.fixture
def members(tokenizer):
    """Three members, the second with an embedding matrix padded beyond the tokenizer's vocabulary."""
    return [build_diverse_member(tokenizer, 0), build_diverse_member(tokenizer, 1, vocab_size=len(tokenizer) + 8),
            build_diverse_member(tokenizer, 2)]


@pytest.fixture
def prompt_ids(tokenizer):
    return tokenizer(PROMPTS[0], return_tensors="pt").input_ids


def new_tokens(sequences, prompt_ids):
    return sequences[:, prompt_ids.shape[1]:]


def slow_greedy_decode(members, input_ids, steps, mode, vocab_size):
    """Greedy decoding without any cache: every member reruns on the whole sequence at every step."""
    ids = input_ids
    for _ in range(steps):
        last_logits = [member(ids, use_cache=False).logits[:, -1, :vocab_size] for member in members]
        next_token = combine_logits(last_logits, mode).argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=-1)
    return ids


# --- combine_logits -----------------------------------------------------------------------------------------------


def test_combine_logits_mode_logits_is_the_mean_of_logits():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    b = torch.tensor([[3.0, 0.0, -1.0]])
    combined = combine_logits([a, b], "logits")
    torch.testing.assert_close(combined, torch.tensor([[2.0, 1.0, 1.0]]))
    torch.testing.assert_close(combine_logits([a, b]), combined)  # the default mode


def test_combine_logits_mode_probs_gives_the_mean_of_probabilities():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    b = torch.tensor([[3.0, 0.0, -1.0], [2.0, 2.0, 2.0]])
    combined = combine_logits([a, b], "probs")
    expected = (a.softmax(-1) + b.softmax(-1)) / 2
    torch.testing.assert_close(combined.softmax(-1), expected)
    # The result is already normalised: log-probabilities, not merely logits.
    torch.testing.assert_close(combined.exp().sum(-1), torch.ones(2))
    # Hand-computed first entry: log((e^1/(e^1+e^2+e^3) + e^3/(e^3+1+e^-1)) / 2).
    first = math.log((math.e / (math.e + math.e**2 + math.e**3) + math.e**3 / (math.e**3 + 1 + math.exp(-1))) / 2)
    assert combined[0, 0].item() == pytest.approx(first, rel=1e-5)


def test_combine_logits_returns_fp32_and_rejects_bad_input():
    half = [torch.ones(1, 3, dtype=torch.bfloat16)]
    assert combine_logits(half, "logits").dtype == torch.float32
    with pytest.raises(ValueError, match="unknown ensemble combine mode"):
        combine_logits(half, "median")
    with pytest.raises(ValueError, match="^combine_logits needs at least one member's logits$"):
        combine_logits([], "logits")


def test_config_rejects_unknown_combine_mode():
    with pytest.raises(ValueError, match="unknown ensemble combine mode"):
        EnsembleConfig(combine="vote")


# --- forward and loss ---------------------------------------------------------------------------------------------


def test_one_member_ensemble_forward_equals_the_member(tokenizer, tiny_llama, prompt_ids):
    ensemble = ModelEnsemble.from_members([tiny_llama], vocab_size=len(tokenizer))
    output = ensemble(prompt_ids)
    torch.testing.assert_close(output.logits, tiny_llama(prompt_ids).logits, rtol=0, atol=0)
    assert output.loss is None


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_forward_combines_members_logits(tokenizer, members, prompt_ids, mode):
    vocab_size = len(tokenizer)
    ensemble = ModelEnsemble.from_members(members, combine=mode, vocab_size=vocab_size)
    expected = combine_logits([member(prompt_ids).logits[..., :vocab_size] for member in members], mode)
    torch.testing.assert_close(ensemble(prompt_ids).logits, expected)


def test_loss_is_the_masked_next_token_nll_of_the_mean_logits(tokenizer, members):
    vocab_size = len(tokenizer)
    ensemble = ModelEnsemble.from_members(members[:2], vocab_size=vocab_size)
    input_ids = torch.tensor([[5, 17, 42, 99, 7, 13], [8, 8, 120, 3, 64, 2]])
    labels = input_ids.clone()
    labels[0, :3] = -100  # a prompt: not trained on
    labels[1, 4] = -100
    output = ensemble(input_ids, labels=labels)

    mean_logits = (members[0](input_ids).logits[..., :vocab_size] + members[1](input_ids).logits[..., :vocab_size]) / 2
    nlls = [
        -torch.log_softmax(mean_logits[row, t], dim=-1)[labels[row, t + 1]]
        for row in range(2) for t in range(5) if labels[row, t + 1] != -100
    ]
    assert len(nlls) == 7
    torch.testing.assert_close(output.loss, torch.stack(nlls).mean())


def test_position_ids_reach_the_members_so_packed_sequences_stay_apart(tokenizer, members):
    first, second = (tokenizer(prompt).input_ids for prompt in PROMPTS)
    packed = torch.tensor([first + second])
    position_ids = torch.tensor([list(range(len(first))) + list(range(len(second)))])
    ensemble = ModelEnsemble.from_members(members, vocab_size=len(tokenizer))
    logits = ensemble(packed, position_ids=position_ids).logits
    torch.testing.assert_close(logits[:, len(first):], ensemble(torch.tensor([second])).logits, rtol=1e-4, atol=1e-4)


def test_forward_continues_from_its_cache(tokenizer, members, prompt_ids):
    ensemble = ModelEnsemble.from_members(members, combine="probs", vocab_size=len(tokenizer))
    full = ensemble(prompt_ids).logits
    prefix = ensemble(prompt_ids[:, :-2], use_cache=True)
    assert isinstance(prefix.cache, EnsembleCache)
    continued = ensemble(prompt_ids[:, -2:], cache=prefix.cache)
    torch.testing.assert_close(continued.logits, full[:, -2:], rtol=1e-4, atol=1e-4)
    assert [c.get_seq_length() for c in prefix.cache.member_caches] == [prompt_ids.shape[1]] * 3
    # `past_key_values`, the older name of `cache`, is still accepted (transformers deprecates it, as for any model).
    prefix = ensemble(prompt_ids[:, :-2], use_cache=True)
    with pytest.warns(FutureWarning, match="past_key_values"):
        continued_by_old_name = ensemble(prompt_ids[:, -2:], past_key_values=prefix.cache)
    torch.testing.assert_close(continued_by_old_name.logits, continued.logits)


def test_each_members_cache_is_laid_out_for_its_own_architecture(tokenizer):
    """A member with sliding-window attention keeps only its window of keys and values; a full-attention member beside
    it keeps everything, in the same ensemble."""
    windowed = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                sliding_window=4)).eval()
    cache = EnsembleCache.for_members([windowed, build_diverse_member(tokenizer, 0)])
    assert [type(layer).__name__ for layer in cache.member_caches[0].layers] == ["DynamicSlidingWindowLayer"] * 2
    assert [type(layer).__name__ for layer in cache.member_caches[1].layers] == ["DynamicLayer"] * 2


def test_forward_rejects_a_cache_not_split_by_member(tokenizer, members, prompt_ids):
    ensemble = ModelEnsemble.from_members(members, vocab_size=len(tokenizer))
    with pytest.raises(TypeError, match=r"^an ensemble needs an EnsembleCache \(one cache per member\), got "
                                        r"DynamicCache$"):
        ensemble(prompt_ids, cache=DynamicCache())


def test_plain_forward_builds_no_cache(tokenizer, members, prompt_ids):
    ensemble = ModelEnsemble.from_members(members, vocab_size=len(tokenizer))
    assert ensemble(prompt_ids).cache is None


# --- vocabulary -----------------------------------------------------------------------------------------------------


def test_padded_member_logits_are_cut_to_the_vocabulary(tokenizer, members, prompt_ids):
    vocab_size = len(tokenizer)
    padded = members[1]
    assert padded(prompt_ids).logits.shape[-1] == vocab_size + 8
    ensemble = ModelEnsemble.from_members([padded], vocab_size=vocab_size)
    (cut,) = ensemble.member_logits(prompt_ids)
    assert cut.shape == (1, prompt_ids.shape[1], vocab_size)
    torch.testing.assert_close(ensemble(prompt_ids).logits, padded(prompt_ids).logits[..., :vocab_size])


def test_members_narrower_than_the_vocabulary_are_an_error(tokenizer, tiny_llama, prompt_ids):
    ensemble = ModelEnsemble.from_members([tiny_llama], vocab_size=len(tokenizer) + 8)
    with pytest.raises(ValueError, match="narrower than the vocabulary"):
        ensemble(prompt_ids)


def test_different_widths_without_a_vocabulary_are_an_error(members, prompt_ids):
    ensemble = ModelEnsemble.from_members(members[:2])
    with pytest.raises(ValueError, match="different widths"):
        ensemble(prompt_ids)
    hidden = ensemble.member_hidden_states(prompt_ids, torch.ones_like(prompt_ids), torch.ones_like(prompt_ids).bool())
    with pytest.raises(ValueError, match="different widths"):
        ensemble.logits_from_hidden(hidden)


@pytest.mark.parametrize("mode", ["logits", "probs", "weighted", "additive"])
def test_logits_from_hidden_states_equal_the_forwards_at_the_chosen_positions(tokenizer, members, mode):
    weights = [0.2, 0.5, 0.3] if mode in ("weighted", "additive") else None
    ensemble = ModelEnsemble.from_members(members, combine=mode, vocab_size=len(tokenizer), weights=weights)
    input_ids = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    positions = input_ids.attention_mask.bool()
    positions[0, :2] = False  # some positions only, across both rows
    with torch.no_grad():
        full = ensemble(**input_ids).logits
        hidden = ensemble.member_hidden_states(input_ids.input_ids, input_ids.attention_mask, positions)
        selected = ensemble.logits_from_hidden([states[3:] for states in hidden])  # a chunk of the positions
    assert [states.shape[0] for states in hidden] == [int(positions.sum())] * 3
    assert selected.dtype == torch.float32 and selected.shape == (int(positions.sum()) - 3, len(tokenizer))
    torch.testing.assert_close(selected, full[positions][3:], rtol=1e-5, atol=1e-5)


# --- membership ---------------------------------------------------------------------------------------------------


def test_members_are_frozen_and_stay_in_eval_mode(tokenizer, members, prompt_ids):
    for member in members:
        member.train()
    ensemble = ModelEnsemble.from_members(members, vocab_size=len(tokenizer))
    ensemble.train()
    assert not any(parameter.requires_grad for parameter in ensemble.parameters())
    assert not any(module.training for module in ensemble.modules())
    logits = ensemble(prompt_ids).logits
    assert not logits.requires_grad


def test_add_model_appends_a_frozen_member(tokenizer, members, prompt_ids):
    vocab_size = len(tokenizer)
    ensemble = ModelEnsemble.from_members(members[:1], vocab_size=vocab_size)
    newcomer = members[1].train()
    ensemble.add_model(newcomer)
    assert len(ensemble) == 2
    assert ensemble.config.member_subfolders == ["member_0", "member_1"]
    assert not newcomer.training and not any(p.requires_grad for p in newcomer.parameters())
    expected = (members[0](prompt_ids).logits + newcomer(prompt_ids).logits[..., :vocab_size]) / 2
    torch.testing.assert_close(ensemble(prompt_ids).logits, expected)


def test_members_and_subfolders_must_match():
    with pytest.raises(ValueError, match="2 subfolders"):
        ModelEnsemble(EnsembleConfig(member_subfolders=["member_0", "member_1"]))


# --- save and load ------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, tokenizer, members, prompt_ids):
    ensemble = ModelEnsemble.from_members(members, combine="probs", vocab_size=len(tokenizer))
    ensemble.save_pretrained(tmp_path, tokenizer=tokenizer)

    for index in range(3):
        assert (tmp_path / f"member_{index}" / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.safetensors"))  # no ensemble-wide state dict
    assert (tmp_path / "tokenizer.json").is_file()

    loaded = ModelEnsemble.from_pretrained(tmp_path)
    assert loaded.config.combine == "probs"
    assert loaded.config.vocab_size == len(tokenizer)
    assert loaded.config.member_subfolders == ["member_0", "member_1", "member_2"]
    assert loaded.generation_config.eos_token_id == tokenizer.eos_token_id
    assert not any(parameter.requires_grad for parameter in loaded.parameters())
    torch.testing.assert_close(loaded(prompt_ids).logits, ensemble(prompt_ids).logits, rtol=0, atol=0)


def test_a_saved_ensemble_without_its_generation_config_loads_with_its_first_members(tmp_path, tokenizer, members):
    """A study's records kept before they kept generation_config.json hold none: the ensemble loads with its first
    member's, as it was built; one that is there is read."""
    members[0].generation_config.max_new_tokens = 11
    ModelEnsemble.from_members(members, vocab_size=len(tokenizer)).save_pretrained(tmp_path, tokenizer=tokenizer)
    saved = GenerationConfig.from_pretrained(tmp_path)
    saved.max_new_tokens = 5
    saved.save_pretrained(tmp_path)
    assert ModelEnsemble.from_pretrained(tmp_path).generation_config.max_new_tokens == 5
    (tmp_path / "generation_config.json").unlink()
    loaded = ModelEnsemble.from_pretrained(tmp_path)
    assert loaded.generation_config.max_new_tokens == 11
    assert loaded.generation_config.eos_token_id == tokenizer.eos_token_id


def test_save_makes_the_folders_parents_and_passes_its_keywords_to_every_member(tmp_path, tokenizer, members,
                                                                               prompt_ids):
    ensemble = ModelEnsemble.from_members(members[:2], vocab_size=len(tokenizer))
    folder = tmp_path / "runs" / "final" / "ensemble"
    ensemble.save_pretrained(folder, max_shard_size="20KB")
    for index in range(2):  # each member's weights in shards of at most 20 kB, as asked
        shards = sorted((folder / f"member_{index}").glob("model-*.safetensors"))
        assert len(shards) > 1 and (folder / f"member_{index}" / "model.safetensors.index.json").is_file()
    loaded = ModelEnsemble.from_pretrained(folder)
    torch.testing.assert_close(loaded(prompt_ids).logits, ensemble(prompt_ids).logits, rtol=0, atol=0)


def test_the_ensembles_files_wait_for_its_members_and_clear_what_a_killed_save_left(tmp_path, tokenizer, members):
    ensemble = ModelEnsemble.from_members(members[:2], vocab_size=len(tokenizer))
    members[0].save_pretrained(tmp_path / "member_0")
    with pytest.raises(FileNotFoundError) as refusal:
        ensemble.save_configs(tmp_path, tokenizer)
    assert str(refusal.value) == f"{tmp_path}: member folder(s) ['member_1'] are not saved yet"
    assert sorted(os.listdir(tmp_path)) == ["member_0"]
    members[1].save_pretrained(tmp_path / "member_1")
    (tmp_path / ".configs.tmp").mkdir()
    (tmp_path / ".configs.tmp" / "stale.json").write_text("{}")  # from a save that was killed
    ensemble.save_configs(tmp_path, tokenizer)
    assert ".configs.tmp" not in os.listdir(tmp_path) and "stale.json" not in os.listdir(tmp_path)
    assert len(ModelEnsemble.from_pretrained(tmp_path)) == 2


def test_a_config_write_that_fails_before_its_staging_folder_exists_raises_its_own_error(tmp_path, tokenizer,
                                                                                          members, monkeypatch):
    """A disk too full to make even the staging folder: the caller sees that error (which run_state turns into
    DiskSpaceError), not the clean-up's complaint that there was no staging folder to remove."""
    ensemble = ModelEnsemble.from_members(members[:1], vocab_size=len(tokenizer))
    members[0].save_pretrained(tmp_path / "member_0")

    def full_disk(self, directory, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

    monkeypatch.setattr(EnsembleConfig, "save_pretrained", full_disk)
    with pytest.raises(OSError) as error:
        ensemble.save_configs(tmp_path, tokenizer)
    assert error.value.errno == errno.ENOSPC and sorted(os.listdir(tmp_path)) == ["member_0"]


def test_the_modelling_code_imports_its_two_helper_modules_from_beside_it():
    """transformers loads a folder's code as a package: every import of model_io and checksums in the saved
    MODELLING_FILE is relative, whichever line of the module it is on, and both modules are saved with it."""
    code = ensemble_module.modelling_code()
    assert sorted(code) == sorted([MODELLING_FILE, "model_io.py", "checksums.py"])
    assert not re.search(r"^from (model_io|checksums) import ", code[MODELLING_FILE], flags=re.MULTILINE)
    assert len(re.findall(r"^from \.(model_io|checksums) import ", code[MODELLING_FILE], flags=re.MULTILINE)) == 2


def test_saved_members_load_alone(tmp_path, tokenizer, members, prompt_ids):
    ModelEnsemble.from_members(members, vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    for index, member in enumerate(members):
        alone = AutoModelForCausalLM.from_pretrained(tmp_path / f"member_{index}")
        torch.testing.assert_close(alone(prompt_ids).logits, member(prompt_ids).logits, rtol=0, atol=0)


def test_loading_a_folder_that_holds_no_ensemble_is_refused_naming_it(tmp_path, tokenizer, members):
    ModelEnsemble.from_members(members[:1], vocab_size=len(tokenizer)).save_pretrained(tmp_path / "ensemble")
    member_folder = tmp_path / "ensemble" / "member_0"
    with pytest.raises(NotAnEnsembleError) as refusal:
        ModelEnsemble.from_pretrained(member_folder)
    assert str(refusal.value) == (f"{member_folder}: not a saved ensemble: its config.json has model_type 'llama', "
                                  "where an ensemble's has 'slm_ensemble' and lists its member folders (load a "
                                  "single model with AutoModelForCausalLM.from_pretrained)")
    EnsembleConfig().save_pretrained(tmp_path / "empty")
    with pytest.raises(NotAnEnsembleError, match=f"{re.escape(str(tmp_path / 'empty'))}: .* lists no member folder"):
        ModelEnsemble.from_pretrained(tmp_path / "empty")


def saved_with_checksums(folder: Path, members, tokenizer, ensemble_record: bool = False) -> Path:
    """`members` saved as an ensemble in `folder`, each member folder with its checksums.json as a run saves it
    (run_state.save_member_atomically); the ensemble's own folder too with `ensemble_record`."""
    ModelEnsemble.from_members(members, vocab_size=len(tokenizer)).save_pretrained(folder, tokenizer=tokenizer)
    for member_folder in sorted(folder.glob("member_*")):
        files.write_checksums(member_folder)
    if ensemble_record:
        files.write_checksums(folder)
    return folder


def test_loading_refuses_a_member_whose_weights_changed_since_they_were_saved_naming_the_file(tmp_path, tokenizer,
                                                                                             members, prompt_ids):
    folder = saved_with_checksums(tmp_path / "ensemble", members[:2], tokenizer)
    intact = ModelEnsemble.from_pretrained(folder)  # checked, and intact
    weights = folder / "member_1" / "model.safetensors"
    damage_second_half(weights)
    with pytest.raises(DamagedFolderError) as refusal:
        ModelEnsemble.from_pretrained(folder)
    message = str(refusal.value)
    assert message.startswith(f"{weights}: holds {weights.stat().st_size:,} bytes with sha256 ")
    assert f"{folder / 'member_1'} is damaged and nothing was loaded from it; restore the folder from an intact copy" \
        in message
    (folder / "member_1" / checksums.CHECKSUMS).unlink()  # a member saved before checksums were recorded loads
    unrecorded = ModelEnsemble.from_pretrained(folder)
    assert not torch.equal(unrecorded(prompt_ids).logits, intact(prompt_ids).logits)  # from the damaged weights


def test_loading_refuses_an_ensemble_folder_whose_own_files_changed(tmp_path, tokenizer, members):
    folder = saved_with_checksums(tmp_path / "ensemble", members[:1], tokenizer, ensemble_record=True)
    ModelEnsemble.from_pretrained(folder)
    damage_second_half(folder / "generation_config.json")
    with pytest.raises(DamagedFolderError, match=f"^{re.escape(str(folder / 'generation_config.json'))}: holds "
                                                 f".*; {re.escape(ensemble_module.DAMAGED_ADVICE)}$"):
        ModelEnsemble.from_pretrained(folder)


def test_a_member_loaded_alone_is_checked_first(tmp_path, tokenizer, members, prompt_ids):
    folder = saved_with_checksums(tmp_path / "ensemble", members[:1], tokenizer)
    alone = load_member(folder, "member_0")
    torch.testing.assert_close(alone(prompt_ids).logits, members[0](prompt_ids).logits, rtol=0, atol=0)
    damage_second_half(folder / "member_0" / "model.safetensors")
    for where in ((folder, "member_0"), (folder / "member_0",)):
        damaged = re.escape(f"{folder / 'member_0' / 'model.safetensors'}: ")
        with pytest.raises(DamagedFolderError, match=damaged) as refused:
            load_member(*where)
        assert "restore the folder from an intact copy" in str(refused.value)  # says what to do


def test_a_member_loads_from_safetensors_only_with_the_callers_settings(tmp_path, tokenizer, members):
    pickled = tmp_path / "pickled"
    members[0].config.save_pretrained(pickled)
    torch.save(members[0].state_dict(), pickled / "pytorch_model.bin")  # a pickle
    with pytest.raises(OSError):  # never unpickled, whatever the file holds
        load_member(pickled)
    members[0].save_pretrained(tmp_path / "safe")
    assert load_member(tmp_path / "safe", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_an_ensemble_folder_is_known_to_auto_config_so_its_tokenizer_loads_without_a_warning(tmp_path, tokenizer,
                                                                                             members):
    """AutoTokenizer reads a folder's config.json through AutoConfig; an unknown model type made it fall back to the
    bare PreTrainedConfig, which warned "You are using a model of type `slm_ensemble` to instantiate ... ``"."""
    ModelEnsemble.from_members(members[:1]).save_pretrained(tmp_path, tokenizer=tokenizer)
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)  # transformers' loggers do not propagate to caplog's
    try:
        loaded = AutoTokenizer.from_pretrained(tmp_path)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert not [message for message in warnings if "model of type" in message]
    assert isinstance(AutoConfig.from_pretrained(tmp_path), EnsembleConfig)


def test_load_places_members_by_device_map(tmp_path, tokenizer, members, prompt_ids):
    ensemble = ModelEnsemble.from_members(members[:2], vocab_size=len(tokenizer))
    ensemble.save_pretrained(tmp_path)
    loaded = ModelEnsemble.from_pretrained(tmp_path, device_map=["cpu", "cpu"])
    torch.testing.assert_close(loaded(prompt_ids).logits, ensemble(prompt_ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="3 device maps given for 2 members"):
        ModelEnsemble.from_pretrained(tmp_path, device_map=["cpu", "cpu", "cpu"])


def test_a_hub_ensembles_revision_is_loaded_whole_its_config_members_and_generation_config(tmp_path, tokenizer,
                                                                                            members, prompt_ids,
                                                                                            monkeypatch):
    """An ensemble pushed to the Hub twice: `revision` reaches the ensemble's config (which members), every member's
    weights and the generation config, all read from that revision, none from the main branch."""
    main = ModelEnsemble.from_members(members[:1], vocab_size=len(tokenizer))
    v1 = ModelEnsemble.from_members(members[1:], vocab_size=len(tokenizer))
    v1.generation_config.max_new_tokens = 7
    for branch, ensemble in (("main", main), ("v1", v1)):
        ensemble.save_pretrained(tmp_path / branch)
        publish_to_hub_cache(tmp_path / "hub", "owner/ensemble", branch, tmp_path / branch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = ModelEnsemble.from_pretrained("owner/ensemble", revision="v1")
    assert loaded.config.member_subfolders == ["member_0", "member_1"]
    assert loaded.generation_config.max_new_tokens == 7
    torch.testing.assert_close(loaded(prompt_ids).logits, v1(prompt_ids).logits, rtol=0, atol=0)
    assert len(ModelEnsemble.from_pretrained("owner/ensemble")) == 1  # the main branch


def test_an_ensemble_in_a_subfolder_loads_by_its_name_with_or_without_slashes(tmp_path, tokenizer, members,
                                                                             prompt_ids):
    ensemble = ModelEnsemble.from_members(members[:2], vocab_size=len(tokenizer))
    ensemble.save_pretrained(tmp_path / "repo" / "XL")
    for subfolder in ("XL", "/XL/"):
        loaded = ModelEnsemble.from_pretrained(tmp_path / "repo", subfolder=subfolder)
        torch.testing.assert_close(loaded(prompt_ids).logits, ensemble(prompt_ids).logits, rtol=0, atol=0)


def test_a_member_whose_weights_are_only_pickled_is_refused_not_unpickled(tmp_path, tokenizer, members):
    ensemble = ModelEnsemble.from_members(members[:1], vocab_size=len(tokenizer))
    ensemble.save_pretrained(tmp_path)
    (tmp_path / "member_0" / "model.safetensors").unlink()
    torch.save(members[0].state_dict(), tmp_path / "member_0" / "pytorch_model.bin")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "member_0") is not None  # transformers would load it
    with pytest.raises(OSError, match="model.safetensors"):
        ModelEnsemble.from_pretrained(tmp_path)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device next to the CPU")
def test_members_on_different_devices_predict_and_generate_as_on_one(tmp_path, tokenizer, members, prompt_ids):
    ensemble = ModelEnsemble.from_members(members[:2], vocab_size=len(tokenizer))
    ensemble.save_pretrained(tmp_path)
    split = ModelEnsemble.from_pretrained(tmp_path, device_map=["cpu", "cuda:0"])
    assert [next(m.parameters()).device.type for m in split.members] == ["cpu", "cuda"]
    torch.testing.assert_close(split(prompt_ids).logits.cpu(), ensemble(prompt_ids).logits, rtol=1e-4, atol=1e-4)
    generated = split.generate(prompt_ids, do_sample=False, max_new_tokens=8, eos_token_id=None)
    expected = slow_greedy_decode(members[:2], prompt_ids, steps=8, mode="logits", vocab_size=len(tokenizer))
    assert torch.equal(generated.cpu(), expected)


def test_load_passes_dtype_to_members(tmp_path, tokenizer, members, prompt_ids):
    ModelEnsemble.from_members(members[:2], vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    loaded = ModelEnsemble.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(member.dtype == torch.bfloat16 for member in loaded.members)
    assert loaded(prompt_ids).logits.dtype == torch.float32  # combined in fp32


# --- generate -----------------------------------------------------------------------------------------------------


def test_one_member_ensemble_generates_like_the_member(tokenizer, members, prompt_ids):
    member = members[0]
    ensemble = ModelEnsemble.from_members([member], vocab_size=len(tokenizer))
    assert ensemble.generation_config.eos_token_id == member.generation_config.eos_token_id == tokenizer.eos_token_id
    expected = member.generate(prompt_ids, do_sample=False, max_new_tokens=10)
    generated = ensemble.generate(prompt_ids, do_sample=False, max_new_tokens=10)
    assert generated.shape == (1, prompt_ids.shape[1] + 10)
    assert torch.equal(generated, expected)
    assert len(set(new_tokens(generated, prompt_ids)[0].tolist())) > 3  # a real text, not one token repeated


def test_one_member_ensemble_beam_searches_like_the_member(tokenizer, members, prompt_ids):
    ensemble = ModelEnsemble.from_members(members[:1], vocab_size=len(tokenizer))
    expected = members[0].generate(prompt_ids, do_sample=False, num_beams=3, max_new_tokens=8)
    assert torch.equal(ensemble.generate(prompt_ids, do_sample=False, num_beams=3, max_new_tokens=8), expected)


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_cached_generate_equals_slow_reference_decode(tokenizer, members, prompt_ids, mode):
    vocab_size = len(tokenizer)
    ensemble = ModelEnsemble.from_members(members, combine=mode, vocab_size=vocab_size)
    output = ensemble.generate(prompt_ids, do_sample=False, max_new_tokens=10, eos_token_id=None,
                               return_dict_in_generate=True)
    expected = slow_greedy_decode(members, prompt_ids, steps=10, mode=mode, vocab_size=vocab_size)
    assert torch.equal(output.sequences, expected)
    # Each member kept its own cache, holding every token but the last one generated.
    assert [cache.get_seq_length() for cache in output.cache.member_caches] == [expected.shape[1] - 1] * 3
    # The combination matters: no member decodes this text alone.
    for member in members:
        alone = slow_greedy_decode([member], prompt_ids, steps=10, mode=mode, vocab_size=vocab_size)
        assert not torch.equal(alone, expected)


def test_left_padded_batch_generates_each_prompt_as_alone(tokenizer, members):
    vocab_size = len(tokenizer)
    ensemble = ModelEnsemble.from_members(members, vocab_size=vocab_size)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    assert (batch.attention_mask == 0).any()  # the shorter prompt is padded
    generated = ensemble.generate(**batch, do_sample=False, max_new_tokens=8, eos_token_id=None)
    for row, prompt in enumerate(PROMPTS):
        alone = tokenizer(prompt, return_tensors="pt").input_ids
        expected = slow_greedy_decode(members, alone, steps=8, mode="logits", vocab_size=vocab_size)
        padding = int((batch.attention_mask[row] == 0).sum())
        assert torch.equal(generated[row, padding:], expected[0])


def test_sampling_with_a_seed_is_reproducible_and_stays_in_the_vocabulary(tokenizer, members, prompt_ids):
    ensemble = ModelEnsemble.from_members(members, vocab_size=len(tokenizer))
    samples = []
    for _ in range(2):
        torch.manual_seed(0)
        samples.append(ensemble.generate(prompt_ids, do_sample=True, top_k=0, max_new_tokens=20, eos_token_id=None))
    assert torch.equal(samples[0], samples[1])
    assert samples[0].shape == (1, prompt_ids.shape[1] + 20)
    assert int(samples[0].max()) < len(tokenizer)
    greedy = ensemble.generate(prompt_ids, do_sample=False, max_new_tokens=20, eos_token_id=None)
    assert not torch.equal(samples[0], greedy)


class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_receives_the_prompt_then_each_new_token(tokenizer, members, prompt_ids):
    ensemble = ModelEnsemble.from_members(members, vocab_size=len(tokenizer))
    streamer = CollectingStreamer()
    generated = ensemble.generate(prompt_ids, do_sample=False, max_new_tokens=6, eos_token_id=None, streamer=streamer)
    assert streamer.ended
    assert streamer.chunks[0] == prompt_ids[0].tolist()
    assert streamer.chunks[1:] == [[token] for token in new_tokens(generated, prompt_ids)[0].tolist()]


@pytest.mark.parametrize("mode", ["weighted", "additive"])
def test_weighted_modes_sum_each_members_logits_times_its_coefficient(mode):
    torch.manual_seed(0)
    logits = [torch.randn(3, 7) for _ in range(3)]
    combined = combine_logits(logits, mode, [0.5, 0.2, 1.5])
    torch.testing.assert_close(combined, 0.5 * logits[0] + 0.2 * logits[1] + 1.5 * logits[2])
    with pytest.raises(ValueError, match="needs one weight per member"):
        combine_logits(logits, mode, [1.0, 1.0])
    with pytest.raises(ValueError, match="needs `weights`"):
        EnsembleConfig(combine=mode)


def test_a_weighted_ensemble_saves_its_weights_and_predicts_with_them(tmp_path, tokenizer, members, prompt_ids):
    ensemble = ModelEnsemble.from_members(members[:2], "weighted", len(tokenizer), weights=[0.25, 0.75])
    ensemble.add_model(members[2], weight=0.5)
    assert ensemble.config.weights == [0.25, 0.75, 0.5]
    with torch.no_grad():
        expected = sum(w * m(input_ids=prompt_ids).logits[..., :len(tokenizer)]
                       for w, m in zip([0.25, 0.75, 0.5], members))
        torch.testing.assert_close(ensemble(input_ids=prompt_ids).logits, expected)
        ensemble.save_pretrained(tmp_path, tokenizer)
        loaded = ModelEnsemble.from_pretrained(tmp_path)
        assert loaded.config.weights == [0.25, 0.75, 0.5]
        torch.testing.assert_close(loaded(input_ids=prompt_ids).logits, expected)
    with pytest.raises(ValueError, match="needs the new member's weight"):
        ensemble.add_model(members[0])


def test_the_loss_mixture_weights_and_the_weights_after_a_new_member_joins():
    assert training_mixture_weights("logits", [0.5, 0.5], eta=1.0) is None
    assert training_mixture_weights("weighted", [], eta=1.0) == (1.0,)
    assert training_mixture_weights("weighted", [0.25, 0.75], eta=1.0) == pytest.approx((1 / 3, 1 / 6, 0.5))
    assert training_mixture_weights("additive", [1.0, 0.5], eta=0.5) == (0.5, 1.0, 0.5)
    assert weights_with_new_member("weighted", [0.25, 0.75], 0.2) == pytest.approx([0.2, 0.6, 0.2])
    assert weights_with_new_member("additive", [1.0], 0.5) == [1.0, 0.5]
    assert weights_with_new_member("probs", [], 1.0) is None


# --- members at once ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["logits", "probs", "weighted", "additive"])
def test_concurrent_members_give_the_sequential_logits_and_greedy_tokens(tokenizer, members, prompt_ids, mode):
    weights = [0.5, 0.3, 0.2] if mode in ("weighted", "additive") else None
    sequential = ModelEnsemble.from_members(members, combine=mode, vocab_size=len(tokenizer), weights=weights,
                                            concurrent=False)
    concurrent = ModelEnsemble.from_members(members, combine=mode, vocab_size=len(tokenizer), weights=weights,
                                            concurrent=True)
    assert concurrent.runs_members_concurrently() and not sequential.runs_members_concurrently()
    torch.testing.assert_close(concurrent(prompt_ids).logits, sequential(prompt_ids).logits, rtol=0, atol=0)
    expected = sequential.generate(prompt_ids, do_sample=False, max_new_tokens=10, eos_token_id=None)
    assert torch.equal(concurrent.generate(prompt_ids, do_sample=False, max_new_tokens=10, eos_token_id=None),
                       expected)
    positions = torch.ones_like(prompt_ids, dtype=torch.bool)
    hidden = concurrent.member_hidden_states(prompt_ids, torch.ones_like(prompt_ids), positions)
    torch.testing.assert_close(concurrent.logits_from_hidden(hidden), sequential(prompt_ids).logits[0],
                               rtol=1e-5, atol=1e-5)


def test_concurrent_members_really_run_at_the_same_time(tokenizer, members, prompt_ids):
    """Each member's forward waits at a barrier for the others': run one after another, the first would wait alone
    and the barrier would time out."""
    barrier = threading.Barrier(len(members), timeout=10)

    def meet_the_others(module, args):
        barrier.wait()

    hooks = [member.register_forward_pre_hook(meet_the_others) for member in members]
    try:
        ensemble = ModelEnsemble.from_members(members, vocab_size=len(tokenizer), concurrent=True)
        ensemble(prompt_ids)
        barrier.reset()
        ensemble.member_hidden_states(prompt_ids, torch.ones_like(prompt_ids), torch.ones_like(prompt_ids).bool())
    finally:
        for hook in hooks:
            hook.remove()


def test_member_threads_run_in_the_callers_grad_mode(tokenizer, members, prompt_ids):
    ensemble = ModelEnsemble.from_members(members, vocab_size=len(tokenizer), concurrent=True)
    with torch.no_grad():
        modes = ensemble.for_each_member(lambda member: torch.is_grad_enabled())
    assert modes == [False] * len(members)
    with torch.inference_mode():
        modes = ensemble.for_each_member(lambda member: torch.is_inference_mode_enabled())
    assert modes == [True] * len(members)


def test_members_on_one_device_run_one_after_another_unless_asked(tmp_path, tokenizer, members, prompt_ids):
    ModelEnsemble.from_members(members[:2], vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    assert not ModelEnsemble.from_pretrained(tmp_path, device_map=["cpu", "cpu"]).runs_members_concurrently()
    assert ModelEnsemble.from_pretrained(tmp_path, concurrent=True).runs_members_concurrently()
    added = ModelEnsemble.from_members(members[:1], vocab_size=len(tokenizer), concurrent=True)
    assert not added.runs_members_concurrently()  # one member: nothing to run beside it
    added.add_model(members[1])
    assert added.for_each_member(lambda member: threading.current_thread().name.startswith("ensemble-member")) == \
        [True, True]
    added.add_model(members[2])  # its pool of two threads is replaced by one of three: all three meet at once
    everyone = threading.Barrier(3, timeout=30)
    assert added.for_each_member(lambda member: everyone.wait() is not None) == [True] * 3
    on_two_devices = ModelEnsemble.from_members([members[0], build_diverse_member(tokenizer, 3).to("meta")],
                                                vocab_size=len(tokenizer))
    assert on_two_devices.runs_members_concurrently()  # members on two devices run at once, unasked


def test_a_per_member_argument_of_another_length_is_refused_not_cut_short(tokenizer, members):
    ensemble = ModelEnsemble.from_members(members, vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="zip"):
        ensemble.for_each_member(lambda member, value: value, [1, 2])
    with pytest.raises(ValueError) as refusal:
        ModelEnsemble.from_members(members, combine="weighted", weights=[1.0, 2.0], vocab_size=len(tokenizer))
    assert str(refusal.value) == "2 weights for 3 members"


def test_the_ensembles_generation_config_is_its_own_copy_of_its_first_members(tokenizer, members):
    members[0].generation_config.eos_token_id = [1, 2]
    ensemble = ModelEnsemble.from_members(members, vocab_size=len(tokenizer))
    ensemble.generation_config.eos_token_id.append(3)
    assert members[0].generation_config.eos_token_id == [1, 2]


# --- a saved folder loads without this project --------------------------------------------------------------------

# Run by a Python that sees none of the project's files: -I leaves the script's folder, the working folder and
# PYTHONPATH off sys.path (site-packages, with torch and transformers, stay); nor accelerate, which transformers does
# not require. It loads the folder in its working folder as docs/configuration.md says, and prints what it generated,
# and what loading a copy of it with a damaged member raised.
STANDALONE_LOAD = """
import importlib.util, json, sys
sys.modules["accelerate"] = None  # import accelerate now fails, and transformers finds it unavailable
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
prompt, new_tokens = sys.argv[1], int(sys.argv[2])
project_modules = [name for name in ("ensemble", "model_io", "checksums", "files", "conftest")
                   if importlib.util.find_spec(name)]
try:
    AutoModelForCausalLM.from_pretrained("damaged", trust_remote_code=True)
    refusal = None
except Exception as error:
    refusal = {"class": f"{type(error).__module__}.{type(error).__name__}", "message": str(error)}
model = AutoModelForCausalLM.from_pretrained("ensemble", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("ensemble")
generated = model.generate(tokenizer(prompt, return_tensors="pt").input_ids, do_sample=False,
                           max_new_tokens=new_tokens, eos_token_id=None)
generator = pipeline("text-generation", model="ensemble", trust_remote_code=True)
text = generator(prompt, do_sample=False, max_new_tokens=new_tokens, eos_token_id=None)[0]["generated_text"]
print(json.dumps({"project_modules": project_modules, "class": type(model).__module__, "tokens": generated.tolist(),
                  "text": text, "refusal": refusal}))
"""


def test_a_copied_ensemble_folder_generates_the_same_tokens_where_the_project_cannot_be_imported(
        tmp_path, tokenizer, members, prompt_ids):
    ModelEnsemble.from_members(members, combine="probs", vocab_size=len(tokenizer)).save_pretrained(
        tmp_path / "saved", tokenizer=tokenizer)
    for index in range(len(members)):  # as a run saves its members: checked where the folder is loaded
        files.write_checksums(tmp_path / "saved" / f"member_{index}")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "saved", elsewhere / "ensemble")
    shutil.copytree(tmp_path / "saved", elsewhere / "damaged")
    damage_second_half(elsewhere / "damaged" / "member_2" / "model.safetensors")
    (elsewhere / "load.py").write_text(STANDALONE_LOAD)
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
                   "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-I", "load.py", PROMPTS[0], "8"], cwd=elsewhere, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])

    assert loaded["project_modules"] == []
    assert loaded["class"].startswith("transformers_modules.")  # the folder's code, not the project's
    refusal = loaded["refusal"]  # by the folder's own copy of checksums.py
    assert refusal is not None
    assert re.fullmatch(r"transformers_modules\..*checksums\.DamagedFolderError", refusal["class"])
    assert refusal["message"].startswith(f"{Path('damaged', 'member_2', 'model.safetensors')}: holds ")
    assert "restore the folder from an intact copy" in refusal["message"]
    project = ModelEnsemble.from_pretrained(tmp_path / "saved")
    expected = project.generate(prompt_ids, do_sample=False, max_new_tokens=8, eos_token_id=None)
    assert loaded["tokens"] == expected.tolist()
    in_project = pipeline("text-generation", model=project, tokenizer=tokenizer)
    assert loaded["text"] == in_project(PROMPTS[0], do_sample=False, max_new_tokens=8,
                                        eos_token_id=None)[0]["generated_text"]


def test_the_saved_code_is_the_projects_own_with_its_imports_made_relative(tmp_path, tokenizer, members):
    ModelEnsemble.from_members(members[:1], vocab_size=len(tokenizer)).save_pretrained(tmp_path, tokenizer=tokenizer)
    ensemble_source = Path(ensemble_module.__file__).read_text()
    assert ensemble_source.count("\nfrom model_io import ") == 1
    assert ensemble_source.count("\nfrom checksums import ") == 1
    assert (tmp_path / MODELLING_FILE).read_text() == ensemble_source.replace(
        "\nfrom model_io import ", "\nfrom .model_io import ").replace("\nfrom checksums import ",
                                                                      "\nfrom .checksums import ")
    assert (tmp_path / "model_io.py").read_text() == Path(model_io.__file__).read_text()
    assert (tmp_path / "checksums.py").read_text() == Path(checksums.__file__).read_text()
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == AUTO_MAP


def test_the_saved_code_needs_only_torch_transformers_and_the_standard_library(tmp_path, tokenizer, members):
    """transformers refuses a folder's code whose imports are not installed (dynamic_module_utils.check_imports):
    an environment with just torch and transformers (no accelerate, which transformers does not require) loads it."""
    ModelEnsemble.from_members(members[:1]).save_pretrained(tmp_path)
    for name in (MODELLING_FILE, "model_io.py", "checksums.py"):
        assert set(get_imports(tmp_path / name)) - set(sys.stdlib_module_names) <= {"torch", "transformers"}, name


def test_loading_a_folders_code_beside_the_project_leaves_auto_config_answering_with_the_projects_class(tmp_path,
                                                                                                       members):
    ModelEnsemble.from_members(members[:1]).save_pretrained(tmp_path / "ensemble")
    both = ("from transformers import AutoConfig, AutoModelForCausalLM\n"
            "from ensemble import EnsembleConfig\n"
            "AutoModelForCausalLM.from_pretrained('ensemble', trust_remote_code=True)\n"
            "assert isinstance(AutoConfig.from_pretrained('ensemble'), EnsembleConfig)\n")
    environment = {**os.environ, "PYTHONPATH": str(Path(ensemble_module.__file__).parent),
                   "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", both], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
