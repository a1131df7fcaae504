"""Distorted MNIST (the paper's Appendix A): batched distortion, training stream, fixed test set.

MNIST's files are `stn.mnist`'s; previews of these datasets are drawn by `stn.visualize`.

Each distortion is one sampling grid that maps every point of the OUTPUT canvas to a point of the SOURCE
28x28 digit (normalised coordinates, `align_corners=False`, see `stn.spatial`), so a whole batch is warped
by a single `grid_sample`, on the digits' device, with no per-image Python loop (whole-pixel translations,
plain and TC, are exact copies and done by a scatter instead). In pixel terms the forward map (digit ->
canvas) of R, RTS, plain and TC is

    canvas = centre_S + translation + scale * Rot(angle) (digit - centre_28)

with Rot counter-clockwise as seen on screen (y points down) and centre_n = (n - 1) / 2. RTS draws the
translation per axis from U[-(S/2 - 14 scale), +(S/2 - 14 scale)], which keeps the scaled 28x28 box (before
rotation) inside the canvas, and so the disc it inscribes at any angle, where MNIST's ink lies. P follows the
scaling with the homography taking the 28x28 canvas corners to corners stretched along their diagonals by
N(0, corner_std) px (conf/dataset/P.yaml; the dataclass default, per axis, is P_axis, the first reading coded;
`corner_frame` (canvas | image: the scaled 28x28 digit image's corners | box20: the
central 20x20 box MNIST normalised its digits into, scaled | digit_box: each digit's ink bounding box, scaled),
`corner_direction` and `folded` select others, see `draw_corners`), and
E follows it with a thin plate spline whose 4x4 control points sample the scaled digit at offsets drawn from
N(0, tps_std) px. TC pastes the digit at a whole-pixel position of the 60x60 canvas and composes six 6x6
patches of other digits with max(), so clutter never darkens a digit pixel.

Every random draw comes from an explicit `torch.Generator`; the training stream derives one per (seed,
epoch, batch index) and the test set one per (test_seed, chunk), so both are reproducible and resumable.
Draws are reproducible per device type (a CUDA generator gives other numbers than a CPU one), which is
why the test set is always generated on the CPU and then moved: CPU and GPU runs score the same digits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from stn.config import Config, ConfigError, DatasetConfig, dataset_problems
from stn.mnist import MNISTDataError, load_mnist  # noqa: F401 (MNISTDataError: re-exported with the data API)
from stn.spatial import affine_grid, projective_grid, sample, tps_control_points, tps_grid

DIGIT = 28  # side of an MNIST digit in pixels
TEST_CHUNK = 1000  # test-set generation chunk: bounds memory, and makes a limited test set a prefix of the full one
FIXED_CHUNK = 4096  # chunk for distorting the whole training set once (fixed_train)

# -------------------------------------------------------------------------------------------- distortion


def _check_dataset(cfg: DatasetConfig) -> None:
    """The config boundary's distortion checks (`stn.config.dataset_problems`), for configs built in code."""
    errors = dataset_problems(cfg)
    if errors:
        raise ConfigError(f"dataset {cfg.name}: " + "; ".join(errors))


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


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float,
             device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def canvas_corners(size: int, batch: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, 4, 2) pixel coordinates of the canvas's outer corners: top-left, top-right, bottom-right, bottom-left."""
    edge = torch.tensor([[-0.5, -0.5], [size - 0.5, -0.5], [size - 0.5, size - 0.5], [-0.5, size - 0.5]],
                        device=device)
    return edge.expand(batch, 4, 2).clone()


