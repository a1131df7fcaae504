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
