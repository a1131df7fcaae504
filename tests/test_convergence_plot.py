"""stn.convergence.plot: the Markdown summary (mean ± std (n) per budget beside the paper) and the per-dataset
plots, from a hand-written record."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stn.cli.main import app
from stn.convergence.plot import compare, orderings_table, plot_study, read_paper_schedule, summary_table
from stn.convergence.study import PAPER_IMAGES, parse_budget
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
    (orderings_file,) = folder.glob("files/media/table/orderings_*.table.json")
    logged = json.loads(orderings_file.read_text())
    assert [row[:4] + row[-2:] for row in logged["data"]] == [
        ["paper-sgd", "R", "1/50", "CNN vs FCN", "one seed: unresolved", "1.2 < 2.1"]]
    (results_file,) = folder.glob("files/media/table/results_*.table.json")
    assert len(json.loads(results_file.read_text())["data"]) == 4

    result = CliRunner().invoke(app, ["convergence", "plot", "--study", str(study), "--no-wandb"])
    assert result.exit_code == 0 and len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    written = (tmp_path / "demo.md").read_text()
    assert "| paper-sgd | R | CNN | 4.50 ± 0.71 (2) | 2.00 (1) | 1.2 |" in written
    assert "## Orderings" in written and "| paper-sgd | R | 1/50 | CNN vs FCN |" in written


def test_orderings_count_a_difference_only_beyond_the_seed_spread(tmp_path: Path) -> None:
    record = tmp_path / "results.csv"
    paper = {"FCN": 2.1, "CNN": 1.2, "ST-CNN Aff": 0.7}
    rows = [("FCN", "1/250", 9.0), ("FCN", "1/250", 10.0), ("CNN", "1/250", 4.0), ("CNN", "1/250", 5.0),
            ("ST-CNN Aff", "1/250", 4.2), ("ST-CNN Aff", "1/250", 4.6), ("CNN", "1/50", 2.0), ("FCN", "1/50", 9.0)]
    with record.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["recipe", "dataset", "model", "budget", "images", "seed", "test_error", "paper"])
        for seed, (model, budget, error) in enumerate(rows):
            writer.writerow(["paper-sgd", "R", model, budget, int(parse_budget(budget) * PAPER_IMAGES), seed, error,
                             paper[model]])
    lines = orderings_table(record).splitlines()
    # CNN vs FCN at 1/250: means 4.5 and 9.5, both stds 1/√2, so the threshold is 2·(1/√2)/√2 = 1.00 < 5.
    assert "| paper-sgd | R | 1/250 | CNN vs FCN | 4.50 ± 0.71 (2) | 9.50 ± 0.71 (2) | -5.00 | 1.00 | CNN lower " \
           "| 1.2 < 2.1 |" in lines
    # ST-CNN Aff vs CNN: 4.4 against 4.5, 0.1 apart, inside the same 1.00: a tie, whatever the paper says.
    assert "| paper-sgd | R | 1/250 | ST-CNN Aff vs CNN | 4.40 ± 0.28 (2) | 4.50 ± 0.71 (2) | -0.10 | 1.00 " \
           "| within the seed spread | 0.7 < 1.2 |" in lines
    # One seed each at 1/50: no verdict, and the 1/250 rows come first.
    assert lines[-1] == "| paper-sgd | R | 1/50 | CNN vs FCN | 2.00 (1) | 9.00 (1) | -7.00 |  | one seed: unresolved " \
                        "| 1.2 < 2.1 |"
    assert len(lines) == 2 + 3  # header, rule, two pairs at 1/250 (no ST-CNN Aff vs FCN pair), one at 1/50


def test_compare_uses_the_larger_std_and_the_smaller_seed_count() -> None:
    a = {"errors": [1.0, 1.2, 1.4], "mean": 1.2, "std": 0.2}
    b = {"errors": [1.5, 1.6], "mean": 1.55, "std": 0.0707}
    verdict, threshold = compare(a, b)
    assert threshold == pytest.approx(2 * 0.2 / 2 ** 0.5)  # s = 0.2 (a's), n = 2 (b's)
    assert verdict == "first lower"  # 1.55 - 1.2 = 0.35 > 0.283
    b_wider = {**b, "std": 0.3}  # now s = 0.3: threshold 0.424 > 0.35
    assert compare(a, b_wider) == ("within the seed spread", pytest.approx(2 * 0.3 / 2 ** 0.5))
    assert compare(a, {"errors": [1.9], "mean": 1.9, "std": None}) == ("one seed: unresolved", None)


def write_engine_results(path: Path) -> None:
    """An `stn engine run` results.csv: one cell at the paper's 150k steps, one cut short, one all-NaN."""
    path.write_text("row,column,paper,mean,std,seeds,errors,steps,train_seconds,images_per_s_group,group,k\n"
                    "CNN,R,1.2,1.500,0.100,0;1;2,1.40;1.50;1.60,150000,10.0,1000,cnn_R-P-E,9\n"
                    "FCN,R,2.1,9.000,,0,9.00,1200,1.0,1000,fcn_R,1\n"
                    "FCN,P,3.1,nan,,0,nan,150000,1.0,1000,fcn_R-P-E,9\n")


