"""Reproduce a results table of the paper: plan its runs, reuse what is done, record the seeds.

Owns planning and resuming; a cell x seed's Config and the grid file's schema are `stn.grid`, running the
jobs `stn.launch.executors` (submitit), the record (aggregation, results.csv, table.md, chart) `stn.report`, the
reuse rule ("is this finished cell stale?") `stn.runs.is_stale`. A table is a YAML file (`experiments/table1/grid.yaml`): `rows` and `columns` map the paper's labels to
config overrides, `cells` lists which (row, column) pairs exist and the paper's error for each. Every
cell x seed becomes one `Config` (row + column overrides, `trainer=<preset>`, the user's overrides, then
seed, run folder `<table>/cells/<cell>/seed<s>`, `trainer.resume=true` and the W&B group set here) and
one call of `stn.train.fit` in a submitit job: `local` (parallel processes on this machine), `slurm` or
`debug` (in-process, one after another). Rerunning the same command resumes: a cell whose run folder
holds `summary.json` is read back and never re-run, a half-finished one continues from its checkpoint
(fit's resume semantics; `dry_run` says which of the three each run is, writing nothing). After every
finished cell `results.csv`, `results.json` and `table.md` are rewritten atomically and the table's W&B run
is updated; at the end comes a bar chart of ours vs the paper's.

W&B: one table run per table folder, in the same group as the per-cell runs. Its id is chosen at the
table's first invocation and kept in results.json (`wandb_id`, with `wandb_step`, the last step logged), so
a rerun or a resumed table continues that run instead of adding a second one of the same name; it is
logged after every finished cell (an interrupted table already shows what finished). Each cell's run carries
its table, row, column, cell and paper value (logger.cell: W&B config keys and tags, stn.tracking).
"""

from __future__ import annotations

import dataclasses
import json
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stn.cache import cached_compose
from stn.config import TRAINER_PRESETS, Config, ConfigError
from stn.grid import (
    DEFAULT_GRID,
    Grid,
    TableError,
    cell_name,
    check_overrides,
    compose_cells,
    label_problems,
    load_grid,
    select_cells,
)
from stn.hydra_record import write_overrides
from stn.launch.executors import (
    EXECUTORS,
    FitFn,
    SlurmOptions,
    Stopped,
    run_jobs,
    sigterm_as_interrupt,
    start_pool,
)
from stn.launch.job import Job
from stn.report import (
    CellResult,
    log_table_to_wandb,
    new_run_id,
    paper_text,
    plot_bars,
    summarise,
    write_results,
)
from stn.runs import CheckpointError, is_stale, read_config
from stn.validation import folder_problems, schedule_warning

DEFAULT_SLURM = SlurmOptions()


@dataclass(frozen=True)
class CellJob(Job):
    """One cell x seed: the config to train and where its run folder is."""

    row: str
    column: str
    cell: str
    seed: int
    config: Config
    # the words that composed it (row, column, preset, the user's, seed): its .hydra/overrides.yaml, as Hydra
    # records a job's overrides
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.row} / {self.column} seed {self.seed}"


@dataclass
class TableReport:
    """What `reproduce` did: where the table lives, the per-cell results and what ran."""

    table_dir: Path
    group: str
    cells: list[CellResult]
    runs: list[dict[str, Any]]
    cached: int = 0  # finished before this call (summary.json read back)
    fresh: int = 0  # trained from scratch by this call
    resumed: int = 0  # continued from a checkpoint by this call
    failed: int = 0
    # Stopped early with a checkpoint (a signal, or trainer.stop_after): the next call resumes them.
    stopped: int = 0
    files: dict[str, Path] = field(default_factory=dict)
    wandb_dir: Path | None = None

    @property
    def ran(self) -> int:
        return self.fresh + self.resumed + self.failed + self.stopped


