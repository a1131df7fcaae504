"""The recipe ablation's verdicts, from its record (experiments/recipes/ablation.csv, validation errors only):
each piece (recipe `onecycle+<piece>`) against the recipe it adds to (`onecycle`), cell by cell, seed spread
and all. Prints Markdown; `experiments/recipes/README.md` quotes it.

    python experiments/recipes/ablation_table.py [--record PATH] [--base onecycle] > experiments/recipes/ablation.md

A difference counts only beyond the seed spread (`stn.convergence.plot.compare`: |difference of means| >
2·s/√n, s the larger std, n the smaller seed count). A seed whose validation error is above COLLAPSED has
collapsed (a constant prediction is 88.65-90.2% on MNIST's classes). The rule a piece is kept by, fixed before
any piece was scored: it is kept when it is lower beyond the spread in at least one cell, higher beyond the
spread in none, and no seed of it collapses; cells not yet trained leave it undecided.

Which cells a piece is scored on are its study file's (experiments/recipes/ablation/<piece>.yaml: datasets,
models, seeds), and a cell counts only once both the piece and the base have all its seeds: before that it is
"not yet trained", whatever two seeds say. So every "dropped" is final: a collapsed seed, a cell higher beyond the
spread with all seeds in, or all cells in and none lower. `--dropped STUDY` exits 0 when that study's piece is
dropped (ablate.sh then skips its RTS cells: the rule cannot keep it any more), 1 when it is not (yet).

    python experiments/recipes/ablation_table.py --dropped experiments/recipes/ablation/ema.yaml

Last, the whole recipe's validation (`validation_verdict`, its rule in experiments/recipes/README.md): each study
file of experiments/recipes/validation/ on every dataset against the base, from both records (the base's R, P
and RTS cells are the ablation's, its E and TC cells validation.csv's).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NamedTuple

from stn.convergence.plot import aggregate, compare, diverged_cells, mean_std_text
from stn.convergence.study import read_results

COLLAPSED = 50.0  # % validation error: far above any trained cell, far below a constant prediction's ~89%


Cell = tuple[str, str, str]  # (dataset, model, budget)


def collapsed_text(errors: list[float]) -> str:
    """The collapsed seeds' validation errors, a diverged one (nan: its loss became NaN/inf) as "diverged"."""
    return ", ".join("diverged" if math.isnan(e) else f"{e:.1f}%" for e in errors)


class Scored(NamedTuple):
    """One cell of a recipe against the base: both sides' aggregates (None: no finite seed), the recipe's collapsed
    seeds there, and the comparison (None until every seed of both sides is in)."""

    cell: Cell
    ours: dict | None
    base: dict | None
    collapsed: list[float]
    verdict: str | None  # stn.convergence.plot.compare's: "first lower", "second lower", "within ..."
    threshold: float | None


def score(table: dict, diverged: dict, recipe: str, base: str, cells: set[Cell], seeds: int) -> list[Scored]:
    """`recipe` against `base` on `cells` (sorted), from the record's `aggregate` and `diverged_cells`, each cell
    compared only with `seeds` seeds of both sides in; a seed above COLLAPSED or diverged (error nan: its loss
    became NaN/inf) counts as collapsed."""
    scored = []
    for cell in sorted(cells):
        ours, theirs = table.get((recipe, *cell)), table.get((base, *cell))
        collapsed = [e for e in (ours or {}).get("errors", []) if e > COLLAPSED]
        collapsed += [math.nan] * diverged.get((recipe, *cell), 0)
        complete = ours is not None and theirs is not None and min(len(ours["errors"]), len(theirs["errors"])) >= seeds
        scored.append(Scored(cell, ours, theirs, collapsed, *(compare(ours, theirs) if complete else (None, None))))
    return scored


def _compared(entry: Scored, first: str, second: str) -> str:
    """'| difference | 2·s/√n | verdict |' of a compared cell."""
    threshold = "" if entry.threshold is None else f"{entry.threshold:.2f}"
    return (f" {entry.ours['mean'] - entry.base['mean']:+.2f} | {threshold} | "
            f"{entry.verdict.replace('first', first).replace('second', second)} |")


