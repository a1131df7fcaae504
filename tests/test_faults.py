"""The command line under bad input, as a new user would give it: every case ends with a non-zero exit code
(2: fix the command or its inputs; 1: the run failed), no traceback, a message naming the key or option,
and no file changed outside the run folder (the cwd is a fresh folder whose whole tree is compared).

Most cases run in-process through Typer's CliRunner; a few as real processes (a signal, two processes on one
run folder, a batch that would exhaust memory). The whole file takes well under a minute on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stn.cli import app

runner = CliRunner()
SMALL = ["trainer=smoke", "trainer.device=cpu", "logger.mode=disabled", "model=fcn", "dataset.train_limit=256",
         "dataset.test_limit=100"]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root: relative path -> (size, mtime_ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder (default outputs such as runs/ and preview.png would land here)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("a file of the user's\n")
    return tmp_path


def refused(cwd: Path, args: list[str], named: str, code: int = 2) -> str:
    """Run `stn args`; assert the exit code, no traceback, `named` in the message, nothing written."""
    before = tree(cwd)
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert named in result.stderr, result.stderr
    assert all(line.startswith("error:") or line.startswith(" ") or line.startswith("note:")
               for line in result.stderr.strip().splitlines()), result.stderr
    assert tree(cwd) == before  # nothing written, nothing touched
    return result.stderr


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.momentum=-1", "trainer.momentum=-1.0"),
        ("dataset.train_limit=0", "dataset.train_limit=0"),
        ("dataset.test_limit=20000", "dataset.test_limit=20000"),
        ("trainer.batch_size=10000000", "trainer.batch_size=10000000"),
        ("trainer.lr=nan", "trainer.lr=nan"),
        ("trainer.lr=inf", "trainer.lr=inf"),
        ("trainer.lr=0", "trainer.lr=0.0"),
        ("trainer.lr_gamma=0", "trainer.lr_gamma=0.0"),
        ("trainer.lr_gamma=1.5", "trainer.lr_gamma=1.5"),
        ("trainer.weight_decay=-0.1", "trainer.weight_decay=-0.1"),
        ("trainer.iterations=0", "trainer.iterations=0"),
        ("trainer.eval_batch_size=0", "trainer.eval_batch_size=0"),
        ("seed=-3", "seed=-3"),
        ("name=a/b", "name='a/b'"),
        ("name=..", "name='..'"),
        ("dataset.rotation=nan", "dataset.rotation=nan"),
        ("dataset.scale_min=0", "dataset.scale_min=0.0"),
        ("dataset.size=10", "dataset.size=10"),
        ("dataset.clutter=-1", "dataset.clutter=-1"),
        ("transformer.parallel=0", "transformer.parallel=0"),
        ("logger.images=1000", "logger.images=1000"),
        ("model.conv_filters=0", "model.conv_filters=0"),
        ("trainer.device=gpu", "trainer.device='gpu'"),
    ],
)
def test_bad_values_are_refused_before_anything_loads(cwd: Path, override: str, named: str) -> None:
    refused(cwd, ["train", override], named)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["dataset=RTS", "dataset.scale_max=2"], "dataset.scale_max=2.0"),  # the digit leaves its canvas
        (["dataset=P", "dataset.tps_std=1"], "dataset.tps_std=1.0"),
        (["dataset=TC", "dataset.clutter_size=40"], "dataset.clutter_size"),
        (["dataset.scale_min=1.2", "dataset.scale_max=1.1"], "dataset.scale_min=1.2"),
        (["model=st_cnn", "transformer=affine", "transformer.output_size=10"], "transformer.output_size=10"),
        (["model=cnn", "transformer.output_size=30"], "transformer.output_size=30"),
    ],
)
def test_impossible_combinations_name_every_key(cwd: Path, overrides: list[str], named: str) -> None:
    refused(cwd, ["train", *overrides], named)


def test_every_problem_gets_its_own_line(cwd: Path) -> None:
    stderr = refused(cwd, ["train", "trainer.momentum=-1", "dataset.train_limit=0", "name=a/b"], "trainer.momentum")
    assert len([line for line in stderr.splitlines() if line.startswith("error:")]) == 3


def test_unwritable_outputs_are_refused(cwd: Path) -> None:
    refused(cwd, ["train", *SMALL, "run_dir=keep.txt"], "run_dir=keep.txt")  # a file, not a folder
    refused(cwd, ["train", *SMALL, "runs_dir=keep.txt/runs"], "runs_dir=keep.txt/runs")
    refused(cwd, ["train", *SMALL, "run_dir=keep.txt/run"], "run_dir=keep.txt/run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: a read-only folder cannot be made here")
def test_a_read_only_folder_is_refused(cwd: Path) -> None:
    (cwd / "locked").mkdir(mode=0o555)
    refused(cwd, ["train", *SMALL, "run_dir=locked/run"], "not writable")


def test_a_foreign_folder_is_never_written_into(cwd: Path) -> None:
    foreign = cwd / "notes"
    foreign.mkdir()
    (foreign / "config.yaml.bak").write_text("mine")
    (foreign / "metrics.jsonl").write_text("mine too")
    stderr = refused(cwd, ["train", *SMALL, "run_dir=notes"], "holds no stn run")
    assert "run_dir=notes" in stderr
    refused(cwd, ["train", *SMALL, "run_dir=notes", "trainer.resume=true"], "holds no stn run")


def test_picture_commands_check_their_arguments(cwd: Path, data_dir: Path) -> None:
    preview = ["data", "preview", f"data_dir={data_dir}"]
    refused(cwd, [*preview, "--out", "x.gif"], "--out x.gif")
    refused(cwd, [*preview, "--out", "keep.txt/x.png"], "--out keep.txt/x.png")
    refused(cwd, [*preview, "--count", "0"], "--count 0")
    refused(cwd, [*preview, "--count", "100000"], "--count 100000")
    refused(cwd, [*preview, "dataset.test_limit=5", "--count", "6"], "--count 6")
    refused(cwd, ["data", "card", f"data_dir={data_dir}", "--out", "keep.txt/cards"], "--out keep.txt/cards")
    refused(cwd, ["recovery", "keep.txt", "--json", "keep.txt/r.json"], "--json keep.txt/r.json")
    refused(cwd, ["visualize", "missing.pt"], "checkpoint missing.pt")
    refused(cwd, ["visualize", "keep.txt", "--out", "x.bmp"], "--out x.bmp")
    refused(cwd, ["visualize", "keep.txt", "--count", "0"], "--count 0")
    refused(cwd, ["visualize", "keep.txt"], "not a readable PyTorch checkpoint")  # the file it names is wrong


def test_missing_mnist_is_the_users_to_fix(cwd: Path) -> None:
    refused(cwd, ["train", *SMALL, f"data_dir={cwd / 'nowhere'}"], "MNIST not found")


GRID = """name: {name}
rows:
  CNN: [{row}]