def digit_boxes(digits: Tensor) -> Tensor:
    """(B, 4, 2) digit-pixel corners (TL, TR, BR, BL) of each digit's ink bounding box (outer pixel edges).

    Ink = any pixel > 0. A blank digit gets the whole 28x28 box.
    """
    ink = digits.reshape(len(digits), DIGIT, DIGIT) > 0
    index = torch.arange(DIGIT, device=digits.device)
    cols, rows = ink.any(1), ink.any(2)  # (B, 28): columns / rows holding ink
    big = DIGIT + 1

    def span(mask: Tensor) -> tuple[Tensor, Tensor]:
        low = torch.where(mask, index, big).amin(1)
        high = torch.where(mask, index, -big).amax(1)
        blank = ~mask.any(1)
        return torch.where(blank, 0, low).double() - 0.5, torch.where(blank, DIGIT - 1, high).double() + 0.5

    (x0, x1), (y0, y1) = span(cols), span(rows)
    return torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1), torch.stack([x1, y1], -1),
                        torch.stack([x0, y1], -1)], 1)


def forward_points(size: int, angle_deg: Tensor, scale: Tensor, translation: Tensor, points: Tensor) -> Tensor:
    """Digit pixel coordinates (B, N, 2) -> where the affine part of the distortion puts them in the canvas (px).

    canvas = centre_S + translation + scale * Rot(angle) (digit - centre_28), Rot = [[c, s], [-s, c]] (counter-
    clockwise on screen, y down), in float64.
    """
    angle = torch.deg2rad(angle_deg.double())
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # (B, 2, 2)
    centred = points.double() - (DIGIT - 1) / 2
    moved = (centred @ rot.transpose(1, 2)) * scale.double()[:, None, None]
    return moved + translation.double()[:, None, :] + (size - 1) / 2


def quad_folded(quad: Tensor) -> Tensor:
    """(B, 4, 2) corners in the order TL, TR, BR, BL (y down) -> (B,) bool: the quad is not convex with the
    undistorted orientation (a turn of the boundary is not strictly clockwise on screen: a dent, a bow tie or a
    mirror image). A homography onto such a quad folds the plane inside it (its horizon crosses the quad)."""
    edges = quad.roll(-1, dims=1) - quad  # edge i: corner i -> corner i+1
    following = edges.roll(-1, dims=1)
    turn = edges[..., 0] * following[..., 1] - edges[..., 1] * following[..., 0]  # (B, 4) z of the cross products
    return ~(turn > 0).all(1)


MNIST_BOX = 20  # MNIST's digits were size-normalised into a 20x20 box, centred (by mass) in the 28x28 image
MAX_REDRAWS = 1000  # folded=redraw: rounds of redrawing before giving up (a fold has probability ~1e-2 per draw)


def draw_corners(cfg: DatasetConfig, points: Tensor, generator: torch.Generator) -> Tensor:
    """P: (B, 4, 2) px offsets for the corners `points` (B, 4, 2) (canvas px, TL, TR, BR, BL), per cfg's reading.

    per_axis: N(0, corner_std) independently in x and y (8 numbers per draw). diagonal: one N(0, corner_std)
    amount per corner, along the unit vector from the quad's centre to that corner (outward positive; 4 numbers).
    folded=redraw: draws whose moved quad is folded (`quad_folded`) are drawn again, all four corners, from the
    same generator until none is (deterministic, but a sync per round on CUDA).
    """
    batch, device = len(points), points.device

    def draw() -> Tensor:
        if cfg.corner_direction == "per_axis":
            return torch.randn(batch, 4, 2, generator=generator, device=device) * cfg.corner_std
        outward = points - points.mean(1, keepdim=True)
        unit = (outward / outward.norm(dim=-1, keepdim=True)).float()
        return torch.randn(batch, 4, generator=generator, device=device)[..., None] * cfg.corner_std * unit

    offsets = draw()
    if cfg.folded == "keep":
        return offsets
    for _ in range(MAX_REDRAWS):
        folded = quad_folded(points.double() + offsets.double())
        if not bool(folded.any()):
            return offsets
        offsets = torch.where(folded[:, None, None], draw(), offsets)
    raise RuntimeError(f"dataset {cfg.name}: still folded quads after {MAX_REDRAWS} redraws (corner_std too large?)")


