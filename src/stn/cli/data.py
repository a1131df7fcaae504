"""`stn data ...`: build and inspect the distorted MNIST datasets (preview PNGs, dataset cards)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stn.cli.common import OVERRIDES_HELP, Split, fail, load_config, refuse, reported
from stn.validation import MAX_PICTURES, folder_problems, picture_problems

data_app = typer.Typer(help="Build and inspect the distorted MNIST datasets.", no_args_is_help=True)


@data_app.command("preview")
def data_preview(
    overrides: Annotated[list[str] | None, typer.Argument(help=OVERRIDES_HELP)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path("preview.png"),
    count: Annotated[int, typer.Option("--count", "-n", help="How many samples to draw.")] = 64,
    split: Annotated[
        Split, typer.Option(help="test (the fixed test set) or train (fresh training distortions).")
    ] = "test",
) -> None:
    """Write a PNG grid of distorted samples with their labels."""
    config = load_config(overrides)
    limit = (config.dataset.test_limit or 10_000) if split == "test" else (config.dataset.train_limit or 60_000)
    refuse([f"--count {count}: choose 1 to {min(MAX_PICTURES, limit)} (pictures are capped at {MAX_PICTURES}; "
              f"the {split} split has {limit} digits)"] * (not 1 <= count <= min(MAX_PICTURES, limit))
           + picture_problems("--out", out, "preview"))
    from stn.visualize import preview

    with reported():
        path = preview(config, out, count=count, split=split)
    typer.echo(f"wrote {path}")


@data_app.command("card")
def data_card(
    overrides: Annotated[list[str] | None, typer.Argument(help=OVERRIDES_HELP)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder (gets <dataset>.md/.json/.png) or x.md.")] = Path(
        "cards"),
    count: Annotated[int, typer.Option("--count", "-n", help="How many test-set draws to measure.")] = 5000,
    png: Annotated[bool, typer.Option(help="Also draw a PNG of the histograms.")] = True,
) -> None:
    """Write a dataset card: digit size, ink off the canvas, displacement, folded quads (see stn.cards)."""
    config = load_config(overrides)
    refuse(folder_problems("--out", out.parent if out.suffix == ".md" else out, label=f"--out {out}"))
    from stn.cards import write_card

    try:
        with reported():
            paths = write_card(config, out, count=count, png=png,
                               progress=lambda text: typer.echo(f"data card: {text}", err=True))
    except ValueError as err:  # a bad --count (UserErrors are reported above)
        fail(str(err), 2)
    typer.echo(f"wrote {', '.join(map(str, paths))}")
