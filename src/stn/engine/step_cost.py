"""A roofline cost model of one batched training step: kernels, FLOPs and bytes per conv path, on the CPU.

The first GPU loan (experiments/table1/paper-gpu/loan-2026-11-30/) measured the convolutional groups at
0.4-0.6% of the H200's bf16 peak with `vmap` (cuDNN grouped convolutions). Before the next loan, this module
predicts what other conv paths can reach, from counts made here:

- `count_step(cfg, k, mode)` and `im2col_kernels` (stn.engine.kernels): every kernel of one step of a conv
  path, with its FLOPs and bytes (counted on the CPU for "vmap" and "loop", written out for "im2col").
- `predict(kernels, device)`: per kernel max(FLOPs / peak, bytes / bandwidth) (the roofline), summed ("busy"),
  plus a per-kernel latency x kernels and a per-step host overhead ("latency": launches, graph replay, the block
  data draw). The busy part is a floor only if every kernel runs at the roofline; cuDNN's grouped convolutions
  are 30x off it (the loan), so a path that was not measured is predicted as a **lower bound**.
- `fit_latency`: the per-kernel latency and the per-step overhead from the loan's FCN and ST-FCN measurements
  (bench step times, graphed; the table's seconds per step), where the arithmetic is negligible.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stn.config import Config
from stn.engine.kernels import PATHS, Kernel, count_step, im2col_kernels


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


# ------------------------------------------------------------------------------------------------- im2col


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
    from stn.engine.options import shape_signature

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
