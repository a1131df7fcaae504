"""A roofline cost model of one batched training step: kernels, FLOPs and bytes per conv path, on the CPU.

The first GPU loan (experiments/table1/paper-gpu/loan-2026-11-30/) measured the convolutional groups at
0.4-0.6% of the H200's bf16 peak with `vmap` (cuDNN grouped convolutions). Before the next loan, this module
predicts what other conv paths can reach, from counts made here:

- `count_step(cfg, k, mode)`: every kernel of one `BatchedModels.step` (forward, loss, backward, SGD update)
  in engine mode "vmap" or "loop", recorded by a TorchDispatchMode on the CPU (float32), each with its FLOPs and
  the bytes it reads and writes, floating-point tensors counted at 2 bytes an element. View ops (no kernel) and bare allocations are dropped. The step is counted at two small
  batches and extrapolated to the real one: every op's FLOPs and bytes are affine in the batch (weights fixed,
  activations proportional), so two points give it exactly. Counting floats as bf16 approximates the GPU's bf16
  autocast (its float32 theta, grids and loss are counted at half their bytes, its casts not at all).
- mode "im2col": not counted but written out (`im2col_kernels`): the vmap count with each grouped convolution
  replaced by the kernels of an im2col path with the K models as the batch dimension (unfold, one `baddbmm` with
  the bias fused; backward: two batched matmuls, the bias gradient and a fold), and the ReLU + max-pool after
  it as one kernel with 1-byte argmax codes (`fuse_pool_relu`), so the prediction does not need that path's
  code.
- `predict(kernels, device)`: per kernel max(FLOPs / peak, bytes / bandwidth) (the roofline), summed ("busy"),
  plus a per-kernel latency x kernels and a per-step host overhead ("latency": launches, graph replay, the block
  data draw). The busy part is a floor only if every kernel runs at the roofline; cuDNN's grouped convolutions
  are 30x off it (the loan), so a path that was not measured is predicted as a **lower bound**.
- `fit_latency`: the per-kernel latency and the per-step overhead from the loan's FCN and ST-FCN measurements
  (bench step times, graphed; the table's seconds per step), where the arithmetic is negligible.

Convolution FLOPs are computed here (2 x MACs; backward: input and weight gradients as the output mask asks),
not by torch's FlopCounterMode, whose convolution_backward formula ignores `groups` (it counts vmap's grouped
backward K times over).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from stn.config import Config

PATHS = ("vmap", "loop", "im2col")
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


@dataclass(frozen=True)
class DeviceSpec:
    """What the roofline needs of a device: peak FLOP/s (bf16), memory bandwidth (bytes/s), the time every kernel
    costs beyond its roofline (launch, tail, in a CUDA graph) and the host's time per step (graph replay, data)."""

    name: str
    peak_flops: float
    bandwidth: float
    kernel_latency_s: float
    step_overhead_s: float


@dataclass(frozen=True)
class StepPrediction:
    kernels: int
    flops: float
    bytes: float
    busy_s: float  # sum over kernels of the roofline time: shared by groups in flight together
    latency_s: float  # kernels x latency + the step overhead: overlapped by groups in flight together

    @property
    def seconds(self) -> float:
        return self.busy_s + self.latency_s


# ------------------------------------------------------------------------------------------------ counting


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
    from stn.engine.batched import BatchedModels, EngineOptions

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


# ------------------------------------------------------------------------------------------------- im2col


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

# ---------------------------------------------------------------------------------------------- prediction


def predict(kernels: Sequence[Kernel], device: DeviceSpec) -> StepPrediction:
    """Roofline per kernel, summed (busy), plus latency x kernels and the step overhead (latency)."""
    busy = sum(max(k.flops / device.peak_flops, k.bytes / device.bandwidth) for k in kernels)
    return StepPrediction(len(kernels), sum(k.flops for k in kernels), sum(k.bytes for k in kernels), busy,
                          len(kernels) * device.kernel_latency_s + device.step_overhead_s)


