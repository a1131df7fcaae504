"""`stn engine bench`: training images/s of the batched engine per model kind, one model vs K batched.

For each Table 1 model kind, each K and each engine mode ("loop": K models one after the other through the
kernels `stn train` uses; "vmap": one batched call per layer), on one dataset:
- step images/s: `BatchedModels.step` alone on a fixed batch (forward, backward, SGD update), K * B images
  per step;
- pipeline images/s: the stream's next() + step, what training runs (options.data: "exact" draws each model's
  `stn train` batches, warped once per dataset; "block" draws block_steps steps at a time);
- FLOP/s: FLOPs per training image (FlopCounterMode, `stn.measure.model_flops_per_image`) x step images/s,
  and % of a matmul peak measured in the same process (float32 on the CPU; bf16 and float32 on CUDA);
- peak memory: CUDA's max_memory_allocated per measurement; on the CPU the process's peak RSS (ru_maxrss,
  process-wide, so it only grows from row to row);
- host-device syncs per step (data + step) that torch's sync debug mode reports (CUDA only).
Timing syncs the device before reading the clock. The result's "cost" rows (kind, size, K, the best
pipeline images/s over modes) are the planner's cost table (`stn.engine.plan.CostModel.load`).
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from stn.compose import compose
from stn.device import cpu_model, sync
from stn.engine.batched import BatchedModels
from stn.engine.options import EngineOptions
from stn.engine.streams import BlockStream, make_stream
from stn.grid import TABLE1_MODELS


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def _timed(run: Callable[[], Any], steps: int, device: torch.device) -> float:
    """Seconds per call of `run`, over `steps` calls, device synced before and after."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    sync(device)
    return (time.perf_counter() - start) / steps


def _to_block_start(stream: Any) -> None:
    """Advance a BlockStream to the end of its current block (the next next() draws a new one); else nothing."""
    if isinstance(stream, BlockStream) and stream.buffer is not None:
        while stream.offset < stream.block_steps:
            stream.next()


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux



def _measure(kind: str, mode: str, k: int, base: Any, digits: Any, labels: Any, flops: float, dev: torch.device,
             options: EngineOptions, steps: int, warmup: int, batch_size: int, dataset: str, peak: float
             ) -> dict[str, Any]:
    """One bench row: K models of `kind` in `mode`, step alone, data + step, data alone, and the syncs."""
    from stn.measure import count_syncs

    cfgs = [dataclasses.replace(base, seed=seed) for seed in range(k)]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    engine = BatchedModels(cfgs, dev, dataclasses.replace(options, mode=mode))
    stream = make_stream(cfgs, digits, labels, dev, options)
    images, targets = stream.next()
    compile_start = time.perf_counter()
    for _ in range(warmup):
        engine.step(images, targets)
    sync(dev)
    warm_s = time.perf_counter() - compile_start
    step_s = _timed(lambda e=engine, x=images, y=targets: e.step(x, y), steps, dev)
    # block data: time whole blocks from a block boundary, so each draw is counted once per block
    data_steps = steps if options.data != "block" else \
        options.block_steps * max(1, math.ceil(steps / options.block_steps))
    _to_block_start(stream)
    pipe_s = _timed(lambda e=engine, s=stream: e.step(*s.next()), data_steps, dev)
    _to_block_start(stream)
    data_s = _timed(stream.next, data_steps, dev)
    counted = {"syncs": 0}
    with count_syncs(dev, counted):  # host-device syncs torch reports in data + step (CUDA only)
        for _ in range(steps):
            engine.step(*stream.next())
    per_step = k * batch_size
    row = {
        "kind": kind, "dataset": dataset, "size": base.dataset.size, "mode": mode, "k": k,
        "batch": batch_size, "step_images_per_s": per_step / step_s,
        "pipeline_images_per_s": per_step / pipe_s, "data_images_per_s": per_step / data_s,
        "step_ms": 1e3 * step_s, "warmup_s": warm_s, "flops_per_image": flops,
        "tflops": flops * per_step / step_s / 1e12,
        "percent_of_peak": 100 * flops * per_step / step_s / peak,
        "peak_memory_mb": _memory_mb(dev), "parameters_per_model": engine.parameters_per_model,
        "syncs_per_step": counted["syncs"] / steps if dev.type == "cuda" else None,
    }  # fmt: skip
    return row

