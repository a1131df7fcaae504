"""Accuracy parity of two precisions: the same Table 1 cells and seeds trained in each, compared cell by cell.

    python experiments/bench/parity.py runs/tables/parity-float32/results.csv runs/tables/parity-bf16/results.csv

Each argument is a `stn reproduce-table` results.csv (per-seed errors in its `errors` column). A cell is "equal
within seed noise" when `stn.convergence.plot.compare` finds the difference within the seed spread: |difference of
means| <= 2 s / sqrt(n), s the larger of the two sample stds, n the seeds both sides share (the criterion the
convergence study uses for orderings). Prints a markdown table.
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

from stn.convergence.plot import compare


def seed_errors(path: Path) -> dict[tuple[str, str], dict[int, float]]:
    cells = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            errors = {}
            for item in filter(None, row["errors"].split(";")):
                seed, error = item.split(":")
                errors[int(seed)] = float(error)
            cells[row["row"], row["column"]] = errors
    return cells


def label(path: Path) -> str:
    """A table's folder name for its results.csv, else the file's own name."""
    return path.parent.name if path.name == "results.csv" else path.stem


def main(first: str, second: str) -> None:
    a, b = seed_errors(Path(first)), seed_errors(Path(second))
    print(f"| cell | {label(Path(first))} (mean ± std) | {label(Path(second))} (mean ± std) | "
          "difference | 2 s / sqrt(n) | equal within seed noise |")
    print("|---|---|---|---|---|---|")
    for key in a:
        if key not in b:
            continue
        seeds = sorted(set(a[key]) & set(b[key]))
        if len(seeds) < 2:
            continue
        sides = []
        for errors in ([a[key][s] for s in seeds], [b[key][s] for s in seeds]):
            sides.append({"errors": errors, "mean": statistics.mean(errors), "std": statistics.stdev(errors)})
        verdict, bound = compare(*sides)
        x, y = sides
        print(f"| {key[0]} / {key[1]} (seeds {','.join(map(str, seeds))}) | {x['mean']:.2f} ± {x['std']:.2f} | "
              f"{y['mean']:.2f} ± {y['std']:.2f} | {y['mean'] - x['mean']:+.2f} | {bound:.2f} | "
              f"{'yes' if verdict == 'within the seed spread' else 'no'} |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