columns:
  {column}: [dataset=R]
cells:
  CNN: {{{column}: {paper}}}
"""


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"row": "model=cnn, seed=3"}, "override 'seed=3'"),  # the table sets seeds itself (--seeds)
        ({"row": "model=cnn, run_dir=x"}, "override 'run_dir=x'"),
        ({"paper": "'abc'"}, "cells.CNN.R='abc'"),
        ({"paper": ".nan"}, "cells.CNN.R=nan"),
        ({"paper": "true"}, "cells.CNN.R=True"),
        ({"name": "a/b"}, "name='a/b'"),
        ({"column": "a/b"}, "columns label 'a/b'"),
    ],
)
def test_bad_grid_files_are_refused(cwd: Path, fields: dict[str, str], named: str) -> None:
    values = {"name": "t", "row": "model=cnn", "column": "R", "paper": "1.0", **fields}
    (cwd / "grid.yaml").write_text(GRID.format(**values))
    refused(cwd, ["reproduce-table", "--grid", "grid.yaml", "--preset", "smoke", *SMALL[1:]], named)


@pytest.mark.parametrize(
    ("args", "choices"),
    [
        (["reproduce-table", "--preset", "fast"], "'smoke', 'quick', 'demo', 'paper'"),
        (["reproduce-table", "--executor", "cloud"], "'local', 'slurm', 'debug'"),
        (["data", "preview", "--split", "val"], "'test', 'train'"),
        (["engine", "plan", "--preset", "fast"], "'smoke', 'quick', 'demo', 'paper'"),
        (["engine", "run", "--mode", "fast"], "'vmap', 'loop'"),
        (["engine", "run", "--data", "some"], "'exact', 'block'"),
        (["bench", "engine", "--data", "some"], "'exact', 'block'"),
        (["bench", "--dataset", "XYZ"], "'E', 'P', "),
        (["engine", "bench", "--dataset", "XYZ"], "'E', 'P', "),
    ],
)
def test_options_with_fixed_values_list_them(cwd: Path, args: list[str], choices: str) -> None:
    """A value outside an option's choices is a usage error: exit 2, the option and every choice named,
    nothing written."""
    before = tree(cwd)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.stderr.translate(dict.fromkeys(map(ord, "│╭╮╰╯─"), " ")).split())  # rich's box, unwrapped
    assert f"Invalid value for '{args[-2]}'" in text and f"is not one of {choices}" in text, text
    assert tree(cwd) == before


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--seeds", "0,0"], "seed 0 is repeated"),
        (["--seeds", "a"], "--seeds 'a'"),
        (["--seeds", "-1"], "seed -1 is negative"),
        (["--parallel", "0"], "--parallel 0"),
        (["--rows", "Nope"], "unknown row 'Nope'"),
        (["--out", "keep.txt/table"], "--out=keep.txt/table"),
        (["seed=3"], "override 'seed=3'"),
        (["trainer.lr=-1"], "trainer.lr=-1.0"),
        (["--grid", "missing.yaml"], "grid file missing.yaml not found"),
    ],
)
def test_bad_table_arguments_are_refused(cwd: Path, args: list[str], named: str) -> None:
    grid = Path(__file__).resolve().parents[1] / "experiments" / "table1" / "grid.yaml"
    given = args if "--grid" in args else ["--grid", str(grid), *args]
    refused(cwd, ["reproduce-table", *given], named)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["models", "--dataset", "XYZ"], "--dataset 'XYZ': not one of 'E', 'P', "),
        (["bench", "--models", "resnet"], "--models 'resnet'"),
        (["bench", "--rounds", "0", "--models", "cnn"], "--rounds"),
        (["bench", "data", "--images", "0"], "--images 0"),
        (["bench", "data", "--workers", "x"], "--workers 'x'"),
        (["bench", "data", "--datasets", "Q"], "--datasets 'Q'"),
    ],
)
def test_bad_tool_arguments_are_refused(cwd: Path, args: list[str], named: str) -> None:
    refused(cwd, args, named)


def test_an_iterations_override_says_what_the_schedule_does(cwd: Path) -> None:
    result = runner.invoke(app, ["train", "trainer=quick", "trainer.iterations=300", "--cfg"])
    assert result.exit_code == 0
    assert "trainer.lr_step=400" in result.stderr and "drops" in result.stderr and "never" in result.stderr
    quiet = runner.invoke(app, ["train", "trainer=quick", "trainer.iterations=300", "trainer.lr_step=100", "--cfg"])
    assert quiet.exit_code == 0 and "note:" not in quiet.stderr
    onecycle = runner.invoke(app, ["train", "trainer=demo", "trainer.iterations=300", "--cfg"])  # spans the run
    assert onecycle.exit_code == 0 and "note:" not in onecycle.stderr


# ----------------------------------------------------------------------------------- the run folder


def test_a_resume_below_the_checkpoints_step_is_refused(cwd: Path, data_dir: Path) -> None:
    run = ["train", *SMALL, f"data_dir={data_dir}", "run_dir=run"]
    assert runner.invoke(app, [*run, "trainer.stop_after=8"]).exit_code == 0
    before = tree(cwd)
    result = runner.invoke(app, [*run, "trainer.resume=true", "trainer.iterations=5"])
    assert result.exit_code == 2 and "trainer.iterations=5 is below the step" in result.stderr
    assert tree(cwd) == before  # the checkpoint and metrics are untouched, no summary written
    assert runner.invoke(app, [*run, "trainer.resume=true"]).exit_code == 0  # the right command still works
    assert json.loads((cwd / "run" / "summary.json").read_text())["resumed_from"] == 8


@pytest.mark.subprocess
def test_a_live_lock_is_respected_and_a_dead_ones_taken_over(cwd: Path, data_dir: Path) -> None:
    run = ["train", *SMALL, f"data_dir={data_dir}", "run_dir=run"]
    (cwd / "run").mkdir()
    (cwd / "run" / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    result = runner.invoke(app, run)
    assert result.exit_code == 2 and f"in use by process {os.getppid()}" in result.stderr
    assert not (cwd / "run" / "config.yaml").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (cwd / "run" / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    assert runner.invoke(app, run).exit_code == 0  # the dead process's lock was taken over
    assert not (cwd / "run" / ".lock").exists() and (cwd / "run" / "summary.json").is_file()


@pytest.mark.subprocess
def test_a_failure_during_the_run_exits_1_and_touches_only_its_folder(cwd: Path, data_dir: Path) -> None:
    before = tree(cwd)
    result = runner.invoke(app, ["train", *SMALL, f"data_dir={data_dir}", "run_dir=run", "trainer.lr=1e10"])
    assert result.exit_code == 1 and "NaN/inf at step" in result.stderr and "Traceback" not in result.output
    after = tree(cwd)
    assert {k: v for k, v in after.items() if not k.startswith("run/")} == before
    assert not (cwd / "run" / "summary.json").exists() and not (cwd / "run" / ".lock").exists()


# ---------------------------------------------------------------------------------- real processes


def stn(*args: str, cwd: Path, **kwargs: object) -> subprocess.Popen:
    code = "import sys; from stn.cli import app; sys.argv[0] = 'stn'; app()"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_a_huge_batch_is_refused_at_once_in_a_real_process(cwd: Path) -> None:
    process = stn("train", "trainer.batch_size=10000000", cwd=cwd)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2 and "trainer.batch_size=10000000" in err and "Traceback" not in err


def test_two_processes_never_share_a_run_folder_and_sigterm_checkpoints(cwd: Path, data_dir: Path) -> None:
    args = ["train", *SMALL, f"data_dir={data_dir}", "run_dir=run", "trainer.iterations=100000",
            "trainer.log_every=1", "trainer.checkpoint_every=100000", "trainer.eval_every=100000"]
    first = stn(*args, cwd=cwd)
    try:
        deadline = time.monotonic() + 90
        metrics = cwd / "run" / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        second = stn(*args, "trainer.resume=true", cwd=cwd)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2 and "in use by process" in err and "Traceback" not in err
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 128 + signal.SIGTERM and "SIGTERM" in err and "Traceback" not in err
    assert (cwd / "run" / "checkpoints" / "last.pt").is_file() and not (cwd / "run" / ".lock").exists()
