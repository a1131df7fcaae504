"""stn.cli: the help screens list exactly the commands click has registered (bad input: test_faults.py)."""

from __future__ import annotations

from typer.testing import CliRunner

from stn.cli import app

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
