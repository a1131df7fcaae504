"""The batched engine's "im2col" path: K stacked models run layer by layer as explicit batched matmuls.

`vmap(functional_call)` turns K convolutions into one grouped convolution (`groups=K`), which cuDNN runs on a
slow path (pytorch/pytorch issues 70954, 95604). Here every convolution of the K models is written out:

- activations are kept channels-last, (K, B, H, W, C);
- a convolution (stride 1, no padding) is its patches times its weights: `Tensor.unfold` twice gives the
  (K, B, H', W', C, kh, kw) view without a copy, one reshape materialises the patch matrix
  (K, B*H'*W', kh*kw*C) (C innermost: contiguous reads), and one `torch.baddbmm` multiplies it by the
  weights (K, kh*kw*C, O) with the K models as the batch dimension and the bias (K, 1, O) as baddbmm's
  input (fused: no separate add). The result (K, B*H'*W', O) is already the next layer's channels-last map;
- conv -> ReLU -> max-pool 2 runs as conv -> max-pool -> ReLU (the same function: max and ReLU commute, and
  so do their gradients: see `stn.models.conv_relu_pool`), and pool + ReLU is one autograd Function
  (`PoolRelu`) that saves one uint8 per pooled element (which of the window's four inputs won, or 4 where
  the ReLU cut it) instead of max_pool2d's int64 indices and the ReLU's saved output;
- linear layers are `baddbmm` too (bias fused); a Flatten of a channels-last map permutes the next linear
  layer's weight (small) rather than the activations (large), so the values are the paper's NCHW flatten;
- a spatial transformer's theta, grid and sampling run in float32 with autocast off, as `SpatialTransformer`
  does; the K*B images are sampled by one `grid_sample`.

Under autocast (bf16, CPU or CUDA) the patch matrices are built in the autocast dtype (the copy is half the
bytes) and every baddbmm runs in it; the vmap path, on the CPU, does not honour autocast at all (see
`stn.engine.options.EngineOptions`). The values equal the single-model `stn train` step to float rounding
(tests/test_engine_paths.py, float64). Nothing here is a speed claim on the CPU, where oneDNN's grouped
convolutions are faster: the path exists for the GPU (experiments/bench/engine.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stn.models import DigitClassifier, Standardize
from stn.spatial import SpatialTransformer, make_grid, sample

Params = dict[str, Tensor]


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul in on x's device, or None when autocast is off there."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _lowered(x: Tensor) -> Tensor:
    """x in autocast's dtype where autocast is on (baddbmm casts to it anyway: cast before the big copy)."""
    dtype = _autocast_dtype(x)
    return x.to(dtype) if dtype is not None and x.is_floating_point() else x


# ---------------------------------------------------------------------------------------------- layers


