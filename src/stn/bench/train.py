"""`stn bench`: training images/s per model, our pipeline against the usual way, with FLOP/s against the peak.

Ours is the whole pipeline as `stn.train.fit` runs it: TrainStream on the device, `prepare_model` (the fast
layer layout, channels_last), `fit_step` (train_step + scheduler, no host-device sync) and fit's on-device
loss accumulation. The reference trains the same network (same widths, same initialisation; built with the
paper's layer order, `build_model(cfg, fast=False)`) in eager float32 with a plain SGD loop that adds
`loss.item()` to a running loss every step (PyTorch's "Training a classifier" tutorial; the STN tutorial's loop
is the same but reads the loss every 500 batches), fed by torchvision's MNIST + per-image transforms in a
DataLoader (`stn.bench.data.ReferenceDistortion`). The two alternate in rounds in one process, so machine load
hits both; the ratio is the median over rounds of ours / reference. Process-wide settings (threads, OpenMP
wait policy, the allocator setting `fit` uses on the CPU) apply to both sides. Each model's FLOPs per image
(`stn.measure`) turn images/s into FLOP/s, shown against the device's peak: a float32 matmul measured in the
same run on the CPU, and on CUDA also the nominal dense bf16/fp32 peak of the GPU model.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from stn.bench.data import ReferenceDistortion
from stn.compose import compose
from stn.config import Config
from stn.data import TrainStream
from stn.device import (
    cpu_has_amx,
    cpu_has_bf16,
    cpu_model,
    keep_freed_memory,
    resolve_device,
    runtime_flags,
    sync,
)
from stn.grid import TABLE1_MODELS
from stn.measure import count_syncs, measure_matmul_peak, model_flops_per_image, nominal_peak
from stn.mnist import load_mnist

# The models `stn bench` measures by default: Table 1's baselines and the ST-CNNs (label, config choices).
TRAIN_MODELS: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    entry for entry in TABLE1_MODELS if not entry[0].startswith("ST-FCN")
)
RATIO_FORMAT = "{model} ratio: {ratio:.2f}"  # the last lines of `stn bench`, one per model


@dataclass(frozen=True)
class TrainBenchSettings:
    """How long to measure. `quick` fits in under five minutes on a 2-core CPU for the five default models."""

    batch_size: int = 256  # the paper's batch
    warmup: int = 3  # untimed steps per side and model (first-call allocations, oneDNN kernel selection)
    rounds: int = 7  # alternating timed rounds per side
    steps: int = 8  # training steps per side and round, repeated until the turn lasts `min_turn_s`
    min_turn_s: float = 0.5  # short turns (FCN: 5 ms a step) would measure the scheduler, not the pipeline
    workers: int | None = None  # reference DataLoader workers; None = `default_workers()`
    seed: int = 0


QUICK = TrainBenchSettings(warmup=2, rounds=5, steps=4, min_turn_s=0.3)


@dataclass
class Side:
    """One pipeline under test: run(steps) trains `steps` steps and returns the images used; settle() waits,
    untimed, until work the pipeline does in the background (DataLoader prefetching) is done."""

    run: Callable[[int], int]
    settle: Callable[[], None] = lambda: None
    syncs: Callable[[], float | None] = lambda: None  # host-device syncs per step (CUDA only)


def _ours(cfg: Config, digits: Tensor, labels: Tensor, device: torch.device) -> Side:
    """The training loop of `stn.train.fit`, minus logging, evaluation and checkpoints."""
    from stn.step import build_optimizer, build_scheduler, fit_step, prepare_model

    amp, channels_last = runtime_flags(cfg.trainer, device, cfg.model)
    model = prepare_model(cfg, device)
    optimizer = build_optimizer(model, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer)
    forward = torch.compile(model) if cfg.trainer.compile else model
    stream = TrainStream(digits, labels, cfg.dataset, cfg.trainer.batch_size, cfg.seed, device)
    loss_sum = torch.zeros((), device=device)
    state: dict[str, Any] = {"step": 0, "bad_step": torch.full((), -1, dtype=torch.int64, device=device),
                             "syncs": 0}

    def run(steps: int) -> int:
        with count_syncs(device, state):
            for _ in range(steps):
                loss = fit_step(forward, optimizer, scheduler, stream, amp=amp, channels_last=channels_last)
                state["step"] += 1
                loss_sum.add_(loss)  # as fit: accumulated on the device, read back only when logging
                state["bad_step"] = torch.where((state["bad_step"] < 0) & ~loss.isfinite(), state["step"],
                                                state["bad_step"])
        return steps * stream.batch_size

    return Side(run, syncs=lambda: state["syncs"] / max(state["step"], 1) if device.type == "cuda" else None)



def _reference(cfg: Config, device: torch.device, workers: int) -> Side:
    """The usual way: torchvision MNIST + per-image transforms in a DataLoader, eager float32, loss.item()."""
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import MNIST

    from stn.models import build_model

    dataset: Any = MNIST(cfg.data_dir, train=True, download=False)
    # TC's clutter is cut from other training digits, as in ours
    dataset.transform = ReferenceDistortion(cfg.dataset, dataset.data if cfg.dataset.clutter else None)
    if cfg.dataset.train_limit is not None:
        dataset = Subset(dataset, range(min(cfg.dataset.train_limit, len(dataset))))
    batch = min(cfg.trainer.batch_size, len(dataset))
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, fast=False).to(device)  # the same network and initialisation, paper layer order
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.trainer.lr, momentum=cfg.trainer.momentum)
    state: dict[str, Any] = {"batches": iter(loader), "loss": 0.0, "step_s": 0.0}

    def next_batch() -> tuple[Tensor, Tensor]:
        try:
            return next(state["batches"])
        except StopIteration:  # a new epoch
            state["batches"] = iter(loader)
            return next(state["batches"])

    def run(steps: int) -> int:
        start = time.perf_counter()
        for _ in range(steps):
            images, labels = next_batch()
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            state["loss"] += loss.item()  # the usual running loss: a host-device sync per step on CUDA
        state["step_s"] = (time.perf_counter() - start) / max(steps, 1)
        return steps * batch

    def settle() -> None:
        # After its turn the workers go on to fill their prefetch queue (2 batches each); let them finish
        # before the other side is timed, or their work would be charged to it. A step takes at least as
        # long as a worker needs for a batch (one worker) -- a generous bound.
        time.sleep(2 * workers * state["step_s"])

    return Side(run, settle)


def default_workers() -> int:
    """Reference DataLoader workers: one per core, at most 4 (the STN tutorial's). On the 2-core dev machine
    2 workers were the fastest reference of 0, 1 and 2 (experiments/bench/train.md)."""
    return min(4, os.cpu_count() or 1)


def bench_train(cfg: Config, models: tuple[tuple[str, tuple[str, ...]], ...] = TRAIN_MODELS,
                settings: TrainBenchSettings = TrainBenchSettings(), overrides: tuple[str, ...] = (),
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Training images/s of each model, ours vs the reference, with FLOPs and the device's peak.

    `cfg` (composed from `overrides`) gives the device and data_dir; each model's config is `overrides` with
    the model and transformer of `models`, the batch size and seed of `settings`. Returns {"device",
    "device_name", "threads", "workers", "batch_size", "dataset", "peak": {name: FLOP/s}, "rows": [one dict
    per model:
    model, flops_per_image, ours, reference (images/s, medians over rounds), ratio (median of per-round
    ratios), ours_rounds, reference_rounds, achieved (FLOP/s of ours), ceiling (images/s at the first peak),
    ceiling_ratio (ceiling / reference), syncs_per_step (ours, CUDA only, else None)]}.
    """
    device = resolve_device(cfg.trainer.device)
    if device.type == "cpu":
        keep_freed_memory()  # as fit does on the CPU; process-wide, so the reference gets it too
    workers = settings.workers if settings.workers is not None else default_workers()
    digits, labels = load_mnist(cfg.data_dir, train=True, download=cfg.download)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}, {os.cpu_count()} CPUs"
    peak: dict[str, float] = {}
    if device.type == "cuda":
        nominal = nominal_peak(name)
        if nominal is not None:
            peak["nominal bf16 dense"], peak["nominal fp32"] = nominal[0] * 1e12, nominal[1] * 1e12
        peak["measured bf16 matmul"] = measure_matmul_peak(device, torch.bfloat16)
    peak["measured matmul peak" if device.type == "cpu" else "measured fp32 matmul"] = measure_matmul_peak(device)
    # On the CPU both precisions are measured; bf16 sides are timed only where the CPU has bf16 hardware
    # (emulated bf16 runs two orders of magnitude below float32: timing a model in it would take hours).
    bf16_hardware = device.type == "cpu" and cpu_has_bf16()
    if device.type == "cpu":
        peak["measured bf16 matmul"] = measure_matmul_peak(device, torch.bfloat16, size=None if bf16_hardware
                                                           else 256, repeats=5 if bf16_hardware else 1)
    isa = ""
    if device.type == "cpu":
        isa = f"ISA {torch.backends.cpu.get_cpu_capability()}, bf16 hardware {'yes' if bf16_hardware else 'no'}"
        isa += ", AMX" if bf16_hardware and cpu_has_amx() else ""
    log(f"device {device} ({name}{', ' + isa if isa else ''}), torch threads {torch.get_num_threads()}, "
        f"reference DataLoader workers {workers}, batch {settings.batch_size}, dataset {cfg.dataset.name}; peak "
        + ", ".join(f"{key} {value / 1e9:,.1f} GFLOP/s" for key, value in peak.items()))
    if device.type == "cpu" and not bf16_hardware:
        log("bf16 not timed per model: this CPU has no bf16 hardware (see the bf16 matmul peak above)")
    top_peak = next(iter(peak.values()))  # CUDA: nominal bf16 (training runs in bf16); CPU: the float32 matmul
    rows = []
    for label, choice in models:
        model_cfg = compose([*(o for o in overrides if not o.startswith(("model=", "transformer="))), *choice])
        model_cfg = replace(model_cfg, seed=settings.seed,
                            trainer=replace(model_cfg.trainer, batch_size=settings.batch_size))
        flops = model_flops_per_image(model_cfg)
        if device.type == "cpu":  # "ours" is float32 on the CPU; "ours_bf16" its bf16-autocast twin
            model_cfg = replace(model_cfg, trainer=replace(model_cfg.trainer, cpu_precision="float32"))
        sides = {"ours": _ours(model_cfg, digits, labels, device),
                 "reference": _reference(model_cfg, device, workers)}
        if bf16_hardware:
            bf16_cfg = replace(model_cfg, trainer=replace(model_cfg.trainer, cpu_precision="bf16"))
            sides["ours_bf16"] = _ours(bf16_cfg, digits, labels, device)
        rates = _alternate(sides, settings, functools.partial(sync, device))
        syncs = sides["ours"].syncs()
        del sides  # the reference's DataLoader workers exit here
        ours, reference = statistics.median(rates["ours"]), statistics.median(rates["reference"])
        ratio = statistics.median(a / b for a, b in zip(rates["ours"], rates["reference"], strict=True))
        ceiling = top_peak / flops  # images/s if every FLOP ran at the peak
        row = {"model": label, "flops_per_image": flops, "ours": ours, "reference": reference, "ratio": ratio,
               "ours_rounds": rates["ours"], "reference_rounds": rates["reference"], "achieved": flops * ours,
               "ceiling": ceiling, "ceiling_ratio": ceiling / reference, "syncs_per_step": syncs,
               "ours_bf16": None, "ratio_bf16": None}
        if "ours_bf16" in rates:
            row["ours_bf16"] = statistics.median(rates["ours_bf16"])
            row["ratio_bf16"] = statistics.median(
                a / b for a, b in zip(rates["ours_bf16"], rates["reference"], strict=True))
            row["achieved_bf16"] = flops * row["ours_bf16"]
        log(f"{label}: ours {ours:,.0f} images/s, reference {reference:,.0f} images/s, ratio {ratio:.2f}"
            + ("" if row["ours_bf16"] is None else
               f"; ours bf16 {row['ours_bf16']:,.0f} images/s, ratio {row['ratio_bf16']:.2f}")
            + ("" if syncs is None else f", ours {syncs:.2f} host-device syncs per step"))
        rows.append(row)
    return {"device": str(device), "device_name": name, "threads": torch.get_num_threads(), "workers": workers,
            "batch_size": settings.batch_size, "dataset": cfg.dataset.name, "peak": peak, "rows": rows}


