"""stn.bench.data: the torchvision reference draws what our datasets draw (shapes, ranges, plain = the digit
itself, TC's clutter never darkens the digit), and a tiny `bench_data` run returns a well-formed row. Timings
are not asserted (experiments/bench/data.md)."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from stn.bench.data import ReferenceDistortion, bench_data, format_data_table


def pil_digit(seed: int = 0) -> tuple[Image.Image, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    digit = torch.zeros(28, 28, dtype=torch.uint8)
    digit[6:22, 9:19] = torch.randint(1, 256, (16, 10), generator=generator, dtype=torch.uint8)
    return Image.fromarray(digit.numpy()), digit  # uint8 (28, 28): PIL mode L


@pytest.mark.parametrize("name", ["plain", "R", "RTS", "P", "E", "TC"])
def test_reference_images_have_the_datasets_canvas_and_range(name, datasets):
    cfg = datasets[name]
    image, digit = pil_digit()
    random.seed(0)
    pool = torch.stack([pil_digit(seed)[1] for seed in range(1, 9)]) if cfg.clutter else None
    out = ReferenceDistortion(cfg, pool)(image)
    assert out.shape == (1, cfg.size, cfg.size) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1 and float(out.sum()) > 0
    if name == "plain":
        # x / 255 or x * (1 / 255): at most one float32 rounding apart, 2^-23 for values up to 1
        torch.testing.assert_close(out[0], digit.float() / 255, rtol=0, atol=2.0**-23)
    if name == "TC":  # the whole digit is pasted somewhere, and clutter only ever brightens it
        d = digit.float() / 255
        found = [(y, x) for y in range(cfg.size - 27) for x in range(cfg.size - 27)
                 if bool((out[0, y:y + 28, x:x + 28] >= d).all())]
        assert found


def test_a_tiny_bench_data_run_gives_one_row_per_dataset(data_dir):
    rows = bench_data(str(data_dir), images=64, batch_size=32, workers=(0,), datasets=("plain", "R"),
                      min_seconds=0.0, threads=1)
    assert [row["dataset"] for row in rows] == ["plain", "R"]
    for row in rows:
        assert row["ours_cpu"] > 0 and row["ref_w0"] > 0
        assert row["ratio"] == pytest.approx(row["ours_cpu"] / row["ref_w0"])
    table = format_data_table(rows, workers=(0,))
    assert table.splitlines()[0].startswith("| dataset | ours CPU | ours CUDA | torchvision, 0 workers")
    assert len(table.splitlines()) == 4


def test_clutter_without_a_pool_is_refused_when_built_not_mid_loader(datasets):
    with pytest.raises(ValueError, match="clutter needs a pool"):
        ReferenceDistortion(datasets["TC"])
