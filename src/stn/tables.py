"""Reproduce a results table of the paper: a grid of runs, resumable, fanned out with submitit.

A table is a YAML file (`experiments/table1/grid.yaml`): `rows` and `columns` map the paper's labels to
config overrides, `cells` lists which (row, column) pairs exist and the paper's error for each. Every
cell x seed becomes one `Config` (row + column overrides, `trainer=<preset>`, the user's overrides, then
seed, run folder `<table>/cells/<cell>/seed<s>`, `trainer.resume=true` and the W&B group set here) and
one call of `stn.train.fit` in a submitit job: `local` (parallel processes on this machine), `slurm` or
`debug` (in-process, one after another). Rerunning the same command resumes: a cell whose run folder
holds `summary.json` is read back and never re-run, a half-finished one continues from its checkpoint
(fit's resume semantics). After every finished cell `results.csv`, `results.json` and `table.md` are
rewritten atomically; at the end come a bar chart of ours vs the paper's and a W&B run for the table,
in the same group as the per-cell runs.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import signal
import statistics
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from stn.config import Config, ConfigError, compose, from_container, to_dict

DEFAULT_GRID = Path("experiments/table1/grid.yaml")
PRESETS = ("smoke", "quick", "paper")
EXECUTORS = ("local", "slurm", "debug")
FitFn = Callable[[Config], dict]

# Keys a rerun may change without making a finished cell stale: where things live and how they are run
# and logged, not what is trained.
_RUNTIME_KEYS = {
    "data_dir", "download", "runs_dir", "run_dir", "name",
    "trainer.resume", "trainer.stop_after", "trainer.device", "trainer.eval_batch_size", "trainer.compile",
    "logger.mode", "logger.project", "logger.entity", "logger.group", "logger.tags", "logger.images",
}  # fmt: skip
# Overrides the table sets itself, per cell; the user picks them through the command's options instead.
_RESERVED = {"seed": "--seeds", "run_dir": "--out", "trainer": "--preset", "trainer.resume": "(always true)"}


class TableError(ValueError):
    """A table that cannot run: bad grid file, unknown row/column, stale or mismatched cell folder."""


@dataclass(frozen=True)
class Grid:
    """A table of the paper as data. `cells` keeps the file's row order, then its column order."""

    name: str
    title: str
    path: Path
    rows: dict[str, list[str]]
    columns: dict[str, list[str]]
    cells: dict[tuple[str, str], float | None]  # (row, column) -> the paper's % error (None: no number)
    notes: str = ""
    source: str = ""


@dataclass(frozen=True)
class Job:
    """One cell x seed: the config to train and where its run folder is."""

    row: str
    column: str
    cell: str
    seed: int
    config: Config

    @property
    def run_dir(self) -> Path:
        assert self.config.run_dir is not None
        return Path(self.config.run_dir)


@dataclass
class CellResult:
    """Our error for one cell, aggregated over the seeds that finished, beside the paper's."""

    row: str
    column: str
    cell: str
    paper: float | None
    seeds: list[int]  # planned
    errors: dict[int, float] = field(default_factory=dict)  # seed -> % test error (finished seeds only)
    failed: dict[int, str] = field(default_factory=dict)  # seed -> error message
    mean: float | None = None
    std: float | None = None
    diff: float | None = None  # mean - paper

    @property
    def status(self) -> str:
        if len(self.errors) == len(self.seeds):
            return "done"
        if self.failed:
            return "failed"
        return "partial" if self.errors else "pending"


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


# ----------------------------------------------------------------------------------------------- the grid


