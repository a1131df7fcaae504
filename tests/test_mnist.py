"""stn.mnist on real MNIST from STN_DATA_DIR: loading, damaged-copy errors, a failed download; build_data and RTS on
real digits; `stn bench data` end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stn.cli.main import app
from stn.compose import compose
from stn.data import build_data, distort
from stn.mnist import MNIST_FILES, MNISTDataError, load_mnist
from stn.warp import apply_distortion, distortion_params

runner = CliRunner()


def linked_copy(source: Path, target: Path, replace: str | None = None) -> Path:
    """A data folder whose files link to `source`'s, except `replace`, which is a real copy (to damage)."""
    raw = target / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        if name == replace:
            shutil.copyfile(source / "MNIST" / "raw" / name, raw / name)
        else:
            (raw / name).symlink_to(source / "MNIST" / "raw" / name)
    return raw


def test_load_real_mnist(data_dir):
    for train, count in ((True, 60_000), (False, 10_000)):
        digits, labels = load_mnist(data_dir, train=train)
        assert digits.shape == (count, 28, 28) and digits.dtype == torch.uint8
        assert labels.shape == (count,) and labels.dtype == torch.int64
        assert sorted(labels.unique().tolist()) == list(range(10))
        assert 30 < float(digits.float().mean()) < 40  # MNIST's mean intensity is ~33 of 255
        assert load_mnist(data_dir, train=train)[0] is digits  # cached in-process


def test_truncated_file_names_the_file_and_the_fix(data_dir, tmp_path):
    raw = linked_copy(data_dir, tmp_path, replace="t10k-labels-idx1-ubyte")
    bad = raw / "t10k-labels-idx1-ubyte"
    bad.write_bytes(bad.read_bytes()[:5000])
    with pytest.raises(MNISTDataError) as info:
        load_mnist(tmp_path, train=False)
    text = str(info.value)
    assert str(bad) in text and "5000 bytes" in text and "10008" in text
    assert "delete" in text and "download=true" in text and "STN_DATA_DIR" in text


def test_same_size_corruption_is_caught_by_md5(data_dir, tmp_path):
    raw = linked_copy(data_dir, tmp_path, replace="t10k-labels-idx1-ubyte")
    bad = raw / "t10k-labels-idx1-ubyte"
    content = bytearray(bad.read_bytes())
    content[100] ^= 0xFF
    bad.write_bytes(bytes(content))
    with pytest.raises(MNISTDataError, match="md5") as info:
        load_mnist(tmp_path, train=False)
    assert str(bad) in str(info.value) and "27ae3e4e09519cfbb04c329615203637" in str(info.value)


def test_missing_folder_says_where_and_how(tmp_path):
    with pytest.raises(MNISTDataError) as info:
        load_mnist(tmp_path / "nowhere", train=True)
    text = str(info.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw" / "train-images-idx3-ubyte") in text
    assert "STN_DATA_DIR" in text and "data_dir=" in text and "download=true" in text


def test_failed_download_is_one_readable_error(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    # A closed local port: the real download code runs and fails fast, with or without internet.
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(MNISTDataError) as info:
        load_mnist(tmp_path, train=True, download=True)
    text = str(info.value)
    assert "could not download" in text and "127.0.0.1" in text and str(tmp_path / "MNIST" / "raw") in text


def test_build_data_on_device_with_limits(data_dir):
    cfg = compose([f"data_dir={data_dir}", "dataset=TC", "trainer=smoke", "++dataset.train_limit=100",
                   "++dataset.test_limit=50"])
    stream, test_set = build_data(cfg, "cpu")
    images, labels = stream.next()
    assert images.shape == (32, 1, 60, 60) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert stream.batches_per_epoch == 3
    assert len(test_set) == 50 and test_set.images.shape == (50, 1, 60, 60)
    assert torch.equal(test_set.labels, load_mnist(data_dir, train=False)[1][:50])


def test_rts_loses_almost_no_ink_of_real_digits(data_dir):
    """MNIST ink lies (almost) inside the 28x28 box's inscribed disc, which the placement rule keeps in 42x42."""
    digits = load_mnist(data_dir, train=True)[0][:5000]
    cfg = compose(["dataset=RTS"]).dataset
    images, params = distort(digits, cfg, torch.Generator().manual_seed(0))
    big = apply_distortion(digits, distortion_params(84, params["angle_deg"], params["scale"], params["translation"]), 84)
    lost = (big.sum((1, 2, 3)) - images.sum((1, 2, 3))) / big.sum((1, 2, 3))
    assert float(lost.mean()) < 1e-4  # measured: ~5e-6
    assert float((lost > 0.01).float().mean()) < 0.005  # measured: ~0.1% of digits lose anything
    assert float(lost.max()) < 0.05


# -------------------------------------------------------------------------------------------------- CLI


def test_cli_bench_data_runs_and_prints_the_table(data_dir):
    result = runner.invoke(app, ["bench", "data", f"data_dir={data_dir}", "--images", "64", "--batch-size", "32",
                                 "--workers", "0", "--datasets", "R,TC", "--threads", "1"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("| R ") or line.startswith("| TC ")]
    assert len(lines) == 2 and all(line.rstrip().endswith("x |") for line in lines)
