"""MNIST's files: where they live (torchvision's layout), their integrity, the download, the in-process cache.

`load_mnist(root, train)` returns the digits and labels of one split after checking the four files
(presence and size; the md5 of the requested split's two, via torchvision's integrity helper, cached per
file version), so a missing or damaged copy fails with one `MNISTDataError` (exit code 2) that says what
to do. `download=true` lets torchvision's own MNIST class fetch them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from stn.config import DATA_DIR_ENV, DIGIT, UserError

# name -> (bytes, md5) of the four uncompressed files torchvision's MNIST reads from <root>/MNIST/raw/
MNIST_FILES: dict[str, tuple[int, str]] = {
    "train-images-idx3-ubyte": (47_040_016, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (60_008, "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (7_840_016, "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (10_008, "27ae3e4e09519cfbb04c329615203637"),
}


class MNISTDataError(UserError):
    """MNIST is missing, truncated or corrupt; the message names the path, what was expected and the fix."""


# ----------------------------------------------------------------------------------------------- loading

_VERIFIED: dict[tuple[str, int, int], bool] = {}  # (path, size, mtime_ns) -> md5 matched
_LOADED: dict[tuple[str, bool], tuple[Tensor, Tensor]] = {}


def _fix_hint(root: Path) -> str:
    return (
        f"Fix: point the data folder at a copy holding MNIST/raw/ with the four uncompressed files "
        f"({DATA_DIR_ENV}=/path/to/folder, or the override data_dir=/path/to/folder), or pass download=true "
        f"to let torchvision download them into {root / 'MNIST' / 'raw'} (needs internet)."
    )


def _problems(raw: Path, check_md5: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(missing file names, descriptions of bad files). md5s are cached per (path, size, mtime)."""
    from torchvision.datasets.utils import check_integrity

    missing, bad = [], []
    for name, (size, md5) in MNIST_FILES.items():
        path = raw / name
        if not path.is_file():
            missing.append(name)
            continue
        stat = path.stat()
        if stat.st_size != size:
            bad.append(f"{path} has {stat.st_size} bytes, expected {size} bytes (md5 {md5}): truncated or wrong file")
            continue
        if name not in check_md5:
            continue
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _VERIFIED:
            _VERIFIED[key] = check_integrity(str(path), md5)
        if not _VERIFIED[key]:
            bad.append(f"{path} has the right size ({size} bytes) but not the md5 {md5}: corrupt")
    return missing, bad


def load_mnist(root: str | os.PathLike, train: bool, download: bool = False) -> tuple[Tensor, Tensor]:
    """MNIST digits uint8 (N, 28, 28) and labels int64 (N,), read from torchvision's layout <root>/MNIST/raw.

    The four files are checked (presence and size; md5 of the requested split's two files) before
    torchvision reads them, so a missing or damaged copy fails with one `MNISTDataError` that says what to do.
    Loaded splits are cached in-process.
    """
    root = Path(root).expanduser().resolve()
    cache_key = (str(root), train)
    if cache_key in _LOADED:
        return _LOADED[cache_key]
    raw = root / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    split_files = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    missing, bad = _problems(raw, split_files)
    if bad:
        raise MNISTDataError(
            "MNIST data is damaged:\n  " + "\n  ".join(bad)
            + f"\nFix: delete the bad file(s) and rerun with download=true (needs internet), or point the data "
            f"folder at a good copy ({DATA_DIR_ENV}=/path/to/folder or data_dir=/path/to/folder)."
        )
    if missing:
        if not download:
            gz = [name for name in missing if (raw / f"{name}.gz").is_file()]
            note = f" ({len(gz)} of them are there as .gz: download=true extracts them offline)" if gz else ""
            raise MNISTDataError(
                f"MNIST not found under {root}: missing {', '.join(str(raw / n) for n in missing)}{note}. "
                f"Expected the four uncompressed files {', '.join(MNIST_FILES)} in {raw}. " + _fix_hint(root)
            )
        _download(root)
        missing, bad = _problems(raw, split_files)
        if missing or bad:
            raise MNISTDataError(
                f"torchvision's download into {raw} finished but left the data incomplete "
                f"(missing: {missing}; bad: {bad}). " + _fix_hint(root)
            )
    from torchvision.datasets import MNIST

    try:
        dataset = MNIST(str(root), train=train, download=False)
    except (RuntimeError, OSError, ValueError) as err:
        raise MNISTDataError(f"torchvision could not read MNIST from {raw}: {err}. " + _fix_hint(root)) from None
    digits = dataset.data.to(torch.uint8).contiguous()
    labels = dataset.targets.to(torch.int64).contiguous()
    if digits.shape[1:] != (DIGIT, DIGIT) or len(digits) != len(labels):
        raise MNISTDataError(f"unexpected MNIST shapes in {raw}: digits {tuple(digits.shape)}, labels {tuple(labels.shape)}")
    _LOADED[cache_key] = (digits, labels)
    return digits, labels


def _download(root: Path) -> None:
    from torchvision.datasets import MNIST

    try:
        MNIST(str(root), train=True, download=True)
    except Exception as err:  # noqa: BLE001 - any network/IO failure becomes one readable error
        reason = " ".join(str(err).split())[:600]
        raise MNISTDataError(
            f"download=true: torchvision could not download MNIST into {root / 'MNIST' / 'raw'}: {reason}. "
            f"Fix: check the internet connection, or copy the four uncompressed files there yourself and point "
            f"{DATA_DIR_ENV}=/path/to/folder (or data_dir=...) at the folder holding MNIST/."
        ) from None