def test_paper_schedule_reads_the_table_records_schema_too(tmp_path: Path) -> None:
    """An `stn engine run` results.csv in the table record's schema (stn.report): seed:error pairs, a failed seed
    left out, a cell below the paper's steps skipped."""
    from stn.report import CellResult, render_csv, summarise

    runs = [{"row": "CNN", "column": "R", "seed": s, "status": "done", "test_error": e, "steps": 150_000}
            for s, e in ((0, 1.4), (1, 1.6))]
    runs += [{"row": "CNN", "column": "R", "seed": 2, "status": "failed", "error": "non-finite loss"},
             {"row": "FCN", "column": "R", "seed": 0, "status": "done", "test_error": 9.0, "steps": 1200}]
    results: list[CellResult] = summarise({("CNN", "R"): 1.2, ("FCN", "R"): 2.1}, [0, 1, 2], runs)
    engine = tmp_path / "engine.csv"
    engine.write_text(render_csv(results))
    cells = read_paper_schedule([engine])
    assert list(cells) == [("R", "CNN")] and cells[("R", "CNN")]["errors"] == [1.4, 1.6]
    assert cells[("R", "CNN")]["mean"] == pytest.approx(1.5) and cells[("R", "CNN")]["std"] == pytest.approx(0.1414, abs=1e-4)


def test_paper_schedule_cells_are_read_plotted_and_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = tmp_path / "engine.csv"
    write_engine_results(engine)
    cells = read_paper_schedule([engine])
    assert list(cells) == [("R", "CNN")]  # the 1200-step cell and the NaN-only cell are not paper-schedule points
    assert cells[("R", "CNN")]["mean"] == pytest.approx(1.5) and cells[("R", "CNN")]["std"] == pytest.approx(0.1)

    record = tmp_path / "results.csv"
    write_record(record)
    plain = plot_study(record, tmp_path / "plain")[0].read_bytes()
    with_end = plot_study(record, tmp_path / "end", [engine])[0].read_bytes()
    assert plain != with_end  # the diamond and its legend entry are drawn

    monkeypatch.chdir(tmp_path)
    study = tmp_path / "study.yaml"
    text = (f"name: demo\nrecipe: paper-sgd\ngrid: {GRID}\nbatch_size: 128\nresults: results.csv\nseeds: [0, 1]\n"
            "parts:\n  - {rows: [CNN, FCN], columns: [R], budgets: ['1/250', '1/50']}\n")
    study.write_text(text + "paper_schedule: [engine.csv]\n")
    result = CliRunner().invoke(app, ["convergence", "plot", "--study", str(study), "--no-wandb"])
    assert result.exit_code == 0, result.output
    written = (tmp_path / "demo.md").read_text()
    assert "## At the paper's schedule (another study)" in written
    assert "| R | CNN | 1.50 ± 0.10 (3) | 1.2 | engine.csv |" in written

    study.write_text(text + "paper_schedule: [missing.csv]\n")
    result = CliRunner().invoke(app, ["convergence", "plot", "--study", str(study), "--no-wandb"])
    assert result.exit_code == 2 and "paper_schedule: missing.csv not found" in result.output


