"""P's readings (dataset.corner_frame / corner_direction / folded) against closed forms, and the former default
P (now P_axis) unchanged.

Expected positions are computed here in pixel coordinates with an independent numpy DLT, as in test_data.py.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from geometry import blob, centroid, pixel_homography
from stn.config import ConfigError, DatasetConfig, compose
from stn.data import (
    apply_distortion,
    canvas_corners,
    digit_boxes,
    distort,
    distortion_params,
    draw_distortion,
    forward_points,
    quad_folded,
)

CPU = torch.device("cpu")
READINGS = ("P", "P_axis", "P_image", "P_box20", "P_box", "P_redraw")


@pytest.fixture(scope="module")
def configs() -> dict[str, DatasetConfig]:
    return {name: compose([f"dataset={name}"]).dataset for name in READINGS}








def rectangle_digits(boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """uint8 (N, 28, 28) digits whose ink fills columns x0..x1 and rows y0..y1 (inclusive)."""
    digits = torch.zeros(len(boxes), 28, 28, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        digits[i, y0:y1 + 1, x0:x1 + 1] = 200
    return digits


# ----------------------------------------------------------- the former default P (P_axis), unchanged


def old_p_draw(cfg: DatasetConfig, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The P draw as it was before the readings existed (commit 46d17d3), spelled out: no rotation, a uniform
    scale, no translation, then N(0, corner_std) per axis for the four canvas corners."""
    angle = torch.zeros(batch)
    scale = torch.rand((batch,), generator=generator) * (cfg.scale_max - cfg.scale_min) + cfg.scale_min
    translation = torch.zeros(batch, 2)
    corners = torch.randn(batch, 4, 2, generator=generator) * cfg.corner_std
    return distortion_params(cfg.size, angle, scale, translation, corners)


def test_p_axis_draws_the_bytes_of_the_former_default_p(configs, data_dir):
    from stn.data import load_mnist

    digits = load_mnist(data_dir, train=False)[0][:500]
    cfg = configs["P_axis"]
    assert (cfg.corner_frame, cfg.corner_direction, cfg.folded) == ("canvas", "per_axis", "keep")
    images, params = distort(digits, cfg, torch.Generator().manual_seed(5))
    old = old_p_draw(cfg, len(digits), torch.Generator().manual_seed(5))
    assert set(params) == set(old)  # no new keys either
    for key in old:
        assert torch.equal(params[key], old[key]), key
    assert torch.equal(images, apply_distortion(digits, old, cfg.size))


# ------------------------------------------------------------------------------------------- geometry


