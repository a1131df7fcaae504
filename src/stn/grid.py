"""A results table of the paper as data: the grid file's schema, its checks, and cell selection.

A grid file (`experiments/table1/grid.yaml`) has `name`, `rows` and `columns` (the paper's labels mapped to
config overrides), `cells` (which (row, column) pairs exist, and the paper's % error for each, or null)
and optional `title`, `source`, `notes`. `load_grid` checks all of it before anything runs: labels and the
name must be safe folder names, overrides `key=value` words that leave the per-cell keys (seed, run_dir,
trainer preset) to the table, paper values finite numbers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from stn.config import Config, UserError
from stn.validation import SAFE_NAME

DEFAULT_GRID = Path("experiments/table1/grid.yaml")
# The same file inside an installed stn (pyproject.toml ships it), for `stn reproduce-table` run anywhere.
PACKAGED_GRIDS = {DEFAULT_GRID: Path(__file__).resolve().parent / "grids" / "table1.yaml"}
# Overrides the table sets itself, per cell; the user picks them through the command's options instead.
RESERVED = {"seed": "--seeds", "run_dir": "--out", "trainer": "--preset", "trainer.resume": "(always true)"}
ROW_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+=-]{0,99}")  # rows may hold spaces ("ST-CNN Aff"), never a /


# Table 1's rows, the paper's labels and the config choices that build them: the one list the code uses (stn
# models, stn bench). experiments/table1/grid.yaml states the same rows as data (tests/test_grid.py checks).
TABLE1_MODELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("FCN", ("model=fcn", "transformer=none")),
    ("CNN", ("model=cnn", "transformer=none")),
    ("ST-FCN Aff", ("model=st_fcn", "transformer=affine")),
    ("ST-FCN Proj", ("model=st_fcn", "transformer=projective")),
    ("ST-FCN TPS", ("model=st_fcn", "transformer=tps")),
    ("ST-CNN Aff", ("model=st_cnn", "transformer=affine")),
    ("ST-CNN Proj", ("model=st_cnn", "transformer=projective")),
    ("ST-CNN TPS", ("model=st_cnn", "transformer=tps")),
)


class TableError(UserError):
    """A table that cannot run: bad grid file, unknown row/column, stale or mismatched cell folder."""


class CellComposeError(TableError):
    """A cell whose words do not compose: the message names the cell and its words; `row`, `column` and
    `reason` (the config error alone) let a caller word it its own way."""

    def __init__(self, row: str, column: str, words: Sequence[str], reason: str) -> None:
        super().__init__(f"cell {row}/{column} ({' '.join(words)}): {reason}")
        self.row, self.column, self.reason = row, column, reason


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


def locate_grid(path: Path | str) -> Path:
    """`path`; the default grid (experiments/table1/grid.yaml) when it is not there (stn run outside the
    checkout): the checkout's copy beside an editable install, else the copy packaged in stn/grids/."""
    path = Path(path)
    if path.is_file() or path not in PACKAGED_GRIDS:
        return path
    for candidate in (Path(__file__).resolve().parents[2] / path, PACKAGED_GRIDS[path]):
        if candidate.is_file():
            return candidate
    return path


def load_grid(path: Path | str) -> Grid:
    """Read and check a grid file (`locate_grid`); every problem names the file and the key."""
    path = locate_grid(path)
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
            pattern = ROW_LABEL if section == "rows" else SAFE_NAME
            if not pattern.fullmatch(str(label)):
                raise TableError(f"grid file {path}: {section} label {str(label)!r} is not a safe folder name; use "
                                 f"letters, digits and . _ + = -{' and spaces' if section == 'rows' else ''}")
            check_overrides(value, f"grid file {path}: {section}.{label}")
            out[str(label)] = list(value)
        return out

    if not SAFE_NAME.fullmatch(str(raw["name"])):
        raise TableError(f"grid file {path}: name={raw['name']!r} is not a safe folder name (it names the table "
                         f"folder); use letters, digits and . _ + = -")

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
            number = isinstance(paper, (int, float)) and not isinstance(paper, bool)
            if paper is not None and not (number and math.isfinite(paper) and 0 <= paper <= 100):
                raise TableError(f"grid file {path}: cells.{row}.{column}={paper!r} must be a percentage "
                                 f"(a number in [0, 100]) or null")
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


