"""Which conv path a group of the batched engine takes on a device ("vmap", "loop" or "im2col"), from the
size of the patch matrices its convolutions would build, and the options that path runs with.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from stn.config import Config
from stn.engine.options import EngineOptions

# Above this many bytes of explicit patches for one model's step, a group takes "loop" on CUDA (cuDNN's implicit
# GEMM never writes them). The patch matrix is written once and read once forward, and its gradient written and
# folded back once backward: ~4x its size in memory traffic, against a GEMM of only O (= 64) FLOP per patch
# element, so on a GPU each of these convolutions is bound by that traffic. At batch 256 in bf16 the CNN on TC's
# second conv has 612 MiB per model (1.8 GiB, ~1.9 GB, for K = 3); every other convolution of the table stays
# under 190 MiB (the CNN on RTS: 185 MiB).
IM2COL_PATCH_LIMIT = 256 * 2**20


def _conv_inputs(cfg: Config) -> tuple[tuple[int, int, int, int, int], ...]:
    """(C, H, W, kh, kw) of each convolution's input in one model, traced by one forward of one image (once
    per config up to its seed, which changes no shape)."""
    key = repr(dataclasses.replace(cfg, seed=0))
    if key in _CONV_INPUTS:
        return _CONV_INPUTS[key]
    from stn.models import build_model

    with torch.device("meta"):  # no initialisation (and no draw from the global generator)
        model = build_model(cfg, fast=False)
    model = model.to_empty(device="cpu")  # meta tensors cannot pass autocast's guard in the transformer
    seen: list[tuple[int, int, int, int, int]] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        c, h, w = inputs[0].shape[1:]
        seen.append((int(c), int(h), int(w), *module.kernel_size))  # type: ignore[union-attr]

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, cfg.dataset.size, cfg.dataset.size))  # values unused: shapes only
    finally:
        for handle in handles:
            handle.remove()
    _CONV_INPUTS[key] = tuple(seen)
    return _CONV_INPUTS[key]


_CONV_INPUTS: dict[str, tuple[tuple[int, int, int, int, int], ...]] = {}


def im2col_patch_bytes(cfg: Config, *, bytes_per_element: int = 2) -> int:
    """The largest patch matrix the "im2col" path builds for one model of `cfg` in one step, in bytes.

    batch * H' * W' * C * kh * kw elements of the biggest convolution (bf16 by default, what a GPU run's
    autocast builds); 0 for a model without convolutions (FCN, ST-FCN).
    """
    sizes = [(h - kh + 1) * (w - kw + 1) * c * kh * kw
             for c, h, w, kh, kw in _conv_inputs(cfg)]
    return max(sizes, default=0) * cfg.trainer.batch_size * bytes_per_element


def conv_path_for(cfg: Config, device_type: str) -> str:
    """The engine mode ("im2col" | "loop" | "vmap") a group of `cfg`'s models takes on `device_type`.

    - Not CUDA (the CPU): "vmap". oneDNN runs vmap's grouped convolutions well, and faster than the explicit
      im2col (measured outside the repo; experiments/bench/engine.md); vmap is the path the CPU table ran.
    - CUDA, no convolution anywhere (FCN, ST-FCN: Linear layers only, in the classifier and in the
      localisation net): "vmap". Its batching rules make each layer one batched matmul, which is all the
      im2col path would do, and it is the path the finished FCN cells ran on the H200.
    - CUDA, convolutions (CNN, ST-CNN: the classifier's, and the localisation net's for ST-CNNs, every
      transformer, every P reading and canvas): "im2col" while its largest patch matrix per model and step
      stays under IM2COL_PATCH_LIMIT, else "loop" (each model through cuDNN's own convolutions, cudnn.benchmark
      on; `options_for_mode` adds channels_last). At the paper's batch of 256 that is: R, P (every reading),
      E (largest 24.5 MiB) and RTS (42 px; the CNN's 185 MiB) im2col for every conv kind; TC (60 px) loop for
      the CNN (612 MiB) and im2col for the ST-CNNs, whose classifier reads the transformer's output pooled to
      30 px and whose localisation net reads the input max-pooled to 30 px (largest 39.5 MiB).
    """
    if device_type != "cuda" or im2col_patch_bytes(cfg) == 0:
        return "vmap"
    return "im2col" if im2col_patch_bytes(cfg) <= IM2COL_PATCH_LIMIT else "loop"


def options_for_mode(options: EngineOptions, mode: str, device_type: str) -> EngineOptions:
    """`options` running `mode`; on CUDA, "loop" also gets channels_last (cuDNN's NHWC convolutions are its
    fast ones for bf16)."""
    options = dataclasses.replace(options, mode=mode)
    if mode == "loop" and device_type == "cuda":
        options = dataclasses.replace(options, channels_last=True)
    return options
