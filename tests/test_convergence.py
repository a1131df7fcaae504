"""stn.convergence.study: budgets, planning order, the CSV record and its resume, bad inputs (plots: test_convergence_plot)."""

from __future__ import annotations

import multiprocessing
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stn.cli.main import app
from stn.convergence.run import run_study
from stn.convergence.study import (
    PAPER_IMAGES,
    StudyError,
    append_result,
    budget_overrides,
    budget_steps,
    load_study,
    parse_budget,
    plan,
    read_results,
    row_key,
)
from stn.runs import RunFolderBusy
from stn.train import TrainingInterrupted

GRID = Path(__file__).resolve().parents[1] / "experiments" / "table1" / "grid.yaml"
runner = CliRunner()


def write_study(tmp_path: Path, **changes: str) -> Path:
    text = {
        "name": "study", "recipe": "paper-sgd", "grid": str(GRID), "batch_size": "128",
        "overrides": "[trainer=smoke, trainer.device=cpu, logger.mode=disabled]", "seeds": "[0, 1]",
        "results": str(tmp_path / "record" / "results.csv"), "runs_dir": str(tmp_path / "runs"),
        "parts": "\n  - {rows: [CNN, FCN], columns: [E, R], budgets: ['1/50', '1/250']}",
    }  # fmt: skip
    text.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text("".join(f"{key}: {value}\n" for key, value in text.items()))
    return path


def test_budgets_are_fractions_of_the_papers_images() -> None:
    assert PAPER_IMAGES == 150_000 * 256
    assert parse_budget("1/50") == Fraction(1, 50) and parse_budget("0.02") == Fraction(1, 50)
    # 1/250 of 38.4M images at batch 128: the quick preset's 1200 steps; 1/50: 6000; the paper: 150k of 256.
    assert budget_steps("1/250", 128) == 1200 and budget_steps("1/50", 128) == 6000
    assert budget_steps("1", 256) == 150_000
    # the paper's lr shape: drops after one and two thirds of the steps, evaluated at the end
    assert budget_overrides("1/50", 128)[:4] == [
        "trainer.batch_size=128", "trainer.iterations=6000", "trainer.lr_step=2000", "trainer.eval_every=6000"]
    for bad in ("0", "2", "-1/50", "1/0", "fifty"):
        with pytest.raises(StudyError, match="budget"):
            parse_budget(bad)


def test_plan_orders_cells_by_budget_then_seed_and_composes_each(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path))
    cells = plan(study)
    assert len(cells) == 2 * 2 * 2 * 2
    # cheapest budget first, then seed, then the grid's column and row order (R before E, FCN before CNN)
    assert [c.key for c in cells[:5]] == [
        ("FCN", "R", "1/250", 0), ("CNN", "R", "1/250", 0), ("FCN", "E", "1/250", 0), ("CNN", "E", "1/250", 0),
        ("FCN", "R", "1/250", 1)]
    first = cells[0]
    assert first.config.dataset.name == "R" and first.config.model.name == "fcn" and first.config.seed == 0
    assert first.config.trainer.iterations == 1200 and first.config.trainer.lr_step == 400
    assert first.config.trainer.resume and Path(first.config.run_dir) == tmp_path / "runs/R/fcn/1_250/seed0"
    assert first.paper == 2.1  # Table 1, FCN on R
    only = plan(study, rows=["CNN"], columns=["E"], budgets=["1/50"], seeds=[1])
    assert [c.key for c in only] == [("CNN", "E", "1/50", 1)]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seeds": "[0, 0]"}, "repeats a seed"),
        ({"seeds": "[a]"}, "must be a list of integers"),
        ({"batch_size": "0"}, "batch_size=0 must be a positive integer"),
        ({"parts": "\n  - {rows: [CNN], columns: [Q], budgets: ['1/50']}"}, "unknown column 'Q'"),
        ({"parts": "\n  - {rows: [CNN], columns: [R], budgets: ['3']}"}, r"must be in \(0, 1\]"),
        ({"parts": "\n  - {rows: [ST-FCN Proj], columns: [TC], budgets: ['1/50']}"}, "not a cell"),
        ({"grid": "nowhere.yaml"}, "grid file nowhere.yaml not found"),
    ],
)
def test_bad_study_files_name_the_key(tmp_path: Path, changes: dict[str, str], message: str) -> None:
    with pytest.raises(StudyError, match=message):
        load_study(write_study(tmp_path, **changes))


