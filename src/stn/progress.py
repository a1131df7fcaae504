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
from collections.abc import Iterator
from typing import Any


class Console:
    """A rich progress bar on a terminal; on a pipe or file, only the per-eval lines (no bar, no escape codes)."""

    def __init__(self, total: int, completed: int, title: str) -> None:
        self.progress = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} it/s  loss {task.fields[loss]}"), TimeRemainingColumn(),
            )  # fmt: skip
            self.task = self.progress.add_task(title, total=total, completed=completed, rate="-", loss="-")
            self.progress.start()

    def advance(self, step: int, loss: float | None = None, rate: float | None = None) -> None:
        if self.progress is None:
            return
        fields = {} if loss is None else {"loss": f"{loss:.4f}", "rate": f"{rate:.1f}"}
        self.progress.update(self.task, completed=step, **fields)

    def line(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, flush=True)

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
