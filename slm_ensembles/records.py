"""What a round writes down beside its member: its metric rows as metrics.csv records them (the trained rows'
training record, every row's compute columns and gap_closed), the ensemble's folder and model card, its sample
answers (samples.csv), and the manifest that marks it done."""

import shutil
from pathlib import Path

import plot
from slm_ensembles import compute, files, model_card, run_state
from slm_ensembles.evaluation import SAMPLE_PROMPTS, sample_answers
from slm_ensembles.run_layout import RunLayout

TRAINING_COLUMNS = ("steps_run", "member_step", "stop_reason")  # from a member's training record
METRIC_COLUMNS = ["round", "model", "ensemble_size", "ce", "perplexity", "kl_teacher", "top1_agreement", "ece",
                  "gap_closed", "diversity", "num_tokens", "seconds", *TRAINING_COLUMNS, *compute.COLUMNS]
TRAINED_ROWS = ("student", "ensemble")  # the rows of a round that its training record (steps, stop) belongs to
SAMPLE_COLUMNS = ["round", "model", "prompt", "answer", "new_tokens"]


def recorded_rows(rows: list[dict], folder: Path, manifest: dict, round_index: int, *, members: tuple,
                  train_tokens: compute.TokenCount, examples: int, spend_rule: compute.SpendRule) -> list[dict]:
    """The round's evaluation rows as metrics.csv records them: with the trained rows' training record (steps,
    stop), every row's compute columns (from what each round spent: its member's training record, over the
    training split's `train_tokens` in `examples`) and gap_closed. Every process computes them (the manifest it
    keeps holds them); the files they read are written before the evaluation's collectives."""
    member = RunLayout(folder).member(round_index)
    training = run_state.training_record(member)
    rows = [{**row, **{key: training[key] for key in TRAINING_COLUMNS if key in training}}
            if row["model"] in TRAINED_ROWS else row for row in rows]
    spends = [run_state.training_record(path)["flops"] for path in [*(folder / m for m in manifest["members"]), member]]
    columns = compute.metric_columns([compute.model_shape(model) for model in members], spends,
                                     context=round(train_tokens.sequence / examples), rule=spend_rule)
    rows = [{**row, **columns.get(row["model"], {})} for row in rows]
    return plot.rows_with_gap_closed(rows, RunLayout(folder).metrics)


def write_sample_answers(folder: Path, round_index: int, models: dict, tokenizer, prompts: int,
                         max_new_tokens: int) -> None:
    """Greedy answers of each model to the first `prompts` fixed prompts, written to samples.csv (replacing any
    the round wrote before)."""
    rows = sample_answers(models, tokenizer, SAMPLE_PROMPTS[:prompts], max_new_tokens)
    if rows:
        files.replace_csv_rows(RunLayout(folder).samples, SAMPLE_COLUMNS, lambda row: int(row["round"]) != round_index,
                               [{"round": round_index, **row} for row in rows])


def write_round(folder: Path, round_index: int, written: list[dict], manifest: dict, ensemble, tokenizer,
                config) -> None:
    """The round's files, by the main process: its metric rows (`written`, replacing any an interrupted evaluation
    of it left), the ensemble's configs and model card (the ensemble folder is complete after every round), the
    sample answers, then the manifest that marks the round done; its checkpoints go, as its member is its state."""
    files.replace_csv_rows(RunLayout(folder).metrics, METRIC_COLUMNS, lambda row: int(row["round"]) != round_index,
                           written)
    run_state.save_ensemble_configs(ensemble, tokenizer, RunLayout(folder).ensemble)
    model_card.write_model_card(folder)
    write_sample_answers(folder, round_index, {"student": ensemble.members[-1], "ensemble": ensemble}, tokenizer,
                         config.sample_answers, config.sample_max_new_tokens)
    run_state.write_manifest(folder, manifest)
    shutil.rmtree(RunLayout(folder).checkpoints(round_index), ignore_errors=True)
