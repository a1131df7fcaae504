"""The convergence study: Table 1 cells trained at growing fractions of the paper's training budget.

The paper trains every model on 150k x 256 = 38.4M distorted images (SGD, lr 0.01, /10 every 50k). A budget
here is a fraction of those images, e.g. "1/50" = 768k images = 6000 steps of batch 128, with the paper's lr
shape: the same base rate, divided by 10 after one and two thirds of the steps. A study file
(experiments/convergence/study.yaml) names the Table 1 rows and columns (from the grid file, which also holds
the paper's numbers), the budgets and the seeds. `run_study` trains the cells in order of budget, then seed,
then column, then row (so the cheapest complete picture comes first), one after the other or `parallel` at
once (stn.launch.executors's worker processes), and appends one row per finished cell (with its distortion-recovery
headline, `stn.recovery`) to the study's results.csv at once: the CSV is the record, committed as it grows, and
a rerun trains only what it lacks. A seed whose loss became NaN/inf is recorded too, with error nan
(`diverged_row`): a resume would replay the same steps, and a table must show the seed, not drop it. A cell
stopped by SIGTERM/Ctrl-C keeps its checkpoint in its run folder and continues from it on the next call. Two study processes on one record keep each other's rows (the record is
locked while a row is added) and leave each other's cells alone. Every row names the CPU (or GPU) and the
precision it ran in: one study keeps one precision (the study file pins it). Reading the record back into
pictures and a table is `stn.convergence.plot`'s; training the cells is `stn.convergence.run`'s.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import fcntl
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from stn.config import Config
from stn.grid import CellComposeError, TableError, compose_cells
from stn.launch.job import Job
from stn.runs import write_atomic

PAPER_STEPS, PAPER_BATCH = 150_000, 256
PAPER_IMAGES = PAPER_STEPS * PAPER_BATCH  # 38.4M training images per model
DEFAULT_STUDY = Path("experiments/convergence/study.yaml")
COLUMNS = (
    "recipe", "dataset", "model", "budget", "images", "steps", "batch_size", "seed", "test_error", "paper",
    "wall_time_s", "train_time_s", "images_per_s", "precision", "device", "cpu", "torch", "commit", "finished_at",
    "recovery", "recovery_before", "threads", "load",
)  # fmt: skip


class StudyError(ValueError):
    """A study that cannot run: a bad study file, budget, seed list or name; the message names the fix."""


@dataclass(frozen=True)
class Part:
    """Some Table 1 rows x columns, trained at some budgets."""

    rows: list[str]
    columns: list[str]
    budgets: list[str]


@dataclass(frozen=True)
class Study:
    name: str
    path: Path
    grid: Any  # stn.grid.Grid: rows, columns and the paper's numbers
    recipe: str  # a label for the training recipe, e.g. "paper-sgd"
    batch_size: int
    overrides: list[str]  # for every cell, e.g. trainer=quick trainer.cpu_precision=float32
    parts: list[Part]
    seeds: list[int]
    results: Path  # the CSV record
    runs_dir: Path  # run folders (checkpoints), not committed
    # results.csv files of `stn engine run` tables at the paper's schedule (another study: other batch, precision,
    # device), drawn beside this study's curves, never mixed into its record
    paper_schedule: tuple[Path, ...] = ()
    # > 0: every cell holds out the last N training digits (dataset.validation) and the record keeps val_error, not
    # test_error: a study that chooses a recipe never sees the test set (experiments/recipes/)
    validation: int = 0

    @property
    def error_column(self) -> str:
        return "val_error" if self.validation else "test_error"

    @property
    def columns(self) -> tuple[str, ...]:
        """The record's columns: COLUMNS, with val_error in place of test_error for a validation study."""
        return tuple(self.error_column if c == "test_error" else c for c in COLUMNS)


@dataclass(frozen=True)
class Cell(Job):
    """One training run of the study."""

    row: str
    column: str
    budget: str
    seed: int
    config: Config
    paper: float | None

    @property
    def key(self) -> tuple[str, str, str, int]:
        return self.row, self.column, self.budget, self.seed

    @property
    def label(self) -> str:
        return f"{self.row} / {self.column} at {self.budget} seed {self.seed}"


