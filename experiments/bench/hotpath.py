"""Before/after of the training hot path, side by side in one process (results: experiments/bench/train.md).

    STN_DATA_DIR=/work/shared/data .venv/bin/python experiments/bench/hotpath.py [--models cnn,st_cnn_aff]
        [--dataset R] [--batch-size 256] [--rounds 5] [--steps 4] [--default-allocator] [--compile]

Variants per model, all fed by the same kind of TrainStream (on-device distortion) and stepped by
`stn.step.train_step` (+ the scheduler, as `fit_step`), alternating in rounds:
- before: the paper's layer order, plain nn.Conv2d, NCHW (what `fit` ran on the CPU before issue 6);
- fast layout: pool before ReLU + InputGradConv2d, NCHW;
- after: fast layout in channels_last (what `fit` runs now on the CPU: `prepare_model` + `fit_step`);
- after + torch.compile (with --compile);
- after under bf16 autocast on the CPU (with --bf16; not what `fit` does: CPU runs stay float32).
Without --default-allocator the process first calls `keep_freed_memory()`, as `fit` does on the CPU; run it
both ways to see what the allocator setting does. Prints median images/s per variant and the ratios to `before`.
--micro times single ops instead: the first conv's input gradient (oneDNN's, as autograd runs it, vs
InputGradConv2d's), F.fold vs fold_patches, ReLU -> pool vs pool -> ReLU in NCHW and channels_last.
--profile prints torch.profiler's top ops (by self CPU time, per step) of `before` and `after` (and of the bf16
variant with --bf16) instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from stn.compose import compose
from stn.data import TrainStream
from stn.device import keep_freed_memory
from stn.grid import TABLE1_MODELS
from stn.mnist import load_mnist
from stn.models import build_model
from stn.step import build_optimizer, build_scheduler, fit_step, prepare_model

SLUGS = {label.lower().replace("-", "_").replace(" ", "_"): choice for label, choice in TABLE1_MODELS}


def variant(cfg, digits, labels, *, fast: bool, channels_last: bool, compiled: bool = False, amp: bool = False):
    if fast and channels_last:
        model = prepare_model(cfg, torch.device("cpu"))  # exactly fit's model
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, fast=fast)
    optimizer = build_optimizer(model, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer)
    forward = torch.compile(model) if compiled else model
    stream = TrainStream(digits, labels, cfg.dataset, cfg.trainer.batch_size, cfg.seed)

    def run(steps: int) -> int:
        for _ in range(steps):
            fit_step(forward, optimizer, scheduler, stream, amp=amp, channels_last=channels_last)
        return steps * cfg.trainer.batch_size

    return run


def median_ms(fn, repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def micro(batch: int) -> None:
    """Single ops at the ST-CNN's first conv on R (62 filters 9x9 on 28x28 -> 20x20), batch `batch`."""
    import torch.nn.functional as F

    from stn.fastconv import InputGradConv2d, fold_patches
    from stn.models import conv_relu_pool

    torch.manual_seed(0)
    conv = InputGradConv2d(1, 62, 9)
    x = torch.rand(batch, 1, 28, 28)
    grad = torch.randn(batch, 62, 20, 20)

    def input_grad(layer_forward):
        inputs = x.clone().requires_grad_()
        return lambda: torch.autograd.grad(layer_forward(inputs), inputs, grad)

    rows = {
        "first conv fwd + input/weight grads, oneDNN (nn.Conv2d)": input_grad(
            lambda i: F.conv2d(i, conv.weight, conv.bias)),
        "first conv fwd + input/weight grads, InputGradConv2d": input_grad(conv),
    }
    columns = torch.randn(batch, 81, 400)
    rows["col2im: F.fold"] = lambda: F.fold(columns, (28, 28), 9)
    rows["col2im: fold_patches"] = lambda: fold_patches(columns, torch.Size((batch, 1, 28, 28)), (9, 9))
    activations = torch.randn(batch, 62, 20, 20)
    pooled_grad = torch.randn(batch, 62, 10, 10)
    for layout in ("NCHW", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        for fast in (False, True):
            _, *layers = conv_relu_pool(62, 62, 1, ceil=True, fast=fast)
            block = torch.nn.Sequential(*layers)
            inputs = activations.contiguous(memory_format=fmt).requires_grad_()
            name = "pool -> ReLU" if fast else "ReLU -> pool"
            rows[f"{name}, fwd+bwd, {layout}"] = (
                lambda block=block, inputs=inputs: torch.autograd.grad(block(inputs), inputs, pooled_grad))
    for name, fn in rows.items():
        print(f"batch {batch}: {name:52s} {median_ms(fn):7.1f} ms", flush=True)


def profile(model: str, variants: dict, steps: int, rows: int = 12) -> None:
    from torch.profiler import profile as torch_profile

    for name in [name for name in ("before", "after", "after, bf16 autocast") if name in variants]:
        variants[name](2)
        with torch_profile(record_shapes=True) as prof:
            variants[name](steps)
        table = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=34, max_shapes_column_width=70)
        print(f"--- {model}, {name}: {steps} steps\n{table}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="cnn,st_cnn_aff")
    parser.add_argument("--dataset", default="R")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--default-allocator", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--micro", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if not args.default_allocator:
        keep_freed_memory()
    if args.micro:
        print(f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}", flush=True)
        micro(args.batch_size)
        return
    digits, labels = load_mnist(os.environ.get("STN_DATA_DIR", "data"), train=True)
    print(f"allocator: {'glibc default' if args.default_allocator else 'keep_freed_memory()'}; torch threads "
          f"{torch.get_num_threads()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
          f"batch {args.batch_size}; dataset {args.dataset}; load average {os.getloadavg()[0]:.2f}", flush=True)
    started = time.perf_counter()
    for slug in args.models.split(","):
        cfg = compose([f"dataset={args.dataset}", *SLUGS[slug], f"trainer.batch_size={args.batch_size}"])
        variants = {
            "before": variant(cfg, digits, labels, fast=False, channels_last=False),
            "fast layout, NCHW": variant(cfg, digits, labels, fast=True, channels_last=False),
            "after": variant(cfg, digits, labels, fast=True, channels_last=True),
        }
        if args.compile:
            variants["after + compile"] = variant(cfg, digits, labels, fast=True, channels_last=True, compiled=True)
        if args.bf16:
            variants["after, bf16 autocast"] = variant(cfg, digits, labels, fast=True, channels_last=True, amp=True)
        if args.profile:
            profile(slug, variants, args.steps)
            continue
        for run in variants.values():
            run(2)
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for index in range(args.rounds):
            for name in list(variants) if index % 2 == 0 else list(reversed(variants)):
                start = time.perf_counter()
                images = variants[name](args.steps)
                rates[name].append(images / (time.perf_counter() - start))
        for name, values in rates.items():
            ratio = statistics.median(a / b for a, b in zip(values, rates["before"], strict=True))
            print(f"{slug:12s} {name:18s} {statistics.median(values):8.0f} images/s  "
                  f"({1000 * args.batch_size / statistics.median(values):6.1f} ms/step)  x{ratio:.2f} vs before",
                  flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}; wall time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
