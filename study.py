"""A scaling study: does an ensemble of small students beat one model at equal parameters or training FLOPs, and
how does quality scale with the ensemble's size?

A study spec (YAML, see docs/study.md) names base settings and families of runs: ensemble families (the method,
each combine mode a curve) and single-model families (models of growing size, or one matched to an ensemble's
parameters), each a grid of settings crossed with seeds. Each seed sets a run's seed and data_seed, so the seeds
vary the data; every run of a study shares one test set. A family may tune its learning rate (on the first seed,
on the early-stopping slice), and then every family does. Every grid point is one main.py run with its own
output_root, STUDY/runs/NAME, so it can be found, skipped when finished and resumed when not.

Usage:
    python study.py SPEC.yaml                  # run every unfinished grid point here, one after another; collect
    python study.py SPEC.yaml --dry_run        # list the grid points, which are finished, and the time left
    python study.py SPEC.yaml --print_sbatch   # the sbatch lines that run the same grid as SLURM arrays (train.sh)
    python study.py SPEC.yaml --collect        # only collect: rows, fits, verdicts, figures and summary
    python study.py SPEC.yaml --latency        # after the runs: time each point's saved model (latency.csv); collect
    python study.py SPEC.yaml --latency --new_tokens 64 --repeats 5 --threads 1   # longer, steadier timings
    python study.py A.yaml B.yaml --across DIR # studies that differ in a setting (max_examples), side by side
    python study.py SPEC.yaml --keep_records DIR   # run, keeping each run's records in DIR/runs as it finishes
                                                   # (on a new machine: restored from there first, then go on)
    python study.py SPEC.yaml --records DIR    # the finished runs' records (no weights) into DIR/runs, to carry
    cp -r DIR/runs STUDY/                      # ... and back, on another machine: those runs count as finished

What collecting writes into the study folder:
    rows.csv         every finished run's metrics.csv rows, with run, family, series, kind, seed and its settings
    runs.csv         every grid point: its status and run folder
    run_times.csv    every grid point, tuning runs too: its launches and wall seconds (each run folder's
                     wall_time.csv, a row per launch); summary.md adds them up
    summary.csv      per series and point: mean and std of test CE over seeds, the x values
    fits.csv         L(x) = L_inf + A x^-alpha of CE against each x (only where 4 distinct x and 4 distinct mean
                     CEs determine it), with bootstrap intervals over seeds
    comparison.csv   per axis, ensemble point, single-model series and seed: the paired CE difference (on
                     train_flops the single model's curve read at the ensemble's spend, and the compute multiplier)
    verdicts.csv     per comparison: the mean difference over seeds, its 95% t-interval, wins, verdict, multiplier
    tuning.csv       with learning_rates: each tuning run's final early-stopping CE and the rate chosen (grid_edge:
                     chosen at the grid's lowest or highest rate, noted in summary.md)
    teacher_gap.csv  per ensemble series (a member size): its best ensemble's mean CE and gap closed, and the single
                     models matched to its family (`match`), with 95% t-intervals over seeds; the teacher's CE
    summary.md       the tables above, short, and the notes (fits and pairs left out, and why)
    ce_vs_*.png      CE against ensemble size, parameters, training FLOPs, depth (log x), with the determined fits

What --across writes into DIR (from each study's finished runs; each study's own folder is left as it is):
    across.csv       every study's verdicts (verdicts.csv's columns) after its name and the settings that tell the
                     studies apart (those every run of a study states alike, with values that differ between them)
    across.md        each study, its teacher and measured wall time, the hours in all, then the verdicts' table
    across_curves.png  a panel per study: single models' learning curves and ensembles against the students' own
                     training FLOPs (the teacher cache's build, the same for every run of a study, taken off)

What --latency writes (then collecting adds its section to summary.md and ce_vs_latency.png):
    latency.csv      per point (an ensemble family's at each size, a single family's at each grid point; one run of
                     it, the first seed's, stands for it): parameters, mean test CE over seeds with its 95%
                     t-interval, decode ms per token at batch 1 with a process per member (torchrun, gloo) and with
                     the members one after another in one process, whether it is on the Pareto frontier (no other
                     point has lower CE and lower latency), and the machine's thread settings. Timings come from
                     benchmarks/bench_inference.py's functions: the fastest of --repeats runs of --new_tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForCausalLM

from ensemble import ModelEnsemble, saved_ensemble_config
import plot
from benchmarks import bench_inference
from slm_ensembles.processes import run_command
from slm_ensembles.study.across import Panel, across_figure, across_markdown, across_table, differing_settings
from slm_ensembles.study.carrying import keep_records
from slm_ensembles.study.collecting import collect_rows, finished_examples, observations, point_table, wall_times
from slm_ensembles.study.comparison import deciding_verdicts, pairs_table, single_curves, verdict_table
from slm_ensembles.study.figures import latency_figure, study_figures
from slm_ensembles.study.fits import fit_all, fits_table
from slm_ensembles.study.grid import Study, StudyError
from slm_ensembles.study.latency import LATENCY_COLUMNS, first_members, latency_points, pareto_frontier, t_interval
from slm_ensembles.study.report import grid_edge_notes, summary_markdown
from slm_ensembles.study.running import dry_run_lines, run_study, sbatch_lines
from slm_ensembles.study.spec import load_spec
from slm_ensembles.study.teacher_gap import member_size, teacher_gap_table


# --- collecting: the pieces of slm_ensembles/study/, in order ---------------------------------------------------------

def mean_teacher_ce(rows: pd.DataFrame) -> float | None:
    """The teacher's test CE, averaged over the runs that evaluated it; None when none did."""
    teachers = [plot.teacher_ce(part) for _, part in rows.groupby("run")] if len(rows) else []
    teachers = [t for t in teachers if t is not None]
    return float(np.mean(teachers)) if teachers else None


