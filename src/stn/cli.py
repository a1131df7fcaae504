"""The `stn` command: the root Typer app, its sub-apps, and the commands that stand alone.

Typer parses, Hydra's compose API builds the config, plain functions do the work. Config overrides are
positional `key=value` words, exactly as Hydra takes them:
    stn train dataset=RTS model=st_cnn transformer=tps trainer=quick
This module owns the root app (`--version`), `stn train`, `stn models`, `stn visualize` and `stn recovery`;
the sub-apps live in stn.cli_data, cli_table (reproduce-table), cli_bench, cli_convergence and engine_cli,
the shared error handling and exit codes in stn.cli_common. Each command imports its work module lazily so `stn --help` stays
fast, and checks its config, arguments and outputs (stn.config) before torch or MNIST load.

Exit codes: 0 done; 2 something the user fixes by changing the command or its inputs (config, arguments,
the files it names, a missing or corrupt MNIST, a run folder that cannot be used); 1 a failure during a
run (a non-finite loss, a failed table cell, an I/O error); 128+N a run stopped by signal N, checkpointed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stn.cli_bench import bench_app
from stn.cli_common import (  # noqa: F401  (Executor, Split: the CLI's choice types, re-exported)
    OVERRIDES_HELP,
    Executor,
    Split,
    fail,
    groups_help,
    load_config,
    refuse,
    reported,
)
from stn.cli_convergence import convergence_app
from stn.cli_data import data_app
from stn.cli_table import reproduce_table
from stn.config import MAX_PICTURES, folder_problems, group_choices, output_problems, picture_problems
from stn.engine_cli import engine_app

app = typer.Typer(
    name="stn",
    help="Spatial Transformer Networks (Jaderberg et al., 2015): distorted MNIST, training, Table 1.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
app.add_typer(convergence_app, name="convergence")
app.add_typer(engine_app, name="engine")  # the batched engine: stn engine bench|plan|run


def package_version() -> str:
    """The installed stn's version (pyproject.toml's), or 'unknown' when stn runs from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stn")
    except PackageNotFoundError:
        return "unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"stn {package_version()}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Print stn's version and exit.")] = False,
) -> None:
    """Spatial Transformer Networks (Jaderberg et al., 2015): distorted MNIST, training, Table 1."""


@app.command(help=f"Train one configuration.\n\nConfig groups and their choices:\n\n{groups_help()}")
def train(
    overrides: Annotated[list[str] | None, typer.Argument(help=OVERRIDES_HELP)] = None,
    cfg: Annotated[bool, typer.Option("--cfg", help="Print the resolved config and exit without training.")] = False,
) -> None:
    config = load_config(overrides)
    if cfg:
        from stn.config import to_yaml

        typer.echo(to_yaml(config))
        return
    refuse(output_problems(config))
    from stn.train import TrainingInterrupted, fit

    with reported():
        try:
            summary = fit(config)
        except TrainingInterrupted as stopped:  # a requested stop, not a failure: say how to continue
            typer.secho(str(stopped), fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(stopped.exit_code) from None
    typer.echo(f"test error {summary['test_error']:.2f}% | run folder {summary['run_dir']}")


app.command("reproduce-table")(reproduce_table)


@app.command("models")
def models(
    overrides: Annotated[list[str] | None, typer.Argument(help=f"{OVERRIDES_HELP} (applied to every row)")] = None,
    dataset: Annotated[
        list[str] | None, typer.Option("--dataset", "-d", help="Dataset columns (repeatable); default: R RTS P E TC.")
    ] = None,
) -> None:
    """Print every Table 1 model's parameter count and derived width per dataset."""
    from rich.console import Console
    from rich.table import Table

    from stn.models import TABLE1_MODELS, parameter_table

    datasets = tuple(dataset) if dataset else ("R", "RTS", "P", "E", "TC")
    unknown = [name for name in datasets if name not in group_choices("dataset")]
    refuse([f"--dataset {name!r}: not one of {', '.join(group_choices('dataset'))}" for name in unknown])
    with reported():
        rows = parameter_table(datasets, overrides or [])
    table = Table(title="Parameters per model and dataset (width: f = conv filters, u = FC units; "
                        "ratio: count / its target, the baseline's count or model.param_budget)")
    table.add_column("model")
    for name in datasets:
        table.add_column(name, justify="right")
    cells = {(row.model, row.dataset): row for row in rows}
    for label, _ in TABLE1_MODELS:
        line = [label]
        for name in datasets:
            row = cells[(label, name)]
            unit = "u" if row.width_name == "fc_units" else "f"
            line.append(f"{row.params:,} ({row.width}{unit}, {row.params / row.target:.3f})")
        table.add_row(*line)
    Console(width=200).print(table)


@app.command("visualize")
def visualize(
    checkpoint: Annotated[Path, typer.Argument(help="A training checkpoint, e.g. <run folder>/checkpoints/last.pt")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path("transformations.png"),
    count: Annotated[int, typer.Option("--count", "-n", help="How many test digits to draw.")] = 8,
    data_dir: Annotated[
        str | None, typer.Option(help="MNIST root (default: $STN_DATA_DIR, else the checkpoint's data_dir).")
    ] = None,
) -> None:
    """Draw test digits with the transformer's sampling grid T(G) and its output (the paper's Table 1, right)."""
    refuse([f"--count {count}: choose 1 to {MAX_PICTURES // 4} (one column per digit)"]
           * (not 1 <= count <= MAX_PICTURES // 4)
           + [f"checkpoint {checkpoint}: no such file; pass a run's checkpoints/last.pt"] * (not checkpoint.is_file())
           + picture_problems("--out", out, "visualize"))
    from stn.visualize import visualize_checkpoint

    with reported():
        path = visualize_checkpoint(checkpoint, out, count=count, data_dir=data_dir)
    typer.echo(f"wrote {path}")


@app.command("recovery")
def recovery(
    checkpoint: Annotated[Path, typer.Argument(help="A training checkpoint, e.g. <run folder>/checkpoints/last.pt")],
    data_dir: Annotated[
        str | None, typer.Option(help="MNIST root (default: $STN_DATA_DIR, else the checkpoint's data_dir).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Measure the first N test digits only.")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the full result (per class) here.")
    ] = None,
) -> None:
    """How consistently the transformer undoes each test digit's known distortion (see stn.recovery)."""
    import json

    from stn.recovery import format_summary, recovery_checkpoint

    refuse([f"--limit {limit}: must be at least 1"] * (limit is not None and limit < 1)
           + (folder_problems("--json", json_out.parent, label=f"--json {json_out}") if json_out else []))
    with reported():
        summary = recovery_checkpoint(checkpoint, data_dir=data_dir, limit=limit)
    typer.echo(format_summary(summary))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(summary, indent=1) + "\n")
        typer.echo(f"wrote {json_out}")
