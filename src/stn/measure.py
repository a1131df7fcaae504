"""Measuring a device and a training step: FLOPs per training image, matmul peaks, host-device syncs.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over one training step (forward, loss,
backward); the device's peak is a matmul measured in the same process (float32, and bf16), and on CUDA also
the nominal dense peak of the GPU model from NVIDIA's data sheets. `stn bench` and `stn engine bench` turn
images/s into FLOP/s with these and show them against the peak; `count_syncs` counts the host-device
synchronisations torch reports on CUDA (the training step should make none).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from stn.config import Config
from stn.device import sync

# Nominal dense peaks in TFLOP/s (bf16 tensor cores, fp32), from NVIDIA's data sheets; first match on the
# device name wins, so the specific names come before "H100".
NOMINAL_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),  # SXM
    ("H200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
)


def nominal_peak(device_name: str) -> tuple[float, float] | None:
    """(bf16, fp32) nominal dense TFLOP/s of a GPU by name, or None if it is not in NOMINAL_PEAK_TFLOPS."""
    for key, bf16, fp32 in NOMINAL_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return bf16, fp32
    return None


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None,
                        repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` (size x size) @ (size x size) matmuls on `device`, after a warm-up."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def count_step_flops(model: torch.nn.Module, images: Tensor, labels: Tensor) -> int:
    """Floating-point operations of one training step (forward, loss, backward) on this batch.

    Counted by FlopCounterMode: 2 per multiply-add of every matmul and convolution, including the backward's
    weight gradients and the input gradients autograd needs; elementwise ops, pooling and sampling are free.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from stn.step import train_step

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the count leaves the weights as they are
    with FlopCounterMode(display=False) as counter:
        train_step(model, optimizer, images, labels)
    return int(counter.get_total_flops())


def model_flops_per_image(cfg: Config, batch: int = 4) -> float:
    """Training FLOPs per image of cfg's model (the paper's layer order, on the CPU, float32)."""
    from stn.models import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, fast=False)
    size = cfg.dataset.size
    images, labels = torch.rand(batch, 1, size, size), torch.arange(batch) % 10
    return count_step_flops(model, images, labels) / batch


@contextlib.contextmanager
def count_syncs(device: torch.device, state: dict[str, Any]) -> Iterator[None]:
    """On CUDA, count the host-device synchronisations torch reports (sync debug mode) into state['syncs'], and
    list the Python lines that caused them (file:line, the innermost frame that called into torch) in
    state['where']."""
    if device.type != "cuda":
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [warning for warning in caught if "synchroniz" in str(warning.message)]
    state["syncs"] += len(syncs)
    state.setdefault("where", []).extend(f"{os.path.basename(w.filename)}:{w.lineno}" for w in syncs)
