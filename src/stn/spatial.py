"""Grid generators T_theta(G) and the bilinear sampler (the paper's Section 3.2-3.3).

Coordinates are normalised to [-1, 1] with `align_corners=False` (fixed here, once, for grid generation
and sampling alike): -1 and +1 are the outer edges of the border pixels, so pixel index i of a side of
n pixels has its centre at (2i + 1) / n - 1. This makes a grid mean the same thing at every resolution,
which is what lets a transformer's output size differ from its input size.

Every generator maps target points (x_t, y_t) of the output grid to source points (x_s, y_s) of the
input, batched: theta (B, P) -> grid (B, H, W, 2) with grid[..., 0] = x_s and grid[..., 1] = y_s, the
layout `torch.nn.functional.grid_sample` takes.

- affine: theta (B, 6) is A row-major, [x_s, y_s] = A [x_t, y_t, 1].
- projective: theta (B, 8) is the homography H row-major with H[2, 2] = 1; [u, v, w] = H [x_t, y_t, 1],
  (x_s, y_s) = (u / w, v / w).
- tps: theta (B, 2K) are the source positions (x, y) of K = k*k control points whose target positions
  lie on a regular k x k grid over [-1, 1]^2; the thin plate spline through them (Bookstein 1989,
  kernel U(r) = r^2 log r^2) maps every target point.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

ALIGN_CORNERS = False


def pixel_to_norm(index: Tensor | float, size: int) -> Tensor | float:
    """Pixel-centre index -> normalised coordinate under ALIGN_CORNERS=False."""
    return (2 * index + 1) / size - 1


def norm_to_pixel(coord: Tensor | float, size: int) -> Tensor | float:
    """Normalised coordinate -> (fractional) pixel-centre index; the inverse of `pixel_to_norm`."""
    return ((coord + 1) * size - 1) / 2


def target_points(height: int, width: int, *, device=None, dtype=torch.float32) -> Tensor:
    """The regular output grid G as (H*W, 2) normalised (x_t, y_t), row-major over pixels."""
    ys = pixel_to_norm(torch.arange(height, device=device, dtype=dtype), height)
    xs = pixel_to_norm(torch.arange(width, device=device, dtype=dtype), width)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)


def identity_params(kind: str, *, tps_grid: int = 4) -> Tensor:
    """The theta of the identity transform for `kind`; the regression layer's initial bias."""
    if kind == "affine":
        return torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    if kind == "projective":
        return torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    if kind == "tps":
        return tps_control_points(tps_grid).reshape(-1)
    raise ValueError(f"unknown transform {kind!r}: expected affine, projective or tps")


def num_params(kind: str, *, tps_grid: int = 4) -> int:
    return int(identity_params(kind, tps_grid=tps_grid).numel())


def affine_grid(theta: Tensor, height: int, width: int) -> Tensor:
    """theta (B, 6) -> grid (B, H, W, 2)."""
    points = target_points(height, width, device=theta.device, dtype=theta.dtype)  # (HW, 2)
    homogeneous = torch.cat([points, torch.ones_like(points[:, :1])], dim=1)  # (HW, 3)
    matrix = theta.reshape(-1, 2, 3)
    source = homogeneous @ matrix.transpose(1, 2)  # (B, HW, 2)
    return source.reshape(-1, height, width, 2)


def projective_grid(theta: Tensor, height: int, width: int) -> Tensor:
    """theta (B, 8) -> grid (B, H, W, 2); H[2, 2] is fixed to 1."""
    points = target_points(height, width, device=theta.device, dtype=theta.dtype)
    homogeneous = torch.cat([points, torch.ones_like(points[:, :1])], dim=1)  # (HW, 3)
    matrix = torch.cat([theta, torch.ones_like(theta[:, :1])], dim=1).reshape(-1, 3, 3)
    uvw = homogeneous @ matrix.transpose(1, 2)  # (B, HW, 3)
    source = uvw[..., :2] / uvw[..., 2:]
    return source.reshape(-1, height, width, 2)


def tps_control_points(grid: int, *, device=None, dtype=torch.float32) -> Tensor:
    """(k*k, 2) target control points on a regular k x k grid spanning [-1, 1]^2, row-major."""
    ticks = torch.linspace(-1.0, 1.0, grid, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ticks, ticks, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)


def _tps_kernel(squared_distance: Tensor) -> Tensor:
    # U(r) = r^2 log r^2, with U(0) = 0 (its limit).
    return torch.where(
        squared_distance > 0, squared_distance * torch.log(squared_distance.clamp_min(1e-12)), 0.0
    )


@functools.lru_cache(maxsize=32)
def _tps_weights(grid: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(H*W, K): the linear map from source control points (K, 2) to the sampling grid (H*W, 2).

    The TPS through control points P (targets) with values P' (sources) is f(x) = a + A x + sum_i w_i U(|x - P_i|),
    where [w; a; A] solves L [w; a; A] = [P'; 0; 0], L = [[K, Q], [Q^T, 0]], K_ij = U(|P_i - P_j|), Q = [1, P].
    Everything but P' is fixed, so f at the grid points is (basis @ L^-1[:, :K]) @ P': precompute that product.
    Solved in float64 for accuracy, then cast.
    """
    control = tps_control_points(grid, dtype=torch.float64)  # (K, 2)
    k = control.shape[0]
    kernel = _tps_kernel(torch.cdist(control, control).pow(2))
    affine_part = torch.cat([torch.ones(k, 1, dtype=torch.float64), control], dim=1)  # (K, 3)
    system = torch.zeros(k + 3, k + 3, dtype=torch.float64)
    system[:k, :k] = kernel
    system[:k, k:] = affine_part
    system[k:, :k] = affine_part.T
    inverse = torch.linalg.inv(system)  # (K+3, K+3)
    points = target_points(height, width, dtype=torch.float64)  # (HW, 2)
    basis = torch.cat(
        [_tps_kernel(torch.cdist(points, control).pow(2)), torch.ones(len(points), 1, dtype=torch.float64), points],
        dim=1,
    )  # (HW, K+3)
    return (basis @ inverse[:, :k]).to(device=device, dtype=dtype)  # (HW, K)


def tps_grid(theta: Tensor, height: int, width: int, *, grid: int = 4) -> Tensor:
    """theta (B, 2*k*k) source control points -> grid (B, H, W, 2)."""
    weights = _tps_weights(grid, height, width, theta.device, theta.dtype)  # (HW, K)
    source = weights @ theta.reshape(-1, grid * grid, 2)  # (B, HW, 2)
    return source.reshape(-1, height, width, 2)


def make_grid(kind: str, theta: Tensor, height: int, width: int, *, tps_grid_size: int = 4) -> Tensor:
    """Dispatch on the transform's name; theta (B, P) -> grid (B, H, W, 2)."""
    if kind == "affine":
        return affine_grid(theta, height, width)
    if kind == "projective":
        return projective_grid(theta, height, width)
    if kind == "tps":
        return tps_grid(theta, height, width, grid=tps_grid_size)
    raise ValueError(f"unknown transform {kind!r}: expected affine, projective or tps")


def sample(images: Tensor, grid: Tensor) -> Tensor:
    """Bilinear sampling V = U(T_theta(G)), zeros outside the input (the paper's eq. 5)."""
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=ALIGN_CORNERS)
