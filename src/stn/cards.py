"""Dataset cards: what a distortion does to the digits, in numbers (`stn data card dataset=P --out cards/`).

Over the first `count` digits of a dataset's fixed test set (the same draws every machine sees), each digit's
distortion is rendered again, without clutter, into a canvas three times the dataset's side (the dataset's
canvas is its centre, pixel for pixel), and from it:

- **size** = sqrt(ink on the big canvas / ink of the undistorted 28x28 digit), ink = the sum of pixel values.
  Canvas and digit pixels have the same size, so this is the digit's linear scale as the ink sees it: 1 for
  the identity, s for a pure scaling by s (the bilinear sampler conserves ink up to its interpolation error,
  well under 1% for MNIST strokes), and for a homography the square root of its mean area change over the ink.
- **off-canvas** = the fraction of that ink that falls outside the dataset's canvas (0 when nothing is cut).
  Ink pushed beyond the big canvas too (only a folded homography throws ink that far) counts in neither.
  A draw whose ink all leaves the big canvas, or is squeezed between its sample points, has size 0, is 100% off
  the canvas and has no displacement (counted as **vanished**; it happens with P's digit_box reading).
- **ink displacement** (px) = the ink-weighted mean distance between where an ink pixel is shown and where it
  sits in the undistorted digit centred on the canvas: 0 for the identity, |s - 1| r for ink at radius r under a
  pure scaling, 2 r sin(angle / 2) under a rotation.
- P only: **folded** = the fraction of draws whose moved corners form a non-convex (or mirrored) quad
  (`stn.distortions.quad_folded`), where the homography folds the plane, and **corner displacement** (px) = the mean
  length of the corners' offsets. E only: **control displacement** (px) = the mean length of the 16 control
  points' offsets.

Every distribution is given as p5 / median / p95 and mean. The card is written as markdown, JSON and a PNG of
histograms. `card_stats` is the pure function on (digits, params) that the tests check against closed forms.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stn.config import DIGIT, Config
from stn.data import make_test_set
from stn.device import cpu_model
from stn.distortions import canvas_corners, quad_folded
from stn.mnist import load_mnist
from stn.spatial import norm_to_pixel, sample, target_points
from stn.warp import source_points

BIG = 3  # the re-rendering canvas is BIG times the dataset's side, the dataset's canvas at its centre
CHUNK = 200  # digits rendered at once (bounds memory: TC's big canvas has 180x180 points)
DEFAULT_COUNT = 5000


def _render_big(digits: Tensor, params: dict[str, Tensor], size: int) -> tuple[Tensor, Tensor]:
    """(images on the BIG*size canvas (B, BIG*S, BIG*S) float64, displacement of each big pixel (B, BIG*S, BIG*S))."""
    side = BIG * size
    big = target_points(side, side, dtype=torch.float64) * BIG  # big pixel centres, in the dataset canvas's coords
    source = source_points(params, big)  # (B, N, 2) normalised digit coordinates
    finite = torch.isfinite(source).all(-1, keepdim=True)
    grid = torch.where(finite, source, torch.full_like(source, 4.0))  # a homography's horizon: sample nothing
    images = sample(digits[:, None].double(), grid.reshape(-1, side, side, 2))[:, 0]
    shown = norm_to_pixel(big, size)  # (N, 2) canvas px of each big pixel's centre
    home = source * (DIGIT / 2) + (size - 1) / 2  # where that digit point sits in the centred undistorted digit
    displacement = (shown[None] - home).norm(dim=-1)
    displacement = torch.where(finite[..., 0], displacement, 0.0)
    return images, displacement.reshape(-1, side, side)


def card_stats(digits: Tensor, params: dict[str, Tensor], size: int,
               progress: Callable[[str], None] | None = None) -> dict[str, Tensor]:
    """Per-draw statistics (each (B,) float64) of digits (B, 28, 28) (uint8 or float in [0, 1]) warped by params.

    Keys: size, off_canvas, ink_displacement_px, and with P's params folded (0/1) and corner_displacement_px,
    with E's control_displacement_px. Definitions: the module docstring.
    """
    digits = digits.double() / 255.0 if digits.dtype == torch.uint8 else digits.double()
    rows: dict[str, list[Tensor]] = {"size": [], "off_canvas": [], "ink_displacement_px": []}
    for start in range(0, len(digits), CHUNK):
        part = {key: value[start:start + CHUNK] for key, value in params.items()}
        images, displacement = _render_big(digits[start:start + CHUNK], part, size)
        ink0 = digits[start:start + CHUNK].sum((1, 2))
        ink = images.sum((1, 2))
        inside = images[:, size:2 * size, size:2 * size].sum((1, 2))
        rows["size"].append((ink / ink0).sqrt())
        gone = ink <= 0  # the warp left no ink at the sampled points (see `vanished` in the module docstring)
        off = torch.where(gone, 1.0, (ink - inside).clamp_min(0) / ink)  # clamp: float rounding when nothing is cut
        rows["off_canvas"].append(off)
        rows["ink_displacement_px"].append(torch.where(gone, math.nan, (images * displacement).sum((1, 2)) / ink))
        done = min(start + CHUNK, len(digits))
        if progress is not None and (done % (5 * CHUNK) == 0 or done == len(digits)):  # every 1000 draws
            progress(f"measured {done}/{len(digits)} draws")
    stats = {key: torch.cat(value) for key, value in rows.items()}
    if "corner_offsets" in params:
        offsets = params["corner_offsets"].double()
        points = params.get("corner_points")
        points = canvas_corners(size, len(offsets)).double() if points is None else points.double()
        stats["folded"] = quad_folded(points + offsets).double()
        stats["corner_displacement_px"] = offsets.norm(dim=-1).mean(1)
    if "tps_offsets" in params:
        stats["control_displacement_px"] = params["tps_offsets"].double().norm(dim=-1).mean(1)
    return stats


def summarise(values: Tensor) -> dict[str, float]:
    """p5 / median / p95 / mean of a (B,) tensor (quantiles by linear interpolation, numpy's default)."""
    quantiles = torch.nanquantile(values.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return {"p5": float(quantiles[0]), "median": float(quantiles[1]), "p95": float(quantiles[2]),
            "mean": float(values.double().nanmean())}


def machine() -> str:
    """The CPU's model name and the torch version."""
    return f"{cpu_model()}, torch {torch.__version__}"


def build_card(cfg: Config, count: int = DEFAULT_COUNT,
               progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(the card as a JSON-able dict, the per-draw statistics) for cfg.dataset over its first `count` test draws;
    `progress` (if given) hears each stage and each measured chunk."""
    if count <= 0:
        raise ValueError(f"--count {count} must be positive")
    say = progress or (lambda _text: None)
    dataset = dataclasses.replace(cfg.dataset, test_limit=count)
    say(f"reading MNIST's test digits from {cfg.data_dir}")
    digits, labels = load_mnist(cfg.data_dir, train=False, download=cfg.download)
    say(f"distorting {min(count, len(labels))} test draws of {dataset.name}")
    test_set = make_test_set(digits, labels, dataset)
    count = len(test_set)
    stats = card_stats(digits[:count], test_set.params, dataset.size, progress)
    card: dict[str, Any] = {
        "dataset": dataset.name,
        "draws": count,
        "test_seed": dataset.test_seed,
        "config": {key: value for key, value in dataclasses.asdict(dataset).items()
                   if key not in ("train_limit", "test_limit", "fixed_train", "st_output_pool")},
        "machine": machine(),
        "stats": {key: summarise(value) for key, value in stats.items() if key != "folded"},
        "off_canvas_over_1pct": float((stats["off_canvas"] > 0.01).double().mean()),
        "vanished_fraction": float(torch.isnan(stats["ink_displacement_px"]).double().mean()),
    }
    if "folded" in stats:
        card["folded_fraction"] = float(stats["folded"].mean())
    return card, stats


LABELS = {
    "size": "digit size (sqrt ink ratio)",
    "off_canvas": "ink off the canvas (fraction)",
    "ink_displacement_px": "ink displacement (px)",
    "corner_displacement_px": "corner displacement (px)",
    "control_displacement_px": "control-point displacement (px)",
}


def card_markdown(card: dict[str, Any]) -> str:
    config = card["config"]
    hidden = {"corner_frame", "corner_direction", "folded"} if not config["corner_std"] else set()
    hidden |= {"tps_grid"} if not config["tps_std"] else set()
    hidden |= {"clutter_size"} if not config["clutter"] else set()
    shown = {key: value for key, value in config.items()
             if key not in hidden and (value not in (0, 0.0, False) or key == "rotation")}
    lines = [
        f"# Dataset card: {card['dataset']}",
        "",
        f"{card['draws']} draws of the fixed test set (test_seed {card['test_seed']}); definitions in "
        "`src/stn/cards.py`. Config: " + ", ".join(f"`{k}: {v}`" for k, v in shown.items() if k != "name") + ".",
        "",
        "| statistic | p5 | median | p95 | mean |",
        "|---|---|---|---|---|",
    ]
    for key, row in card["stats"].items():
        digits = 4 if key == "off_canvas" else 3
        lines.append(f"| {LABELS.get(key, key)} | " + " | ".join(f"{row[q]:.{digits}f}" for q in
                                                                  ("p5", "median", "p95", "mean")) + " |")
    lines += ["", f"- draws losing more than 1% of their ink off the canvas: {card['off_canvas_over_1pct']:.2%}"]
    if card.get("vanished_fraction"):
        lines.append(f"- draws that left no ink on the 3x canvas (size 0, off-canvas 1, no displacement): "
                     f"{card['vanished_fraction']:.2%}")
    if "folded_fraction" in card:
        lines.append(f"- folded (non-convex) corner quads: {card['folded_fraction']:.2%}")
    lines += [f"- machine: {card['machine']}", ""]
    return "\n".join(lines)


def card_png(card: dict[str, Any], stats: dict[str, Tensor], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key for key in LABELS if key in stats]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.6))
    for ax, key in zip(axes, keys, strict=True):
        values = stats[key][torch.isfinite(stats[key])].numpy()  # vanished draws have no displacement
        low, high = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
        span = (low, high) if high - low > 1e-6 else (low - 0.5, high + 0.5)  # e.g. plain: all exactly 1
        ax.hist(values, bins=60, range=span, color="tab:blue")
        ax.set_title(LABELS[key], fontsize=9)
        ax.tick_params(labelsize=7)
    if "off_canvas" in keys:
        axes[keys.index("off_canvas")].set_yscale("log")
    extra = f", folded {card['folded_fraction']:.2%}" if "folded_fraction" in card else ""
    fig.suptitle(f"{card['dataset']}: {card['draws']} test draws{extra}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def write_card(cfg: Config, out: str | Path, count: int = DEFAULT_COUNT, png: bool = True,
               progress: Callable[[str], None] | None = None) -> list[Path]:
    """Write <name>.md, <name>.json (and <name>.png) into the folder `out`, or beside the file `out` (x.md);
    `progress` hears each stage (the measurement takes seconds to minutes)."""
    out = Path(out)
    card, stats = build_card(cfg, count, progress)
    stem = out.with_suffix("") if out.suffix else out / card["dataset"]
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".md"), stem.with_suffix(".json")]
    paths[0].write_text(card_markdown(card))
    paths[1].write_text(json.dumps(card, indent=1) + "\n")
    if png:
        if progress is not None:
            progress("drawing the histograms")
        paths.append(stem.with_suffix(".png"))
        card_png(card, stats, paths[2])
    return paths
