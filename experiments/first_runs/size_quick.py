"""Estimate the wall time of the 36-cell Table 1 under a trainer preset on this machine (default: quick).

    STN_DATA_DIR=../shared/data .venv/bin/python experiments/first_runs/size_quick.py [preset]

Per cell: time 40 training steps (after 5 warm-up steps) and one evaluation on the 10k test set, then
estimate iterations x step + (iterations / eval_every) x evaluation. Process start-up, MNIST loading and
W&B are not included (a few seconds per cell). Results: experiments/first_runs/README.md.
"""

from __future__ import annotations

import sys
import time

import torch

from stn.compose import compose
from stn.data import build_data
from stn.models import build_model
from stn.step import build_optimizer, evaluate, train_step

ROWS = {
    "FCN": ["model=fcn"],
    "CNN": ["model=cnn"],
    "ST-FCN Aff": ["model=st_fcn", "transformer=affine"],
    "ST-FCN Proj": ["model=st_fcn", "transformer=projective"],
    "ST-FCN TPS": ["model=st_fcn", "transformer=tps"],
    "ST-CNN Aff": ["model=st_cnn", "transformer=affine"],
    "ST-CNN Proj": ["model=st_cnn", "transformer=projective"],
    "ST-CNN TPS": ["model=st_cnn", "transformer=tps"],
}
TC_ROWS = ("FCN", "CNN", "ST-FCN Aff", "ST-CNN Aff")  # the rows the paper gives for TC


def main(preset: str = "quick") -> None:
    total = 0.0
    for dataset in ("R", "RTS", "P", "E", "TC"):
        for row, overrides in ROWS.items():
            if dataset == "TC" and row not in TC_ROWS:
                continue
            cfg = compose([f"dataset={dataset}", *overrides, f"trainer={preset}", "trainer.device=cpu"])
            torch.manual_seed(0)
            model = build_model(cfg)
            optimizer = build_optimizer(model, cfg.trainer)
            stream, test_set = build_data(cfg, "cpu")
            for _ in range(5):
                train_step(model, optimizer, *stream.next())
            start = time.perf_counter()
            for _ in range(40):
                train_step(model, optimizer, *stream.next())
            step = (time.perf_counter() - start) / 40
            start = time.perf_counter()
            evaluate(model, test_set, cfg.trainer.eval_batch_size)
            evaluation = time.perf_counter() - start
            evaluations = max(1, cfg.trainer.iterations // cfg.trainer.eval_every)
            cell = cfg.trainer.iterations * step + evaluations * evaluation
            total += cell
            print(f"{dataset:4s} {row:12s} step {step * 1000:6.1f} ms  eval {evaluation:4.1f} s  -> cell ~{cell:5.0f} s",
                  flush=True)
    print(f"total ~{total / 60:.1f} min for the cells run one after another")


if __name__ == "__main__":
    main(*sys.argv[1:])