def test_run_records_each_cell_and_a_rerun_trains_only_what_is_missing(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path))
    cells = plan(study, budgets=["1/250"], seeds=[0])
    calls = []

    def fake_fit(cfg):  # test error = 10 * seed + 1 for FCN, 2 for CNN: checks rows land on the right cell
        calls.append((cfg.dataset.name, cfg.model.name))
        if len(calls) == 3:
            raise TrainingInterrupted("stopped", 5, Path(cfg.run_dir), 143)
        return {"test_error": 1.0 if cfg.model.name == "fcn" else 2.0, "device": "cpu", "precision": "float32",
                "wall_time_s": 3.0, "train_time_s": 2.0, "images_per_s": 100.0,
                "recovery/rotation_std_deg": 12.345, "recovery/before/rotation_std_deg": 52.0,
                "recovery/lost_fraction": 0.0, "recovery/rotation_mean_deg": -3.0, "commit": "abc1234"}

    report = run_study(study, cells, fit_fn=fake_fit, log=lambda line: None)
    assert len(report.done) == 2 and report.stopped is not None and report.stopped.key == ("FCN", "E", "1/250", 0)
    rows = read_results(study.results)
    assert [(r["model"], r["dataset"], r["test_error"], r["paper"]) for r in rows] == [
        ("FCN", "R", "1.00", "2.1"), ("CNN", "R", "2.00", "1.2")]
    assert rows[0]["precision"] == "float32" and rows[0]["cpu"] and rows[0]["images"] == str(1200 * 128)
    assert rows[0]["commit"] == "abc1234"  # the code the training ran, as its summary says
    assert rows[0]["recovery"] == "rotation_std_deg=12.3" and rows[0]["recovery_before"] == "rotation_std_deg=52"
    assert rows[0]["threads"] == "" and rows[0]["load"] == ""  # the fake summary has neither
    assert b"\r" not in study.results.read_bytes()  # one line ending, as the committed records have
    calls.clear()
    report = run_study(study, cells, fit_fn=fake_fit, log=lambda line: None)
    assert calls == [("E", "fcn"), ("E", "cnn")] and report.skipped == 2  # the interrupted cell comes back
    assert len(read_results(study.results)) == 4


def test_a_validation_study_trains_on_held_out_digits_and_records_val_error_only(tmp_path: Path) -> None:
    """A study that chooses a recipe (validation: N) never sees the test set: each cell holds out N training
    digits, the record keeps val_error (no test_error column), and the two kinds never share a file."""
    study = load_study(write_study(tmp_path, validation="10000"))
    assert study.error_column == "val_error" and "test_error" not in study.columns
    cells = plan(study, budgets=["1/250"], seeds=[0], rows=["CNN"], columns=["R"])
    assert [c.config.dataset.validation for c in cells] == [10000]
    assert all(c.config.dataset.validation == 0 for c in plan(load_study(write_study(tmp_path)), seeds=[0]))

    def fit_on_validation(cfg):  # what stn.train.fit returns on a validation split: val_error, no test_error
        assert cfg.dataset.validation == 10000
        return {"val_error": 3.25, "device": "cpu", "precision": "float32", "wall_time_s": 3.0, "torch_threads": 1,
                "load_mean": 2.125}

    report = run_study(study, cells, fit_fn=fit_on_validation, log=lambda line: None)
    assert len(report.done) == 1
    header = study.results.read_text().splitlines()[0].split(",")
    assert "val_error" in header and "test_error" not in header
    assert [(r["model"], r["val_error"], r["threads"], r["load"]) for r in read_results(study.results)] == [
        ("CNN", "3.25", "1", "2.12")]
    # a test-set study pointed at that record is refused before anything trains, and the other way round
    test_study = load_study(write_study(tmp_path, results=str(study.results)))
    with pytest.raises(StudyError, match="records validation errors"):
        run_study(test_study, plan(test_study, seeds=[0]), fit_fn=lambda cfg: pytest.fail("trained"), log=print)
    result = runner.invoke(app, ["convergence", "run", "--study", str(write_study(tmp_path, results=str(study.results)))])
    assert result.exit_code == 2 and "records validation errors" in result.output
    result = runner.invoke(app, ["convergence", "plot", "--no-wandb", "--study",
                                 str(write_study(tmp_path, validation="10000"))])
    assert result.exit_code == 2 and "scored on validation digits" in result.output
    with pytest.raises(StudyError, match="validation=-1"):
        load_study(write_study(tmp_path, validation="-1"))


