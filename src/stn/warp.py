"""The warp: distortion parameters -> one sampling grid -> images, for a whole batch at once (no draws here).

Each distortion is one sampling grid that maps every point of the OUTPUT canvas to a point of the SOURCE
28x28 digit (normalised coordinates, `align_corners=False`, see `stn.spatial`), so a whole batch is warped
by a single `grid_sample`, on the digits' device, with no per-image Python loop (whole-pixel translations,
plain and TC, are exact copies and done by a scatter instead). In pixel terms the forward map (digit ->
canvas) of R, RTS, plain and TC is

    canvas = centre_S + translation + scale * Rot(angle) (digit - centre_28)

with Rot counter-clockwise as seen on screen (y points down) and centre_n = (n - 1) / 2. P follows the
scaling with a homography taking four canvas points to points moved by given offsets, E follows it with a
thin plate spline whose control points sample the scaled digit at given offsets, and TC pastes the digit at
a whole-pixel position and composes clutter patches of other digits with max(), so clutter never darkens a
digit pixel. `distortion_params` turns the drawn numbers (`stn.distortions`) into the grid's theta, which is
also the exact inverse an ideal spatial transformer would predict; `apply_distortion` renders them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stn.config import DIGIT
from stn.spatial import affine_grid, projective_grid, sample, tps_control_points, tps_grid


def _homography(source: Tensor, target: Tensor) -> Tensor:
    """(B, 4, 2) point pairs -> (B, 3, 3) homographies H (H[2, 2] = 1) with H source ~ target (the 8x8 DLT)."""
    x, y = source.unbind(-1)  # (B, 4) each
    u, v = target.unbind(-1)
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], dim=-1)  # (B, 4, 8)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], dim=-1)
    # solve_ex: no singularity check, which on CUDA would read a flag back (a sync) for every batch
    h = torch.linalg.solve_ex(torch.cat([rows_u, rows_v], dim=1), torch.cat([u, v], dim=1))[0]  # (B, 8)
    return torch.cat([h, one[:, :1]], dim=1).reshape(-1, 3, 3)


def distortion_params(
    size: int,
    angle_deg: Tensor,
    scale: Tensor,
    translation: Tensor,
    corner_offsets: Tensor | None = None,
    tps_offsets: Tensor | None = None,
    corner_points: Tensor | None = None,
) -> dict[str, Tensor]:
    """The sampling grid's parameters for given distortions (deterministic; `distort` draws the inputs).

    angle_deg, scale (B,); translation (B, 2) px (x, y) of the digit centre from the canvas centre;
    corner_offsets (B, 4, 2) px for the corners (-1,-1), (1,-1), (1,1), (-1,1) of the canvas (projective), or
    for the four points corner_points (B, 4, 2) (canvas pixel coordinates, same order: top-left, top-right,
    bottom-right, bottom-left) when those are given (P's digit_box reading);
    tps_offsets (B, k*k, 2) px for the row-major k x k control points over the canvas (thin plate spline).
    Returns these plus exactly one of source_affine (B, 6), source_projective (B, 8) or source_tps (B, 2k*k):
    the `stn.spatial` theta of the grid mapping output canvas points to source digit points, i.e. what
    undoes the distortion (the inverse map an ideal spatial transformer would predict).
    """
    work = torch.float64  # composed and solved in float64, cast to float32 for sampling
    angle = torch.deg2rad(angle_deg.to(work))
    cos, sin = torch.cos(angle), torch.sin(angle)
    inv_scale = 1.0 / scale.to(work)
    # Canvas-normalised q -> digit-normalised p = (1/s) Rot^T (q * S/28 - t / 14); Rot = [[c, s], [-s, c]].
    rot_t = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
    linear = rot_t * inv_scale[:, None, None]  # (B, 2, 2)
    shift = -(linear @ (translation.to(work) / (DIGIT / 2))[..., None])[..., 0]  # (B, 2)
    affine = torch.cat([linear * (size / DIGIT), shift[..., None]], dim=2)  # (B, 2, 3)
    params: dict[str, Tensor] = {
        "angle_deg": angle_deg.float(),
        "scale": scale.float(),
        "translation": translation.float(),
    }
    if corner_offsets is not None:
        if corner_points is None:
            corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=work,
                                   device=corner_offsets.device).expand(len(corner_offsets), 4, 2)
        else:
            corners = (2 * corner_points.to(work) + 1) / size - 1  # pixel -> normalised (spatial.pixel_to_norm)
            params["corner_points"] = corner_points.float()
        moved = corners + corner_offsets.to(work) * (2.0 / size)
        inverse = _homography(moved, corners)  # output point -> pre-warp (scaled-digit) canvas point
        affine3 = torch.cat([affine, torch.tensor([0.0, 0.0, 1.0], dtype=work, device=affine.device)
                             .expand(len(affine), 1, 3)], dim=1)  # (B, 3, 3)
        source = affine3 @ inverse
        source = source / source[:, 2:, 2:]
        params["corner_offsets"] = corner_offsets.float()
        params["source_projective"] = source.reshape(-1, 9)[:, :8].float()
    elif tps_offsets is not None:
        k = math.isqrt(tps_offsets.shape[1])
        control = tps_control_points(k, device=tps_offsets.device, dtype=work)  # (K, 2) output positions
        pre_warp = control + tps_offsets.to(work) * (2.0 / size)  # (B, K, 2) where they sample from
        # A TPS reproduces affine maps, so following it by the affine undo = a TPS on the mapped control points.
        source = pre_warp @ affine[:, :, :2].transpose(1, 2) + affine[:, None, :, 2]
        params["tps_offsets"] = tps_offsets.float()
        params["source_tps"] = source.reshape(len(source), -1).float()
    else:
        params["source_affine"] = affine.reshape(-1, 6).float()
    return params


def source_grid(params: dict[str, Tensor], size: int) -> Tensor:
    """The (B, S, S, 2) sampling grid described by a params dict (output canvas -> source digit)."""
    if "source_projective" in params:
        return projective_grid(params["source_projective"], size, size)
    if "source_tps" in params:
        k = math.isqrt(params["source_tps"].shape[1] // 2)
        return tps_grid(params["source_tps"], size, size, grid=k)
    return affine_grid(params["source_affine"], size, size)


def source_points(params: dict[str, Tensor], points: Tensor) -> Tensor:
    """Evaluate the distortion's output -> source map at arbitrary points, in float64.

    points: normalised canvas coordinates (N, 2), shared by the batch, or (B, N, 2) per sample (they may lie
    outside [-1, 1]). Returns (B, N, 2) normalised source-digit coordinates: the same map `source_grid`
    samples at the pixel centres, continued to any point (a homography is undefined on its horizon line).
    """
    key = "source_projective" if "source_projective" in params else "source_tps" if "source_tps" in params \
        else "source_affine"
    theta = params[key].double()
    batch = len(theta)
    points = points.to(device=theta.device, dtype=torch.float64)
    if points.dim() == 2:
        points = points.expand(batch, *points.shape)
    homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)  # (B, N, 3)
    if key == "source_affine":
        return homogeneous @ theta.reshape(-1, 2, 3).transpose(1, 2)
    if key == "source_projective":
        matrix = torch.cat([theta, torch.ones_like(theta[:, :1])], dim=1).reshape(-1, 3, 3)
        uvw = homogeneous @ matrix.transpose(1, 2)
        return uvw[..., :2] / uvw[..., 2:]
    from stn.spatial import _tps_inverse, _tps_kernel

    k = math.isqrt(theta.shape[1] // 2)
    control = tps_control_points(k, device=theta.device, dtype=torch.float64)  # (K, 2)
    squared = (points[:, :, None, :] - control[None, None]).pow(2).sum(-1)  # (B, N, K)
    basis = torch.cat([_tps_kernel(squared), homogeneous[..., 2:], points], dim=-1)  # (B, N, K+3): U, 1, x, y
    weights = basis @ _tps_inverse(k).to(theta.device)[:, : k * k]  # (B, N, K)
    return weights @ theta.reshape(batch, k * k, 2)


def _whole_pixel_shift(params: dict[str, Tensor], size: int, whole_pixel: bool | None = None) -> Tensor | None:
    """(B, 2) integer top-left xy of the digit if the params are only whole-pixel translations, else None.

    whole_pixel=None inspects the params (reading tensors back: a host-device sync on CUDA); True/False is the
    answer already known from the dataset config (`draws_whole_pixels`), with no sync.
    """
    if whole_pixel is False or "source_affine" not in params:
        return None
    top_left = params["translation"] + (size - DIGIT) / 2
    rounded = top_left.round()
    if whole_pixel:
        return rounded.long()
    if bool((params["angle_deg"] != 0).any() or (params["scale"] != 1).any()):
        return None
    return rounded.long() if bool((top_left - rounded).abs().max() < 1e-4) else None


def _patch_offsets(patch: int, width: int, device: torch.device) -> Tensor:
    """(patch*patch,) flat offsets of a patch's pixels from its top-left pixel, in an image `width` wide."""
    offsets = torch.arange(patch, device=device)
    return (offsets[:, None] * width + offsets[None, :]).reshape(-1)


def _clutter_pixels(source: Tensor, params: dict[str, Tensor], size: int, patch: int) -> tuple[Tensor, Tensor]:
    """(B, n*c*c) flat canvas indices and float values of the clutter patches, for one scatter."""
    index, crop, position = params["clutter_index"], params["clutter_crop"], params["clutter_position"]
    batch, device = len(index), index.device
    start = (index * DIGIT + crop[..., 1]) * DIGIT + crop[..., 0]  # (B, n) flat top-left in the source digits
    values = source.reshape(-1)[start[..., None] + _patch_offsets(patch, DIGIT, device)]  # (B, n, c*c)
    values = values.to(torch.float32).div_(255.0) if source.dtype == torch.uint8 else values.float()
    target = position[..., 1] * size + position[..., 0]  # (B, n) flat top-left in the canvas
    flat = target[..., None] + _patch_offsets(patch, size, device)  # (B, n, c*c)
    return flat.reshape(batch, -1), values.reshape(batch, -1)


HORIZON = 4.0  # where a source point at infinity is sent: well outside the [-1, 1] source, so it samples zeros


def apply_distortion(digits: Tensor, params: dict[str, Tensor], size: int,
                     clutter_source: Tensor | None = None, clutter_size: int = 6,
                     whole_pixel: bool | None = None) -> Tensor:
    """Warp digits (B, 28, 28) by `params` into (B, 1, S, S) float32 images: one grid_sample, then clutter.

    Whole-pixel translations (plain, TC) skip the sampler: bilinear sampling at integer offsets is an exact
    copy, so the digit is written by a scatter instead and the clutter patches by a max-scatter over it.
    whole_pixel: see `_whole_pixel_shift` (`distort` passes it, so training never waits on the device).
    """
    batch = len(digits)
    clutter = None
    if "clutter_index" in params:
        if clutter_source is None:
            raise ValueError("these params include clutter: pass clutter_source (the split's digits)")
        clutter = _clutter_pixels(clutter_source, params, size, clutter_size)
    shift = _whole_pixel_shift(params, size, whole_pixel)
    if shift is not None and size == DIGIT and clutter is None:
        return _as_float(digits)  # plain MNIST: nothing to move
    if shift is not None:
        target = (shift[:, 1] * size + shift[:, 0])[:, None] + _patch_offsets(DIGIT, size, digits.device)  # (B, 784)
        canvas = torch.zeros(batch, size * size, device=digits.device)
        canvas.scatter_(1, target, _as_float(digits).reshape(batch, -1))
        if clutter is not None:  # amax with the canvas: clutter never darkens a digit pixel
            canvas.scatter_reduce_(1, clutter[0], clutter[1], reduce="amax")
        return canvas.reshape(batch, 1, size, size)
    # A projective draw can put an output pixel exactly on its horizon (denominator 0: an infinite or NaN
    # source point; seen once in 1103 P batches of seed 2). Such a point lies beyond the digit: send it far
    # outside the source, where the sampler's zero padding shows background. Finite points are untouched.
    grid = torch.nan_to_num(source_grid(params, size), nan=HORIZON, posinf=HORIZON, neginf=-HORIZON)
    images = sample(_as_float(digits), grid)
    if clutter is not None:
        canvas = torch.zeros(batch, size * size, device=digits.device)
        canvas.scatter_reduce_(1, clutter[0], clutter[1], reduce="amax")
        images = torch.maximum(images, canvas.reshape(batch, 1, size, size))  # clutter never darkens the digit
    return images


def _as_float(digits: Tensor) -> Tensor:
    """(B, 28, 28) uint8 or float in [0, 1] -> (B, 1, 28, 28) float32 in [0, 1]."""
    if digits.dtype == torch.uint8:
        return digits.unsqueeze(1).to(torch.float32).div_(255.0)
    return digits.unsqueeze(1).to(torch.float32)