def comparison(study: Study, rows: pd.DataFrame, runs: pd.DataFrame,
               setting: dict | None = None) -> tuple[Panel, list[str]]:
    """The study's comparison from its finished runs' rows and its grid points (collecting's, and a side-by-side's
    panel, which `setting` labels): observations, curves, pairs, verdicts, teacher, run times, training examples;
    and the notes on curves and pairs left out."""
    obs = observations(rows)
    curves, curve_notes = single_curves(rows)
    pairs, pair_notes = pairs_table(obs, curves, study.compare, study.matched)
    return (Panel(study.name, setting or {}, obs, curves, pairs, verdict_table(pairs), mean_teacher_ce(rows),
                  wall_times(study), finished_examples(runs), study.matched),
            curve_notes + pair_notes)


def collect(study: Study, replicates: int = 500) -> list[Path]:
    """Write the study folder's tables, figures and summary from the finished runs; the paths written."""
    study.folder.mkdir(parents=True, exist_ok=True)
    rows, runs = collect_rows(study)
    compared, compare_notes = comparison(study, rows, runs)
    obs, curves, verdicts, teacher, times = (compared.obs, compared.curves, compared.verdicts, compared.teacher,
                                             compared.times)
    points = point_table(obs)
    fits, notes = fit_all(obs, rows.columns, replicates)
    fits_frame = fits_table(fits)
    tables = {"rows.csv": rows, "runs.csv": runs, "run_times.csv": times, "summary.csv": points,
              "fits.csv": fits_frame, "comparison.csv": compared.pairs, "verdicts.csv": verdicts}
    if study.tuning:
        tables["tuning.csv"] = pd.DataFrame(list(study.tuning))
    gap = teacher_gap_table(rows, study.matched, {p.series: member_size(p.config) for p in study.points
                                                  if p.kind == "ensemble"})
    if len(gap):  # only where the study has ensemble runs
        tables["teacher_gap.csv"] = gap
    paths = []
    for name, table in tables.items():
        table.to_csv(study.folder / name, index=False)
        paths.append(study.folder / name)
    latency_path = study.folder / "latency.csv"  # written by --latency
    latency = pd.read_csv(latency_path) if latency_path.is_file() else None
    deciding = deciding_verdicts(verdicts, study.matched)
    (study.folder / "summary.md").write_text(summary_markdown(study, runs, points, fits_frame, verdicts, deciding,
                                                              notes + compare_notes
                                                              + grid_edge_notes(list(study.tuning)), teacher,
                                                              gap if len(gap) else None, latency, times))
    paths.append(study.folder / "summary.md")
    figures = study_figures(points, fits, teacher, obs, curves, study.name)
    if latency is not None and len(latency):
        figures["ce_vs_latency"] = latency_figure(latency)
    return paths + plot.save_figures(figures, study.folder)


def across(studies: list[Study], folder: Path) -> list[Path]:
    """Write across.csv, across.md and across_curves.png for studies set side by side into `folder`; the paths."""
    panels = [comparison(study, *collect_rows(study), setting)[0]
              for study, setting in zip(studies, differing_settings(studies))]
    folder.mkdir(parents=True, exist_ok=True)
    across_table(panels).to_csv(folder / "across.csv", index=False)
    (folder / "across.md").write_text(across_markdown(panels))
    return [folder / "across.csv", folder / "across.md",
            *plot.save_figures({"across_curves": across_figure(panels)}, folder)]