def fake_summary(error: float) -> dict:
    return {"test_error": error, "device": "cpu", "precision": "float32", "wall_time_s": 3.0, "train_time_s": 2.0,
            "images_per_s": 100.0}


def _append_rows(path: str, writer: int, count: int) -> None:
    for index in range(count):
        append_result(Path(path), {"recipe": "r", "dataset": "R", "model": f"w{writer}", "budget": "1/50",
                                   "seed": index, "test_error": "1.00"})


def test_processes_appending_to_one_record_keep_every_row(tmp_path: Path) -> None:
    # Each append reads the whole CSV and replaces it: without the record's lock, two writers interleaving
    # read-modify-write lose rows. Four processes x 40 appends must leave all 160, each once.
    path = tmp_path / "results.csv"
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_append_rows, args=(str(path), writer, 40)) for writer in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    rows = read_results(path)
    assert sorted((r["model"], int(r["seed"])) for r in rows) == [(f"w{w}", i) for w in range(4) for i in range(40)]


def test_a_second_process_on_the_study_is_neither_repeated_nor_a_failure(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path))
    cells = plan(study, budgets=["1/250"], seeds=[0])  # FCN R, CNN R, FCN E, CNN E
    calls = []

    def fit_beside_another_process(cfg):
        calls.append((cfg.dataset.name, cfg.model.name))
        if len(calls) == 1:  # meanwhile the other process records CNN R ...
            append_result(study.results, {"recipe": study.recipe, "dataset": "R", "model": "CNN",
                                          "budget": "1/250", "seed": 0, "test_error": "2.00"})
        if (cfg.dataset.name, cfg.model.name) == ("E", "fcn"):  # ... and is training FCN E (its folder locked)
            raise RunFolderBusy(f"run folder {cfg.run_dir} is in use by process 1 on host")
        return fake_summary(1.0)

    report = run_study(study, cells, fit_fn=fit_beside_another_process, log=lambda line: None)
    assert calls == [("R", "fcn"), ("E", "fcn"), ("E", "cnn")]  # CNN R not trained again
    assert [c.key for c in report.busy] == [("FCN", "E", "1/250", 0)] and not report.failed
    assert report.skipped == 1 and len(report.done) == 2
    assert sorted((r["model"], r["dataset"]) for r in read_results(study.results)) == [
        ("CNN", "E"), ("CNN", "R"), ("FCN", "R")]


def fit_by_error_table(cfg):  # a stand-in for fit in the worker processes: FCN 1.00, CNN 2.00
    if cfg.dataset.name == "E" and cfg.model.name == "cnn":
        raise RunFolderBusy(f"run folder {cfg.run_dir} is in use by process 1 on host")
    return fake_summary(1.0 if cfg.model.name == "fcn" else 2.0)


