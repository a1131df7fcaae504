"""Config composition and the `stn train` command line.

Every dataset x model x transformer combination of conf/ either composes (and builds its model and one
batch) or fails with a ConfigError naming the fix; typos and wrong types name the key; STN_DATA_DIR sets
the default data_dir and a command-line data_dir beats it; `stn train` runs end to end through CliRunner.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from typer.testing import CliRunner

from stn.cli import app
from stn.config import (
    DATA_DIR_ENV,
    GROUPS,
    Config,
    ConfigError,
    compose,
    from_container,
    group_choices,
    to_dict,
    to_yaml,
)
from stn.data import distort
from stn.models import build_model

DATASETS = group_choices("dataset")
MODELS = group_choices("model")
TRANSFORMERS = group_choices("transformer")
runner = CliRunner()


def test_the_groups_are_the_papers_axes() -> None:
    assert set(DATASETS) >= {"R", "RTS", "P", "E", "TC", "plain"}
    assert set(MODELS) == {"fcn", "cnn", "st_fcn", "st_cnn"}
    assert set(TRANSFORMERS) == {"none", "affine", "projective", "tps"}
    assert set(group_choices("trainer")) >= {"paper", "quick", "smoke"}


# P's readings (P_box, ...) build the same 28x28 models as P: composed and drawn in tests/test_p_readings.py
SHAPES = [name for name in DATASETS if not name.startswith("P_")]


@pytest.mark.parametrize(("dataset", "model", "transformer"), list(itertools.product(SHAPES, MODELS, TRANSFORMERS)))
def test_every_combination_composes_or_names_the_fix(dataset: str, model: str, transformer: str) -> None:
    overrides = [f"dataset={dataset}", f"model={model}", f"transformer={transformer}"]
    valid = model.startswith("st_") == (transformer != "none")
    if not valid:
        with pytest.raises(ConfigError) as err:
            compose(overrides)
        # The message says what to change: add a transformer, or use the ST model / drop the transformer.
        fix = "add transformer=" if model.startswith("st_") else f"use model=st_{model}"
        assert fix in str(err.value)
        return
    cfg = compose(overrides)
    assert (cfg.dataset.name, cfg.model.name, cfg.transformer.type) == (dataset, model, transformer)
    assert cfg.run_name == "-".join([dataset, model] + ([transformer] if transformer != "none" else []))
    # The model builds and takes one distorted batch of this dataset (random digits: shapes, not content).
    generator = torch.Generator().manual_seed(0)
    digits = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8, generator=generator)
    images, _ = distort(digits, cfg.dataset, generator, clutter_source=digits)
    assert images.shape == (2, 1, cfg.dataset.size, cfg.dataset.size)
    with torch.no_grad():
        assert build_model(cfg)(images).shape == (2, 10)


def test_every_trainer_preset_composes_with_two_lr_drops() -> None:
    for preset in group_choices("trainer"):
        cfg = compose([f"trainer={preset}"])
        assert cfg.trainer.name == preset
        # Two lr drops within the run, like the paper's 150k iterations with drops at 50k and 100k.
        assert cfg.trainer.iterations // cfg.trainer.lr_step >= 2


def test_presets_have_the_papers_schedule() -> None:
    paper = compose([]).trainer
    assert (paper.name, paper.iterations, paper.batch_size, paper.lr, paper.lr_step, paper.lr_gamma) == (
        "paper", 150_000, 256, 0.01, 50_000, 0.1,
    )  # fmt: skip
    assert paper.weight_decay == 0.0
    quick = compose(["trainer=quick"]).trainer
    assert quick.iterations < paper.iterations and quick.lr == paper.lr


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.iteratons=5", "trainer.iterations"),  # a typo: the nearest key is suggested
        ("seeed=3", "did you mean seed"),
        ("trainer.iterations=abc", "trainer.iterations"),  # a wrong type
        ("seed=1.5", "seed"),
        ("logger.mode=loud", "logger.mode"),
        ("trainer.device=tpu", "trainer.device"),
        ("trainer.lr=-1", "trainer.lr"),
        ("trainer.stop_after=0", "trainer.stop_after"),
        ("logger.card_draws=-1", "logger.card_draws=-1: outside"),
        ("logger.artifacts=maybe", "logger.artifacts"),
        ("dataset=XYZ", "choices for dataset: E, P, P_axis, P_box, P_box20, P_image, P_redraw, R, RTS, TC, plain"),
    ],
)
def test_bad_overrides_name_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        compose([override])


def test_schema_keys_missing_from_the_yaml_can_be_overridden() -> None:
    # dataset.test_limit is a DatasetConfig field that conf/dataset/*.yaml do not list.
    assert compose(["dataset.test_limit=10"]).dataset.test_limit == 10
    assert compose(["dataset.test_limit=10"]).dataset.test_limit == 10


def test_data_dir_comes_from_the_environment_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert compose([]).data_dir == "data"
    monkeypatch.setenv(DATA_DIR_ENV, "/somewhere/mnist")
    assert compose([]).data_dir == "/somewhere/mnist"
    assert compose(["data_dir=/elsewhere"]).data_dir == "/elsewhere"  # the command line wins


def test_a_config_round_trips_through_yaml_and_dict() -> None:
    cfg = compose(["dataset=RTS", "model=st_cnn", "transformer=tps", "trainer=quick", "logger.tags=[a,b]"])
    assert from_container(OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))) == cfg
    assert from_container(to_dict(cfg)) == cfg
    assert set(to_dict(cfg)) >= set(GROUPS)


def test_cli_prints_the_resolved_config() -> None:
    result = runner.invoke(app, ["train", "dataset=P", "model=st_fcn", "transformer=projective", "seed=7", "--cfg"])
    assert result.exit_code == 0, result.output
    printed = from_container(OmegaConf.to_container(OmegaConf.create(result.stdout)))
    assert printed == compose(["dataset=P", "model=st_fcn", "transformer=projective", "seed=7"])


def test_cli_help_lists_groups_and_choices() -> None:
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())  # rich wraps lines
    for group in GROUPS:
        assert f"{group}: {', '.join(group_choices(group))}" in text


def test_cli_bad_config_is_one_clear_line() -> None:
    result = runner.invoke(app, ["train", "model=st_cnn"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "transformer=affine" in lines[0]
    assert "Traceback" not in result.output


def test_cli_trains_end_to_end_and_writes_a_run_folder(tmp_path: Path) -> None:
    args = ["train", "trainer=smoke", "trainer.device=cpu", "logger.mode=disabled", f"runs_dir={tmp_path}",
            "model=st_fcn", "transformer=affine", "dataset.train_limit=256", "dataset.test_limit=100"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (run_dir,) = tmp_path.glob("*/*-R-st_fcn-affine")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"test error {summary['test_error']:.2f}% | run folder {run_dir}" in result.stdout
    assert {p.name for p in run_dir.iterdir()} == {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints",
                                                   "command.txt"}
    assert (run_dir / "command.txt").read_text() == f"stn {' '.join(args)}\n"
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    saved: Config = from_container(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")))
    assert saved.run_name == "R-st_fcn-affine" and saved.trainer.name == "smoke"
    # The same command again, resuming: the finished run is returned, not retrained.
    again = runner.invoke(app, [*args, f"run_dir={run_dir}", "trainer.resume=true"])
    assert again.exit_code == 0 and "already finished" in again.stdout


def test_cli_training_errors_are_one_clear_line(tmp_path: Path) -> None:
    args = ["train", "trainer=smoke", "trainer.device=cpu", "logger.mode=disabled", f"run_dir={tmp_path / 'run'}",
            "model=fcn", "dataset.train_limit=256", "dataset.test_limit=100"]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, args)  # the folder now holds a finished run
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "already holds a run" in lines[0] and "trainer.resume=true" in lines[0]


def test_cli_stop_after_says_how_to_continue(tmp_path: Path) -> None:
    args = ["train", "trainer=smoke", "trainer.device=cpu", "logger.mode=disabled", f"run_dir={tmp_path / 'run'}",
            "model=fcn", "dataset.train_limit=256", "dataset.test_limit=100"]
    result = runner.invoke(app, [*args, "trainer.stop_after=5"])
    assert result.exit_code == 0
    assert f"Continue with trainer.resume=true run_dir={tmp_path / 'run'}" in result.stderr
    resumed = runner.invoke(app, [*args, "trainer.resume=true"])
    assert resumed.exit_code == 0 and "resuming" in resumed.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["resumed_from"] == 5


def test_wandb_environment_variables_sit_between_the_command_line_and_the_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_NAME",
                 "WANDB_TAGS"):
        monkeypatch.delenv(name, raising=False)
    default = compose().logger
    assert (default.mode, default.project, default.entity, default.group, default.name, default.tags) == (
        "offline", "stn", None, None, None, [])
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "envproj")
    monkeypatch.setenv("WANDB_ENTITY", "team")
    monkeypatch.setenv("WANDB_RUN_GROUP", "g")
    monkeypatch.setenv("WANDB_NAME", "nice name")
    monkeypatch.setenv("WANDB_TAGS", "a, b,,c")
    env = compose().logger
    assert (env.mode, env.project, env.entity, env.group, env.name, env.tags) == (
        "disabled", "envproj", "team", "g", "nice name", ["a", "b", "c"])
    # A logger.* value on the command line wins over its variable; the others still come from the environment.
    cli = compose(["logger.mode=offline", "logger.project=cliproj", "logger.tags=[x]", "logger.name=n"]).logger
    assert (cli.mode, cli.project, cli.entity, cli.name, cli.tags) == ("offline", "cliproj", "team", "n", ["x"])
    # wandb's older mode names and WANDB_DISABLED are honoured; a bad WANDB_MODE is named in the error.
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert compose().logger.mode == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert compose().logger.mode == "disabled"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="logger.mode='sometimes' \\(WANDB_MODE='sometimes'"):
        compose()