def draw_distortion(cfg: DatasetConfig, batch: int, generator: torch.Generator, device: torch.device,
                    clutter_pool: int = 0, digits: Tensor | None = None) -> dict[str, Tensor]:
    """Draw one batch of random distortions for `cfg`; `clutter_pool` = how many digits clutter may come from.

    digits (B, 28, 28): needed only by P's corner_frame=digit_box reading (their ink boxes are the corners).
    """
    _check_dataset(cfg)
    size = cfg.size
    angle = _uniform(generator, (batch,), -cfg.rotation, cfg.rotation, device) if cfg.rotation else \
        torch.zeros(batch, device=device)
    if cfg.scale_min != cfg.scale_max:
        scale = _uniform(generator, (batch,), cfg.scale_min, cfg.scale_max, device)
    else:
        scale = torch.full((batch,), float(cfg.scale_min), device=device)
    if not cfg.translate:
        translation = torch.zeros(batch, 2, device=device)
    elif cfg.rotation == 0 and cfg.scale_min == cfg.scale_max == 1:
        # Unscaled, unrotated digits are placed at whole pixels: the paste is exact, with no resampling blur.
        top_left = torch.randint(0, size - DIGIT + 1, (batch, 2), generator=generator, device=device)
        translation = top_left.float() - (size - DIGIT) / 2
    else:
        # Uniform per axis over the positions that keep the scaled 28x28 box inside the canvas: |t| <= S/2 - 14 s.
        # The box's inscribed disc then stays inside whatever the rotation (MNIST ink lies within that disc).
        room = size / 2 - (DIGIT / 2) * scale  # (B,)
        translation = (torch.rand(batch, 2, generator=generator, device=device) * 2 - 1) * room[:, None]
    corners = tps = points = None
    default_reading = cfg.corner_frame == "canvas" and cfg.corner_direction == "per_axis" and cfg.folded == "keep"
    if cfg.corner_std > 0 and default_reading:  # P_axis, the first P: kept on its original code path (same bytes)
        corners = torch.randn(batch, 4, 2, generator=generator, device=device) * cfg.corner_std
    elif cfg.corner_std > 0:
        if cfg.corner_frame == "digit_box":
            if digits is None:
                raise ValueError(f"dataset {cfg.name}: corner_frame=digit_box needs the digits (pass digits=)")
            boxes = digit_boxes(digits.to(device))
            points = forward_points(size, angle, scale, translation, boxes).float()
        elif cfg.corner_frame in ("box20", "image"):
            side = MNIST_BOX if cfg.corner_frame == "box20" else DIGIT
            box = canvas_corners(side, batch, device).double() + (DIGIT - side) / 2
            points = forward_points(size, angle, scale, translation, box).float()
        else:
            points = canvas_corners(size, batch, device)
        corners = draw_corners(cfg, points, generator)
    if cfg.tps_std > 0:
        tps = torch.randn(batch, cfg.tps_grid ** 2, 2, generator=generator, device=device) * cfg.tps_std
    params = distortion_params(size, angle, scale, translation, corners, tps, corner_points=points)
    if cfg.clutter:
        if clutter_pool <= 0:
            raise ValueError(f"dataset {cfg.name} has clutter={cfg.clutter} patches: pass clutter_source (digits)")
        n, c = cfg.clutter, cfg.clutter_size
        params["clutter_index"] = torch.randint(0, clutter_pool, (batch, n), generator=generator, device=device)
        params["clutter_crop"] = torch.randint(0, DIGIT - c + 1, (batch, n, 2), generator=generator, device=device)
        params["clutter_position"] = torch.randint(0, size - c + 1, (batch, n, 2), generator=generator, device=device)
    return params


def _as_float(digits: Tensor) -> Tensor:
    """(B, 28, 28) uint8 or float in [0, 1] -> (B, 1, 28, 28) float32 in [0, 1]."""
    if digits.dtype == torch.uint8:
        return digits.unsqueeze(1).to(torch.float32).div_(255.0)
    return digits.unsqueeze(1).to(torch.float32)


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


