"""Helpers shared by the distortion tests: a marked spot, its centroid, an independent homography, synthetic digits."""

from __future__ import annotations

import numpy as np
import torch


def blob(x: float, y: float, sigma: float = 1.2) -> torch.Tensor:
    """A (1, 28, 28) Gaussian spot centred at pixel (x, y)."""
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    return torch.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma**2))[None]


def centroid(image: torch.Tensor) -> tuple[float, float]:
    """Intensity-weighted (x, y) pixel position of a (1, 1, S, S) image."""
    image = image[0, 0].double()
    rows, cols = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in image.shape), indexing="ij")
    mass = image.sum()
    return float((image * cols).sum() / mass), float((image * rows).sum() / mass)


def pixel_homography(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Independent 4-point DLT in pixel coordinates (numpy), H[2, 2] = 1."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(source, target, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return np.append(np.linalg.solve(np.array(rows), np.array(rhs)), 1.0).reshape(3, 3)


def one(value: float) -> torch.Tensor:
    """A batch of one scalar parameter, e.g. one angle: tensor([value])."""
    return torch.tensor([value])


def synthetic_digits(count: int, seed: int = 0) -> torch.Tensor:
    """uint8 (N, 28, 28) random blobby 'digits' inside the central 20x20 box (like MNIST)."""
    generator = torch.Generator().manual_seed(seed)
    digits = torch.zeros(count, 28, 28, dtype=torch.uint8)
    digits[:, 4:24, 4:24] = (torch.rand(count, 20, 20, generator=generator) * 255).to(torch.uint8)
    return digits
