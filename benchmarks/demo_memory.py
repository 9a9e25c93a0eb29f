"""Peak resident memory of a run (the demo by default), phase by phase: data, teacher, training, evaluation,
saving, samples, report.

    python -m benchmarks.demo_memory                                     # the demo as `python main.py` runs it
    python -m benchmarks.demo_memory --total_rounds 2 --steps_per_round 4 --output_root /tmp/runs
                                                              # any main.py settings, passed through
    python -m benchmarks.demo_memory --json results/demo_memory.json     # also write the figures there

The run is main.main in this process; main.py's steps are wrapped to say which phase is running. Each phase's peak
is the kernel's high-water mark of resident memory (VmHWM in /proc/self/status), reset when the phase begins
(writing 5 to /proc/self/clear_refs), or a sampler thread's highest reading (every 20 ms) where that is higher or
the kernel refuses the reset. The whole run's peak is the highest phase's. (The reset also resets getrusage's
ru_maxrss, so `/usr/bin/time -v` around this script under-reports; around `python main.py` it measures the same
peak.) Linux only.
"""

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path

import config as config_lib
import main as main_module
import preprocess_dataset
import train
from slm_ensembles import records, teacher_cache
from slm_ensembles import teacher as teacher_lib

# main.py's steps, by the phase they belong to. A step inside another (saved_member inside trained_student) counts
# for its own phase while it runs.
PHASES = {
    teacher_lib: {"teacher_tokenizer": "data", "rounds_teacher": "teacher", "evaluation_teacher": "teacher"},
    main_module: {"new_student": "training", "trained_student": "training", "saved_member": "saving",
                  "with_member": "evaluation", "evaluate_round": "evaluation", "record_round": "saving",
                  "report": "report"},
    records: {"write_sample_answers": "samples"},
    preprocess_dataset: {"prepare_for_run": "data"},
    teacher_cache: {"training_cache": "teacher"},
}
SAMPLE_SECONDS = 0.02


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS; whether the kernel allowed it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PhaseMeter:
    """The peak resident memory of each phase of a run, and of each time a phase ran (the timeline)."""

    def __init__(self):
        self.stack: list[str] = ["setup"]  # before any wrapped step: config, process state
        self.started = time.time()
        self.phase_started = self.started
        self.sampled_peak = 0
        self.can_reset = reset_high_water_mark()
        self.timeline: list[dict] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.sampler = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.stopped.wait(SAMPLE_SECONDS):
            rss = status_kib("VmRSS")
            with self.lock:
                self.sampled_peak = max(self.sampled_peak, rss)

    def close_phase(self) -> None:
        """Record the phase on top of the stack up to now, and start measuring anew."""
        with self.lock:
            peak = max(self.sampled_peak, status_kib("VmHWM") if self.can_reset else 0, status_kib("VmRSS"))
            now = time.time()
            self.timeline.append({"phase": self.stack[-1], "peak_mib": round(peak / 1024, 1),
                                  "end_mib": round(status_kib("VmRSS") / 1024, 1),
                                  "seconds": round(now - self.phase_started, 2)})
            self.phase_started = now
            self.sampled_peak = 0
            reset_high_water_mark()

    @contextlib.contextmanager
    def phase(self, name: str):
        self.close_phase()
        self.stack.append(name)
        try:
            yield
        finally:
            self.close_phase()
            self.stack.pop()

    def wrap(self, function, name: str):
        @functools.wraps(function)
        def wrapped(*args, **kwargs):
            with self.phase(name):
                return function(*args, **kwargs)
        return wrapped

    def summary(self) -> dict:
        phases: dict[str, dict] = {}
        for entry in self.timeline:
            phase = phases.setdefault(entry["phase"], {"peak_mib": 0.0, "seconds": 0.0})
            phase["peak_mib"] = max(phase["peak_mib"], entry["peak_mib"])
            phase["seconds"] = round(phase["seconds"] + entry["seconds"], 2)
        return phases