def verdicts(rows: list[dict[str, str]], base: str, planned: dict[str, tuple[set[Cell], int]] | None = None
             ) -> tuple[list[str], dict[str, str]]:
    """(Markdown table lines, piece -> verdict) for every recipe in `rows` other than `base`. planned: recipe ->
    (the cells its study scores it on, its seed count), from the study files; a recipe without an entry is
    scored on the base's cells at 3 seeds."""
    table, diverged = aggregate(rows, error="val_error"), diverged_cells(rows, error="val_error")
    base_cells = {(k[1], k[2], k[3]) for k in table if k[0] == base}
    pieces = sorted({r["recipe"] for r in rows if r["recipe"] != base} | {r for r in (planned or {}) if r != base})
    lines = [f"| piece | dataset | model | budget | piece val error | {base} val error | difference | 2·s/√n | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    decided: dict[str, str] = {}
    for piece in pieces:
        cells, seeds = (planned or {}).get(piece, (base_cells, 3))
        scored = score(table, diverged, piece, base, cells, seeds)
        for entry in scored:
            if entry.ours is None or entry.base is None:
                continue
            head = f"| {piece} | {' | '.join(entry.cell)} | {mean_std_text(entry.ours)} | {mean_std_text(entry.base)} |"
            lines.append(head + (_compared(entry, "piece", base) if entry.verdict else
                                 f" {entry.ours['mean'] - entry.base['mean']:+.2f} |  | not yet {seeds} seeds |"))
        collapsed = [e for entry in scored for e in entry.collapsed]
        higher = sum(entry.verdict == "second lower" for entry in scored)
        lower = sum(entry.verdict == "first lower" for entry in scored)
        missing = sum(entry.verdict is None for entry in scored)  # counts only with every seed of both sides in
        if collapsed:
            decided[piece] = f"dropped: {len(collapsed)} seed(s) collapsed ({collapsed_text(collapsed)})"
        elif higher:
            decided[piece] = f"dropped: higher beyond the spread in {higher} cell(s)"
        elif missing:
            decided[piece] = f"undecided: {missing} cell(s) not yet trained with {seeds} seeds"
        elif lower:
            decided[piece] = f"kept: lower beyond the spread in {lower} cell(s), higher in none"
        else:
            decided[piece] = "dropped: within the seed spread everywhere"
    return lines, decided


def validation_verdict(rows: list[dict[str, str]], base: str, candidate: str, cells: set[Cell], seeds: int
                       ) -> tuple[list[str], str]:
    """(Markdown table lines, verdict) of the whole recipe's validation, by the rule fixed before any of its cells
    was trained: `candidate` (the kept pieces combined; `base` itself when none was kept) is accepted when, on every
    one of `cells` with all `seeds` in, no seed of it collapses and it is higher than `base` beyond the spread in
    no cell; rejected (back to the pieces) at the first collapsed seed or higher cell; undecided before that."""
    alone = candidate == base  # the base's own cells: only collapses can reject it
    lines = ([f"| dataset | model | budget | {base} val error | verdict |", "|---|---|---|---|---|"] if alone else
             [f"| dataset | model | budget | {candidate} val error | {base} val error | difference | 2·s/√n | "
              "verdict |", "|---|---|---|---|---|---|---|---|"])
    scored = score(aggregate(rows, error="val_error"), diverged_cells(rows, error="val_error"), candidate, base,
                   cells, seeds)
    for entry in scored:
        head = f"| {' | '.join(entry.cell)} | {'' if entry.ours is None else mean_std_text(entry.ours)} |"
        if not alone:
            head += f" {'' if entry.base is None else mean_std_text(entry.base)} |"
        if entry.verdict is None:
            lines.append(head + ("" if alone else "  |  |")
                         + f" {'collapsed' if entry.collapsed else f'not yet {seeds} seeds'} |")
        elif alone:
            lines.append(head + f" {'collapsed' if entry.collapsed else 'no seed collapsed'} |")
        else:
            lines.append(head + _compared(entry, candidate, base))
    collapsed = [e for entry in scored for e in entry.collapsed]
    higher = 0 if alone else sum(entry.verdict == "second lower" for entry in scored)
    lower = sum(entry.verdict == "first lower" for entry in scored)
    missing = sum(entry.verdict is None for entry in scored)
    if collapsed:
        return lines, f"rejected: {len(collapsed)} seed(s) collapsed ({collapsed_text(collapsed)})"
    if higher:
        return lines, f"rejected: higher than {base} beyond the spread in {higher} cell(s)"
    if missing:
        return lines, f"undecided: {missing} cell(s) not yet trained with {seeds} seeds"
    against = "" if alone else f", higher than {base} beyond the spread in none (lower in {lower})"
    return lines, f"accepted: no seed collapsed in {len(cells)} cells{against}"


def planned_cells(study_files: list[Path]) -> dict[str, tuple[set[Cell], int]]:
    """recipe -> (its study's cells, its seed count), for each study file."""
    from stn.convergence.study import load_study

    out = {}
    for path in study_files:
        study = load_study(path)
        cells = {(column, row, budget) for part in study.parts for row in part.rows for column in part.columns
                 for budget in part.budgets}
        out[study.recipe] = (cells, len(study.seeds))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, default=Path("experiments/recipes/ablation.csv"))
    parser.add_argument("--base", default="onecycle")
    parser.add_argument("--studies", type=Path, default=Path("experiments/recipes/ablation"),
                        help="the folder of the pieces' study files (which cells and seeds each is scored on)")
    parser.add_argument("--dropped", type=Path, metavar="STUDY",
                        help="exit 0 if this study's piece is dropped by the rule, 1 if not (yet); print why")
    parser.add_argument("--validation-record", type=Path, default=Path("experiments/recipes/validation.csv"))
    parser.add_argument("--validation-studies", type=Path, default=Path("experiments/recipes/validation"),
                        help="the whole recipe's validation study files: the base's side and the candidate's")
    args = parser.parse_args(argv)
    rows = read_results(args.record)
    if rows and not any(r.get("val_error") for r in rows):
        print(f"error: {args.record} holds no validation errors (a recipe-ablation record)", file=sys.stderr)
        return 2
    planned = planned_cells(sorted(args.studies.glob("*.yaml")))
    lines, decided = verdicts(rows, args.base, planned)
    if args.dropped is not None:
        from stn.convergence.study import StudyError, load_study

        if not args.dropped.is_file():
            print(f"error: no study file {args.dropped}", file=sys.stderr)
            return 2
        try:
            recipe = load_study(args.dropped).recipe
        except StudyError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        verdict = decided.get(recipe, "the base recipe: never dropped")
        print(f"{recipe}: {verdict}")
        return 0 if verdict.startswith("dropped") else 1
    base = aggregate([r for r in rows if r["recipe"] == args.base], error="val_error")
    print(f"# Recipe ablation: validation error (%) at 1/50 of the paper's images\n\nGenerated by "
          f"`python experiments/recipes/ablation_table.py` from {args.record}.\n\n## {args.base}\n\n"
          "| dataset | model | budget | val error |\n|---|---|---|---|")
    for (_, dataset, model, budget), v in sorted(base.items()):
        print(f"| {dataset} | {model} | {budget} | {mean_std_text(v)} |")
    print("\n## Each piece against it\n\n" + "\n".join(lines) + "\n\n## Verdicts\n")
    for piece, verdict in decided.items():
        print(f"- {piece}: {verdict}")
    print_validation(rows + read_results(args.validation_record), args.base,
                     planned_cells(sorted(args.validation_studies.glob("*.yaml"))), planned)
    return 0


def print_validation(rows: list[dict[str, str]], base: str, validation: dict[str, tuple[set[Cell], int]],
                     ablation: dict[str, tuple[set[Cell], int]]) -> None:
    """The whole recipe's validation section: each validation study's recipe on every dataset (its E and TC cells
    and the ablation's R, P and RTS ones), against the base; the base's own cells first (a collapse there is
    known before the pieces are combined)."""
    if not validation:
        return
    base_cells = set().union(*(plan[base][0] for plan in (ablation, validation) if base in plan))
    print("\n## The whole recipe's validation (every dataset)\n")
    for recipe in sorted(validation, key=lambda r: (r != base, r)):
        cells, seeds = validation[recipe]
        lines, verdict = validation_verdict(rows, base, recipe, cells | base_cells if recipe == base else cells, seeds)
        print(f"### {recipe}\n\n" + "\n".join(lines) + f"\n\n{recipe}: {verdict}\n")


if __name__ == "__main__":
    sys.exit(main())
