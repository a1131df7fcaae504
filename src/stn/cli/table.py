"""`stn reproduce-table`: the paper's Table 1 grid (or another grid file) through stn.tables.reproduce and stn.launch.executors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stn.cli.common import (
    OVERRIDES_HELP,
    ExecutorOption,
    ParallelOption,
    SlurmCpus,
    SlurmGpus,
    SlurmPartition,
    SlurmTime,
    csv_list,
    launch_options,
    parse_seeds,
    reported,
    typed_command,
)
from stn.config import TrainerPreset
from stn.grid import DEFAULT_GRID


def reproduce_table(
    overrides: Annotated[list[str] | None, typer.Argument(help=f"{OVERRIDES_HELP} (every cell)")] = None,
    grid: Annotated[Path, typer.Option(help="The table as data: rows, columns, the paper's numbers.")] = DEFAULT_GRID,
    rows: Annotated[str | None, typer.Option(help='Row labels, e.g. "CNN,ST-CNN Aff" (default: all).')] = None,
    columns: Annotated[str | None, typer.Option(help="Column labels, e.g. R,RTS (default: all).")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; several give mean ± std per cell.")] = "0",
    preset: Annotated[TrainerPreset, typer.Option(help="Trainer preset.")] = "quick",
    executor: ExecutorOption = "local",
    parallel: ParallelOption = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Table folder (runs/tables/<grid>-<preset>).")]
    = None,
    slurm_partition: SlurmPartition = None,
    slurm_gpus: SlurmGpus = 1,
    slurm_cpus: SlurmCpus = None,
    slurm_time: SlurmTime = 24 * 60,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs and what each would do (done, "
                                          "resume, train); train and write nothing.")] = False,
) -> None:
    """Run the paper's Table 1 grid (or another grid file) and report ours beside the paper.

    Rerunning the same command resumes: finished cells are read back, half-finished ones continue from
    their checkpoint. Writes table.md, results.csv/json and ours_vs_paper.png in the table folder.
    """
    from rich.console import Console

    from stn.grid import load_grid
    from stn.report import rich_table
    from stn.runs import command_recorded
    from stn.tables.reproduce import reproduce

    seed_list = parse_seeds(seeds)
    slurm = launch_options(parallel, slurm_partition, slurm_gpus, slurm_cpus, slurm_time)
    command = typed_command(["stn", "reproduce-table", *(overrides or []), "--grid", str(grid), "--seeds", seeds,
                             "--preset", preset, "--executor", executor]
                            + ["--rows", rows] * bool(rows) + ["--columns", columns] * bool(columns)
                            + ["--parallel", str(parallel)] * bool(parallel) + ["--out", str(out)] * bool(out))
    console = Console()
    if dry_run:
        _dry_run(grid, rows, columns, seed_list, preset, overrides or [], out)
        return
    try:
        with reported(), command_recorded(command):
            report = reproduce(
                grid,
                rows=csv_list(rows),
                columns=csv_list(columns),
                seeds=seed_list,
                preset=preset,
                overrides=overrides or [],
                executor=executor,
                parallel=parallel,
                out=out,
                slurm=slurm,
                log=lambda line: console.print(line, markup=False, highlight=False),
            )
    except KeyboardInterrupt as stopped:  # Ctrl-C: 130; SIGTERM: 143 (stn.launch.executors.Stopped)
        from stn.launch.executors import stop_code

        typer.secho("interrupted; rerun the same command to resume", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(stop_code(stopped)) from None
    console.print(rich_table(load_grid(grid), report.cells))
    stopped = f", {report.stopped} stopped early (rerun to continue)" if report.stopped else ""
    console.print(
        f"{report.ran} runs ran ({report.fresh} fresh, {report.resumed} resumed, {report.failed} failed"
        f"{stopped}), {report.cached} already done. Table folder {report.table_dir} (table.md, "
        f"results.csv, ours_vs_paper.png); W&B group {report.group}",
        markup=False,
        highlight=False,
    )
    if report.failed:
        raise typer.Exit(1)


def _dry_run(grid: Path, rows: str | None, columns: str | None, seeds: list[int], preset: str,
             overrides: list[str], out: Path | None) -> None:
    from stn.tables.reproduce import dry_run

    with reported():
        table_dir, jobs = dry_run(grid, rows=csv_list(rows), columns=csv_list(columns), seeds=seeds, preset=preset,
                                  overrides=overrides, out=out)
    words = {"cached": "done", "resumed": "resume", "fresh": "train"}
    for job, state in jobs:
        typer.echo(f"{job.row:<12} {job.column:>4} seed {job.seed}  {words[state]:<6}  {job.run_dir}")
    counts = {state: sum(1 for _, s in jobs if s == state) for state in words}
    typer.echo(f"{len(jobs)} runs: {counts['cached']} done, {counts['resumed']} to resume, {counts['fresh']} to "
               f"train; table folder {table_dir} (nothing written)")