def merged_timeline(timeline: list[dict]) -> list[dict]:
    """Consecutive entries of one phase merged (a phase is cut where a nested one begins and ends)."""
    merged: list[dict] = []
    for entry in timeline:
        if entry["seconds"] == 0 and merged:
            continue
        if merged and merged[-1]["phase"] == entry["phase"]:
            last = merged[-1]
            last.update(peak_mib=max(last["peak_mib"], entry["peak_mib"]), end_mib=entry["end_mib"],
                        seconds=round(last["seconds"] + entry["seconds"], 2))
        else:
            merged.append(dict(entry))
    return merged


def measure(main_argv: list[str]) -> dict:
    """Run main.main(main_argv) with its phases measured; the figures as a dict."""
    meter = PhaseMeter()
    originals = [(module, step, getattr(module, step)) for module, steps in PHASES.items() for step in steps]
    for module, step, function in originals:
        setattr(module, step, meter.wrap(function, PHASES[module][step]))
    step_rss: list[float] = []  # resident memory after each training step, in order (rounds one after another)
    training_step = train.DistillationTrainer.training_step

    def measured_training_step(self, *args, **kwargs):
        loss = training_step(self, *args, **kwargs)
        step_rss.append(round(status_kib("VmRSS") / 1024, 1))
        print(f"[demo_memory] resident after training step {len(step_rss)}: {step_rss[-1]:.0f} MiB", flush=True)
        return loss

    train.DistillationTrainer.training_step = measured_training_step
    meter.sampler.start()
    started = time.time()
    try:
        exit_code = main_module.main(main_argv)
    finally:
        meter.stopped.set()
        meter.close_phase()
        train.DistillationTrainer.training_step = training_step
        for module, step, function in originals:
            setattr(module, step, function)
    seconds = time.time() - started
    phases = meter.summary()
    peak_mib = max(phase["peak_mib"] for phase in phases.values())
    if not meter.can_reset:  # nothing reset the kernel's own peak: it counts too
        peak_mib = max(peak_mib, round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    return {"command": " ".join(["python", "-m", "benchmarks.demo_memory", *main_argv]), "exit_code": exit_code,
            "peak_mib": peak_mib, "peak_gb": round(peak_mib * 2**20 / 1e9, 2), "seconds": round(seconds, 1),
            "phase_peaks_by": "VmHWM reset per phase" if meter.can_reset else f"RSS sampled every {SAMPLE_SECONDS} s",
            "machine": f"{platform.machine()}, {platform.system()}", "cpus": os.cpu_count(), "phases": phases,
            "timeline": merged_timeline(meter.timeline), "rss_after_each_training_step_mib": step_rss}


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """The probe's options, and the command line main.py gets: the same, less --json."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--json", default=None, help="write the figures as JSON here")
    parser.add_argument("--preset", default=None, help="passed to main.py, as are the settings below")
    parser.add_argument("--config", default=None, help="passed to main.py")
    config_lib.add_config_arguments(parser)
    options, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    main_argv = []
    for index, word in enumerate(argv):
        if word == "--json" or word.startswith("--json=") or (index and argv[index - 1] == "--json"):
            continue
        main_argv.append(word)
    return options, main_argv


def main(argv=None) -> dict:
    options, main_argv = parse_args(argv)
    results = measure(main_argv)
    print(f"\npeak resident memory {results['peak_mib']:.0f} MiB ({results['peak_gb']} GB) over "
          f"{results['seconds']:.0f} s ({results['phase_peaks_by']}); by phase:")
    for name, phase in results["phases"].items():
        print(f"  {name:<11} peak {phase['peak_mib']:>8.1f} MiB  {phase['seconds']:>8.1f} s")
    if options.json:
        Path(options.json).parent.mkdir(parents=True, exist_ok=True)
        Path(options.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"written: {options.json}")
    return results


if __name__ == "__main__":
    sys.exit(main()["exit_code"])
