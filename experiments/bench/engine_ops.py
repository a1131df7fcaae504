"""Count the ATen ops (~ kernel launches on a GPU) of one batched step and of its data, per model kind and K.

    PYTHONPATH=src python experiments/bench/engine_ops.py [KIND ...]
    PYTHONPATH=src python experiments/bench/engine_ops.py --paths [--amp]
    PYTHONPATH=src python experiments/bench/engine_ops.py --model-paths [KIND ...]

On the CPU, a proxy for what the GPU will be bound by: every op is at least one kernel launch there (a few
microseconds each), whatever the batch. Counted with a TorchDispatchMode (forward, backward, update).

--paths: for each engine path (vmap, loop, im2col) and the GPU bench's groups (CNN R K=9, ST-CNN Aff R K=9,
CNN RTS K=3, CNN TC K=3, ST-CNN Aff TC K=3) at the paper's batch of 256 per model, one step's kernels (ops that
are not views or allocations: each is at least one kernel), the bytes they read and write (each kernel's tensor
inputs read once and its outputs written once: the floor of its memory traffic; a broadcast input counts its
stored elements once, an overlapping window view, as im2col's patch copy reads, counts every window), and the
largest ops by bytes. Counted at batches 16 and 32 per model and extrapolated to 256: every tensor of a step
is either batch-independent or proportional to the batch, so bytes are affine in it (checked at batch 48:
the script stops if the prediction misses by a byte) and kernel counts do not depend on it. --amp counts under
CPU bf16 autocast (vmap then stays float32 on the CPU: see stn.engine.options.EngineOptions).

--model-paths: the cost model's view (`stn.engine.step_cost`, which `stn engine plan --predict` turns into times): per
path the kernels, GFLOP and GB of one step at batch 256 (floats at 2 bytes, as bf16), vmap and loop counted,
im2col written out kernel by kernel (a bound for that kernel list, not a count of stn.engine.im2col's code).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stn.compose import compose
from stn.engine.batched import BatchedModels
from stn.engine.options import ENGINE_MODES, EngineOptions
from stn.engine.streams import BatchedStream, BlockStream
from stn.grid import TABLE1_MODELS
from stn.mnist import load_mnist


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def model_paths(labels: list[str]) -> None:
    from stn.engine.kernels import PATHS, count_step

    kinds = dict(TABLE1_MODELS)
    print("| model | dataset | K | path | kernels | GFLOP | GB | largest kernels (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for label in labels or ["CNN", "ST-CNN Aff"]:
        for dataset, k in (("R", 9), ("RTS", 3), ("TC", 3)):
            cfg = compose([f"dataset={dataset}", *kinds[label]])
            for path in PATHS:
                kernels = count_step(cfg, k, path)
                top = sorted(kernels, key=lambda x: -x.bytes)[:3]
                print(f"| {label} | {dataset} | {k} | {path} | {len(kernels)} | "
                      f"{sum(x.flops for x in kernels) / 1e9:.1f} | {sum(x.bytes for x in kernels) / 1e9:.2f} | "
                      + ", ".join(f"{x.name} {x.bytes / 1e6:.0f}" for x in top) + " |", flush=True)


# allocations launch nothing; _unsafe_view and alias are views the schema does not mark as such
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_unsafe_view", "alias",
             "lift_fresh"}


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _stored_bytes(t: torch.Tensor) -> int:
    """Elements addressed through non-broadcast dims (stride 0 dims count once) times the element size."""
    count = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            count *= size
    return count * t.element_size() if t.numel() else 0


class Traffic(TorchDispatchMode):
    """Kernels (non-view, non-allocation ops), and the bytes they read and write, per op name."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: Counter[str] = Counter()
        self.read: Counter[str] = Counter()
        self.written: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        aliases = [r.alias_info for r in schema.returns]
        if func.is_view or func.overloadpacket.__name__ in NO_KERNEL:
            return out
        if aliases and all(a is not None and not a.is_write for a in aliases):
            return out  # returns views of its inputs: no kernel
        name = func.overloadpacket.__name__
        inputs = _tensors(list(args) + list(kwargs.values()))
        in_place = any(a is not None and a.is_write for a in aliases) or schema.name.endswith("_")
        outputs = _tensors(out)
        if not outputs and in_place:  # foreach in-place ops return nothing: they write their first list
            outputs = _tensors(args[0])
        self.kernels[name] += 1
        self.read[name] += sum(_stored_bytes(t) for t in inputs)
        self.written[name] += sum(_stored_bytes(t) for t in outputs)
        return out


