"""What the study's tests build, shared by tests/test_study.py and tests/slm_ensembles/study/: a spec of families
(write_spec), a run folder as main.py writes it (fake_run), synthetic studies of known laws (ensemble_law, single_law,
single_curve, and synthetic_study_spec of those laws; size_study at a data size) and a run's
saved ensemble of tiny random Llamas (saved_tiny_ensemble)."""

import json
import math

import numpy as np
import pandas as pd
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

import config as config_lib
from ensemble import ModelEnsemble
from slm_ensembles.study.spec import load_spec


# --- specs ------------------------------------------------------------------------------------------------------------

def write_spec(path, families, **top):
    """A spec of `families`; one without a single-model family compares nothing (compare: [])."""
    spec = dict(name="scaling", output=str(path.parent / "study"), preset="test", seeds=[0, 1], families=families)
    if not any(f.get("kind") == "single" or "baseline" in f.get("settings", {}) for f in families):
        spec["compare"] = []
    spec.update(top)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


ENSEMBLE_AND_SINGLE = [
    dict(name="method", settings=dict(total_rounds=4), grid=dict(combine=["logits", "additive"])),
    dict(name="single", kind="single", settings=dict(total_rounds=1), grid=dict(student_num_layers=[1, 3, 5, 8])),
]


# --- fake run folders -------------------------------------------------------------------------------------------------

def fake_run(point, ensemble_ce, extra=None, rounds_done=None, run_name="run_1", evals=None, train_examples=None,
             **config_changes):
    """A run folder as main.py writes it for `point`: the teacher row, then per round the untrained student, the
    student and the ensemble of `ensemble_ce[r]` (one number per size); `extra` maps a column to a function of the
    size. rounds_done: how many rounds the manifest marks done (default: all). evals: train_log.csv's early-stopping
    rows, dicts of round, train_flops, heldout_ce, test_ce (each after a training-loss row). train_examples: the
    training split's size the manifest records (None: a manifest from before they were recorded)."""
    run_dir = point.output_root / "2026-12-01" / run_name
    run_dir.mkdir(parents=True)
    if evals is not None:
        log = [row for step, e in enumerate(evals) for row in (dict(round=e["round"], step=step, loss=3.0),
                                                               dict(e, step=step))]
        pd.DataFrame(log).to_csv(run_dir / "train_log.csv", index=False)
    rows = [dict(round=0, model="teacher", ensemble_size=0, ce=1.0)]
    for r, ce in enumerate(ensemble_ce):
        size = r + 1 if point.kind == "ensemble" else 1
        rows += [dict(round=r, model="student_untrained", ensemble_size=1, ce=9.0),
                 dict(round=r, model="student", ensemble_size=1, ce=ce + 0.1),
                 dict(round=r, model="ensemble", ensemble_size=size, ce=ce)]
    for row in rows:
        row.update(perplexity=math.exp(row["ce"]), kl_teacher=row["ce"] - 1.0, top1_agreement=0.5, ece=0.1,
                   diversity=0.0, num_tokens=100, seconds=1.0)
        for column, of_size in (extra or {}).items():
            row[column] = of_size(row["ensemble_size"])
    pd.DataFrame(rows).to_csv(run_dir / "metrics.csv", index=False)
    saved = {**point.config.to_dict(), "output_root": str(point.output_root), **config_changes}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    planned = saved["total_rounds"] if saved["baseline"] not in config_lib.SINGLE_MODEL_BASELINES and \
        point.kind == "ensemble" else len(ensemble_ce)
    done = planned if rounds_done is None else rounds_done
    manifest = {"rounds": {str(i): "done" if i < done else "training" for i in range(planned)}}
    if train_examples is not None:
        manifest["examples"] = {"train": train_examples, "test": 8, "early_stop": 4}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return run_dir


# --- synthetic runs of known laws -------------------------------------------------------------------------------------

P0, F0 = 1e6, 1e12  # parameters and training FLOPs of one unit (one student, one layer)


def ensemble_law(k):
    return 1.5 + 3 * k ** -0.7


def single_law(n):
    return 1.2 + 3 * n ** -0.5


