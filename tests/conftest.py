"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real MNIST root from STN_DATA_DIR; a clear failure (not a skip) when it is missing."""
    root = os.environ.get("STN_DATA_DIR")
    if not root or not (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.fail("these tests read real MNIST: set STN_DATA_DIR to the folder holding MNIST/raw/ (see README)")
    return Path(root)


@pytest.fixture(autouse=True, scope="session")
def _stn_cache(tmp_path_factory: pytest.TempPathFactory):
    """stn's disk cache (stn.cache) in a folder of this test session, never the user's ~/.cache/stn."""
    patch = pytest.MonkeyPatch()
    patch.setenv("STN_CACHE_DIR", str(tmp_path_factory.mktemp("stn-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def _wandb_data_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """W&B stages logged artifacts (checkpoints, cards, tables) in its data dir until `wandb sync` uploads
    them; offline test runs are never synced, so their copies go to a session folder, not ~/.local/share/wandb.
    Set in the environment so the table's local-executor workers inherit it."""
    if "WANDB_DATA_DIR" in os.environ:
        return
    os.environ["WANDB_DATA_DIR"] = str(tmp_path_factory.mktemp("wandb-data"))


@pytest.fixture(scope="session")
def mnist(data_dir: Path):
    """MNIST's training split (digits uint8 (60000, 28, 28), labels (60000,))."""
    from stn.mnist import load_mnist

    return load_mnist(data_dir, train=True)


@pytest.fixture(scope="session")
def datasets():
    """The composed DatasetConfig of every dataset, by name (plain, R, RTS, P, P_axis, E, TC)."""
    from stn.compose import compose

    return {name: compose([f"dataset={name}"]).dataset for name in ("plain", "R", "RTS", "P", "P_axis", "E", "TC")}


# The fast override list: a seconds-long CPU run on slices of real MNIST (smoke schedule: 20 steps of 32). "++"
# so the same words work on the command line (stn train, stn reproduce-table), where Hydra needs it for keys
# the config group may not list.
SMALL_DATA = ("++dataset.train_limit=512", "++dataset.test_limit=200")
SMALL_RUN = ("trainer=smoke", "trainer.device=cpu", *SMALL_DATA)


@pytest.fixture(scope="session")
def small_overrides() -> list[str]:
    """SMALL_RUN with W&B off: the words of a seconds-long run, for commands (stn train -m, reproduce-table)."""
    return [*SMALL_RUN, "logger.mode=disabled"]


@pytest.fixture
def small(tmp_path: Path):
    """small(*overrides, wandb_from_env=False) -> a composed Config of a seconds-long CPU run (SMALL_RUN) with its
    runs under tmp_path/runs and W&B off (unless wandb_from_env: then WANDB_MODE and logger.* decide)."""
    from stn.compose import compose

    def make(*overrides: str, wandb_from_env: bool = False):
        quiet = [] if wandb_from_env else ["logger.mode=disabled"]
        return compose([*SMALL_RUN, *quiet, f"runs_dir={tmp_path / 'runs'}", *overrides])

    return make


@pytest.fixture(scope="session")
def small_data() -> list[str]:
    """SMALL_DATA alone: for tables, which set the trainer preset themselves."""
    return list(SMALL_DATA)


@pytest.fixture(autouse=True)
def _no_kept_wandb_run():
    """A W&B run a command keeps open for its invocation (stn.tracking.kept_run) ends with the test: in a CLI
    process the exit finishes it, in this one it would otherwise leak into the next test's runs."""
    yield
    import sys

    tracking = sys.modules.get("stn.tracking")
    if tracking is not None:
        tracking.finish_all_kept()
