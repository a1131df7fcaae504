"""A/B bench of the conv paths on the groups that decide the table (issue 28), and the cost table they give.

    PYTHONPATH=src python experiments/bench/engine_ab.py --device cuda --amp --cuda-graph --out ab.json

For CNN R (K=9), ST-CNN Aff R (K=9), CNN RTS (K=3), CNN TC (K=3) and ST-CNN Aff TC (K=3): `stn engine bench`'s
measurement (step alone, data + step, block data) in each engine mode of --modes, vmap (the first loan's
baseline) re-measured on the same card; a mode the engine does not have is logged as failed and skipped. Then
torch.profiler's top kernels of a few eager steps of CNN R in vmap and in the winning mode. Writes one JSON: the
bench rows, the winner per configuration, the profiles (text), and "cost": the planner's cost table
(`stn.engine.plan.CostModel.load`) with a row for every convolutional kind at 28, 42 and 60 px in the winning mode of
its nearest measured analogue (same kind at the nearest size, else ST-CNN Aff), its rate scaled by FLOPs per
image and marked "inferred_from", plus the first loan's rows for the kinds without convolutions. So
`stn engine run --mode auto --cost ab.json` trains each group in its winning path.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

CONFIGS = (("CNN", "R", 9), ("ST-CNN Aff", "R", 9), ("CNN", "RTS", 3), ("CNN", "TC", 3), ("ST-CNN Aff", "TC", 3))
CONV_KINDS = ("CNN", "ST-CNN Aff", "ST-CNN Proj", "ST-CNN TPS")
SIZES = {28: ("R", 9), 42: ("RTS", 3), 60: ("TC", 3)}  # canvas -> (a dataset of it, the table's K there)
LOAN_BENCH = Path("experiments/table1/paper-gpu/loan-2026-11-30/bench_block.json")


def profile(kind: str, dataset: str, k: int, mode: str, options: Any, device: str, batch: int, steps: int,
            rows: int = 12) -> str:
    """torch.profiler's table of the top kernels (by device time on CUDA, CPU time on the CPU) over `steps`."""
    import dataclasses

    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from stn.compose import compose
    from stn.device import sync
    from stn.engine.batched import BatchedModels
    from stn.engine.streams import make_stream
    from stn.grid import TABLE1_MODELS
    from stn.mnist import load_mnist

    base = compose([f"dataset={dataset}", *dict(TABLE1_MODELS)[kind], f"trainer.batch_size={batch}",
                    f"trainer.device={device}"])
    cfgs = [dataclasses.replace(base, seed=seed) for seed in range(k)]
    digits, labels = load_mnist(base.data_dir, train=True)
    # eager, not graphed: the profiler then sees each kernel by name (a replayed CUDA graph may show as one launch)
    options = dataclasses.replace(options, mode=mode, cuda_graph=False)
    engine = BatchedModels(cfgs, device, options)
    stream = make_stream(cfgs, digits, labels, device, options)
    for _ in range(3):
        engine.step(*stream.next())
    sync(torch.device(device))
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step(*stream.next())
        sync(torch.device(device))
    key = "cuda_time_total" if cuda else "self_cpu_time_total"
    return f"{kind} {dataset} K={k} {mode}, {steps} steps:\n" + prof.key_averages().table(sort_by=key, row_limit=rows)


@functools.cache
def _flops_per_image(kind: str, dataset: str) -> float:
    from stn.compose import compose
    from stn.grid import TABLE1_MODELS
    from stn.measure import model_flops_per_image

    return model_flops_per_image(compose([f"dataset={dataset}", *dict(TABLE1_MODELS)[kind]]))


