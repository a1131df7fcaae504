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
