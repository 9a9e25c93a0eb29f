"""How a command's processes stop: preemption signals, exit codes, and the one wrapper every command line runs its
main through, which turns the project's errors into the exit code a launcher acts on.

- SIGTERM and SIGUSR1 (what SLURM sends before a time limit or a preemption) are recorded (PreemptionSignal), and a
  training stops at the next step boundary on every process at once (StopOnSignal); the command then exits with
  EXIT_PREEMPTED.
- Exit codes: 0 done, 1 failed, 2 bad input (fix it, then run again), 75 preempted (run the same command again: it
  continues).
"""

import os
import signal
import sys
from collections.abc import Callable

import torch
from accelerate.utils import reduce
from transformers import TrainerCallback

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"


class LostProcessError(RuntimeError):
    """A process of the group died or stalled: the others stopped, naming it."""


# --- exit codes -----------------------------------------------------------------------------------------------------

def run_command(main: Callable[[], object], refusals: tuple[type[Exception], ...] = (),
                failures: tuple[type[Exception], ...] = ()) -> int:
    """Run a command's `main` and return the exit code a launcher acts on: the code `main` returns (anything else it
    returns, None or a result, is EXIT_DONE); one of `refusals` (bad input) is one line and EXIT_BAD_INPUT, one of
    `failures` one line and EXIT_FAILED. The process group, if any, is left whatever happens, except after a
    LostProcessError: that is one line and exit 1 at once, since leaving the group would wait for the lost peer."""
    try:
        code = main()
    except LostProcessError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        os._exit(EXIT_FAILED)
    except refusals as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT  # every process refuses alike, so none waits for another when they leave the group
    except failures as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        leave_process_group()
    return code if isinstance(code, int) else EXIT_DONE


def leave_process_group() -> None:
    """Destroy the process group, if any: a gloo group still alive at interpreter exit can abort a finished process
    ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# --- signals ------------------------------------------------------------------------------------------------------

def any_process(flag: bool, device) -> bool:
    """Whether `flag` is true on any process; every process must call this at the same point. Called every step:
    a single process answers at once, with no device tensor and no host sync."""
    if not torch.distributed.is_initialized():
        return flag
    return reduce(torch.tensor(int(flag), device=device), reduction="sum").item() > 0


class PreemptionSignal:
    """Records SIGTERM/SIGUSR1; the training loop checkpoints and stops at the next step boundary.

    The handler only sets a flag and writes one line straight to stderr's file descriptor, so a second signal
    while a checkpoint is being written changes nothing. (print() from a handler can raise: the handler may run
    while the main code is inside a write to the same buffered stdout.)
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self.previous_handlers: dict = {}

    def install(self) -> "PreemptionSignal":
        self.previous_handlers = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __enter__(self) -> "PreemptionSignal":
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back the handlers that install() replaced (main() called in-process leaves none of its own)."""
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            os.write(2, f"\nsignal {signal.Signals(signum).name}: checkpointing at the next step, then exiting with "
                        f"code {EXIT_PREEMPTED} (resume with --resume)\n".encode())
        self.received = signum

    def received_anywhere(self, device) -> bool:
        """Whether any process has received a signal; every process must call this at the same point.

        Processes must stop together: one stopping at a step boundary while another trains on would leave the
        other waiting for a gradient all-reduce that never comes. A process that learns of another's signal
        counts it as its own.
        """
        if any_process(self.received is not None, device) and self.received is None:
            self.received = signal.SIGUSR1
        return self.received is not None


class StopOnSignal(TrainerCallback):
    """Turns a received preemption signal into a checkpoint and a stop at the end of the current step."""

    def __init__(self, preemption: PreemptionSignal):
        self.preemption = preemption

    def on_step_end(self, args, state, control, **kwargs):
        if self.preemption.received_anywhere(args.device):
            control.should_save = True
            control.should_training_stop = True
        return control


def preempted_during_setup(preemption: "PreemptionSignal", device, next_step: str) -> bool:
    """Whether a signal has come (to any process) before `next_step`: the run then stops, nothing written."""
    if not preemption.received_anywhere(device):
        return False
    print(f"preempted during setup: stopping before {next_step}, with nothing written (exit code "
          f"{EXIT_PREEMPTED}); run the same command again to continue")
    return True


def exit_process(exit_code: int) -> None:
    """Exit with `exit_code`. Where several processes run (WORLD_SIZE > 1), skip the interpreter's teardown, where
    one of them now and then aborts in a C++ destructor ("terminate called without an active exception") after
    everything has been written."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)