def load_grid(path: Path | str) -> Grid:
    """Read and check a grid file; every problem names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise TableError(
            f"grid file {path} not found (the paper's Table 1 is {DEFAULT_GRID}; pass --grid PATH)"
        )
    raw = _load_yaml(path, what="grid file")
    if not isinstance(raw, dict):
        raise TableError(f"grid file {path}: expected a mapping with keys name, rows, columns, cells")
    for key in ("name", "rows", "columns", "cells"):
        if key not in raw:
            raise TableError(f"grid file {path}: missing key '{key}'")

    def overrides(section: str) -> dict[str, list[str]]:
        table = raw[section]
        if not isinstance(table, dict) or not table:
            raise TableError(f"grid file {path}: '{section}' must map labels to lists of overrides")
        out = {}
        for label, value in table.items():
            if isinstance(value, str):
                value = value.split()
            if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
                raise TableError(f"grid file {path}: {section}.{label} must be a list of key=value overrides")
            out[str(label)] = list(value)
        return out

    rows, columns = overrides("rows"), overrides("columns")
    if not isinstance(raw["cells"], dict):
        raise TableError(f"grid file {path}: 'cells' must map row -> column -> the paper's error (or null)")
    cells: dict[tuple[str, str], float | None] = {}
    for row, entries in raw["cells"].items():
        if row not in rows:
            raise TableError(f"grid file {path}: cells.{row} is not a row (rows: {', '.join(rows)})")
        if not isinstance(entries, dict):
            raise TableError(f"grid file {path}: cells.{row} must map column -> the paper's error (or null)")
        for column, paper in entries.items():
            if column not in columns:
                raise TableError(
                    f"grid file {path}: cells.{row}.{column} is not a column (columns: {', '.join(columns)})"
                )
            if paper is not None and not isinstance(paper, (int, float)):
                raise TableError(f"grid file {path}: cells.{row}.{column}={paper!r} must be a number or null")
            cells[(row, str(column))] = None if paper is None else float(paper)
    # Present cells row by row, columns in the order the file lists them.
    order = list(columns)
    cells = dict(sorted(cells.items(), key=lambda kv: (list(rows).index(kv[0][0]), order.index(kv[0][1]))))
    return Grid(
        name=str(raw["name"]),
        title=str(raw.get("title", raw["name"])),
        path=path,
        rows=rows,
        columns=columns,
        cells=cells,
        notes=str(raw.get("notes", "") or ""),
        source=str(raw.get("source", "") or ""),
    )


def _load_yaml(path: Path, what: str) -> Any:
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # yaml's and OmegaConf's parse errors share no base class
        raise TableError(f"{what} {path} is not valid YAML: {err}") from None


def cell_name(row: str, column: str) -> str:
    """A folder-safe cell id: ('ST-CNN Aff', 'RTS') -> 'RTS_st-cnn-aff'."""
    slug = "".join(c if c.isalnum() or c in "-." else "-" for c in row.lower()).strip("-")
    return f"{column}_{slug}"


def select_cells(
    grid: Grid, rows: Sequence[str] | None = None, columns: Sequence[str] | None = None
) -> list[tuple[str, str]]:
    """The grid's cells restricted to the given rows and columns (None = all); unknown names are errors."""
    for kind, asked, valid in (("row", rows, grid.rows), ("column", columns, grid.columns)):
        unknown = [name for name in (asked or []) if name not in valid]
        if unknown:
            raise TableError(
                f"unknown {kind}{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in "
                f"{grid.path}; valid {kind}s: {', '.join(valid)}"
            )
    chosen = [
        (row, column)
        for row, column in grid.cells
        if (not rows or row in rows) and (not columns or column in columns)
    ]
    if not chosen:
        raise TableError(
            f"no cell of {grid.path} has a row in {list(rows or grid.rows)} and a column in "
            f"{list(columns or grid.columns)} (the grid's cells: "
            f"{', '.join(f'{r}/{c}' for r, c in grid.cells)})"
        )
    return chosen