# --- latency: the timing itself (--latency), through benchmarks/bench_inference.py ------------------------------------
# A command's functions: the benchmark stands in the commands' layer, so this glue stays in the command.

@dataclasses.dataclass(frozen=True)
class Timing:
    """How --latency times a model: greedy decoding at batch 1 of `new_tokens` after a random prompt of
    `prompt_tokens`, each the fastest of `repeats` runs (benchmarks.bench_inference.timed_generation), every process
    on `threads` intra-op threads."""

    new_tokens: int = 32
    repeats: int = 3
    prompt_tokens: int = 32
    threads: int = 1

    def options(self, members: int, vocab_size: int) -> argparse.Namespace:
        """bench_inference's options for a model of `members` members (processes) and `vocab_size`."""
        return bench_inference.parse_args([
            "--members", str(members), "--vocab_size", str(vocab_size), "--batch_sizes", "1", "--prompt_tokens",
            str(self.prompt_tokens), "--new_tokens", str(self.new_tokens), "--repeats", str(self.repeats),
            "--threads", str(self.threads), "--statistic", "min", "--device", "cpu", "--json", ""])


def model_latency(folder: Path, size: int, timing: Timing) -> dict:
    """Decode ms per token of the first `size` members of the ensemble saved in `folder`: in parallel (one process
    per member under torchrun, over gloo) and sequentially (one process, one member after another); one member is
    timed alone, as a plain model in this process (both numbers). Its parameters too, and which weights were timed
    (trained; or random, for members kept as records only: see latency.first_members)."""
    config = saved_ensemble_config(folder)
    if not 1 <= size <= len(config.member_subfolders):
        raise StudyError(f"{folder} holds {len(config.member_subfolders)} member(s), not {size}")
    threads = torch.get_num_threads()
    torch.set_num_threads(timing.threads)
    try:
        with tempfile.TemporaryDirectory() as temporary:
            saved, weights = first_members(folder, size, Path(temporary) / "ensemble")
            if size == 1:
                model = AutoModelForCausalLM.from_pretrained(saved / config.member_subfolders[0],
                                                             use_safetensors=True).eval()
            else:
                model = ModelEnsemble.from_pretrained(saved, concurrent=False).eval()
            members = [model] if size == 1 else list(model.members)
            vocab_size = min(member.get_output_embeddings().weight.shape[0] for member in members)
            options = timing.options(size, vocab_size)
            sequential = bench_inference.timed_generation(model, 1, options)["decode_ms_per_token"]
            parallel = sequential if size == 1 else \
                bench_inference.distributed_rows(saved, options)[0]["decode_ms_per_token"]
            return dict(latency_ms_parallel=parallel, latency_ms_sequential=sequential, processes=size,
                        parameters=sum(map(bench_inference.parameters, members)), weights=weights)
    finally:
        torch.set_num_threads(threads)


def machine_settings(timing: Timing) -> dict:
    """The machine the latencies hold on: its CPU count and kind, the threads each process ran on."""
    return dict(threads_per_process=timing.threads, cpu_count=os.cpu_count(),
                machine=f"{platform.machine()} {platform.processor() or platform.system()}".strip())


def measure_latency(study: Study, timing: Timing, log=print) -> Path:
    """latency.csv: every point of the study's finished runs (an ensemble family's at each size, a single family's
    at each grid point), its mean test CE over seeds with its 95% t-interval (summary.csv's), and the decode latency
    per token of the saved model of one of its runs, in parallel and one member after another; the frontier."""
    rows, _ = collect_rows(study)
    if rows.empty:
        raise StudyError(f"study {study.name} has no finished run: nothing to time (--latency reads the saved "
                         f"models of finished runs)")
    points = latency_points(rows)
    table = []
    for index, point in enumerate(points.itertuples(index=False), 1):
        log(f"[{index}/{len(points)}] {point.series}, {point.point}: {point.ensemble_size} member(s) of {point.run}",
            flush=True)
        low, high = t_interval(point.ce_mean, point.ce_std, int(point.seeds))
        measured = model_latency(Path(point.run_dir) / "ensemble", point.ensemble_size, timing)
        table.append(dict(family=point.family, series=point.series, kind=point.kind, point=point.point,
                          ensemble_size=point.ensemble_size, seeds=int(point.seeds), ce_mean=point.ce_mean,
                          ce_low=low, ce_high=high, run=point.run, **measured, **machine_settings(timing),
                          prompt_tokens=timing.prompt_tokens, new_tokens=timing.new_tokens, repeats=timing.repeats,
                          statistic="min"))
    table = pd.DataFrame(table)
    table["frontier"] = pareto_frontier(table["ce_mean"], table["latency_ms_parallel"])
    path = study.folder / "latency.csv"
    table[LATENCY_COLUMNS].to_csv(path, index=False)
    return path