@pytest.mark.parametrize("executor", ["debug", "local"])
def test_parallel_cells_are_recorded_by_the_study_process(tmp_path: Path, executor: str) -> None:
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the local workers cannot import this file
    study = load_study(write_study(tmp_path))
    cells = plan(study, budgets=["1/250"], seeds=[0])  # FCN R, CNN R, FCN E, CNN E
    lines: list[str] = []
    report = run_study(study, cells, fit_fn=fit_by_error_table, log=lines.append, parallel=2, executor=executor)
    assert sorted(row_key(r) for r in report.done) == sorted(c.key for c in cells[:3])
    assert [c.key for c in report.busy] == [("CNN", "E", "1/250", 0)] and not report.failed and not report.stopped
    rows = read_results(study.results)
    assert sorted((r["model"], r["dataset"], r["test_error"]) for r in rows) == [
        ("CNN", "R", "2.00"), ("FCN", "E", "1.00"), ("FCN", "R", "1.00")]
    assert "2 at a time" in lines[0]
    if executor == "debug":  # a cell recorded by a hand-started process while this one trained it: one row
        again = plan(study, budgets=["1/50"], seeds=[0], rows=["FCN"], columns=["R"])

        def fit_recorded_elsewhere(cfg):
            append_result(study.results, {"recipe": study.recipe, "dataset": "R", "model": "FCN", "budget": "1/50",
                                          "seed": 0, "test_error": "7.00"})
            return fake_summary(1.0)

        report = run_study(study, again, fit_fn=fit_recorded_elsewhere, log=lines.append, parallel=2,
                           executor=executor)
        assert report.skipped == 1 and not report.done
        assert [r["test_error"] for r in read_results(study.results) if r["budget"] == "1/50"] == ["7.00"]
    with pytest.raises(StudyError, match="local or debug"):
        run_study(study, cells, fit_fn=fit_by_error_table, log=lines.append, parallel=2, executor="slurm")


def test_parallel_study_stopped_by_ctrl_c_reports_an_unfinished_cell(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path))
    cells = plan(study, budgets=["1/250"], seeds=[0])

    def fit_until_ctrl_c(cfg):
        if cfg.dataset.name == "E":
            raise KeyboardInterrupt
        return fake_summary(1.0)

    lines: list[str] = []
    report = run_study(study, cells, fit_fn=fit_until_ctrl_c, log=lines.append, parallel=2, executor="debug")
    assert report.stopped is not None and report.stopped.key[1] == "E"
    assert {row_key(r) for r in read_results(study.results)} == {row_key(r) for r in report.done}
    assert all(key[1] == "R" for key in map(row_key, report.done)) and "rerun to continue" in lines[-1]


def test_cli_refuses_bad_arguments_with_one_line(tmp_path: Path) -> None:
    path = write_study(tmp_path)
    for args, message in (
        (["--budgets", "1/3"], "unknown budget '1/3'"),
        (["--seeds", "0,x"], "must be integers"),
        (["--seeds", "1,1"], "repeats a seed"),
        (["--columns", "Q"], "unknown column 'Q'"),
        (["--max-cells", "0"], "--max-cells 0 must be at least 1"),
        (["--parallel", "0"], "--parallel 0 must be at least 1"),
    ):
        result = runner.invoke(app, ["convergence", "run", "--study", str(path), *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["convergence", "run", "--study", str(path), "--dry-run", "--rows", "CNN",
                                 "--columns", "R", "--seeds", "0"])
    assert result.exit_code == 0 and result.output.count("steps  to train") == 2
    assert not (tmp_path / "runs").exists()  # a dry run trains and writes nothing


HEADER = "recipe,dataset,model,budget,images,seed,test_error,paper\n"
GOOD_ROW = "paper-sgd,R,CNN,1/250,153600,0,5.34,1.2\n"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("paper-sgd,R,CNN,1/250,153600,0,abc,1.2\n", "line 3: test_error 'abc' is not a number"),
        ("paper-sgd,R,CNN,1/250,153600,zero,5.0,1.2\n", "line 3: seed 'zero' is not an integer"),
        ("paper-sgd,R,CNN,1/2x50,153600,0,5.0,1.2\n", "line 3: budget '1/2x50' is not a fraction"),
        ("paper-sgd,R,CNN,1/250,153600,0\n", "line 3: 6 fields where the header has 8"),  # a torn write
        ("paper-sgd,R,CNN,1/250,153600,0,5.0,1.2,extra\n", "line 3: 9 fields where the header has 8"),
    ],
)
def test_a_broken_record_row_is_named_by_its_line_before_anything_trains(tmp_path: Path, row: str,
                                                                         message: str) -> None:
    path = write_study(tmp_path)
    record = tmp_path / "record" / "results.csv"
    record.parent.mkdir()
    record.write_text(HEADER + GOOD_ROW + row)
    with pytest.raises(StudyError, match=message):
        read_results(record)
    for command in (["run"], ["run", "--dry-run"], ["plot", "--no-wandb"]):
        result = runner.invoke(app, ["convergence", *command, "--study", str(path)])
        assert result.exit_code == 2, (command, result.output)
        assert message in result.output and "fix or delete that row" in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()
    record.write_text(HEADER + GOOD_ROW)
    assert [r["test_error"] for r in read_results(record)] == ["5.34"]