def _alternate(sides: dict[str, Side], settings: TrainBenchSettings,
               sync: Callable[[], None]) -> dict[str, list[float]]:
    """Warm each side up, then time `rounds` rounds per side: images/s per side and round. A turn runs
    `steps` steps, repeated until it lasts at least `min_turn_s`.

    The sides take turns within every round, and which one goes first alternates, so a drift in machine load
    favours neither. After each turn the side settles (untimed): the reference's DataLoader workers finish
    prefetching, so their work is not charged to our turn; the batches they prefetched are ready at the
    start of its next turn, as in a running epoch. The reference's workers exit when `sides` is dropped.
    """
    for side in sides.values():
        side.run(settings.warmup)
        sync()
        side.settle()
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for index in range(settings.rounds):
        for name in list(sides) if index % 2 == 0 else list(reversed(sides)):
            start, images = time.perf_counter(), 0
            while not images or time.perf_counter() - start < settings.min_turn_s:
                images += sides[name].run(settings.steps)
                sync()
            rates[name].append(images / (time.perf_counter() - start))
            sides[name].settle()
    return rates



def format_train_table(result: dict[str, Any]) -> str:
    """A Markdown table of `bench_train`'s rows: FLOPs, images/s of both sides, ratio, FLOP/s against the peak,
    and the ceiling: the images/s at which the model's FLOPs would run at the peak, and that over the reference
    (the most any pipeline could gain on this device without cutting FLOPs)."""
    peak_name, peak = next(iter(result["peak"].items()))  # nominal bf16 on CUDA, the measured matmul on a CPU
    head = ["model", "MFLOP/image (fwd+bwd)", "ours images/s", "reference images/s", "ours / reference",
            "ours GFLOP/s", f"% of {peak_name}", "at peak: images/s", "at peak / reference"]
    bf16 = any(row.get("ours_bf16") for row in result["rows"])
    if bf16:
        bf16_peak = result["peak"]["measured bf16 matmul"]
        head += ["ours bf16 images/s", "bf16 / reference", "% of measured bf16 matmul"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        cells = [row["model"], f"{row['flops_per_image'] / 1e6:.1f}", f"{row['ours']:,.0f}",
                 f"{row['reference']:,.0f}", f"{row['ratio']:.2f}x", f"{row['achieved'] / 1e9:.1f}",
                 f"{100 * row['achieved'] / peak:.1f}", f"{row['ceiling']:,.0f}", f"{row['ceiling_ratio']:.1f}x"]
        if bf16:
            cells += [f"{row['ours_bf16']:,.0f}", f"{row['ratio_bf16']:.2f}x",
                      f"{100 * row['achieved_bf16'] / bf16_peak:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_lines(result: dict[str, Any]) -> str:
    """One `<model> ratio: X.XX` line per model (ours / reference images/s), the last lines of `stn bench`."""
    lines = [RATIO_FORMAT.format(model=row["model"], ratio=row["ratio"]) for row in result["rows"]]
    lines += [RATIO_FORMAT.format(model=f"{row['model']} bf16", ratio=row["ratio_bf16"])
              for row in result["rows"] if row.get("ratio_bf16") is not None]
    return "\n".join(lines)
