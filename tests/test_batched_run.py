"""stn.engine.group_run: a group resumes exactly from its state; groups in flight train as each alone, take turns,
and stop before their deadline."""

from __future__ import annotations

import pytest
import torch

from engine_setup import CPU, KINDS, configs
from stn.engine.batched import BatchedModels
from stn.engine.group_run import GroupRun, InFlight, train_for
from stn.engine.options import EngineOptions
from stn.engine.streams import BatchedStream, make_stream


@pytest.mark.parametrize("data", ["exact", "block"])
def test_resume_from_state_is_exact(data, mnist) -> None:
    cfgs = configs(KINDS["ST-CNN Aff"], seeds=(0, 1))
    options = EngineOptions(data=data, block_steps=2)

    def fresh() -> GroupRun:
        return GroupRun(BatchedModels(cfgs, CPU, options), make_stream(cfgs, *mnist, CPU, options), iterations=6,
                        log_every=2)

    straight = fresh()
    straight.advance(6)
    first = fresh()
    first.advance(3)  # mid-block (blocks of 2) and mid loss window (windows of 2)
    state = first.state_dict()
    second = fresh()
    second.load_state_dict(state)
    second.advance(10)  # stops at iterations
    assert second.step == 6 and second.done
    for name, p in straight.engine.params.items():
        assert torch.equal(p, second.engine.params[name]), name
    assert straight.read_losses() == second.read_losses()
    assert torch.equal(straight.bad_step, second.bad_step)


def test_loss_windows_follow_the_step_count_not_the_slicing(mnist) -> None:
    """The mean loss of each log_every window is the same however the steps were cut (and resumed): units of
    3 steps against windows of 4, a state taken mid-window."""
    cfgs = configs(KINDS["FCN"], seeds=(0, 1))

    def fresh() -> GroupRun:
        return GroupRun(BatchedModels(cfgs, CPU), BatchedStream(cfgs, *mnist, CPU), iterations=10, log_every=4)

    straight, windows = fresh(), []
    for _ in range(10):
        straight.advance(1)
        if straight.step % 4 == 0 or straight.step == 10:
            windows.append(straight.read_losses())
    assert len(windows) == 3
    cut = fresh()
    cut.advance(3)
    cut.advance(3)  # step 6: the window 5-8 is open
    resumed = fresh()
    resumed.load_state_dict(cut.state_dict())
    assert resumed.read_losses() == windows[0]
    resumed.advance(3)
    assert resumed.read_losses() == windows[1]
    resumed.advance(3)
    assert resumed.done and resumed.read_losses() == windows[2]  # the last window: steps 9-10


def test_groups_in_flight_train_exactly_as_each_alone(mnist) -> None:
    """Round-robin of two groups (units of 2 steps, on the CPU: no streams) gives each group the parameters
    and losses it gets trained alone, and ends each at its own iterations."""
    groups = [configs(KINDS["FCN"], seeds=(0, 1)), configs(KINDS["ST-CNN Aff"], seeds=(3,))]
    iterations = [5, 3]

    def runs() -> list[GroupRun]:
        return [GroupRun(BatchedModels(c, CPU), BatchedStream(c, *mnist, CPU), iterations=n, log_every=2)
                for c, n in zip(groups, iterations, strict=True)]

    alone = runs()
    for run in alone:
        train_for(run, deadline=float("inf"))
    together = runs()
    flight = InFlight(CPU, streams=True, unit_steps=2)  # streams: ignored off CUDA
    for run in together:
        flight.add(run)
    finished = []
    while flight.runs:
        done = flight.train(float("inf"))
        assert done, "nothing finished without a deadline"
        for run in done:
            flight.remove(run)
            finished.append(together.index(run))
    assert finished == [1, 0]  # the 3-step group first
    for a, b in zip(alone, together, strict=True):
        assert b.cuda_stream is None and a.step == b.step
        for name, p in a.engine.params.items():
            assert torch.equal(p, b.engine.params[name]), name
        assert a.read_losses() == b.read_losses()


def test_in_flight_stops_every_group_before_the_deadline(mnist) -> None:
    cfgs = configs(KINDS["FCN"], seeds=(0,))
    runs = [GroupRun(BatchedModels(cfgs, CPU), BatchedStream(cfgs, *mnist, CPU), iterations=100, log_every=2)
            for _ in range(2)]
    ticks = iter(range(1000))
    flight = InFlight(CPU, clock=lambda: float(next(ticks)))  # every clock read: one second later
    for run in runs:
        flight.add(run)
    assert flight.train(deadline=20) == []
    assert all(0 < run.step < 100 for run in runs)
    assert abs(runs[0].step - runs[1].step) <= 2  # turns alternate: neither group starves


def test_units_adapt_towards_unit_s(mnist) -> None:
    """With unit_s, a lane's unit doubles (at most) while its units take less than unit_s, up to max_unit."""
    cfgs = configs(KINDS["FCN"], seeds=(0,))
    run = GroupRun(BatchedModels(cfgs, CPU), BatchedStream(cfgs, *mnist, CPU), iterations=60, log_every=2)
    ticks = iter(range(1000))
    flight = InFlight(CPU, clock=lambda: float(next(ticks)), unit_steps=1, unit_s=100.0, max_unit=16)
    flight.add(run)
    sizes = []
    original = flight._issue

    def issue(lane) -> None:
        sizes.append(lane.unit)
        original(lane)

    flight._issue = issue  # type: ignore[method-assign]
    flight.train(float("inf"))
    assert sizes[:6] == [1, 2, 4, 8, 16, 16]  # each unit "takes" one clock second, far below unit_s


def test_train_for_stops_before_the_deadline(mnist) -> None:
    cfgs = configs(KINDS["FCN"], seeds=(0,))
    run = GroupRun(BatchedModels(cfgs, CPU), BatchedStream(cfgs, *mnist, CPU), iterations=100, log_every=2)
    ticks = iter(range(1000))
    done = train_for(run, deadline=5, clock=lambda: float(next(ticks)))  # every clock read: one second later
    assert 0 < done < 100 and run.step == done and not run.done
    assert len(run.last_losses) == 1


def test_the_warm_up_unit_does_not_set_the_deadline_estimate(mnist) -> None:
    """A lane's first unit (graph capture, first kernel calls) counts only until a second one is measured;
    from then on the estimate is the slowest unit after it."""
    from stn.engine.group_run import _Lane, _Unit

    cfgs = configs(KINDS["FCN"], seeds=(0,))
    flight = InFlight(CPU)
    lane = _Lane(GroupRun(BatchedModels(cfgs, CPU), BatchedStream(cfgs, *mnist, CPU), iterations=10), unit=2)
    worst = []
    for seconds in (20.0, 1.0, 3.0, 2.0):
        lane.pending.append(_Unit(steps=2, issued=0.0, host_seconds=seconds))
        flight._retire(lane)
        worst.append(lane.worst_per_step)
    assert worst == [10.0, 0.5, 1.5, 1.5]
