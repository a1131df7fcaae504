"""stn.validation, called directly on configs built in code (test_faults.py drives the same checks through the
command line): every range belongs to a real key, each problem is its own line naming its key, NaN is refused,
the distortion checks guard code-built datasets, and the schedule note says where the lr drops."""

from __future__ import annotations

import dataclasses

import pytest

from stn.config import Config, ConfigError, DatasetConfig, TrainerConfig, schema_keys
from stn.validation import RANGES, check_dataset, problems, schedule_warning, validate


def test_every_range_names_a_settable_key() -> None:
    assert set(RANGES) <= set(schema_keys())


def test_each_problem_is_one_line_naming_its_key() -> None:
    cfg = Config(trainer=TrainerConfig(lr=0.0, iterations=0), seed=-1)
    found = problems(cfg)
    assert len(found) == 3
    for key in ("trainer.lr=0.0", "trainer.iterations=0", "seed=-1"):
        assert sum(line.startswith(key + ":") for line in found) == 1, found
    assert "(0, None]" in next(line for line in found if line.startswith("trainer.lr"))  # lr > 0: open bound
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).splitlines() == found


def test_nan_and_inf_are_refused_everywhere() -> None:
    cfg = Config(trainer=TrainerConfig(momentum=float("nan"), weight_decay=float("inf")))
    assert problems(cfg) == ["trainer.momentum=nan: must be a finite number",
                             "trainer.weight_decay=inf: must be a finite number"]


def test_a_dataset_built_in_code_is_checked_too() -> None:
    check_dataset(DatasetConfig())  # plain MNIST: fine
    with pytest.raises(ConfigError, match=r"dataset plain: dataset\.scale_min=2\.0 exceeds dataset\.scale_max=1\.0"):
        check_dataset(DatasetConfig(scale_min=2.0, scale_max=1.0))
    too_big = DatasetConfig(size=28, translate=True, scale_max=1.5)
    with pytest.raises(ConfigError, match="does not fit the canvas"):
        check_dataset(too_big)


def test_the_schedule_note_says_where_the_lr_drops() -> None:
    cfg = Config(trainer=dataclasses.replace(TrainerConfig(), iterations=1000, lr_step=400))
    note = schedule_warning(["trainer.iterations=1000"], cfg)
    assert note is not None and "at steps 400, 800" in note and "fractions 0.4, 0.8" in note
    assert schedule_warning(["trainer.iterations=1000", "trainer.lr_step=400"], cfg) is None
    assert schedule_warning(["seed=1"], cfg) is None
