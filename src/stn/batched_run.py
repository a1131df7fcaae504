"""One batched group being trained: K models' steps, their on-device loss sums, and slices to a deadline.

`GroupRun` ties a `stn.batched.BatchedModels` to its streams (`stn.batched_data`) and keeps what a table run
reports and resumes from (losses read once per slice, the first non-finite step per model, wall time, images);
`train_for` trains it in slices until it finishes or the next slice would pass a deadline (`stn.plan`'s chunks).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from stn.batched import BatchedModels
from stn.device import sync


@dataclass
class GroupRun:
    """One batched group being trained: engine, data, on-device accumulators, and its finished figures."""

    engine: BatchedModels
    stream: Any  # BatchedStream | BlockStream
    iterations: int
    log_every: int = 100
    loss_sum: Tensor | None = None
    bad_step: Tensor | None = None
    logged_step: int = 0
    last_losses: list[float] = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0  # wall time spent in steps (all invocations)
    images: int = 0  # training images seen, all models together (all invocations)

    def __post_init__(self) -> None:
        device = self.engine.device
        self.loss_sum = torch.zeros(self.engine.k, device=device)
        self.bad_step = torch.full((self.engine.k,), -1, dtype=torch.int64, device=device)
        self.logged_step = self.engine.step_count

    @property
    def step(self) -> int:
        return self.engine.step_count

    @property
    def done(self) -> bool:
        return self.step >= self.iterations

    def advance(self, steps: int) -> int:
        """Up to `steps` more steps (never past `iterations`), no host sync; returns the steps taken."""
        steps = min(steps, self.iterations - self.step)
        for _ in range(steps):
            images, labels = self.stream.next()
            losses = self.engine.step(images, labels)
            self.loss_sum += losses
            self.bad_step = torch.where((self.bad_step < 0) & ~losses.isfinite(), self.step, self.bad_step)
        return steps

    def read_losses(self) -> list[float]:
        """The mean loss per model since the last read (one host-device sync)."""
        since = self.step - self.logged_step
        if since > 0:
            self.last_losses = (self.loss_sum / since).tolist()
            self.loss_sum.zero_()
            self.logged_step = self.step
        return self.last_losses

    def bad_steps(self) -> list[int]:
        return [int(s) for s in self.bad_step.cpu()]

    def state_dict(self) -> dict[str, Any]:
        return {"engine": self.engine.state_dict(), "streams": self.stream.state_dict(),
                "train_seconds": self.train_seconds, "images": self.images, "last_losses": self.last_losses,
                "bad_step": self.bad_step.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state["engine"])
        self.stream.load_state_dict(state["streams"])
        self.train_seconds, self.images = float(state["train_seconds"]), int(state["images"])
        self.last_losses = list(state["last_losses"])
        self.bad_step = state["bad_step"].to(self.engine.device)
        self.logged_step = self.engine.step_count


def train_for(run: GroupRun, deadline: float, *, clock: Callable[[], float] = time.perf_counter,
              slice_steps: int | None = None) -> int:
    """Train `run` until it finishes or `deadline` (clock seconds) would be passed; returns the steps done.

    Steps go in slices of `slice_steps` (default: log_every); after each slice the device is synced (the
    loss is read) and the slice's time measured, and another slice starts only if one more fits before the
    deadline at the slowest rate seen so far. Losses are read at each slice end: one sync per slice.
    """
    per_slice = slice_steps or run.log_every
    done, worst = 0, 0.0
    while not run.done:
        start = clock()
        if worst and start + worst > deadline:
            break
        taken = run.advance(per_slice)
        run.read_losses()
        sync(run.engine.device)
        seconds = clock() - start
        worst = max(worst, seconds * per_slice / max(taken, 1))
        run.train_seconds += seconds
        run.images += taken * run.engine.k * run.stream.streams[0].batch_size
        done += taken
    return done