def test_digit_boxes_are_the_ink_bounding_boxes():
    boxes = digit_boxes(rectangle_digits([(5, 7, 20, 22), (13, 4, 14, 23), (0, 0, 27, 27)]))
    expected = [(4.5, 6.5, 20.5, 22.5), (12.5, 3.5, 14.5, 23.5), (-0.5, -0.5, 27.5, 27.5)]
    for got, (x0, y0, x1, y1) in zip(boxes, expected, strict=True):
        assert got.tolist() == [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    assert digit_boxes(torch.zeros(1, 28, 28, dtype=torch.uint8))[0].tolist() == \
        [[-0.5, -0.5], [27.5, -0.5], [27.5, 27.5], [-0.5, 27.5]]  # a blank digit: the whole box


def test_forward_points_match_the_rotation_scale_translation_closed_form():
    points = torch.tensor([[[17.0, 10.0], [3.0, 25.0]]], dtype=torch.float64)
    angle, scale, shift, size = 30.0, 0.8, (2.0, -3.0), 42
    as64 = lambda value: torch.tensor(value, dtype=torch.float64)  # noqa: E731
    got = forward_points(size, as64([angle]), as64([scale]), as64([shift]), points)[0]
    a = math.radians(angle)
    for (x, y), (gx, gy) in zip(points[0].tolist(), got.tolist(), strict=True):
        dx, dy = x - 13.5, y - 13.5
        assert gx == pytest.approx(20.5 + shift[0] + scale * (dx * math.cos(a) + dy * math.sin(a)), abs=1e-9)
        assert gy == pytest.approx(20.5 + shift[1] + scale * (-dx * math.sin(a) + dy * math.cos(a)), abs=1e-9)


@pytest.mark.parametrize("box, scale", [((6, 5, 21, 22), 1.0), ((9, 4, 18, 23), 0.8), (None, 0.9)])
def test_a_marked_pixel_lands_where_the_box_homography_says(box, scale):
    """Moving given points (a digit box, or the canvas corners) maps a spot by the homography through them."""
    offsets = np.array([[2.0, -1.5], [-3.0, 1.0], [1.5, 2.5], [-1.0, -2.0]])
    if box is None:
        points = canvas_corners(28, 1).double()
    else:
        x0, y0, x1, y1 = box
        edges = np.array([[x0 - 0.5, y0 - 0.5], [x1 + 0.5, y0 - 0.5], [x1 + 0.5, y1 + 0.5], [x0 - 0.5, y1 + 0.5]])
        points = torch.tensor(13.5 + scale * (edges - 13.5))[None]  # the box after the scaling, in canvas px
    params = distortion_params(28, torch.zeros(1), torch.tensor([scale]), torch.zeros(1, 2),
                               torch.tensor(offsets[None]).float(), corner_points=points.float())
    x, y = 11.0, 16.0
    out = apply_distortion(blob(x, y, sigma=1.0), params, 28)
    corners = points[0].numpy()
    u, v, w = pixel_homography(corners, corners + offsets) @ np.array([13.5 + scale * (x - 13.5),
                                                                       13.5 + scale * (y - 13.5), 1.0])
    got = centroid(out)
    # 0.3 px: a 1 px blob's centroid under a mildly non-affine map (as test_data.py's homography test)
    assert got == pytest.approx((u / w, v / w), abs=0.3)


def test_digit_box_reading_moves_each_digits_own_box(configs):
    digits = rectangle_digits([(6, 5, 21, 22), (12, 4, 15, 23)])
    params = draw_distortion(configs["P_box"], 2, torch.Generator().manual_seed(1), CPU, digits=digits)
    scale = params["scale"].double()
    for i, (x0, y0, x1, y1) in enumerate([(6, 5, 21, 22), (12, 4, 15, 23)]):
        edges = torch.tensor([[x0 - 0.5, y0 - 0.5], [x1 + 0.5, y0 - 0.5], [x1 + 0.5, y1 + 0.5], [x0 - 0.5, y1 + 0.5]],
                             dtype=torch.float64)
        torch.testing.assert_close(params["corner_points"][i].double(), 13.5 + scale[i] * (edges - 13.5),
                                   atol=1e-5, rtol=0)  # float32 storage of values < 28
    with pytest.raises(ValueError, match="digit_box needs the digits"):
        draw_distortion(configs["P_box"], 2, torch.Generator().manual_seed(1), CPU)


@pytest.mark.parametrize("name, low, high", [("P_box20", 3.5, 23.5), ("P_image", -0.5, 27.5)])
def test_box20_and_image_readings_move_their_scaled_box(configs, name, low, high):
    params = draw_distortion(configs[name], 3, torch.Generator().manual_seed(2), CPU)
    scale = params["scale"].double()[:, None, None]
    box = torch.tensor([[low, low], [high, low], [high, high], [low, high]], dtype=torch.float64)
    torch.testing.assert_close(params["corner_points"].double(), 13.5 + scale * (box - 13.5), atol=1e-5, rtol=0)


def test_diagonal_moves_stay_on_the_diagonals(configs):
    n = 4000
    params = draw_distortion(configs["P"], n, torch.Generator().manual_seed(3), CPU)
    offsets = params["corner_offsets"].double()  # (n, 4, 2)
    signs = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)  # outward
    amount = (offsets * signs).sum(-1) / math.sqrt(2)  # signed length along the outward diagonal
    torch.testing.assert_close(offsets, amount[..., None] * signs / math.sqrt(2), atol=1e-5, rtol=0)
    # amount ~ N(0, 5): the std of 16000 normal draws is within 5% with probability 1 - 2e-10 (SE 0.56%)
    assert float(amount.std()) == pytest.approx(5.0, rel=0.05)
    assert abs(float(amount.mean())) < 5.0 * 6 / math.sqrt(amount.numel())  # 6 standard errors
    # with the digit box, along the box's own diagonals (centre -> corner)
    digits = rectangle_digits([(12, 4, 15, 23)] * 8)
    box = draw_distortion(dataclasses.replace(configs["P_box"], corner_direction="diagonal"), 8,
                          torch.Generator().manual_seed(4), CPU, digits=digits)
    points = box["corner_points"].double()
    outward = points - points.mean(1, keepdim=True)
    cross = outward[..., 0] * box["corner_offsets"][..., 1].double() - outward[..., 1] * box["corner_offsets"][..., 0]
    assert float(cross.abs().max()) < 1e-4  # parallel to centre -> corner


