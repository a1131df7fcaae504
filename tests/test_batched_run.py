"""stn.batched_run: a group resumes exactly from its state; train_for stops before its deadline."""

from __future__ import annotations

import pytest
import torch

from engine_setup import CPU, KINDS, configs
from stn.batched import BatchedModels, EngineOptions
from stn.batched_data import BatchedStream, make_stream
from stn.batched_run import GroupRun, train_for


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
    first.advance(3)
    state = first.state_dict()
    second = fresh()
    second.load_state_dict(state)
    second.advance(10)  # stops at iterations
    assert second.step == 6 and second.done
    for name, p in straight.engine.params.items():
        assert torch.equal(p, second.engine.params[name]), name
    assert torch.equal(straight.loss_sum, first.loss_sum + second.loss_sum)


def test_train_for_stops_before_the_deadline(mnist) -> None:
    cfgs = configs(KINDS["FCN"], seeds=(0,))
    run = GroupRun(BatchedModels(cfgs, CPU), BatchedStream(cfgs, *mnist, CPU), iterations=100, log_every=2)
    ticks = iter(range(1000))
    done = train_for(run, deadline=5, clock=lambda: float(next(ticks)))  # every clock read: one second later
    assert 0 < done < 100 and run.step == done and not run.done
    assert len(run.last_losses) == 1
