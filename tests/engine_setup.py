"""Configs for the batched-engine tests (test_batched, test_batched_data, test_batched_run): small, CPU, seeded.

24 training digits in batches of 8 (an epoch ends every 3 steps), lr dropping every 2 steps, weight decay on:
a few steps cross epochs, rate changes and the decay term.
"""

from __future__ import annotations

import torch

from stn.compose import compose
from stn.grid import TABLE1_MODELS

CPU = torch.device("cpu")
KINDS = dict(TABLE1_MODELS)


def configs(choice: tuple[str, ...], *, datasets: tuple[str, ...] = ("R",), seeds: tuple[int, ...] = (0, 1, 2),
            extra: tuple[str, ...] = ()) -> list:
    out = []
    for dataset in datasets:
        for seed in seeds:
            out.append(compose([
                f"dataset={dataset}", *choice, "trainer=smoke", "trainer.device=cpu", "trainer.batch_size=8",
                "trainer.lr_step=2", "trainer.weight_decay=0.001", "trainer.channels_last=false",
                "dataset.train_limit=24", "dataset.test_limit=40", "logger.mode=disabled", f"seed={seed}", *extra,
            ]))  # fmt: skip
    return out