def conv2d(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x (K, B, H, W, C) channels-last, weight (K, O, C, kh, kw), bias (K, O) -> (K, B, H', W', O).

    Stride 1, no padding (every convolution of these networks). patches @ weights + bias in one baddbmm.
    """
    k, batch, height, width, channels = x.shape
    out_channels, _, kh, kw = weight.shape[1:]
    out_h, out_w = height - kh + 1, width - kw + 1
    x = _lowered(x)
    windows = x.unfold(2, kh, 1).unfold(3, kw, 1)  # (K, B, H', W', C, kh, kw): a view
    patches = windows.permute(0, 1, 2, 3, 5, 6, 4).reshape(k, batch * out_h * out_w, kh * kw * channels)
    kernel = weight.permute(0, 3, 4, 2, 1).reshape(k, kh * kw * channels, out_channels)  # (K, kh*kw*C, O)
    out = torch.baddbmm(bias.unsqueeze(1), patches, kernel.to(patches.dtype))  # (K, B*H'*W', O)
    return out.view(k, batch, out_h, out_w, out_channels)


def linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x (K, B, in), weight (K, out, in), bias (K, out) -> (K, B, out): one baddbmm, bias fused."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


class PoolRelu(torch.autograd.Function):
    """2x2 max-pool (stride 2, floor or ceil) of a channels-last map, then optionally ReLU, as one step.

    Forward: the window's maximum, the first maximal element in row-major order (as max_pool2d picks it),
    found as the max over each row pair then over the rows (the first row holding the window's maximum, at
    its first position: the same element). Saved for backward: one uint8 code per output element, the
    winner's position 0..3 in the window, or 4 where the ReLU zeroed the output (maximum <= 0, where
    torch's ReLU passes no gradient). Backward: each input position gets grad * (code == its position).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, ceil: bool, relu: bool) -> Tensor:
        n, height, width, channels = x.shape
        if ceil and (height % 2 or width % 2):  # ceil mode: the last window reads only what exists
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2), value=float("-inf"))
        out_h, out_w = x.shape[1] // 2, x.shape[2] // 2
        x = x[:, : 2 * out_h, : 2 * out_w]
        windows = x.reshape(n, out_h, 2, out_w, 2, channels)
        row_max, column = windows.max(dim=4)  # (n, out_h, 2, out_w, C): the first max of each row pair
        best, row = row_max.max(dim=2)  # (n, out_h, out_w, C): the first row holding the maximum
        code = row * 2 + column.gather(2, row.unsqueeze(2)).squeeze(2)
        if relu:
            code = code.masked_fill(best <= 0, 4)
            best = best.clamp_min(0)
        ctx.save_for_backward(code.to(torch.uint8))
        ctx.shape = (n, height, width, channels)
        return best

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (code,) = ctx.saved_tensors
        n, height, width, channels = ctx.shape
        out_h, out_w = code.shape[1], code.shape[2]
        positions = torch.arange(4, device=code.device, dtype=torch.uint8).view(1, 1, 1, 1, 4)
        hit = code.unsqueeze(-1) == positions  # (n, out_h, out_w, C, 4)
        spread = grad.unsqueeze(-1) * hit  # (n, out_h, out_w, C, 4) ordered (dy, dx)
        spread = spread.view(n, out_h, out_w, channels, 2, 2).permute(0, 1, 4, 2, 5, 3)
        full = spread.reshape(n, 2 * out_h, 2 * out_w, channels)
        if full.shape[1] != height or full.shape[2] != width:  # ceil: drop the padding; floor: zero the rest
            trimmed = full.new_zeros(n, height, width, channels)
            h, w = min(height, 2 * out_h), min(width, 2 * out_w)
            trimmed[:, :h, :w] = full[:, :h, :w]
            full = trimmed
        return full, None, None


def pool_relu(x: Tensor, *, ceil: bool, relu: bool) -> Tensor:
    """(K, B, H, W, C) -> (K, B, H'', W'', C): 2x2 max-pool (then ReLU) through `PoolRelu`."""
    k, batch = x.shape[:2]
    out = PoolRelu.apply(x.flatten(0, 1), ceil, relu)
    return out.view(k, batch, *out.shape[1:])


# ------------------------------------------------------------------------------------------ the network


def _nhwc(x: Tensor) -> Tensor:
    """(K, B, C, H, W) (any memory layout) -> (K, B, H, W, C) contiguous; a view where C = 1."""
    return x.permute(0, 1, 3, 4, 2).contiguous()


def _nchw(x: Tensor) -> Tensor:
    """(K, B, H, W, C) -> (K, B, C, H, W) view of the same memory."""
    return x.permute(0, 1, 4, 2, 3)