def slug(label: str) -> str:
    """A label as a lower-case folder- and id-safe word: 'ST-CNN Aff' -> 'st-cnn-aff' (the one slug of row
    labels: cell folders, engine group ids, `stn bench --models`)."""
    return "".join(c if c.isalnum() or c in "-." else "-" for c in label.lower()).strip("-")


def cell_name(row: str, column: str) -> str:
    """A folder-safe cell id: ('ST-CNN Aff', 'RTS') -> 'RTS_st-cnn-aff'."""
    return f"{column}_{slug(row)}"


@dataclass(frozen=True)
class CellSeed:
    """One cell x seed of a grid, composed: what `stn reproduce-table`, `stn engine` and the convergence study
    each train (they add their own run folder and W&B settings)."""

    row: str
    column: str
    seed: int
    config: Config
    paper: float | None


def compose_cells(grid: Grid, cells: Sequence[tuple[str, str]], seeds: Sequence[int],
                  overrides: Sequence[str]) -> list[CellSeed]:
    """The one way a cell x seed becomes a Config: the row's overrides, the column's, then `overrides` (the
    preset, the user's words), composed and validated once per cell (all cells before anything runs), then
    the seed. Cell by cell, seeds inside; a word that does not compose is a TableError naming the cell."""
    from stn.cache import cached_compose_many  # here: reading a grid file must not load Hydra
    from stn.compose import ComposeError

    word_lists = [[*grid.rows[row], *grid.columns[column], *overrides] for row, column in cells]
    try:
        bases = cached_compose_many(word_lists)
    except ComposeError as err:
        words = list(err.overrides)
        row, column = cells[word_lists.index(words)]
        raise CellComposeError(row, column, words, str(err)) from None
    return [CellSeed(row, column, int(seed), dataclasses.replace(base, seed=int(seed)), grid.cells[(row, column)])
            for (row, column), base in zip(cells, bases, strict=True) for seed in seeds]


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


def check_overrides(overrides: Any, where: str) -> None:
    """Overrides must be key=value words that leave the per-cell keys (RESERVED) to the table."""
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in RESERVED:
            raise TableError(f"{where}: override {item!r}: the table sets {key} per cell; use {RESERVED[key]} instead")


def override_key(word: str) -> str:
    """The dotted key of a Hydra override word: '++dataset.rotation=0' -> 'dataset.rotation'."""
    return word.split("=", 1)[0].strip().lstrip("+~")


# Keys under a config group that say how much of the data a run uses or is scored on, not what the data, model
# or transformer is: a label that chooses the group (dataset=RTS) still says what trained when these change.
LABEL_NEUTRAL = ("dataset.train_limit", "dataset.test_limit", "dataset.validation")


def label_problems(overrides: Sequence[str], sources: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    """One line per user override that would change a key a label sets: `sources` are (label, its overrides),
    e.g. ("column RTS", ["dataset=RTS"]). A cell is recorded under its row and column (a study's also under its
    budget), so `dataset=R` on an RTS cell would train R and record it as RTS beside the paper's RTS number. A
    label that chooses a group (dataset=RTS) also sets every key under it (dataset.rotation=0 would train
    another RTS), except the LABEL_NEUTRAL ones."""
    set_by: dict[str, list[tuple[str, str]]] = {}
    for label, words in sources:
        for word in words:
            set_by.setdefault(override_key(word), []).append((label, word))
    problems = []
    for item in overrides:
        key = override_key(item)
        value = item.split("=", 1)[1].strip() if "=" in item else None
        group = key.split(".", 1)[0]
        if "." in key and key not in LABEL_NEUTRAL and group in set_by:  # a key under a group a label chooses
            label, word = set_by[group][0]
            problems.append(f"override {item!r}: {label} sets {word}, which fixes {key}, and a cell's label must say "
                            f"what it trained; choose the rows and columns (or the study's parts) that set it instead")
            continue
        clashes = [(label, word) for label, word in set_by.get(key, [])
                   if value is None or word.split("=", 1)[1].strip() != value]
        if clashes:
            label, word = clashes[0]
            problems.append(f"override {item!r}: {label} sets {word}, and a cell's label must say what it trained; "
                            f"choose the rows and columns (or the study's parts) that set it instead")
    return problems
