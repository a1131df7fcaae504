"""The config as it is saved (round trips through YAML and dict) and the `stn train` command line end to end."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf
from typer.testing import CliRunner

from stn.cli.main import app
from stn.compose import compose, from_container, group_choices
from stn.config import GROUPS, Config, to_dict, to_yaml

runner = CliRunner()


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
                                                   "command.txt", ".hydra", "train.log", "transformations.png"}
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


def test_cli_stop_after_prints_a_command_that_continues_the_run_as_typed(tmp_path: Path) -> None:
    """The stop message's command, typed exactly as printed (no overrides of the original), continues the run
    with the configuration recorded in its folder; an explicit override that contradicts it is still refused."""
    import shlex

    folder = tmp_path / "my run"  # a space: the printed command quotes it
    args = ["train", "trainer=smoke", "trainer.device=cpu", "logger.mode=disabled", f"run_dir={folder}",
            "model=fcn", "dataset.train_limit=256", "dataset.test_limit=100", "trainer.batch_size=16", "seed=3"]
    result = runner.invoke(app, [*args, "trainer.stop_after=5"])
    assert result.exit_code == 0, result.output
    printed = result.stderr.split("Continue with: ")[1].strip()
    assert printed == f"stn train trainer.resume=true run_dir={shlex.quote(str(folder))}"
    words = shlex.split(printed)
    clash = runner.invoke(app, [*words[1:], "trainer.batch_size=32"])
    assert clash.exit_code == 2 and "trainer.batch_size: 16 -> 32" in clash.stderr
    resumed = runner.invoke(app, words[1:])
    assert resumed.exit_code == 0 and "from step 5 of 20" in resumed.stdout, resumed.output
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["resumed_from"] == 5 and summary["steps"] == 20 and summary["seed"] == 3
    saved = OmegaConf.load(folder / "config.yaml")
    assert saved.trainer.batch_size == 16 and saved.dataset.train_limit == 256 and saved.trainer.stop_after is None
    assert saved.logger.mode == "disabled"  # recorded, not WANDB_MODE's
