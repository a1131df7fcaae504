"""Training a convergence study's cells (`stn convergence run`): one after the other or `parallel` at once
through stn.launch.executors, one record row per finished cell. What a study is, its plan and its record: stn.convergence.study."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from stn.config import Config
from stn.convergence.study import (
    Cell,
    Study,
    StudyError,
    StudyReport,
    append_result,
    check_record_kind,
    diverged_row,
    recorded_keys,
    result_row,
    row_key,
)
from stn.runs import RunFolderBusy, RunFolderError


def run_study(study: Study, cells: Sequence[Cell], *, fit_fn: Callable[[Config], dict] | None = None,
              log: Callable[[str], None] = print, max_cells: int | None = None, parallel: int = 1,
              executor: str = "local") -> StudyReport:
    """Train the cells not yet in the record, appending each finished one; stop at the first interruption.
    `parallel` > 1 trains that many at once as worker processes (stn.launch.executors, `executor` local or debug), each
    with its share of the cores; the record is written by this process alone, as each cell finishes."""
    report = StudyReport()
    from stn.device import code_commit

    check_record_kind(study.results, study.columns)  # before anything trains
    commit = code_commit()  # the code this process imported, even if the checkout moves on meanwhile
    done = recorded_keys(study)
    todo = [c for c in cells if c.key not in done]
    report.skipped = len(cells) - len(todo)
    log(f"study {study.name} ({study.recipe}): {len(cells)} cells, {report.skipped} recorded in {study.results}, "
        f"{len(todo)} to train" + (f", {parallel} at a time" if parallel > 1 else ""))
    chosen = todo[:max_cells] if max_cells else todo
    if parallel > 1:
        return _run_parallel(study, chosen, report, commit, fit_fn, log, parallel, executor)
    from stn.train import TrainingDiverged, TrainingError, TrainingInterrupted

    if fit_fn is None:
        from stn.train import fit as fit_fn
    for index, cell in enumerate(chosen, start=1):
        what = f"[{index}/{len(todo)}] {cell.label}"
        if index > 1 and cell.key in recorded_keys(study):  # another process on this study recorded it meanwhile
            report.skipped += 1
            log(f"{what}: recorded meanwhile by another process")
            continue
        log(f"{what}: {cell.config.trainer.iterations} steps of {cell.config.trainer.batch_size}")
        try:
            summary = fit_fn(cell.config)
        except TrainingInterrupted as err:
            report.stopped = cell
            report.stop_code = err.exit_code or report.stop_code
            log(f"{what}: stopped with a checkpoint ({err}); rerun to continue")
            break
        except RunFolderBusy as err:  # another process is training this very cell: leave it to that one
            report.busy.append(cell)
            log(f"{what}: skipped, {err}")
            continue
        except TrainingDiverged as err:
            _record_diverged(study, cell, commit, report, what, str(err), log)
            continue
        except (TrainingError, RunFolderError) as err:  # RunFolderError: a cell folder that does not match
            report.failed.append((cell, str(err)))
            log(f"{what}: FAILED: {err}")
            continue
        _record(study, cell, summary, commit, report, what, log)
    return report


def _record(study: Study, cell: Cell, summary: dict[str, Any], commit: str, report: StudyReport, what: str,
            log: Callable[[str], None]) -> None:
    row = result_row(study, cell, summary, commit)
    append_result(study.results, row, study.columns)
    report.done.append(row)
    split = "validation " if study.validation else ""
    log(f"{what}: {split}{row[study.error_column]}% (paper {cell.paper}), {row['wall_time_s']} s")


def _record_diverged(study: Study, cell: Cell, commit: str, report: StudyReport, what: str, error: str,
                     log: Callable[[str], None]) -> None:
    append_result(study.results, diverged_row(study, cell, commit), study.columns)
    report.diverged.append(cell)
    log(f"{what}: DIVERGED, recorded with {study.error_column} nan (not retried): {error}")


def _run_parallel(study: Study, cells: Sequence[Cell], report: StudyReport, commit: str,
                  fit_fn: Callable[[Config], dict] | None, log: Callable[[str], None], parallel: int,
                  executor: str) -> StudyReport:
    """`parallel` cells at a time through stn.launch.executors (the fan-out that tables and sweeps use). Ctrl-C or
    SIGTERM stops the cells in flight with their checkpoints."""
    from collections import deque

    from stn.launch.executors import (
        SlurmOptions,
        Stopped,
        run_jobs,
        sigterm_as_interrupt,
        start_pool,
        stop_code,
    )

    if executor not in ("local", "debug"):
        raise StudyError(f"executor {executor!r}: a study runs its cells on this machine (local or debug)")
    queue = deque((cell, "resumed" if (cell.run_dir / "checkpoints").is_dir() else "fresh") for cell in cells)
    pool, width, threads = start_pool(executor, len(queue), parallel, study.runs_dir / "submitit", SlurmOptions())
    finished = 0
    try:
        with sigterm_as_interrupt():
            for cell, _source, summary in run_jobs(pool, queue, width, threads, fit_fn, 1.0, log):
                finished += 1
                what = f"[{finished}/{len(cells)}] {cell.label}"
                status, error = summary.get("status"), str(summary.get("error", ""))
                if status == "done" and cell.key in recorded_keys(study):  # by a process started by hand
                    report.skipped += 1
                    log(f"{what}: recorded meanwhile by another process")
                elif status == "done":
                    _record(study, cell, summary, commit, report, what, log)
                elif status == "interrupted":
                    report.stopped = cell
                    report.stop_code = summary.get("exit_code") or report.stop_code
                    log(f"{what}: stopped with a checkpoint ({error}); rerun to continue")
                    if summary.get("signal") and executor == "debug":
                        raise Stopped(report.stop_code)  # in-process, fit's handler caught the study's signal
                elif error.startswith("TrainingDiverged:"):
                    _record_diverged(study, cell, commit, report, what, error, log)
                elif error.startswith(f"{RunFolderBusy.__name__}:"):
                    report.busy.append(cell)
                    log(f"{what}: skipped, {error}")
                else:
                    report.failed.append((cell, error))
                    log(f"{what}: FAILED: {error} (job logs under {study.runs_dir / 'submitit'})")
    except KeyboardInterrupt as err:  # the cells in flight were stopped with checkpoints by run_jobs
        report.stop_code = stop_code(err)
        log("stopped: the cells in flight keep their checkpoints; rerun to continue")
        if report.stopped is None:  # the first cell this call left unfinished
            ended = {row_key(r) for r in report.done} | {c.key for c in report.busy + report.diverged} | \
                {c.key for c, _ in report.failed}
            report.stopped = next((c for c in cells if c.key not in ended), None)
    return report
