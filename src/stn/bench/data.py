"""`stn bench data`: distorted images/s, our batched generator against per-image torchvision transforms.

The reference is what one would write with torchvision: `datasets.MNIST` + per-image transforms (PIL,
`torchvision.transforms.v2`) doing the same distortion (`ReferenceDistortion`), batched by a `DataLoader`;
`stn bench` trains its reference side on the same pipeline. Ours is `stn.data.TrainStream` (one grid_sample
per batch), exactly what training consumes. Both are timed side by side in one process over the same number
of images; the ratio is ours (CPU) / the faster reference setting.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from stn.compose import compose
from stn.config import DIGIT, DatasetConfig
from stn.data import TrainStream
from stn.device import sync
from stn.mnist import load_mnist
from stn.spatial import ALIGN_CORNERS, tps_control_points, tps_grid

DATASETS = ("plain", "R", "RTS", "P", "E", "TC")


@dataclass
class ReferenceDistortion:
    """One PIL digit -> (1, S, S) float tensor, drawing the same distortion as `stn.distortions.draw_distortion`."""

    cfg: DatasetConfig
    pool: Tensor | None = None  # uint8 (N, 28, 28) digits that TC's clutter is cut from

    def __post_init__(self) -> None:
        if self.cfg.clutter and self.pool is None:
            raise ValueError(f"dataset {self.cfg.name}: clutter needs a pool of digits to cut it from (pool=None)")

    def __call__(self, image: Any) -> Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        cfg, size = self.cfg, self.cfg.size
        bilinear = InterpolationMode.BILINEAR
        angle = random.uniform(-cfg.rotation, cfg.rotation)
        scale = random.uniform(cfg.scale_min, cfg.scale_max)
        if cfg.clutter:  # TC: whole-pixel paste into the canvas, then clutter patches composed with max
            canvas = torch.zeros(1, size, size)
            y, x = random.randint(0, size - DIGIT), random.randint(0, size - DIGIT)
            canvas[0, y:y + DIGIT, x:x + DIGIT] = TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)[0]
            c = cfg.clutter_size
            for _ in range(cfg.clutter):
                other = self.pool[random.randrange(len(self.pool))]
                cy, cx = random.randint(0, DIGIT - c), random.randint(0, DIGIT - c)
                py, px = random.randint(0, size - c), random.randint(0, size - c)
                patch = other[cy:cy + c, cx:cx + c].float() / 255
                canvas[0, py:py + c, px:px + c] = torch.maximum(canvas[0, py:py + c, px:px + c], patch)
            return canvas
        if size > DIGIT:
            image = TF.pad(image, [(size - DIGIT) // 2])
        room = size / 2 - DIGIT / 2 * scale if cfg.translate else 0.0
        translate = [random.uniform(-room, room), random.uniform(-room, room)]
        if angle or scale != 1 or room:
            image = TF.affine(image, angle=angle, translate=translate, scale=scale, shear=[0.0, 0.0],
                              interpolation=bilinear)
        if cfg.corner_std > 0:
            corners = [[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]]
            moved = [[x + random.gauss(0, cfg.corner_std), y + random.gauss(0, cfg.corner_std)] for x, y in corners]
            image = TF.perspective(image, corners, moved, interpolation=bilinear)
        tensor = TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)  # (1, S, S)
        if cfg.tps_std > 0:  # per-image thin plate spline: the same warp, one image at a time
            control = tps_control_points(cfg.tps_grid)
            offsets = torch.tensor([[random.gauss(0, cfg.tps_std) for _ in range(2)] for _ in range(len(control))])
            theta = (control + offsets * 2 / size).reshape(1, -1)
            grid = tps_grid(theta, size, size, grid=cfg.tps_grid)
            tensor = F.grid_sample(tensor[None], grid, align_corners=ALIGN_CORNERS)[0]
        return tensor


def _time_reference(root: str, cfg: DatasetConfig, images: int, batch_size: int, workers: int) -> float:
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import MNIST

    dataset = MNIST(root, train=True, download=False)
    dataset.transform = ReferenceDistortion(cfg, dataset.data if cfg.clutter else None)
    loader = DataLoader(Subset(dataset, range(images)), batch_size=batch_size, shuffle=True, num_workers=workers)
    start = time.perf_counter()  # includes worker start-up: a DataLoader pays it every epoch
    seen = sum(len(labels) for _, labels in loader)
    return seen / (time.perf_counter() - start)


def _time_ours(digits: Tensor, labels: Tensor, cfg: DatasetConfig, images: int, batch_size: int,
               device: torch.device, min_seconds: float) -> float:
    stream = TrainStream(digits, labels, cfg, batch_size, seed=0, device=device)
    stream.next()  # warm-up (first-call allocations, CUDA kernels)
    sync(device)
    seen, start = 0, time.perf_counter()
    while seen < images or time.perf_counter() - start < min_seconds:
        seen += len(stream.next()[1])
    sync(device)
    return seen / (time.perf_counter() - start)


def bench_data(root: str, images: int = 8192, batch_size: int = 256, workers: tuple[int, ...] = (0, 2),
               datasets: tuple[str, ...] = DATASETS, min_seconds: float = 0.5,
               threads: int | None = None) -> list[dict[str, Any]]:
    """Images/s per dataset: ours on the CPU (and CUDA if present) beside the per-image reference.

    `threads` sets torch's intra-op threads for the whole measurement (None: torch's default); the
    reference's DataLoader workers run one thread each regardless. Returns one row per dataset:
    {"dataset", "ours_cpu", "ours_cuda" (or None), "ref_w{n}" per worker count, "ratio" = ours_cpu / the
    fastest reference}.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _bench_data(root, images, batch_size, workers, datasets, min_seconds)
    finally:
        torch.set_num_threads(previous)


def _bench_data(root: str, images: int, batch_size: int, workers: tuple[int, ...], datasets: tuple[str, ...],
                min_seconds: float) -> list[dict[str, Any]]:
    digits, labels = load_mnist(root, train=True)
    images = min(images, len(digits))
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for name in datasets:
        cfg = compose([f"dataset={name}"]).dataset
        row: dict[str, Any] = {"dataset": name, "ours_cuda": None}
        for device in devices:
            row[f"ours_{device.type}"] = _time_ours(digits, labels, cfg, images, batch_size, device, min_seconds)
        for count in workers:
            row[f"ref_w{count}"] = _time_reference(root, cfg, images, batch_size, count)
        row["ratio"] = row["ours_cpu"] / max(row[f"ref_w{count}"] for count in workers)
        rows.append(row)
    return rows


def format_data_table(rows: list[dict[str, Any]], workers: tuple[int, ...] = (0, 2)) -> str:
    """A Markdown table of `bench_data` rows (images/s, rounded)."""
    def fmt(value: float | None) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:,.0f}"

    head = ["dataset", "ours CPU", "ours CUDA"] + [f"torchvision, {n} workers" for n in workers] + ["ratio (CPU)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["dataset"], fmt(row["ours_cpu"]), fmt(row["ours_cuda"])]
        cells += [fmt(row[f"ref_w{n}"]) for n in workers] + [f"{row['ratio']:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