def _check_overrides(overrides: Sequence[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in _RESERVED:
            raise TableError(
                f"override {item!r}: the table sets {key} per cell; use {_RESERVED[key]} instead"
            )


def plan_jobs(
    grid: Grid,
    cells: Sequence[tuple[str, str]],
    seeds: Sequence[int],
    preset: str,
    overrides: Sequence[str],
    table_dir: Path,
    group: str,
) -> list[Job]:
    """Compose one validated Config per cell x seed (all of them before anything runs)."""
    if preset not in PRESETS:
        raise TableError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if not seeds:
        raise TableError("no seeds given; pass e.g. --seeds 0 or --seeds 0,1,2")
    _check_overrides(overrides)
    table_dir = table_dir.resolve()
    jobs = []
    for row, column in cells:
        words = [*grid.rows[row], *grid.columns[column], f"trainer={preset}", *overrides]
        try:
            base = compose(words)
        except ConfigError as err:
            raise TableError(f"cell {row}/{column} ({' '.join(words)}): {err}") from None
        # Workers may run elsewhere (Slurm) or in another cwd: pin the data folder.
        base = dataclasses.replace(base, data_dir=str(Path(base.data_dir).resolve()))
        name = cell_name(row, column)
        for seed in seeds:
            config = dataclasses.replace(
                base,
                seed=int(seed),
                name=f"{base.run_name}-seed{seed}",
                run_dir=str(table_dir / "cells" / name / f"seed{seed}"),
                trainer=dataclasses.replace(base.trainer, resume=True),
                logger=dataclasses.replace(base.logger, group=group),
            )
            jobs.append(Job(row=row, column=column, cell=name, seed=int(seed), config=config))
    return jobs


# ------------------------------------------------------------------------------------------ aggregation


def aggregate(errors: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation with n-1) of per-seed errors; std is None below two seeds."""
    if not errors:
        return None, None
    mean = statistics.fmean(errors)
    std = statistics.stdev(errors) if len(errors) > 1 else None
    return mean, std


def summarise(
    grid: Grid, cells: Sequence[tuple[str, str]], seeds: Sequence[int], runs: Sequence[dict]
) -> list[CellResult]:
    """Per-cell results from per-run records (`row`, `column`, `seed`, `status`, `test_error`, `error`)."""
    results = {
        (row, column): CellResult(row, column, cell_name(row, column), grid.cells[(row, column)], list(seeds))
        for row, column in cells
    }
    for run in runs:
        result = results.get((run["row"], run["column"]))
        if result is None or run["seed"] not in result.seeds:
            continue
        if run["status"] == "done":
            result.errors[run["seed"]] = float(run["test_error"])
        elif run["status"] == "failed":
            result.failed[run["seed"]] = str(run.get("error", "failed"))
    for result in results.values():
        result.mean, result.std = aggregate([result.errors[s] for s in sorted(result.errors)])
        if result.mean is not None and result.paper is not None:
            result.diff = result.mean - result.paper
    return list(results.values())


# --------------------------------------------------------------------------------------------- outputs


def _write_atomic(path: Path, data: str | bytes) -> None:
    """Write next to the target, then rename over it: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def format_error(result: CellResult) -> str:
    """'1.23', '1.23 ± 0.05', 'failed' or '—' (not run yet)."""
    if result.mean is None:
        return "failed" if result.failed else "—"
    text = f"{result.mean:.2f}"
    if result.std is not None:
        text += f" ± {result.std:.2f}"
    if result.status != "done":
        text += f" ({len(result.errors)}/{len(result.seeds)} seeds)"
    return text


def _paper(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def _diff(value: float | None) -> str:
    return "" if value is None else f"{value:+.2f}"


def render_markdown(grid: Grid, results: Sequence[CellResult], meta: dict[str, Any]) -> str:
    """The table in the paper's shape (ours / paper per cell), then one line per cell with the difference."""
    rows = [r for r in grid.rows if any(x.row == r for x in results)]
    columns = [c for c in grid.columns if any(x.column == c for x in results)]
    by_cell = {(x.row, x.column): x for x in results}
    done = sum(x.status == "done" for x in results)
    lines = [
        f"# {grid.title}",
        "",
        f"Ours vs the paper, percentage test error. Grid `{meta['grid']}`, preset `{meta['preset']}`, "
        f"seeds {', '.join(map(str, meta['seeds']))}, {done}/{len(results)} cells done "
        f"(updated {meta['updated']}). W&B group `{meta['group']}`.",
        "",
        "Each entry: ours (mean ± sample std over seeds) / the paper's.",
        "",
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in rows:
        entries = []
        for column in columns:
            result = by_cell.get((row, column))
            entries.append("" if result is None else f"{format_error(result)} / {_paper(result.paper)}")
        lines.append(f"| {row} | " + " | ".join(entries) + " |")
    lines += [
        "",
        "| model | dataset | ours (%) | paper (%) | ours − paper | seeds done | run folder |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in results:
        lines.append(
            f"| {x.row} | {x.column} | {format_error(x)} | {_paper(x.paper)} | {_diff(x.diff)} | "
            f"{len(x.errors)}/{len(x.seeds)} | cells/{x.cell} |"
        )
    failures = [(x, seed, msg) for x in results for seed, msg in sorted(x.failed.items())]
    if failures:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {x.row} / {x.column} seed {seed}: {msg}" for x, seed, msg in failures]
    if grid.source or grid.notes:
        lines += ["", f"Paper numbers: {grid.source}. {grid.notes}".strip()]
    return "\n".join(lines) + "\n"


RESULT_COLUMNS = ("row", "column", "cell", "status", "ours_mean", "ours_std", "paper", "diff", "seeds_done",
                  "seeds", "errors")  # fmt: skip


def result_row(x: CellResult) -> list[Any]:
    """One cell as a row of RESULT_COLUMNS (results.csv and the W&B table); None where there is no value."""
    errors = ";".join(f"{seed}:{err:.4f}" for seed, err in sorted(x.errors.items()))
    return [
        x.row,
        x.column,
        x.cell,
        x.status,
        x.mean,
        x.std,
        x.paper,
        x.diff,
        len(x.errors),
        len(x.seeds),
        errors,
    ]


def render_csv(results: Sequence[CellResult]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for x in results:
        writer.writerow(round(v, 4) if isinstance(v, float) else v for v in result_row(x))  # None -> ""
    return out.getvalue()


def write_results(
    table_dir: Path, grid: Grid, results: Sequence[CellResult], runs: Sequence[dict], meta: dict[str, Any]
) -> dict[str, Path]:
    """results.json (everything), results.csv (one line per cell), table.md; each written atomically."""
    meta = {**meta, "updated": datetime.now().isoformat(timespec="seconds")}
    files = {name: table_dir / name for name in ("results.json", "results.csv", "table.md")}
    payload = {
        **meta,
        "title": grid.title,
        "cells": [{**dataclasses.asdict(x), "status": x.status} for x in results],
        "runs": list(runs),
    }
    _write_atomic(files["results.json"], json.dumps(payload, indent=2, default=str) + "\n")
    _write_atomic(files["results.csv"], render_csv(results))
    _write_atomic(files["table.md"], render_markdown(grid, results, meta))
    return files


def plot_bars(results: Sequence[CellResult], path: Path, title: str = "") -> Path:
    """Grouped bars per cell: ours (error bar = std over seeds) beside the paper's number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Few cells: two-line labels read horizontally; many: one line each, turned on its side.
    many = len(results) > 10
    labels = [f"{x.row} · {x.column}" if many else f"{x.row}\n{x.column}" for x in results]
    ours = [math.nan if x.mean is None else x.mean for x in results]
    spread = [0.0 if x.std is None else x.std for x in results]
    paper = [math.nan if x.paper is None else x.paper for x in results]
    width = 0.4
    positions = list(range(len(results)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(results) + 2), 4.5))
    ax.bar([p - width / 2 for p in positions], ours, width, yerr=spread, capsize=2, label="ours")
    ax.bar([p + width / 2 for p in positions], paper, width, label="paper", color="0.6")
    ax.set_xticks(positions)
    ax.set_xticklabels(labels, rotation=90 if many else 0, fontsize=7)
    ax.set_ylabel("test error (%)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    _write_atomic(path, buffer.getvalue())
    return path


def rich_table(grid: Grid, results: Sequence[CellResult]) -> Any:
    """A rich.Table for the terminal: one line per cell."""
    from rich.table import Table

    table = Table(title=grid.title)
    for name in ("model", "dataset", "ours (%)", "paper (%)", "ours − paper", "seeds"):
        table.add_column(name, justify="left" if name in ("model", "dataset") else "right")
    for x in results:
        table.add_row(
            x.row,
            x.column,
            format_error(x),
            _paper(x.paper),
            _diff(x.diff),
            f"{len(x.errors)}/{len(x.seeds)}",
        )
    return table


def log_table_to_wandb(
    grid: Grid, results: Sequence[CellResult], chart: Path | None, meta: dict[str, Any], template: Config
) -> Path | None:
    """One W&B run for the whole table (job_type "table"), in the per-cell runs' group, so a dashboard can
    be built from the group. Its offline folder lands where the per-cell runs' do (./wandb or $WANDB_DIR),
    so one `wandb sync` uploads them all. Never fails: warns and returns None; returns the run's folder."""
    from stn.tracking import has_wandb_credentials, say_once

    mode = template.logger.mode
    if mode == "disabled":
        return None
    if mode == "online" and not has_wandb_credentials():
        say_once(
            "logger.mode=online but no API key (WANDB_API_KEY or a netrc entry): logging offline instead"
        )
        mode = "offline"
    try:
        import wandb

        with wandb.init(
            project=template.logger.project,
            entity=template.logger.entity,
            group=meta["group"],
            job_type="table",
            name=f"{meta['group']}-table",
            tags=["table", grid.name, meta["preset"], *template.logger.tags],
            mode=mode,
            config={
                k: meta[k] for k in ("grid", "name", "preset", "seeds", "overrides", "executor", "table_dir")
            },
            settings=wandb.Settings(console="off", silent=True),
            reinit="create_new",
        ) as run:
            payload: dict[str, Any] = {
                "results": wandb.Table(columns=list(RESULT_COLUMNS), data=[result_row(x) for x in results])
            }
            if chart is not None:
                payload["ours_vs_paper"] = wandb.Image(str(chart))
            run.log(payload)
            run.summary.update({f"test_error/{x.cell}": x.mean for x in results if x.mean is not None})
            folder = Path(run.dir).parent  # run.dir is <run folder>/files
        return folder
    except Exception as err:  # W&B must never cost the table: the local files are already written
        say_once(
            f"logging the table failed ({type(err).__name__}: {err}); the results are in {meta['table_dir']}"
        )
        return None


# ------------------------------------------------------------------------------------------ execution


def run_cell(config: Config, threads: int | None = None, fit_fn: FitFn | None = None) -> dict[str, Any]:
    """The job body (runs in the worker). Returns fit's summary with status 'done', or status 'failed' /
    'interrupted' (stopped with a checkpoint) and the error; never raises, so one bad cell cannot take the
    table down (and submitit's debug executor, which opens pdb on an exception, never does)."""
    previous = None
    try:
        import torch

        if threads:
            # Parallel cells share the CPU: without this each would start one thread per core.
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
        if fit_fn is None:
            from stn.train import fit as fit_fn
        summary = dict(fit_fn(config))
        summary["status"] = "done"
        return summary
    except Exception as err:
        from stn.train import TrainingInterrupted

        if isinstance(err, TrainingInterrupted):  # a signal or trainer.stop_after: checkpointed, resumable
            return {
                "status": "interrupted",
                "error": str(err),
                "signal": err.exit_code != 0,
                "step": err.step,
            }
        return {
            "status": "failed",
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        }
    finally:
        if previous is not None:
            import torch

            torch.set_num_threads(previous)


class CellTask:
    """The submitted callable: `run_cell`, plus submitit's checkpoint hook. On a Slurm time limit or
    preemption (submitit's USR2), submitit calls `checkpoint` and requeues the same cell; fit then resumes
    from the run's last checkpoint (trainer.resume=true), losing at most trainer.checkpoint_every steps."""

    def __call__(
        self, config: Config, threads: int | None = None, fit_fn: FitFn | None = None
    ) -> dict[str, Any]:
        return run_cell(config, threads, fit_fn)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text())
        float(summary["test_error"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TableError(
            f"{path} is unreadable or has no test_error ({type(err).__name__}: {err}); "
            f"delete its run folder {path.parent} to re-run that cell"
        ) from None
    return summary


def _check_not_stale(job: Job) -> None:
    """A cell folder written by a different experiment (other preset/overrides into the same --out) must
    not be passed off as this one's result."""
    saved = job.run_dir / "config.yaml"
    if not saved.is_file():
        return
    try:
        previous = to_dict(from_container(_load_yaml(saved, what="cell config")))
    except (TableError, ConfigError) as err:
        raise TableError(
            f"{saved} is not a readable config ({err}); delete {job.run_dir} to re-run it"
        ) from None
    current = to_dict(job.config)
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
    changed = [
        f"{key}: {a!r} -> {b!r}" for key, a, b in _diff_dicts(previous, current) if key not in _RUNTIME_KEYS
    ]
    if changed:
        raise TableError(
            f"cell folder {job.run_dir} was trained with a different config ({'; '.join(changed[:5])}). "
            f"Use another --out for a different experiment, or delete the folder to re-run it"
        )


def _diff_dicts(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff_dicts(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append((f"{prefix}{key}", x, y))
    return out


def _previous_wandb_dir(table_dir: Path) -> str | None:
    try:
        return json.loads((table_dir / "results.json").read_text()).get("wandb_dir")
    except (OSError, ValueError, AttributeError):
        return None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None
    gpus: int = 1
    cpus: int | None = None
    time_min: int = 24 * 60
    mem_gb: float | None = None


def slurm_parameters(options: SlurmOptions, parallel: int) -> dict[str, Any]:
    """submitit AutoExecutor parameters for one cell per Slurm job."""
    params: dict[str, Any] = {
        "timeout_min": options.time_min,
        "gpus_per_node": options.gpus,
        "tasks_per_node": 1,
        "nodes": 1,
        "slurm_array_parallelism": parallel,
        "name": "stn-table",
    }
    if options.partition:
        params["slurm_partition"] = options.partition
    if options.cpus:
        params["cpus_per_task"] = options.cpus
    if options.mem_gb:
        params["mem_gb"] = options.mem_gb
    return params


def build_executor(kind: str, folder: Path, parallel: int, slurm: SlurmOptions) -> Any:
    """The submitit executor for `kind` (local | slurm | debug); submitit keeps its logs under `folder`."""
    import submitit

    if kind == "local":
        executor = submitit.LocalExecutor(folder=folder)
        # A local job is killed at timeout_min (submitit's default is 2 minutes): give it the slurm time.
        executor.update_parameters(timeout_min=slurm.time_min)
        return executor
    if kind == "debug":
        return submitit.DebugExecutor(folder=folder)
    if kind == "slurm":
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        except RuntimeError as err:
            raise TableError(
                f"--executor slurm needs a Slurm cluster ({err}); use --executor local on this machine"
            ) from None
        executor.update_parameters(**slurm_parameters(slurm, parallel))
        return executor
    raise TableError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")


def run_jobs(
    pool: Any,
    queue: deque[tuple[Job, str]],
    width: int,
    threads: int | None,
    fit_fn: FitFn | None,
    poll_s: float,
    log: Callable[[str], None],
) -> Iterator[tuple[Job, str, dict[str, Any]]]:
    """Keep at most `width` jobs in flight on the submitit executor; yield (job, source, summary) as each
    finishes, in finishing order. On Ctrl-C the jobs in flight are cancelled (they checkpoint and stop)."""
    in_flight: dict[Any, tuple[Job, str]] = {}
    try:
        while queue or in_flight:
            while queue and len(in_flight) < width:
                job, source = queue.popleft()
                job.run_dir.mkdir(parents=True, exist_ok=True)
                in_flight[pool.submit(CellTask(), job.config, threads, fit_fn)] = (job, source)
                log(f"  started {job.row} / {job.column} seed {job.seed} ({source})")
            done = [handle for handle in in_flight if handle.done()]
            if not done:
                time.sleep(poll_s)
            for handle in done:
                job, source = in_flight.pop(handle)
                try:
                    summary = handle.result()
                except Exception as err:  # the worker died (killed, out of memory): keep the table going
                    summary = {"status": "failed", "error": f"{type(err).__name__}: {err}".splitlines()[0]}
                yield job, source, summary
    except (KeyboardInterrupt, GeneratorExit):  # GeneratorExit: the caller was interrupted between yields
        stop_jobs(list(in_flight))
        raise


def stop_jobs(handles: Sequence[Any], wait_s: float = 60.0) -> None:
    """Stop running jobs so that fit writes a checkpoint first (it does on SIGTERM), then wait for them.

    A local job's controller forwards SIGTERM to its task (submitit's own cancel sends SIGINT and follows
    with SIGKILL a second later, which can cut a checkpoint short); Slurm jobs get scancel (SIGTERM too).
    """
    for handle in handles:
        process = getattr(handle, "_process", None)  # submitit.local.LocalJob's controller process
        try:
            if process is not None:
                process.terminate()
            else:
                handle.cancel(check=False)
        except Exception:  # already gone
            pass
    deadline = time.monotonic() + wait_s
    for handle in handles:
        process = getattr(handle, "_process", None)
        if process is not None:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # still running after wait_s: leave it, its checkpoint stays resumable
                pass


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """`kill <pid>` of the table process stops it like Ctrl-C: the runs in flight are stopped too, instead
    of training on as orphans that a rerun would start a second time."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _record(
    job: Job, status: str, source: str, summary: dict | None = None, error: str = ""
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
    slurm: SlurmOptions = SlurmOptions(),
    fit_fn: FitFn | None = None,
    poll_s: float = 1.0,
    log: Callable[[str], None] = print,
) -> TableReport:
    """Run (or resume) a table and write its outputs; returns what ran and the per-cell results.

    `fit_fn` replaces `stn.train.fit` (tests); with the local or slurm executor it must be picklable.
    """
    grid = load_grid(grid_path)
    cells = select_cells(grid, rows, columns)
    _check_overrides(overrides)
    if executor not in EXECUTORS:
        raise TableError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if preset not in PRESETS:
        raise TableError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    try:  # the settings shared by every cell: where runs go, the W&B project and mode
        template = compose([f"trainer={preset}", *overrides])
    except ConfigError as err:
        raise TableError(str(err)) from None
    table_dir = Path(out) if out else Path(template.runs_dir) / "tables" / f"{grid.name}-{preset}"
    table_dir = table_dir.resolve()
    group = template.logger.group or table_dir.name
    seeds = [int(s) for s in seeds]
    jobs = plan_jobs(grid, cells, seeds, preset, overrides, table_dir, group)
    table_dir.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "grid": str(grid.path), "name": grid.name, "preset": preset, "seeds": seeds,
        "overrides": list(overrides), "executor": executor, "group": group, "table_dir": str(table_dir),
        "wandb_dir": _previous_wandb_dir(table_dir),
    }  # fmt: skip

    # What is already done is read back, never re-run; the rest is queued (resumed or fresh).
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    queue: deque[tuple[Job, str]] = deque()
    for job in jobs:
        _check_not_stale(job)
        summary_path = job.run_dir / "summary.json"
        if summary_path.is_file():
            runs[(job.cell, job.seed)] = _record(job, "done", "cached", _read_summary(summary_path))
        else:
            has_checkpoint = any((job.run_dir / "checkpoints").glob("*.pt"))
            queue.append((job, "resumed" if has_checkpoint else "fresh"))
            runs[(job.cell, job.seed)] = _record(job, "pending", "resumed" if has_checkpoint else "fresh")
    report = TableReport(table_dir=table_dir, group=group, cells=[], runs=[], cached=len(jobs) - len(queue))

    def refresh() -> list[CellResult]:
        report.runs = list(runs.values())
        report.cells = summarise(grid, cells, seeds, report.runs)
        report.files.update(write_results(table_dir, grid, report.cells, report.runs, meta))
        return report.cells

    pool, width = None, 1
    threads: int | None = None
    if queue:
        width = max(1, min(parallel or (len(queue) if executor == "slurm" else 1), len(queue)))
        # Local cells share this machine's cores; a Slurm job gets its own (cpus_per_task), debug runs in here.
        threads = max(1, _cpu_count() // width) if executor == "local" else None
        pool = build_executor(executor, table_dir / "submitit", width, slurm)
    refresh()
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
                    status = summary.get("status")
                    if status == "done":
                        runs[(job.cell, job.seed)] = _record(job, "done", source, summary)
                        setattr(report, source, getattr(report, source) + 1)
                        paper = _paper(grid.cells[(job.row, job.column)])
                        log(f"  {where}: {float(summary['test_error']):.2f}% (paper {paper})")
                    elif status == "interrupted":
                        runs[(job.cell, job.seed)] = _record(
                            job, "interrupted", source, error=summary["error"]
                        )
                        report.stopped += 1
                        log(
                            f"  {where} stopped at step {summary.get('step')} with a checkpoint; rerun to go on"
                        )
                    else:
                        runs[(job.cell, job.seed)] = _record(
                            job, "failed", source, error=summary.get("error", "")
                        )
                        report.failed += 1
                        log(f"  {where} FAILED: {summary.get('error')} (run folder {job.run_dir}, "
                            f"job logs {table_dir / 'submitit'})")  # fmt: skip
                    refresh()  # an interrupted table loses at most the runs in flight
                    if status == "interrupted" and summary.get("signal") and executor == "debug":
                        # In-process, fit's own handler caught the Ctrl-C meant for the whole table.
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            refresh()
            log("interrupted: the runs in flight stopped with a checkpoint; rerun the same command to resume")
            raise
    results = refresh()
    chart = plot_bars(results, table_dir / "ours_vs_paper.png", f"{grid.title} [{preset}]")
    report.files["ours_vs_paper.png"] = chart
    previous = meta.get("wandb_dir")
    if report.ran == 0 and previous and Path(previous).is_dir():
        # Nothing changed since the last table run was logged: don't add a duplicate to the group.
        report.wandb_dir = Path(previous)
        log(f"nothing new ran; the table's W&B run is still {previous}")
    else:
        report.wandb_dir = log_table_to_wandb(grid, results, chart, meta, template)
        meta["wandb_dir"] = None if report.wandb_dir is None else str(report.wandb_dir)
        refresh()
    return report
