"""Count the ATen ops (~ kernel launches on a GPU) of one batched step and of its data, per model kind and K.

    PYTHONPATH=src python experiments/bench/engine_ops.py
    PYTHONPATH=src python experiments/bench/engine_ops.py --paths [KIND ...]

On the CPU, a proxy for what the GPU will be bound by: every op is at least one kernel launch there (a few
microseconds each), whatever the batch. Counted with a TorchDispatchMode (forward, backward, update).
--paths: per conv path (vmap, loop counted; im2col written out, `stn.step_cost`), the kernels, GFLOP and GB of
one step at the table's batch (256) and K, on R (K=9), RTS and TC (K=3): the numbers the GPU run is held against
(`stn engine plan --predict` turns them into times).
"""

from __future__ import annotations

import dataclasses
import os
import sys

from torch.utils._python_dispatch import TorchDispatchMode

from stn.batched import BatchedModels
from stn.batched_data import BatchedStream, BlockStream
from stn.compose import compose
from stn.mnist import load_mnist
from stn.models import TABLE1_MODELS


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def paths(labels: list[str]) -> None:
    from stn.step_cost import PATHS, count_step

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


def main() -> None:
    if sys.argv[1:2] == ["--paths"]:
        paths(sys.argv[2:])
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
