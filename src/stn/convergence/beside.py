"""A recipe's cells against the paper's errors, beside the paper's recipe at the same budget.

For a study that trains another recipe than the paper's (the laptop table, experiments/recipes/): every cell of
such a recipe at every budget it has, with ours (mean ± std over seeds), its ratio to the paper's error, the
paper's recipe at the same budget (the same dataset, model and share of the paper's images, from the main
convergence record or the study's own rows of it), which of the two is lower by the study's criterion
(`stn.convergence.plot.compare`: beyond 2·s/√n, or within the seed spread), and for transformer cells the
distortion recovery of both (each metric's mean over seeds, beside the untouched digits' value): the paper's
claim is transformers that turn digits to a mean pose, so a better error should come with at least as much
rectification.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stn.convergence.plot import aggregate, compare, mean_std_text
from stn.convergence.study import parse_budget

REFERENCE_RECIPE = "paper-sgd"  # the paper's recipe, as the main convergence study records it
COLUMNS = ("recipe", "dataset", "model", "budget", "ours", "paper", "ours / paper", "paper's recipe, same budget",
           "ours vs the paper's recipe", "2·s/√n", "recovery: ours / paper's recipe (untouched)")

Key = tuple[str, str, str, str]  # (recipe, dataset, model, budget)


def recovery_means(rows: Sequence[dict[str, str]]) -> dict[Key, dict[str, Any]]:
    """(recipe, dataset, model, budget) -> {"metrics": {name: mean over seeds}, "before": {name: value}} from the
    record's `recovery` and `recovery_before` texts ("rotation_std_deg=32.6", several separated by spaces)."""
    found: dict[Key, dict[str, Any]] = {}
    for row in rows:
        text = row.get("recovery") or ""
        if "=" not in text:
            continue
        entry = found.setdefault((row["recipe"], row["dataset"], row["model"], row["budget"]),
                                 {"values": {}, "before": _metrics(row.get("recovery_before") or "")})
        for name, value in _metrics(text).items():
            entry["values"].setdefault(name, []).append(value)
    return {key: {"metrics": {name: sum(v) / len(v) for name, v in entry["values"].items()},
                  "before": entry["before"]} for key, entry in found.items()}


def _metrics(text: str) -> dict[str, float]:
    out = {}
    for item in text.split():
        name, _, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def _recovery_text(ours: dict[str, Any] | None, reference: dict[str, Any] | None) -> str:
    if ours is None:
        return ""
    parts = []
    for name, value in ours["metrics"].items():
        theirs = None if reference is None else reference["metrics"].get(name)
        before = ours["before"].get(name)
        parts.append(f"{name} {value:.3g} / {'-' if theirs is None else f'{theirs:.3g}'}"
                     + ("" if before is None else f" ({before:.3g})"))
    return "; ".join(parts)


def beside_rows(rows: Sequence[dict[str, str]], reference_rows: Sequence[dict[str, str]],
                reference: str = REFERENCE_RECIPE) -> list[list[str]]:
    """One row of COLUMNS per (recipe, dataset, model, budget) of `rows` whose recipe is not `reference`, in
    dataset, model, budget order; the paper's recipe is looked up in `reference_rows` (rows of `reference`)."""
    ours, theirs = aggregate(rows), aggregate([r for r in reference_rows if r["recipe"] == reference])
    recovered = recovery_means(rows)
    recovered_theirs = recovery_means([r for r in reference_rows if r["recipe"] == reference])
    out = []
    keys = sorted((k for k in ours if k[0] != reference), key=lambda k: (k[0], k[1], k[2], parse_budget(k[3])))
    for key in keys:
        recipe, dataset, model, budget = key
        entry, paper = ours[key], ours[key]["paper"]
        ratio = "" if paper is None or not float(paper) else f"{entry['mean'] / float(paper):.2f}x"
        other = theirs.get((reference, dataset, model, budget))
        verdict, threshold = ("", None) if other is None else compare(entry, other)
        verdict = {"first lower": "ours lower", "second lower": "the paper's recipe lower"}.get(verdict, verdict)
        out.append([recipe, dataset, model, budget, mean_std_text(entry), "" if paper is None else f"{paper}",
                    ratio, "" if other is None else mean_std_text(other), verdict,
                    "" if threshold is None else f"{threshold:.2f}",
                    _recovery_text(recovered.get(key), recovered_theirs.get((reference, dataset, model, budget)))])
    return out


def beside_table(rows: Sequence[dict[str, str]], reference_rows: Sequence[dict[str, str]]) -> str:
    """`beside_rows` as Markdown ('' when every row is the paper's recipe)."""
    found = beside_rows(rows, reference_rows)
    if not found:
        return ""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in found])


def plot_beside(rows: Sequence[dict[str, str]], reference_rows: Sequence[dict[str, str]], path: Path,
                title: str = "") -> Path | None:
    """Bars per cell at each (recipe, budget) of `rows` beyond the paper's recipe, on a log axis: ours (error
    bar = std over seeds), the paper's recipe at the same budget, the paper's number. None when there is nothing
    to draw."""
    from stn.report import CellResult, plot_bars

    ours = aggregate(rows)
    theirs = aggregate([r for r in reference_rows if r["recipe"] == REFERENCE_RECIPE])
    keys = sorted((k for k in ours if k[0] != REFERENCE_RECIPE), key=lambda k: (k[0], parse_budget(k[3]), k[1], k[2]))
    if not keys:
        return None
    results, beside = [], []
    for recipe, dataset, model, budget in keys:
        entry = ours[(recipe, dataset, model, budget)]
        paper = None if entry["paper"] is None else float(entry["paper"])
        results.append(CellResult(row=f"{model}\n{budget}", column=dataset, cell="", paper=paper, seeds=[],
                                  mean=entry["mean"], std=entry["std"]))
        other = theirs.get((REFERENCE_RECIPE, dataset, model, budget))
        beside.append(math.nan if other is None else other["mean"])
    recipes = ", ".join(sorted({k[0] for k in keys}))
    return plot_bars(results, path, title or f"{recipes} against the paper", beside=beside,
                     beside_label=f"{REFERENCE_RECIPE}, same budget", ours_label=recipes)
