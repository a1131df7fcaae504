"""A CPU-only speed-up of one layer: the classification net's first convolution behind a spatial transformer.

Why it exists: the gradient that reaches theta flows back through the classification net's first conv into the
sampler, so that conv needs its input gradient; for a one-channel input, oneDNN's backward-data kernel is
several times slower than computing it as one batched matmul + col2im (experiments/bench/train.md, Intel Xeon).
It is kept because float32 is what the CPU trains in wherever it lacks bf16 hardware, and there it still pays
(experiments/bench/precision.md: ST-CNN Aff step 1.28x, TPS 1.10x on a 2-core AVX2 AMD EPYC). Elsewhere (no
input gradient needed, autocast, CUDA, torch.func transforms of the batched engine, which builds models with
fast=False) `InputGradConv2d` is plain nn.Conv2d. Same parameters and state dict; values and gradients agree
with nn.Conv2d to float rounding (tests/test_fastconv.py, float64).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class InputGradConv2d(nn.Conv2d):
    """nn.Conv2d whose input gradient, on the CPU in float32, is one batched matmul and a col2im.

    Same parameters, initialisation and forward as nn.Conv2d. Only the backward differs, and only where the
    input needs a gradient (the classification net's first conv behind a spatial transformer: the gradient
    flows on into the sampler and the grid). There oneDNN's backward-data kernel for a one-channel input is
    several times slower than the matmul + `fold_patches` (experiments/bench/train.md); the results agree to
    float rounding (tests/test_fastconv.py). Elsewhere (no input gradient, autocast, CUDA) it is nn.Conv2d.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        cpu_float32 = x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
        if cpu_float32 and x.requires_grad and torch.is_grad_enabled():
            return _ConvFoldInputGrad.apply(x, self.weight, self.bias)
        return super().forward(x)


class _ConvFoldInputGrad(torch.autograd.Function):
    """conv2d (stride 1, no padding) with grad_input = fold(W^T @ grad_output); see InputGradConv2d."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        out_channels = weight.shape[0]
        grad_x = None
        if ctx.needs_input_grad[0]:
            batch = grad.shape[0]
            if grad.is_contiguous(memory_format=torch.channels_last) and not grad.is_contiguous():
                # (B, O, H'W') as a transposed view of the NHWC memory: bmm reads it in place, no copy
                flat = grad.permute(0, 2, 3, 1).reshape(batch, -1, out_channels).transpose(1, 2)
            else:
                flat = grad.reshape(batch, out_channels, -1)  # (B, O, H'W')
            transposed = weight.reshape(out_channels, -1).t().expand(batch, -1, -1)  # (B, C*kh*kw, O)
            columns = torch.bmm(transposed, flat)  # (B, C*kh*kw, H'W'): each output pixel's patch gradient
            grad_x = fold_patches(columns, x.shape, weight.shape[-2:])  # (B, C, H, W)
        _, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x, weight, [out_channels], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        return grad_x, grad_w, grad_b


def fold_patches(columns: Tensor, shape: torch.Size, kernel: torch.Size) -> Tensor:
    """F.fold for stride 1, no padding: sum each output pixel's (C, kh, kw) patch back into the input.

    columns (B, C*kh*kw, H'*W') -> (B, C, H, W). Done as kw shifted adds along x, then kh along y, on
    contiguous slices: twice as fast on the CPU as F.fold's per-element col2im (experiments/bench/train.md).
    """
    batch, channels, height, width = shape
    kh, kw = kernel
    out_h, out_w = height - kh + 1, width - kw + 1
    patches = columns.reshape(batch, channels, kh, kw, out_h, out_w)
    rows = columns.new_zeros(batch, channels, kh, out_h, width)  # the x-sums, one per kernel row
    for j in range(kw):
        rows[..., j:j + out_w] += patches[:, :, :, j]
    summed = columns.new_zeros(batch, channels, height, width)
    for i in range(kh):
        summed[:, :, i:i + out_h] += rows[:, :, i]
    return summed
