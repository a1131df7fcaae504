"""stn.convergence_plot: the Markdown summary (mean ± std (n) per budget beside the paper) and the per-dataset
plots, from a hand-written record."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stn.cli import app
from stn.convergence import PAPER_IMAGES, parse_budget
from stn.convergence_plot import plot_study, summary_table
from wandb_log import read_run

GRID = Path(__file__).resolve().parents[1] / "experiments" / "table1" / "grid.yaml"


def write_record(record: Path) -> None:
    rows = [("CNN", "1/250", 0, 4.0), ("CNN", "1/250", 1, 5.0), ("CNN", "1/50", 0, 2.0), ("FCN", "1/50", 0, 9.0)]
    with record.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["recipe", "dataset", "model", "budget", "images", "seed", "test_error", "paper"])
        for model, budget, seed, error in rows:
            images = int(parse_budget(budget) * PAPER_IMAGES)
            writer.writerow(["paper-sgd", "R", model, budget, images, seed, error, 1.2 if model == "CNN" else 2.1])


def test_plot_and_summary_from_a_record(tmp_path: Path) -> None:
    record = tmp_path / "results.csv"
    write_record(record)
    table = summary_table(record)
    assert "| paper-sgd | R | CNN | 4.50 ± 0.71 (2) | 2.00 (1) | 1.2 |" in table
    assert "| paper-sgd | R | FCN |  | 9.00 (1) | 2.1 |" in table
    written = plot_study(record, tmp_path / "plots")
    assert [p.name for p in written] == ["R.png"] and written[0].stat().st_size > 10_000


def test_plot_command_logs_the_record_as_one_wandb_study_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_DISABLED", "WANDB_PROJECT", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    write_record(tmp_path / "results.csv")
    study = tmp_path / "study.yaml"
    study.write_text(f"name: demo\nrecipe: paper-sgd\ngrid: {GRID}\nbatch_size: 128\nresults: results.csv\n"
                     "overrides: [logger.mode=offline, logger.project=p1]\nseeds: [0, 1]\n"
                     "parts:\n  - {rows: [CNN, FCN], columns: [R], budgets: ['1/250', '1/50']}\n")
    result = CliRunner().invoke(app, ["convergence", "plot", "--study", str(study)])
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_run(folder, lambda run: run["finished"] and "test_error/paper-sgd/R/CNN/1_250" in run["summary"])
    assert run["job_type"] == "study" and run["group"] == "demo" and "study" in run["tags"]
    assert run["config"]["rows_recorded"] == 4
    assert run["summary"]["test_error/paper-sgd/R/CNN/1_250"] == pytest.approx(4.5)
    assert run["summary"]["test_error/paper-sgd/R/FCN/1_50"] == pytest.approx(9.0)
    assert run["summary"]["paper_test_error/R/CNN"] == pytest.approx(1.2)
    assert "plot/R/_type" in run["history"][0]
    (summary_file,) = folder.glob("files/media/table/summary_*.table.json")
    logged = json.loads(summary_file.read_text())
    at = {name: logged["columns"].index(name) for name in ("model", "budget", "seeds", "mean")}
    assert sorted((r[at["model"]], r[at["budget"]], r[at["seeds"]], r[at["mean"]]) for r in logged["data"]) == [
        ("CNN", "1/250", 2, 4.5), ("CNN", "1/50", 1, 2.0), ("FCN", "1/50", 1, 9.0)]
    (results_file,) = folder.glob("files/media/table/results_*.table.json")
    assert len(json.loads(results_file.read_text())["data"]) == 4

    result = CliRunner().invoke(app, ["convergence", "plot", "--study", str(study), "--no-wandb"])
    assert result.exit_code == 0 and len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
