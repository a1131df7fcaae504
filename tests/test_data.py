"""The distortion engine on synthetic digits: geometry against closed-form pixel maps, ranges, determinism.

Expected positions are computed here in pixel coordinates (pixel centres at integers, the canvas centre at
(S - 1) / 2), independently of the normalised-coordinate code in `stn.data`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from geometry import blob, centroid, pixel_homography
from stn.config import DatasetConfig, compose
from stn.data import (
    TrainStream,
    apply_distortion,
    distort,
    distortion_params,
    draw_distortion,
    make_test_set,
    source_grid,
)
from stn.spatial import sample

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def datasets() -> dict[str, DatasetConfig]:
    return {name: compose([f"dataset={name}"]).dataset for name in ("plain", "R", "RTS", "P", "P_axis", "E", "TC")}






def one(value: float) -> torch.Tensor:
    return torch.tensor([value])


def synthetic_digits(count: int, seed: int = 0) -> torch.Tensor:
    """uint8 (N, 28, 28) random blobby 'digits' inside the central 20x20 box (like MNIST)."""
    generator = torch.Generator().manual_seed(seed)
    digits = torch.zeros(count, 28, 28, dtype=torch.uint8)
    digits[:, 4:24, 4:24] = (torch.rand(count, 20, 20, generator=generator) * 255).to(torch.uint8)
    return digits


# ------------------------------------------------------------------------------------------------ geometry


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


# ------------------------------------------------------------------------------------ canvases and clutter


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


# ----------------------------------------------------------------------------------------------- ranges


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


def test_plain_is_the_digit_itself(datasets):
    digits = synthetic_digits(8)
    images, _ = distort(digits, datasets["plain"], torch.Generator())
    assert torch.equal(images, digits[:, None].float() / 255)


# ------------------------------------------------------------------------------------------- determinism


def test_test_set_is_a_pure_function_of_its_seed(datasets):
    digits, labels = synthetic_digits(2500, seed=4), torch.arange(2500) % 10
    for name in ("RTS", "TC", "E"):
        cfg = datasets[name]
        first = make_test_set(digits, labels, cfg)
        again = make_test_set(digits, labels, cfg)
        assert first.images.shape == (2500, 1, cfg.size, cfg.size) and first.images.dtype == torch.float32
        assert first.images.numpy().tobytes() == again.images.numpy().tobytes()
        other = make_test_set(digits, labels, dataclasses.replace(cfg, test_seed=cfg.test_seed + 1))
        assert not torch.equal(first.images, other.images)
        limited = make_test_set(digits, labels, dataclasses.replace(cfg, test_limit=1200))
        assert len(limited) == 1200 and torch.equal(limited.images, first.images[:1200])  # a prefix
        assert torch.equal(limited.labels, labels[:1200])


def test_train_stream_resumes_exactly(datasets):
    digits, labels = synthetic_digits(100, seed=6), torch.arange(100)
    for fixed in (False, True):
        cfg = dataclasses.replace(datasets["RTS"], fixed_train=fixed)
        a = TrainStream(digits, labels, cfg, batch_size=16, seed=7)
        assert a.batches_per_epoch == 6
        batches, states = [], []
        for _ in range(14):  # crosses two epoch boundaries
            states.append(a.state_dict())
            batches.append(a.next())
        for j in (3, 6, 9):
            b = TrainStream(digits, labels, cfg, batch_size=16, seed=7)
            b.load_state_dict(states[j])
            for k in range(j, 14):
                images, batch_labels = b.next()
                assert torch.equal(images, batches[k][0]) and torch.equal(batch_labels, batches[k][1])
        assert a.epoch == 2 and a.position == 2


def test_train_stream_redraws_each_epoch_unless_fixed(datasets):
    digits, labels = synthetic_digits(64, seed=8), torch.arange(64)  # labels = digit ids
    for fixed in (False, True):
        stream = TrainStream(digits, labels, dataclasses.replace(datasets["R"], fixed_train=fixed), 64, seed=1)
        (x0, y0), (x1, y1) = stream.next(), stream.next()  # epochs 0 and 1: one batch each
        assert not torch.equal(y0, y1)  # reshuffled
        same = torch.equal(x0[y0.argsort()], x1[y1.argsort()])
        assert same == fixed


def test_train_stream_limit_and_state_checks(datasets):
    digits, labels = synthetic_digits(50), torch.arange(50)
    cfg = dataclasses.replace(datasets["R"], train_limit=20)
    stream = TrainStream(digits, labels, cfg, batch_size=8, seed=0)
    seen = torch.cat([stream.next()[1] for _ in range(stream.batches_per_epoch)])
    assert stream.batches_per_epoch == 2 and int(seen.max()) < 20 and len(set(seen.tolist())) == 16
    other = TrainStream(digits, labels, cfg, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(stream.state_dict())


def test_different_batches_get_different_distortions(datasets):
    digits = synthetic_digits(1, seed=9).expand(2, 28, 28)
    generator = torch.Generator().manual_seed(0)
    images, params = distort(digits, datasets["E"], generator)
    assert not torch.equal(images[0], images[1])
    assert not torch.equal(params["tps_offsets"][0], params["tps_offsets"][1])


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
