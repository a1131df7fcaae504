"""How a training run talks to its terminal and answers signals: the progress bar and Ctrl-C / SIGTERM.

`Console` draws a rich progress bar on a terminal and only the per-evaluation lines on a pipe or file;
`stop_on_signals` turns SIGINT/SIGTERM into a flag the loop checks after each step (checkpoint, then stop),
and a second Ctrl-C into an immediate KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Without a terminal (a pipe, a log file, a batch job), a progress line at a log step at least this many seconds
# after the last line: the paper's schedule evaluates every 10,000 steps, an hour or more apart on a CPU.
PROGRESS_EVERY_S = 60.0
# A CPU run whose schedule would take longer than this at the measured rate says so, and how to ask for less.
LONG_RUN_S = 30 * 60


def duration(seconds: float) -> str:
    """'2 h 05 min', '14 min', '40 s'."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def long_run_note(steps_left: int, steps_per_s: float, batch_size: int, trainer_name: str,
                  device: str) -> str | None:
    """The note a long run on a CPU prints once its rate is measured: how long the rest will take, and the
    CPU-sized schedule (trainer=quick: 1200 steps of 128) with its time at the same images/s; None for a run
    shorter than LONG_RUN_S or off the CPU."""
    if device != "cpu" or steps_per_s <= 0 or steps_left / steps_per_s < LONG_RUN_S:
        return None
    quick = "" if trainer_name == "quick" else (
        f"; for a CPU-sized schedule add trainer=quick (1200 steps of 128: about "
        f"{duration(1200 * 128 / (steps_per_s * batch_size))} here)")
    return (f"note: {steps_left:,} steps left at the measured {steps_per_s:.2f} steps/s on this CPU: about "
            f"{duration(steps_left / steps_per_s)} (trainer={trainer_name}){quick}; Ctrl-C stops with a "
            f"checkpoint to resume from")


class Console:
    """A rich progress bar on a terminal; on a pipe or file, the per-eval lines and a progress line at least
    every PROGRESS_EVERY_S seconds (at log steps; no bar, no escape codes)."""

    def __init__(self, total: int, completed: int, title: str, log_file: Path | None = None) -> None:
        self.progress = None
        self.total, self.title, self.last_line = total, title, time.monotonic()
        self.log_file = log_file  # every line also goes here (the run folder's train.log), terminal or not
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} it/s  loss {task.fields[loss]}"), TimeRemainingColumn(),
            )  # fmt: skip
            self.task = self.progress.add_task(title, total=total, completed=completed, rate="-", loss="-")
            self.progress.start()

    def advance(self, step: int, loss: float | None = None, rate: float | None = None) -> None:
        if self.progress is not None and loss is not None and rate and self.log_file is not None \
                and time.monotonic() - self.last_line >= PROGRESS_EVERY_S:  # the bar is not in the log: a line is
            self.log(f"{self.title} step {step}/{self.total} | loss {loss:.4f} | {rate:.1f} steps/s")
            self.last_line = time.monotonic()
        if self.progress is None:
            if loss is not None and rate and time.monotonic() - self.last_line >= PROGRESS_EVERY_S:
                left = duration((self.total - step) / rate)
                self.line(f"{self.title} step {step}/{self.total} | loss {loss:.4f} | {rate:.1f} steps/s | "
                          f"{left} left")
            return
        fields = {} if loss is None else {"loss": f"{loss:.4f}", "rate": f"{rate:.1f}"}
        self.progress.update(self.task, completed=step, **fields)

    def log(self, text: str) -> None:
        """`text` into the log file only (with the time), e.g. what the caller prints itself."""
        if self.log_file is not None:
            from stn.runs import append_line  # never through a symbolic link (a run folder trusts nothing)

            append_line(self.log_file, f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}")

    def line(self, text: str) -> None:
        self.log(text)
        if self.progress is not None:
            self.progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, flush=True)
        self.last_line = time.monotonic()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict[str, int]]:
    """SIGINT/SIGTERM set flag['signal'] (the loop then checkpoints and stops); a second SIGINT aborts at once."""
    flag: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and flag:
            raise KeyboardInterrupt
        flag["signal"] = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              f"(Ctrl-C again aborts without one)", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
