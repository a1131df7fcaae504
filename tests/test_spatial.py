"""The grid generators, the sampler and SpatialTransformer against independent float64/numpy math."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from stn.spatial import (
    ALIGN_CORNERS,
    SpatialTransformer,
    affine_grid,
    identity_params,
    make_grid,
    norm_to_pixel,
    num_params,
    pixel_to_norm,
    projective_grid,
    sample,
    target_points,
    tps_control_points,
    tps_grid,
    tps_transform,
)

KINDS = ("affine", "projective", "tps")


def numpy_targets(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre target coordinates (H, W) under align_corners=False, written out independently."""
    xs = (2 * np.arange(width) + 1) / width - 1
    ys = (2 * np.arange(height) + 1) / height - 1
    return np.meshgrid(xs, ys)  # x varies along columns, y along rows


def bilinear_eq3(image: np.ndarray, x: float, y: float) -> float:
    """The paper's eq. 3 in pixel coordinates: V = sum_nm U_nm max(0, 1-|x-m|) max(0, 1-|y-n|)."""
    total = 0.0
    for n in range(image.shape[0]):
        for m in range(image.shape[1]):
            total += image[n, m] * max(0.0, 1 - abs(x - m)) * max(0.0, 1 - abs(y - n))
    return total


def linear_localisation(channels: int, side: int, features: int = 8) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, features), nn.ReLU())


# ---- coordinates ---------------------------------------------------------------------------------------


def test_align_corners_is_false_and_pixel_norm_round_trip():
    assert ALIGN_CORNERS is False
    # Pixel 0 of 4 is centred a half pixel inside the edge: -1 + 1/4.
    assert pixel_to_norm(0, 4) == pytest.approx(-0.75)
    assert pixel_to_norm(3, 4) == pytest.approx(0.75)
    index = torch.tensor([0.0, 1.3, 6.5, 9.0])
    torch.testing.assert_close(norm_to_pixel(pixel_to_norm(index, 10), 10), index, atol=1e-6, rtol=0)


def test_target_points_layout_matches_numpy():
    xs, ys = numpy_targets(3, 5)
    points = target_points(3, 5, dtype=torch.float64).numpy()
    np.testing.assert_allclose(points[:, 0], xs.reshape(-1))
    np.testing.assert_allclose(points[:, 1], ys.reshape(-1))


# ---- identity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_identity_params_give_the_identity_grid(kind):
    theta = identity_params(kind).reshape(1, -1).double()
    grid = make_grid(kind, theta, 6, 9)
    xs, ys = numpy_targets(6, 9)
    np.testing.assert_allclose(grid[0, ..., 0].numpy(), xs, atol=1e-12)
    np.testing.assert_allclose(grid[0, ..., 1].numpy(), ys, atol=1e-12)
    assert num_params(kind) == {"affine": 6, "projective": 8, "tps": 32}[kind]
    for grid_side in (2, 3, 5):
        assert num_params(kind, tps_grid=grid_side) == identity_params(kind, tps_grid=grid_side).numel()


def test_a_transformer_on_meta_tensors_has_the_shapes_of_a_real_one():
    """Parameter counting builds models on the meta device, where the identity bias is not set."""
    real = SpatialTransformer(nn.Flatten(), 16, "tps", tps_grid=3)
    with torch.device("meta"):
        shapes_only = SpatialTransformer(nn.Flatten(), 16, "tps", tps_grid=3)
    assert {k: v.shape for k, v in real.state_dict().items()} == \
        {k: v.shape for k, v in shapes_only.state_dict().items()}
    assert torch.equal(real.regression.bias, identity_params("tps", tps_grid=3))


@pytest.mark.parametrize("kind", KINDS)
def test_untrained_transformer_returns_its_input(kind):
    torch.manual_seed(0)
    transformer = SpatialTransformer(linear_localisation(2, 12), 8, kind)
    x = torch.rand(3, 2, 12, 12)
    out, theta, grid = transformer.transform(x)
    assert out.shape == x.shape and grid.shape == (3, 12, 12, 2)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(theta, identity_params(kind).expand(3, -1))
    assert torch.count_nonzero(transformer.regression.weight) == 0


# ---- closed-form warps -----------------------------------------------------------------------------------


