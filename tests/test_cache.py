"""stn.cache: composed configs and parameter counts kept on disk, keyed by arguments, code, conf/ and env."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stn import cache
from stn.cache import cached_compose
from stn.compose import compose
from stn.config import ConfigError
from stn.tables.parameters import cached_parameter_table

OVERRIDES = ["dataset=RTS", "model=st_cnn", "transformer=tps", "trainer.iterations=77", "seed=3"]


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def entries(folder: Path, kind: str = "compose") -> list[Path]:
    return sorted((folder / kind).glob("*.json"))


def test_a_hit_is_the_composed_config_without_composing(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = cached_compose(OVERRIDES)
    assert first == compose(OVERRIDES) and len(entries(folder)) == 1

    def fail(overrides):
        raise AssertionError("composed again")

    monkeypatch.setattr(cache, "compose_many", fail)
    assert cached_compose(OVERRIDES) == first
    with pytest.raises(AssertionError):  # other overrides: a miss
        cached_compose([*OVERRIDES, "seed=4"])


def test_a_user_config_dir_is_part_of_the_key(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`stn train --config-dir DIR`: DIR's files key the entry, so an edit between two commands is a miss and
    no edit a hit."""
    from stn.compose import user_config_set

    mine = tmp_path / "mine" / "trainer" / "mine.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text("defaults:\n  - quick\n  - _self_\nlr: 0.123\n")
    with user_config_set(tmp_path / "mine", None):
        assert cached_compose(["trainer=mine"]).trainer.lr == 0.123
        mine.write_text(mine.read_text().replace("0.123", "0.456"))
        assert cached_compose(["trainer=mine"]).trainer.lr == 0.456
        assert len(entries(folder)) == 2
        monkeypatch.setattr(cache, "compose_many", lambda overrides: pytest.fail("composed again"))
        assert cached_compose(["trainer=mine"]).trainer.lr == 0.456
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="mine"):  # without DIR its entries are not served: no trainer `mine`
        cached_compose(["trainer=mine"])


def test_the_environment_code_and_interpolations_are_part_of_the_key(folder: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_PROJECT", "first")
    assert cached_compose(OVERRIDES).logger.project == "first"
    monkeypatch.setenv("WANDB_PROJECT", "second")  # read by conf/logger/wandb.yaml
    assert cached_compose(OVERRIDES).logger.project == "second"
    monkeypatch.setenv("STN_DATA_DIR", "/elsewhere")
    assert cached_compose(OVERRIDES).data_dir == "/elsewhere"
    assert len(entries(folder)) == 3
    monkeypatch.setattr(cache, "code_digest", lambda kind="": "edited source")  # any edit of stn or conf/: a miss
    cached_compose(OVERRIDES)
    assert len(entries(folder)) == 4
    monkeypatch.setenv("STN_TEST_NAME", "n")
    assert cached_compose(["name=${oc.env:STN_TEST_NAME}"]).name == "n"  # interpolations: never cached
    assert len(entries(folder)) == 4


def test_errors_are_not_cached_and_a_broken_entry_is_recomputed(folder: Path) -> None:
    for _ in range(2):
        with pytest.raises(ConfigError, match="iterashuns"):
            cached_compose(["trainer.iterashuns=3"])
    assert entries(folder) == []
    cached_compose(OVERRIDES)
    (entry,) = entries(folder)
    entry.write_bytes(b"not a pickle")
    assert cached_compose(OVERRIDES) == compose(OVERRIDES)


def test_off_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STN_CACHE_DIR", "off")
    assert cache.cache_dir() is None
    assert cached_compose(OVERRIDES) == compose(OVERRIDES)
    monkeypatch.delenv("STN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "stn"


def test_prune_keeps_the_newest(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "MAX_ENTRIES", 4)
    for seed in range(5):
        cached_compose([f"seed={seed}"])
    assert len(entries(folder)) == 4 // 2  # at 5 > MAX_ENTRIES files, the oldest go down to half of it


@pytest.mark.subprocess
def test_parameter_table_hit_imports_neither_torch_nor_models(folder: Path) -> None:
    """The rows are stn.tables.parameters.parameter_table's; a second process reads them back without torch."""
    from dataclasses import asdict

    from stn.tables.parameters import parameter_table

    rows = cached_parameter_table(["R"], ["model.param_budget=150000"])
    assert rows == [asdict(row) for row in parameter_table(("R",), ["model.param_budget=150000"])]
    code = ("import sys; from stn.tables.parameters import cached_parameter_table as t; "
            "rows = t(['R'], ['model.param_budget=150000']); print(len(rows), 'torch' in sys.modules, "
            "'stn.models' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(rows)), "False", "False"]


def test_engine_plan_is_printed_again_from_the_cache(folder: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`stn engine plan` prints the same lines from the cache; an edited grid file is planned afresh."""
    from typer.testing import CliRunner

    from stn.cli import engine as engine_cli
    from stn.cli.main import app

    grid = tmp_path / "grid.yaml"
    grid.write_text((Path(__file__).resolve().parents[1] / "experiments" / "table1" / "grid.yaml").read_text())
    args = ["engine", "plan", "--grid", str(grid), "--preset", "smoke", "--rows", "CNN", "--columns", "R",
            "--seeds", "0", "--no-paths"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0 and "1 groups, 1 models" in first.output, first.output

    def fail(*args, **kwargs):
        raise AssertionError("planned again")

    monkeypatch.setattr(engine_cli, "_plan_lines", fail)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.output == first.output
    grid.write_text(grid.read_text() + "\n# edited\n")
    assert isinstance(CliRunner().invoke(app, args).exception, AssertionError)


@pytest.mark.subprocess
def test_compose_sources_list_every_module_composition_imports() -> None:
    """A composed config is keyed on COMPOSE_SOURCES only: they must be all of stn that stn.compose loads."""
    code = "import sys, stn.compose; print(' '.join(sorted(m for m in sys.modules if m.startswith('stn.'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(f"{name.removeprefix('stn.')}.py" for name in loaded) == sorted(cache.COMPOSE_SOURCES)


def test_composed_configs_survive_edits_outside_composition(tmp_path: Path) -> None:
    import shutil

    from stn.compose import conf_dir

    package, conf = tmp_path / "stn", tmp_path / "conf"
    shutil.copytree(Path(cache.__file__).parent, package)
    shutil.copytree(conf_dir(), conf)

    def digests() -> tuple[str, str]:
        """(composed-config digest, full digest) of the copies as they are now."""
        cache._digest.cache_clear()
        return (cache._digest(str(conf), str(package), cache.COMPOSE_SOURCES),
                cache._digest(str(conf), str(package), None))

    def edit(path: Path) -> tuple[str, str]:
        path.write_text(path.read_text() + "\n# edited\n")
        return digests()

    start = digests()
    train = edit(package / "train.py")
    assert train[0] == start[0] and train[1] != start[1]  # composed configs kept, parameter counts recomputed
    validation = edit(package / "validation.py")
    assert validation[0] != train[0] and validation[1] != train[1]
    yaml = edit(conf / "dataset" / "R.yaml")
    assert yaml[0] != validation[0] and yaml[1] != validation[1]
    cache._digest.cache_clear()
