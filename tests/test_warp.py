"""stn.warp on synthetic digits: geometry against closed-form pixel maps, the whole-pixel paste, clutter.

Expected positions are computed here in pixel coordinates (pixel centres at integers, the canvas centre at
(S - 1) / 2), independently of the normalised-coordinate code in `stn.warp`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geometry import blob, centroid, one, pixel_homography, synthetic_digits
from stn.compose import compose
from stn.data import distort
from stn.distortions import draw_distortion, draws_whole_pixels
from stn.spatial import sample
from stn.warp import apply_distortion, distortion_params, source_grid

CPU = torch.device("cpu")


def test_rotation_by_90_degrees_moves_a_pixel_exactly():
    digit = torch.zeros(1, 28, 28)
    digit[0, 5, 20] = 1.0  # row 5, column 20: up and to the right of the centre (13.5, 13.5)
    params = distortion_params(28, one(90.0), one(1.0), torch.zeros(1, 2))
    out = apply_distortion(digit, params, 28)[0, 0]
    # Counter-clockwise on screen (y down): (dx, dy) = (6.5, -8.5) -> (dy, -dx) = (-8.5, -6.5) -> column 5, row 7.
    assert out[7, 5] == pytest.approx(1.0, abs=1e-5)
    assert out.sum() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    "angle, scale, shift, size",
    [(30.0, 1.0, (0.0, 0.0), 28), (-70.0, 1.0, (0.0, 0.0), 28), (45.0, 1.2, (3.0, -2.5), 42),
     (-20.0, 0.7, (-9.0, 8.0), 42), (0.0, 1.0, (12.0, -16.0), 60)],
)
def test_rotation_scale_translation_match_the_closed_form(angle, scale, shift, size):
    x0, y0 = 17.0, 10.0
    params = distortion_params(size, one(angle), one(scale), torch.tensor([shift]))
    out = apply_distortion(blob(x0, y0), params, size)
    a = math.radians(angle)
    dx, dy = x0 - 13.5, y0 - 13.5
    centre = (size - 1) / 2
    expected_x = centre + shift[0] + scale * (dx * math.cos(a) + dy * math.sin(a))
    expected_y = centre + shift[1] + scale * (-dx * math.sin(a) + dy * math.cos(a))
    got_x, got_y = centroid(out)
    assert got_x == pytest.approx(expected_x, abs=0.15)
    assert got_y == pytest.approx(expected_y, abs=0.15)


@pytest.mark.parametrize("scale", [1.0, 0.8])
def test_homography_maps_a_spot_where_the_moved_corners_say(scale):
    offsets = np.array([[3.0, -2.0], [-4.0, 1.5], [2.5, 3.0], [-1.0, -3.5]])  # px, corners TL, TR, BR, BL
    params = distortion_params(28, one(0.0), one(scale), torch.zeros(1, 2), torch.tensor(offsets[None]).float())
    x0, y0 = 9.0, 18.0
    out = apply_distortion(blob(x0, y0, sigma=1.0), params, 28)
    # The canvas corners are the outer pixel edges: (-0.5, -0.5) ... (27.5, 27.5) in pixel-centre coordinates.
    corners = np.array([[-0.5, -0.5], [27.5, -0.5], [27.5, 27.5], [-0.5, 27.5]])
    h = pixel_homography(corners, corners + offsets)
    scaled = np.array([13.5 + scale * (x0 - 13.5), 13.5 + scale * (y0 - 13.5), 1.0])
    u, v, w = h @ scaled
    got_x, got_y = centroid(out)
    assert got_x == pytest.approx(u / w, abs=0.3)
    assert got_y == pytest.approx(v / w, abs=0.3)


def test_homography_corner_points_move_by_their_offsets():
    offsets = torch.tensor([[[3.0, -2.0], [-4.0, 1.5], [2.5, 3.0], [-1.0, -3.5]]])
    params = distortion_params(28, one(0.0), one(1.0), torch.zeros(1, 2), offsets)
    theta = params["source_projective"][0].double()
    source = torch.cat([theta, torch.ones(1, dtype=torch.float64)]).reshape(3, 3)
    for (cx, cy), (ox, oy) in zip([(-1, -1), (1, -1), (1, 1), (-1, 1)], offsets[0].tolist(), strict=True):
        moved = torch.tensor([cx + ox * 2 / 28, cy + oy * 2 / 28, 1.0], dtype=torch.float64)
        u, v, w = (source @ moved).tolist()
        assert (u / w, v / w) == pytest.approx((cx, cy), abs=1e-6)  # the output's moved corner samples the corner


def test_tps_with_equal_offsets_is_a_translation_after_the_scaling():
    shift = (1.5, -2.0)  # px: every control point samples the scaled digit this far away
    offsets = torch.tensor(shift).expand(1, 16, 2).clone()
    scale = 0.8
    params = distortion_params(28, one(0.0), one(scale), torch.zeros(1, 2), tps_offsets=offsets)
    x0, y0 = 15.0, 11.0
    out = apply_distortion(blob(x0, y0), params, 28)
    got_x, got_y = centroid(out)
    assert got_x == pytest.approx(13.5 + scale * (x0 - 13.5) - shift[0], abs=0.15)
    assert got_y == pytest.approx(13.5 + scale * (y0 - 13.5) - shift[1], abs=0.15)


def test_tps_control_point_samples_its_offset_position():
    # Control point (row 1, col 1) of the 4x4 grid sits at normalised (-1/3, -1/3), pixel ((2/3) * 28 - 1) / 2.
    control = ((-1 / 3 + 1) * 28 - 1) / 2
    offsets = torch.zeros(1, 16, 2)
    offsets[0, 5] = torch.tensor([1.5, -1.0])
    params = distortion_params(28, one(0.0), one(1.0), torch.zeros(1, 2), tps_offsets=offsets)
    out = apply_distortion(blob(control + 1.5, control - 1.0, sigma=1.0), params, 28)
    got_x, got_y = centroid(out)
    assert (got_x, got_y) == pytest.approx((control, control), abs=0.3)


def test_tps_with_zero_offsets_is_the_affine_part():
    """The TPS control points carry the rotation/scale/translation exactly (a TPS reproduces affine maps)."""
    angle, scale, shift = one(30.0), one(0.9), torch.tensor([[1.0, -2.0]])
    affine = distortion_params(28, angle, scale, shift)
    tps = distortion_params(28, angle, scale, shift, tps_offsets=torch.zeros(1, 16, 2))
    torch.testing.assert_close(source_grid(tps, 28), source_grid(affine, 28), atol=1e-5, rtol=0)


def test_whole_pixel_paste_equals_bilinear_sampling(datasets):
    digits = synthetic_digits(32)
    params = draw_distortion(datasets["TC"], 32, torch.Generator().manual_seed(3), CPU, clutter_pool=32)
    params = {k: v for k, v in params.items() if not k.startswith("clutter")}
    pasted = apply_distortion(digits, params, 60)
    sampled = sample(digits[:, None].float() / 255, source_grid(params, 60))
    torch.testing.assert_close(pasted, sampled, atol=1e-5, rtol=0)


def test_params_describe_the_images(datasets):
    """Re-sampling with the returned source grid reproduces every warped dataset's images."""
    digits = synthetic_digits(16)
    for name in ("R", "RTS", "P", "E"):
        images, params = distort(digits, datasets[name], torch.Generator().manual_seed(1))
        rebuilt = sample(digits[:, None].float() / 255, source_grid(params, datasets[name].size))
        torch.testing.assert_close(images, rebuilt, atol=1e-6, rtol=0)


