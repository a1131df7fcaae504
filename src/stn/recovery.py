"""Distortion recovery: how consistently a spatial transformer undoes the known distortion of each test digit.

Every test sample carries its distortion (`stn.warp`: `source_points(params, q)` maps a point q of the
distorted canvas to the point of the undistorted digit shown there). The transformer's sampling grid T maps
each point g of its output to a point T(g) of its input (the distorted canvas). Their composition

    C(g) = D(T(g))   (transformer output point -> undistorted digit point)

says which digit point the transformer shows at g: its output is the digit warped by C. A transformer that
undoes every distortion makes C the same map for every digit, not necessarily the identity: the paper's
transformers rectify to a "mean pose". So the metric is the spread of C around its mean over the test set:

- **pose**: C is fitted by an affine map (least squares over the output grid points whose C(g) lies in the
  digit's 28x28 frame, where the output shows the digit), and its inverse, the
  forward map digit -> output, is read as the pose the digit is shown in, in the datasets' own convention
  (`stn.warp`: output = position + scale * Rot(angle) digit, angles counter-clockwise on screen, px): for the
  identity transformer the pose is exactly the drawn distortion (R: the drawn angle; RTS: angle, scale,
  translation). Spread: rotation_std_deg (about the circular mean), log_scale_std (natural log),
  position_rms_px (root mean square distance of the digit centre's output position from its mean, output px).
- **grid_residual_px**: mean of |C_i(g) - M(g)| in digit pixels over the pairs (sample i, output point g) where
  C_i(g) lies in the digit's 28x28 frame (the output shows the digit there, not the empty background), with
  M(g) the mean of those C_i(g) at g: what is left after removing the mean map (P, E, anything non-affine).
  The frame also keeps out the points near a homography's horizon, whose sources run off to infinity.

Headline per dataset: R rotation_std_deg; RTS rotation_std_deg, log_scale_std, position_rms_px; P, E (and
plain) grid_residual_px; TC position_rms_px. Overall, and per class (each class around its own mean, with the
class's mean pose). `before` is the same measured for the identity transformer: the distortion's own spread
(R: about 52 deg, the std of U(-90, 90)). Units: output px are the transformer's output pixels (for the
default output size, the canvas's); digit px are the 28x28 digit's.

A sample with fewer than MIN_POINTS grid points in the digit's frame (the transformer shows it tiny, or
elsewhere; a homography may also throw it away) is "lost" for the pose: counted (lost_fraction) and left out
of the pose statistics. Affine maps are fitted exactly, so for R, RTS and TC the fit is no approximation. For
transformer.placement=features the grid lives on feature maps, whose coordinates are taken as the image's
(approximate: `approximate` is set). Parallel transformers: the first one is measured.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from stn.config import DIGIT, Config
from stn.data import TestSet
from stn.spatial import target_points
from stn.warp import source_points

POINTS = 12  # at most POINTS x POINTS output grid points per sample (evenly spread pixel centres)
MIN_POINTS = 6  # grid points in the digit's frame needed to fit a sample's pose
HEADLINE = {
    "R": ("rotation_std_deg",),
    "RTS": ("rotation_std_deg", "log_scale_std", "position_rms_px"),
    "P": ("grid_residual_px",),
    "E": ("grid_residual_px",),
    "TC": ("position_rms_px",),
    "plain": ("grid_residual_px",),
}


def headline_keys(dataset: str) -> tuple[str, ...]:
    """The metrics that summarise recovery on `dataset` (P's readings, P_box etc., count as P)."""
    base = dataset.split("_")[0]
    return HEADLINE.get(base, ("grid_residual_px",))


def point_indices(height: int, width: int) -> Tensor:
    """Flat indices of at most POINTS x POINTS evenly spread pixels of an H x W output grid (row-major)."""
    rows = torch.linspace(0, height - 1, min(POINTS, height)).round().long().unique()
    cols = torch.linspace(0, width - 1, min(POINTS, width)).round().long().unique()
    return (rows[:, None] * width + cols[None, :]).reshape(-1)


def in_frame(composed: Tensor) -> Tensor:
    """(B, N) bool: composed (B, N, 2) digit px from the centre lies in the 28x28 digit frame (finite)."""
    return torch.isfinite(composed).all(-1) & (composed.abs().amax(-1) <= DIGIT / 2)


def _pose(composed: Tensor, output: Tensor, inside: Tensor) -> dict[str, Tensor]:
    """Weighted least-squares affine fit digit_px = A output_px + b per sample over its `inside` points, and the
    forward pose from its inverse. composed (B, N, 2) digit px, output (N, 2) output px (both from their
    centres), inside (B, N) bool; float64.
    """
    weight = inside.double()[..., None]  # (B, N, 1)
    design = torch.cat([output, torch.ones_like(output[:, :1])], dim=1) * weight  # (B, N, 3)
    target = torch.where(inside[..., None], composed, 0.0)  # weight 0 (and no inf) outside
    fit = torch.linalg.pinv(design) @ target  # (B, 3, 2): rows A^T (2) and b (1)
    linear, shift = fit[:, :2].transpose(1, 2), fit[:, 2]  # A (B, 2, 2), b (B, 2)
    forward = torch.linalg.inv(linear)  # digit -> output: M = s Rot(angle), Rot = [[c, s], [-s, c]]
    angle = torch.rad2deg(torch.atan2(forward[:, 0, 1] - forward[:, 1, 0], forward[:, 0, 0] + forward[:, 1, 1]))
    log_scale = 0.5 * torch.log(torch.linalg.det(forward).abs())
    position = -(forward @ shift[..., None])[..., 0]  # where the digit centre is shown (output px)
    return {"angle_deg": angle, "log_scale": log_scale, "position": position}


def grid_residual(composed: Tensor) -> float:
    """composed (B, N, 2) digit px from the centre (may hold inf/nan) -> the framed residual (module docstring)."""
    inside = in_frame(composed)  # (B, N)
    weight = inside.double()[..., None]
    values = torch.where(inside[..., None], composed, 0.0)
    count = weight.sum(0)  # (N, 1)
    mean_map = values.sum(0) / count.clamp_min(1)  # (N, 2)
    distance = (values - mean_map).norm(dim=-1) * inside  # (B, N)
    return float(distance.sum() / inside.sum()) if bool(inside.any()) else math.nan


def _spread(pose: dict[str, Tensor], composed: Tensor) -> dict[str, Any]:
    """Spread around the mean: pose (tensors over the kept samples), composed (B, N, 2) over all samples."""
    if len(pose["angle_deg"]) == 0:  # every sample of this set lost for the pose
        nan = math.nan
        return {"count": len(composed), "pose_count": 0, "rotation_mean_deg": nan, "rotation_std_deg": nan,
                "scale_mean": nan, "log_scale_std": nan, "position_mean_px": [nan, nan], "position_rms_px": nan,
                "grid_residual_px": grid_residual(composed)}
    angle = torch.deg2rad(pose["angle_deg"])
    mean_angle = torch.atan2(torch.sin(angle).mean(), torch.cos(angle).mean())
    residual = torch.remainder(angle - mean_angle + math.pi, 2 * math.pi) - math.pi  # wrapped to [-pi, pi)
    position = pose["position"]
    mean_position = position.mean(0)
    return {
        "count": len(composed),
        "pose_count": len(angle),
        "rotation_mean_deg": math.degrees(float(mean_angle)),
        "rotation_std_deg": math.degrees(float(residual.pow(2).mean().sqrt())),
        "scale_mean": math.exp(float(pose["log_scale"].mean())),
        "log_scale_std": float(pose["log_scale"].std(unbiased=False)),
        "position_mean_px": [float(mean_position[0]), float(mean_position[1])],
        "position_rms_px": float((position - mean_position).pow(2).sum(-1).mean().sqrt()),
        "grid_residual_px": grid_residual(composed),
    }


def recovery_from_grids(grid: Tensor, output_points: Tensor, output_size: tuple[int, int],
                        params: dict[str, Tensor], labels: Tensor, dataset: str) -> dict[str, Any]:
    """The recovery metrics from the transformer's grid at some output points.

    grid (B, N, 2): T(g) for the N output points g = output_points (N, 2) (normalised, output frame), in the
    transformer's input's normalised coordinates; output_size (H', W') of the transformer's output; params:
    the B samples' distortion params (`TestSet.params`); labels (B,).
    """
    composed = source_points(params, grid.double()) * (DIGIT / 2)  # (B, N, 2) digit px from the digit centre
    inside = in_frame(composed)
    kept = inside.sum(1) >= MIN_POINTS
    height, width = output_size
    output = output_points.double() * torch.tensor([width / 2, height / 2], dtype=torch.float64)  # output px
    labels = labels.cpu()
    result: dict[str, Any] = {
        "dataset": dataset,
        "headline": list(headline_keys(dataset)),
        "samples": int(len(kept)),
        "lost_fraction": float(1 - kept.double().mean()) if len(kept) else 0.0,
        "points": int(output_points.shape[0]),
    }
    if not bool(kept.any()):
        return result
    pose = _pose(composed[kept], output, inside[kept])
    result["overall"] = _spread(pose, composed)
    result["per_class"] = {}
    for label in sorted(set(labels.tolist())):
        mask = labels == label
        result["per_class"][str(label)] = _spread({key: value[mask[kept]] for key, value in pose.items()},
                                                  composed[mask])
    return result


def identity_grid(test_set: TestSet, output_size: tuple[int, int], index: Tensor) -> Tensor:
    """(B, N, 2): the identity transformer's grid at the chosen output points (output = input frame)."""
    points = target_points(*output_size, dtype=torch.float64)[index]
    return points.expand(len(test_set), *points.shape)


@torch.no_grad()
def recovery_summary(model: Any, test_set: TestSet, cfg: Config, batch_size: int | None = None) -> dict[str, Any]:
    """Recovery of the model's first transformer on `test_set`, with `before` (the identity transformer).

    Returns {} for a model without a transformer. `model.trace(images).grid` gives T(G); the model is put
    in eval mode for the measurement and back in its previous mode afterwards.
    """
    transformers = getattr(model, "transformers", None)
    if not transformers:
        return {}
    batch_size = batch_size or cfg.trainer.eval_batch_size
    was_training = model.training
    model.eval()
    grids, index, size = [], None, None
    try:
        for images, _ in test_set.batches(batch_size):
            grid = model.trace(images).grid  # (B, H', W', 2)
            if index is None:
                size = (grid.shape[1], grid.shape[2])
                index = point_indices(*size).to(grid.device)
            grids.append(grid.reshape(len(grid), -1, 2).index_select(1, index).double().cpu())
    finally:
        model.train(was_training)
    assert index is not None and size is not None
    index = index.cpu()
    points = target_points(*size, dtype=torch.float64)[index]
    params = {key: value.cpu() for key, value in test_set.params.items()}
    labels = test_set.labels.cpu()
    summary = recovery_from_grids(torch.cat(grids), points, size, params, labels, cfg.dataset.name)
    before = recovery_from_grids(identity_grid(test_set, size, index), points, size, params, labels,
                                 cfg.dataset.name)
    summary["before"] = {key: before[key] for key in ("overall", "lost_fraction") if key in before}
    summary["output_size"] = list(size)
    summary["approximate"] = cfg.transformer.placement == "features"
    return summary


def flat_summary(summary: dict[str, Any], prefix: str = "recovery") -> dict[str, float]:
    """The headline metrics, after and before, as flat keys for run summaries and W&B ({} if no transformer)."""
    if not summary or "overall" not in summary:
        return {}
    flat = {}
    for key in summary["headline"]:
        flat[f"{prefix}/{key}"] = summary["overall"][key]
        if "overall" in summary.get("before", {}):
            flat[f"{prefix}/before/{key}"] = summary["before"]["overall"][key]
    if "rotation_std_deg" in summary["headline"]:
        flat[f"{prefix}/rotation_mean_deg"] = summary["overall"]["rotation_mean_deg"]
    flat[f"{prefix}/lost_fraction"] = summary["lost_fraction"]
    return flat


def headline_line(flat: dict[str, Any]) -> str:
    """One line from `flat_summary`'s keys: each headline metric after, with the identity transformer's value
    (the distortion's own spread) in brackets, e.g. 'rotation_std_deg 9.81 (identity 52.13)'; '' if none.
    For figure titles and W&B captions (stn.visualize, stn.tracking)."""
    prefix = "recovery/"
    parts = []
    for key, value in flat.items():
        name = key[len(prefix):]
        if (not key.startswith(prefix) or "/" in name or name in ("lost_fraction", "rotation_mean_deg")
                or not isinstance(value, (int, float))):  # recovery/error is text
            continue
        before = flat.get(f"{prefix}before/{name}")
        parts.append(f"{name} {value:.3g}" + ("" if before is None else f" (identity {before:.3g})"))
    return ", ".join(parts)


# What each headline metric measures, for a reader who has not read this module: the recovery line of
# `stn train`.
MEANINGS = {"rotation_std_deg": ("rotation spread", "°"), "log_scale_std": ("scale spread (log)", ""),
            "position_rms_px": ("position spread", " px"), "grid_residual_px": ("leftover distortion", " px")}


def meaning_line(flat: dict[str, Any]) -> str:
    """One line that says what the recovery numbers mean: each headline metric after the transformer against
    the untouched distortion's (the identity transformer's) value, lower being better, and the share of the
    spread removed, e.g. 'distortion recovery (lower is better; 0 = every digit shown in one pose): rotation
    spread 36.7° against 51.7° untouched (29% removed)'; '' without recovery keys."""
    parts = []
    for name, (label, unit) in MEANINGS.items():
        after, before = flat.get(f"recovery/{name}"), flat.get(f"recovery/before/{name}")
        if not isinstance(after, (int, float)) or not isinstance(before, (int, float)):
            continue
        removed = f" ({1 - after / before:.0%} removed)" if before > 0 else ""
        parts.append(f"{label} {after:.1f}{unit} against {before:.1f}{unit} untouched{removed}")
    if not parts:
        return ""
    return ("distortion recovery (lower is better; 0 = the transformer shows every digit in one pose): "
            + ", ".join(parts))


def format_summary(summary: dict[str, Any]) -> str:
    """A few readable lines: headline after vs before, the mean pose, and the per-class headline."""
    if not summary:
        return "no spatial transformer: nothing to measure"
    if "overall" not in summary:
        return f"all {summary['samples']} samples lost (the output never shows the digit's frame): nothing to measure"
    units = {"rotation_std_deg": "deg", "log_scale_std": "", "position_rms_px": "px", "grid_residual_px": "px"}
    after, before = summary["overall"], summary["before"].get("overall", {})
    note = " [approximate: features placement]" if summary.get("approximate") else ""
    lines = [f"recovery on {summary['dataset']} ({summary['samples']} test digits, {summary['points']} grid points "
             f"each; pose lost for {summary['lost_fraction']:.2%}){note}"]
    for key in summary["headline"]:
        was = f" (identity transformer: {before[key]:.3f})" if key in before else ""
        lines.append(f"  {key}: {after[key]:.3f} {units[key]}{was}")
    lines.append(f"  mean pose: rotation {after['rotation_mean_deg']:+.1f} deg, scale {after['scale_mean']:.3f}, "
                 f"position ({after['position_mean_px'][0]:+.2f}, {after['position_mean_px'][1]:+.2f}) px")
    for key in summary["headline"]:
        per_class = ", ".join(f"{label}: {row[key]:.2f}" for label, row in summary["per_class"].items())
        lines.append(f"  {key} per class: {per_class}")
    return "\n".join(lines)


def recovery_checkpoint(path: Any, data_dir: str | None = None, limit: int | None = None) -> dict[str, Any]:
    """Load a training checkpoint (`stn.checkpoints.load_model`, as `stn visualize` does); measure its recovery on
    its test set."""
    import os

    from stn.checkpoints import load_model
    from stn.config import DATA_DIR_ENV
    from stn.data import make_test_set
    from stn.mnist import load_mnist

    model, cfg, _ = load_model(path, need_transformer=True)
    root = data_dir or os.environ.get(DATA_DIR_ENV) or cfg.data_dir
    digits, labels = load_mnist(root, train=False, download=False)
    dataset = dataclasses.replace(cfg.dataset, test_limit=limit) if limit else cfg.dataset
    test_set = make_test_set(digits, labels, dataset)
    return recovery_summary(model, test_set, cfg)


def recovery_metrics(model: Any, test_set: TestSet, cfg: Config) -> dict[str, Any]:
    """`flat_summary(recovery_summary(...))` for a finished run's summary; never fails the run: an error is
    reported as recovery/error (text) instead."""
    try:
        return flat_summary(recovery_summary(model, test_set, cfg))
    except Exception as err:  # noqa: BLE001 - a metric must not lose a finished training
        return {"recovery/error": f"{type(err).__name__}: {err}"[:300]}
