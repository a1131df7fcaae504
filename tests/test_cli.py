"""stn.cli.main: the help screens list exactly the commands click has registered (bad input: test_faults.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from stn.cli.main import app

runner = CliRunner()


def listed_commands(help_text: str) -> set[str]:
    """The command names in the 'Commands' box of a Typer help screen (rich draws it with │ borders; a name
    starts right after the border, wrapped descriptions are indented)."""
    box = help_text.split("Commands")[1]
    return {line[2:].split()[0] for line in box.splitlines() if line.startswith("│ ") and line[2:3].strip()}


def test_cli_help_lists_exactly_the_registered_commands():
    """Every command click knows (the registry, not a list restated here) is on the help screen, and nothing else."""
    import typer.main

    group = typer.main.get_command(app)
    for path, command in (([], group), (["data"], group.commands["data"]), (["bench"], group.commands["bench"])):
        result = runner.invoke(app, [*path, "--help"], terminal_width=200)
        assert result.exit_code == 0
        assert listed_commands(result.output) == set(command.commands), (path, result.output)
    assert {"train", "data", "reproduce-table", "models", "visualize", "bench"} <= set(group.commands)


@pytest.mark.subprocess
def test_version_and_python_dash_m(tmp_path) -> None:
    """`stn --version` prints the installed version; `python -m stn` is the same command (run from another folder)."""
    import os
    import subprocess
    import sys
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"stn {version('stn')}\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "stn", "--version"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == result.output
    done = subprocess.run([sys.executable, "-m", "stn", "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "reproduce-table" in done.stdout and "Usage: stn" in done.stdout


@pytest.mark.subprocess
def test_a_stn_folder_in_the_working_directory_cannot_join_the_package(tmp_path) -> None:
    """stn is a regular package: a folder named `stn` where the user stands (with its own cli.py) is not merged
    into it, so `python -m stn` runs stn's CLI, not that file."""
    import os
    import subprocess
    import sys

    import stn

    stranger = tmp_path / "stn"
    stranger.mkdir()
    (stranger / "cli.py").write_text("print('not stn')\nraise SystemExit(7)\n")
    (stranger / "__main__.py").write_text("print('not stn')\nraise SystemExit(7)\n")
    src = str(Path(stn.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": src}
    done = subprocess.run([sys.executable, "-c", "import stn, stn.cli.main; print(stn.__version__, stn.cli.main.__file__)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    version, cli_file = done.stdout.split()
    assert version == stn.__version__ and Path(cli_file).resolve().parents[1] == Path(stn.__file__).resolve().parent


def test_choice_types_match_what_they_choose_from() -> None:
    """The CLI's Literal choices are the config groups and module constants they stand for."""
    from typing import get_args

    from stn.cli import common
    from stn.cli import engine as engine_cli
    from stn.compose import group_choices
    from stn.config import TRAINER_PRESETS
    from stn.engine.options import EngineOptions
    from stn.launch.executors import EXECUTORS

    assert sorted(TRAINER_PRESETS) == sorted(group_choices("trainer"))
    assert get_args(common.Executor) == EXECUTORS
    assert get_args(engine_cli.Mode)[0] == EngineOptions().mode and get_args(engine_cli.DataChoice)[0] == EngineOptions().data


def test_short_flags_mean_one_thing_everywhere() -> None:
    """Every short flag (-o, -n, -d, ...) stands for the same long option in every command: -o is --out,
    and --override has no short form."""
    import typer.main

    meanings: dict[str, set[str]] = {}
    outs_without_o: list[str] = []

    def walk(command) -> None:
        for param in getattr(command, "params", []):
            longs = [name for name in param.opts if name.startswith("--")]
            if "--out" in longs and "-o" not in param.opts:
                outs_without_o.append(command.name)
            for short in (name for name in param.opts + param.secondary_opts if len(name) == 2):
                meanings.setdefault(short, set()).update(longs)
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    assert meanings.get("-o") == {"--out"} and outs_without_o == []
    assert {short: longs for short, longs in meanings.items() if len(longs) != 1} == {}


@pytest.mark.subprocess
def test_shell_completion_script_and_answers(monkeypatch) -> None:
    """`stn --show-completion` prints the script for the user's shell (typer detects it; its test switch turns
    detection off so the shell can be named here); the script's callback completes commands and an option's
    choices (here through `python -m stn`, as the installed `stn` script does)."""
    import os
    import subprocess
    import sys

    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    for shell, marker in (("bash", "complete -o default -F _stn_completion stn"), ("zsh", "#compdef stn"),
                          ("fish", "complete --command stn")):
        result = runner.invoke(app, ["--show-completion", shell], prog_name="stn")
        assert result.exit_code == 0 and marker in result.output and "_STN_COMPLETE" in result.output, result.output

    def complete(words: str) -> list[str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "_STN_COMPLETE": "complete_bash",
               "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)}
        done = subprocess.run([sys.executable, "-m", "stn"], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("stn tr") == ["train"]
    assert complete("stn reproduce-table --preset ") == ["smoke", "quick", "demo", "paper"]


def test_dataset_choices_are_every_dataset_and_refuse_the_rest() -> None:
    """--dataset offers Table 1's datasets and P's readings, each of which composes to the dataset of that name
    (a file whose `name` disagrees would fail here), and a name outside them exits 2 listing them."""
    from typing import get_args

    from stn.cli.common import DatasetName
    from stn.compose import compose

    choices = get_args(DatasetName)
    assert {"R", "RTS", "P", "E", "TC", "P_axis", "P_image"} <= set(choices)
    assert [compose([f"dataset={name}"]).dataset.name for name in choices] == list(choices)
    result = runner.invoke(app, ["models", "--dataset", "Q"])
    assert result.exit_code == 2 and "'Q'" in result.output and "'P_axis'" in result.output, result.output


def test_reproduce_table_dry_run_lists_each_run_and_writes_nothing(tmp_path) -> None:
    """--dry-run plans the table as reproduce would (same folders) and says what each run would do:
    train (nothing there), resume (a checkpoint), done (a summary.json of the same config)."""
    import dataclasses
    from pathlib import Path

    from stn.config import to_yaml
    from stn.tables.reproduce import dry_run

    grid = Path(__file__).resolve().parents[1] / "experiments" / "table1" / "grid.yaml"
    out = tmp_path / "table"
    args = ["reproduce-table", "--dry-run", "--grid", str(grid), "--rows", "CNN,FCN", "--columns", "R",
            "--seeds", "0,1", "--preset", "smoke", "--out", str(out)]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "4 runs: 0 done, 0 to resume, 4 to train" in result.output and not out.exists()

    _, jobs = dry_run(grid, rows=["CNN", "FCN"], columns=["R"], seeds=[0, 1], preset="smoke", out=out)
    finished, stopped = jobs[0][0], jobs[1][0]
    finished.run_dir.mkdir(parents=True)
    (finished.run_dir / "config.yaml").write_text(to_yaml(finished.config))
    (finished.run_dir / "summary.json").write_text('{"test_error": 1.0}')
    (stopped.run_dir / "checkpoints").mkdir(parents=True)
    (stopped.run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "4 runs: 1 done, 1 to resume, 2 to train" in result.output
    lines = [line.split() for line in result.output.splitlines()[:4]]
    assert [(words[0], words[3], words[4]) for words in lines] == [  # the grid file's row order
        ("FCN", "0", "done"), ("FCN", "1", "resume"), ("CNN", "0", "train"), ("CNN", "1", "train")]
    # A finished folder of another experiment is refused, as reproduce refuses it.
    other = dataclasses.replace(finished.config, seed=9)
    (finished.run_dir / "config.yaml").write_text(to_yaml(other))
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 2 and "was trained with a different config" in result.output


def test_help_is_rendered_as_written() -> None:
    """--help prints help texts literally (no Rich markup eaten), gives flags no value type, names what --cfg
    takes, writes arguments on the usage line as Click does, and never folds a choice list mid-name."""
    import re

    def help_of(*path: str, width: int = 100) -> str:
        result = runner.invoke(app, [*path, "--help"], terminal_width=width)
        assert result.exit_code == 0, result.output
        return result.output

    assert "pip install 'stn[report]'" in " ".join(help_of("wandb-report").split())
    train = help_of("train")
    assert "<bool>" not in train and re.search(r"--cfg\s+-c\s+<job\|hydra\|all>", train)
    assert "Usage: stn visualize [OPTIONS] CHECKPOINT" in help_of("visualize")
    assert "Usage: stn train [OPTIONS] [OVERRIDES]..." in train
    for width in (80, 100, 120):  # (CliRunner may hold the width at 80)
        bench = help_of("bench", width=width)
        assert "<dataset>" in bench and "<bool>" not in bench
        words = set(re.findall(r"[\w]+", bench))
        assert {"RTS", "P_box20", "P_redraw", "plain"} <= words  # each choice whole, never split across lines