def in_flight_seconds(work: Sequence[tuple[int, StepPrediction]], in_flight: int) -> float:
    """Wall time of groups (steps, prediction per step) run with `in_flight` of them at once: the busy parts
    share the device's arithmetic and bandwidth (they add up), the latencies overlap (divided by in_flight).
    in_flight=1 is the sequential table."""
    if in_flight < 1:
        raise ValueError("in_flight must be at least 1")
    busy = sum(steps * p.busy_s for steps, p in work)
    latency = sum(steps * p.latency_s for steps, p in work)
    return busy + latency / min(in_flight, max(len(work), 1))


def fit_latency(graphed: Sequence[tuple[float, StepPrediction]], table: Sequence[tuple[float, StepPrediction]]
                ) -> tuple[float, float]:
    """(per-kernel latency, per-step overhead) from measured seconds per step of launch-bound groups.

    graphed: (step seconds of a CUDA-graph step alone, its prediction with zero latency) -> per kernel, the
    median of (measured - busy) / kernels; table: (a table group's seconds per step, data and host included,
    its zero-latency prediction) -> the overhead, the median of what the step's kernels leave unexplained.
    """
    per_kernel = statistics.median(max(0.0, (s - p.busy_s) / p.kernels) for s, p in graphed)
    overhead = statistics.median(max(0.0, s - p.busy_s - p.kernels * per_kernel) for s, p in table)
    return per_kernel, overhead


def bound_label(path: str, measured: str | None) -> str:
    """How a path's prediction reads in the plan: the measurement it rests on, or a lower bound."""
    return measured if measured else f"{path}: lower bound, not measured"


# ------------------------------------------------------------------------------------------ a table's paths

LOAN_DIR = Path("experiments/table1/paper-gpu/loan-2026-11-30")  # the first H200 loan's record (repo root)
LOAN_BENCH = LOAN_DIR / "bench_block.json"  # its bench: the planner's default cost table
LOAN_TABLE_RUN = LOAN_DIR / "results.json"  # its table run: seconds per step of the 6 groups it finished
H200_BANDWIDTH = 4.8e12  # bytes/s, NVIDIA's H200 datasheet: the loan measured no copy bandwidth
NO_CONV_KINDS = ("FCN", "ST-FCN Aff", "ST-FCN Proj", "ST-FCN TPS")  # launch-bound: what latency is fitted on


@dataclass(frozen=True)
class PathEstimate:
    path: str
    prediction: StepPrediction  # busy + latency; for a measured path, busy = measured - latency
    seconds_per_step: float
    label: str  # "measured ...", or "<path>: lower bound, not measured"
    measured: bool


def counted_kernels(cfg: Config, k: int, mode: str) -> list[Kernel]:
    """count_step, kept in stn's disk cache (a count is a pure function of the shapes, K, mode and code)."""
    from stn.cache import memo
    from stn.engine.batched import shape_signature

    if mode == "im2col":  # written out from the vmap count
        return im2col_kernels(counted_kernels(cfg, k, "vmap"))
    key = [shape_signature(cfg), k, mode, cfg.trainer.batch_size]
    return memo("step-count", key, lambda: count_step(cfg, k, mode))


def _zero_latency(device: DeviceSpec) -> DeviceSpec:
    return dataclasses.replace(device, kernel_latency_s=0.0, step_overhead_s=0.0)