def test_quad_folded_by_hand():
    square = torch.tensor([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0]], dtype=torch.float64)
    dent = square.clone()
    dent[2] = torch.tensor([3.0, 3.0])  # the bottom-right corner pulled in past the TR-BL diagonal
    bow_tie = square[[0, 1, 3, 2]]  # BR and BL swapped: self-intersecting
    mirror = square[[1, 0, 3, 2]]  # convex but reflected (counter-clockwise on screen)
    nudged = square + torch.tensor([[1.0, -2.0], [-1.5, 1.0], [2.0, 2.0], [0.5, -1.0]], dtype=torch.float64)
    almost = square.clone()
    almost[2] = torch.tensor([5.2, 5.2])  # pulled in, but still just outside the diagonal (x + y = 10)
    got = quad_folded(torch.stack([square, dent, bow_tie, mirror, nudged, almost]))
    assert got.tolist() == [False, True, True, True, False, False]


def test_redraw_leaves_no_folded_quad_and_keeps_the_others(configs):
    n = 4000
    keep = draw_distortion(configs["P_axis"], n, torch.Generator().manual_seed(6), CPU)
    redraw = draw_distortion(configs["P_redraw"], n, torch.Generator().manual_seed(6), CPU)
    corners = canvas_corners(28, n).double()
    folded_before = quad_folded(corners + keep["corner_offsets"].double())
    assert folded_before.any()  # the test means something: some of these draws fold (about 0.25%)
    assert not quad_folded(corners + redraw["corner_offsets"].double()).any()
    same = ~folded_before
    assert torch.equal(redraw["corner_offsets"][same], keep["corner_offsets"][same])
    assert not torch.equal(redraw["corner_offsets"][~same], keep["corner_offsets"][~same])
    assert torch.equal(redraw["scale"], keep["scale"])


@pytest.mark.parametrize("name", READINGS)
def test_readings_are_reproducible_per_seed(configs, name):
    digits = rectangle_digits([(6, 5, 21, 22), (12, 4, 15, 23), (8, 8, 19, 19)] * 10)
    first, p1 = distort(digits, configs[name], torch.Generator().manual_seed(7))
    again, p2 = distort(digits, configs[name], torch.Generator().manual_seed(7))
    other, _ = distort(digits, configs[name], torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and all(torch.equal(p1[k], p2[k]) for k in p1)
    assert not torch.equal(first, other)


def test_readings_validate():
    assert compose(["dataset=P"]).dataset.corner_direction == "diagonal"
    with pytest.raises(ConfigError, match="corner_frame"):
        compose(["dataset=P", "dataset.corner_frame=ink"])
    with pytest.raises(ConfigError, match="folded"):
        compose(["dataset=P", "dataset.folded=drop"])
    with pytest.raises(ValueError, match="corner_direction"):
        draw_distortion(DatasetConfig(name="x", corner_std=5.0, corner_direction="radial"), 2,
                        torch.Generator(), CPU)
