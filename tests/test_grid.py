"""stn.grid: the grid file is the paper's table, and a bad one is refused naming the file and the key
(more bad grid files, through the CLI: test_faults.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from stn.compose import compose
from stn.grid import TableError, load_grid, select_cells

GRID = Path(__file__).resolve().parents[1] / "experiments" / "table1" / "grid.yaml"
runner = CliRunner()


def test_grid_holds_the_papers_table() -> None:
    grid = load_grid(GRID)
    assert list(grid.columns) == ["R", "RTS", "P", "E", "TC"]
    assert len(grid.rows) == 8
    # Table 1 (left): every row x R/RTS/P/E; TC only for FCN, CNN and one transformer each of ST-FCN/ST-CNN.
    assert len(grid.cells) == 8 * 4 + 4
    assert [row for row, column in grid.cells if column == "TC"] == ["FCN", "CNN", "ST-FCN Aff", "ST-CNN Aff"]
    assert all(value is not None and 0 < value < 20 for value in grid.cells.values())
    # Spot checks against the paper: the corners of Table 1 and the TC text.
    assert grid.cells[("FCN", "R")] == 2.1
    assert grid.cells[("ST-CNN TPS", "E")] == 1.1
    assert grid.cells[("FCN", "TC")] == 13.2
    assert grid.cells[("ST-CNN Aff", "TC")] == 1.7


def test_unknown_names_are_clear_errors() -> None:
    grid = load_grid(GRID)
    with pytest.raises(TableError, match=r"unknown row 'ST-CNN Affine'.*valid rows: FCN, CNN, ST-FCN Aff"):
        select_cells(grid, ["CNN", "ST-CNN Affine"], None)
    with pytest.raises(TableError, match="unknown column 'X'.*valid columns: R, RTS, P, E, TC"):
        select_cells(grid, None, ["R", "X"])
    with pytest.raises(TableError, match="no cell"):
        select_cells(grid, ["ST-CNN TPS"], ["TC"])  # the paper has no such cell
    with pytest.raises(TableError, match="not found"):
        load_grid(GRID.parent / "missing.yaml")


def test_bad_grid_file_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text("name: t\nrows: {A: [model=cnn]}\ncolumns: {R: [dataset=R]}\ncells: {A: {RTS: 1.0}}\n")
    with pytest.raises(TableError, match=r"cells.A.RTS is not a column \(columns: R\)"):
        load_grid(path)


def test_the_grid_files_rows_are_the_table1_models() -> None:
    """Table 1's rows are listed once in code (stn.grid.TABLE1_MODELS); the grid file must state the same."""
    from stn.grid import TABLE1_MODELS

    rows = load_grid(GRID).rows
    assert list(rows) == [label for label, _ in TABLE1_MODELS]
    for label, choice in TABLE1_MODELS:
        assert compose(rows[label]) == compose(list(choice)), label


def test_the_default_grid_is_found_outside_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from another folder, the default grid path resolves to the checkout's copy (editable install) or,
    without one, to the copy pyproject.toml ships inside the package (stn/grids/table1.yaml)."""
    import stn.grid as grid_module
    from stn.grid import DEFAULT_GRID, PACKAGED_GRIDS, locate_grid

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    assert load_grid(DEFAULT_GRID).path == repo / DEFAULT_GRID
    assert locate_grid("other.yaml") == Path("other.yaml")  # only the default falls back
    # The wheel ships the grid where PACKAGED_GRIDS looks for it.
    packaged = PACKAGED_GRIDS[DEFAULT_GRID].relative_to(repo / "src").as_posix()
    assert f'"{DEFAULT_GRID.as_posix()}" = "{packaged}"' in (repo / "pyproject.toml").read_text()
    # An installed stn (no checkout above it) reads the packaged copy.
    installed = tmp_path / "site" / "stn"
    (installed / "grids").mkdir(parents=True)
    (installed / "grids" / "table1.yaml").write_text((repo / DEFAULT_GRID).read_text())
    monkeypatch.setattr(grid_module, "__file__", str(installed / "grid.py"))
    monkeypatch.setattr(grid_module, "PACKAGED_GRIDS", {DEFAULT_GRID: installed / "grids" / "table1.yaml"})
    loaded = load_grid(DEFAULT_GRID)
    assert loaded.path == installed / "grids" / "table1.yaml" and loaded.name == "table1"