def bench_engine(kinds: Sequence[str] | None = None, *, dataset: str = "R", ks: Sequence[int] = (1, 3, 9),
                 modes: Sequence[str] = ("loop", "vmap"), batch_size: int = 256, steps: int = 5, warmup: int = 2,
                 device: str = "cpu", options: EngineOptions | None = None, data_dir: str | None = None,
                 overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure; returns {"device", "device_name", "torch", "peak_flops", "rows": [...], "cost": [...]}."""
    from stn.measure import measure_matmul_peak, model_flops_per_image
    from stn.mnist import load_mnist

    options = options or EngineOptions()
    known = dict(TABLE1_MODELS)
    kinds = list(kinds or known)
    unknown = [k for k in kinds if k not in known]
    if unknown:
        raise ValueError(f"unknown model kinds {unknown}; choose from {list(known)}")
    dev = torch.device(device)
    peaks = {"float32": measure_matmul_peak(dev, torch.float32)}
    if dev.type == "cuda":
        peaks["bfloat16"] = measure_matmul_peak(dev, torch.bfloat16)
    peak_key = "bfloat16" if dev.type == "cuda" and options.amp else "float32"
    log(f"matmul peak on {device_name(dev)}: " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peaks.items()))
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for kind in kinds:
        words = [f"dataset={dataset}", *known[kind], f"trainer.batch_size={batch_size}", f"trainer.device={device}",
                 *([f"data_dir={data_dir}"] if data_dir else []), *overrides]
        base = compose(words)
        digits, labels = load_mnist(base.data_dir, train=True)
        flops = model_flops_per_image(base)
        for mode in modes:
            for k in ks:
                try:
                    row = _measure(kind, mode, k, base, digits, labels, flops, dev, options, steps, warmup,
                                   batch_size, dataset, peaks[peak_key])
                except Exception as err:  # one failing configuration must not cost the others' rows
                    log(f"{kind:12s} {mode:4s} K={k:<3d} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                    failed.append({"kind": kind, "mode": mode, "k": k, "error": f"{type(err).__name__}: {err}"})
                    continue
                rows.append(row)
                log(f"{kind:12s} {mode:4s} K={k:<3d} step {row['step_images_per_s']:>11,.0f} img/s  pipeline "
                    f"{row['pipeline_images_per_s']:>11,.0f} img/s  {row['tflops']:.3f} TFLOP/s "
                    f"({row['percent_of_peak']:.1f}% of {peak_key} peak)  mem {row['peak_memory_mb']:,.0f} MB")
    cost = []
    for kind in kinds:
        for k in ks:
            measured = [r for r in rows if r["kind"] == kind and r["k"] == k]
            if not measured:
                continue
            best = max(measured, key=lambda r: r["pipeline_images_per_s"])
            cost.append({"kind": kind, "size": best["size"], "k": k, "images_per_s": best["pipeline_images_per_s"],
                         "mode": best["mode"], "flops_per_image": best["flops_per_image"]})
    return {"device": str(dev), "device_name": device_name(dev), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "options": {k: str(v) for k, v in dataclasses.asdict(options).items()},
            "peak_flops": peaks, "rows": rows, "cost": cost, "failed": failed}


def format_engine_table(result: dict[str, Any]) -> str:
    """Markdown: one line per kind, mode and K; the vmap/loop ratio at each K."""
    lines = [f"Device: {result['device_name']} ({result['device']}), torch {result['torch']}, "
             f"{result['threads']} threads; matmul peak "
             + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in result["peak_flops"].items()), "",
             "| model | size | mode | K | step images/s | pipeline images/s | data images/s | TFLOP/s | % peak "
             "| peak MB | syncs/step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['kind']} | {r['size']} | {r['mode']} | {r['k']} | {r['step_images_per_s']:,.0f} | "
                     f"{r['pipeline_images_per_s']:,.0f} | {r['data_images_per_s']:,.0f} | {r['tflops']:.3f} | "
                     f"{r['percent_of_peak']:.1f} | {r['peak_memory_mb']:,.0f} | "
                     f"{'-' if r.get('syncs_per_step') is None else format(r['syncs_per_step'], 'g')} |")
    by = {(r["kind"], r["mode"], r["k"]): r for r in result["rows"]}
    ratios = []
    for (kind, mode, k), r in by.items():
        other = by.get((kind, "loop", k))
        if mode == "vmap" and other:
            ratios.append(f"{kind} K={k}: vmap/loop step {r['step_images_per_s'] / other['step_images_per_s']:.2f}x")
    if ratios:
        lines += ["", "; ".join(ratios)]
    return "\n".join(lines)
