"""Batched groups being trained: K models' steps, their on-device losses, and several groups in flight at once.

`GroupRun` ties a `stn.engine.batched.BatchedModels` to its streams (`stn.engine.streams`) and keeps what a table run
reports and resumes from (each model's mean loss per `log_every` window and first non-finite step, both on the
device; wall time, images). `InFlight` trains several GroupRuns at once on one device, issuing their steps in
turn (round-robin) until one finishes or none can do another unit of steps before a deadline; `train_for` is
that with one group (`stn.engine.plan`'s chunks, the bench, the tests).

How groups run concurrently (`stn engine run --in-flight N`, N = 1: one group after another):
- chosen: one CUDA stream per group (its "lane"), each group's step one CUDA graph (`EngineOptions.cuda_graph`),
  replayed round-robin from this one thread. A replay is one launch, so the host issues a unit of steps of
  every group in flight far faster than the GPU runs them, and the GPU overlaps kernels of different streams
  wherever one group's kernels leave SMs idle: small groups (the FCNs, K = 3 on RTS and TC) then cost little
  beyond their own arithmetic, and the per-step launch latency is hidden behind other groups' work. Each lane
  keeps `depth` units queued and is topped up when one completes (CUDA events, polled), so a fast group is not
  paced by a slow one, and each unit's length adapts to about `unit_s` seconds (few launches per unit, short
  queues). On the CPU there are no streams or events: the same code is plain round-robin of units, which is how
  it is tested (tests/test_batched_run.py, tests/test_plan.py); tests/test_cuda.py checks the overlap with a
  profiler trace.
- a thread per group: the GIL serialises the Python that issues the steps anyway (a graph replay is one
  launch, so there is little to parallelise), graph capture in one thread conflicts with launches from
  another (capture_error_mode), and the interleaving, hence the deadline's cut, would be nondeterministic.
- one big graph of all groups' steps (forked streams inside one capture): one launch per round, but the set
  of groups in flight changes as groups finish and others start (a recapture each time, with every group's
  static inputs and memory pool), and every group would advance at the pace of the slowest. Worth measuring
  only if the host turns out to be the bottleneck with one graph per group.
`InFlight(streams=False)` keeps the round-robin on one stream (the GPU then serialises the groups): the A/B
against which the streams' gain is measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from stn.engine.batched import BatchedModels


@dataclass
class GroupRun:
    """One batched group being trained: engine, data, on-device accumulators, and its finished figures.

    Losses: each step's (K,) losses are summed on the device; at every multiple of `log_every` steps (and at
    `iterations`) the window's mean is kept (`window`) and the sum restarts, all without a host sync. The
    windows depend on the step count only, never on how the steps were sliced or interleaved, so a run
    stopped and resumed, or run beside other groups, reports the same final loss.
    """

    engine: BatchedModels
    stream: Any  # BatchedStream | BlockStream
    iterations: int
    log_every: int = 100
    cuda_stream: Any = None  # the CUDA stream this group's work is issued on (None: the current stream)
    loss_sum: Tensor | None = None
    bad_step: Tensor | None = None
    window_start: int = 0  # the step the open loss window began at
    window: Tensor | None = None  # (K,) mean loss of the last closed window, on the device
    last_losses: list[float] = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0  # wall time this group was in flight (all invocations)
    images: int = 0  # training images seen, all models together (all invocations)

    def __post_init__(self) -> None:
        device = self.engine.device
        self.loss_sum = torch.zeros(self.engine.k, device=device)
        self.bad_step = torch.full((self.engine.k,), -1, dtype=torch.int64, device=device)
        self.window_start = self.engine.step_count

    @property
    def step(self) -> int:
        return self.engine.step_count

    @property
    def done(self) -> bool:
        return self.step >= self.iterations

    @property
    def images_per_step(self) -> int:
        return self.engine.k * self.stream.streams[0].batch_size

    def lane(self) -> contextlib.AbstractContextManager[Any]:
        """Where this group's work goes: its own CUDA stream when it has one, else the current stream."""
        return torch.cuda.stream(self.cuda_stream) if self.cuda_stream is not None else contextlib.nullcontext()

    def advance(self, steps: int) -> int:
        """Up to `steps` more steps (never past `iterations`), issued on its lane, no host sync; returns the
        steps taken."""
        steps = min(steps, self.iterations - self.step)
        assert self.loss_sum is not None and self.bad_step is not None
        with self.lane():
            for _ in range(steps):
                images, labels = self.stream.next()
                losses = self.engine.step(images, labels)
                self.loss_sum += losses
                self.bad_step = torch.where((self.bad_step < 0) & ~losses.isfinite(), self.step, self.bad_step)
                if self.step % self.log_every == 0 or self.step == self.iterations:
                    self.window = self.loss_sum / (self.step - self.window_start)
                    self.loss_sum.zero_()
                    self.window_start = self.step
        return steps

    def read_losses(self) -> list[float]:
        """The mean loss per model over the last closed window (one sync of this group's lane)."""
        if self.window is not None:
            with self.lane():
                self.last_losses = self.window.tolist()
        return self.last_losses

    def bad_steps(self) -> list[int]:
        assert self.bad_step is not None
        with self.lane():
            return [int(s) for s in self.bad_step.cpu()]

    def state_dict(self) -> dict[str, Any]:
        assert self.loss_sum is not None and self.bad_step is not None
        with self.lane():
            return {"engine": self.engine.state_dict(), "streams": self.stream.state_dict(),
                    "train_seconds": self.train_seconds, "images": self.images, "last_losses": self.last_losses,
                    "bad_step": self.bad_step.cpu(), "loss_sum": self.loss_sum.cpu(),
                    "window_start": self.window_start,
                    "window": None if self.window is None else self.window.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.engine.device
        with self.lane():
            self.engine.load_state_dict(state["engine"])
            self.stream.load_state_dict(state["streams"])
            self.train_seconds, self.images = float(state["train_seconds"]), int(state["images"])
            self.last_losses = list(state["last_losses"])
            self.bad_step = state["bad_step"].to(device)
            # states written before the loss windows (2026-11-30): the open window restarts at the saved step
            self.loss_sum = state["loss_sum"].to(device) if "loss_sum" in state else torch.zeros(self.engine.k,
                                                                                                   device=device)
            self.window_start = int(state.get("window_start", self.engine.step_count))
            window = state.get("window")
            self.window = None if window is None else window.to(device)


@dataclass
class _Unit:
    steps: int
    issued: float  # clock reading when issued
    start: Any = None  # CUDA events around the unit on its lane (None on the CPU: the unit has already run)
    end: Any = None
    host_seconds: float = 0.0  # on the CPU: the clock time the unit took

    def finished(self) -> bool:
        return self.end is None or bool(self.end.query())


@dataclass
class _Lane:
    run: GroupRun
    unit: int  # steps per unit, next time
    pending: deque[_Unit] = dataclasses.field(default_factory=deque)
    worst_per_step: float = 0.0  # the slowest unit seen, seconds per step (the deadline's estimate)
    units_done: int = 0


class InFlight:
    """Several GroupRuns trained at once on one device, their units of steps issued in turn (see the module
    docstring for why this design).

    streams: give each group added its own CUDA stream (CUDA only; False: round-robin on the current stream).
    unit_steps: steps per unit at first (default: each run's log_every); unit_s: adapt each lane's unit so it
    takes about this many seconds (None: fixed units, as on the CPU, where the cut at a deadline must not
    depend on timings); depth: units queued per lane (CUDA; on the CPU a unit has finished when it returns).
    """

    def __init__(self, device: torch.device | str, *, streams: bool = False, clock: Callable[[], float] =
                 time.perf_counter, unit_steps: int | None = None, unit_s: float | None = None, depth: int = 2,
                 max_unit: int = 512) -> None:
        self.device = torch.device(device)
        self.streams = bool(streams) and self.device.type == "cuda"
        self.events = self.device.type == "cuda"
        self.clock, self.unit_steps, self.unit_s = clock, unit_steps, unit_s
        self.depth, self.max_unit = max(1, depth), max_unit
        self.lanes: list[_Lane] = []
        # asked before every unit: True (a signal) issues no more units, as if the deadline had come, so the
        # caller checkpoints every lane at a step boundary
        self.stopping: Callable[[], bool] = lambda: False

    @property
    def runs(self) -> list[GroupRun]:
        return [lane.run for lane in self.lanes]

    def add(self, run: GroupRun) -> None:
        """Put `run` in flight (on a new stream with streams=True, ordered after the work that built it)."""
        if self.streams and run.cuda_stream is None:
            run.cuda_stream = torch.cuda.Stream(device=self.device)
            run.cuda_stream.wait_stream(torch.cuda.current_stream(self.device))
        self.lanes.append(_Lane(run, max(1, self.unit_steps or run.log_every)))

    def remove(self, run: GroupRun) -> None:
        """Take `run` out (after its queued work: the caller evaluates or saves it next)."""
        lane = next(lane for lane in self.lanes if lane.run is run)
        while lane.pending:
            self._wait(lane)
        self.lanes.remove(lane)

    def _wait(self, lane: _Lane) -> None:
        unit = lane.pending[0]
        if unit.end is not None:
            unit.end.synchronize()
        self._retire(lane)

    def _retire(self, lane: _Lane) -> None:
        """Account the lane's finished units (their measured time feeds the deadline estimate and the unit size)."""
        while lane.pending and lane.pending[0].finished():
            unit = lane.pending.popleft()
            # on CUDA the lane's own span between its events, the other lanes' kernels running beside it
            seconds = unit.start.elapsed_time(unit.end) / 1000 if unit.end is not None else unit.host_seconds
            per_step = seconds / max(unit.steps, 1)
            lane.units_done += 1
            # the first unit carries the warm-up (graph capture, cuDNN's first calls): it counts only until a
            # second unit has been measured, or a fast group would stop long before the deadline
            first_again = lane.units_done == 2
            lane.worst_per_step = per_step if first_again else max(lane.worst_per_step, per_step)
            if self.unit_s is not None and per_step > 0:  # halve or double at most, towards unit_s per unit
                wanted = round(self.unit_s / per_step)
                lane.unit = int(min(self.max_unit, max(1, lane.unit // 2, min(2 * lane.unit, wanted))))

    def _issue(self, lane: _Lane) -> None:
        run = lane.run
        unit = _Unit(lane.unit, self.clock())
        if self.events:
            unit.start, unit.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with run.lane():
                unit.start.record()
        taken = run.advance(lane.unit)
        unit.steps = taken
        run.images += taken * run.images_per_step
        if self.events:
            with run.lane():
                unit.end.record()
        else:
            unit.host_seconds = self.clock() - unit.issued
        lane.pending.append(unit)

    def _fits(self, lane: _Lane, deadline: float) -> bool:
        """Another unit fits if the lane's queued units plus one more, at its slowest unit so far, end before
        the deadline (the first unit of a lane is always taken: `stn.engine.plan` checks a group's cost before adding it)."""
        queued = sum(unit.steps for unit in lane.pending) + lane.unit
        return not lane.worst_per_step or self.clock() + lane.worst_per_step * queued <= deadline

    def train(self, deadline: float) -> list[GroupRun]:
        """Issue units round-robin until a run finishes (returned, its work complete; the others keep their
        queued work) or no lane can take another unit before `deadline` (returns [], every lane drained)."""
        began = self.clock()
        try:
            while True:
                issued, finished = False, []
                for lane in self.lanes:
                    self._retire(lane)
                    if lane.run.done:
                        if not lane.pending:
                            finished.append(lane.run)
                    elif len(lane.pending) < self.depth and not self.stopping() and self._fits(lane, deadline):
                        self._issue(lane)
                        issued = True
                if finished:
                    return finished
                waiting = [lane for lane in self.lanes if lane.pending]
                if not issued:
                    if not waiting:
                        return []
                    self._wait(min(waiting, key=lambda lane: lane.pending[0].issued))
        finally:
            spent = self.clock() - began
            for lane in self.lanes:
                lane.run.train_seconds += spent

    def drain(self) -> None:
        """Wait for every lane's queued work."""
        for lane in self.lanes:
            while lane.pending:
                self._wait(lane)


def train_for(run: GroupRun, deadline: float, *, clock: Callable[[], float] = time.perf_counter,
              slice_steps: int | None = None) -> int:
    """Train `run` alone until it finishes or `deadline` (clock seconds) would be passed; returns the steps done.

    Units of `slice_steps` (default: log_every); another starts only if it fits before the deadline at the
    slowest rate seen so far. The last closed loss window is read at the end (one sync)."""
    before = run.step
    flight = InFlight(run.engine.device, clock=clock, unit_steps=slice_steps)
    flight.add(run)
    flight.train(deadline)
    flight.drain()
    run.read_losses()
    return run.step - before
