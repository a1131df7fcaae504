"""The convergence study's record read back: test error against training images, per dataset, and a table.

`plot_study` draws one picture per dataset from a study's results.csv (`stn.convergence.study`): test error
against training images, both on log axes, a line per model and recipe (mean over seeds, the band from the
lowest to the highest seed), the paper's value dashed at the paper's image count. `summary_table` is the same
record as Markdown: mean ± std (n) per budget beside the paper; `orderings_table` compares the pairs of
models the paper ranks, with the seed-noise criterion the write-ups use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stn.convergence.study import PAPER_IMAGES, PAPER_STEPS, StudyError, parse_budget, read_results
from stn.report import mean_std, parse_errors


def aggregate(rows: Sequence[dict[str, str]], error: str = "test_error"
              ) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """(recipe, dataset, model, budget) -> {images, errors, diverged, mean, std, paper}; `error` names the record's
    error column (val_error for a validation study). A diverged seed (error nan: its loss became NaN/inf,
    stn.convergence.study.diverged_row) is counted in `diverged`, not averaged; a cell whose every seed diverged
    has no entry here (`diverged_cells` names it)."""
    out: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["recipe"], r["dataset"], r["model"], r["budget"])
        entry = out.setdefault(key, {"images": int(r["images"]), "errors": [], "diverged": 0,
                                     "paper": r.get("paper") or None})
        value = float(r[error])
        if math.isnan(value):
            entry["diverged"] += 1
        else:
            entry["errors"].append(value)
    out = {key: entry for key, entry in out.items() if entry["errors"]}
    for entry in out.values():
        entry["mean"], entry["std"] = mean_std(entry["errors"])
        entry["paper"] = None if entry["paper"] in (None, "") else float(entry["paper"])
    return out


def read_paper_schedule(paths: Sequence[Path]) -> dict[tuple[str, str], dict[str, Any]]:
    """(dataset, model) -> {errors, mean, std, source} from `stn engine run` results.csv files, keeping the
    cells trained the paper's full PAPER_STEPS. Both schemas: the table record's (stn.report.RESULT_COLUMNS:
    errors "seed:error;..", steps) and the engine's before it (errors "e0;e1;..", NaN for a diverged seed).
    A later file's cell replaces an earlier one's."""
    import csv

    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in paths:
        if not Path(path).is_file():
            raise StudyError(f"paper_schedule: {path} not found (paths are relative to where stn runs, the "
                             "repository root)")
        with Path(path).open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"row", "column", "errors", "steps"} - set(reader.fieldnames or [])
            if missing:
                raise StudyError(f"{path}: not an `stn engine run` results.csv (no column {', '.join(sorted(missing))})")
            record = "ours_mean" in (reader.fieldnames or [])
            for r in reader:
                if not r["steps"] or int(r["steps"]) != PAPER_STEPS:
                    continue
                if record:
                    errors = list(parse_errors(r["errors"]).values())
                else:
                    errors = [float(e) for e in r["errors"].split(";") if e and e.lower() != "nan"]
                if errors:
                    mean, std = mean_std(errors)
                    out[(r["column"], r["row"])] = {"errors": errors, "mean": mean, "std": std, "source": str(path)}
    return out


def paper_schedule_table(table: dict[tuple[str, str], dict[str, Any]],
                         papers: dict[tuple[str, str], float | None] | None = None) -> str:
    """Markdown: the paper-schedule cells of `read_paper_schedule`, mean ± std (n) beside the paper."""
    lines = ["| dataset | model | ours at the paper's schedule | paper | file |", "|---|---|---|---|---|"]
    for (dataset, model), v in sorted(table.items()):
        paper = (papers or {}).get((dataset, model))
        lines.append(f"| {dataset} | {model} | {mean_std_text(v)} | {'' if paper is None else f'{paper:g}'} | "
                     f"{v['source']} |")
    return "\n".join(lines)


def mean_std_text(entry: dict[str, Any]) -> str:
    """An `aggregate` entry as "mean ± std (n)", or "mean (1)" for one seed; "+ k diverged" after the count."""
    spread = "" if entry["std"] is None else f" ± {entry['std']:.2f}"
    diverged = f" + {entry['diverged']} diverged" if entry.get("diverged") else ""
    return f"{entry['mean']:.2f}{spread} ({len(entry['errors'])}{diverged})"


def diverged_cells(rows: Sequence[dict[str, str]], error: str = "test_error") -> dict[tuple[str, str, str, str], int]:
    """(recipe, dataset, model, budget) -> how many of its seeds diverged (error nan), for every such cell."""
    found: dict[tuple[str, str, str, str], int] = {}
    for r in rows:
        if math.isnan(float(r[error])):
            key = (r["recipe"], r["dataset"], r["model"], r["budget"])
            found[key] = found.get(key, 0) + 1
    return found


def plot_study(results: Path, out_dir: Path, paper_schedule: Sequence[Path] = ()) -> list[Path]:
    """One PNG per dataset: test error vs training images (log-log), a line per model and recipe (mean over
    seeds, the band from min to max seed), the paper's error dashed at the paper's image count. Cells of
    `paper_schedule` files (`read_paper_schedule`: another study, at the paper's full schedule) are hollow
    diamonds at the paper's image count, the bar from min to max seed, not joined to the lines."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = aggregate(read_results(results))
    endpoints = read_paper_schedule(paper_schedule)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in sorted({k[1] for k in table}):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        drew_endpoint = False
        keys = sorted({(k[0], k[2]) for k in table if k[1] == dataset})
        colors = plt.cm.tab10.colors  # type: ignore[attr-defined]
        for index, (recipe, model) in enumerate(keys):
            color = colors[index % len(colors)]
            points = sorted(((v["images"], v) for k, v in table.items() if k[:3] == (recipe, dataset, model)),
                            key=lambda point: point[0])
            xs = [p[0] for p in points]
            style = "-" if recipe == "paper-sgd" else ":"
            ax.plot(xs, [p[1]["mean"] for p in points], style, marker="o", color=color,
                    label=f"{model}" + ("" if recipe == "paper-sgd" else f" [{recipe}]"))
            ax.fill_between(xs, [min(p[1]["errors"]) for p in points], [max(p[1]["errors"]) for p in points],
                            color=color, alpha=0.2)
            for x, (_, v) in zip(xs, points, strict=True):
                ax.annotate(str(len(v["errors"])), (x, v["mean"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
            paper = next((p[1]["paper"] for p in points if p[1]["paper"] is not None), None)
            if paper is not None and recipe == "paper-sgd":
                ax.axhline(paper, color=color, linestyle="--", linewidth=0.8)
                ax.plot([PAPER_IMAGES], [paper], marker="*", color=color, markersize=9)
            end = endpoints.get((dataset, model))
            if end is not None and recipe == "paper-sgd":
                low, high = end["mean"] - min(end["errors"]), max(end["errors"]) - end["mean"]
                # just right of the paper's star
                ax.errorbar([PAPER_IMAGES * 1.15], [end["mean"]], yerr=[[low], [high]], marker="D", color=color,
                            markerfacecolor="none", markersize=6, capsize=2, linestyle="none")
                drew_endpoint = True
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain = matplotlib.ticker.FormatStrFormatter("%g")  # 0.8, 2, 10 rather than 8x10^-1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("training images (paper: 38.4M, the stars)")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"{dataset}: test error vs training budget (band: seed min-max; n = seeds)")
        ax.grid(True, which="both", alpha=0.3)
        if drew_endpoint:  # one legend entry for the diamonds, in grey (their colours are the models')
            ax.plot([], [], marker="D", color="grey", markerfacecolor="none", linestyle="none",
                    label="paper schedule, another study (GPU)")
        ax.legend(fontsize=7)
        path = out_dir / f"{dataset}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def summary_table(results: Path) -> str:
    """Markdown: per (dataset, model), mean ± std (n) at every budget, beside the paper."""
    rows = read_results(results)
    table = aggregate(rows)
    budgets = sorted({k[3] for k in table}, key=parse_budget)
    head = ["recipe", "dataset", "model", *budgets, "paper (1/1)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for recipe, dataset, model in sorted({k[:3] for k in table}):
        cells = []
        paper = None
        for budget in budgets:
            entry = table.get((recipe, dataset, model, budget))
            if entry is None:
                cells.append("")
                continue
            paper = entry["paper"] if entry["paper"] is not None else paper
            cells.append(mean_std_text(entry))
        lines.append("| " + " | ".join([recipe, dataset, model, *cells, "" if paper is None else f"{paper}"]) + " |")
    lost = [f"{recipe} {dataset} {model} at {budget} ({n} seed(s))"
            for (recipe, dataset, model, budget), n in sorted(diverged_cells(rows).items())
            if (recipe, dataset, model, budget) not in table]
    return "\n".join(lines) + (f"\n\nEvery seed diverged (loss NaN/inf): {'; '.join(lost)}" if lost else "")


# The comparisons Table 1 is read for: each baseline against the model that adds to it, and the two transformers.
ORDERING_PAIRS = (("CNN", "FCN"), ("ST-FCN Aff", "FCN"), ("ST-CNN Aff", "CNN"), ("ST-CNN TPS", "CNN"),
                  ("ST-CNN Aff", "ST-FCN Aff"), ("ST-CNN TPS", "ST-CNN Aff"))


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, float | None]:
    """Which of two cells (aggregate entries) has the lower mean error, counting a difference as resolved only
    when |mean_a - mean_b| > 2·s/√n, with s the larger of the two seed stds and n the smaller seed count (for
    3 seeds each: 2·s/√3, the criterion of the precision-parity check). Returns (verdict, threshold)."""
    n = min(len(a["errors"]), len(b["errors"]))
    if n < 2 or a["std"] is None or b["std"] is None:
        return "one seed: unresolved", None
    threshold = 2 * max(a["std"], b["std"]) / n ** 0.5
    if abs(a["mean"] - b["mean"]) <= threshold:
        return "within the seed spread", threshold
    return ("first lower" if a["mean"] < b["mean"] else "second lower"), threshold


ORDERING_COLUMNS = ("recipe", "dataset", "budget", "first vs second", "first", "second", "difference", "2·s/√n",
                    "ours", "paper")


def ordering_rows(table: dict[tuple[str, str, str, str], dict[str, Any]]) -> list[list[str]]:
    """For each recipe, dataset and budget of an `aggregate` table, the pairs of ORDERING_PAIRS it has: ours
    (with `compare`'s verdict) beside the paper's ordering of the same two models, as ORDERING_COLUMNS."""
    rows = []
    groups = sorted({(k[0], k[1], k[3]) for k in table}, key=lambda g: (g[0], g[1], parse_budget(g[2])))
    for recipe, dataset, budget in groups:
        for first, second in ORDERING_PAIRS:
            a, b = table.get((recipe, dataset, first, budget)), table.get((recipe, dataset, second, budget))
            if a is None or b is None:
                continue
            verdict, threshold = compare(a, b)
            ours = {"first lower": f"{first} lower", "second lower": f"{second} lower"}.get(verdict, verdict)
            if a["paper"] is None or b["paper"] is None:
                paper = ""
            else:
                sign = "<" if a["paper"] < b["paper"] else ">" if a["paper"] > b["paper"] else "="
                paper = f"{a['paper']:g} {sign} {b['paper']:g}"
            rows.append([recipe, dataset, budget, f"{first} vs {second}", mean_std_text(a), mean_std_text(b),
                         f"{a['mean'] - b['mean']:+.2f}", "" if threshold is None else f"{threshold:.2f}", ours, paper])
    return rows


def orderings_table(results: Path) -> str:
    """`ordering_rows` of a record as Markdown."""
    lines = ["| " + " | ".join(ORDERING_COLUMNS) + " |", "|" + "---|" * len(ORDERING_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in ordering_rows(aggregate(read_results(results)))]
    return "\n".join(lines)


SUMMARY_COLUMNS = ("recipe", "dataset", "model", "budget", "images", "seeds", "mean", "std", "paper")


def log_study_to_wandb(study: Any, plots: Sequence[Path], logger: Any) -> Path | None:
    """One W&B run (job_type "study", in the group of the study's cell runs, named "<study>-study") holding the
    record as it stands: `results` (every row of results.csv), `summary` (mean and std over seeds per recipe,
    dataset, model and budget, beside the paper), `orderings` (`ordering_rows`), the per-dataset plots
    (`plot/<dataset>`), summary keys test_error/<recipe>/<dataset>/<model>/<budget, 1_50 for 1/50> (the mean)
    and paper_test_error/<dataset>/<model>, and for models with three budgets `extrapolation`
    (stn.convergence.extrapolate) with summary keys extrapolated_test_error/<recipe>/<dataset>/<model>. Each call is a new
    run, a snapshot of the record (its size in the config): a dashboard takes the newest. `logger` is the
    study's composed logger section (mode, project, entity, tags). Never fails: warns and returns None;
    returns the run's folder."""
    from stn.convergence.extrapolate import EXTRAPOLATION_COLUMNS, extrapolate_record, extrapolation_rows
    from stn.tracking import effective_mode, init_run, say_once

    if logger.mode == "disabled":
        return None
    rows = read_results(study.results)
    table = aggregate(rows)
    try:
        import wandb

        with init_run(
            effective_mode(logger.mode), project=logger.project, entity=logger.entity, group=study.name,
            job_type="study", name=f"{study.name}-study", tags=["study", study.name, study.recipe, *logger.tags],
            config={"study": str(study.path), "recipe": study.recipe, "record": str(study.results),
                    "rows_recorded": len(rows), "batch_size": study.batch_size, "overrides": list(study.overrides)},
            reinit="create_new",
        ) as run:
            columns = list(rows[0]) if rows else []
            summary = [[recipe, dataset, model, budget, v["images"], len(v["errors"]), v["mean"], v["std"], v["paper"]]
                       for (recipe, dataset, model, budget), v in sorted(table.items())]
            payload: dict[str, Any] = {
                "results": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows]),
                "summary": wandb.Table(columns=list(SUMMARY_COLUMNS), data=summary),
                "orderings": wandb.Table(columns=list(ORDERING_COLUMNS), data=ordering_rows(table)),
                **{f"plot/{path.stem}": wandb.Image(str(path)) for path in plots},
            }
            endpoints = read_paper_schedule(study.paper_schedule) if study.paper_schedule else {}
            if endpoints:
                payload["paper_schedule"] = wandb.Table(
                    columns=["dataset", "model", "seeds", "mean", "std", "source"],
                    data=[[d, m, len(v["errors"]), v["mean"], v["std"], v["source"]] for (d, m), v in sorted(endpoints.items())])
            extrapolations = extrapolate_record(rows, endpoints)
            if extrapolations:
                payload["extrapolation"] = wandb.Table(columns=list(EXTRAPOLATION_COLUMNS),
                                                       data=extrapolation_rows(rows, endpoints))
            run.log(payload)
            for (recipe, dataset, model, budget), v in table.items():
                run.summary[f"test_error/{recipe}/{dataset}/{model}/{budget.replace('/', '_')}"] = v["mean"]
                if v["paper"] is not None:
                    run.summary[f"paper_test_error/{dataset}/{model}"] = v["paper"]
            for e in extrapolations:
                if e.law is not None:
                    run.summary[f"extrapolated_test_error/{e.recipe}/{e.dataset}/{e.model}"] = e.law(1.0)
            folder = Path(run.dir).parent  # run.dir is <run folder>/files
        return folder
    except Exception as err:  # W&B must never cost the study: the record and its plots are already written
        say_once(f"logging the study to W&B failed ({type(err).__name__}: {err}); the record is {study.results}")
        return None
