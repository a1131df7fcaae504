"""A table's record: per-run records aggregated into per-cell results, and everything rendered from them.

One record for every way a table is trained: `stn reproduce-table` (stn.tables.reproduce, one process per cell) and
`stn engine run` (stn.engine.plan, many models per process) both hand `summarise` their per-run records and get
`CellResult`s back, from which come the one results.csv schema (`RESULT_COLUMNS`), table.md, the bar chart,
the terminal table and the W&B table run. `mean_std` is the one mean ± sample std over seeds (the convergence
study's record uses it too); a missing value is None, never NaN. Every file is written atomically
(`stn.runs.write_atomic`), so a reader never sees half a table.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from stn.config import Config
from stn.grid import Grid, cell_name
from stn.runs import write_atomic


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
    steps: int | None = None  # training steps of the finished seeds (None: none finished, or they differ)

    @property
    def status(self) -> str:
        if len(self.errors) == len(self.seeds):
            return "done"
        if self.failed:
            return "failed"
        return "partial" if self.errors else "pending"


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation with n-1) of per-seed values; None for the mean without values and
    for the std below two."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(papers: Mapping[tuple[str, str], float | None],
              seeds: Sequence[int] | Mapping[tuple[str, str], Sequence[int]], runs: Sequence[dict]) -> list[CellResult]:
    """Per-cell results, in the order of `papers` ((row, column) -> the paper's error), from per-run records
    (`row`, `column`, `seed`, `status` done / failed / anything else, `test_error`, `error`, `steps`). `seeds`:
    the seeds planned for every cell, or per cell."""
    planned = seeds if isinstance(seeds, Mapping) else dict.fromkeys(papers, seeds)
    results = {(row, column): CellResult(row, column, cell_name(row, column), paper, list(planned[(row, column)]))
               for (row, column), paper in papers.items()}
    steps: dict[tuple[str, str], set[int]] = {key: set() for key in results}
    for run in runs:
        key = (run["row"], run["column"])
        result = results.get(key)
        if result is None or run["seed"] not in result.seeds:
            continue
        if run["status"] == "done":
            result.errors[run["seed"]] = float(run["test_error"])
            if run.get("steps") is not None:
                steps[key].add(int(run["steps"]))
        elif run["status"] == "failed":
            result.failed[run["seed"]] = str(run.get("error", "failed"))
    for key, result in results.items():
        result.mean, result.std = mean_std([result.errors[s] for s in sorted(result.errors)])
        if result.mean is not None and result.paper is not None:
            result.diff = result.mean - result.paper
        result.steps = next(iter(steps[key])) if len(steps[key]) == 1 else None
    return list(results.values())


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


def paper_text(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def _diff(value: float | None) -> str:
    return "" if value is None else f"{value:+.2f}"


PAPER_IMAGES = 150_000 * 256  # the paper's training images per model: 150k steps of 256


def budget_line(meta: dict[str, Any]) -> str:
    """What made a table: its training budget against the paper's, and every override its cells ran with
    (meta["steps"], ["batch_size"], ["overrides"]), so a smoke table cannot pass for a real one."""
    overrides = " ".join(f"`{item}`" for item in meta.get("overrides") or []) or "none"
    if "steps" not in meta:  # a results.json written before the budget was recorded
        return f"Overrides: {overrides}."
    images = int(meta["steps"]) * int(meta["batch_size"])
    ratio = PAPER_IMAGES / images
    share = f"1/{ratio:,.0f}" if ratio >= 1.5 else f"{1 / ratio:.2g}x"
    return (f"Budget: {meta['steps']:,} steps of {meta['batch_size']} = {images:,} training images per run, "
            f"{share} of the paper's {PAPER_IMAGES:,}"
            + ("" if images >= PAPER_IMAGES else " (**not the paper's budget**)") + f". Overrides: {overrides}.")


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
        budget_line(meta),
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
            entries.append("" if result is None else f"{format_error(result)} / {paper_text(result.paper)}")
        lines.append(f"| {row} | " + " | ".join(entries) + " |")
    lines += [
        "",
        "| model | dataset | ours (%) | paper (%) | ours − paper | seeds done | run folder |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in results:
        lines.append(
            f"| {x.row} | {x.column} | {format_error(x)} | {paper_text(x.paper)} | {_diff(x.diff)} | "
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
                  "seeds", "errors", "steps")  # fmt: skip


def parse_errors(text: str) -> dict[int, float]:
    """results.csv's `errors` field back: '0:1.2300;2:1.4100' -> {0: 1.23, 2: 1.41}."""
    pairs = (item.split(":", 1) for item in text.split(";") if item)
    return {int(seed): float(error) for seed, error in pairs}


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
        x.steps,
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
    payload = {
        **meta,
        "title": grid.title,
        "cells": [{**dataclasses.asdict(x), "status": x.status} for x in results],
        "runs": list(runs),
    }
    write_atomic(table_dir / "results.json", json.dumps(payload, indent=2, default=str) + "\n")
    return {"results.json": table_dir / "results.json", **write_table(table_dir, grid, results, meta)}


def write_table(folder: Path, grid: Grid, results: Sequence[CellResult], meta: dict[str, Any],
                with_csv: bool = True) -> dict[str, Path]:
    """results.csv (one line per cell, RESULT_COLUMNS; unless with_csv=False) and table.md: the files every table
    writes, whichever engine trained it; meta names the grid, preset, seeds, W&B group and (`updated`) when."""
    meta = {"updated": datetime.now().isoformat(timespec="seconds"), **meta}
    files = {"table.md": folder / "table.md"}
    if with_csv:
        files["results.csv"] = folder / "results.csv"
        write_atomic(files["results.csv"], render_csv(results))
    write_atomic(files["table.md"], render_markdown(grid, results, meta))
    return files


def plot_bars(results: Sequence[CellResult], path: Path, title: str = "", *, beside: Sequence[float] | None = None,
              beside_label: str = "", ours_label: str = "ours") -> Path:
    """Grouped bars per cell, written to `path` as a PNG (see `bars_figure`)."""
    import matplotlib.pyplot as plt

    fig = bars_figure(results, title, beside=beside, beside_label=beside_label, ours_label=ours_label)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
    return path


def bars_figure(results: Sequence[CellResult], title: str = "", *, beside: Sequence[float] | None = None,
                beside_label: str = "", ours_label: str = "ours") -> Any:
    """Ours (error bar = std over seeds) beside the paper's number, per cell, on a log axis: the paper's
    errors go down to 0.5% and ours up to 50%, so a linear axis would flatten every sub-1% cell. `beside`: a
    third bar per cell between the two (NaN: none), e.g. the paper's recipe at the same budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Few cells: two-line labels read horizontally; many: one line each, turned on its side.
    many = len(results) > 10
    labels = [f"{x.row} · {x.column}" if many else f"{x.row}\n{x.column}" for x in results]
    ours = [math.nan if x.mean is None else x.mean for x in results]
    spread = [0.0 if x.std is None else x.std for x in results]
    paper = [math.nan if x.paper is None else x.paper for x in results]
    series = [(ours, spread, ours_label, None), *([(list(beside), None, beside_label, "0.35")] if beside else []),
              (paper, None, "paper", "0.6")]
    width = 0.8 / len(series)
    positions = list(range(len(results)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(results) + 2), 4.5))
    for index, (values, errors, label, color) in enumerate(series):
        offset = (index - (len(series) - 1) / 2) * width
        ax.bar([p + offset for p in positions], values, width, yerr=errors, capsize=2 if errors else 0, label=label,
               color=color)
    ax.set_xticks(positions)
    ax.set_xticklabels(labels, rotation=90 if many else 0, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("test error (%, log scale)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    return fig


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
            paper_text(x.paper),
            _diff(x.diff),
            f"{len(x.errors)}/{len(x.seeds)}",
        )
    return table


def new_run_id() -> str:
    """A W&B run id (8 characters of [a-z0-9], as wandb makes them), chosen before the run exists, so the
    table's folder can name its one W&B run from the start (stn.tables.reproduce)."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def paper_shape(grid: Grid, results: Sequence[CellResult]) -> tuple[list[str], list[list[str]]]:
    """The table in the paper's shape, as W&B table columns and rows: one row per model, one column per
    dataset, each entry 'ours / paper' (as table.md)."""
    rows = [r for r in grid.rows if any(x.row == r for x in results)]
    columns = [c for c in grid.columns if any(x.column == c for x in results)]
    by_cell = {(x.row, x.column): x for x in results}
    data = [[row] + [f"{format_error(by_cell[(row, column)])} / {paper_text(by_cell[(row, column)].paper)}"
                     if (row, column) in by_cell else "" for column in columns] for row in rows]
    return ["model", *columns], data


def log_table_to_wandb(
    grid: Grid, results: Sequence[CellResult], chart: Path | None, meta: dict[str, Any], template: Config
) -> Path | None:
    """The table's one W&B run (job_type "table", id meta["wandb_id"], kept in the table's results.json), in
    the per-cell runs' group, so a dashboard can be built from the group. Called after every finished cell
    and at the end (with the bar chart): each call continues the same run (resume="allow") and logs, at step
    meta["wandb_step"] (counted up by the caller across invocations, so an online resume never logs below
    the run's last step), the results as a wandb.Table (`results`: one line per cell; `ours_paper`: the
    paper's shape, 'ours / paper'), and per cell the summary keys test_error/<cell> and
    paper_test_error/<cell>. The run stays open for the whole invocation (stn.tracking.kept_run; stn.tables.reproduce
    finishes it), so offline each invocation writes one wandb/offline-run-*-<id> folder beside the cells' (one
    `wandb sync` uploads them all into the one run). Never fails: warns and returns None; returns the run's
    folder."""
    from stn.tracking import effective_mode, kept_run, say_once

    mode = template.logger.mode
    if mode == "disabled":
        return None
    mode = effective_mode(mode)
    try:
        import wandb

        # One run per invocation, kept open across its updates (stn.tables.reproduce finishes it at the end).
        run = kept_run(
            mode,
            meta["wandb_id"],
            project=template.logger.project,
            entity=template.logger.entity,
            group=meta["group"],
            job_type="table",
            name=f"{meta['group']}-table",
            tags=["table", grid.name, meta["preset"], *template.logger.tags],
            config={
                k: meta[k] for k in ("grid", "name", "preset", "seeds", "overrides", "executor", "table_dir")
            },
        )
        columns, shaped = paper_shape(grid, results)
        payload: dict[str, Any] = {
            "results": wandb.Table(columns=list(RESULT_COLUMNS), data=[result_row(x) for x in results]),
            "ours_paper": wandb.Table(columns=columns, data=shaped),
            "cells_done": sum(x.status == "done" for x in results),
            "runs_done": sum(len(x.errors) for x in results),
        }
        if chart is not None:
            payload["ours_vs_paper"] = wandb.Image(str(chart))
        run.log(payload, step=int(meta["wandb_step"]))
        run.summary.update({f"test_error/{x.cell}": x.mean for x in results if x.mean is not None})
        run.summary.update({f"paper_test_error/{x.cell}": x.paper for x in results if x.paper is not None})
        run.summary.update({"cells": len(results)})
        folder = Path(run.dir).parent  # run.dir is <run folder>/files
        return folder
    except Exception as err:  # W&B must never cost the table: the local files are already written
        say_once(
            f"logging the table failed ({type(err).__name__}: {err}); the results are in {meta['table_dir']}"
        )
        return None