def cost_table(rows: list[dict[str, Any]], winners: dict[str, dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """Cost rows for every convolutional kind and canvas (inferred where not measured), and the loan's rows for
    the kinds without convolutions."""
    measured = {(w["kind"], w["size"]): w for w in winners.values()}
    cost = []
    for kind in CONV_KINDS:
        for size, (dataset, k) in SIZES.items():
            if (kind, size) in measured:
                w = measured[(kind, size)]
                cost.append({"kind": kind, "size": size, "k": w["k"], "images_per_s": w["pipeline_images_per_s"],
                             "mode": w["mode"], "flops_per_image": w["flops_per_image"]})
                continue
            same_kind = sorted((abs(s - size), s) for kk, s in measured if kk == kind)
            aff = sorted((abs(s - size), s) for kk, s in measured if kk == "ST-CNN Aff")
            source = (kind, same_kind[0][1]) if same_kind and kind == "CNN" else \
                ("ST-CNN Aff", aff[0][1]) if aff else None
            if source is None:
                continue
            w = measured[source]
            flops = _flops_per_image(kind, dataset)
            cost.append({"kind": kind, "size": size, "k": k, "mode": w["mode"], "flops_per_image": flops,
                         "images_per_s": w["pipeline_images_per_s"] * w["flops_per_image"] / flops,
                         "inferred_from": f"{source[0]} {source[1]}px K={w['k']} {w['mode']}"})
    if LOAN_BENCH.is_file():  # the kinds without convolutions: vmap, as the first loan measured them
        cost += [r for r in json.loads(LOAN_BENCH.read_text())["cost"] if r["kind"] not in CONV_KINDS]
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", default="vmap,loop,im2col")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--cuda-graph", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block-steps", type=int, default=32)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--configs", default="", help="e.g. 'CNN:R:9,CNN:TC:3' (default: the five of issue 28)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from stn.engine.bench import bench_engine, format_engine_table
    from stn.engine.options import EngineOptions

    configs = [(c.split(":")[0], c.split(":")[1], int(c.split(":")[2])) for c in args.configs.split(",") if c] \
        or list(CONFIGS)
    options = EngineOptions(amp=args.amp, cuda_graph=args.cuda_graph, channels_last=args.channels_last,
                            data="block", block_steps=args.block_steps)
    modes = [m for m in args.modes.split(",") if m]
    start = time.perf_counter()
    result: dict[str, Any] = {"configs": configs, "modes": modes, "rows": [], "failed": [], "winners": {},
                              "profiles": []}
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    for kind, dataset, k in configs:
        bench = bench_engine([kind], dataset=dataset, ks=[k], modes=modes, batch_size=args.batch_size,
                             steps=args.steps, warmup=args.warmup, device=args.device, options=options, log=log)
        for key in ("device", "device_name", "torch", "threads", "peak_flops"):
            result[key] = bench[key]
        result["rows"] += bench["rows"]
        result["failed"] += bench["failed"]
        if bench["rows"]:
            best = max(bench["rows"], key=lambda r: r["pipeline_images_per_s"])
            base = next((r for r in bench["rows"] if r["mode"] == "vmap"), None)
            result["winners"][f"{kind}|{dataset}|{k}"] = {
                **best, "speedup_over_vmap": best["pipeline_images_per_s"] / base["pipeline_images_per_s"]
                if base else None}
        print(format_engine_table(bench), flush=True)
        # the cost table of what is measured so far: a timeout leaves one the table can use
        result["cost"] = cost_table(result["rows"], result["winners"], args.device)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    result["bench_s"] = time.perf_counter() - start
    print("\n| configuration | winner | pipeline images/s | vs vmap |\n|---|---|---|---|")
    for key, w in result["winners"].items():
        ratio = w["speedup_over_vmap"]
        print(f"| {key} | {w['mode']} | {w['pipeline_images_per_s']:,.0f} | "
              f"{'-' if ratio is None else f'{ratio:.2f}x'} |", flush=True)
    first = f"{configs[0][0]}|{configs[0][1]}|{configs[0][2]}"
    winner = result["winners"].get(first, {}).get("mode")
    for mode in dict.fromkeys(["vmap", winner]):
        if mode is None:
            continue
        try:
            text = profile(*configs[0], mode, options, args.device, args.batch_size, args.profile_steps)
        except Exception as err:  # noqa: BLE001 - a profile that fails must not cost the cost table
            text = f"{first} {mode}: profile failed: {type(err).__name__}: {err}"
        result["profiles"].append(text)
        print(text, flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    result["wall_s"] = time.perf_counter() - start
    result["load_average"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
