"""Dataset cards (stn.cards): each statistic against a case with a known answer, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from stn.cards import card_stats, summarise
from stn.cli.main import app
from stn.warp import distortion_params


def gaussian_digit(x: float, y: float, sigma: float) -> torch.Tensor:
    """(1, 28, 28) float64 Gaussian spot centred at pixel (x, y)."""
    rows, cols = torch.meshgrid(torch.arange(28.0, dtype=torch.float64), torch.arange(28.0, dtype=torch.float64),
                                indexing="ij")
    return torch.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma**2))[None]


def one(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


def random_digits(count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    digits = torch.zeros(count, 28, 28, dtype=torch.uint8)
    digits[:, 4:24, 4:24] = (torch.rand(count, 20, 20, generator=generator) * 255).to(torch.uint8)
    return digits


def test_identity_has_size_one_nothing_off_canvas_and_no_displacement():
    digits = random_digits(6)
    for size in (28, 42, 60):  # untranslated, the digit sits whole-pixel at the centre of every canvas
        params = distortion_params(size, torch.zeros(6), torch.ones(6), torch.zeros(6, 2))
        stats = card_stats(digits, params, size)
        # Exact copies but for the float32 storage of the params (size / 28 = 60 / 28 is not a float32): sample
        # points off by < 1e-5 px (relative 6e-8 of coordinates < 100 px), so ink and positions to ~1e-5.
        assert torch.allclose(stats["size"], torch.ones(6, dtype=torch.float64), atol=1e-5, rtol=0)
        assert float(stats["off_canvas"].abs().max()) < 1e-12  # nothing near the canvas edge at all
        assert float(stats["ink_displacement_px"].abs().max()) < 1e-4


@pytest.mark.parametrize("scale", [0.75, 0.9, 1.2])
def test_a_pure_scale_s_has_size_s_and_moves_ink_by_s_minus_one_times_its_radius(scale):
    d = 6.0  # px from the digit centre, along x
    sigma = 2.0
    digit = gaussian_digit(13.5 + d, 13.5, sigma)
    stats = card_stats(digit, distortion_params(28, one(0.0), one(scale), torch.zeros(1, 2)), 28)
    # Bilinear resampling of a sigma = 2 px Gaussian at spacing 1/s <= 1.33 px conserves its ink to ~1e-4
    # (the trapezoid rule on a smooth function); a 0.5% bound on the ink = 0.25% on its square root.
    assert float(stats["size"][0]) == pytest.approx(scale, rel=2.5e-3)
    # Output point q (px from the centre) shows digit point q / s: displacement |q| |1 - 1/s|. Over the shown
    # spot, q ~ N(s d, (s sigma)^2 I) (ink weights), E|q| = |mu| + tau^2 / (2 |mu|) + O(tau^4 / |mu|^3).
    mu, tau = scale * d, scale * sigma
    expected = abs(1 - 1 / scale) * (mu + tau**2 / (2 * mu))
    assert float(stats["ink_displacement_px"][0]) == pytest.approx(expected, abs=abs(1 - 1 / scale) * 0.05)


def test_half_the_ink_pushed_off_the_canvas():
    # A spot symmetric about the digit centre (13.5, 13.5), moved right by 14 whole pixels: centred on the
    # canvas's right edge (27.5), so exactly half its sampled ink lies beyond it, and none is lost elsewhere.
    digit = gaussian_digit(13.5, 13.5, 2.0)
    stats = card_stats(digit, distortion_params(28, one(0.0), one(1.0), torch.tensor([[14.0, 0.0]])), 28)
    assert float(stats["off_canvas"][0]) == pytest.approx(0.5, abs=1e-12)
    assert float(stats["size"][0]) == pytest.approx(1.0, abs=1e-12)
    assert float(stats["ink_displacement_px"][0]) == pytest.approx(14.0, abs=1e-9)  # every pixel moved 14 px


def test_rotation_moves_ink_by_the_chord():
    d, angle = 8.0, 60.0
    digit = gaussian_digit(13.5 + d, 13.5, 0.8)
    stats = card_stats(digit, distortion_params(28, one(0.0) + angle, one(1.0), torch.zeros(1, 2)), 28)
    # A rotation moves a point at radius r by the chord 2 r sin(angle / 2); the spot spans radii d +- 2 px, over
    # which the chord is linear in r, so the ink-weighted mean is the chord at the mean radius (to ~sigma^2 / d).
    assert float(stats["ink_displacement_px"][0]) == pytest.approx(2 * d * math.sin(math.radians(angle / 2)),
                                                                   abs=0.1)


def test_folded_quads_and_corner_displacement():
    digits = random_digits(3)
    offsets = torch.tensor([[[0.0, 0.0]] * 4,
                            [[3.0, 4.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],  # one corner 5 px, convex
                            [[0.0, 0.0], [0.0, 0.0], [-20.0, -20.0], [0.0, 0.0]]])  # BR pulled past the diagonal
    params = distortion_params(28, torch.zeros(3), torch.ones(3), torch.zeros(3, 2), offsets)
    stats = card_stats(digits, params, 28)
    assert stats["folded"].tolist() == [0.0, 0.0, 1.0]
    expected = [0.0, 5.0 / 4, 20 * math.sqrt(2) / 4]
    assert stats["corner_displacement_px"].tolist() == pytest.approx(expected, abs=1e-6)
    assert float(stats["size"][0]) == pytest.approx(1.0, abs=1e-6)  # zero offsets: the identity homography


def test_control_point_displacement():
    offsets = torch.zeros(1, 16, 2)
    offsets[0, 5] = torch.tensor([0.6, 0.8])  # 1 px
    offsets[0, 10] = torch.tensor([-3.0, 0.0])  # 3 px
    params = distortion_params(28, one(0.0), one(1.0), torch.zeros(1, 2), tps_offsets=offsets)
    stats = card_stats(random_digits(1), params, 28)
    assert float(stats["control_displacement_px"][0]) == pytest.approx(4.0 / 16, abs=1e-6)


def test_summarise_quantiles():
    values = torch.arange(101, dtype=torch.float64)  # 0..100: p5 = 5, median = 50, p95 = 95
    assert summarise(values) == {"p5": 5.0, "median": 50.0, "p95": 95.0, "mean": 50.0}


def test_cli_writes_markdown_json_and_png(tmp_path, data_dir):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "card", "dataset=P", f"data_dir={data_dir}", "--out", str(tmp_path),
                                 "--count", "60"])
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "P.json").read_text())
    assert card["draws"] == 60 and card["dataset"] == "P" and 0 <= card["folded_fraction"] <= 1
    assert {"size", "off_canvas", "ink_displacement_px", "corner_displacement_px"} <= card["stats"].keys()
    assert "| digit size" in (tmp_path / "P.md").read_text()
    assert (tmp_path / "P.png").stat().st_size > 1000
    # Its progress on stderr, stage by stage (a default card measures 5000 draws for many seconds).
    assert [line.split(": ", 1)[1].split(" of ")[0].split(" from ")[0] for line in result.stderr.splitlines()] == [
        "reading MNIST's test digits", "distorting 60 test draws", "measured 60/60 draws", "drawing the histograms"]
    bad = runner.invoke(app, ["data", "card", "dataset=P", f"data_dir={data_dir}", "--count", "0"])
    assert bad.exit_code == 2 and "--count 0 must be positive" in bad.output
    wrong = runner.invoke(app, ["data", "card", "dataset=Q"])
    assert wrong.exit_code == 2 and "choices for dataset" in wrong.output