@dataclass
class StudyReport:
    done: list[dict[str, Any]] = field(default_factory=list)  # rows finished by this call
    skipped: int = 0  # already in the CSV
    busy: list[Cell] = field(default_factory=list)  # being trained by another process (its folder is locked)
    stopped: Cell | None = None  # interrupted (checkpointed) cell, if any
    stop_code: int = 130  # the exit code of the stop: 128 + the signal's number (Ctrl-C 130, SIGTERM 143)
    failed: list[tuple[Cell, str]] = field(default_factory=list)
    diverged: list[Cell] = field(default_factory=list)  # a NaN/inf loss: recorded with error nan, not retried


# ---------------------------------------------------------------------------------------------- budgets


def parse_budget(text: str) -> Fraction:
    """'1/50' -> Fraction(1, 50); also '0.02' or '1'. A budget is a fraction of the paper's 38.4M images."""
    try:
        value = Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        raise StudyError(f"budget {text!r} is not a fraction like 1/50 or 0.02") from None
    if not 0 < value <= 1:
        raise StudyError(f"budget {text!r} must be in (0, 1]: a fraction of the paper's {PAPER_IMAGES:,} images")
    return value


def budget_steps(budget: str, batch_size: int) -> int:
    """Steps of `batch_size` that see budget x 38.4M images (rounded to a multiple of 3 for the lr drops)."""
    steps = round(parse_budget(budget) * PAPER_IMAGES / batch_size / 3) * 3
    if steps < 3:
        raise StudyError(f"budget {budget} is under 3 steps of batch {batch_size}")
    return steps


def budget_overrides(budget: str, batch_size: int) -> list[str]:
    """The trainer settings of one budget: the paper's lr shape (/10 at 1/3 and 2/3) on its step count."""
    steps = budget_steps(budget, batch_size)
    return [
        f"trainer.batch_size={batch_size}", f"trainer.iterations={steps}", f"trainer.lr_step={steps // 3}",
        f"trainer.eval_every={steps}", f"trainer.checkpoint_every={min(500, steps)}",
        f"trainer.log_every={min(100, steps)}",
    ]  # fmt: skip


# -------------------------------------------------------------------------------------------- the study


