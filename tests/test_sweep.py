"""stn.launch.sweep: `stn train` as a Hydra app (-m sweeps through stn.launch.executors, --cfg, hydra.* folder keys, command.txt)."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stn.cli.main import app
from stn.compose import compose
from stn.config import to_dict
from stn.launch.sweep import SweepError, expand, split_hydra

runner = CliRunner()


def test_expand_is_hydras_basic_sweep_the_cartesian_product_in_order() -> None:
    """Comma lists, range() and choice() expand to the product of the values, first key outermost (as
    Hydra's BasicSweeper); plain overrides ride along in every job."""
    got = expand(["dataset=R,RTS", "model=cnn,st_cnn", "seed=range(2)", "trainer=smoke"], multirun=True)
    want = [[f"dataset={d}", f"model={m}", f"seed={s}", "trainer=smoke"]
            for d, m, s in itertools.product(["R", "RTS"], ["cnn", "st_cnn"], [0, 1])]
    assert got == want
    assert expand(["seed=choice(3,5)"], multirun=True) == [["seed=3"], ["seed=5"]]
    assert expand(["dataset=R"], multirun=True) == [["dataset=R"]]  # -m without sweep values: one job


def test_a_sweep_value_without_m_exits_2_naming_m() -> None:
    with pytest.raises(SweepError, match=r"dataset=R,RTS: several values .*add -m"):
        expand(["dataset=R,RTS"], multirun=False)
    result = runner.invoke(app, ["train", "dataset=R,RTS", "model=cnn"])
    assert result.exit_code == 2
    assert "error: dataset=R,RTS: several values (a sweep); add -m (--multirun)" in result.output
    assert "Ambiguous" not in result.output and "Traceback" not in result.output


def test_cfg_job_prints_the_composed_config_as_yaml_without_training(tmp_path: Path) -> None:
    overrides = ["dataset=RTS", "model=st_cnn", "transformer=tps", "trainer.iterations=7", "trainer.lr_step=7",
                 f"runs_dir={tmp_path / 'runs'}"]
    for flags in (["--cfg", "job"], ["--cfg"], ["-c"]):
        result = runner.invoke(app, ["train", *flags, *overrides])
        assert result.exit_code == 0, result.output
        printed = yaml.safe_load(result.output)
        assert printed == to_dict(compose(overrides))
        assert (printed["dataset"]["name"], printed["model"]["name"], printed["transformer"]["type"],
                printed["trainer"]["iterations"]) == ("RTS", "st_cnn", "tps", 7)
    assert not (tmp_path / "runs").exists()  # nothing trained, no folder made

    result = runner.invoke(app, ["train", "--cfg", "all", "--resolve", *overrides])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed["hydra"]["overrides"]["task"] == overrides and printed["hydra"]["mode"] == "RUN"
    assert printed["trainer"]["iterations"] == 7

    result = runner.invoke(app, ["train", "--cfg", "bad", "dataset=R"])
    assert result.exit_code == 2 and "(after --cfg give one of job, hydra, all)" in result.output


def test_cfg_job_of_a_sweep_prints_one_document_per_member(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "-m", "dataset=R,RTS", "model=cnn,fcn", "--cfg", "job",
                                 f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert result.exit_code == 0, result.output
    documents = list(yaml.safe_load_all(result.output))
    assert [(d["dataset"]["name"], d["model"]["name"]) for d in documents] == [
        ("R", "cnn"), ("R", "fcn"), ("RTS", "cnn"), ("RTS", "fcn")]
    assert [d["run_dir"] for d in documents] == [
        str((tmp_path / "sweep" / name).resolve()) for name in ("0-R-cnn", "1-R-fcn", "2-RTS-cnn", "3-RTS-fcn")]
    assert not (tmp_path / "sweep").exists()


def test_hydra_output_dirs_are_the_run_folders(tmp_path: Path) -> None:
    """hydra.run.dir is run_dir (with ${now:...} resolved); hydra.sweep.dir/subdir place a sweep's members."""
    year = dt.datetime.now().strftime("%Y")
    result = runner.invoke(app, ["train", "--cfg", "job", f"hydra.run.dir={tmp_path}/out/${{now:%Y}}"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["run_dir"] == f"{tmp_path}/out/{year}"
    assert runner.invoke(app, ["train", "--cfg", "job", "hydra.job.chdir=false"]).exit_code == 0

    result = runner.invoke(app, ["train", "-m", "seed=1,2", "--cfg", "hydra", f"hydra.sweep.dir={tmp_path}/s",
                                 "hydra.sweep.subdir=${hydra.job.num}_${hydra.job.override_dirname}"])
    assert result.exit_code == 0, result.output
    sweeps = [d["hydra"]["sweep"] for d in yaml.safe_load_all(result.output)]
    assert sweeps == [{"dir": f"{tmp_path}/s", "subdir": f"{n}_seed={s}"} for n, s in ((0, 1), (1, 2))]
    result = runner.invoke(app, ["train", "-m", "seed=1,2", "--cfg", "all", f"hydra.sweep.dir={tmp_path}/s",
                                 "hydra.sweep.subdir=${hydra.job.name}/${hydra.job.num}"])
    assert result.exit_code == 0, result.output
    documents = list(yaml.safe_load_all(result.output))
    assert [d["hydra"]["sweep"]["subdir"] for d in documents] == ["R-cnn/0", "R-cnn/1"]
    assert [d["run_dir"] for d in documents] == [str((tmp_path / "s" / "R-cnn" / n).resolve()) for n in "01"]


@pytest.mark.parametrize(("args", "message"), [
    (["hydra.job.chdir=true"], "hydra.job.chdir=true: stn never changes the working directory"),
    (["-m", "seed=1,2", "hydra.run.dir=x"], "hydra.run.dir=x: a sweep (-m) has one folder per member; use "
                                            "hydra.sweep.dir"),
    (["hydra.sweep.dir=x"], "hydra.sweep.dir=x: applies to -m sweeps only; for one run use hydra.run.dir"),
    (["hydra/launcher=submitit_slurm"], "use --executor local|slurm|debug"),
    (["hydra.verbose=true"], "hydra.verbose=true: not a key stn honours"),
    (["run_dir=a", "hydra.run.dir=b"], "run_dir and hydra.run.dir both name the run folder: give one of them"),
    (["-m", "seed=1,2", "run_dir=a"], "use hydra.sweep.dir=..."),
])
def test_hydra_keys_stn_does_not_honour_are_refused_with_what_to_use(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output


def test_split_hydra_keeps_stn_overrides_in_order() -> None:
    kept, dirs = split_hydra(["dataset=R", "hydra.sweep.dir=s", "seed=1,2", "hydra.sweep.subdir=x"], multirun=True)
    assert kept == ["dataset=R", "seed=1,2"] and (dirs.sweep_dir, dirs.sweep_subdir, dirs.run_dir) == ("s", "x", None)


def test_typed_command_is_argv_when_run_as_stn(monkeypatch: pytest.MonkeyPatch) -> None:
    from stn.cli.common import typed_command

    monkeypatch.setattr("sys.argv", ["/usr/local/bin/stn", "train", "-m", "name=a b"])
    assert typed_command(["ignored"]) == "stn train -m 'name=a b'"
    monkeypatch.setattr("sys.argv", [str(Path("/x/src/stn/__main__.py")), "train", "seed=1"])
    assert typed_command(["ignored"]) == "python -m stn train seed=1"
    monkeypatch.setattr("sys.argv", ["/usr/bin/pytest", "-q"])
    assert typed_command(["stn", "train", "seed=1"]) == "stn train seed=1"


@pytest.mark.slow
def test_single_run_records_its_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_overrides) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", *small_overrides, "hydra.run.dir=one"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "one" / "summary.json").is_file()
    assert (tmp_path / "one" / "command.txt").read_text() == f"stn train {' '.join(small_overrides)} hydra.run.dir=one\n"
    assert "STN_COMMAND" not in os.environ  # restored after the command


@pytest.mark.slow
@pytest.mark.executor
def test_sweep_trains_two_members_through_the_local_executor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_overrides) -> None:
    """`stn train -m model=cnn,fcn`: two runs in submitit's local processes (stn.launch.executors, as a table's cells),
    each in <hydra.sweep.dir>/<num>-<run name> with the sweep's command line; sweep.json says how each ended."""
    monkeypatch.chdir(tmp_path)
    args = ["train", "-m", "model=cnn,fcn", *small_overrides, "hydra.sweep.dir=sweep", "--parallel", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 of 2 runs done, 0 failed, 0 stopped" in result.output
    command = "stn train -m model=cnn,fcn " + " ".join(small_overrides) + " hydra.sweep.dir=sweep --parallel 2"
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert record["command"] == command
    for num, model in enumerate(("cnn", "fcn")):
        folder = tmp_path / "sweep" / f"{num}-R-{model}"
        summary = json.loads((folder / "summary.json").read_text())
        assert (summary["model"], summary["steps"], summary["dataset"]) == (model, 20, "R")
        assert (folder / "command.txt").read_text() == command + "\n"
        member = record["members"][num]
        assert member["status"] == "done" and member["test_error"] == summary["test_error"]
        assert member["overrides"] == [f"model={model}", *small_overrides] and Path(member["run_dir"]) == folder
    assert list((tmp_path / "sweep" / "submitit").glob("*_log.out"))  # the jobs ran as submitit jobs


@pytest.mark.slow
def test_sweep_in_process_reports_the_validation_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_overrides) -> None:
    """--executor debug runs the members in this process; a member on a validation split reports val_error."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "-m", "seed=0", *small_overrides, "++dataset.validation=100", "--executor", "debug"])
    assert result.exit_code == 0, result.output
    (folder,) = tmp_path.glob("runs/multirun/*/*/0-R-cnn")
    summary = json.loads((folder / "summary.json").read_text())
    assert f"val error {summary['val_error']:.2f}% | run folder {folder}" in result.output
    record = json.loads((folder.parent / "sweep.json").read_text())
    assert record["members"][0]["val_error"] == summary["val_error"]


def test_a_stopped_sweep_prints_a_command_that_continues_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_overrides: list[str]) -> None:
    """Members stopped by trainer.stop_after: the printed command, typed as printed, continues both to the end."""
    import shlex

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "-m", "model=cnn,fcn", *small_overrides, "trainer.stop_after=5", "--executor", "debug"])
    assert result.exit_code == 0 and "0 of 2 runs done, 0 failed, 2 stopped" in result.output, result.output
    printed = {line.split("continue with: ")[1].strip() for line in result.output.splitlines() if "continue with: " in line}
    assert len(printed) == 1
    words = shlex.split(printed.pop())
    assert "trainer.resume=true" in words and not any(word.startswith("trainer.stop_after=") for word in words)
    again = runner.invoke(app, words[1:])
    assert again.exit_code == 0 and "2 of 2 runs done" in again.output, again.output
    folders = sorted(tmp_path.glob("runs/multirun/*/*/*-R-*"))
    assert [folder.name for folder in folders] == ["0-R-cnn", "1-R-fcn"]
    for folder in folders:
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["resumed_from"] == 5 and summary["steps"] == 20


def test_sweep_members_share_a_wandb_group_named_by_the_sweep_folder(tmp_path: Path) -> None:
    from stn.launch.sweep import plan

    now = dt.datetime(2026, 12, 7, 21, 5, 0)
    members, sweep_dir = plan(["model=cnn,fcn", f"runs_dir={tmp_path / 'runs'}"], True, now=now)
    assert sweep_dir == tmp_path / "runs" / "multirun" / "2026-12-07" / "210500"
    assert [m.config.logger.group for m in members] == ["multirun-2026-12-07-210500"] * 2
    members, _ = plan(["model=cnn,fcn", f"hydra.sweep.dir={tmp_path / 'mine'}"], True)
    assert {m.config.logger.group for m in members} == {"mine"}
    members, _ = plan(["model=cnn,fcn", "logger.group=chosen"], True)
    assert {m.config.logger.group for m in members} == {"chosen"}
    (single,), _ = plan(["model=cnn"], False)
    assert single.config.logger.group is None  # one run: no group unless asked


def test_every_run_folder_has_hydras_record_and_a_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_overrides: list[str]) -> None:
    """One run and a sweep's members: .hydra/config.yaml (the composed config), overrides.yaml (the run's own
    overrides), hydra.yaml, and train.log (the lines printed, with times); member folders by member number."""
    monkeypatch.chdir(tmp_path)
    one = ["trainer.stop_after=10", "run_dir=one", *small_overrides]
    assert runner.invoke(app, ["train", *one]).exit_code == 0
    hydra = tmp_path / "one" / ".hydra"
    assert yaml.safe_load((hydra / "overrides.yaml").read_text()) == one
    assert yaml.safe_load((hydra / "config.yaml").read_text()) == yaml.safe_load((tmp_path / "one" / "config.yaml").read_text())
    assert yaml.safe_load((hydra / "hydra.yaml").read_text())["hydra"]["job"]["name"] == "R-cnn"
    log = (tmp_path / "one" / "train.log").read_text()
    assert "training R-cnn on cpu" in log and "stopped at step 10/20" in log and log.startswith("[20")
    assert runner.invoke(app, ["train", "trainer.resume=true", "run_dir=one"]).exit_code == 0
    log = (tmp_path / "one" / "train.log").read_text()
    assert "resuming R-cnn" in log and "finished: test error" in log  # appended by the second invocation
    assert yaml.safe_load((hydra / "overrides.yaml").read_text()) == ["trainer.resume=true", "run_dir=one"]

    result = runner.invoke(app, ["train", "-m", "model=cnn,fcn", *small_overrides, "hydra.sweep.dir=sweep", "--executor", "debug"])
    assert result.exit_code == 0, result.output
    for num, model in enumerate(("cnn", "fcn")):
        folder = tmp_path / "sweep" / f"{num}-R-{model}"
        assert yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) == [f"model={model}", *small_overrides]
        assert f"training R-{model}" in (folder / "train.log").read_text()


def test_config_dir_config_name_and_info(tmp_path: Path) -> None:
    """-cd adds a user's folder to the search path (its own group entries and @package _global_ experiments),
    -cn picks a primary config there whose defaults start with stn's `config`; --info says where configs come
    from and what each run composes, and trains nothing."""
    user = tmp_path / "mine"
    (user / "experiment").mkdir(parents=True)
    (user / "model").mkdir()
    (user / "experiment" / "rot.yaml").write_text("# @package _global_\ndefaults:\n  - override /model: st_fcn\n"
                                                  "  - override /transformer: affine\nseed: 5\n")
    (user / "model" / "wide.yaml").write_text("name: fcn\nfc_units: 300\n")
    (user / "paper_rts.yaml").write_text("defaults:\n  - config\n  - override dataset: RTS\n  - _self_\nseed: 9\n")
    result = runner.invoke(app, ["train", "-cd", str(user), "+experiment=rot", "--cfg", "job"])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load(result.stdout)
    assert (config["model"]["name"], config["transformer"]["type"], config["seed"]) == ("st_fcn", "affine", 5)
    result = runner.invoke(app, ["train", "--config-dir", str(user), "model=wide", "--cfg", "job"])
    assert yaml.safe_load(result.stdout)["model"]["fc_units"] == 300
    result = runner.invoke(app, ["train", "-cd", str(user), "-cn", "paper_rts", "--info"])
    assert result.exit_code == 0, result.output
    assert f"Config search path (first match wins):\n  {user.resolve()}\n" in result.stdout
    assert "Primary config: paper_rts" in result.stdout and "choices: dataset=RTS model=cnn" in result.stdout
    assert not (tmp_path / "runs").exists()
    assert runner.invoke(app, ["train", "model=wide", "--info"]).exit_code == 2  # not without -cd
    missing = runner.invoke(app, ["train", "-cd", str(tmp_path / "nowhere"), "--info"])
    assert missing.exit_code == 2 and "no such folder" in missing.stderr
