"""The W&B sample images of a training (`stn.tracking.Tracker.log_images`): per test digit, the input enlarged
with the first transformer's sampling grid T(G) drawn over it (the lines of `stn visualize`), beside what the
transformer outputs; baselines show the enlarged input alone."""

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


def enlarge(images: Tensor, k: int) -> Tensor:
    """(B, H, W) -> (B, kH, kW) by pixel repetition, so 28-pixel digits stay legible in W&B."""
    return images.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2)
