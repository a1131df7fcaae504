"""`stn engine ...`: the batched engine's commands (bench, plan, run). Also runnable as `python -m stn.cli.engine`.

    stn engine bench --kinds CNN,"ST-CNN Aff" --ks 1,3,9 --device cuda --out bench.json
    stn engine plan --preset paper --seeds 0,1,2 --cost bench.json --budget 540
    stn engine plan --predict --peak-tflops 761 --done experiments/table1/paper-gpu/loan-2026-11-30/results.json
    stn engine run --preset paper --seeds 0,1,2 --state state/ --budget 540 --device cuda --amp --cuda-graph \
        --data block --in-flight 4
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as stn.cli.main: before torch loads

import typer  # noqa: E402

from stn.cli.common import DatasetName, csv_list, fail, parse_seeds, refuse, reported  # noqa: E402
from stn.config import MNIST_TRAIN, TrainerPreset  # noqa: E402
from stn.grid import DEFAULT_GRID as GRID  # noqa: E402
from stn.validation import file_problems, folder_problems  # noqa: E402

engine_app = typer.Typer(help="The batched engine: K same-shape models per process (bench, plan, run).",
                         no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

Mode = Literal["vmap", "loop", "im2col"]  # stn.engine.options.EngineOptions.mode (ENGINE_MODES)
RunMode = Literal["vmap", "loop", "im2col", "auto"]  # auto: stn.engine.table_run.run_table picks per group from the cost table
DataChoice = Literal["exact", "block"]  # stn.engine.options.EngineOptions.data


def _options(device: str, amp: bool, channels_last: bool, compile: bool, cuda_graph: bool, mode: str,
             data: str = "exact", block_steps: int = 128):
    from stn.engine.options import EngineOptions

    return EngineOptions(amp=amp, channels_last=channels_last, compile=compile, cuda_graph=cuda_graph, mode=mode,
                         data=data, block_steps=block_steps)


def _device(name: str) -> str:
    """--device as a torch device name; exit 2 for a name that is none, or a CUDA device this machine lacks."""
    refuse([f"--device {name!r}: choose auto, cpu, cuda or cuda:N"] * (not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name)))
    from stn.device import resolve_device

    with reported():
        return str(resolve_device(name))


# Bounds of every numeric option: models per batch, steps, seconds (a chunk of at most 30 days), FLOP/s.
MAX_K, MAX_STEPS, MAX_BUDGET_S = 256, 100_000, 30 * 24 * 3600.0


def _count_problems(option: str, value: int | None, low: int, high: int) -> list[str]:
    return [f"{option} {value}: choose {low} to {high}"] * (value is not None and not low <= value <= high)


def _seconds_problems(option: str, value: float, high: float) -> list[str]:
    return [f"{option} {value}: choose a number of seconds above 0, at most {high:.0f}"] \
        * (not (math.isfinite(value) and 0 < value <= high))


def _check_table(grid: Path, seeds: str, cost: Path | None, flops: float, max_k: int | None) -> list[int]:
    """The table arguments of plan and run, checked before anything is composed or trained (exit 2)."""
    seed_list = parse_seeds(seeds)
    refuse([f"--grid {grid}: grid file not found (the paper's Table 1 is {GRID})"] * (grid != GRID and not grid.is_file())
           + [f"--cost {cost}: no such file; pass the JSON `stn engine bench --out` wrote"]
           * (cost is not None and not cost.is_file())
           + [f"--flops {flops}: choose a finite number of FLOP/s above 0"] * (not (math.isfinite(flops) and flops > 0))
           + _count_problems("--max-k", max_k, 1, MAX_K))
    if cost is not None:
        from stn.engine.plan import CostModel

        try:
            CostModel.load(cost, flops)
        except Exception as err:  # not JSON, or JSON of another shape: a file the user named by mistake
            fail(f"--cost {cost}: not a cost table ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                 f"pass the JSON `stn engine bench --out` wrote", 2)
    return seed_list


@contextlib.contextmanager
def _engine_errors(state: Path | None = None, plan_code: int = 1) -> Iterator[None]:
    """The commands' errors as every stn command reports them (stn.cli.common.reported): exit 2 for input, 1 for
    a failed run (the engine's and the plan's errors; `plan_code` 2 where nothing runs, e.g. a --budget too short
    for one chunk), 128+N for a signal (SIGTERM 143, Ctrl-C 130)."""
    from stn.engine.options import EngineError
    from stn.engine.plan import PlanError
    from stn.launch.executors import sigterm_as_interrupt, stop_code

    try:
        with reported(), sigterm_as_interrupt():
            yield
    except PlanError as err:
        fail(str(err), plan_code)
    except EngineError as err:
        fail(str(err), 1)
    except KeyboardInterrupt as stopped:
        kept = f"; the groups finished so far are kept in {state} (rerun the same command to continue)" if state else ""
        typer.secho(f"interrupted{kept}", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(stop_code(stopped)) from None


Amp = Annotated[bool, typer.Option("--amp/--no-amp", help="bf16 autocast (theta, grids, sampling stay fp32).")]
ChannelsLast = Annotated[bool, typer.Option("--channels-last/--no-channels-last", help="NHWC images and weights.")]
Compile = Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the batched loss.")]
Graph = Annotated[bool, typer.Option("--cuda-graph/--no-cuda-graph", help="Capture each step as a CUDA graph.")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
Data = Annotated[DataChoice, typer.Option(help="exact: each model's `stn train` batches; block: drawn --block-steps "
                                       "steps at a time (far fewer launches, other distortion samples).")]
BlockSteps = Annotated[int, typer.Option(help="Steps per drawn block with --data block.")]
Override = Annotated[list[str] | None, typer.Option("--override", help="Config override (repeatable).")]


@engine_app.command("bench")
def bench(
    kinds: Annotated[str | None, typer.Option(help="Comma-separated Table 1 rows (default: all eight).")] = None,
    dataset: Annotated[DatasetName, typer.Option(help="Dataset of every measurement.")] = "R",
    ks: Annotated[str, typer.Option(help="Models per batch to measure, comma-separated.")] = "1,3,9",
    modes: Annotated[str, typer.Option(help="Engine modes: loop, vmap, im2col.")] = "loop,vmap",
    batch_size: Annotated[int, typer.Option(help="Batch per model.")] = 256,
    steps: Annotated[int, typer.Option(help="Timed steps per measurement.")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed steps first.")] = 2,
    device: Device = "auto",
    amp: Amp = False,
    channels_last: ChannelsLast = False,
    compile: Compile = False,
    cuda_graph: Graph = False,
    data: Data = "exact",
    block_steps: BlockSteps = 32,  # the bench times whole blocks: 128 would make each block row 4x longer
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write the result (and the planner's cost table) as JSON.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the table as markdown too.")] = None,
    override: Override = None,
) -> None:
    """Images/s per model kind, 1 model vs K batched, loop vs vmap; FLOP/s, % of peak, peak memory."""
    from stn.grid import TABLE1_MODELS, label_problems

    try:
        k_list = [int(k) for k in csv_list(ks) or []]
    except ValueError:
        fail(f"--ks {ks!r}: expected comma-separated integers such as 1,3,9", 2)
    known = [label for label, _ in TABLE1_MODELS]
    refuse([f"--kinds {kinds!r}: unknown {name!r}; choose from {', '.join(known)}" for name in csv_list(kinds) or []
            if name not in known]
           + [f"--ks {ks!r}: give at least one K"] * (not k_list)
           + [f"--ks {ks!r}: each K must be 1 to {MAX_K}"] * (not all(1 <= k <= MAX_K for k in k_list))
           + [f"--modes {modes!r}: choose from loop, vmap" for mode in csv_list(modes) or [""] if mode not in ("loop", "vmap")]
           + _count_problems("--batch-size", batch_size, 1, MNIST_TRAIN) + _count_problems("--steps", steps, 1, MAX_STEPS)
           + _count_problems("--warmup", warmup, 0, MAX_STEPS) + _count_problems("--block-steps", block_steps, 1, MAX_STEPS)
           + (file_problems("--out", out) if out else []) + (file_problems("--markdown", markdown) if markdown else [])
           # a row is labelled by its kind and --dataset: an override of what they set would mislabel it
           + label_problems(override or [], [(f"kind {label}", list(choice)) for label, choice in TABLE1_MODELS]
                            + [(f"--dataset {dataset}", [f"dataset={dataset}"])]))
    from stn.cli.common import load_config

    load_config([f"dataset={dataset}", *(override or [])])  # a bad override: exit 2 before the measurement
    from stn.engine.bench import bench_engine, format_engine_table

    device = _device(device)
    start = time.perf_counter()
    with _engine_errors():
        result = bench_engine(csv_list(kinds), dataset=dataset, ks=k_list, modes=csv_list(modes) or ["vmap"],
                              batch_size=batch_size, steps=steps, warmup=warmup, device=device,
                              options=_options(device, amp, channels_last, compile, cuda_graph, "vmap", data,
                                               block_steps),
                              overrides=override or [], log=lambda line: typer.echo(line, err=True))
    result["wall_s"] = time.perf_counter() - start
    result["load_average"] = os.getloadavg()
    table = format_engine_table(result)
    typer.echo(table)
    typer.echo(f"\nwall time {result['wall_s']:.1f} s; load average {result['load_average'][0]:.2f}")
    with reported():  # checked before the measurement; a disk that filled up meanwhile: one line, exit 1
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")
        if markdown:
            markdown.parent.mkdir(parents=True, exist_ok=True)
            markdown.write_text(table + "\n")


def _tables(grid: Path, preset: str, seeds: str, rows: str | None, columns: str | None, override: list[str] | None,
            extra: list[Path] | None = None):
    """[(grid, its members)]: the table (--rows/--columns of --grid), then each --extra grid file whole."""
    from stn.engine.plan import table_members
    from stn.grid import load_grid

    seed_list = parse_seeds(seeds)
    tables = [(load_grid(grid), table_members(grid, seed_list, preset, override or [], csv_list(rows), csv_list(columns)))]
    tables += [(load_grid(path), table_members(path, seed_list, preset, override or [])) for path in extra or []]
    return tables


def _groups(grid: Path, preset: str, seeds: str, rows: str | None, columns: str | None, override: list[str] | None,
            max_k: int | None, extra: list[Path] | None = None):
    from stn.engine.plan import make_groups, unique_members

    tables = _tables(grid, preset, seeds, rows, columns, override, extra)
    return make_groups(unique_members([m for _, members in tables for m in members]), max_k=max_k)


Grid = Annotated[Path, typer.Option(help="The grid file.")]
Preset = Annotated[TrainerPreset, typer.Option(help="Trainer preset.")]
Seeds = Annotated[str, typer.Option(help="Seeds, comma-separated.")]
Rows = Annotated[str | None, typer.Option(help="Rows to run (default: all).")]
Columns = Annotated[str | None, typer.Option(help="Columns to run (default: all).")]
Cost = Annotated[Path | None, typer.Option(help="Cost table: the JSON `stn engine bench --out` writes.")]
Flops = Annotated[float, typer.Option(help="Achieved FLOP/s assumed where the cost table has no row.")]
MaxK = Annotated[int | None, typer.Option(help="At most this many models per group.")]
Extra = Annotated[list[Path] | None, typer.Option(
    "--extra", help="Another grid file whose cells are queued too (repeatable), e.g. readings of a dataset; its "
                    "table.md and chart go to <state>/<its name>/.")]


LOAN_BENCH = Path("experiments/table1/paper-gpu/loan-2026-11-30/bench_block.json")  # stn.engine.step_cost.LOAN_BENCH
LOAN_TABLE_RUN = Path("experiments/table1/paper-gpu/loan-2026-11-30/results.json")


@engine_app.command("plan")
def plan(grid: Grid = GRID, preset: Preset = "paper", seeds: Seeds = "0,1,2", rows: Rows = None,
         columns: Columns = None,
         cost: Annotated[Path | None, typer.Option(help="Cost table: the JSON `stn engine bench --out` writes "
                                                         "(default: the first H200 loan's bench).")] = LOAN_BENCH,
         flops: Flops = 1e14, max_k: MaxK = None,
         budget: Annotated[float, typer.Option(help="Seconds per chunk.")] = 540.0,
         table_run: Annotated[Path | None, typer.Option(help="A table run's results.json: its groups' measured "
                                                              "seconds per step come first.")] = LOAN_TABLE_RUN,
         paths: Annotated[bool, typer.Option("--paths/--no-paths", help="Predict each group's step per conv path "
                                             "(vmap, loop, im2col) with a roofline fitted on the cost table.")]
         = True,
         in_flight: Annotated[int, typer.Option(help="Groups in flight at once for the concurrent estimate.")] = 4,
         peak_tflops: Annotated[float | None, typer.Option(help="The device's bf16 peak for the roofline (default: "
                                                           "the one the --cost bench measured).")] = None,
         done: Annotated[Path | None, typer.Option(help="results.json of finished members: the 'remaining' "
                                                        "estimate leaves their groups out.")] = None,
         predict: Annotated[bool, typer.Option("--predict", help="Print the markdown prediction report (groups x "
                                               "paths, the issue's targets) instead.")] = False,
         override: Override = None, extra: Extra = None) -> None:
    """The groups, their estimated time, and the chunks of at most --budget seconds they pack into."""
    import hashlib

    # the default cost table and table run are the repo's (the first loan's): absent outside a checkout
    _check_table(grid, seeds, None if cost == LOAN_BENCH and not cost.is_file() else cost, flops, max_k)
    refuse(_seconds_problems("--budget", budget, MAX_BUDGET_S)
           + [f"{name} {path}: no such file" for name, path in (("--table-run", table_run), ("--done", done))
              if path is not None and not path.is_file() and path != LOAN_TABLE_RUN]
           + _count_problems("--in-flight", in_flight, 1, MAX_K)
           + [f"--peak-tflops {peak_tflops}: choose a finite number of TFLOP/s above 0"]
           * (peak_tflops is not None and not (math.isfinite(peak_tflops) and peak_tflops > 0)))

    from stn.cache import memo

    def content(path: Path | None) -> str | None:  # the files the plan reads are part of the cache key
        return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None and path.is_file() else None

    key = [str(grid), content(grid), preset, seeds, rows, columns, str(cost), content(cost), flops, max_k, budget,
           override or [], str(table_run), content(table_run), paths, in_flight, str(done), content(done), predict,
           peak_tflops, [(str(path), content(path)) for path in extra or []]]
    with _engine_errors(plan_code=2):  # planning only: whatever it refuses, the arguments fix
        lines = memo("engine-plan", key, lambda: _plan_lines(grid, preset, seeds, rows, columns, cost, flops,
                                                             max_k, budget, override, table_run, paths, in_flight,
                                                             done, predict, peak_tflops, extra))
    for line in lines:
        typer.echo(line)


def _plan_lines(grid: Path, preset: str, seeds: str, rows: str | None, columns: str | None, cost: Path | None,
                flops: float, max_k: int | None, budget: float, override: list[str] | None,
                table_run: Path | None = None, paths: bool = False, in_flight: int = 4, done: Path | None = None,
                predict: bool = False, peak_tflops: float | None = None,
                extra: list[Path] | None = None) -> list[str]:
    from stn.engine.plan import CostModel, pack_chunks, run_order, table_run_seconds

    groups = _groups(grid, preset, seeds, rows, columns, override, max_k, extra)
    costs = CostModel.load(cost, flops, table_run)
    finished = {m["group"] for m in json.loads(done.read_text())["members"].values()} if done else set()
    finished = {g.gid for g in groups if g.gid in finished}
    device = None
    lines: list[str] = []
    if (paths or predict) and (cost is None or not cost.is_file()):
        if predict:
            raise typer.BadParameter("the prediction needs a bench (--cost) to fit the device on")
        paths = False
        lines.append(f"(no cost table at {cost}: FLOP estimates only, no path predictions)")
    if paths or predict:
        from stn.engine.step_cost import fit_device

        # fitted on the table run's groups of the paper table, whatever this plan selects
        paper = _groups(grid, "paper", "0,1,2", None, None, None, None) if table_run else []
        device = fit_device(cost, table_run_seconds(table_run) if table_run else {}, paper,
                            peak_flops=peak_tflops * 1e12 if peak_tflops else None)
    if predict:
        from stn.engine.step_cost import prediction_report

        return prediction_report(run_order(groups, costs), costs, device, finished, in_flight)
    total = 0.0
    estimates = []
    for group in run_order(groups, costs):
        rate, how = costs.images_per_s(group)
        seconds = costs.seconds_per_step(group) * group.iterations
        total += seconds
        lines.append(f"{group.gid:28s} K={group.k:<2d} {group.size}px {group.iterations} steps  "
                     f"{rate:>12,.0f} images/s ({how})  {seconds:8.1f} s")
        if device is not None:
            from stn.engine.step_cost import path_estimates

            est = path_estimates(group, costs, device)
            estimates.append((group, est))
            lines.append("    " + "; ".join(f"{e.path} {e.seconds_per_step * 1e3:.3f} ms/step"
                                           + ("" if e.measured else f" ({e.label})") for e in est.values()))
    chunks = pack_chunks(groups, costs, budget)
    lines.append(f"\n{len(groups)} groups, {sum(g.k for g in groups)} models, {total:.0f} s estimated; "
                 f"{len(chunks)} chunk(s) of at most {budget:.0f} s")
    for i, chunk in enumerate(chunks):
        if i == 12 and len(chunks) > 13:
            lines.append(f"  ... {len(chunks) - 13} more chunks ...")
            continue
        if 12 <= i < len(chunks) - 1:
            continue
        lines.append(f"  chunk {i + 1}: " + ", ".join(f"{s.gid} {s.start}-{s.end}" for s in chunk)
                     + f"  ({sum(s.seconds for s in chunk):.0f} s)")
    if device is not None:
        from stn.engine.step_cost import best_path, table_seconds

        left = [(g, e) for g, e in estimates if g.gid not in finished]
        bound = any(not best_path(e).measured for _, e in left)
        lines.append(f"\nEach group in its fastest path ({device.name}; {device.kernel_latency_s * 1e6:.2f} us a "
                     f"kernel, {device.step_overhead_s * 1e3:.3f} ms a step): {len(left)} groups "
                     f"{table_seconds(left, 1):.0f} s one after another, {table_seconds(left, in_flight):.0f} s "
                     f"with {in_flight} in flight" + (" (lower bounds: some paths are not measured)" if bound else ""))
    return lines


@engine_app.command("run")
def run(grid: Grid = GRID, preset: Preset = "paper", seeds: Seeds = "0,1,2", rows: Rows = None,
        columns: Columns = None, cost: Cost = None, flops: Flops = 1e14, max_k: MaxK = None,
        state: Annotated[Path, typer.Option(help="State folder: results.json, partial.pt, progress.json.")]
        = Path("engine-state"),
        budget: Annotated[float, typer.Option(help="Stop (with a checkpoint) after this many seconds.")] = 540.0,
        device: Device = "auto", amp: Amp = True, channels_last: ChannelsLast = False, compile: Compile = False,
        cuda_graph: Graph = False,
        mode: Annotated[RunMode, typer.Option(help="Engine mode; auto: per group, the mode the --cost table "
                                                   "measured faster for its kind (vmap where none).")] = "vmap",
        data: Data = "exact", block_steps: BlockSteps = 128,
        in_flight: Annotated[int, typer.Option(
            help="Groups trained at once (round-robin, one CUDA stream each; 1: one after another), further "
                 "capped so their states fit --state-files.")] = 4,
        group_streams: Annotated[bool, typer.Option(
            "--group-streams/--no-group-streams",
            help="One CUDA stream per group in flight (off: round-robin on one stream, the A/B baseline).")] = True,
        state_files: Annotated[int, typer.Option(
            help="Partial-state files (16 MiB each) a run may leave for the groups in flight.")] = 2,
        override: Override = None, extra: Extra = None,
        write_record: Annotated[bool, typer.Option(
            "--record/--no-record", help="After the chunk, write table.md, ours_vs_paper.png and the W&B table run "
                                         "(off where returned files are counted; a later --budget 0 call writes "
                                         "them from the state).")] = True) -> None:
    """Train the table's groups from the saved progress until done or --budget seconds; resumable. Then writes
    what `stn reproduce-table` writes: results.csv, table.md, ours_vs_paper.png and the W&B table run."""
    start = time.perf_counter()
    _check_table(grid, seeds, cost, flops, max_k)
    refuse([f"--budget {budget}: choose 0 (train nothing, write the record from the state) to {MAX_BUDGET_S:.0f} "
            "seconds"] * (not (math.isfinite(budget) and 0 <= budget <= MAX_BUDGET_S))
           + _count_problems("--block-steps", block_steps, 1, MAX_STEPS)
           + _count_problems("--in-flight", in_flight, 1, MAX_K) + _count_problems("--state-files", state_files, 1, 8)
           + folder_problems("--state", state, label=f"--state {state}"))
    from stn.engine.plan import CostModel, make_groups, unique_members
    from stn.engine.record import write_tables
    from stn.engine.states import StateLimits
    from stn.engine.table_run import run_table

    device = _device(device)
    with reported():
        tables = _tables(grid, preset, seeds, rows, columns, override, extra)
        groups = make_groups(unique_members([m for _, members in tables for m in members]), max_k=max_k)
    typer.echo(f"{len(groups)} groups, {sum(g.k for g in groups)} models on {device}; planning took "
               f"{time.perf_counter() - start:.1f} s", err=True)
    options = _options(device, amp and device.startswith("cuda"), channels_last, compile, cuda_graph, mode, data,
                       block_steps)
    from stn.progress import stop_on_signals

    # SIGTERM or Ctrl-C: no new unit starts and the groups in flight are checkpointed at a step boundary, as at
    # the deadline (a second Ctrl-C aborts without that: _engine_errors' 130)
    with _engine_errors(state), stop_on_signals() as signalled:
        record = run_table(groups, state, budget_s=budget - (time.perf_counter() - start), device=device,
                           options=options, costs=CostModel.load(cost, flops),
                           log=lambda line: typer.echo(line, err=True), in_flight=in_flight,
                           group_streams=group_streams, limits=StateLimits(files=state_files),
                           stop=lambda: bool(signalled))
    if write_record:
        from stn.tracking import finish_all_kept

        try:
            with reported():
                write_tables(state, tables, preset=preset, overrides=override or [],
                             log=lambda line: typer.echo(line, err=True))
        finally:
            finish_all_kept()  # the tables' W&B runs: one folder each per invocation (stn.report)
    typer.echo(json.dumps(record, indent=1))
    sys.stdout.flush()
    if signalled:
        name = signal.Signals(signalled["signal"]).name
        typer.secho(f"stopped by {name}: the groups in flight are checkpointed in {state}; rerun the same command "
                    "to continue", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(128 + signalled["signal"])


if __name__ == "__main__":
    engine_app()