def test_plot_takes_out_and_says_when_it_rewrites_tracked_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --out the plots and summary go beside the record: in a git checkout where they are tracked, a
    note says so (and how to undo it); --out DIR writes there and leaves the record's folder alone. The
    summary names the study's overrides and batch."""
    import subprocess

    monkeypatch.chdir(tmp_path)
    write_record(tmp_path / "results.csv")
    study = tmp_path / "study.yaml"
    study.write_text(f"name: demo\nrecipe: paper-sgd\ngrid: {GRID}\nbatch_size: 128\nresults: results.csv\n"
                     "overrides: [trainer=quick, dataset.train_limit=512]\nseeds: [0, 1]\n"
                     "parts:\n  - {rows: [CNN, FCN], columns: [R], budgets: ['1/250', '1/50']}\n")
    args = ["convergence", "plot", "--study", str(study), "--no-wandb"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "git tracks" not in result.stderr  # not a checkout: nothing to say
    summary = (tmp_path / "demo.md").read_text()
    assert "overrides `trainer=quick` `dataset.train_limit=512` (batch 128)" in summary
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "demo.md", "plots"], check=True)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "note: rewrote 2 file(s) git tracks" in result.stderr, result.output
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and ".git" not in p.parts}
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "elsewhere")])
    assert result.exit_code == 0 and "git tracks" not in result.stderr
    assert (tmp_path / "elsewhere" / "demo.md").is_file() and list((tmp_path / "elsewhere" / "plots" / "demo").glob("*.png"))
    assert before == {p: p.stat().st_mtime_ns for p in before}  # the record's folder is untouched


def write_two_recipes(record: Path) -> None:
    """A laptop-like recipe's R cells at 1/20 beside the paper's recipe's ST-CNN Aff cell at the same budget."""
    images = int(parse_budget("1/20") * PAPER_IMAGES)
    rows = [("laptop", "ST-CNN Aff", 0, 0.60, 30.0), ("laptop", "ST-CNN Aff", 1, 0.70, 32.0),
            ("laptop", "ST-CNN Aff", 2, 0.80, 34.0), ("laptop", "CNN", 0, 1.0, None), ("laptop", "CNN", 1, 1.1, None),
            ("laptop", "CNN", 2, 1.2, None), ("paper-sgd", "ST-CNN Aff", 0, 1.10, 44.0),
            ("paper-sgd", "ST-CNN Aff", 1, 1.16, 46.0), ("paper-sgd", "ST-CNN Aff", 2, 1.22, 48.0)]
    with record.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["recipe", "dataset", "model", "budget", "images", "seed", "test_error", "paper", "recovery",
                         "recovery_before"])
        for recipe, model, seed, error, rotation in rows:
            recovery = ("", "") if rotation is None else (f"rotation_std_deg={rotation}", "rotation_std_deg=51.7")
            writer.writerow([recipe, "R", model, "1/20", images, seed, error, 0.7 if model != "CNN" else 1.2, *recovery])


def test_a_second_recipe_is_set_against_the_paper_and_the_papers_recipe(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from stn.convergence.beside import beside_rows
    from stn.convergence.study import read_results

    record = tmp_path / "results.csv"
    write_two_recipes(record)
    rows = read_results(record)
    found = beside_rows(rows, rows)
    # ST-CNN Aff: 0.70 ± 0.10 against 1.16 ± 0.06; 2·max(0.10, 0.06)/√3 = 0.115 < 0.46: ours lower.
    # Recovery: the seeds' mean rotation spread, 32 against 46, the untouched digits' 51.7.
    assert found == [
        ["laptop", "R", "CNN", "1/20", "1.10 ± 0.10 (3)", "1.2", "0.92x", "", "", "", ""],
        ["laptop", "R", "ST-CNN Aff", "1/20", "0.70 ± 0.10 (3)", "0.7", "1.00x", "1.16 ± 0.06 (3)", "ours lower", "0.12",
         "rotation_std_deg 32 / 46 (51.7)"],
    ]

    monkeypatch.chdir(tmp_path)  # no main convergence record here: the paper's recipe comes from the study's own rows
    study = tmp_path / "study.yaml"
    study.write_text(f"name: demo\nrecipe: laptop\ngrid: {GRID}\nbatch_size: 128\nresults: results.csv\n"
                     "seeds: [0, 1, 2]\nparts:\n  - {rows: [CNN, ST-CNN Aff], columns: [R], budgets: ['1/20']}\n")
    result = CliRunner().invoke(app, ["convergence", "plot", "--study", str(study), "--no-wandb"])
    assert result.exit_code == 0, result.output
    summary = (tmp_path / "demo.md").read_text()
    assert "## Against the paper, beside the paper's recipe at the same budget" in summary
    assert "| laptop | R | ST-CNN Aff | 1/20 | 0.70 ± 0.10 (3) | 0.7 | 1.00x | 1.16 ± 0.06 (3) | ours lower |" in summary
    chart = tmp_path / "plots" / "demo" / "against_paper.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "against_paper.png" in result.output

    write_record(record)  # the paper's recipe only: nothing to set against it
    result = CliRunner().invoke(app, ["convergence", "plot", "--study", str(study), "--no-wandb"])
    assert result.exit_code == 0 and "## Against the paper" not in (tmp_path / "demo.md").read_text()
