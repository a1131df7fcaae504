"""stn.distortions: the draws fill the paper's ranges, RTS placements keep the digit inside, bad configs refused."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from geometry import synthetic_digits
from stn.data import distort
from stn.distortions import draw_distortion
from stn.warp import apply_distortion, distortion_params

CPU = torch.device("cpu")


def test_drawn_parameters_fill_the_configured_ranges(datasets):
    n = 20_000
    draw = lambda name, pool=0: draw_distortion(datasets[name], n, torch.Generator().manual_seed(11), CPU, pool)  # noqa: E731
    r = draw("R")
    assert r["angle_deg"].abs().max() <= 90 and r["angle_deg"].min() < -89.5 and r["angle_deg"].max() > 89.5
    assert bool((r["scale"] == 1).all()) and bool((r["translation"] == 0).all())

    rts = draw("RTS")
    assert rts["angle_deg"].abs().max() <= 45 and rts["angle_deg"].min() < -44.7 and rts["angle_deg"].max() > 44.7
    assert rts["scale"].min() >= 0.7 and rts["scale"].max() <= 1.2
    assert rts["scale"].min() < 0.705 and rts["scale"].max() > 1.195
    room = 21 - 14 * rts["scale"]  # px each way that keeps the scaled 28x28 box inside 42x42
    assert bool((rts["translation"].abs() <= room[:, None] + 1e-5).all())
    assert float((rts["translation"].abs() / room[:, None]).max()) > 0.999

    for name in ("P", "E"):
        scale = draw(name)["scale"]
        assert scale.min() >= 0.75 and scale.max() <= 1.0 and scale.min() < 0.752 and scale.max() > 0.998
    # P stretches each corner by one N(0, 5) amount along its diagonal, so each axis gets amount / sqrt(2);
    # P_axis moves each corner by N(0, 5) per axis
    for name, axis_std in (("P", 5.0 / math.sqrt(2)), ("P_axis", 5.0)):
        corners = draw(name)["corner_offsets"]
        assert corners.shape == (n, 4, 2)
        assert float(corners.std()) == pytest.approx(axis_std, rel=0.02) and abs(float(corners.mean())) < 0.05
    tps = draw("E")["tps_offsets"]
    assert tps.shape == (n, 16, 2)
    assert float(tps.std()) == pytest.approx(1.5, rel=0.02) and abs(float(tps.mean())) < 0.02

    tc = draw("TC", 500)
    top_left = tc["translation"] + 16
    assert top_left.min() == 0 and top_left.max() == 32
    assert tc["clutter_index"].min() == 0 and tc["clutter_index"].max() == 499
    assert tc["clutter_crop"].min() == 0 and tc["clutter_crop"].max() == 22
    assert tc["clutter_position"].min() == 0 and tc["clutter_position"].max() == 54


def test_rts_keeps_a_disc_digit_inside_the_canvas(datasets):
    # Ink within radius 12.5 of the centre (+1 px of bilinear support): the scaled box rule keeps it all in.
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    disc = ((((cols - 13.5) ** 2 + (rows - 13.5) ** 2) <= 12.5**2).float() * 255).to(torch.uint8)
    digits = disc.expand(3000, 28, 28)
    cfg = datasets["RTS"]
    images, params = distort(digits, cfg, torch.Generator().manual_seed(0))
    big = apply_distortion(digits, distortion_params(84, params["angle_deg"], params["scale"], params["translation"]), 84)
    # The 42 grid's pixel centres are the central 42x42 of the 84 grid's, so this crop is the same image...
    torch.testing.assert_close(big[..., 21:63, 21:63], images, atol=1e-5, rtol=0)
    # ...and nothing of the digit falls outside it.
    lost = big.sum((1, 2, 3)) - images.sum((1, 2, 3))
    assert lost.abs().max() < 1e-3
    room = 21 - 14 * params["scale"][:, None]
    assert float((params["translation"].abs() / room).max()) > 0.99  # placements do reach the canvas edges


def test_tc_without_clutter_source_is_an_error(datasets):
    with pytest.raises(ValueError, match="clutter_source"):
        distort(synthetic_digits(2), datasets["TC"], torch.Generator().manual_seed(0))


def test_bad_dataset_configs_are_rejected(datasets):
    both = dataclasses.replace(datasets["P"], tps_std=1.0)
    with pytest.raises(ValueError, match="corner_std.*tps_std"):
        distort(synthetic_digits(2), both, torch.Generator())
    too_big = dataclasses.replace(datasets["RTS"], scale_max=2.0)
    with pytest.raises(ValueError, match="scale_max"):
        distort(synthetic_digits(2), too_big, torch.Generator())


def test_different_batches_get_different_distortions(datasets):
    digits = synthetic_digits(1, seed=9).expand(2, 28, 28)
    generator = torch.Generator().manual_seed(0)
    images, params = distort(digits, datasets["E"], generator)
    assert not torch.equal(images[0], images[1])
    assert not torch.equal(params["tps_offsets"][0], params["tps_offsets"][1])
