"""stn.convergence_plot: the Markdown summary (mean ± std (n) per budget beside the paper) and the per-dataset
plots, from a hand-written record."""

from __future__ import annotations

import csv
from pathlib import Path

from stn.convergence import PAPER_IMAGES, parse_budget
from stn.convergence_plot import plot_study, summary_table


def test_plot_and_summary_from_a_record(tmp_path: Path) -> None:
    record = tmp_path / "results.csv"
    rows = [("CNN", "1/250", 0, 4.0), ("CNN", "1/250", 1, 5.0), ("CNN", "1/50", 0, 2.0), ("FCN", "1/50", 0, 9.0)]
    with record.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["recipe", "dataset", "model", "budget", "images", "seed", "test_error", "paper"])
        for model, budget, seed, error in rows:
            images = int(parse_budget(budget) * PAPER_IMAGES)
            writer.writerow(["paper-sgd", "R", model, budget, images, seed, error, 1.2 if model == "CNN" else 2.1])
    table = summary_table(record)
    assert "| paper-sgd | R | CNN | 4.50 ± 0.71 (2) | 2.00 (1) | 1.2 |" in table
    assert "| paper-sgd | R | FCN |  | 9.00 (1) | 2.1 |" in table
    written = plot_study(record, tmp_path / "plots")
    assert [p.name for p in written] == ["R.png"] and written[0].stat().st_size > 10_000