# (kind, dataset, K): the GPU bench's A/B groups (issue 28)
GROUPS = (("CNN", "R", 9), ("ST-CNN Aff", "R", 9), ("CNN", "RTS", 3), ("CNN", "TC", 3), ("ST-CNN Aff", "TC", 3))


def _count_step(label: str, dataset: str, k: int, mode: str, batch: int, amp: bool, digits, labels) -> Traffic:
    base = compose([f"dataset={dataset}", *dict(TABLE1_MODELS)[label], f"trainer.batch_size={batch}"])
    cfgs = [dataclasses.replace(base, seed=s) for s in range(k)]
    engine = BatchedModels(cfgs, "cpu", EngineOptions(mode=mode, amp=amp))
    stream = BatchedStream(cfgs, digits, labels, "cpu")
    engine.step(*stream.next())  # warm caches (TPS weights)
    batch_data = stream.next()
    with Traffic() as traffic:
        engine.step(*batch_data)
    return traffic


def _affine(small: Traffic, large: Traffic, batch: int, counter: str, name: str) -> int:
    """Bytes of op `name` at `batch` per model, from the counts at batches 16 and 32 (affine in the batch)."""
    a, b = getattr(small, counter)[name], getattr(large, counter)[name]
    return a + (b - a) * (batch - 16) // 16


def paths(amp: bool) -> None:
    digits, labels = load_mnist(os.environ.get("STN_DATA_DIR", "data"), train=True)
    target = 256
    print("| group | path | kernels per step | GB read | GB written | GB total | largest ops by bytes (GB) |")
    print("|---|---|---|---|---|---|---|")
    for label, dataset, k in GROUPS:
        for mode in ENGINE_MODES:
            small, large = (_count_step(label, dataset, k, mode, b, amp, digits, labels) for b in (16, 32))
            if small.kernels != large.kernels:
                raise SystemExit(f"{label} {dataset} {mode}: kernel counts depend on the batch")
            at = functools.partial(_affine, small, large)
            check = _count_step(label, dataset, k, mode, 48, amp, digits, labels)
            for counter in ("read", "written"):
                for name in small.kernels:
                    if at(48, counter, name) != getattr(check, counter)[name]:
                        raise SystemExit(f"{label} {dataset} {mode} {name}: {counter} bytes not affine in the batch")
            read = sum(at(target, "read", n) for n in small.kernels)
            written = sum(at(target, "written", n) for n in small.kernels)
            top = sorted(small.kernels, key=lambda n: -(at(target, "read", n) + at(target, "written", n)))[:3]
            tops = ", ".join(f"{n} x{small.kernels[n]} {(at(target, 'read', n) + at(target, 'written', n)) / 1e9:.2f}"
                             for n in top)
            print(f"| {label} {dataset} K={k} | {mode} | {sum(small.kernels.values())} | {read / 1e9:.2f} | "
                  f"{written / 1e9:.2f} | {(read + written) / 1e9:.2f} | {tops} |", flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--model-paths"]:
        model_paths(sys.argv[2:])
        return
    if "--paths" in sys.argv:
        paths(amp="--amp" in sys.argv)
        return
    digits, labels = load_mnist(os.environ.get("STN_DATA_DIR", "data"), train=True)
    print("| model | dataset | K | ops in data (K batches), exact | per step, block data (T=32) | ops in the step "
          "| step ops / K |")
    print("|---|---|---|---|---|---|---|")
    kinds = dict(TABLE1_MODELS)
    for label in sys.argv[1:] or ["FCN", "CNN", "ST-CNN Aff", "ST-CNN TPS"]:
        for dataset in ("R", "P", "E", "TC") if label in ("FCN", "CNN") else ("R",):
            base = compose([f"dataset={dataset}", *kinds[label], "trainer.batch_size=8"])
            for k in (1, 9):
                cfgs = [dataclasses.replace(base, seed=s) for s in range(k)]
                engine = BatchedModels(cfgs, "cpu")
                stream = BatchedStream(cfgs, digits, labels, "cpu")
                engine.step(*stream.next())  # warm caches (TPS weights)
                with Count() as data:
                    batch = stream.next()
                with Count() as step:
                    engine.step(*batch)
                block = BlockStream(cfgs, digits, labels, "cpu", block_steps=32)
                with Count() as blocked:
                    for _ in range(32):
                        block.next()
                print(f"| {label} | {dataset} | {k} | {data.ops} | {blocked.ops / 32:.1f} | {step.ops} | "
                      f"{step.ops / k:.0f} |")


if __name__ == "__main__":
    main()