def test_tc_digit_is_pasted_whole_and_clutter_never_erases_it(datasets):
    cfg = datasets["TC"]
    digits = synthetic_digits(64, seed=1)
    pool = synthetic_digits(100, seed=2)
    images, params = distort(digits, cfg, torch.Generator().manual_seed(5), clutter_source=pool)
    top_left = (params["translation"] + (60 - 28) / 2).round().long()
    assert top_left.min() >= 0 and top_left.max() <= 32
    assert torch.equal(params["translation"] + 16, top_left.float())  # whole pixels
    digit_float = digits.float() / 255
    for b in range(len(digits)):  # an independent per-image reference: paste, then max each patch
        x, y = top_left[b].tolist()
        expected = torch.zeros(60, 60)
        expected[y:y + 28, x:x + 28] = digit_float[b]
        window = images[b, 0, y:y + 28, x:x + 28]
        assert bool((window >= digit_float[b]).all())  # the digit is never darkened
        for i in range(cfg.clutter):
            cx, cy = params["clutter_crop"][b, i].tolist()
            px, py = params["clutter_position"][b, i].tolist()
            patch = pool[params["clutter_index"][b, i], cy:cy + 6, cx:cx + 6].float() / 255
            expected[py:py + 6, px:px + 6] = torch.maximum(expected[py:py + 6, px:px + 6], patch)
        torch.testing.assert_close(images[b, 0], expected, atol=1e-6, rtol=0)


def test_plain_is_the_digit_itself(datasets):
    digits = synthetic_digits(8)
    images, _ = distort(digits, datasets["plain"], torch.Generator())
    assert torch.equal(images, digits[:, None].float() / 255)


def test_a_pixel_on_the_homographys_horizon_shows_background_not_nan() -> None:
    """Found in training (P, seed 2, step 1103): a source point at infinity made the whole batch NaN."""
    size = 28
    column0 = (2 * 0 + 1) / size - 1  # normalised x of the first pixel column's centre
    g = -1.0 / column0  # perspective row (g, 0): 1 + g * x_t = 0 exactly on column 0
    theta = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, g, 0.0]])
    digits = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    raw = source_grid({"source_projective": theta}, size)
    assert not torch.isfinite(raw).all()  # the case is real: the grid has a point at infinity
    images = apply_distortion(digits, {"source_projective": theta}, size)
    assert torch.isfinite(images).all()
    assert (images[0, 0, :, 0] == 0).all()  # the horizon column is background
    # elsewhere the sampler is untouched: equal to sampling the raw grid where it is finite
    finite = torch.isfinite(raw).all(-1)[0]  # (H, W)
    expected = sample(digits[:, None].float() / 255, torch.where(torch.isfinite(raw), raw, torch.zeros_like(raw)))
    assert torch.equal(images[0, 0][finite], expected[0, 0][finite])


@pytest.mark.parametrize("dataset", ["plain", "R", "RTS", "P", "E", "TC"])
def test_distort_without_reading_tensors_back_gives_the_same_images(dataset):
    """distort decides 'whole-pixel paste or sampler' from the config (no host-device sync on CUDA); the
    inspecting path (whole_pixel=None) must give the same images."""
    cfg = compose([f"dataset={dataset}"]).dataset
    generator = torch.Generator().manual_seed(0)
    digits = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8, generator=generator)
    images, params = distort(digits, cfg, torch.Generator().manual_seed(1), digits)
    inspected = apply_distortion(digits, params, cfg.size, digits, cfg.clutter_size, whole_pixel=None)
    assert draws_whole_pixels(cfg) == (dataset in ("plain", "TC"))
    assert torch.equal(images, inspected)
