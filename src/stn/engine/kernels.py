"""The kernels of one batched training step, counted and written out, for the roofline cost model
(stn.engine.step_cost).

- `count_step(cfg, k, mode)`: every kernel of one `BatchedModels.step` (forward, loss, backward, SGD update)
  in engine mode "vmap" or "loop", recorded by a TorchDispatchMode on the CPU (float32), each with its FLOPs and
  the bytes it reads and writes, floating-point tensors counted at 2 bytes an element. View ops (no kernel) and
  bare allocations are dropped. The step is counted at two small batches and extrapolated to the real one:
  every op's FLOPs and bytes are affine in the batch (weights fixed, activations proportional), so two points
  give it exactly. Counting floats as bf16 approximates the GPU's bf16 autocast (its float32 theta, grids and
  loss are counted at half their bytes, its casts not at all).
- mode "im2col": not counted but written out (`im2col_kernels`): the vmap count with each grouped convolution
  replaced by the kernels of an im2col path with the K models as the batch dimension (unfold, one `baddbmm` with
  the bias fused; backward: two batched matmuls, the bias gradient and a fold), and the ReLU + max-pool after
  it as one kernel with 1-byte argmax codes (`fuse_pool_relu`), so the prediction does not need that path's
  code.

Convolution FLOPs are computed here (2 x MACs; backward: input and weight gradients as the output mask asks),
not by torch's FlopCounterMode, whose convolution_backward formula ignores `groups` (it counts vmap's grouped
backward K times over).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from stn.config import Config

PATHS = ("vmap", "loop", "im2col")  # the engine's conv paths (EngineOptions.mode)

COUNT_BATCHES = (2, 4)  # the two small batches the affine extrapolation is fitted on
ELEMENT_BYTES = 2  # bf16: the analytic im2col kernels' element size (the counted ones carry their own)


# ops that allocate or describe memory but launch nothing
NO_KERNEL = {"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided", "_unsafe_view", "detach",
             "alias", "lift_fresh", "_local_scalar_dense", "scalar_tensor"}


@dataclass(frozen=True)
class Kernel:
    """One kernel of a step: its op, FLOPs, bytes read + written; conv: the convolution's shape (see _conv_shape)
    for the ops a conv path replaces."""

    name: str
    flops: float
    bytes: float
    conv: tuple | None = None


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * (ELEMENT_BYTES if t.is_floating_point() else t.element_size())
    return total


def conv_flops(batch: int, out_channels: int, in_per_group: int, kernel: int, out_positions: int) -> int:
    """FLOPs (2 per multiply-add) of one convolution: every output element sums in_per_group x kernel products."""
    return 2 * batch * out_channels * in_per_group * kernel * out_positions


def _conv_shape(func_name: str, args: Sequence[Any], out: Any) -> tuple:
    """(K, B, Cin, H, W, Cout, kh, kw, Hout, Wout, input_grad, weight_grad, backward) of an aten convolution
    (vmap's: input (B, K*Cin, H, W), weight (K*Cout, Cin, kh, kw), groups K) or its backward."""
    if func_name == "convolution":
        x, w, groups, backward, mask = args[0], args[1], int(args[8]), False, (True, True)
        y = out
    else:  # convolution_backward(grad_out, input, weight, bias_sizes, stride, padding, dilation, transposed,
        #                         output_padding, groups, output_mask)
        y, x, w, groups, backward = args[0], args[1], args[2], int(args[9]), True
        mask = (bool(args[10][0]), bool(args[10][1]))
    k = groups
    return (k, x.shape[0], x.shape[1] // k, x.shape[2], x.shape[3], w.shape[0] // k, w.shape[2], w.shape[3],
            y.shape[2], y.shape[3], mask[0], mask[1], backward)


class KernelRecorder(TorchDispatchMode):
    """Records every op that launches a kernel: name, FLOPs (matmuls and convolutions), bytes read + written."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: list[Kernel] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        if name in NO_KERNEL or func.is_view:
            return out
        if name.endswith("_"):  # in place: writes its first argument (a tensor, or a list for _foreach_)
            written = _bytes(_tensors(args[0]))
        elif any(o.untyped_storage().data_ptr() == i.untyped_storage().data_ptr() for o in outputs for i in inputs
                 if o.numel() and i.numel()):
            return out  # an alias of an input (a view torch does not tag as one): no kernel
        else:
            written = _bytes(outputs)
        conv = None
        if name in ("convolution", "convolution_backward"):
            conv = _conv_shape(name, args, out)
            k, b, cin, _, _, cout, kh, kw, ho, wo, input_grad, weight_grad, backward = conv
            one = conv_flops(b, k * cout, cin, kh * kw, ho * wo)
            flops = one * (input_grad + weight_grad) if backward else one
        elif func.overloadpacket in flop_registry:
            flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        else:
            flops = 0
        self.kernels.append(Kernel(name, float(flops), float(_bytes(inputs) + written), conv))
        return out


def _count_at(cfg: Config, k: int, mode: str, batch: int) -> list[Kernel]:
    from stn.engine.batched import BatchedModels
    from stn.engine.options import EngineOptions

    cfgs = [dataclasses.replace(cfg, seed=seed, trainer=dataclasses.replace(cfg.trainer, batch_size=batch))
            for seed in range(k)]
    engine = BatchedModels(cfgs, "cpu", EngineOptions(mode=mode))  # float32 here, floats counted as bf16
    size = cfg.dataset.size
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(k, batch, 1, size, size, generator=generator)
    labels = torch.randint(0, 10, (k, batch), generator=generator)
    engine.step(images, labels)  # first step: caches (TPS kernels), so the counted step is a steady one
    with KernelRecorder() as recorder:
        engine.step(images, labels)
    return recorder.kernels


def _scale_conv(conv: tuple | None, batch: int) -> tuple | None:
    return None if conv is None else (conv[0], batch, *conv[2:])


def extrapolate(small: list[Kernel], large: list[Kernel], b_small: int, b_large: int, batch: int) -> list[Kernel]:
    """Each kernel's FLOPs and bytes, affine in the batch, from two counts of the same op sequence."""
    if [k.name for k in small] != [k.name for k in large]:
        raise RuntimeError("the step's ops differ between the two counted batches; count at the real batch")
    out = []
    for a, b in zip(small, large, strict=True):
        t = (batch - b_small) / (b_large - b_small)
        out.append(Kernel(a.name, a.flops + t * (b.flops - a.flops), a.bytes + t * (b.bytes - a.bytes),
                          _scale_conv(a.conv, batch)))
    return out


def count_step(cfg: Config, k: int, mode: str, batch: int | None = None) -> list[Kernel]:
    """The kernels of one batched step of K models like cfg (batch per model: cfg's trainer) in engine mode
    `mode`: "vmap" and "loop" counted, "im2col" written out from the vmap count (`im2col_kernels`)."""
    if mode not in PATHS:
        raise ValueError(f"conv path {mode!r}: expected one of {', '.join(PATHS)}")
    batch = batch or cfg.trainer.batch_size
    counted_mode = "vmap" if mode == "im2col" else mode
    with torch.random.fork_rng(), _threads(1):
        small, large = (_count_at(cfg, k, counted_mode, b) for b in COUNT_BATCHES)
    kernels = extrapolate(small, large, *COUNT_BATCHES, batch)
    return im2col_kernels(kernels) if mode == "im2col" else kernels


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def im2col_conv(conv: tuple, element_bytes: int = ELEMENT_BYTES) -> list[Kernel]:
    """The kernels of one convolution (or its backward) as im2col with the K models as the batch dimension.

    Forward: unfold the input to columns (K, B*L, Cin*kh*kw) (L output positions), then one baddbmm with the
    weights (K, Cin*kh*kw, Cout) and the bias fused, writing (K, B*L, Cout). Backward (the columns kept from the
    forward): the weight gradient columns^T @ grad_out, the bias gradient (a sum over B*L), and where the input's
    gradient is needed grad_out @ weights^T into columns, folded back onto the input.
    """
    k, b, cin, h, w, cout, kh, kw, ho, wo, input_grad, weight_grad, backward = conv
    e = element_bytes
    positions, depth = b * ho * wo, cin * kh * kw
    image, columns, outputs, weights = k * b * cin * h * w * e, k * positions * depth * e, k * positions * cout * e, \
        k * depth * cout * e
    macs = 2 * k * positions * depth * cout
    if not backward:
        return [Kernel("im2col.unfold", 0.0, float(image + columns)),
                Kernel("im2col.baddbmm", float(macs), float(columns + weights + k * cout * e + outputs))]
    kernels = []
    if weight_grad:
        kernels += [Kernel("im2col.bmm_weight_grad", float(macs), float(columns + outputs + weights)),
                    Kernel("im2col.bias_grad", 0.0, float(outputs + k * cout * e))]
    if input_grad:
        kernels += [Kernel("im2col.bmm_input_grad", float(macs), float(outputs + weights + columns)),
                    Kernel("im2col.fold", 0.0, float(columns + image))]
    return kernels


def im2col_kernels(vmap_kernels: Sequence[Kernel]) -> list[Kernel]:
    """The vmap step with every convolution and convolution backward replaced by its im2col kernels, and the
    kernels that exist only around vmap's grouped convolution dropped: the bias add after it (fused into the
    baddbmm), the bias gradient's sum before its backward (im2col.bias_grad), and the layout copies (clone) of
    its input, of its relu'd output before pooling, and of its input gradient."""
    kernels = list(vmap_kernels)
    drop: set[int] = set()

    def named(i: int, name: str) -> bool:
        return 0 <= i < len(kernels) and kernels[i].name == name and kernels[i].conv is None

    for i, kernel in enumerate(kernels):
        if kernel.conv is None:
            continue
        if kernel.conv[-1]:  # backward
            drop |= {j for j, name in ((i - 1, "sum"), (i + 1, "clone")) if named(j, name)}
        else:
            drop |= {j for j, name in ((i - 1, "clone"), (i + 1, "add")) if named(j, name)}
            if named(i + 2, "relu") and named(i + 3, "clone"):
                drop.add(i + 3)
    out: list[Kernel] = []
    for i, kernel in enumerate(kernels):
        if i in drop:
            continue
        out += im2col_conv(kernel.conv) if kernel.conv is not None else [kernel]
    return fuse_pool_relu(out)


INDEX_BYTES = 8  # max_pool2d_with_indices' int64 index per pooled element


def fuse_pool_relu(kernels: Sequence[Kernel]) -> list[Kernel]:
    """relu then max-pool after an im2col matmul as one kernel (max-pool before ReLU: the same function) that
    writes the pooled values and a 1-byte code of each window's argmax instead of int64 indices; its backward
    (max-pool backward + threshold backward) as one kernel reading the codes. Sizes are read off the unfused
    kernels' bytes: relu reads and writes c bytes each; the pool reads c, writes 2n (bf16 values) + 8n (indices);
    its backward reads 2n + c + 8n and writes c; threshold backward reads 2c and writes c."""
    out: list[Kernel] = []
    i = 0
    while i < len(kernels):
        a, b = kernels[i], kernels[i + 1] if i + 1 < len(kernels) else None
        prev = out[-1].name if out else ""
        if b is not None and prev == "im2col.baddbmm" and (a.name, b.name) == ("relu", "max_pool2d_with_indices"):
            c = a.bytes / 2
            n = (b.bytes - c) / (ELEMENT_BYTES + INDEX_BYTES)
            out.append(Kernel("im2col.pool_relu", 0.0, c + n * (ELEMENT_BYTES + 1)))
            i += 2
            continue
        if b is not None and (a.name, b.name) == ("max_pool2d_with_indices_backward", "threshold_backward") \
                and i + 2 < len(kernels) and kernels[i + 2].name.startswith("im2col.bmm_weight_grad"):
            c = b.bytes / 3
            n = (a.bytes - 2 * c) / (ELEMENT_BYTES + INDEX_BYTES)
            out.append(Kernel("im2col.pool_relu_backward", 0.0, n * (ELEMENT_BYTES + 1) + c))
            i += 2
            continue
        out.append(a)
        i += 1
    return out
