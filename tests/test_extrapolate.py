"""stn.convergence.extrapolate: the floor + power law through three budgets, checked on laws written down by hand, and its
table (prediction at the paper's budget, per-seed fits, checks against larger budgets) from a hand-made record."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stn.cli.main import app
from stn.convergence.extrapolate import (
    NoFit,
    SaturatingPowerLaw,
    extrapolation_rows,
    fit_error_curve,
    fit_three,
)
from stn.convergence.study import PAPER_IMAGES, parse_budget
from wandb_log import read_run

BUDGETS = ("1/250", "1/50", "1/20")
FRACTIONS = [1 / 250, 1 / 50, 1 / 20]
GRID = Path(__file__).resolve().parents[1] / "experiments" / "table1" / "grid.yaml"


@pytest.mark.parametrize(
    ("floor", "scale", "exponent"),
    [(0.9, 0.2, 0.7), (0.0, 0.05, 1.0), (13.75, 0.8, 0.77), (-0.5, 1.0, 0.3), (2.0, 1e-3, 2.5)],
)
def test_three_points_of_a_known_law_give_back_the_law(floor: float, scale: float, exponent: float) -> None:
    errors = [floor + scale * n ** -exponent for n in FRACTIONS]  # the form written out, not SaturatingPowerLaw
    law = fit_three(FRACTIONS, errors)
    # The bisection runs to float precision in ln(exponent); what is left is the rounding of the three errors
    # (relative 1e-16) amplified by the fit's conditioning, far below 1e-6 for these spreads of points.
    assert law.exponent == pytest.approx(exponent, rel=1e-6)
    assert law.scale == pytest.approx(scale, rel=1e-5)
    assert law.floor == pytest.approx(floor, rel=1e-6, abs=1e-6 * max(errors))
    assert law(1.0) == pytest.approx(floor + scale, rel=1e-6, abs=1e-6 * max(errors))
    assert [law(n) for n in FRACTIONS] == pytest.approx(errors, rel=1e-9)


def test_a_law_is_its_formula() -> None:
    law = SaturatingPowerLaw(floor=1.0, scale=2.0, exponent=0.5)
    assert law(0.25) == pytest.approx(1.0 + 2.0 * 2.0) and law(1.0) == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("fractions", "errors", "why"),
    [
        (FRACTIONS, [5.0, 3.0, 3.5], "does not fall at every budget"),
        (FRACTIONS, [5.0, 5.0, 4.0], "does not fall at every budget"),
        # a straight line in error against log images: the exponent -> 0 limit itself, no floor + power law
        (FRACTIONS, [10 - math.log(n / FRACTIONS[0]) for n in FRACTIONS], "does not flatten"),
        (FRACTIONS, [10.0, 9.9, 1.0], "does not flatten"),  # the drop speeds up
        ([1 / 50, 1 / 250, 1 / 20], [5.0, 3.0, 2.0], "budgets must increase"),
        (FRACTIONS[:2], [5.0, 3.0], "exactly three"),
    ],
)
def test_points_the_form_cannot_pass_through_get_no_fit(fractions: list[float], errors: list[float],
                                                       why: str) -> None:
    with pytest.raises(NoFit, match=why):
        fit_three(fractions, errors)


def test_an_error_curve_with_a_floor_below_zero_gets_no_fit() -> None:
    # steeper than a power law on log-log axes: the law through it exists (floor -0.5) but crosses zero
    errors = [-0.5 + 1.0 * n ** -0.3 for n in FRACTIONS]
    assert fit_three(FRACTIONS, errors).floor == pytest.approx(-0.5, rel=1e-6)
    with pytest.raises(NoFit, match="floor is below zero"):
        fit_error_curve(FRACTIONS, errors)
    # a pure power law (floor exactly 0, up to the fit's rounding) and a positive floor are kept
    assert fit_error_curve(FRACTIONS, [0.05 * n ** -1.0 for n in FRACTIONS]).floor == pytest.approx(0.0, abs=1e-6)
    assert fit_error_curve(FRACTIONS, [0.9 + 0.2 * n ** -0.7 for n in FRACTIONS]).floor == pytest.approx(0.9)


def test_the_table_says_why_a_cell_with_a_floor_below_zero_is_not_extrapolated() -> None:
    # the study's P CNN seed 0 (2.92, 1.44, 0.94): its log-log slope steepens from -0.44 to -0.47
    rows = record_rows({("P", "CNN"): {"1/250": [2.92], "1/50": [1.44], "1/20": [0.94]}})
    (row,) = extrapolation_rows(rows)
    assert row[4] == "" and row[6].startswith("none: the fitted floor is below zero")


def record_rows(cells: dict[tuple[str, str], dict[str, list[float]]]) -> list[dict[str, str]]:
    rows = []
    for (dataset, model), by_budget in cells.items():
        for budget, errors in by_budget.items():
            for seed, error in enumerate(errors):
                rows.append({"recipe": "paper-sgd", "dataset": dataset, "model": model, "budget": budget,
                             "images": str(int(parse_budget(budget) * PAPER_IMAGES)), "seed": str(seed),
                             "test_error": f"{error:.6f}", "paper": "1.2"})
    return rows


def test_the_table_predicts_from_the_three_smallest_budgets_and_checks_the_rest() -> None:
    truth = SaturatingPowerLaw(floor=1.0, scale=0.1, exponent=0.8)
    offsets = (-0.02, 0.0, 0.02)  # seed s sits offsets[s] above the law at every budget: a shifted floor
    exact = {b: [truth(float(parse_budget(b))) + o for o in offsets] for b in (*BUDGETS, "1/2")}
    rising = {"1/250": [3.0, 3.2], "1/50": [2.0], "1/20": [2.5]}
    two_budgets = {"1/250": [3.0], "1/50": [2.0]}
    # seed 0 follows the law; seeds 1 and 2, far above it, are not trained at 1/20 yet and must not bend the fit
    partial = {"1/250": [truth(1 / 250), 9.0, 9.0], "1/50": [truth(1 / 50), 8.0, 8.0], "1/20": [truth(1 / 20)]}
    rows = record_rows({("R", "CNN"): exact, ("P", "CNN"): rising, ("E", "CNN"): two_budgets,
                        ("RTS", "CNN"): partial})
    disjoint = record_rows({("P", "FCN"): {"1/250": [5.0], "1/50": [3.0]}})
    disjoint += [{**disjoint[0], "budget": "1/20", "seed": "1", "test_error": "2.5"}]  # only seed 1 at 1/20
    rows += disjoint
    endpoint = {("R", "CNN"): {"mean": 1.5, "errors": [1.4, 1.6]}}
    table = {(r[1], r[2]): r for r in extrapolation_rows(rows, endpoint)}
    assert table.pop(("P", "FCN"))[3:7] == ["1/250, 1/50, 1/20 (seeds none in common)", "", "",
                                            "none: no seed was trained at all three budgets"]

    assert set(table) == {("R", "CNN"), ("P", "CNN"), ("RTS", "CNN")}  # two budgets are not a curve
    assert table[("RTS", "CNN")][3:7] == ["1/250, 1/50, 1/20 (seeds 0)", "1.00", "0.80", f"{truth(1.0):.2f}"]
    row = table[("R", "CNN")]
    assert row[3] == "1/250, 1/50, 1/20 (seeds 0, 1, 2)"
    assert (row[4], row[5], row[6]) == ("1.00", "0.80", f"{truth(1.0):.2f}")
    assert row[7] == ", ".join(f"{truth(1.0) + o:.2f}" for o in offsets)  # each seed's own fit: its shifted law
    assert row[8] == f"1/2: {truth(0.5):.2f} / {truth(0.5):.2f}; 1/1 (another study): {truth(1.0):.2f} / 1.50"
    assert row[9] == "1.2"
    assert table[("P", "CNN")][6] == "none: the error does not fall at every budget"


def test_plot_command_writes_the_extrapolation_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    truth = SaturatingPowerLaw(floor=1.0, scale=0.1, exponent=0.8)
    rows = record_rows({("R", "CNN"): {b: [truth(float(parse_budget(b)))] for b in BUDGETS}})
    monkeypatch.chdir(tmp_path)
    with (tmp_path / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "study.yaml").write_text(
        f"name: demo\nrecipe: paper-sgd\ngrid: {GRID}\nbatch_size: 128\nresults: results.csv\nseeds: [0]\n"
        "parts:\n  - {rows: [CNN], columns: [R], budgets: ['1/250', '1/50', '1/20']}\n")
    result = CliRunner().invoke(app, ["convergence", "plot", "--study", "study.yaml", "--no-wandb"])
    assert result.exit_code == 0, result.output
    written = (tmp_path / "demo.md").read_text()
    assert "## Extrapolated to the paper's budget" in written
    assert f"| paper-sgd | R | CNN | 1/250, 1/50, 1/20 (seeds 0) | 1.00 | 0.80 | {truth(1.0):.2f} |" in written


def test_plot_command_logs_the_extrapolation_to_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_DISABLED", "WANDB_PROJECT", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(name, raising=False)
    truth = SaturatingPowerLaw(floor=1.0, scale=0.1, exponent=0.8)
    rows = record_rows({("R", "CNN"): {b: [truth(float(parse_budget(b)))] for b in BUDGETS},
                        ("R", "FCN"): {"1/250": [9.0], "1/50": [5.0]}})
    monkeypatch.chdir(tmp_path)
    with (tmp_path / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "study.yaml").write_text(
        f"name: demo\nrecipe: paper-sgd\ngrid: {GRID}\nbatch_size: 128\nresults: results.csv\nseeds: [0]\n"
        "overrides: [logger.mode=offline]\n"
        "parts:\n  - {rows: [CNN, FCN], columns: [R], budgets: ['1/250', '1/50', '1/20']}\n")
    result = CliRunner().invoke(app, ["convergence", "plot", "--study", "study.yaml"])
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_run(folder, lambda run: run["finished"] and "test_error/paper-sgd/R/CNN/1_20" in run["summary"])
    assert run["summary"]["extrapolated_test_error/paper-sgd/R/CNN"] == pytest.approx(truth(1.0), rel=1e-5)
    assert not any(key.startswith("extrapolated_test_error/paper-sgd/R/FCN") for key in run["summary"])
    (table_file,) = folder.glob("files/media/table/extrapolation_*.table.json")
    logged = json.loads(table_file.read_text())
    assert [row[:3] + [row[6]] for row in logged["data"]] == [["paper-sgd", "R", "CNN", f"{truth(1.0):.2f}"]]
