"""A convergence curve carried to the paper's budget: a power law with a floor, fitted through three budgets.

    error(n) = floor + scale * n ** -exponent        n: the fraction of the paper's 38.4M training images

Three parameters, so three budgets determine it exactly: nothing is least-squared or tuned, and the prediction at
n = 1 is what the form says. Why this form: a pure power law through two budgets predicted the FCN's
full-budget error 3-4x too low, because the log-log curves bend (experiments/convergence/README.md); the
floor lets the curve flatten, as learning curves do (e.g. Hestness et al., "Deep learning scaling is
predictable, empirically", 2017, whose curves end in an irreducible-error region).

The fit exists only for errors that fall at every budget and flatten at least as fast as a straight line in
error against log images (the exponent -> 0 limit of the form); anything else gets no prediction, with the
reason. How well the form predicts is measured, not assumed: `extrapolate_record` sets each prediction beside
every larger budget the record holds and beside the paper-schedule cells of another study.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SaturatingPowerLaw:
    floor: float
    scale: float
    exponent: float

    def __call__(self, fraction: float) -> float:
        return self.floor + self.scale * fraction ** -self.exponent


class NoFit(ValueError):
    """Three points the form cannot pass through (the message says why)."""


def fit_three(fractions: Sequence[float], errors: Sequence[float]) -> SaturatingPowerLaw:
    """The one SaturatingPowerLaw through three (fraction, error) points, fractions increasing.

    With u_i = n_i ** -c, the ratio (u1 - u2) / (u2 - u3) grows with c from ln(n2/n1) / ln(n3/n2) (c -> 0) to
    infinity, so matching it to (e1 - e2) / (e2 - e3) fixes c (bisection on ln c); scale and floor follow.
    Raises NoFit for errors that do not fall at each budget or flatten more slowly than that c -> 0 limit."""
    if len(fractions) != 3 or len(errors) != 3:
        raise NoFit("needs exactly three budgets")
    n1, n2, n3 = (float(f) for f in fractions)
    e1, e2, e3 = (float(e) for e in errors)
    if not 0 < n1 < n2 < n3:
        raise NoFit("budgets must increase")
    if not e1 > e2 > e3:
        raise NoFit("the error does not fall at every budget")
    target = (e1 - e2) / (e2 - e3)

    def ratio(c: float) -> float:
        u1, u2, u3 = n1 ** -c, n2 ** -c, n3 ** -c
        return (u1 - u2) / (u2 - u3)

    if target <= math.log(n2 / n1) / math.log(n3 / n2):
        raise NoFit("the error does not flatten on the log axis (no floor + power law passes through it)")
    lo, hi = math.log(1e-6), math.log(20.0)
    if ratio(math.exp(hi)) < target:
        raise NoFit("the error drops too abruptly for an exponent below 20")
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(math.exp(mid)) < target else (lo, mid)
    c = math.exp((lo + hi) / 2)
    scale = (e1 - e2) / (n1 ** -c - n2 ** -c)
    return SaturatingPowerLaw(floor=e3 - scale * n3 ** -c, scale=scale, exponent=c)


def fit_error_curve(fractions: Sequence[float], errors: Sequence[float]) -> SaturatingPowerLaw:
    """`fit_three` for a test error, which cannot go below zero: a law whose floor is negative is NoFit.

    A negative floor means the three errors fall at least as fast as a pure power law on the log-log axes (the
    slope does not flatten there); such a law would cross zero at some budget, so it predicts nothing. The
    tolerance (a millionth of the largest error) only absorbs the fit's rounding for a floor of exactly zero."""
    law = fit_three(fractions, errors)
    if law.floor < -1e-6 * max(errors):
        raise NoFit(f"the fitted floor is below zero ({law.floor:.2f}): the error does not flatten on the log-log "
                    "axes, so the form has no floor to carry it to")
    return law


@dataclass(frozen=True)
class Extrapolation:
    """One model's curve carried to the paper's budget (`extrapolate_record`)."""

    recipe: str
    dataset: str
    model: str
    fitted: tuple[str, ...]  # the three budgets the law goes through
    seeds: tuple[int, ...]  # the seeds trained at all three: the fit goes through their mean errors
    law: SaturatingPowerLaw | None  # None: no fit (`why`)
    why: str = ""
    per_seed: tuple[float, ...] = ()  # each seed's own fit at n = 1 (nan: none), for seeds at all three budgets
    checks: tuple[tuple[str, float, float], ...] = ()  # (budget, predicted, measured mean) past the fitted ones
    paper: str = ""


