"""The `stn` command line: Typer parses, Hydra's compose API builds the config, plain functions do the work.

Config overrides are positional `key=value` words, exactly as Hydra takes them:
    stn train dataset=RTS model=st_cnn transformer=tps trainer=quick
Each command imports its module lazily so `stn --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stn.config import GROUPS, ConfigError, compose, group_choices

app = typer.Typer(
    name="stn",
    help="Spatial Transformer Networks (Jaderberg et al., 2015): distorted MNIST, training, Table 1.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Build and inspect the distorted MNIST datasets.", no_args_is_help=True)
bench_app = typer.Typer(help="Throughput benchmarks: `stn bench` (training) and `stn bench data`.")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")

OVERRIDES_HELP = "Config overrides, Hydra syntax: dataset=RTS model=st_cnn transformer=tps trainer.iterations=500"


def _groups_help() -> str:
    try:
        return "\n\n".join(f"{group}: {', '.join(group_choices(group))}" for group in GROUPS)
    except ConfigError as err:
        return str(err)


def load_config(overrides: Optional[list[str]]):
    """Compose the config or exit with the error's one-line message (no traceback)."""
    try:
        return compose(overrides or [])
    except ConfigError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@app.command(help=f"Train one configuration.\n\nConfig groups and their choices:\n\n{_groups_help()}")
def train(
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    cfg: bool = typer.Option(False, "--cfg", help="Print the resolved config and exit without training."),
) -> None:
    config = load_config(overrides)
    if cfg:
        from stn.config import to_yaml

        typer.echo(to_yaml(config))
        return
    from stn.train import TrainingError, fit

    try:
        summary = fit(config)
    except (TrainingError, ConfigError) as err:
        fail(str(err))
        return
    typer.echo(f"test error {summary['test_error']:.2f}% | run folder {summary['run_dir']}")


@data_app.command("preview")
def data_preview(
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    out: Path = typer.Option(Path("preview.png"), "--out", "-o", help="PNG file to write."),
    count: int = typer.Option(64, "--count", "-n", help="How many samples to draw."),
    split: str = typer.Option("test", help="test (the fixed test set) or train (fresh training distortions)."),
) -> None:
    """Write a PNG grid of distorted samples with their labels."""
    config = load_config(overrides)
    from stn.data import MNISTDataError, preview

    try:
        path = preview(config, out, count=count, split=split)
    except MNISTDataError as err:
        fail(str(err))
        return
    typer.echo(f"wrote {path}")