def draws_whole_pixels(cfg: DatasetConfig) -> bool:
    """Whether `draw_distortion` only ever translates by whole pixels for cfg (plain, TC): no warp at all."""
    return cfg.rotation == 0 and cfg.scale_min == cfg.scale_max == 1 and cfg.corner_std == 0 and cfg.tps_std == 0


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


def distort(digits: Tensor, cfg: DatasetConfig, generator: torch.Generator,
            clutter_source: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Distort a batch of digits (B, 28, 28) into images (B, 1, S, S) float32 in [0, 1], on digits.device.

    Returns the images and the per-sample parameters (`distortion_params` plus, for TC, clutter_index
    (B, n), clutter_crop (B, n, 2) xy in the source digit and clutter_position (B, n, 2) xy top-left in the canvas).
    """
    device = digits.device
    if generator.device.type != device.type:
        raise ValueError(f"the generator is on {generator.device} but the digits are on {device}: use one device")
    if digits.dim() != 3 or digits.shape[1:] != (DIGIT, DIGIT):
        raise ValueError(f"digits must be (B, 28, 28), got {tuple(digits.shape)}")
    pool = 0 if clutter_source is None else len(clutter_source)
    params = draw_distortion(cfg, len(digits), generator, device, clutter_pool=pool, digits=digits)
    images = apply_distortion(digits, params, cfg.size, clutter_source, cfg.clutter_size,
                              whole_pixel=draws_whole_pixels(cfg))
    return images, params


# ------------------------------------------------------------------------------------- stream and test set


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple, e.g. (seed, 'batch', epoch, index): independent streams, no shared state."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(device: torch.device, *parts: int | str) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(*parts))
    return generator


class TrainStream:
    """Endless training batches: a fresh permutation per epoch, a fresh distortion per batch.

    Batch b of epoch e depends only on (seed, e, b), so `state_dict()` = (epoch, position) is enough to resume
    exactly. The last partial batch of an epoch is dropped (every step sees `batch_size` images). With
    cfg.fixed_train the training set is distorted once up front and each epoch only reshuffles it.
    Digits live on `device`, copied there once; the whole split stays there as the clutter source.
    """

    def __init__(self, digits: Tensor, labels: Tensor, cfg: DatasetConfig, batch_size: int, seed: int,
                 device: torch.device | str = "cpu") -> None:
        self.cfg, self.seed, self.device = cfg, int(seed), torch.device(device)
        _check_dataset(cfg)
        count = len(digits) if cfg.train_limit is None else min(cfg.train_limit, len(digits))
        if count <= 0 or not 0 < batch_size <= count:  # refused, never clamped: every batch is what was asked
            raise ValueError(f"need digits and a batch size in [1, {count}] (dataset.train_limit={cfg.train_limit}, "
                             f"batch_size={batch_size}, {len(digits)} digits)")
        all_digits = digits.to(self.device)
        self.clutter_source = all_digits if cfg.clutter else None
        self.digits, self.labels = all_digits[:count], labels[:count].to(self.device)
        self.batch_size = batch_size
        self.batches_per_epoch = count // self.batch_size
        self.epoch, self.position = 0, 0
        self._order: tuple[int, Tensor] | None = None
        self.fixed: Tensor | None = None
        if cfg.fixed_train:
            chunks = []
            for start in range(0, count, FIXED_CHUNK):
                generator = _generator(self.device, self.seed, "fixed", start // FIXED_CHUNK)
                chunks.append(distort(self.digits[start:start + FIXED_CHUNK], cfg, generator, self.clutter_source)[0])
            self.fixed = torch.cat(chunks)  # (N, 1, S, S), float32

    def _permutation(self) -> Tensor:
        if self._order is None or self._order[0] != self.epoch:
            generator = _generator(self.device, self.seed, "order", self.epoch)
            self._order = (self.epoch, torch.randperm(len(self.digits), generator=generator, device=self.device))
        return self._order[1]

    def next(self) -> tuple[Tensor, Tensor]:
        """The next (images (B, 1, S, S) float32, labels (B,) int64) on the stream's device."""
        index = self._permutation()[self.position * self.batch_size:(self.position + 1) * self.batch_size]
        if self.fixed is not None:
            images = self.fixed.index_select(0, index)
        else:
            generator = _generator(self.device, self.seed, "batch", self.epoch, self.position)
            images, _ = distort(self.digits.index_select(0, index), self.cfg, generator, self.clutter_source)
        labels = self.labels.index_select(0, index)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return images, labels

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "digits": len(self.digits),
                "batch_size": self.batch_size, "dataset": self.cfg.name, "fixed_train": self.cfg.fixed_train}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off; refuses a state saved by a differently configured stream."""
        mine = self.state_dict()
        for key in ("seed", "digits", "batch_size", "dataset", "fixed_train"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"data stream state has {key}={state[key]!r} but this stream has {mine[key]!r}: "
                                 "resume with the configuration the run was started with")
        if not 0 <= int(state["position"]) < self.batches_per_epoch:
            raise ValueError(f"data stream state position={state['position']} is outside [0, {self.batches_per_epoch})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


@dataclass
class TestSet:
    """The fixed, distorted test split: images (N, 1, S, S) float32, labels (N,) int64, params per sample."""

    __test__ = False  # not a pytest class, despite the name

    images: Tensor
    labels: Tensor
    params: dict[str, Tensor]

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self), batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]


def make_test_set(digits: Tensor, labels: Tensor, cfg: DatasetConfig, device: torch.device | str = "cpu") -> TestSet:
    """Distort the test digits, a pure function of cfg.test_seed (bytes identical on every call and machine).

    Generated on the CPU in chunks of TEST_CHUNK with one generator per chunk, then moved to `device`;
    with cfg.test_limit=n the set is the first n samples of the full set. Clutter comes from the whole split.
    """
    _check_dataset(cfg)
    digits, labels = digits.cpu(), labels.cpu()
    count = len(digits) if cfg.test_limit is None else min(cfg.test_limit, len(digits))
    if count <= 0:
        raise ValueError(f"dataset.test_limit={cfg.test_limit} leaves no test digits")
    clutter = digits if cfg.clutter else None
    images, params = [], []
    for start in range(0, count, TEST_CHUNK):
        generator = _generator(torch.device("cpu"), cfg.test_seed, "test", start // TEST_CHUNK)
        chunk_images, chunk_params = distort(digits[start:start + TEST_CHUNK], cfg, generator, clutter)
        images.append(chunk_images)
        params.append(chunk_params)
    device = torch.device(device)
    return TestSet(
        images=torch.cat(images)[:count].to(device),
        labels=labels[:count].to(device),
        params={key: torch.cat([p[key] for p in params])[:count].to(device) for key in params[0]},
    )


def build_data(cfg: Config, device: torch.device | str) -> tuple[TrainStream, TestSet]:
    """Load MNIST from cfg.data_dir and build the training stream and the fixed set the run evaluates on:
    the test set, or with dataset.validation=N the last N training digits (never trained on), distorted with
    test_seed + 1 so that no validation draw repeats a test draw."""
    train_digits, train_labels = load_mnist(cfg.data_dir, train=True, download=cfg.download)
    held = cfg.dataset.validation
    if held:
        keep = len(train_digits) - held
        stream = TrainStream(train_digits[:keep], train_labels[:keep], cfg.dataset, cfg.trainer.batch_size,
                             cfg.seed, device)
        seed = dataclasses.replace(cfg.dataset, test_seed=cfg.dataset.test_seed + 1)
        return stream, make_test_set(train_digits[keep:], train_labels[keep:], seed, device)
    test_digits, test_labels = load_mnist(cfg.data_dir, train=False, download=cfg.download)
    stream = TrainStream(train_digits, train_labels, cfg.dataset, cfg.trainer.batch_size, cfg.seed, device)
    return stream, make_test_set(test_digits, test_labels, cfg.dataset, device)