def extrapolate_record(rows: Sequence[dict[str, str]],
                       paper_schedule: dict[tuple[str, str], dict[str, Any]] | None = None) -> list[Extrapolation]:
    """For each (recipe, dataset, model) of a study record with at least three budgets: the form fitted through
    its three smallest budgets' mean errors over the seeds trained at all three, and through each such seed's
    own three errors, set beside every larger
    budget of the record and the paper-schedule cell of another study (`stn.convergence.plot.
    read_paper_schedule`; budget "1/1 (another study)")."""
    from stn.convergence.study import parse_budget

    by_cell: dict[tuple[str, str, str], dict[str, dict[int, float]]] = {}
    papers: dict[tuple[str, str, str], str] = {}
    for r in rows:
        cell = (r["recipe"], r["dataset"], r["model"])
        if math.isnan(float(r["test_error"])):  # a diverged seed (the summary table counts it): no curve to fit
            continue
        by_cell.setdefault(cell, {}).setdefault(r["budget"], {})[int(r["seed"])] = float(r["test_error"])
        if r.get("paper"):
            papers[cell] = r["paper"]
    out = []
    for cell in sorted(by_cell):
        errors = by_cell[cell]
        budgets = sorted(errors, key=parse_budget)
        if len(budgets) < 3:
            continue
        fitted, later = budgets[:3], budgets[3:]
        fractions = [float(parse_budget(b)) for b in fitted]
        # Only the seeds trained at all three budgets: a seed's data stream and initialisation are the same at
        # every budget, so a mean over other seeds at one budget alone would bend the curve by seed noise.
        seeds = sorted(set.intersection(*(set(errors[b]) for b in fitted)))
        common = {"fitted": tuple(fitted), "seeds": tuple(seeds), "paper": papers.get(cell, "")}
        try:
            if not seeds:
                raise NoFit("no seed was trained at all three budgets")
            law = fit_error_curve(fractions, [statistics.fmean(errors[b][seed] for seed in seeds) for b in fitted])
        except NoFit as err:
            out.append(Extrapolation(*cell, law=None, why=str(err), **common))
            continue
        per_seed = []
        for seed in seeds:
            try:
                per_seed.append(fit_error_curve(fractions, [errors[b][seed] for b in fitted])(1.0))
            except NoFit:
                per_seed.append(math.nan)
        checks = [(b, law(float(parse_budget(b))), statistics.fmean(errors[b].values())) for b in later]
        endpoint = (paper_schedule or {}).get((cell[1], cell[2]))
        if endpoint is not None:
            checks.append(("1/1 (another study)", law(1.0), float(endpoint["mean"])))
        out.append(Extrapolation(*cell, law=law, per_seed=tuple(per_seed), checks=tuple(checks), **common))
    return out


EXTRAPOLATION_COLUMNS = ("recipe", "dataset", "model", "fitted on", "floor", "exponent", "predicted at 1/1",
                         "per seed", "checks: predicted / measured", "paper")


def extrapolation_rows(rows: Sequence[dict[str, str]],
                       paper_schedule: dict[tuple[str, str], dict[str, Any]] | None = None) -> list[list[str]]:
    """`extrapolate_record` as text, EXTRAPOLATION_COLUMNS (per seed: only with two seeds or more)."""
    out = []
    for e in extrapolate_record(rows, paper_schedule):
        fitted = f"{', '.join(e.fitted)} (seeds {', '.join(str(n) for n in e.seeds) or 'none in common'})"
        if e.law is None:
            out.append([e.recipe, e.dataset, e.model, fitted, "", "", f"none: {e.why}", "", "", e.paper])
            continue
        seeds = ", ".join("none" if math.isnan(p) else f"{p:.2f}" for p in e.per_seed) if len(e.per_seed) > 1 else ""
        checks = "; ".join(f"{budget}: {predicted:.2f} / {measured:.2f}" for budget, predicted, measured in e.checks)
        out.append([e.recipe, e.dataset, e.model, fitted, f"{e.law.floor:.2f}", f"{e.law.exponent:.2f}",
                    f"{e.law(1.0):.2f}", seeds, checks, e.paper])
    return out


def extrapolation_table(rows: Sequence[dict[str, str]],
                        paper_schedule: dict[tuple[str, str], dict[str, Any]] | None = None) -> str:
    """`extrapolation_rows` as Markdown ('' when no cell has three budgets)."""
    body = extrapolation_rows(rows, paper_schedule)
    if not body:
        return ""
    lines = ["| " + " | ".join(EXTRAPOLATION_COLUMNS) + " |", "|" + "---|" * len(EXTRAPOLATION_COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