def test_affine_rotation_matches_closed_form():
    angle, tx, ty, scale = math.radians(30.0), 0.2, -0.1, 0.8
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    theta = torch.tensor([[c, -s, tx, s, c, ty]], dtype=torch.float64)
    grid = affine_grid(theta, 5, 7)[0].numpy()  # non-square: catches x/y mix-ups
    xs, ys = numpy_targets(5, 7)
    np.testing.assert_allclose(grid[..., 0], c * xs - s * ys + tx, atol=1e-12)
    np.testing.assert_allclose(grid[..., 1], s * xs + c * ys + ty, atol=1e-12)


def test_projective_matches_closed_form_homography():
    h = np.array([[0.9, 0.1, 0.05], [-0.2, 1.1, 0.1], [0.15, -0.1, 1.0]])
    theta = torch.tensor(h.reshape(-1)[:8], dtype=torch.float64).reshape(1, 8)
    grid = projective_grid(theta, 6, 4)[0].numpy()
    xs, ys = numpy_targets(6, 4)
    for row in range(6):
        for col in range(4):
            u, v, w = h @ np.array([xs[row, col], ys[row, col], 1.0])
            assert grid[row, col, 0] == pytest.approx(u / w, abs=1e-12)
            assert grid[row, col, 1] == pytest.approx(v / w, abs=1e-12)


