"""`stn bench ...`: throughput benchmarks (training images/s vs a reference, the data pipelines, the engine)."""

from __future__ import annotations

import math
import os
from typing import Annotated

import typer

from stn.cli.common import DatasetName, csv_list, fail, load_config, refuse, reported
from stn.cli.engine import bench as _engine_bench
from stn.compose import group_choices
from stn.config import MNIST_TRAIN

# Bounds of the timing options (a measurement must end): rounds and steps per turn, a turn's seconds, threads.
MAX_ROUNDS, MAX_STEPS, MAX_TURN_S, MAX_THREADS = 1000, 100_000, 600.0, 1024

bench_app = typer.Typer(
    help="Throughput benchmarks. `stn bench [--quick]`: training images/s per model, our pipeline vs a "
    "DataLoader + eager float32 reference, with FLOP/s against the device's peak; ends with one "
    "`<model> ratio: X.XX` line per model. `stn bench data`: the data pipelines alone."
)
bench_app.command("engine", help="The batched engine's throughput (= stn engine bench).")(_engine_bench)


@bench_app.command("data")
def bench_data_command(
    overrides: Annotated[list[str] | None, typer.Argument(help="Config overrides (data_dir=... picks MNIST).")] = None,
    images: Annotated[int, typer.Option("--images", help="Images per measurement (the reference's epoch).")] = 8192,
    batch_size: Annotated[int, typer.Option(help="Batch size of both pipelines.")] = 256,
    workers: Annotated[str, typer.Option(help="DataLoader worker counts of the reference, comma-separated.")] = "0,2",
    datasets: Annotated[str, typer.Option(help="Datasets to measure, comma-separated.")] = "plain,R,RTS,P,E,TC",
    threads: Annotated[
        int, typer.Option(help="torch threads while measuring; 1 = one core, like the reference's main process; "
                          "0 = torch's default.")
    ] = 1,
) -> None:
    """Distorted images/s: our batched generator vs per-image torchvision transforms in a DataLoader."""
    import os
    import time

    config = load_config(overrides)
    from stn.bench.data import bench_data, format_data_table

    names = tuple(name.strip() for name in datasets.split(",") if name.strip())
    unknown = [name for name in names if name not in group_choices("dataset")]
    try:
        counts = tuple(int(count) for count in workers.split(","))
    except ValueError:
        fail(f"--workers {workers!r}: expected comma-separated integers such as 0,2", 2)
    refuse([f"--datasets {datasets!r}: unknown {unknown}; choose from {', '.join(group_choices('dataset'))}"]
           * bool(unknown or not names)
           + [f"--images {images}: choose 1 to 60000"] * (not 1 <= images <= 60_000)
           + [f"--batch-size {batch_size}: choose 1 to --images ({images})"] * (not 1 <= batch_size <= max(images, 1))
           + [f"--workers {workers!r}: counts must be 0 to 64"] * any(not 0 <= c <= 64 for c in counts)
           + [f"--threads {threads}: choose 0 (torch's default) to {MAX_THREADS}"] * (not 0 <= threads <= MAX_THREADS))
    start = time.perf_counter()
    with reported():
        rows = bench_data(config.data_dir, images=images, batch_size=batch_size, workers=counts, datasets=names,
                          threads=threads or None)
    typer.echo(format_data_table(rows, counts))
    typer.echo(f"\n{images} images per measurement, batch {batch_size}; torch threads {threads or 'default'} "
               f"of {os.cpu_count()} CPUs; wall time {time.perf_counter() - start:.1f} s")