def plan_jobs(
    grid: Grid,
    cells: Sequence[tuple[str, str]],
    seeds: Sequence[int],
    preset: str,
    overrides: Sequence[str],
    table_dir: Path,
    group: str,
) -> list[CellJob]:
    """Compose one validated Config per cell x seed (all of them before anything runs; `stn.grid.compose_cells`),
    each with its run folder, name, resume and W&B cell keys."""
    if preset not in TRAINER_PRESETS:
        raise TableError(f"unknown preset {preset!r}; choose one of {', '.join(TRAINER_PRESETS)}")
    if not seeds:
        raise TableError("no seeds given; pass e.g. --seeds 0 or --seeds 0,1,2")
    check_overrides(overrides, "overrides")
    problems = label_problems(overrides, [source for row, column in cells for source in
                                          ((f"row {row}", grid.rows[row]), (f"column {column}", grid.columns[column]))])
    if problems:
        raise TableError("\n".join(dict.fromkeys(problems)))
    table_dir = table_dir.resolve()
    jobs = []
    words = [f"trainer={preset}", *overrides]
    for item in compose_cells(grid, cells, seeds, words):
        base, name = item.config, cell_name(item.row, item.column)
        # What a group's dashboard groups the cell runs by (W&B config keys and tags, stn.tracking).
        cell = {"table": grid.name, "row": item.row, "column": item.column, "cell": name,
                "paper_test_error": item.paper}
        config = dataclasses.replace(
            base,
            # Workers may run elsewhere (Slurm) or in another cwd: pin the data folder.
            data_dir=str(Path(base.data_dir).resolve()),
            name=f"{base.run_name}-seed{item.seed}",
            run_dir=str(table_dir / "cells" / name / f"seed{item.seed}"),
            trainer=dataclasses.replace(base.trainer, resume=True),
            logger=dataclasses.replace(base.logger, group=group, cell=cell),
        )
        composed = (*grid.rows[item.row], *grid.columns[item.column], *words, f"seed={item.seed}")
        jobs.append(CellJob(row=item.row, column=item.column, cell=name, seed=item.seed, config=config,
                            overrides=composed))
    return jobs


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text())
        float(summary["test_error"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TableError(
            f"{path} is unreadable or has no test_error ({type(err).__name__}: {err}); "
            f"delete {path} alone (not the run folder: its checkpoint is kept) and rerun the same command: the "
            f"cell is evaluated again from its last checkpoint"
        ) from None
    return summary


def _check_not_stale(job: CellJob) -> None:
    """A cell folder written by a different experiment (other preset/overrides into the same --out) must
    not be passed off as this one's result (`stn.runs.is_stale`)."""
    saved = job.run_dir / "config.yaml"
    if not saved.is_file():
        return
    try:
        changed = is_stale(read_config(saved), job.config)
    except CheckpointError as err:
        raise TableError(str(err)) from None
    summary_path = job.run_dir / "summary.json"
    wanted = job.config.trainer.cpu_precision
    if wanted != "auto" and summary_path.is_file():
        summary = _read_summary(summary_path)
        used = summary.get("precision", "float32")  # runs from before the setting were float32 on the CPU
        if str(summary.get("device", "cpu")).startswith("cpu") and used != wanted:
            raise TableError(
                f"cell folder {job.run_dir} was trained in {used} on the CPU, but this table asks for "
                f"trainer.cpu_precision={wanted}. Use another --out, or delete the folder to re-run it"
            )
    if changed:
        raise TableError(
            f"cell folder {job.run_dir} was trained with a different config ({'; '.join(changed[:5])}). "
            f"Use another --out for a different experiment, or delete the folder to re-run it"
        )


def table_folder(grid: Grid, preset: str, template: Config, out: Path | str | None) -> Path:
    """Where a table lives: --out, else <runs_dir>/tables/<grid name>-<preset>."""
    return Path(out) if out else Path(template.runs_dir) / "tables" / f"{grid.name}-{preset}"


def job_state(job: CellJob) -> str:
    """'cached' (finished: summary.json), 'resumed' (a checkpoint to continue) or 'fresh'; TableError if the
    folder holds another experiment's run."""
    _check_not_stale(job)
    if (job.run_dir / "summary.json").is_file():
        return "cached"
    return "resumed" if any((job.run_dir / "checkpoints").glob("*.pt")) else "fresh"


def dry_run(grid_path: Path | str, *, rows: Sequence[str] | None = None, columns: Sequence[str] | None = None,
            seeds: Sequence[int] = (0,), preset: str = "quick", overrides: Sequence[str] = (),
            out: Path | str | None = None) -> tuple[Path, list[tuple[CellJob, str]]]:
    """What `reproduce` would do, writing nothing: the table folder and each run with its `job_state`."""
    grid = load_grid(grid_path)
    cells = select_cells(grid, rows, columns)
    check_overrides(overrides, "overrides")
    try:
        template = cached_compose([f"trainer={preset}", *overrides])
    except ConfigError as err:
        raise TableError(str(err)) from None
    table_dir = table_folder(grid, preset, template, out).resolve()
    jobs = plan_jobs(grid, cells, [int(s) for s in seeds], preset, overrides, table_dir,
                     template.logger.group or table_dir.name)
    return table_dir, [(job, job_state(job)) for job in jobs]


def _previous_meta(table_dir: Path) -> dict[str, Any]:
    """The last invocation's results.json (its W&B keys: wandb_id, wandb_step, wandb_dir), or {}."""
    try:
        previous = json.loads((table_dir / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    return previous if isinstance(previous, dict) else {}


def _record(
    job: CellJob, status: str, source: str, summary: dict | None = None, error: str = ""
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "row": job.row, "column": job.column, "cell": job.cell, "seed": job.seed,
        "run_dir": str(job.run_dir), "status": status, "source": source,
    }  # fmt: skip
    if summary:
        for key in ("test_error", "steps", "wall_time_s", "images_per_s", "device"):
            if key in summary:
                record[key] = summary[key]
    if error:
        record["error"] = error
    return record


def _checked_arguments(grid: Grid, rows: Sequence[str] | None, columns: Sequence[str] | None,
                       seeds: Sequence[int], preset: str, overrides: Sequence[str], executor: str
                       ) -> tuple[list[tuple[str, str]], list[int], Config]:
    """The cells, the seeds and the settings every cell shares (where runs go, the W&B project and mode), or a
    TableError naming the bad argument, before anything is written."""
    cells = select_cells(grid, rows, columns)
    check_overrides(overrides, "overrides")
    if executor not in EXECUTORS:
        raise TableError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if preset not in TRAINER_PRESETS:
        raise TableError(f"unknown preset {preset!r}; choose one of {', '.join(TRAINER_PRESETS)}")
    chosen = [int(s) for s in seeds]
    repeated = sorted({seed for seed in chosen if chosen.count(seed) > 1})
    if repeated or any(seed < 0 for seed in chosen):
        raise TableError(f"seeds {chosen}: each seed must be 0 or more and given once (one run folder per seed)")
    try:
        template = cached_compose([f"trainer={preset}", *overrides])
    except ConfigError as err:
        raise TableError(str(err)) from None
    return cells, chosen, template


@dataclass
class _TableRecord:
    """A table's runs as they finish, and the files and W&B run that show them: rewritten after every run, so an
    interrupted table loses at most the runs in flight."""

    grid: Grid
    cells: list[tuple[str, str]]
    seeds: list[int]
    meta: dict[str, Any]
    template: Config
    report: TableReport
    runs: dict[tuple[str, int], dict[str, Any]]

    def refresh(self) -> list[CellResult]:
        report = self.report
        report.runs = list(self.runs.values())
        report.cells = summarise({cell: self.grid.cells[cell] for cell in self.cells}, self.seeds, report.runs)
        report.files.update(write_results(report.table_dir, self.grid, report.cells, report.runs, self.meta))
        return report.cells

    def log_wandb(self, chart: Path | None = None) -> None:
        """Update the table's W&B run with the results so far (one step further) and record where it is."""
        self.meta["wandb_step"] += 1
        folder = log_table_to_wandb(self.grid, self.report.cells, chart, self.meta, self.template)
        if folder is not None:
            self.meta["wandb_dir"] = str(folder)
            self.report.wandb_dir = folder
        self.refresh()

    def finished(self, job: CellJob, source: str, summary: dict[str, Any], where: str,
                 log: Callable[[str], None]) -> None:
        """Record one run's end (done, interrupted with a checkpoint, or failed) and show it."""
        status, report = summary.get("status"), self.report
        if status == "done":
            self.runs[(job.cell, job.seed)] = _record(job, "done", source, summary)
            setattr(report, source, getattr(report, source) + 1)
            paper = paper_text(self.grid.cells[(job.row, job.column)])
            log(f"  {where}: {float(summary['test_error']):.2f}% (paper {paper})")
        elif status == "interrupted":
            self.runs[(job.cell, job.seed)] = _record(job, "interrupted", source, error=summary["error"])
            report.stopped += 1
            log(f"  {where} stopped at step {summary.get('step')} with a checkpoint; rerun to go on")
        else:
            self.runs[(job.cell, job.seed)] = _record(job, "failed", source, error=summary.get("error", ""))
            report.failed += 1
            log(f"  {where} FAILED: {summary.get('error')} (run folder {job.run_dir}, "
                f"job logs {report.table_dir / 'submitit'})")  # fmt: skip
        self.refresh()
        self.log_wandb()  # its W&B run shows every finished cell

    def close(self, preset: str, overrides: Sequence[str], log: Callable[[str], None]) -> None:
        """The bar chart of ours vs the paper's, the last W&B update (skipped when nothing new ran), and the end of
        this invocation's W&B folder."""
        from stn.tracking import finish_kept  # (imports torch: only once a table has run)

        report, meta = self.report, self.meta
        chart = plot_bars(self.refresh(), report.table_dir / "ours_vs_paper.png",
                          f"{self.grid.title} [{preset}: {meta['steps']} steps of {meta['batch_size']}"
                          + "".join(f", {item}" for item in overrides) + "]")
        report.files["ours_vs_paper.png"] = chart
        previous = meta.get("wandb_dir")
        if report.ran == 0 and previous and Path(previous).is_dir():
            # Nothing changed since the table's W&B run was last logged: don't log the same results again.
            report.wandb_dir = Path(previous)
            log(f"nothing new ran; the table's W&B run is still {previous}")
        else:
            self.log_wandb(chart)
        finish_kept(meta["wandb_id"])  # one W&B folder per invocation, finished once (stn.report)


def reproduce(
    grid_path: Path | str = DEFAULT_GRID,
    *,
    rows: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    preset: str = "quick",
    overrides: Sequence[str] = (),
    executor: str = "local",
    parallel: int | None = None,
    out: Path | str | None = None,
    slurm: SlurmOptions = DEFAULT_SLURM,
    fit_fn: FitFn | None = None,
    poll_s: float = 1.0,
    log: Callable[[str], None] = print,
) -> TableReport:
    """Run (or resume) a table and write its outputs; returns what ran and the per-cell results.

    `fit_fn` replaces `stn.train.fit` (tests); with the local or slurm executor it must be picklable.
    """
    grid = load_grid(grid_path)
    cells, seeds, template = _checked_arguments(grid, rows, columns, seeds, preset, overrides, executor)
    note = schedule_warning(overrides, template)
    if note:
        log(note)
    table_dir = table_folder(grid, preset, template, out)
    problems = folder_problems("--out" if out else "runs_dir", table_dir)
    if problems:
        raise TableError("\n".join(problems))
    table_dir = table_dir.resolve()
    group = template.logger.group or table_dir.name
    jobs = plan_jobs(grid, cells, seeds, preset, overrides, table_dir, group)
    table_dir.mkdir(parents=True, exist_ok=True)
    previous_meta = _previous_meta(table_dir)
    meta: dict[str, Any] = {
        "grid": str(grid.path), "name": grid.name, "preset": preset, "seeds": seeds,
        "overrides": list(overrides), "executor": executor, "group": group, "table_dir": str(table_dir),
        # the budget every cell trains (table.md and the chart say it beside the overrides)
        "steps": template.trainer.iterations, "batch_size": template.trainer.batch_size,
        # The table's one W&B run: its id from the first invocation on, the last step it was logged at.
        "wandb_id": previous_meta.get("wandb_id") or new_run_id(),
        "wandb_step": int(previous_meta.get("wandb_step") or 0),
        "wandb_dir": previous_meta.get("wandb_dir"),
    }  # fmt: skip

    # What is already done is read back, never re-run; the rest is queued (resumed or fresh).
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    queue: deque[tuple[CellJob, str]] = deque()
    for job in jobs:
        state = job_state(job)
        if state == "cached":
            runs[(job.cell, job.seed)] = _record(job, "done", "cached", _read_summary(job.run_dir / "summary.json"))
        else:
            write_overrides(job.run_dir, job.overrides)  # what this invocation trains it with (a finished cell keeps its own)
            queue.append((job, state))
            runs[(job.cell, job.seed)] = _record(job, "pending", state)
    report = TableReport(table_dir=table_dir, group=group, cells=[], runs=[], cached=len(jobs) - len(queue))
    record = _TableRecord(grid, cells, seeds, meta, template, report, runs)
    pool, width, threads = (start_pool(executor, len(queue), parallel, table_dir / "submitit", slurm) if queue
                            else (None, 1, None))
    record.refresh()
    log(
        f"table {grid.name} ({preset}): {len(cells)} cells x {len(seeds)} seeds = {len(jobs)} runs; "
        f"{report.cached} already done, {len(queue)} to run -> {table_dir}"
    )
    if pool is not None:
        total = len(queue)
        try:
            with sigterm_as_interrupt():
                finished = run_jobs(pool, queue, width, threads, fit_fn, poll_s, log)
                for count, (job, source, summary) in enumerate(finished, start=1):
                    where = f"[{count}/{total}] {job.row} / {job.column} seed {job.seed}"
                    record.finished(job, source, summary, where, log)
                    if summary.get("status") == "interrupted" and summary.get("signal") and executor == "debug":
                        # In-process, fit's own handler caught the Ctrl-C (or SIGTERM) meant for the whole table.
                        raise Stopped(summary.get("exit_code") or 130)
        except KeyboardInterrupt:
            record.refresh()
            from stn.tracking import finish_kept

            finish_kept(meta["wandb_id"], exit_code=1)  # the table's W&B run, open for this invocation
            log("interrupted: the runs in flight stopped with a checkpoint; rerun the same command to resume")
            raise
    record.close(preset, overrides, log)
    return report
