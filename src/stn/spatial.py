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

`SpatialTransformer` puts the three parts together: localisation net -> regression layer (theta) ->
grid generator -> sampler, with the regression layer initialised to the identity transform.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    """The length of theta for `kind` (identity_params' length; arithmetic, so counting parameters on meta
    tensors builds no tensor here)."""
    sizes = {"affine": 6, "projective": 8, "tps": 2 * tps_grid * tps_grid}
    if kind not in sizes:
        raise ValueError(f"unknown transform {kind!r}: expected affine, projective or tps")
    return sizes[kind]


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


def _squared_distance(a: Tensor, b: Tensor) -> Tensor:
    # (N, 2), (K, 2) -> (N, K). Explicit differences, not cdist: cdist's matmul shortcut loses digits near 0.
    return (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)


def _tps_kernel(squared_distance: Tensor) -> Tensor:
    # U(r) = r^2 log r^2, with U(0) = 0 (its limit).
    return torch.where(
        squared_distance > 0, squared_distance * torch.log(squared_distance.clamp_min(1e-12)), 0.0
    )


@functools.lru_cache(maxsize=8)
def _tps_inverse(grid: int) -> Tensor:
    """(K+3, K+3) float64: L^-1 of the spline system of the k x k target control points (`tps_weights`)."""
    control = tps_control_points(grid, dtype=torch.float64)  # (K, 2)
    k = control.shape[0]
    kernel = _tps_kernel(_squared_distance(control, control))
    affine_part = torch.cat([torch.ones(k, 1, dtype=torch.float64), control], dim=1)  # (K, 3)
    system = torch.zeros(k + 3, k + 3, dtype=torch.float64)
    system[:k, :k] = kernel
    system[:k, k:] = affine_part
    system[k:, :k] = affine_part.T
    return torch.linalg.inv(system)


def tps_weights(points: Tensor, grid: int) -> Tensor:
    """(N, K) float64: the linear map from source control points (K, 2) to the sources of `points` (N, 2).

    The TPS through control points P (targets) with values P' (sources) is
    f(x) = a + A x + sum_i w_i U(|x - P_i|), where [w; a; A] solves L [w; a; A] = [P'; 0; 0],
    L = [[K, Q], [Q^T, 0]], K_ij = U(|P_i - P_j|), Q = [1, P].
    Everything but P' is fixed, so f(points) = (basis @ L^-1[:, :K]) @ P'. Solved in float64 for accuracy.
    """
    control = tps_control_points(grid, dtype=torch.float64)  # (K, 2)
    points = points.detach().to(device="cpu", dtype=torch.float64)  # a fixed map: no gradient w.r.t. points
    ones = torch.ones(len(points), 1, dtype=torch.float64)
    basis = torch.cat([_tps_kernel(_squared_distance(points, control)), ones, points], dim=1)  # (N, K+3)
    return basis @ _tps_inverse(grid)[:, : control.shape[0]]  # (N, K)


@functools.lru_cache(maxsize=32)
def _tps_grid_weights(grid: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """`tps_weights` at the pixel centres of an H x W output grid, cast and cached: (H*W, K)."""
    points = target_points(height, width, dtype=torch.float64)  # (HW, 2)
    return tps_weights(points, grid).to(device=device, dtype=dtype)


def tps_transform(theta: Tensor, points: Tensor, *, grid: int = 4) -> Tensor:
    """theta (B, 2*k*k) source control points, target points (N, 2) -> their sources (B, N, 2)."""
    weights = tps_weights(points, grid).to(device=theta.device, dtype=theta.dtype)  # (N, K)
    return weights @ theta.reshape(-1, grid * grid, 2)


def tps_grid(theta: Tensor, height: int, width: int, *, grid: int = 4) -> Tensor:
    """theta (B, 2*k*k) source control points -> grid (B, H, W, 2)."""
    weights = _tps_grid_weights(grid, height, width, theta.device, theta.dtype)  # (HW, K)
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
    """Bilinear sampling V = U(T_theta(G)), zeros outside the input (the paper's eq. 5).

    images (B, C, H, W), grid (B, H', W', 2) normalised (x_s, y_s) -> (B, C, H', W').
    """
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=ALIGN_CORNERS)


class SpatialTransformer(nn.Module):
    """Localisation net -> regression layer -> theta -> grid T_theta(G) -> bilinearly sampled output.

    `localisation` maps the input (B, C, H, W) to features (B, `features`); the regression layer (a Linear
    layer, zero weight, bias = the identity theta) turns them into theta (B, P), so the untrained module
    returns its input. `output_size` (H', W') is the sampled grid's size; None keeps the input's size.
    """

    def __init__(
        self,
        localisation: nn.Module,
        features: int,
        kind: str,
        *,
        output_size: tuple[int, int] | None = None,
        tps_grid: int = 4,
        preprocess: nn.Module | None = None,
    ) -> None:
        super().__init__()
        # Applied to the localisation net's input only (e.g. standardisation); the sampler always reads the
        # raw input, so its zero padding outside the image stays equal to the black background.
        self.preprocess = preprocess if preprocess is not None else nn.Identity()
        self.kind = kind
        self.tps_grid = tps_grid
        self.output_size = output_size
        self.localisation = localisation
        self.regression = nn.Linear(features, num_params(kind, tps_grid=tps_grid))
        self.reset_regression()

    def reset_regression(self) -> None:
        """Zero weight, identity bias: training starts from T_theta = identity, not from noise."""
        if self.regression.bias.is_meta:  # shapes only (parameter counting): there are no values to set
            return
        identity = identity_params(self.kind, tps_grid=self.tps_grid)
        with torch.no_grad():
            self.regression.weight.zero_()
            self.regression.bias.copy_(identity.to(self.regression.bias.device))

    def transform(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, C, H, W) -> (output (B, C, H', W'), theta (B, P), grid (B, H', W', 2))."""
        height, width = self.output_size or (x.shape[-2], x.shape[-1])
        features = self.localisation(self.preprocess(x))  # (B, features)
        # theta, grid and sampling stay in float32 even under bf16 autocast: theta starts at the identity
        # (entries near 1), and bf16's 8-bit mantissa would round away the small updates training makes.
        with torch.autocast(device_type=x.device.type, enabled=False):
            theta = self.regression(features.to(self.regression.weight.dtype))  # (B, P)
            grid = make_grid(self.kind, theta, height, width, tps_grid_size=self.tps_grid)  # (B, H', W', 2)
            out = sample(x.to(theta.dtype), grid)
        return out, theta, grid

    def forward(self, x: Tensor) -> Tensor:
        return self.transform(x)[0]

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, output_size={self.output_size}, tps_grid={self.tps_grid}"
