"""`stn convergence ...`: the convergence study (Table 1 cells at growing fractions of the paper's budget)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from stn.cli.common import MAX_PARALLEL, csv_list, fail, reported
from stn.validation import file_problems, folder_problems

convergence_app = typer.Typer(
    help="The convergence study: Table 1 cells at growing fractions of the paper's training images "
    "(experiments/convergence/study.yaml). `run` trains what the record lacks; `plot` draws it.",
    no_args_is_help=True,
)

STUDY_OPTION = typer.Option(help="The study file: rows, columns, budgets, seeds, the record's path.")


@convergence_app.command("run")
def convergence_run(
    study: Annotated[Path, STUDY_OPTION] = Path("experiments/convergence/study.yaml"),
    rows: Annotated[str | None, typer.Option(help='Only these rows, e.g. "CNN,ST-CNN Aff".')] = None,
    columns: Annotated[str | None, typer.Option(help="Only these datasets, e.g. R,E.")] = None,
    budgets: Annotated[str | None, typer.Option(help="Only these budgets, e.g. 1/250,1/50.")] = None,
    seeds: Annotated[str | None, typer.Option(help="Only these seeds, e.g. 0,1,2 (default: the study's).")] = None,
    max_cells: Annotated[int | None, typer.Option(help="Stop after training this many cells.")] = None,
    parallel: Annotated[int, typer.Option(help="Cells trained at once, each a process with its share of the "
                                          "cores (on a 2-core CPU, 2 at once train 1.26-1.65x more images/s "
                                          "than 1; experiments/bench/README.md).")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells to train, train nothing.")] = False,
) -> None:
    """Train the study's cells not yet in its results.csv (cheapest budgets first), one row per finished cell.

    SIGTERM or Ctrl-C stops the running cell with a checkpoint; the same command continues it.
    """
    from stn.convergence.run import run_study
    from stn.convergence.study import StudyError, check_record_kind, load_study, plan, recorded_keys

    try:
        loaded = load_study(study)
        check_record_kind(loaded.results, loaded.columns)
        seed_list = None if seeds is None else [int(s) for s in csv_list(seeds) or []]
        cells = plan(loaded, rows=csv_list(rows), columns=csv_list(columns), budgets=csv_list(budgets), seeds=seed_list)
        done = recorded_keys(loaded)  # a broken record stops here, before anything trains
        where = f"study file {study}"
        outputs = [] if dry_run else (  # where the record and the run folders go: checked before a cell trains
            file_problems("results", loaded.results, label=f"{where}: results={loaded.results}")
            + folder_problems("runs_dir", loaded.runs_dir, label=f"{where}: runs_dir={loaded.runs_dir}"))
        if outputs:
            raise StudyError("\n".join(outputs))
    except ValueError as err:  # StudyError, or a seed that is not an integer
        fail(str(err) if isinstance(err, StudyError) else f"--seeds {seeds!r} must be integers, e.g. 0,1,2", 2)
    if not 1 <= parallel <= MAX_PARALLEL:
        fail(f"--parallel {parallel} must be at least 1 and at most {MAX_PARALLEL}", 2)
    if max_cells is not None and max_cells < 1:
        typer.secho(f"error: --max-cells {max_cells} must be at least 1", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if dry_run:
        _print_plan(loaded, cells, done, parallel)
        return
    try:
        with reported():  # a full disk, a folder removed meanwhile: one line, exit 1
            report = run_study(loaded, cells, max_cells=max_cells, parallel=parallel, log=lambda line: typer.echo(line))
    except StudyError as err:  # found while running: a record another process made of the other kind
        fail(str(err), 2)
    except KeyboardInterrupt as stopped:  # between two cells (a cell in training stops itself, checkpointed)
        from stn.launch.executors import stop_code

        typer.secho("interrupted between cells; rerun the same command to continue", fg=typer.colors.YELLOW,
                    err=True)
        raise typer.Exit(stop_code(stopped)) from None
    typer.echo(f"{len(report.done)} cells trained, {report.skipped} already recorded, {len(report.failed)} failed"
               + (f", {len(report.diverged)} diverged (recorded as nan)" if report.diverged else "")
               + (f", {len(report.busy)} left to the other process training them" if report.busy else "")
               + (", one stopped with a checkpoint (rerun to continue)" if report.stopped else "")
               + f"; record: {loaded.results}")
    if report.stopped:
        raise typer.Exit(report.stop_code)  # 128 + the signal: Ctrl-C 130, SIGTERM 143
    if report.failed:
        raise typer.Exit(1)


def _print_plan(study: Any, cells: list[Any], done: set[Any], parallel: int) -> None:
    """The dry run: each cell, recorded or to train with its expected time, then the total on this many
    queues (stn.convergence.estimate: the record's own images/s)."""
    from stn.convergence.estimate import cell_seconds, duration_text, study_rates, wall_seconds
    from stn.device import machine_name

    cpu = machine_name("cpu")
    rates = study_rates(study, cpu)
    expected: list[float] = []
    unknown = 0
    for cell in cells:
        state, seconds = "recorded", None
        if cell.key not in done:
            seconds = cell_seconds(cell, rates)
            state = f"to train, {duration_text(seconds)}" if seconds is not None else "to train, no rate recorded"
            if seconds is None:
                unknown += 1
            else:
                expected.append(seconds)
        typer.echo(f"{cell.budget:>6} seed {cell.seed} {cell.column:>4} {cell.row:<12} "
                   f"{cell.config.trainer.iterations:>6} steps  {state}")
    to_train = len(expected) + unknown
    if not to_train:
        typer.echo("nothing to train: every cell is recorded")
        return
    used = [rates[(cell.row, cell.column)] for cell in cells
            if cell.key not in done and (cell.row, cell.column) in rates]
    sources = sorted({str(rate.source) for rate in used})
    other_cpu = sum(not rate.same_cpu for rate in used)
    queues = parallel if parallel > 1 else 2  # a 2-core machine's way: two cells at once, one per core
    typer.echo(f"{to_train} cells to train: {duration_text(sum(expected))} one cell at a time"
               + f", {duration_text(wall_seconds(expected, queues))} with {queues} at once (--parallel {queues})"
               + (f"; {unknown} without a recorded rate, not counted" if unknown else "")
               + f". From the median images/s of one-thread rows in {', '.join(sources) or 'no record'} on "
               + f"{cpu}" + (f" ({other_cpu} cells from other CPUs' rows)" if other_cpu else "")
               + ", measured beside the other trainings of their day (the record's load column).")


def _against_paper(study: Any, plots: Path) -> tuple[str, Path | None]:
    """The section of a study with a recipe other than the paper's (stn.convergence.beside), and its chart; the
    paper's recipe comes from the study's own rows and the main convergence record's."""
    from stn.convergence.beside import beside_table, plot_beside
    from stn.convergence.study import main_record, read_results

    rows = read_results(study.results)
    main = main_record(study)
    reference = rows + (read_results(main) if main is not None else [])
    table = beside_table(rows, reference)
    if not table:
        return "", None
    return table, plot_beside(rows, reference, plots / "against_paper.png")


def tracked_by_git(paths: list[Path]) -> list[Path]:
    """Those of `paths` that git tracks (in the checkout holding them); [] where git or a checkout is missing."""
    import subprocess

    if not paths:
        return []
    try:
        done = subprocess.run(["git", "ls-files", "--full-name", "--", *(str(p.resolve()) for p in paths)],
                              cwd=paths[0].resolve().parent, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    names = set(done.stdout.split()) if done.returncode == 0 else set()
    return [p for p in paths if any(str(p.resolve()).endswith("/" + name) for name in names)]


@convergence_app.command("plot")
def convergence_plot(
    study: Annotated[Path, STUDY_OPTION] = Path("experiments/convergence/study.yaml"),
    wandb: Annotated[bool, typer.Option("--wandb/--no-wandb", help="Also log the record, its summary and the "
                                        "plots as one W&B run (job_type study) in the study's group, in the "
                                        "study's logger.mode (offline by default).")] = True,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for the plots (<out>/plots/<study>/) and the summary (<out>/<study>.md); "
        "default: beside the study's record, which in this checkout rewrites files git tracks (said when "
        "it does).")] = None,
) -> None:
    """Per-dataset PNGs (plots/<study>/, test error vs training images, log-log, the paper dashed) and <study>.md
    beside the record (mean ± std per budget, and the orderings the paper claims); and the same to W&B."""
    from stn.compose import compose
    from stn.config import ConfigError
    from stn.convergence.extrapolate import extrapolation_table
    from stn.convergence.plot import (
        log_study_to_wandb,
        orderings_table,
        paper_schedule_table,
        plot_study,
        read_paper_schedule,
        summary_table,
    )
    from stn.convergence.study import StudyError, load_study, read_results

    try:
        loaded = load_study(study)
        if loaded.validation:
            raise StudyError(f"study {loaded.name} is scored on validation digits (validation: {loaded.validation}): "
                             "`stn convergence plot` draws test errors; read its record, "
                             f"{loaded.results}, instead")
        target = out if out is not None else loaded.results.parent
        written = plot_study(loaded.results, target / "plots" / loaded.name, loaded.paper_schedule)
        table = summary_table(loaded.results)
        orderings = orderings_table(loaded.results)
        papers = {(column, row): paper for (row, column), paper in loaded.grid.cells.items()}
        schedule_cells = read_paper_schedule(loaded.paper_schedule)
        endpoints = paper_schedule_table(schedule_cells, papers) if loaded.paper_schedule else ""
        extrapolated = extrapolation_table(read_results(loaded.results), schedule_cells)
        against, against_chart = _against_paper(loaded, target / "plots" / loaded.name)
        logger = compose(list(loaded.overrides)).logger if wandb else None
    except (StudyError, ConfigError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    summary = target / f"{loaded.name}.md"
    overrides = " ".join(f"`{item}`" for item in loaded.overrides) or "none"
    with reported():  # a full disk, an unwritable record folder: one line, exit 1
        summary.write_text(f"# Study {loaded.name}: mean ± std (n seeds) of the test error (%) per budget\n\n"
                           f"Generated by `stn convergence plot --study {study}` from {loaded.results}; "
                           f"plots in plots/{loaded.name}/. Every cell ran with the overrides {overrides} (batch "
                           f"{loaded.batch_size}); the budget column is its share of the paper's 150k steps of 256 "
                           f"(steps = budget x 150,000 x 256 / {loaded.batch_size}).\n\n{table}\n\n"
                           "## Orderings\n\nThe pairs of models the paper ranks, per budget. A difference counts as "
                           "resolved when |difference of means| > 2·s/√n (s the larger seed std, n the smaller number "
                           f"of seeds); otherwise it is within the seed spread.\n\n{orderings}\n"
                           + ("" if not endpoints else
                              "\n## At the paper's schedule (another study)\n\nCells trained the paper's full schedule "
                              "(150k steps of 256) by `stn engine run`, listed in the study's `paper_schedule`: trained "
                              "apart from this record (their own batch size, precision and device), so drawn beside "
                              f"its curves (hollow diamonds), never joined to them.\n\n{endpoints}\n")
                           + ("" if not extrapolated else
                              "\n## Extrapolated to the paper's budget\n\nFor every model with three budgets or more: "
                              "error(n) = floor + scale · n^-exponent (n the fraction of the paper's images) through "
                              "the mean errors of its three smallest budgets over the seeds trained at all three, exactly (three points, three parameters; "
                              "`stn.convergence.extrapolate`), and its value at n = 1; 'per seed' fits each seed's own three "
                              "errors. Checks set the same fit beside what was measured at larger budgets: this "
                              "record's own, and the paper-schedule cells of another study (their own batch size, "
                              "precision and device). No prediction where the errors do not fall at every budget or "
                              "do not flatten: a law with a floor below zero would cross zero. A prediction is a "
                              "reading of the curve's shape, not a "
                              f"result.\n\n{extrapolated}\n")
                           + ("" if not against else
                              "\n## Against the paper, beside the paper's recipe at the same budget\n\nEvery cell of "
                              "a recipe other than the paper's: its ratio to the paper's error, the paper's recipe "
                              "(paper-sgd) at the same share of the paper's images, and which is lower by the criterion "
                              "above; for transformer cells, the distortion recovery (each metric's mean over seeds: "
                              "ours / the paper's recipe, the untouched digits' value in brackets; lower is more "
                              f"rectified). Chart: plots/{loaded.name}/{against_chart.name}.\n\n{against}\n"))
        if against_chart is not None:
            written.append(against_chart)
    typer.echo(table)
    typer.echo("wrote " + ", ".join(str(p) for p in [*written, summary]))
    tracked = tracked_by_git([*written, summary])
    if tracked:
        typer.secho(f"note: rewrote {len(tracked)} file(s) git tracks in this checkout ({', '.join(map(str, tracked[:3]))}"
                    f"{', ...' if len(tracked) > 3 else ''}): `git diff` shows the change, `git checkout -- <file>` "
                    "undoes it; --out DIR writes elsewhere", fg=typer.colors.YELLOW, err=True)
    folder = log_study_to_wandb(loaded, written, logger) if logger is not None else None
    if folder is not None:
        typer.echo(f"W&B: run {folder.name} (job_type study, group {loaded.name})")
