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

from stn.cli.main import app

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
    code = "import sys; from stn.cli.main import app; sys.argv[0] = 'stn'; app()"
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


# ------------------------------------------------------------------- untrusted files (issue 32, security)


def test_a_link_planted_in_a_run_folder_is_never_written_through(cwd: Path) -> None:
    """metrics.jsonl or command.txt a symbolic link to another file: refused, the target untouched (stn used to
    truncate it and write its metrics there)."""
    victim = cwd / "victim.txt"
    victim.write_text("precious\n")
    for name in ("metrics.jsonl", "command.txt"):
        folder = cwd / f"run-{name}"
        folder.mkdir()
        (folder / name).symlink_to(victim)
        refused(cwd, ["train", *SMALL, f"run_dir={folder.name}"], "symbolic link")
    assert victim.read_text() == "precious\n"


def test_run_folder_writes_never_follow_a_link(tmp_path: Path) -> None:
    """Below the folder check: an append refuses a link (O_NOFOLLOW), an atomic write replaces the link itself."""
    from stn.runs import RunFolderError, append_metrics, record_command, write_atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(RunFolderError, match="symbolic link"):
        append_metrics(tmp_path / "metrics.jsonl", {"step": 1})
    (tmp_path / "command.txt").symlink_to(victim)
    os.environ["STN_COMMAND"] = "stn train"
    try:
        with pytest.raises(RunFolderError, match="symbolic link"):
            record_command(tmp_path)
    finally:
        del os.environ["STN_COMMAND"]
    (tmp_path / "config.yaml").symlink_to(victim)
    write_atomic(tmp_path / "config.yaml", "seed: 0\n")
    assert victim.read_text() == "precious\n" and not (tmp_path / "config.yaml").is_symlink()


def test_a_users_own_config_and_metrics_are_not_taken_for_a_run(cwd: Path) -> None:
    """A folder is stn's only if its files parse as stn's: a user's config.yaml and metrics.jsonl are not."""
    folder = cwd / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("lr: 0.1\nnotes: my own experiment\n")
    (folder / "metrics.jsonl").write_text("my notes, not JSON\n")
    refused(cwd, ["train", *SMALL, "run_dir=mine"], "config.yaml (not a config stn saved)")
    (folder / "config.yaml").unlink()  # metrics.jsonl alone is no stn run either
    refused(cwd, ["train", *SMALL, "run_dir=mine", "trainer.resume=true"], "metrics.jsonl")


