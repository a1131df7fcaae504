"""The pictures W&B shows of a finished training, drawn here and handed by train.fit to
`stn.tracking.Tracker.log_pictures` (which only logs): per test digit, the input enlarged with the first
transformer's sampling grid T(G) drawn over it (the lines of `stn visualize`), beside what the transformer
outputs (baselines: the enlarged input alone), and for ST models the `stn visualize` figure."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

SAMPLE_SIDE = 112  # the W&B sample images' input side in pixels, roughly: 28 px digits are enlarged 4x


def _shown(maps: Tensor, images_channels: int) -> Tensor:
    """(B, C, H, W) -> (B, H, W) in [0, 1]: images as they are; feature maps (placement=features) as their
    channel mean, scaled to [0, 1] per sample."""
    if maps.shape[1] == images_channels:
        return maps[:, 0].float().clamp(0, 1)
    mean = maps.float().mean(1)
    low = mean.amin((1, 2), keepdim=True)
    high = mean.amax((1, 2), keepdim=True)
    return (mean - low) / (high - low).clamp_min(1e-12)


def sample_panels(model: nn.Module, images: Tensor) -> list[Any]:
    """Per image a uint8 RGB array (zH, W', 3), z = the enlargement: the input with the first transformer's
    sampling grid T(G) drawn over it (`stn.visualize.overlay_grid`: the lines of `stn visualize`), a white
    gap, and the transformer's output at the input's enlarged size. Baselines (no transformer): the enlarged
    input alone, grey. The model is evaluated in eval mode and left in the mode it was in."""
    import numpy as np

    from stn.visualize import overlay_grid

    height = images.shape[-2]
    zoom = max(2, round(SAMPLE_SIDE / height))
    if len(getattr(model, "transformers", ())) == 0:
        grey = enlarge(images[:, 0].float().cpu().clamp(0, 1), zoom)
        return [np.repeat((g * 255).round().to(torch.uint8).numpy()[..., None], 3, axis=2) for g in grey]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        trace = model.trace(images)
    model.train(was_training)
    source = _shown(trace.source.cpu(), images.shape[1])  # (B, h, w)
    output = _shown(trace.output.cpu(), images.shape[1])  # (B, h'', w'')
    panels = []
    for i in range(len(images)):
        left = overlay_grid(source[i], trace.grid[i].cpu(), max(1, round(zoom * height / source.shape[1])))
        size = left.shape[:2]
        right = nn.functional.interpolate(output[i][None, None], size=size, mode="nearest")[0, 0]
        right = np.repeat((right * 255).round().to(torch.uint8).numpy()[..., None], 3, axis=2)
        gap = np.full((size[0], 2 * zoom, 3), 255, dtype=np.uint8)  # a white line between the two
        panels.append(np.concatenate([left, gap, right], axis=1))
    return panels


def end_pictures(model: nn.Module, images: Tensor, labels: Tensor, caption: str) -> dict[str, Any]:
    """{"key": input_rectified (ST models) | input, "samples": [(panel, "label N")] (`sample_panels`),
    "transformations": the `stn visualize` figure of these digits titled `caption`, as an RGB PIL image (ST
    models; else None), "caption": caption}."""
    import tempfile
    from pathlib import Path

    from PIL import Image

    from stn.visualize import draw_transformations

    has_transformer = len(getattr(model, "transformers", ())) > 0
    if not len(images):  # logger.images=0: nothing to draw
        return {"key": "input", "samples": [], "transformations": None, "caption": caption}
    samples = [(panel, f"label {int(label)}")
               for panel, label in zip(sample_panels(model, images), labels.tolist(), strict=True)]
    figure = None
    if has_transformer:
        with tempfile.TemporaryDirectory() as tmp:
            path = draw_transformations(model, images, labels, Path(tmp) / "transformations.png", title=caption)
            with Image.open(path) as picture:
                figure = picture.convert("RGB")  # read now: the file goes with the folder
    return {"key": "input_rectified" if has_transformer else "input", "samples": samples,
            "transformations": figure, "caption": caption}


def enlarge(images: Tensor, k: int) -> Tensor:
    """(B, H, W) -> (B, kH, kW) by pixel repetition, so 28-pixel digits stay legible in W&B."""
    return images.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2)
