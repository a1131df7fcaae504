"""The second training recipe (trainer.schedule=onecycle, trainer.nesterov) and the validation split
(dataset.validation) it is tuned on: the schedule against the one-cycle formula written out here, the split's
digits and draws, what a validation run records, and the bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from stn.compose import compose
from stn.config import ConfigError
from stn.data import build_data
from stn.mnist import load_mnist
from stn.runs import CheckpointError
from stn.train import TrainingInterrupted, build_optimizer, build_scheduler, fit


def one_cycle_lr(step: int, total: int, peak: float) -> float:
    """The lr step `step` (0-based) trains with, from the one-cycle definition (Smith & Topin 2019, as PyTorch
    states it): cosine from peak/25 up to peak over the first 30% of the steps (reached at step 0.3*total - 1),
    then cosine down to peak/25/1e4 at the last step."""
    start, end = peak / 25, peak / 25 / 1e4
    top = 0.3 * total - 1
    if step <= top:
        t, low, high = step / top, start, peak
    else:
        t, low, high = (step - top) / (total - 1 - top), peak, end
    return high + (low - high) / 2 * (math.cos(math.pi * t) + 1)


def test_onecycle_follows_the_one_cycle_formula():
    cfg = compose(["trainer=quick", "trainer.schedule=onecycle", "trainer.lr=0.05", "trainer.iterations=200"])
    optimizer = build_optimizer(nn.Linear(2, 2), cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer)
    seen = []
    for _ in range(200):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [one_cycle_lr(s, 200, 0.05) for s in range(200)]
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert max(seen) == pytest.approx(0.05) and seen.index(max(seen)) == 59  # 0.3 * 200 - 1


def test_the_paper_schedule_is_unchanged_by_default():
    cfg = compose(["trainer=quick"])
    assert (cfg.trainer.schedule, cfg.trainer.nesterov) == ("step", False)
    optimizer = build_optimizer(nn.Linear(2, 2), cfg.trainer)
    assert isinstance(build_scheduler(optimizer, cfg.trainer), torch.optim.lr_scheduler.StepLR)
    assert optimizer.param_groups[0]["nesterov"] is False
    nesterov = compose(["trainer=quick", "trainer.nesterov=true"]).trainer
    assert build_optimizer(nn.Linear(2, 2), nesterov).param_groups[0]["nesterov"] is True


def test_the_validation_split_is_held_out_training_digits(data_dir):
    cfg = compose(["dataset=R", "dataset.validation=1000", f"data_dir={data_dir}", "trainer=smoke"])
    stream, held_out = build_data(cfg, "cpu")
    digits, labels = load_mnist(data_dir, train=True)
    assert len(stream.digits) == 59_000 and torch.equal(stream.digits, digits[:59_000])
    assert torch.equal(held_out.labels, labels[59_000:])
    # the held-out digits, distorted with test_seed + 1: not the test set's draws of the same positions
    _, test_set = build_data(compose(["dataset=R", f"data_dir={data_dir}", "trainer=smoke"]), "cpu")
    assert not torch.equal(held_out.params["angle_deg"], test_set.params["angle_deg"][:1000])
    again = build_data(cfg, "cpu")[1]
    assert torch.equal(again.images, held_out.images)  # a fixed set, like the test set


def test_a_validation_run_records_val_error_and_never_the_test_error(tmp_path, small):
    summary = fit(small("dataset.validation=300", "dataset.train_limit=512"))
    assert "val_error" in summary and "test_error" not in summary
    assert 0 <= summary["val_error"] <= 100
    metrics = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert any("val_error" in m for m in metrics) and not any("test_error" in m for m in metrics)


def test_a_onecycle_run_cannot_resume_with_other_iterations(tmp_path, small):
    recipe = ("dataset.train_limit=512", "trainer.schedule=onecycle", "trainer.nesterov=true")
    with pytest.raises(TrainingInterrupted) as stopped:
        fit(small(*recipe, "trainer.stop_after=10"))
    resume = (*recipe, "trainer.resume=true", f"run_dir={stopped.value.run_dir}")
    with pytest.raises(CheckpointError, match="one-cycle schedule over 20 steps"):
        fit(small(*resume, "trainer.iterations=100"))
    assert fit(small(*resume))["steps"] == 20  # with its own iterations it continues


@pytest.mark.parametrize("overrides, named", [
    (["trainer.schedule=cosine"], "trainer.schedule"),
    (["trainer.nesterov=true", "trainer.momentum=0"], "trainer.nesterov"),
    (["dataset.validation=20000", "dataset.train_limit=50000"], "dataset.validation"),
    (["dataset.validation=60000"], "dataset.validation"),
    (["dataset.validation=59900", "trainer.batch_size=128"], "trainer.batch_size"),
])
def test_bad_recipe_settings_name_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        compose(["trainer=quick", *overrides])


def test_stn_train_reports_the_validation_error(tmp_path, data_dir):
    from typer.testing import CliRunner

    from stn.cli import app

    result = CliRunner().invoke(app, ["train", "trainer=smoke", "trainer.device=cpu", "logger.mode=disabled",
                                      f"runs_dir={tmp_path}", f"data_dir={data_dir}", "dataset.train_limit=512",
                                      "dataset.validation=200"])
    assert result.exit_code == 0, result.output
    assert "val error " in result.output and "test error" not in result.output