def test_a_cell_that_does_not_compose_is_named(tmp_path: Path) -> None:
    """Only the ST-CNN cell is invalid (an ST model without a transformer): the study names its row, column, budget."""
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: t\nrows:\n  CNN: [model=cnn]\n  ST-CNN: [model=st_cnn]\n"
                    "columns:\n  R: [dataset=R]\ncells:\n  CNN: {R: 1.2}\n  ST-CNN: {R: 0.7}\n")
    study = load_study(write_study(tmp_path, grid=str(grid),
                                   parts="\n  - {rows: [CNN, ST-CNN], columns: [R], budgets: ['1/250']}"))
    with pytest.raises(StudyError, match=r"^ST-CNN / R at 1/250: .*transformer"):
        plan(study)


# --------------------------------------------------------------------------------- expected time (dry run)


def write_rates(path: Path, rows: list[tuple[str, str, str, str, str]]) -> None:
    """A record with (model, dataset, images_per_s, threads, cpu) rows; the other columns filler."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("recipe,dataset,model,budget,seed,test_error,images_per_s,threads,cpu\n" + "".join(
        f"paper-sgd,{dataset},{model},1/50,{k},1.0,{rate},{threads},\"{cpu}\"\n"
        for k, (model, dataset, rate, threads, cpu) in enumerate(rows)))


def test_rates_are_the_median_of_one_thread_rows_on_this_cpu_kind(tmp_path: Path) -> None:
    from stn.convergence.estimate import one_thread_rates

    here, other = "AMD EPYC (AVX2, 2 cores)", "Intel Xeon (AVX512, 2 cores)"
    record = tmp_path / "results.csv"
    write_rates(record, [("CNN", "R", "100", "1", here), ("CNN", "R", "300", "1", here),
                         ("CNN", "R", "200", "", here),  # no threads recorded: one (older rows)
                         ("CNN", "R", "900", "2", here),  # two threads: another setting, left out
                         ("CNN", "R", "5000", "1", other),  # another CPU, while this one has rows
                         ("FCN", "R", "7000", "1", other), ("FCN", "R", "9000", "1", other)])
    rates = one_thread_rates(record, here)
    assert rates[("CNN", "R")].images_per_s == 200 and rates[("CNN", "R")].rows == 3 and rates[("CNN", "R")].same_cpu
    assert rates[("FCN", "R")].images_per_s == 8000 and not rates[("FCN", "R")].same_cpu  # only other CPUs' rows


def test_wall_time_is_the_cells_in_order_on_the_first_free_queue() -> None:
    from stn.convergence.estimate import duration_text, wall_seconds

    # queue 0 takes 3 then 2 then 2 (free at 3, 5, 7), queue 1 takes 3 then 2 (free at 3, 5): done at 7
    assert wall_seconds([3, 3, 2, 2, 2], 2) == 7
    assert wall_seconds([3, 3, 2, 2, 2], 1) == 12 and wall_seconds([], 2) == 0
    assert wall_seconds([10, 1, 1, 1], 2) == 10  # one long cell bounds it, whatever the others do
    assert duration_text(30 * 60) == "~30 min" and duration_text(3 * 3600) == "~3.0 h"


def test_dry_run_states_each_cells_time_and_the_total_from_the_record(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each cell's time from its own record's rate, else the main study's record's; the total on two cores."""
    import stn.convergence.study as study_module
    from stn.device import machine_name

    cpu = machine_name("cpu")
    (tmp_path / "main").mkdir()
    main = write_study(tmp_path / "main")
    write_rates(tmp_path / "main" / "record" / "results.csv", [("FCN", "R", "1536", "1", cpu)])
    monkeypatch.setattr(study_module, "DEFAULT_STUDY", main)
    path = write_study(tmp_path, parts="\n  - {rows: [CNN, FCN, ST-CNN Aff], columns: [R], budgets: ['1/250']}")
    # 1/250 at batch 128 = 1200 steps = 153,600 images: 1280 s at 120 images/s, 100 s at 1536
    write_rates(tmp_path / "record" / "results.csv", [("CNN", "R", "120", "1", cpu)])
    result = runner.invoke(app, ["convergence", "run", "--study", str(path), "--dry-run", "--seeds", "0"])
    assert result.exit_code == 0, result.output
    cells = {line.split("steps")[0].split()[-2]: line for line in result.output.splitlines() if "steps" in line}
    assert "to train, ~21 min" in cells["CNN"] and "to train, ~2 min" in cells["FCN"], result.output
    assert "no rate recorded" in cells["Aff"]  # ST-CNN Aff: no row in either record
    assert "3 cells to train: ~23 min one cell at a time, ~21 min with 2 at once (--parallel 2); 1 without a " \
           "recorded rate, not counted" in result.output