def load_study(path: Path | str = DEFAULT_STUDY) -> Study:
    """Read and check a study file; every problem names the file and the key."""
    from stn.grid import label_problems, load_grid, override_key
    from stn.validation import SAFE_NAME

    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {path} not found (the default is {DEFAULT_STUDY}; pass --study PATH)")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:
        raise StudyError(f"study file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise StudyError(f"study file {path}: expected a mapping with keys name, grid, parts, seeds")
    for key in ("name", "grid", "parts", "seeds", "batch_size"):
        if key not in raw:
            raise StudyError(f"study file {path}: missing key '{key}'")
    try:
        grid = load_grid(raw["grid"])
    except TableError as err:
        raise StudyError(f"study file {path}: {err}") from None
    seeds = _seeds(raw["seeds"], f"study file {path}: seeds")
    batch = raw["batch_size"]
    if not isinstance(batch, int) or batch < 1:
        raise StudyError(f"study file {path}: batch_size={batch!r} must be a positive integer")
    if not isinstance(raw["parts"], list) or not raw["parts"]:
        raise StudyError(f"study file {path}: parts must be a non-empty list of {{rows, columns, budgets}}")
    parts = []
    for index, entry in enumerate(raw["parts"]):
        where = f"study file {path}: parts[{index}]"
        if not isinstance(entry, dict) or not {"rows", "columns", "budgets"} <= set(entry):
            raise StudyError(f"{where} must have rows, columns and budgets")
        part = Part(rows=[str(r) for r in entry["rows"]], columns=[str(c) for c in entry["columns"]],
                    budgets=[str(b) for b in entry["budgets"]])
        _known(part.rows, list(grid.rows), f"{where}.rows", "row")
        _known(part.columns, list(grid.columns), f"{where}.columns", "column")
        for budget in part.budgets:
            try:
                budget_steps(budget, batch)
            except StudyError as err:
                raise StudyError(f"{where}.budgets: {err}") from None
        for row in part.rows:
            for column in part.columns:
                if (row, column) not in grid.cells:
                    raise StudyError(f"{where}: {row} / {column} is not a cell of {grid.path}")
        parts.append(part)
    overrides = [str(o) for o in raw.get("overrides", [])]
    name = str(raw["name"])
    if not SAFE_NAME.fullmatch(name) or name in (".", ".."):  # it names the run folders, plots and markdown
        raise StudyError(f"study file {path}: name={name!r} is not a safe folder name (it names the study's run "
                         f"folders, plots and summary); use letters, digits and . _ + = -")
    # Each cell is recorded under its row, column, budget and seed: overrides of what those set would train
    # something else than the record says (dataset=R on an RTS cell), or be silently outvoted (the budget's steps).
    per_cell = [*budget_overrides("1", batch), "seed=", "run_dir=", "trainer.resume=", "logger.group=",
                "dataset.validation="]
    problems = label_problems(overrides, [(f"parts[{index}] row {row}", grid.rows[row])
                                          for index, part in enumerate(parts) for row in part.rows]
                              + [(f"parts[{index}] column {column}", grid.columns[column])
                                 for index, part in enumerate(parts) for column in part.columns])
    problems += [f"override {item!r}: the study sets {override_key(item)} per cell (budget, seed, run folder); "
                 f"remove it from overrides" for item in overrides
                 if override_key(item) in {override_key(word) for word in per_cell}]
    if problems:
        raise StudyError("\n".join(f"study file {path}: {problem}" for problem in dict.fromkeys(problems)))
    given = raw.get("paper_schedule") or []
    if not isinstance(given, list):
        raise StudyError(f"study file {path}: paper_schedule must be a list of `stn engine run` results.csv files")
    paper_schedule = tuple(Path(str(p)) for p in given)  # read (and checked) by `stn convergence plot`
    validation = raw.get("validation", 0)
    if not isinstance(validation, int) or isinstance(validation, bool) or not 0 <= validation < 60_000:
        raise StudyError(f"study file {path}: validation={validation!r} must be an integer from 0 (score on the test "
                         "set) to 59999 (digits held out of MNIST's 60000 training digits)")
    return Study(name=name, path=path, grid=grid, recipe=str(raw.get("recipe", "paper-sgd")), batch_size=batch,
                 overrides=overrides, parts=parts, seeds=seeds,
                 results=Path(raw.get("results", path.parent / "results.csv")),
                 runs_dir=Path(raw.get("runs_dir", f"runs/{name}")), paper_schedule=paper_schedule,
                 validation=validation)


def _seeds(value: Any, where: str) -> list[int]:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    try:
        seeds = [int(s) for s in value]
    except (TypeError, ValueError):
        raise StudyError(f"{where}: {value!r} must be a list of integers, e.g. 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds):
        raise StudyError(f"{where}: {value!r} must be non-negative integers, at least one")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"{where}: {value!r} repeats a seed; each seed is one run")
    return seeds


def _known(given: Sequence[str], known: Sequence[str], where: str, what: str) -> None:
    unknown = [g for g in given if g not in known]
    if unknown:
        raise StudyError(f"{where}: unknown {what} {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")


def plan(study: Study, *, rows: Sequence[str] | None = None, columns: Sequence[str] | None = None,
         budgets: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> list[Cell]:
    """The study's cells (filtered), ordered by budget, seed, column, row; configs composed and checked."""
    if rows:
        _known(rows, list(study.grid.rows), "--rows", "row")
    if columns:
        _known(columns, list(study.grid.columns), "--columns", "column")
    if budgets:
        _known(budgets, sorted({b for p in study.parts for b in p.budgets}, key=parse_budget), "--budgets", "budget")
    chosen_seeds = study.seeds if seeds is None else _seeds(list(seeds), "--seeds")
    wanted = []
    for part in study.parts:
        for budget in part.budgets:
            for column in part.columns:
                for row in part.rows:
                    if (not rows or row in rows) and (not columns or column in columns) and \
                            (not budgets or budget in budgets):
                        wanted.append((row, column, budget))
    wanted = list(dict.fromkeys(wanted))
    row_order, column_order = list(study.grid.rows), list(study.grid.columns)
    # Each (row, column, budget) composed once (stn.grid.compose_cells: the row's, the column's, then the study's
    # words), each seed given its own run folder.
    cells: list[Cell] = []
    for budget in dict.fromkeys(budget for _, _, budget in wanted):
        pairs = [(row, column) for row, column, b in wanted if b == budget]
        words = [*study.overrides, *budget_overrides(budget, study.batch_size),
                 *([f"dataset.validation={study.validation}"] if study.validation else []), "trainer.resume=true",
                 f"logger.group={study.name}"]
        try:
            composed = compose_cells(study.grid, pairs, chosen_seeds, words)
        except CellComposeError as err:
            raise StudyError(f"{err.row} / {err.column} at {budget}: {err.reason}") from None
        cells += [Cell(c.row, c.column, budget, c.seed,
                       dataclasses.replace(c.config, run_dir=str(cell_dir(study, c.row, c.column, budget, c.seed))),
                       c.paper) for c in composed]
    cells.sort(key=lambda c: (parse_budget(c.budget), c.seed, column_order.index(c.column), row_order.index(c.row)))
    return cells


def cell_dir(study: Study, row: str, column: str, budget: str, seed: int) -> Path:
    # Not stn.grid.slug: studies under way have checkpoints in folders named this way ('st_cnn_aff').
    slug = row.lower().replace(" ", "_").replace("-", "_")
    return study.runs_dir / column / slug / budget.replace("/", "_") / f"seed{seed}"


# -------------------------------------------------------------------------------------------- the record


def main_record(study: Study) -> Path | None:
    """The main convergence study's record (the paper's recipe at every budget), when this checkout has it and
    it is not `study`'s own: what another study's rows are read beside."""
    if not DEFAULT_STUDY.is_file():
        return None
    record = load_study(DEFAULT_STUDY).results
    return None if record.resolve() == study.results.resolve() else record


def read_results(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            return []
        missing = [c for c in ("recipe", "dataset", "model", "budget", "seed") if c not in reader.fieldnames]
        if not {"test_error", "val_error"} & set(reader.fieldnames):
            missing.append("test_error (or val_error)")
        if missing:
            raise StudyError(f"{path} lacks the columns {missing}: it is not a study record; move it away")
        rows = []
        for row in reader:
            _check_row(row, f"{path}, line {reader.line_num}")
            rows.append(row)
        return rows


def _check_row(row: dict[str, Any], where: str) -> None:
    """One clear line for a record row that a hand edit or a torn write has broken, before anything uses it."""
    if None in row or None in row.values():
        raise StudyError(f"{where}: {len([v for v in row.values() if v is not None])} fields where the header has "
                         f"{len([k for k in row if k is not None])}; fix or delete that row")
    checks = {"seed": int, "test_error": float, "val_error": float, "images": int}
    for column, kind in checks.items():
        if column in row and (row[column] or column != "images"):  # images: blank in hand-made records
            try:
                kind(row[column])
            except ValueError:
                raise StudyError(f"{where}: {column} {row[column]!r} is not {'an integer' if kind is int else 'a number'}"
                                 "; fix or delete that row") from None
    try:
        parse_budget(row["budget"])
    except StudyError as err:
        raise StudyError(f"{where}: {err}; fix or delete that row") from None


@contextlib.contextmanager
def record_lock(path: Path):
    """Hold an exclusive lock on the record across a read-modify-write: two `stn convergence run` processes
    sharing one results.csv (each training its own cells) must not drop each other's rows. The lock lives
    on a sidecar file because the record itself is replaced, not edited, by every append."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def check_record_kind(path: Path, columns: Sequence[str]) -> None:
    """A record keeps one kind of error: test errors and validation errors never share a file."""
    if not path.is_file():
        return
    with path.open(newline="") as handle:
        header = next(csv.reader(handle), None)
    if header and "test_error" in header and "val_error" in columns:
        raise StudyError(f"{path} records test errors: a validation study (validation: N) needs its own results file")
    if header and "val_error" in header and "test_error" in columns:
        raise StudyError(f"{path} records validation errors: a test-set study needs its own results file")


def append_result(path: Path, row: dict[str, Any], columns: Sequence[str] = COLUMNS) -> None:
    """Add one row to the CSV (rewritten atomically, so a kill never leaves half a line)."""
    with record_lock(path):
        check_record_kind(path, columns)
        rows = read_results(path)
        rows.append({c: row.get(c, "") for c in columns})

        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as handle:
                # "\n": the record is committed, and git diffs of CRLF lines read badly
                writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
                writer.writeheader()
                writer.writerows({c: r.get(c, "") for c in columns} for r in rows)

        write_atomic(path, write)


def row_key(row: dict[str, Any]) -> tuple[str, str, str, int]:
    return str(row["model"]), str(row["dataset"]), str(row["budget"]), int(row["seed"])


def recorded_keys(study: Study) -> set[tuple[str, str, str, int]]:
    return {row_key(r) for r in read_results(study.results) if r["recipe"] == study.recipe}


def result_row(study: Study, cell: Cell, summary: dict[str, Any], commit: str) -> dict[str, Any]:
    """One CSV row; `commit` is the code's commit when the study process started, for a summary that does not
    name the commit its training ran (older runs)."""
    import torch

    from stn.device import machine_name
    from stn.step import eval_key

    device = str(summary.get("device", "cpu"))
    return {
        **cell_fields(study, cell),
        study.error_column: f"{float(summary[eval_key(cell.config)]):.2f}",
        "wall_time_s": f"{float(summary.get('wall_time_s') or 0):.0f}",
        "train_time_s": f"{float(summary.get('train_time_s') or 0):.0f}",
        "images_per_s": f"{float(summary.get('images_per_s') or 0):.0f}",
        "precision": summary.get("precision", ""), "device": device,
        "cpu": machine_name(device),
        "torch": torch.__version__, "commit": summary.get("commit") or commit,
        "finished_at": summary.get("finished_at", dt.datetime.now().isoformat(timespec="seconds")),
        "recovery": recovery_text(summary, "recovery/"), "recovery_before": recovery_text(summary, "recovery/before/"),
        "threads": summary.get("torch_threads", ""),
        "load": "" if summary.get("load_mean") is None else f"{float(summary['load_mean']):.2f}",
    }  # fmt: skip


def diverged_row(study: Study, cell: Cell, commit: str) -> dict[str, Any]:
    """The row of a seed whose loss became NaN/inf: its error is recorded as nan (as the engine's records do), so
    the cell is not trained again (a resume would replay the same steps) and every table counts the seed as
    diverged instead of leaving it out (`stn.convergence.plot.aggregate`)."""
    from stn.device import machine_name, resolve_device

    device = resolve_device(cell.config.trainer.device)
    return {**cell_fields(study, cell), study.error_column: "nan", "device": device.type,
            "cpu": machine_name(device), "commit": commit,
            "finished_at": dt.datetime.now().isoformat(timespec="seconds")}


def cell_fields(study: Study, cell: Cell) -> dict[str, Any]:
    """What a record row says of its cell whatever the run gave: recipe, dataset, model, budget, images, steps,
    batch size, seed and the paper's error."""
    trainer = cell.config.trainer
    return {"recipe": study.recipe, "dataset": cell.column, "model": cell.row, "budget": cell.budget,
            "images": trainer.iterations * trainer.batch_size, "steps": trainer.iterations,
            "batch_size": trainer.batch_size, "seed": cell.seed, "paper": "" if cell.paper is None else cell.paper}


def recovery_text(summary: dict[str, Any], prefix: str) -> str:
    """The run's distortion-recovery headline (stn.recovery), e.g. 'rotation_std_deg=51.9'; '' without a
    transformer."""
    values = {k[len(prefix):]: v for k, v in summary.items() if k.startswith(prefix) and "/" not in k[len(prefix):]
              and isinstance(v, (int, float)) and k[len(prefix):] not in ("lost_fraction", "rotation_mean_deg")}
    return " ".join(f"{key}={value:.3g}" for key, value in sorted(values.items()))
