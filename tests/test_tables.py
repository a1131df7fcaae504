"""stn.tables.reproduce and `stn reproduce-table`: cell expansion, aggregation, resumable fan-out, outputs, W&B.

Fast tests use a stand-in `fit` on submitit's in-process debug executor; the slow ones run the real
`stn.train.fit` through the CLI (local executor = subprocesses, and debug for the resume case).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stn.cli.main import app
from stn.compose import compose
from stn.config import TRAINER_PRESETS, Config, to_dict, to_yaml
from stn.grid import TableError, cell_name, load_grid, select_cells
from stn.report import mean_std, summarise
from stn.tables.reproduce import plan_jobs, reproduce
from wandb_log import read_run

GRID = Path(__file__).resolve().parents[1] / "experiments" / "table1" / "grid.yaml"


@pytest.fixture
def data_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """MNIST from STN_DATA_DIR; cwd and W&B's folder inside tmp_path (the local executor's workers inherit both)."""
    import os

    data_dir = os.environ.get("STN_DATA_DIR")
    if not data_dir or not (Path(data_dir) / "MNIST" / "raw").is_dir():
        pytest.fail("these tests train on real MNIST: set STN_DATA_DIR to the folder holding MNIST/raw/ (see README)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


# --------------------------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("preset", TRAINER_PRESETS)
def test_every_cell_composes_a_valid_config(preset: str, tmp_path: Path) -> None:
    grid = load_grid(GRID)
    jobs = plan_jobs(grid, list(grid.cells), [0, 1], preset, [], tmp_path / "table", "g")
    assert len(jobs) == 2 * len(grid.cells)
    models = {"FCN": "fcn", "CNN": "cnn", "ST-FCN": "st_fcn", "ST-CNN": "st_cnn"}
    transforms = {"Aff": "affine", "Proj": "projective", "TPS": "tps"}
    for job in jobs:
        cfg = job.config
        assert isinstance(cfg, Config)
        model, _, transform = job.row.partition(" ")
        assert cfg.model.name == models[model]
        assert cfg.transformer.type == (transforms[transform] if transform else "none")
        assert cfg.dataset.name == job.column
        assert cfg.trainer.name == preset and cfg.trainer.resume is True
        assert cfg.seed == job.seed and cfg.logger.group == "g"
        assert Path(cfg.run_dir) == (tmp_path / "table" / "cells" / job.cell / f"seed{job.seed}").resolve()
    assert len({job.run_dir for job in jobs}) == len(jobs)  # no two runs share a folder


def test_user_overrides_reach_every_cell_and_reserved_keys_are_refused(tmp_path: Path) -> None:
    grid = load_grid(GRID)
    cells = select_cells(grid, ["CNN", "ST-FCN TPS"], ["P"])
    jobs = plan_jobs(grid, cells, [3], "quick", ["trainer.lr=0.05"], tmp_path, "g")
    assert [job.config.trainer.lr for job in jobs] == [0.05, 0.05]
    preset_iterations = compose(["trainer=quick"]).trainer.iterations
    assert [job.config.trainer.iterations for job in jobs] == [preset_iterations] * 2  # the preset's
    for word, option in (("seed=1", "--seeds"), ("trainer=paper", "--preset"), ("run_dir=x", "--out")):
        with pytest.raises(TableError, match=option):
            plan_jobs(grid, cells, [0], "quick", [word], tmp_path, "g")


def test_cli_reports_bad_input_without_traceback(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["reproduce-table", "--grid", str(GRID), "--rows", "CNN,Nope"])
    assert result.exit_code == 2 and "unknown row 'Nope'" in result.output and "ST-CNN TPS" in result.output
    result = runner.invoke(app, ["reproduce-table", "--grid", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "grid file" in result.output and "not found" in result.output
    result = runner.invoke(app, ["reproduce-table", "--grid", str(GRID), "--seeds", "0,a"])
    assert result.exit_code == 2 and "--seeds" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# ------------------------------------------------------------------------------------------ aggregation


def test_aggregate_is_mean_and_sample_std() -> None:
    mean, std = mean_std([1.0, 2.0])
    assert mean == pytest.approx(1.5)
    assert std == pytest.approx(math.sqrt(((1.0 - 1.5) ** 2 + (2.0 - 1.5) ** 2) / (2 - 1)))  # 0.7071...
    mean, std = mean_std([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and std == pytest.approx(0.2)
    assert mean_std([1.25]) == (1.25, None)
    assert mean_std([]) == (None, None)


def test_summarise_two_seeds_from_per_seed_records() -> None:
    grid = load_grid(GRID)
    cells = [("CNN", "R"), ("ST-CNN Aff", "R"), ("FCN", "R")]

    def run(row: str, seed: int, status: str, error: float | None = None) -> dict[str, Any]:
        record = {"row": row, "column": "R", "seed": seed, "status": status}
        return record | ({"test_error": error} if error is not None else {"error": "boom"})

    runs = [run("CNN", 0, "done", 1.0), run("CNN", 1, "done", 1.6), run("ST-CNN Aff", 0, "done", 0.9),
            run("ST-CNN Aff", 1, "failed"), run("FCN", 0, "pending"), run("FCN", 1, "pending")]  # fmt: skip
    cnn, st_cnn, fcn = summarise({cell: grid.cells[cell] for cell in cells}, [0, 1], runs)
    assert (cnn.mean, cnn.status) == (pytest.approx(1.3), "done")
    assert cnn.std == pytest.approx(math.sqrt(0.18))  # ((1.0-1.3)^2 + (1.6-1.3)^2) / 1
    assert cnn.diff == pytest.approx(1.3 - 1.2)  # the paper's CNN on R
    assert (st_cnn.mean, st_cnn.std, st_cnn.status) == (0.9, None, "failed")
    assert st_cnn.diff == pytest.approx(0.9 - 0.7)
    assert (fcn.mean, fcn.diff, fcn.status) == (None, None, "pending")


# --------------------------------------------------------------------- orchestration, with a stand-in fit


def fake_fit(cfg: Config) -> dict[str, Any]:
    """Writes what fit writes (config.yaml, summary.json); the error encodes model, dataset and seed."""
    folder = Path(cfg.run_dir)
    if cfg.model.name == "fcn" and cfg.seed == 1:
        raise RuntimeError("stand-in failure")
    table = folder.parents[2]
    done_before = json.loads((table / "results.json").read_text())["runs"]
    error = {"cnn": 1.0, "st_cnn": 0.5, "fcn": 2.0}[cfg.model.name] + 0.1 * cfg.seed
    summary = {"test_error": error, "run_dir": str(folder), "steps": cfg.trainer.iterations,
               "seen_done_before": sum(r["status"] == "done" for r in done_before)}  # fmt: skip
    (folder / "config.yaml").write_text(to_yaml(cfg))
    (folder / "summary.json").write_text(json.dumps(summary))
    return summary


def test_table_with_stand_in_fit_writes_after_each_cell_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "table"
    kwargs: dict[str, Any] = dict(
        rows=["CNN", "ST-CNN Aff", "FCN"], columns=["R"], seeds=[0, 1], preset="smoke",
        overrides=["logger.mode=disabled"], executor="debug", out=out, fit_fn=fake_fit, log=lambda _: None,
    )  # fmt: skip
    report = reproduce(GRID, **kwargs)
    assert (report.fresh, report.resumed, report.failed, report.cached) == (5, 0, 1, 0)
    # results.json is rewritten after every finished run: the k-th run saw k-1 done runs before it.
    seen = sorted(json.loads((Path(r["run_dir"]) / "summary.json").read_text())["seen_done_before"]
                  for r in report.runs if r["status"] == "done")  # fmt: skip
    assert seen == [0, 1, 2, 3, 4]
    by_cell = {x.row: x for x in report.cells}
    assert by_cell["CNN"].mean == pytest.approx(1.05) and by_cell["CNN"].std == pytest.approx(
        math.sqrt(0.005)
    )
    assert by_cell["FCN"].status == "failed" and "stand-in failure" in by_cell["FCN"].failed[1]
    table = (out / "table.md").read_text()
    assert "| CNN | 1.05 ± 0.07 / 1.2 |" in table and "stand-in failure" in table
    # What made it: the smoke budget against the paper's (20 x 32 = 640 images = 1/60000 of 150k x 256 = 38.4M)
    # and its overrides, in the table and the chart's title.
    assert ("Budget: 20 steps of 32 = 640 training images per run, 1/60,000 of the paper's 38,400,000 (**not the "
            "paper's budget**). Overrides: `logger.mode=disabled`.") in table
    from stn.report import budget_line

    assert budget_line({"steps": 150_000, "batch_size": 256, "overrides": []}).endswith(
        "1x of the paper's 38,400,000. Overrides: none.")
    rows = list(csv.DictReader((out / "results.csv").open()))
    # The grid file's row order, whatever order --rows names them in.
    assert [r["cell"] for r in rows] == [cell_name(row, "R") for row in ("FCN", "CNN", "ST-CNN Aff")]
    assert float(rows[2]["ours_mean"]) == pytest.approx(0.55) and float(rows[2]["diff"]) == pytest.approx(
        -0.15
    )
    assert (out / "ours_vs_paper.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each cell's .hydra/overrides.yaml holds the words that composed it: composed again, they give the
    # config the cell trained (up to what the table sets itself: folder, name, resume, W&B group and cell).
    import yaml

    folder = out / "cells" / cell_name("ST-CNN Aff", "R") / "seed1"
    words = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
    assert "trainer=smoke" in words and "logger.mode=disabled" in words and words[-1] == "seed=1"
    again, trained = to_dict(compose(words)), yaml.safe_load((folder / "config.yaml").read_text())
    assert again["model"] == trained["model"] and again["model"]["name"] == "st_cnn"
    for section in ("dataset", "transformer", "seed"):
        assert again[section] == trained[section], section
    assert {**again["trainer"], "resume": True} == trained["trainer"]

    # Rerun: the five finished runs are read back, only the failed one runs again (and fails again).
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*/summary.json")}
    report = reproduce(GRID, **kwargs)
    assert (report.cached, report.fresh, report.failed) == (5, 0, 1)
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*/summary.json")}

    # The same folder with another experiment's settings is refused, naming the difference.
    with pytest.raises(TableError, match=r"trainer.iterations: 20 -> 40.*another --out"):
        reproduce(GRID, **{**kwargs, "overrides": ["logger.mode=disabled", "trainer.iterations=40"]})


def table_runs(root: Path) -> list[dict[str, Any]]:
    """The table's offline W&B folders under root/wandb (one per logging), read back, in the order logged."""
    runs = [read_run(folder, lambda run: run["finished"]) for folder in root.glob("wandb/offline-run-*")]
    return sorted((run for run in runs if run.get("job_type") == "table"), key=lambda run: run["history"][0]["_step"])