def fit_device(bench_path: str | Path, table_run: dict[str, float], groups: Sequence[Any],
               bandwidth: float = H200_BANDWIDTH, peak_flops: float | None = None) -> DeviceSpec:
    """The device of a recorded bench: its measured bf16 matmul peak, `bandwidth`, and the latency and step
    overhead fitted (`fit_latency`) on its launch-bound rows: the bench's graphed steps of the FCN and ST-FCNs,
    and the table run's seconds per step of the groups of those kinds among `groups` (gid -> s/step)."""
    from stn.compose import compose
    from stn.grid import TABLE1_MODELS

    bench = json.loads(Path(bench_path).read_text())
    peak = peak_flops or float(bench["peak_flops"].get("bfloat16") or bench["peak_flops"]["float32"])
    device = DeviceSpec(f"{bench.get('device_name', bench['device'])} (fitted on {Path(bench_path)})", peak,
                        bandwidth, 0.0, 0.0)
    kinds = dict(TABLE1_MODELS)
    graphed = []
    for row in bench["rows"]:
        if row["kind"] in NO_CONV_KINDS:
            cfg = compose([f"dataset={row['dataset']}", *kinds[row["kind"]], f"trainer.batch_size={row['batch']}"])
            graphed.append((row["step_ms"] / 1e3, predict(counted_kernels(cfg, row["k"], "vmap"), device)))
    table = [(table_run[g.gid], predict(counted_kernels(g.members[0].config, g.k, "vmap"), device))
             for g in groups if g.gid in table_run and g.kind in NO_CONV_KINDS]
    if not graphed:
        raise ValueError(f"{bench_path} holds no launch-bound (FCN, ST-FCN) rows to fit the latency on")
    # without a table run, the step overhead is what the bench's own launch-bound rows leave (about 0)
    latency, overhead = fit_latency(graphed, table or graphed)
    return dataclasses.replace(device, kernel_latency_s=latency, step_overhead_s=overhead)


def has_convolutions(kernels: Sequence[Kernel]) -> bool:
    return any(k.conv is not None for k in kernels)


def path_estimates(group: Any, costs: Any, device: DeviceSpec) -> dict[str, PathEstimate]:
    """Each conv path's seconds per step for a plan group (stn.engine.plan.Group) under a cost model (stn.engine.plan.CostModel):
    vmap from the measurement the cost model holds (a table run, a bench row, a bench row scaled by FLOPs) where
    it holds one, else like the others a roofline lower bound (`predict`). A group without convolutions has
    no im2col path (it would be its vmap path)."""
    cfg = group.members[0].config
    out = {}
    convolutional = has_convolutions(counted_kernels(cfg, group.k, "vmap"))
    for path in PATHS:
        if path == "im2col" and not convolutional:
            continue
        kernels = counted_kernels(cfg, group.k, path)
        bound = predict(kernels, device)
        rate, how = costs.images_per_s(group)
        if path == "vmap" and how.startswith("measured"):
            seconds = group.k * group.trainer.batch_size / rate
            busy = max(bound.busy_s, seconds - bound.latency_s)
            out[path] = PathEstimate(path, dataclasses.replace(bound, busy_s=busy,
                                                               latency_s=seconds - busy), seconds, how, True)
        else:
            out[path] = PathEstimate(path, bound, bound.seconds, bound_label(path, None), False)
    return out


def best_path(estimates: dict[str, PathEstimate]) -> PathEstimate:
    return min(estimates.values(), key=lambda e: e.seconds_per_step)


# ---------------------------------------------------------------------------------------------- the report

RECORDED_CNN_R = 170_044.5  # images/s, CNN R K=9 vmap step, bench_exact.json of the loan (bench_block: 170,107)
TARGET_SPEEDUP = 20.0
WINDOW_TRAINING_S = 7 * 60  # a 15-minute window less the start, the tests and the bench
WHOLE_TABLE_S = 10 * 60


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def table_seconds(rows: Sequence[tuple[Any, dict[str, PathEstimate]]], in_flight: int, chooser: Any = best_path
                  ) -> float:
    """The wall time of these groups' steps, each in the path `chooser` picks, with in_flight groups at once."""
    return in_flight_seconds([(g.iterations, chooser(e).prediction) for g, e in rows], in_flight)


