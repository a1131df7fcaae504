"""Why ST-CNN Aff barely rotates R digits at short budgets: one suspect changed at a time, 3 seeds each.

    python experiments/rectify/probe.py --variant paper --seed 0 [--steps 1200] [--dataset R]

Trains one ST model exactly as `stn train` does (same model, data stream, SGD with momentum, StepLR with the
paper's /10 at 1/3 and 2/3, float32 on the CPU), except for the one thing the variant changes, then measures
on the first 2000 test digits:
- test error (%) on the full test set;
- how well the transformer undoes the rotation. The test set knows each digit's true map (output canvas ->
  upright digit, `source_affine`); composing it with the transformer's map (its output -> its input, theta)
  gives each digit's map from the transformer's output to the upright digit. Its rotation (the rotation
  part of the closest similarity, atan2(m10 - m01, m00 + m11)) is constant over the test set if the
  transformer rectifies every digit to one "mean pose": `residual_std_deg` is its std around the circular mean
  (identity transformer: the distortion's own, 52 deg for U(-90, 90)). `st_rotation_std_deg` is the spread of the
  transformer's own rotation; `corr` the correlation of that rotation with the true angle (-1: it undoes it).
- `residual_shift_std_px`: the spread (norm of the per-axis std over digits) of where the transformer output's
  centre lands in the upright digit, in digit pixels: how well it undoes translation (RTS, TC).
- scale of the transformer's map (sqrt |det|): its median and p5/p95 (zoom-out shows as > 1: the output
  samples a wider region than the input, so the digit shrinks).
Appends one JSON line to experiments/rectify/results.jsonl and keeps the weights in runs/rectify/.

Variants (each alone):
  paper       the recipe as stn trains it
  loc_lr10    the localisation net (and regression layer) at 10x the learning rate
  loc_lr01    ... at 0.1x
  loc_kaiming the localisation net's conv/linear layers He-initialised (kaiming normal, fan_in, ReLU gain):
              PyTorch's default (kaiming uniform, a=sqrt(5)) shrinks activations by ~1/sqrt(3) per layer, so
              the 20 features the regression layer reads start small, and so do its weight gradients
  no_pool     (RTS, TC) no average pooling after the transformer (dataset.st_output_pool=1)
  loc_frozen  the localisation net at learning rate 0: the transformer stays the identity, so what is left is the
              rest of the ST model (on RTS and TC: the 2x average pooling after the transformer, which halves the
              resolution the classifier sees until the transformer learns to zoom in)
  loc_fc      (ST-CNN) the ST-FCN's localisation net (FC 32 -> FC 32 on the full-size input) instead of the
              convolutional one: separates "which localisation net" from "which classifier" (the ST-FCN, whose
              FCN classifier cannot absorb rotations itself, learns to rotate within a few hundred steps)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from stn.compose import compose  # noqa: E402
from stn.data import build_data  # noqa: E402
from stn.device import keep_freed_memory  # noqa: E402
from stn.models import Standardize, fc_localisation  # noqa: E402
from stn.spatial import SpatialTransformer  # noqa: E402
from stn.step import build_optimizer, build_scheduler, evaluate, fit_step, prepare_model  # noqa: E402

VARIANTS = ("paper", "loc_lr10", "loc_lr01", "loc_kaiming", "no_pool", "loc_fc", "loc_frozen")


def rotation_deg(m: torch.Tensor) -> torch.Tensor:
    """(B, 2, 2) -> (B,) rotation of the closest similarity, degrees."""
    return torch.rad2deg(torch.atan2(m[:, 1, 0] - m[:, 0, 1], m[:, 0, 0] + m[:, 1, 1]))


def spread_deg(angles: torch.Tensor) -> tuple[float, float]:
    """(circular mean, std of the deviations from it wrapped to (-180, 180]) in degrees: the plain std for
    angles that do not wrap (52 deg for U(-90, 90)), and a mean pose near +-180 is not split in two."""
    radians = torch.deg2rad(angles.double())
    mean = torch.atan2(radians.sin().mean(), radians.cos().mean())
    deviation = torch.remainder(radians - mean + math.pi, 2 * math.pi) - math.pi
    return float(torch.rad2deg(mean)), float(torch.rad2deg(deviation.std()))


@torch.no_grad()
def rectification(model: nn.Module, test_set, count: int = 2000) -> dict[str, float]:
    model.eval()
    images = test_set.images[:count]
    true = test_set.params["source_affine"][:count].reshape(-1, 2, 3).double()  # output canvas -> digit
    theta = model.trace(images).theta.double()
    st = theta.reshape(-1, 2, 3) if theta.shape[1] == 6 else None
    model.train()
    if st is None:
        raise SystemExit("the rotation probe needs an affine transformer")
    composed = true[:, :, :2] @ st[:, :, :2]  # transformer output -> upright digit (linear parts)
    # where the transformer output's centre lands in the upright digit, in digit pixels (14 per unit)
    shift = 14.0 * ((true[:, :, :2] @ st[:, :, 2:])[..., 0] + true[:, :, 2])  # (B, 2)
    st_rot, residual = rotation_deg(st[:, :, :2]), rotation_deg(composed)
    true_angle = test_set.params["angle_deg"][:count].double()
    scale = st[:, :, :2].det().abs().sqrt()
    corr = torch.corrcoef(torch.stack([st_rot, true_angle]))[0, 1]
    return {
        "residual_std_deg": spread_deg(residual)[1], "residual_mean_deg": spread_deg(residual)[0],
        "st_rotation_std_deg": float(st_rot.std()), "corr": float(corr),
        "scale_median": float(scale.median()), "scale_p5": float(scale.quantile(0.05)),
        "scale_p95": float(scale.quantile(0.95)),
        "residual_shift_std_px": float(shift.std(dim=0).norm()),  # 0 when every digit is centred alike
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--dataset", default="R")
    parser.add_argument("--model", default="st_cnn")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments/rectify/results.jsonl")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"dataset={args.dataset}", f"model={args.model}", "transformer=affine", "trainer=quick",
                 f"trainer.iterations={args.steps}", f"trainer.lr_step={args.steps // 3}", "trainer.device=cpu",
                 "trainer.cpu_precision=float32", f"seed={args.seed}"]
    if args.variant == "no_pool":
        overrides.append("dataset.st_output_pool=1")
    cfg = compose(overrides)
    device = torch.device("cpu")
    keep_freed_memory()
    model = prepare_model(cfg, device)
    stream, test_set = build_data(cfg, device)
    if args.variant == "loc_fc":
        torch.manual_seed(10_000 + args.seed)
        size = cfg.dataset.size
        model.transformers[0] = SpatialTransformer(*fc_localisation(1, size, downsample=False), "affine",
                                                   preprocess=Standardize())
        model = model.to(memory_format=torch.channels_last)
    if args.variant == "loc_kaiming":
        torch.manual_seed(10_000 + args.seed)
        for transformer in model.transformers:
            for layer in transformer.localisation.modules():
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                    nn.init.zeros_(layer.bias)
    scale = {"loc_lr10": 10.0, "loc_lr01": 0.1, "loc_frozen": 0.0}.get(args.variant, 1.0)
    trainer = dataclasses.replace(cfg.trainer, loc_lr_scale=scale)  # stn train's trainer.loc_lr_scale
    optimizer = build_optimizer(model, trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer)
    before = rectification(model, test_set)
    start = time.perf_counter()
    loss_sum = torch.zeros(())
    for _ in range(cfg.trainer.iterations):
        loss_sum += fit_step(model, optimizer, scheduler, stream, amp=False, channels_last=True)
    train_s = time.perf_counter() - start
    if not math.isfinite(float(loss_sum)):
        raise SystemExit(f"{args.variant} seed {args.seed}: the loss became NaN/inf")
    error = evaluate(model, test_set, 1000, channels_last=True)
    after = rectification(model, test_set)
    weights = ROOT / "runs/rectify" / f"{args.dataset}-{args.model}-{args.variant}-{args.steps}-seed{args.seed}.pt"
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg)}, weights)
    record = {"dataset": args.dataset, "model": args.model, "variant": args.variant, "seed": args.seed,
              "steps": args.steps, "batch_size": cfg.trainer.batch_size, "test_error": error,
              "before": before, "after": after, "train_s": round(train_s), "threads": torch.get_num_threads(),
              "cpu": os.popen("grep -m1 'model name' /proc/cpuinfo").read().split(":")[-1].strip()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