def single_curve(n, final_ce, fractions=(0.25, 0.5, 0.75, 1.0)):
    """A single model of n units' early-stopping evaluations: spend n F0 x fraction, test CE falling to final_ce
    (0.3 above it at the start), held-out CE 0.05 above the test CE."""
    return [dict(round=0, train_flops=n * F0 * f, test_ce=final_ce + 0.3 * (1 - f),
                 heldout_ce=final_ce + 0.3 * (1 - f) + 0.05) for f in fractions]


def synthetic_study_spec(folder):
    """Ensembles of 1-4 students (CE 1.5 + 3 k^-0.7; additive 0.5 lower) and single models of 1, 3, 5, 8 layers
    (CE 1.2 + 3 n^-0.5, the end of a learning curve: single_curve), k students or n layers having k or n times P0
    parameters (half of them not embeddings) and F0 FLOPs; 3 seeds, noise 0.002. No critical_path_layers column."""
    spec = write_spec(folder / "spec.yaml", ENSEMBLE_AND_SINGLE, seeds=[0, 1, 2])
    loaded = load_spec(spec)
    rng = np.random.default_rng(0)
    for point in loaded.points:
        if point.kind == "ensemble":
            shift = -0.5 if point.settings["combine"] == "additive" else 0.0
            ce = [ensemble_law(k) + shift + rng.normal(0, 0.002) for k in range(1, 5)]
            fake_run(point, ce, extra=dict(parameters=lambda k: k * P0, non_embedding_parameters=lambda k: k * P0 / 2,
                                           train_flops=lambda k: k * F0))
        else:
            n = point.settings["student_num_layers"]
            ce = single_law(n) + rng.normal(0, 0.002)
            fake_run(point, [ce], evals=single_curve(n, ce),
                     extra=dict(parameters=lambda k, n=n: n * P0, non_embedding_parameters=lambda k, n=n: n * P0 / 2,
                                train_flops=lambda k, n=n: n * F0))
    return spec


def size_study(tmp_path, name, max_examples, build, ensemble_ce, single_ce, recorded=False):
    """A study at `max_examples` of an ensemble of 2 (CE ensemble_ce[k-1] at k F0 + build) and one single model whose
    curve ends at single_ce (3 F0 + build), 2 seeds; seed s's teacher cache build costs build + s F0 / 10. recorded:
    the manifests record max_examples - 10 - s training examples for seed s."""
    families = [dict(name="method", settings=dict(total_rounds=2)),
                dict(name="one", kind="single", settings=dict(total_rounds=1))]
    spec = write_spec(tmp_path / f"{name}.yaml", families, name=name, output=str(tmp_path / name),
                      settings=dict(max_examples=max_examples), compare=["train_flops"])
    for point in load_spec(spec).points:
        fixed = build + point.seed * F0 / 10
        examples = max_examples - 10 - point.seed if recorded else None
        if point.kind == "ensemble":
            fake_run(point, ensemble_ce, extra=dict(train_flops=lambda k, fixed=fixed: k * F0 + fixed),
                     train_examples=examples)
        else:
            evals = [dict(round=0, train_flops=f * F0 + fixed, heldout_ce=ce + 0.1, test_ce=ce, flops_teacher=fixed)
                     for f, ce in ((0.5, single_ce + 1.0), (1.5, single_ce + 0.5), (3.0, single_ce))]
            fake_run(point, [single_ce], evals=evals, extra=dict(train_flops=lambda k, fixed=fixed: 3 * F0 + fixed),
                     train_examples=examples)
    return spec


# --- saved ensembles --------------------------------------------------------------------------------------------------

def saved_tiny_ensemble(run_dir, members, layers=1):
    """A run's saved ensemble/ folder of `members` tiny random Llamas of `layers` layers (an end-of-sequence token
    they may emit: the timing decodes past it)."""
    models = []
    for seed in range(members):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=96, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=32, eos_token_id=2, bos_token_id=None,
                             pad_token_id=0)
        models.append(LlamaForCausalLM(config).eval())
    ModelEnsemble.from_members(models, vocab_size=96, concurrent=False).save_pretrained(run_dir / "ensemble")
