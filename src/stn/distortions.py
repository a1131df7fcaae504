"""The random draws of each dataset (the paper's Appendix A): angles, scales, positions, corners, TPS offsets,
clutter. What is drawn, and from which ranges, is decided here; turning the draws into images is `stn.warp`'s.

RTS draws the translation per axis from U[-(S/2 - 14 scale), +(S/2 - 14 scale)], which keeps the scaled 28x28
box (before rotation) inside the canvas, and so the disc it inscribes at any angle, where MNIST's ink lies. P
stretches the 28x28 canvas corners along their diagonals by N(0, corner_std) px (conf/dataset/P.yaml; the
dataclass default, per axis, is P_axis, the first reading coded; `corner_frame` (canvas | image: the scaled
28x28 digit image's corners | box20: the central 20x20 box MNIST normalised its digits into, scaled |
digit_box: each digit's ink bounding box, scaled), `corner_direction` and `folded` select others, see
`draw_corners`). E moves the 4x4 TPS control points by N(0, tps_std) px. TC places the digit at a whole-pixel
position of the 60x60 canvas and draws six 6x6 patches (which digit, where in it, where on the canvas).
Every draw comes from the `torch.Generator` passed in (`stn.data` derives one per batch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from stn.config import DIGIT, DatasetConfig
from stn.validation import check_dataset
from stn.warp import distortion_params


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
    check_dataset(cfg)
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


def draws_whole_pixels(cfg: DatasetConfig) -> bool:
    """Whether `draw_distortion` only ever translates by whole pixels for cfg (plain, TC): no warp at all."""
    return cfg.rotation == 0 and cfg.scale_min == cfg.scale_max == 1 and cfg.corner_std == 0 and cfg.tps_std == 0