def fit_diverging_on_cnn(cfg):  # a stand-in for fit: the CNN's loss becomes NaN at step 7, the FCN trains
    from stn.train import TrainingDiverged

    if cfg.model.name == "cnn":
        raise TrainingDiverged(f"{cfg.run_name}: the loss became NaN/inf at step 7", 7)
    return fake_summary(1.0)


@pytest.mark.parametrize("parallel", [1, 2])
def test_a_diverged_seed_is_recorded_as_nan_and_not_trained_again(tmp_path: Path, parallel: int) -> None:
    """A NaN/inf loss replays on resume, so the study records that seed with error nan (it is a result: the
    recipe diverged there) instead of failing it and retrying at every rerun; tables count it, never average it."""
    import cloudpickle

    from stn.convergence.plot import aggregate, diverged_cells, mean_std_text, summary_table

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    study = load_study(write_study(tmp_path))
    cells = plan(study, budgets=["1/250"], columns=["R"])  # FCN and CNN on R, seeds 0 and 1
    lines: list[str] = []
    report = run_study(study, cells, fit_fn=fit_diverging_on_cnn, log=lines.append, parallel=parallel,
                       executor="debug")
    assert sorted(c.key for c in report.diverged) == [("CNN", "R", "1/250", 0), ("CNN", "R", "1/250", 1)]
    assert not report.failed and len(report.done) == 2
    assert any("DIVERGED" in line and "not retried" in line for line in lines)
    rows = read_results(study.results)
    assert sorted((r["model"], r["seed"], r["test_error"]) for r in rows) == [
        ("CNN", "0", "nan"), ("CNN", "1", "nan"), ("FCN", "0", "1.00"), ("FCN", "1", "1.00")]
    again = run_study(study, cells, fit_fn=lambda cfg: pytest.fail("trained again"), log=lines.append)
    assert again.skipped == 4
    assert ("paper-sgd", "R", "CNN", "1/250") not in aggregate(rows)  # no finite seed: no mean
    assert diverged_cells(rows) == {("paper-sgd", "R", "CNN", "1/250"): 2}
    assert "Every seed diverged (loss NaN/inf): paper-sgd R CNN at 1/250 (2 seed(s))" in summary_table(study.results)
    half = [r | {"test_error": "1.50"} if r["model"] == "CNN" and r["seed"] == "0" else r for r in rows]
    assert mean_std_text(aggregate(half)[("paper-sgd", "R", "CNN", "1/250")]) == "1.50 (1 + 1 diverged)"