def logged_results(run: dict[str, Any]) -> dict[str, str]:
    """cell -> status in the `results` wandb.Table of an offline table run."""
    # results_<step>_<hash>.table.json, one per update of the run: the last one logged
    path = max(run["file"].parent.glob("files/media/table/results_*.table.json"),
               key=lambda path: int(path.name.split("_")[1]))
    logged = json.loads(path.read_text())
    columns = logged["columns"]
    return {row[columns.index("cell")]: row[columns.index("status")] for row in logged["data"]}


def test_table_wandb_run_fills_cell_by_cell_and_stays_one_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped (Ctrl-C) while the second cell trains, the table already has its W&B run, holding the first
    cell; the rerun continues that run (the id kept in results.json), never a second one of the same name."""
    import os

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_NAME", "WANDB_TAGS", "WANDB_SERVICE"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "table"
    kwargs: dict[str, Any] = dict(rows=["CNN", "ST-CNN Aff"], columns=["R"], seeds=[0], preset="smoke",
                                  overrides=["logger.mode=offline"], executor="debug", out=out, log=lambda _: None)

    def ctrl_c_in_second_cell(cfg: Config) -> dict[str, Any]:
        if cfg.model.name == "st_cnn":
            raise KeyboardInterrupt
        return fake_fit(cfg)

    with pytest.raises(KeyboardInterrupt):
        reproduce(GRID, **kwargs, fit_fn=ctrl_c_in_second_cell)
    table_id = json.loads((out / "results.json").read_text())["wandb_id"]
    (first,) = table_runs(tmp_path)
    assert first["id"] == table_id and first["name"] == "table-table" and first["group"] == "table"
    assert logged_results(first) == {"R_cnn": "done", "R_st-cnn-aff": "pending"}
    assert first["summary"]["test_error/R_cnn"] == 1.0 and first["summary"]["paper_test_error/R_cnn"] == 1.2
    assert "test_error/R_st-cnn-aff" not in first["summary"]
    # The table's process does not hand its wandb service to the cells it starts later (Slurm, local jobs).
    assert "WANDB_SERVICE" not in os.environ

    reproduce(GRID, **kwargs, fit_fn=fake_fit)
    runs = table_runs(tmp_path)
    # One offline folder per invocation: the second logged twice (after the cell, and at the end) into one.
    assert {run["id"] for run in runs} == {table_id} and len(runs) == 2
    assert [[row["_step"] for row in run["history"]] for run in runs] == [[1], [2, 3]]  # never below the last step
    assert logged_results(runs[-1]) == {"R_cnn": "done", "R_st-cnn-aff": "done"}
    assert runs[-1]["summary"]["test_error/R_st-cnn-aff"] == 0.5 and "ours_vs_paper/_type" in runs[-1]["history"][-1]
    shaped = max(runs[-1]["file"].parent.glob("files/media/table/ours_paper_*.table.json"),
                 key=lambda path: int(path.name.split("_")[2]))  # ours_paper_<step>_<hash>: the last logged
    assert json.loads(shaped.read_text())["data"] == [["CNN", "1.00 / 1.2"], ["ST-CNN Aff", "0.50 / 0.7"]]

    reproduce(GRID, **kwargs, fit_fn=fake_fit)  # nothing left to run: nothing new to log
    assert len(table_runs(tmp_path)) == 2


# ------------------------------------------------------------------------------- real training, the CLI


def read_offline_run(folder: Path, timeout_s: float = 60.0) -> dict[str, Any]:
    return read_run(folder, lambda run: "group" in run, timeout_s)


@pytest.mark.slow
@pytest.mark.executor
def test_cli_smoke_table_end_to_end_then_nothing_to_rerun(data_env: Path, small_data) -> None:
    out = data_env / "table"
    args = ["reproduce-table", "--grid", str(GRID), "--rows", "CNN,ST-CNN Aff", "--columns", "R",
            "--preset", "smoke", "--executor", "local", "--parallel", "2", "--out", str(out), *small_data]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 runs ran (2 fresh, 0 resumed, 0 failed), 0 already done" in result.output

    summaries = {
        p.parent.parent.name: json.loads(p.read_text()) for p in out.glob("cells/*/seed0/summary.json")
    }
    assert set(summaries) == {"R_cnn", "R_st-cnn-aff"}
    assert all(s["steps"] == 20 and s["dataset"] == "R" for s in summaries.values())
    rows = {r["cell"]: r for r in csv.DictReader((out / "results.csv").open())}
    for cell, paper in (("R_cnn", 1.2), ("R_st-cnn-aff", 0.7)):
        ours = summaries[cell]["test_error"]
        assert float(rows[cell]["ours_mean"]) == pytest.approx(ours, abs=1e-4)
        assert float(rows[cell]["paper"]) == paper
        assert float(rows[cell]["diff"]) == pytest.approx(ours - paper, abs=1e-4)
        assert rows[cell]["status"] == "done" and rows[cell]["ours_std"] == ""  # one seed: no std
    table = (out / "table.md").read_text()
    assert f"| CNN | {summaries['R_cnn']['test_error']:.2f} / 1.2 |" in table
    assert f"| ST-CNN Aff | {summaries['R_st-cnn-aff']['test_error']:.2f} / 0.7 |" in table

    from PIL import Image

    with Image.open(out / "ours_vs_paper.png") as image:
        assert image.format == "PNG" and image.width > 300

    # W&B (offline): the table run and both cells' runs share the group. The table run is one W&B run (its
    # id in results.json), logged after each cell and at the end, all in one offline folder: one invocation.
    runs = [read_run(folder, lambda run: run["finished"]) for folder in (data_env / "wandb").glob("offline-run-*")]
    in_group = [run for run in runs if run["group"] == "table"]
    assert sorted(run["job_type"] for run in in_group) == ["table", "train", "train"]
    (table_run,) = (run for run in in_group if run["job_type"] == "table")
    assert table_run["id"] == json.loads((out / "results.json").read_text())["wandb_id"]
    assert [row["_step"] for row in table_run["history"]] == [1, 2, 3]
    assert [row["cells_done"] for row in table_run["history"]] == [1, 2, 2]
    for cell, summary in summaries.items():
        assert table_run["summary"][f"test_error/{cell}"] == pytest.approx(summary["test_error"])
    last = table_run["file"].parent
    assert "ours_vs_paper/_type" in table_run["history"][-1]
    table_file = max(last.glob("files/media/table/results_*.table.json"),
                     key=lambda path: int(path.name.split("_")[1]))  # results_<step>_<hash>: the last logged
    logged = json.loads(table_file.read_text())
    column = logged["columns"].index("ours_mean")
    cells = {row[logged["columns"].index("cell")]: row[column] for row in logged["data"]}
    assert cells == pytest.approx({cell: s["test_error"] for cell, s in summaries.items()})
    # Each cell's run carries its table, row, column, cell and paper value (config keys) and tags.
    for run in in_group:
        if run["job_type"] != "train":
            continue
        config = run["config"]
        row = {"cnn": "CNN", "st_cnn": "ST-CNN Aff"}[config["model"]["name"]]
        paper = {"CNN": 1.2, "ST-CNN Aff": 0.7}[row]
        assert (config["table"], config["row"], config["column"], config["seed"]) == ("table1", row, "R", 0)
        assert config["paper_test_error"] == paper and config["cell"] == cell_name(row, "R")
        assert {f"row:{row}", "column:R", "seed:0", f"paper:{paper}"} <= set(run["tags"])

    # Rerun: nothing trains, nothing is rewritten, no new W&B run.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*/summary.json")}
    wandb_runs = set((data_env / "wandb").glob("offline-run-*"))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "0 runs ran (0 fresh, 0 resumed, 0 failed), 2 already done" in result.output
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*/summary.json")}
    assert set((data_env / "wandb").glob("offline-run-*")) == wandb_runs


@pytest.mark.slow
def test_cli_resumes_a_half_finished_cell_from_its_checkpoint(data_env: Path, small_data) -> None:
    out = data_env / "table"
    args = ["reproduce-table", "--grid", str(GRID), "--rows", "CNN", "--columns", "R", "--preset", "smoke",
            "--executor", "debug", "--out", str(out), *small_data, "logger.mode=disabled"]  # fmt: skip
    run_dir = out / "cells" / "R_cnn" / "seed0"
    # First call stops the cell after 10 of its 20 steps: a checkpoint and no summary, as after a crash.
    result = CliRunner().invoke(app, [*args, "trainer.stop_after=10"])
    assert result.exit_code == 0, result.output
    assert "1 runs ran (0 fresh, 0 resumed, 0 failed, 1 stopped early" in result.output
    assert (run_dir / "checkpoints" / "last.pt").is_file() and not (run_dir / "summary.json").exists()
    assert next(csv.DictReader((out / "results.csv").open()))["status"] == "pending"

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 runs ran (0 fresh, 1 resumed, 0 failed)" in result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == 10 and summary["steps"] == 20
    logged_steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged_steps == sorted(logged_steps) and logged_steps[-1] == 20  # one continuous history
    row = next(csv.DictReader((out / "results.csv").open()))
    assert row["status"] == "done" and float(row["ours_mean"]) == pytest.approx(
        summary["test_error"], abs=1e-4
    )


@pytest.mark.slow
def test_wandb_mode_disabled_in_the_environment_writes_no_wandb_run(data_env: Path, monkeypatch: pytest.MonkeyPatch, small_data) -> None:
    """WANDB_MODE=disabled (no logger.mode on the command line): neither the cell nor the table's own W&B run
    writes anything, and the table still finishes."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = data_env / "table"
    result = CliRunner().invoke(app, ["reproduce-table", "--grid", str(GRID), "--rows", "CNN", "--columns", "R",
                                      "--preset", "smoke", "--executor", "debug", "--out", str(out), *small_data])
    assert result.exit_code == 0, result.output
    assert "1 runs ran (1 fresh, 0 resumed, 0 failed)" in result.output
    summary = json.loads((out / "cells" / "R_cnn" / "seed0" / "summary.json").read_text())
    assert summary["wandb"] is None
    assert not (data_env / "wandb").exists() and not list(data_env.rglob("offline-run-*"))


def test_a_cell_that_does_not_compose_is_named(tmp_path: Path) -> None:
    """Only the ST-CNN cell is invalid (an ST model without a transformer): the error names it and its words."""
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("name: t\nrows:\n  CNN: [model=cnn]\n  ST-CNN: [model=st_cnn]\n"
                         "columns:\n  R: [dataset=R]\ncells:\n  CNN: {R: 1.2}\n  ST-CNN: {R: 0.7}\n")
    grid = load_grid(grid_file)
    with pytest.raises(TableError, match=r"^cell ST-CNN/R \(model=st_cnn dataset=R trainer=smoke\): .*transformer"):
        plan_jobs(grid, list(grid.cells), [0], "smoke", [], tmp_path / "table", "g")