def test_projective_with_zero_perspective_row_equals_affine():
    affine = torch.randn(4, 6, dtype=torch.float64)
    projective = torch.cat([affine, torch.zeros(4, 2, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(projective_grid(projective, 7, 5), affine_grid(affine, 7, 5))


def numpy_tps(targets: np.ndarray, sources: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bookstein's thin plate spline through targets -> sources, at points; numpy solve in float64."""

    def kernel(a, b):
        r2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(r2 > 0, r2 * np.log(r2), 0.0)

    k = len(targets)
    q = np.hstack([np.ones((k, 1)), targets])
    system = np.block([[kernel(targets, targets), q], [q.T, np.zeros((3, 3))]])
    coefficients = np.linalg.solve(system, np.vstack([sources, np.zeros((3, 2))]))  # (K+3, 2)
    basis = np.hstack([kernel(points, targets), np.ones((len(points), 1)), points])
    return basis @ coefficients


def test_tps_grid_matches_an_independent_spline_solve():
    rng = np.random.default_rng(0)
    ticks = np.linspace(-1, 1, 4)
    targets = np.array([(x, y) for y in ticks for x in ticks])  # row-major, x fastest
    sources = targets + rng.normal(0, 0.15, targets.shape)
    theta = torch.tensor(sources.reshape(1, -1))
    grid = tps_grid(theta, 9, 11)[0].numpy()
    xs, ys = numpy_targets(9, 11)
    expected = numpy_tps(targets, sources, np.stack([xs.reshape(-1), ys.reshape(-1)], 1))
    np.testing.assert_allclose(grid.reshape(-1, 2), expected, atol=1e-10)


def test_tps_interpolates_its_control_points_exactly():
    torch.manual_seed(1)
    control = tps_control_points(4, dtype=torch.float64)
    sources = control + 0.2 * torch.randn(2, 16, 2, dtype=torch.float64)  # two different warps
    mapped = tps_transform(sources.reshape(2, 32), control)  # the spline evaluated at its own targets
    torch.testing.assert_close(mapped, sources, atol=1e-10, rtol=0)


def test_tps_of_affinely_moved_control_points_is_that_affine_map():
    # A TPS reproduces affine maps exactly (all kernel weights vanish): independent of the spline solve.
    matrix = torch.tensor([[0.9, -0.3, 0.1], [0.25, 1.1, -0.2]], dtype=torch.float64)
    control = tps_control_points(4, dtype=torch.float64)
    sources = control @ matrix[:, :2].T + matrix[:, 2]
    grid = tps_grid(sources.reshape(1, -1), 8, 6)
    torch.testing.assert_close(grid, affine_grid(matrix.reshape(1, 6), 8, 6), atol=1e-10, rtol=0)


# ---- the sampler ---------------------------------------------------------------------------------------


def test_sampler_matches_eq3_bilinear_by_hand():
    rng = np.random.default_rng(2)
    image = rng.random((4, 5))
    # Pixel coordinates: interior, on a pixel centre, between two, near and beyond the border.
    points = [(1.3, 2.6), (2.0, 1.0), (0.5, 0.25), (3.9, 2.99), (-0.4, 1.5), (4.6, -0.7), (6.0, 1.0)]
    grid = torch.tensor(
        [[[pixel_to_norm(x, 5), pixel_to_norm(y, 4)] for x, y in points]], dtype=torch.float64
    ).unsqueeze(0)  # (1, 1, P, 2)
    out = sample(torch.tensor(image)[None, None], grid)[0, 0, 0].numpy()
    expected = [bilinear_eq3(image, x, y) for x, y in points]
    np.testing.assert_allclose(out, expected, atol=1e-12)


def test_output_size_differs_from_input():
    # Bilinear sampling reproduces a linear ramp exactly away from the border, at any output resolution.
    side = 28
    rows, cols = torch.meshgrid(
        torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij"
    )
    ramp = (0.03 * cols + 0.01 * rows + 0.1)[None, None]  # U_nm = 0.03 m + 0.01 n + 0.1
    transformer = SpatialTransformer(linear_localisation(1, side), 8, "affine", output_size=(14, 20)).double()
    with torch.no_grad():  # zoom in by 2 around the centre: x_s = 0.5 x_t, y_s = 0.5 y_t
        transformer.regression.bias.copy_(torch.tensor([0.5, 0, 0, 0, 0.5, 0]))
    out, _, grid = transformer.transform(ramp)
    assert out.shape == (1, 1, 14, 20) and grid.shape == (1, 14, 20, 2)
    xs, ys = numpy_targets(14, 20)
    px, py = ((0.5 * xs + 1) * side - 1) / 2, ((0.5 * ys + 1) * side - 1) / 2  # source pixel coordinates
    np.testing.assert_allclose(out[0, 0].detach().numpy(), 0.03 * px + 0.01 * py + 0.1, atol=1e-12)


# ---- gradients -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_grid_generators_gradcheck(kind):
    torch.manual_seed(3)
    theta = identity_params(kind).double().reshape(1, -1).repeat(2, 1)
    theta = (theta + 0.1 * torch.randn_like(theta)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: make_grid(kind, t, 3, 4), (theta,))


def test_sampler_gradcheck_wrt_image_and_grid():
    torch.manual_seed(4)
    images = torch.rand(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    # Source points with fractional parts in [0.2, 0.8] px, away from the kinks at integer pixel positions
    # (including the borders' -1 and W, where the zero padding starts).
    px = torch.randint(-1, 6, (2, 3, 4)) + 0.2 + 0.6 * torch.rand(2, 3, 4)
    py = torch.randint(-1, 5, (2, 3, 4)) + 0.2 + 0.6 * torch.rand(2, 3, 4)
    grid = torch.stack([pixel_to_norm(px, 6), pixel_to_norm(py, 5)], -1).double().requires_grad_()
    assert torch.autograd.gradcheck(sample, (images, grid))


def test_transformer_gradients_reach_the_regression_layer_at_init():
    torch.manual_seed(5)
    transformer = SpatialTransformer(linear_localisation(1, 10), 8, "tps")
    x = torch.rand(4, 1, 10, 10)
    weights = torch.randn(4, 1, 10, 10)
    (transformer(x) * weights).sum().backward()
    # The zero weight still gets a gradient (d theta / d W = the localisation features), so it can move.
    assert transformer.regression.weight.grad.abs().sum() > 0
    assert transformer.regression.bias.grad.abs().sum() > 0


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown transform 'similarity'"):
        identity_params("similarity")
    with pytest.raises(ValueError, match="unknown transform"):
        make_grid("similarity", torch.zeros(1, 4), 2, 2)


def test_theta_grid_and_sampling_stay_float32_under_bf16_autocast():
    torch.manual_seed(6)
    transformer = SpatialTransformer(linear_localisation(1, 12), 8, "affine")
    with torch.no_grad():  # a small update to the identity that bf16 (8-bit mantissa) would round away
        transformer.regression.bias[0] += 1e-3
    x = torch.rand(2, 1, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, theta, grid = transformer.transform(x)
    assert theta.dtype == grid.dtype == out.dtype == torch.float32
    assert theta[0, 0].item() == pytest.approx(1.001, abs=1e-6)
    reference, _, _ = transformer.transform(x)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
