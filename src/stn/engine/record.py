"""A table run's record: results.json (every finished member of the batched engine's table), turned into the
per-cell results `stn reproduce-table` aggregates (stn.report), so results.csv, and per grid table.md,
ours_vs_paper.png and the W&B table run, are the CPU table's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stn.engine.plan import Group, Member, PlanError
from stn.report import CellResult, render_csv, summarise
from stn.runs import write_atomic

RESULTS = "results.json"
TABLE_CSV = "results.csv"
PLAN_VERSION = 1


def load_results(state_dir: Path) -> dict[str, dict[str, Any]]:
    path = state_dir / RESULTS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise PlanError(f"{path} is not JSON ({err}); delete it to start the table over") from None
    if data.get("version") != PLAN_VERSION:
        raise PlanError(f"{path} has version {data.get('version')}, expected {PLAN_VERSION}")
    return data["members"]


def save_results(state_dir: Path, results: dict[str, dict[str, Any]]) -> None:
    text = json.dumps({"version": PLAN_VERSION, "members": results}, indent=1) + "\n"
    write_atomic(state_dir / RESULTS, text)


def member_run(record: dict[str, Any]) -> dict[str, Any]:
    """A results.json member record as the table record's per-run record (`stn.report.summarise`): done with
    its test error, or failed after a non-finite loss (None; NaN in state written before None was used)."""
    error = record.get("test_error")
    done = error is not None and math.isfinite(float(error))
    run = {"row": record["row"], "column": record["column"], "seed": record["seed"], "steps": record.get("steps"),
           "status": "done" if done else "failed"}
    if done:
        run["test_error"] = float(error)
    else:
        run["error"] = f"non-finite loss from step {record.get('first_nonfinite_step')}"
    return run


def cell_results(members: Sequence[Member], results: dict[str, dict[str, Any]]) -> list[CellResult]:
    """The table record of `members` (one grid's, in plan order) from results.json: the same per-cell results
    `stn reproduce-table` aggregates (mean, sample std, seeds done), for results.csv, table.md and W&B."""
    papers = {(m.row, m.column): m.paper for m in members}
    seeds: dict[tuple[str, str], list[int]] = {}
    for m in members:
        seeds.setdefault((m.row, m.column), []).append(m.seed)
    return summarise(papers, seeds, [member_run(results[m.key]) for m in members if m.key in results])


def table_csv(groups: Sequence[Group], results: dict[str, dict[str, Any]]) -> str:
    """results.csv of the state: every member's cell in the table record's one schema (stn.report)."""
    return render_csv(cell_results([m for g in groups for m in g.members], results))


TABLE_META = "table.json"  # per grid: its W&B table run's id and last step, and how many seeds it had logged


def write_tables(state_dir: str | Path, tables: Sequence[tuple[Any, Sequence[Member]]], *, preset: str,
                 overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> dict[str, list[CellResult]]:
    """What `stn reproduce-table` writes for a table, from the state's results.json, per grid (the first in
    `state_dir`, each extra one in `state_dir/<grid name>/`): table.md, ours_vs_paper.png and the W&B table run
    (stn.report; job_type table, continued across chunks, logged again only when more seeds finished).
    results.csv of every cell is write_progress's. Returns each grid's per-cell results."""
    from stn.cache import cached_compose
    from stn.report import log_table_to_wandb, new_run_id, plot_bars, write_table

    state_dir = Path(state_dir)
    results = load_results(state_dir)
    saved = json.loads((state_dir / TABLE_META).read_text()) if (state_dir / TABLE_META).is_file() else {}
    template = cached_compose([f"trainer={preset}", *overrides])  # W&B project, entity, mode, group
    group = template.logger.group or state_dir.resolve().name
    out: dict[str, list[CellResult]] = {}
    for index, (grid, members) in enumerate(tables):
        folder = state_dir if index == 0 else state_dir / grid.name
        folder.mkdir(parents=True, exist_ok=True)
        cells = out[grid.name] = cell_results(members, results)
        previous = saved.get(grid.name, {})
        meta: dict[str, Any] = {
            "grid": str(grid.path), "name": grid.name, "preset": preset,
            "seeds": sorted({m.seed for m in members}), "overrides": list(overrides), "executor": "engine",
            "group": group if index == 0 else f"{group}-{grid.name}", "table_dir": str(folder.resolve()),
            "wandb_id": previous.get("wandb_id") or new_run_id(), "wandb_step": int(previous.get("wandb_step", 0)),
        }  # fmt: skip
        # the state's own results.csv (write_progress) holds every cell of every grid
        write_table(folder, grid, cells, meta, with_csv=index > 0)
        chart = plot_bars(cells, folder / "ours_vs_paper.png", f"{grid.title} [{preset}]")
        done = sum(len(c.errors) for c in cells)
        if done and done != previous.get("runs_done"):
            meta["wandb_step"] += 1
            wandb_dir = log_table_to_wandb(grid, cells, chart, meta, template)
            if wandb_dir is not None:
                log(f"{grid.name}: W&B table run {wandb_dir}")
        saved[grid.name] = {"wandb_id": meta["wandb_id"], "wandb_step": meta["wandb_step"], "runs_done": done}
        log(f"{grid.name}: {sum(c.status == 'done' for c in cells)}/{len(cells)} cells done -> {folder / 'table.md'}")
    if template.logger.mode != "disabled":  # no W&B run to continue: no file (a GPU loan counts its files)
        write_atomic(state_dir / TABLE_META, json.dumps(saved, indent=1) + "\n")
    return out