# --- command line -----------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, nargs="+",
                        help="the study spec (YAML; see docs/study.md); several only with --across")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry_run", action="store_true",
                      help="list the grid points, which are finished, and the time left; run nothing")
    mode.add_argument("--print_sbatch", action="store_true",
                      help="write each unstarted run's settings to STUDY/slurm/ and print the sbatch lines")
    mode.add_argument("--collect", action="store_true", help="only collect the finished runs; run nothing")
    mode.add_argument("--records", type=Path, metavar="DIR",
                      help="copy the finished runs' records (CSV, YAML, manifests, configs; no weights) into DIR/runs; "
                           "copied back into the study folder on another machine, those runs count as finished")
    mode.add_argument("--across", type=Path, metavar="DIR",
                      help="set several studies' finished runs side by side (they differ in a setting, such as "
                           "max_examples): across.csv, across.md and across_curves.png into DIR; run nothing")
    mode.add_argument("--latency", action="store_true",
                      help="time the finished runs' saved models (decode ms per token at batch 1, members in "
                           "parallel processes and one after another) into latency.csv; then collect")
    parser.add_argument("--keep_records", type=Path, metavar="DIR",
                        help="while running, copy each finished run's records into DIR/runs as it finishes (and "
                             "those finished before), as --records does: a machine lost mid-study loses one run; "
                             "first copy back the kept runs the study folder lacks, so the command goes on there")
    parser.add_argument("--bootstrap", type=int, default=500, metavar="N",
                        help="bootstrap resamples of the seeds for the fits' intervals (default: 500; 0: none)")
    timing = Timing()
    parser.add_argument("--new_tokens", type=int, default=timing.new_tokens,
                        help=f"--latency: tokens decoded per timing (default: {timing.new_tokens})")
    parser.add_argument("--repeats", type=int, default=timing.repeats,
                        help=f"--latency: timings per model, the fastest kept (default: {timing.repeats})")
    parser.add_argument("--prompt_tokens", type=int, default=timing.prompt_tokens,
                        help=f"--latency: the random prompt's length (default: {timing.prompt_tokens})")
    parser.add_argument("--threads", type=int, default=timing.threads,
                        help=f"--latency: intra-op threads per process (default: {timing.threads})")
    args = parser.parse_args(argv)
    if len(args.spec) != 1 and not args.across:
        parser.error(f"one study spec, or several with --across DIR (given {len(args.spec)})")
    if args.keep_records and any((args.dry_run, args.print_sbatch, args.collect, args.records, args.across,
                                  args.latency)):
        parser.error("--keep_records copies records while the study runs: use it without --dry_run, "
                     "--print_sbatch, --collect, --records, --across and --latency (--records DIR copies them once)")
    return args


def main(argv=None) -> int:
    """0 when every run asked for finished (or nothing ran), 1 when one did not, 2 for a spec it cannot use."""
    args = parse_args(argv)
    try:
        if args.across:
            for path in across([load_spec(spec) for spec in args.spec], args.across):
                print(path)
            return 0
        study = load_spec(args.spec[0])
        if args.dry_run:
            print("\n".join(dry_run_lines(study)))
            return 0
        if not study.points:  # every family waits for the study its rates are tuned in
            raise StudyError(f"nothing to run yet: {'; '.join(study.waiting)}; run the spec named by tuned_in first")
        if args.print_sbatch:
            print("\n".join(sbatch_lines(study)))
            return 0
        if args.records:
            copied = keep_records(study, args.records)
            print(f"{len(copied)} finished run(s) kept as records in {args.records / 'runs'}")
            return 0
        if args.latency:
            print(measure_latency(study, Timing(args.new_tokens, args.repeats, args.prompt_tokens, args.threads)))
        failed = []
        while not args.collect and not args.latency and not failed:
            failed = run_study(study, args.keep_records)
            before, study = study.waiting, load_spec(args.spec[0])  # finished tuning runs give the later seeds' runs
            if study.waiting == before:
                break
        for path in collect(study, args.bootstrap):
            print(path)
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if failed:
        print(f"{len(failed)} run(s) did not finish: {', '.join(failed)}; run the same command again to resume",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))  # the wrapper every command runs through (processes.run_command)