def _bench_models(names: str | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """--models 'cnn,st_cnn_aff' (or Table 1 labels) -> (label, config choices) pairs; None = the default five."""
    from stn.bench.train import TRAIN_MODELS
    from stn.grid import TABLE1_MODELS, slug

    if not names:
        return TRAIN_MODELS
    # slug: 'ST-CNN Aff', 'st_cnn_aff' and 'st-cnn-aff' name one model
    known = {slug(label).replace("-", "_"): (label, choice) for label, choice in TABLE1_MODELS}
    wanted = [slug(name).replace("-", "_") for name in csv_list(names) or []]
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        fail(f"--models {names!r}: unknown {unknown}; choose from {', '.join(known)}", 2)
    return tuple(known[name] for name in wanted)


@bench_app.callback(invoke_without_command=True)
def bench_train_command(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option("--quick", help="Shorter measurement: under five minutes on a 2-core CPU.")]
    = False,
    models: Annotated[str | None, typer.Option(
        help="Comma-separated models: fcn, cnn, st_fcn_aff, st_cnn_aff, st_cnn_proj, st_cnn_tps, ... "
             "(default: fcn,cnn,st_cnn_aff,st_cnn_proj,st_cnn_tps).")] = None,
    dataset: Annotated[DatasetName, typer.Option(help="Dataset of every measurement.")] = "R",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Batch size of both pipelines (the paper's: 256).")] = 256,
    rounds: Annotated[int | None, typer.Option(help="Alternating timed rounds per side (default 7; quick 5).")]
    = None,
    steps: Annotated[int | None, typer.Option(
        help="Training steps per turn (default 8; quick 4), repeated until the turn lasts --min-turn seconds.")]
    = None,
    min_turn: Annotated[float | None, typer.Option(help="Shortest timed turn in seconds (default 0.5; quick 0.3).")]
    = None,
    warmup: Annotated[int | None, typer.Option(help="Untimed steps per side first (default 3; quick 2).")] = None,
    workers: Annotated[int | None, typer.Option(
        help="The reference DataLoader's workers (default: one per CPU, at most 4).")] = None,
    threads: Annotated[int, typer.Option(help="torch threads for both sides; 0 = torch's default.")] = 0,
    override: Annotated[list[str] | None, typer.Option(
        "--override", help="Config override for every model (repeatable), e.g. --override trainer.compile=true.")]
    = None,
) -> None:
    """Training images/s per model: our pipeline vs DataLoader + eager float32, with FLOP/s against the peak.

    Ends with one line per model, `<model> ratio: X.XX` (ours / reference images/s, median over rounds).
    `stn bench data` measures the data pipelines alone.
    """
    if ctx.invoked_subcommand is not None:
        return
    import dataclasses
    import time

    chosen = _bench_models(models)
    from stn.grid import label_problems

    # each row is labelled by its model and --dataset: an override of what they set would mislabel it
    refuse(label_problems(override or [], [(f"model {label}", list(choice)) for label, choice in chosen]
                          + [(f"--dataset {dataset}", [f"dataset={dataset}"])]))
    overrides = [f"dataset={dataset}", f"trainer.device={device}", *(override or [])]
    config = load_config(overrides)
    from stn.bench.train import QUICK, TrainBenchSettings, bench_train, format_train_table, ratio_lines

    base = QUICK if quick else TrainBenchSettings()
    given = {"rounds": rounds, "steps": steps, "warmup": warmup, "workers": workers, "batch_size": batch_size,
             "min_turn_s": min_turn}
    settings = dataclasses.replace(base, **{key: value for key, value in given.items() if value is not None})
    # Every option bounded: a measurement that never ends (--min-turn inf, --rounds 10**9) is refused.
    refuse([f"--rounds {settings.rounds}: choose 1 to {MAX_ROUNDS}"] * (not 1 <= settings.rounds <= MAX_ROUNDS)
           + [f"--steps {settings.steps}: choose 1 to {MAX_STEPS}"] * (not 1 <= settings.steps <= MAX_STEPS)
           + [f"--warmup {settings.warmup}: choose 0 to {MAX_STEPS}"] * (not 0 <= settings.warmup <= MAX_STEPS)
           + [f"--batch-size {settings.batch_size}: choose 1 to {MNIST_TRAIN}"]
           * (not 1 <= settings.batch_size <= MNIST_TRAIN)
           + [f"--min-turn {settings.min_turn_s}: choose 0 to {MAX_TURN_S} seconds"]
           * (not (math.isfinite(settings.min_turn_s) and 0 <= settings.min_turn_s <= MAX_TURN_S))
           + [f"--workers {settings.workers}: choose 0 to 64"]
           * (settings.workers is not None and not 0 <= settings.workers <= 64)
           + [f"--threads {threads}: choose 0 (torch's default) to {MAX_THREADS}"] * (not 0 <= threads <= MAX_THREADS))
    import torch

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    start, load = time.perf_counter(), os.getloadavg()
    try:
        with reported():
            result = bench_train(config, chosen, settings, tuple(overrides),
                                 log=lambda line: typer.echo(line, err=True))
    finally:
        torch.set_num_threads(previous_threads)
    typer.echo(format_train_table(result))
    after = os.getloadavg()
    typer.echo(f"\n{'quick' if quick else 'full'} run: {settings.rounds} alternating rounds, turns of {settings.steps} "
               f"steps repeated to at least {settings.min_turn_s} s, after {settings.warmup} warm-up steps per side; "
               f"load average (1 min) {load[0]:.2f} before, {after[0]:.2f} "
               f"after; wall time {time.perf_counter() - start:.1f} s\n")
    typer.echo(ratio_lines(result))
