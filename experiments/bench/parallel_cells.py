"""One training with every core vs one training per core at once: which trains more images per second?

    STN_DATA_DIR=/work/shared/data .venv/bin/python experiments/bench/parallel_cells.py \
        [--models cnn,st_cnn_aff,fcn] [--dataset R] [--batch-size 128] [--seconds 20] [--rounds 2]

What `stn convergence run --parallel N` and `stn reproduce-table --parallel N` choose between. Per model,
alternating in rounds: "one" is one process training with torch threads = the cores; "split" is one process
per core, each with one thread, all training at once. Each process builds the model as `fit` does
(`prepare_model`, float32, channels_last), draws its batches from a TrainStream, runs `fit_step` for a warm-up
and then for `--seconds`, and reports the images it trained and the time it took. Printed: images/s of "one",
the summed images/s of "split", and their ratio (split / one), median over the rounds. Run it on an idle
machine: every process here competes for the same cores. Results: experiments/bench/README.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import statistics
import time

SLUGS = {"fcn": ["model=fcn"], "cnn": ["model=cnn"], "st_cnn_aff": ["model=st_cnn", "transformer=affine"],
         "st_cnn_tps": ["model=st_cnn", "transformer=tps"], "st_fcn_aff": ["model=st_fcn", "transformer=affine"]}


def train_for(model: str, dataset: str, batch: int, threads: int, seconds: float, start_at: float,
              out: multiprocessing.Queue) -> None:
    import torch

    torch.set_num_threads(threads)
    from stn.compose import compose
    from stn.data import TrainStream
    from stn.device import keep_freed_memory
    from stn.mnist import load_mnist
    from stn.step import build_optimizer, build_scheduler, fit_step, prepare_model

    keep_freed_memory()
    cfg = compose([f"dataset={dataset}", *SLUGS[model], "trainer=quick", "trainer.device=cpu",
                   f"trainer.batch_size={batch}", "trainer.cpu_precision=float32"])
    digits, labels = load_mnist(cfg.data_dir, train=True)
    net = prepare_model(cfg, torch.device("cpu"))
    optimizer = build_optimizer(net, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer)
    stream = TrainStream(digits, labels, cfg.dataset, batch, cfg.seed)
    for _ in range(3):  # warm-up: allocator, oneDNN primitives
        fit_step(net, optimizer, scheduler, stream, amp=False, channels_last=True)
    while time.time() < start_at:  # every process of a round starts timing together
        time.sleep(0.01)
    steps, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        fit_step(net, optimizer, scheduler, stream, amp=False, channels_last=True)
        steps += 1
    out.put((steps * batch, time.perf_counter() - began))


def measure(model: str, dataset: str, batch: int, processes: int, threads: int, seconds: float) -> float:
    """Summed images/s of `processes` concurrent trainings with `threads` torch threads each."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 12  # time for every process to import torch and build its model
    workers = [ctx.Process(target=train_for, args=(model, dataset, batch, threads, seconds, start_at, out))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    results = []
    while len(results) < len(workers):
        try:
            results.append(out.get(timeout=5))
        except queue.Empty:
            if not any(worker.is_alive() for worker in workers) and out.empty():
                raise SystemExit(f"a {model} training process died (exit codes "
                                 f"{[worker.exitcode for worker in workers]})") from None
    for worker in workers:
        worker.join()
    return sum(images / elapsed for images, elapsed in results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="cnn,st_cnn_aff,fcn")
    parser.add_argument("--dataset", default="R")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    began = time.perf_counter()
    print(f"cores {cores}; batch {args.batch_size}; dataset {args.dataset}; {args.seconds:g} s timed per "
          f"process per round; load average {os.getloadavg()[0]:.2f}", flush=True)
    print("| model | one process, threads = cores: images/s | one process per core, 1 thread each: "
          "images/s (sum) | split / one |\n|---|---|---|---|")
    for model in args.models.split(","):
        one, split = [], []
        for _ in range(args.rounds):
            one.append(measure(model, args.dataset, args.batch_size, 1, cores, args.seconds))
            split.append(measure(model, args.dataset, args.batch_size, cores, 1, args.seconds))
        a, b = statistics.median(one), statistics.median(split)
        print(f"| {model} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}; wall time {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