class _Runner:
    """Walks one `DigitClassifier`'s module tree with the stacked parameters of K models."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def weight(self, prefix: str) -> tuple[Tensor, Tensor]:
        return self.params[f"{prefix}.weight"], self.params[f"{prefix}.bias"]

    def sequential(self, modules: list[tuple[str, nn.Module]], x: Tensor) -> Tensor:
        """x channels-last (K, B, H, W, C) or flat (K, B, F); the layers of `modules` in order."""
        i = 0
        flattened: tuple[int, int, int] | None = None  # (H, W, C) of a channels-last map just flattened
        while i < len(modules):
            name, module = modules[i]
            following = [type(m) for _, m in modules[i + 1: i + 3]]
            if isinstance(module, nn.Conv2d):
                x = conv2d(x, *self.weight(name))
                # conv -> ReLU -> pool (the paper's order) and conv -> pool -> ReLU (stn's fast order) are one
                # function: pool then ReLU in one step
                if following in ([nn.ReLU, nn.MaxPool2d], [nn.MaxPool2d, nn.ReLU]):
                    pool = next(m for _, m in modules[i + 1: i + 3] if isinstance(m, nn.MaxPool2d))
                    x = pool_relu(x, ceil=self._pool_ceil(pool), relu=True)
                    i += 3
                    continue
            elif isinstance(module, nn.MaxPool2d):
                x = pool_relu(x, ceil=self._pool_ceil(module), relu=False)
            elif isinstance(module, nn.ReLU):
                x = torch.relu(x)
            elif isinstance(module, nn.Flatten):
                if x.dim() == 5:
                    flattened = tuple(x.shape[2:])  # type: ignore[assignment]
                    x = x.flatten(2)  # (K, B, H*W*C): channels-last order, fixed up in the next linear
            elif isinstance(module, nn.Linear):
                weight, bias = self.weight(name)
                if flattened is not None:  # the paper's weight reads (C, H, W): read it as (H, W, C)
                    height, width, channels = flattened
                    weight = weight.view(weight.shape[0], weight.shape[1], channels, height, width)
                    weight = weight.permute(0, 1, 3, 4, 2).reshape(weight.shape[0], weight.shape[1], -1)
                    flattened = None
                x = linear(x, weight, bias)
            elif isinstance(module, Standardize):
                x = module(x)
            elif isinstance(module, nn.Sequential):
                x = self.sequential([(f"{name}.{n}", m) for n, m in module.named_children()], x)
            elif not isinstance(module, nn.Identity):
                raise TypeError(f"the im2col path has no rule for {type(module).__name__} ({name})")
            i += 1
        return x

    @staticmethod
    def _pool_ceil(pool: nn.MaxPool2d) -> bool:
        if pool.kernel_size not in (2, (2, 2)) or pool.stride not in (2, (2, 2)) or pool.padding not in (0, (0, 0)):
            raise TypeError(f"the im2col path pools 2x2 windows with stride 2 only, not {pool}")
        return bool(pool.ceil_mode)

    def transformer(self, prefix: str, st: SpatialTransformer, x: Tensor) -> Tensor:
        """x (K, B, H, W, C) -> the sampled (K, B, H', W', C); theta, grid and sampling in float32."""
        k, batch, height, width, channels = x.shape
        out_h, out_w = st.output_size or (height, width)
        features = self.sequential([(f"{prefix}.preprocess", st.preprocess),
                                    (f"{prefix}.localisation", st.localisation)], x)  # (K, B, F)
        weight, bias = self.weight(f"{prefix}.regression")
        with torch.autocast(device_type=x.device.type, enabled=False):
            theta = linear(features.to(weight.dtype), weight, bias)  # (K, B, P)
            grid = make_grid(st.kind, theta.flatten(0, 1), out_h, out_w, tps_grid_size=st.tps_grid)
            source = _nchw(x).flatten(0, 1).to(theta.dtype)  # (K*B, C, H, W)
            out = sample(source, grid)  # (K*B, C, H', W')
        return _nhwc(out.view(k, batch, channels, out_h, out_w))


def stacked_forward(model: DigitClassifier, params: Params, images: Tensor) -> Tensor:
    """The K models' logits (K, B, 10) for images (K, B, C, S, S): `DigitClassifier.forward`, im2col-style.

    `model` gives the structure only (it may live on the meta device); `params` are the stacked parameters.
    """
    runner = _Runner(params)
    x = _nhwc(images)
    if not model.after_reads_pixels:
        x = runner.sequential([("standardize", model.standardize), ("before", model.before)], x)
    if len(model.transformers) > 0:
        x = torch.cat([runner.transformer(f"transformers.{i}", st, x)
                       for i, st in enumerate(model.transformers)], dim=-1)  # (K, B, H', W', N*C)
        if model.pool > 1:
            k, batch = x.shape[:2]
            pooled = F.avg_pool2d(_nchw(x).flatten(0, 1), model.pool)
            x = _nhwc(pooled.view(k, batch, *pooled.shape[1:]))
    if model.after_reads_pixels:
        x = model.standardize(x)
    return runner.sequential([("after", model.after)], x)