def prediction_report(groups: Sequence[Any], costs: Any, device: DeviceSpec, done: set[str], in_flight: int
                      ) -> list[str]:
    """The markdown section of experiments/bench/engine.md: per group and path, the targets, the assumptions."""
    rows = [(g, path_estimates(g, costs, device)) for g in groups]
    lines = [f"Device model: {device.name}: peak {device.peak_flops / 1e12:.0f} TFLOP/s bf16 (measured), "
             f"{device.bandwidth / 1e12:.1f} TB/s (datasheet), {device.kernel_latency_s * 1e6:.2f} us per kernel "
             f"and {device.step_overhead_s * 1e3:.3f} ms per step (fitted on the FCN and ST-FCN rows). ms per step; "
             f"'>=' marks a lower bound (a roofline, not measured).", "",
             "| group | K | px | done | kernels v/l/i | GFLOP | GB v/l/i | vmap ms | loop ms | im2col ms | best | "
             "busy ms (best) | images/s (best) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g, est in rows:
        best = best_path(est)
        cells = []
        for path in PATHS:
            e = est.get(path)
            cells.append("-" if e is None else ("" if e.measured else ">= ") + _ms(e.seconds_per_step))
        kernels = "/".join(str(est[p].prediction.kernels) if p in est else "-" for p in PATHS)
        lines.append(f"| {g.gid} | {g.k} | {g.size} | {'yes' if g.gid in done else ''} | {kernels} | "
                     f"{est['vmap'].prediction.flops / 1e9:.1f} | "
                     + "/".join(f"{est[p].prediction.bytes / 1e9:.2f}" if p in est else "-" for p in PATHS)
                     + " | " + " | ".join(cells) + f" | {best.path} | {_ms(best.prediction.busy_s)} | "
                     f"{g.k * g.trainer.batch_size / best.seconds_per_step:,.0f} |")
    measured_vmap = sum(g.iterations * est["vmap"].seconds_per_step for g, est in rows)
    left = [(g, e) for g, e in rows if g.gid not in done]
    lines += ["", f"Today's engine (vmap, measured or scaled): {measured_vmap:,.0f} s for the whole table, "
              f"{sum(g.iterations * e['vmap'].seconds_per_step for g, e in left):,.0f} s for the "
              f"{len(left)} groups not finished.", ""]
    cnn = next(((g, e) for g, e in rows if g.kind == "CNN" and g.size == 28), None)
    lines += ["| target | predicted | goal | met? |", "|---|---|---|---|"]
    if cnn is not None:
        g, est = cnn
        best = best_path(est)
        rate = g.k * g.trainer.batch_size / best.seconds_per_step
        lines.append(f"| CNN R group step, K={g.k} ({best.path}) | {rate:,.0f} images/s = "
                     f"{rate / RECORDED_CNN_R:.1f}x the recorded {RECORDED_CNN_R:,.0f} | >= {TARGET_SPEEDUP:.0f}x | "
                     f"{_verdict(rate / RECORDED_CNN_R >= TARGET_SPEEDUP, not best.measured)} |")
    for name, subset, goal in ((f"the {len(left)} groups not finished", left, WINDOW_TRAINING_S),
                               (f"the whole table ({len(rows)} groups)", rows, WHOLE_TABLE_S)):
        bound = any(not best_path(e).measured for _, e in subset)
        for n in sorted({1, in_flight}):
            seconds = table_seconds(subset, n)
            lines.append(f"| {name}, {'sequential' if n == 1 else f'{n} groups in flight'} | {seconds:,.0f} s | "
                         f"<= {goal} s | {_verdict(seconds <= goal, bound)} |")
        floor = sum(g.iterations * best_path(e).prediction.busy_s for g, e in subset)
        lines.append(f"| {name}, arithmetic and bytes alone (latency fully hidden) | {floor:,.0f} s | <= {goal} s | "
                     f"{_verdict(floor <= goal, bound)} |")
    return lines


def _verdict(met: bool, bound: bool) -> str:
    """A target against a prediction: a lower bound that meets it only says it is not ruled out."""
    if not met:
        return "no, not even at the bound" if bound else "no"
    return "not ruled out (a bound)" if bound else "yes"
