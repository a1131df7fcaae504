"""How long a study's remaining cells will take, from what its record measured.

A cell's time is its training images over the median images/s of the recorded rows of the same model and
dataset that trained with one thread (the way the study runs its cells: one process per core); the study's own
record first, else the main convergence record. The rows were measured on the 2-core machines of their day (their
`cpu` column) beside whatever else ran (their `load` column), so an estimate says how long such cells took
there, not how fast a CPU is. Wall time is the cells run in order by `queues` processes, each taking the next
cell when it is free (what `--parallel N` and ablate.sh's two queues do).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stn.convergence.study import Cell, Study, main_record, read_results


@dataclass(frozen=True)
class Rate:
    images_per_s: float  # the median of the rows it was taken from
    rows: int
    source: Path  # the record they are in
    same_cpu: bool  # measured on a CPU of this machine's kind (the record's `cpu` column)


def one_thread_rates(record: Path, cpu: str) -> dict[tuple[str, str], Rate]:
    """(model, dataset) -> the median images/s of `record`'s rows trained with one thread: those measured on
    `cpu` (e.g. 'AMD EPYC (AVX2, 2 cores)') where there are any, else all of them. A row without a `threads` value
    counts as one thread: the study's cells have always run one thread per process, and the column came later
    (experiments/convergence/README.md)."""
    found: dict[tuple[str, str], list[tuple[float, bool]]] = {}
    for row in read_results(record):
        try:
            rate, threads = float(row.get("images_per_s") or 0), int(row.get("threads") or 1)
        except ValueError:
            continue
        if threads == 1 and rate > 0:
            found.setdefault((row["model"], row["dataset"]), []).append((rate, row.get("cpu") == cpu))
    rates = {}
    for key, measured in found.items():
        same = [rate for rate, on_cpu in measured if on_cpu]
        chosen = same or [rate for rate, _ in measured]
        rates[key] = Rate(statistics.median(chosen), len(chosen), record, bool(same))
    return rates


def study_rates(study: Study, cpu: str) -> dict[tuple[str, str], Rate]:
    """The study's own rates, completed by the main convergence record's for what the study has not measured
    (or measured on another kind of CPU only, when the main record has this kind)."""
    rates = one_thread_rates(study.results, cpu)
    main = main_record(study)
    if main is not None:
        for key, rate in one_thread_rates(main, cpu).items():
            if key not in rates or (rate.same_cpu and not rates[key].same_cpu):
                rates[key] = rate
    return rates


def cell_seconds(cell: Cell, rates: dict[tuple[str, str], Rate]) -> float | None:
    """The cell's expected training seconds, None without a recorded rate for its model and dataset."""
    rate = rates.get((cell.row, cell.column))
    if rate is None:
        return None
    return cell.config.trainer.iterations * cell.config.trainer.batch_size / rate.images_per_s


def wall_seconds(seconds: Sequence[float], queues: int) -> float:
    """The time `queues` processes take to run cells of these durations in order, each starting the next cell
    as soon as it is free."""
    if queues < 1:
        raise ValueError(f"queues must be at least 1, not {queues}")
    free = [0.0] * queues
    for duration in seconds:
        first = min(range(queues), key=free.__getitem__)
        free[first] += duration
    return max(free, default=0.0)


def duration_text(seconds: float) -> str:
    """'~45 min', '~3.2 h'."""
    return f"~{seconds / 60:.0f} min" if seconds < 5400 else f"~{seconds / 3600:.1f} h"