def test_every_file_a_run_folder_may_hold_is_on_the_list(tmp_path: Path) -> None:
    from stn.config import Config, to_yaml
    from stn.runs import RUN_FILES, check_usable

    assert {".hydra", "train.log"} <= RUN_FILES
    folder = tmp_path / "run"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    (folder / "train.log").write_text("training R-fcn\n")
    check_usable(folder)  # what the command writes before config.yaml: an stn run that died while starting
    (folder / "config.yaml").write_text(to_yaml(Config()))
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.3}\n{"step": 2, "lo')  # a crash cut the last line
    check_usable(folder)
    (folder / ".git").mkdir()  # anything else, hidden or not, is not stn's
    with pytest.raises(Exception, match=r"\.git"):
        check_usable(folder)


def test_the_disk_cache_never_runs_code_and_recomputes_a_bad_entry(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone who can write the cache folder must not run code in stn (a pickle's __reduce__), nor choose a
    config: a foreign or malformed entry is computed again."""
    import dataclasses
    import pickle

    from stn import cache
    from stn.compose import compose

    monkeypatch.setenv("STN_CACHE_DIR", str(tmp_path / "cache"))
    overrides = ["model=fcn", "seed=5"]
    expected = compose(overrides)
    assert cache.cached_compose(overrides) == expected
    (entry,) = (tmp_path / "cache" / "compose").iterdir()
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    entry.write_bytes(pickle.dumps(Payload()))
    assert cache.cached_compose(overrides) == expected and not marker.exists()
    entry.write_text('{"stn_cache": 1, "value": {"dataclass": "Nope", "fields": {}}}')  # malformed: recomputed
    assert cache.cached_compose(overrides) == expected
    # a well-formed entry that others may write (group/world-writable) is not trusted
    forged = json.dumps({"stn_cache": cache.FORMAT, "value": cache.encode(dataclasses.replace(expected, seed=99))})
    entry.write_text(forged)
    entry.chmod(0o666)
    assert cache.cached_compose(overrides).seed == 5


STUDY = """name: {name}
grid: {grid}
batch_size: 128
overrides: [{overrides}]
seeds: [0]
results: {results}
runs_dir: {runs_dir}
parts:
  - {{rows: [CNN], columns: [RTS], budgets: ['1/250']}}
"""
TABLE1 = Path(__file__).resolve().parents[1] / "experiments" / "table1" / "grid.yaml"


@pytest.mark.parametrize(
    ("fields", "args", "named"),
    [
        ({"name": "../../escape"}, ["--dry-run"], "name='../../escape'"),
        ({"overrides": "trainer=smoke, dataset=R"}, ["--dry-run"], "override 'dataset=R': parts[0] column RTS sets"),
        ({"overrides": "trainer=smoke, trainer.iterations=5"}, ["--dry-run"], "the study sets trainer.iterations"),
        ({"results": "keep.txt/results.csv"}, [], "results=keep.txt/results.csv"),
        ({"runs_dir": "keep.txt"}, [], "runs_dir=keep.txt"),
    ],
)
def test_bad_study_files_are_refused_before_a_cell_trains(cwd: Path, fields: dict[str, str], args: list[str],
                                                         named: str) -> None:
    values = {"name": "s", "grid": str(TABLE1), "overrides": "trainer=smoke, trainer.device=cpu",
              "results": "record/results.csv", "runs_dir": "runs/s", **fields}
    (cwd / "study.yaml").write_text(STUDY.format(**values))
    before = tree(cwd)
    result = runner.invoke(app, ["convergence", "run", "--study", "study.yaml", *args])
    assert result.exit_code == 2 and named in result.stderr and "Traceback" not in result.output, result.output
    assert tree(cwd) == before


# ------------------------------------------------------------------------------ labels that cannot lie


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["reproduce-table", "--grid", str(TABLE1), "--rows", "CNN", "--columns", "RTS", "dataset=R"],
         "override 'dataset=R': column RTS sets dataset=RTS"),
        (["reproduce-table", "--grid", str(TABLE1), "--rows", "CNN,FCN", "--columns", "R", "model=cnn"],
         "override 'model=cnn': row FCN sets model=fcn"),
        (["engine", "plan", "--grid", str(TABLE1), "--rows", "CNN", "--columns", "RTS", "--override", "dataset=R"],
         "override 'dataset=R': column RTS sets dataset=RTS"),
        (["models", "transformer=tps"], "override 'transformer=tps': row FCN sets transformer=none"),
        (["engine", "bench", "--override", "dataset=RTS"], "override 'dataset=RTS': --dataset R sets dataset=R"),
        (["bench", "--models", "cnn", "--override", "model=fcn"], "override 'model=fcn': model CNN sets model=cnn"),
        # a key under the group a label chooses: another RTS (no rotation), another CNN (other widths)
        (["reproduce-table", "--grid", str(TABLE1), "--rows", "CNN", "--columns", "RTS", "dataset.rotation=0"],
         "override 'dataset.rotation=0': column RTS sets dataset=RTS, which fixes dataset.rotation"),
        (["engine", "plan", "--grid", str(TABLE1), "--rows", "CNN", "--columns", "R", "--override",
          "model.conv_filters=8"], "override 'model.conv_filters=8': row CNN sets model=cnn"),
    ],
)
def test_an_override_of_what_a_label_sets_is_refused(cwd: Path, args: list[str], named: str) -> None:
    refused(cwd, args, named)


# -------------------------------------------------------------- every command's errors: stn engine, bounds


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["engine", "plan", "--grid", "missing.yaml"], "--grid missing.yaml"),
        (["engine", "run", "--grid", "missing.yaml"], "--grid missing.yaml"),
        (["engine", "plan", "--seeds", "-1"], "seed -1 is negative"),
        (["engine", "run", "--seeds", "0,0"], "seed 0 is repeated"),
        (["engine", "plan", "--cost", "bench.jsn"], "--cost bench.jsn: no such file"),
        (["engine", "plan", "--cost", "keep.txt"], "--cost keep.txt: not a cost table"),
        (["engine", "plan", "--budget", "inf"], "--budget inf"),
        (["engine", "run", "--budget", "nan"], "--budget nan"),
        (["engine", "plan", "--flops", "-1"], "--flops -1.0"),
        (["engine", "plan", "--max-k", "0"], "--max-k 0"),
        (["engine", "run", "--state", "keep.txt"], "--state keep.txt"),
        (["engine", "run", "--device", "gpu"], "--device 'gpu'"),
        (["engine", "bench", "--ks", "0"], "--ks '0'"),
        (["engine", "bench", "--ks", "a"], "--ks 'a'"),
        (["engine", "bench", "--kinds", "ResNet"], "--kinds 'ResNet'"),
        (["engine", "bench", "--steps", "0"], "--steps 0"),
        (["engine", "bench", "--out", "."], "--out .: . is a folder"),
        (["engine", "bench", "--override", "trainer.lr=-1"], "trainer.lr=-1.0"),
        (["bench", "--models", "cnn", "--min-turn", "inf"], "--min-turn inf"),
        (["bench", "--models", "cnn", "--rounds", "1000000000"], "--rounds 1000000000"),
        (["recovery", "keep.txt", "--json", "."], "--json .: . is a folder"),
        (["recovery", "keep.txt", "--limit", "20000"], "--limit 20000"),
        (["reproduce-table", "--parallel", "100000"], "--parallel 100000"),
        (["reproduce-table", "--slurm-time", "100000000"], "--slurm-time 100000000"),
    ],
)
def test_every_command_refuses_bad_input_before_any_work(cwd: Path, args: list[str], named: str) -> None:
    refused(cwd, args, named)


def test_an_engine_failure_during_the_run_exits_1_with_one_line(cwd: Path) -> None:
    (cwd / "state").mkdir()
    (cwd / "state" / "results.json").write_text("{not json")
    result = runner.invoke(app, ["engine", "run", "--grid", str(TABLE1), "--rows", "CNN", "--columns", "R",
                                 "--seeds", "0", "--preset", "smoke", "--device", "cpu", "--state", "state"])
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    assert result.exit_code == 1 and "results.json is not JSON" in result.stderr, result.output
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


def sigterm_self(*args: object, **kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises here
    raise AssertionError("SIGTERM did not stop the command")


def test_sigterm_exits_143_in_the_fan_out_commands(cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's table: 128+N for a signal, SIGTERM 143 (reproduce-table and convergence run said 130)."""
    import stn.engine.table_run
    import stn.tables.reproduce
    import stn.train
    from stn.train import TrainingInterrupted

    def run_table_until_stopped(*args: object, stop, **kwargs: object) -> dict:
        """The engine's SIGTERM asks run_table to stop (it then checkpoints its groups in flight and returns)."""
        os.kill(os.getpid(), signal.SIGTERM)
        waited = time.monotonic() + 5
        while not stop() and time.monotonic() < waited:
            time.sleep(0.01)
        assert stop(), "SIGTERM did not reach run_table's stop"
        return {"done": 0, "partial": []}

    monkeypatch.setattr(stn.engine.table_run, "run_table", run_table_until_stopped)
    result = runner.invoke(app, ["engine", "run", "--grid", str(TABLE1), "--rows", "CNN", "--columns", "R",
                                 "--seeds", "0", "--preset", "smoke", "--device", "cpu", "--state", "state",
                                 "--no-record"])
    assert result.exit_code == 143, result.output
    assert "stopped by SIGTERM: the groups in flight are checkpointed in state" in result.stderr

    def terminated_pool(*args: object, **kwargs: object):
        sigterm_self()
        yield  # a generator, as run_jobs is

    monkeypatch.setattr(stn.tables.reproduce, "run_jobs", terminated_pool)
    result = runner.invoke(app, ["reproduce-table", "--grid", str(TABLE1), "--rows", "CNN", "--columns", "R",
                                 "--preset", "smoke", "--executor", "debug", "--out", "table", "logger.mode=disabled"])
    assert result.exit_code == 143, result.output

    def stopped_by_sigterm(cfg):
        raise TrainingInterrupted("stopped (SIGTERM)", 3, Path(cfg.run_dir), 128 + signal.SIGTERM)

    monkeypatch.setattr(stn.train, "fit", stopped_by_sigterm)
    values = {"name": "s", "grid": str(TABLE1), "overrides": "trainer=smoke, trainer.device=cpu",
              "results": "record/results.csv", "runs_dir": "runs/s"}
    (cwd / "study.yaml").write_text(STUDY.format(**values))
    result = runner.invoke(app, ["convergence", "run", "--study", "study.yaml"])
    assert result.exit_code == 143, result.output


def test_a_sweep_cannot_expand_without_limit(cwd: Path) -> None:
    """range() with 10^12 values used to be listed in memory by Hydra's sweeper: refused at once."""
    process = stn("train", "-m", "seed=range(0,1000000000000)", "--cfg", cwd=cwd)
    try:
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 2 and "at most 10,000" in err and "Traceback" not in err
    refused(cwd, ["train", "-m", "trainer.lr=range(0.1,1,0)"], "non-zero step")


# ----------------------------------------------------------------------------------------- CPU precision


@pytest.mark.parametrize(
    ("flags", "cnn", "st_cnn"),
    [
        ("fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni", "float32", "float32"),  # AVX-512, bf16 emulated
        ("fpu sse2 avx2 avx512f avx512bw avx512_bf16", "bf16", "float32"),  # AMD Zen 4
        ("fpu sse2 avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8", "bf16", "bf16"),  # Sapphire Rapids
    ],
)
def test_auto_precision_reads_the_cpus_bf16_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: str,
                                                 cnn: str, st_cnn: str) -> None:
    """oneDNN calls bf16 'supported' on any AVX-512 CPU (emulated: 0.39-0.64x of float32 training on such a
    Xeon); auto must follow the hardware flags instead."""
    import torch

    from stn import device as device_module
    from stn.compose import compose

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: a fake CPU\nflags\t\t: {flags}\n")
    monkeypatch.setattr(device_module, "CPUINFO", cpuinfo, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    cpu = torch.device("cpu")
    for overrides, expected in ((["model=cnn"], cnn), (["model=st_cnn", "transformer=affine"], st_cnn)):
        cfg = compose(["trainer.cpu_precision=auto", *overrides])
        assert device_module.resolve_precision(cfg.trainer, cpu, cfg.model) == expected


# ------------------------------------------------------------------------------ disk full, advice


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names the file being synced through /proc")
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(cwd: Path, data_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import stn.runs
    from stn.checkpoints import load_checkpoint

    real_fsync, checkpoints = os.fsync, []

    def fsync(fd: int) -> None:  # the second checkpoint finds the disk full
        if "last.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            checkpoints.append(fd)
            if len(checkpoints) == 2:
                raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(stn.runs.os, "fsync", fsync)
    run = ["train", *SMALL, f"data_dir={data_dir}", "run_dir=run", "trainer.checkpoint_every=4",
           "trainer.iterations=12", "trainer.lr_step=12"]
    result = runner.invoke(app, run)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert [line[:6] for line in result.stderr.strip().splitlines()] == ["error:"], result.stderr
    assert "the disk is full" in result.stderr and "last.pt" in result.stderr and "kept" in result.stderr
    assert load_checkpoint(cwd / "run" / "checkpoints" / "last.pt", "cpu")["step"] == 4
    assert not list((cwd / "run" / "checkpoints").glob(".*tmp*"))  # no half-written file left behind
    monkeypatch.setattr(stn.runs.os, "fsync", real_fsync)
    assert runner.invoke(app, [*run, "trainer.resume=true"]).exit_code == 0  # space freed: it continues
    assert json.loads((cwd / "run" / "summary.json").read_text())["resumed_from"] == 4


def test_advice_never_loses_data(cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stn.grid import TableError
    from stn.runs import RunFolderError, read_json
    from stn.tables.reproduce import _read_summary

    (cwd / "cell").mkdir()
    summary = cwd / "cell" / "summary.json"
    summary.write_text('{"test_error": 1.')  # cut short
    for read, error in ((_read_summary, TableError), (read_json, RunFolderError)):
        with pytest.raises(error) as raised:
            read(summary)
        assert f"delete {summary}" in str(raised.value) and f"delete {summary.parent} " not in str(raised.value)
        assert "delete its run folder" not in str(raised.value)
    refused(cwd, ["train", "run_dir=d\u00e9j\u00e0"], "run_dir='d\u00e9j\u00e0'")  # not LexerNoViableAltException
    monkeypatch.setenv("STN_DATA_DIR", "")
    refused(cwd, ["train", *SMALL], "STN_DATA_DIR")
