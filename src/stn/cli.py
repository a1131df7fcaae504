"""The `stn` command line: Typer parses, Hydra's compose API builds the config, plain functions do the work.

Config overrides are positional `key=value` words, exactly as Hydra takes them:
    stn train dataset=RTS model=st_cnn transformer=tps trainer=quick
Each command imports its module lazily so `stn --help` stays fast, and checks its config, arguments and
outputs (stn.config) before torch or MNIST load.

Exit codes: 0 done; 2 something the user fixes by changing the command or its inputs (config, arguments,
the files it names, a missing or corrupt MNIST, a run folder that cannot be used); 1 a failure during a
run (a non-finite loss, a failed table cell, an I/O error); 128+N a run stopped by signal N, checkpointed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal, NoReturn

# OpenMP worker threads that find no work spin-wait by default. When other processes also load every core
# (parallel table cells, a shared machine), a torch op's threads wait for descheduled spinners: on a busy
# 2-core CPU a CNN training step at batch 256 ran 3.9x slower, an ST-CNN at batch 8 42x slower; PASSIVE (sleep
# instead) cost 4-9% on the idle machine (experiments/bench/train.md). It must be set before torch (and its
# OpenMP runtime) loads, which every command does lazily; an OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402

from stn.compose import compose, group_choices  # noqa: E402
from stn.config import GROUPS, Config, ConfigError, RunError, TrainerPreset, UserError  # noqa: E402
from stn.validation import (  # noqa: E402
    MAX_PICTURES,
    folder_problems,
    output_problems,
    picture_problems,
    schedule_warning,
)

app = typer.Typer(
    name="stn",
    help="Spatial Transformer Networks (Jaderberg et al., 2015): distorted MNIST, training, Table 1.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Build and inspect the distorted MNIST datasets.", no_args_is_help=True)
bench_app = typer.Typer(
    help="Throughput benchmarks. `stn bench [--quick]`: training images/s per model, our pipeline vs a "
    "DataLoader + eager float32 reference, with FLOP/s against the device's peak; ends with one "
    "`<model> ratio: X.XX` line per model. `stn bench data`: the data pipelines alone."
)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
convergence_app = typer.Typer(
    help="The convergence study: Table 1 cells at growing fractions of the paper's training images "
    "(experiments/convergence/study.yaml). `run` trains what the record lacks; `plot` draws it.",
    no_args_is_help=True,
)
app.add_typer(convergence_app, name="convergence")
# the batched engine: stn engine bench|plan|run, and stn bench engine
from stn.engine_cli import bench as _engine_bench  # noqa: E402
from stn.engine_cli import engine_app  # noqa: E402

app.add_typer(engine_app, name="engine")
bench_app.command("engine", help="The batched engine's throughput (= stn engine bench).")(_engine_bench)



def package_version() -> str:
    """The installed stn's version (pyproject.toml's), or 'unknown' when stn runs from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stn")
    except PackageNotFoundError:
        return "unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"stn {package_version()}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Print stn's version and exit.")] = False,
) -> None:
    """Spatial Transformer Networks (Jaderberg et al., 2015): distorted MNIST, training, Table 1."""


# Options with a fixed set of values are Literal types: Typer shows the choices in --help, and a value outside
# them exits 2 listing them. (stn.launch is not imported for its EXECUTORS: commands import lazily.)
Executor = Literal["local", "slurm", "debug"]  # = stn.launch.EXECUTORS (tests/test_cli.py checks)
Split = Literal["test", "train"]
# Short flags mean one thing everywhere (tests/test_cli.py): -o is --out, -n is --count; --override is long-only.
OVERRIDES_HELP = "Config overrides, Hydra syntax: dataset=RTS model=st_cnn transformer=tps trainer.iterations=500"


def _groups_help() -> str:
    try:
        return "\n\n".join(f"{group}: {', '.join(group_choices(group))}" for group in GROUPS)
    except ConfigError as err:
        return str(err)


def load_config(overrides: list[str] | None) -> Config:
    """Compose the config or exit 2 with one line per problem (no traceback); warn about the lr schedule."""
    try:
        config = compose(overrides or [])
    except ConfigError as err:
        fail(str(err), 2)
    note = schedule_warning(overrides or [], config)
    if note:
        typer.secho(note, fg=typer.colors.YELLOW, err=True)
    return config


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: ...` (one line per problem) to stderr and exit with `code` (2: user-fixable, 1: failed)."""
    for line in message.splitlines() or [""]:
        typer.secho(f"error: {line}" if line and not line[0].isspace() else line, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def refuse(problems: list[str]) -> None:
    """Exit 2 listing `problems` (argument or output checks), if there are any."""
    if problems:
        fail("\n".join(problems), 2)


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Turn the package's errors into `error:` lines and exit codes: UserError (config, arguments, files,
    MNIST, run folders) 2; RunError (a run that failed, e.g. a NaN loss) and OSError 1. Anything else is a
    bug and keeps its traceback."""
    try:
        yield
    except typer.Exit:  # an exit code already chosen
        raise
    except UserError as err:
        fail(str(err), 2)
    except RunError as err:  # TrainingError: the run itself failed
        fail(str(err), 1)
    except OSError as err:  # a disk that filled up, a folder removed under a running command
        fail(f"{type(err).__name__}: {err}", 1)


@app.command(help=f"Train one configuration.\n\nConfig groups and their choices:\n\n{_groups_help()}")
def train(
    overrides: Annotated[list[str] | None, typer.Argument(help=OVERRIDES_HELP)] = None,
    cfg: Annotated[bool, typer.Option("--cfg", help="Print the resolved config and exit without training.")] = False,
) -> None:
    config = load_config(overrides)
    if cfg:
        from stn.config import to_yaml

        typer.echo(to_yaml(config))
        return
    refuse(output_problems(config))
    from stn.train import TrainingInterrupted, eval_key, fit

    with reported():
        try:
            summary = fit(config)
        except TrainingInterrupted as stopped:  # a requested stop, not a failure: say how to continue
            typer.secho(str(stopped), fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(stopped.exit_code) from None
    key = eval_key(config)  # val_error for a run on a validation split
    typer.echo(f"{key.replace('_', ' ')} {summary[key]:.2f}% | run folder {summary['run_dir']}")


@data_app.command("preview")
def data_preview(
    overrides: Annotated[list[str] | None, typer.Argument(help=OVERRIDES_HELP)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path("preview.png"),
    count: Annotated[int, typer.Option("--count", "-n", help="How many samples to draw.")] = 64,
    split: Annotated[
        Split, typer.Option(help="test (the fixed test set) or train (fresh training distortions).")
    ] = "test",
) -> None:
    """Write a PNG grid of distorted samples with their labels."""
    config = load_config(overrides)
    limit = (config.dataset.test_limit or 10_000) if split == "test" else (config.dataset.train_limit or 60_000)
    refuse([f"--count {count}: choose 1 to {min(MAX_PICTURES, limit)} (pictures are capped at {MAX_PICTURES}; "
              f"the {split} split has {limit} digits)"] * (not 1 <= count <= min(MAX_PICTURES, limit))
           + picture_problems("--out", out, "preview"))
    from stn.visualize import preview

    with reported():
        path = preview(config, out, count=count, split=split)
    typer.echo(f"wrote {path}")


@data_app.command("card")
def data_card(
    overrides: Annotated[list[str] | None, typer.Argument(help=OVERRIDES_HELP)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder (gets <dataset>.md/.json/.png) or x.md.")] = Path(
        "cards"),
    count: Annotated[int, typer.Option("--count", "-n", help="How many test-set draws to measure.")] = 5000,
    png: Annotated[bool, typer.Option(help="Also draw a PNG of the histograms.")] = True,
) -> None:
    """Write a dataset card: digit size, ink off the canvas, displacement, folded quads (see stn.cards)."""
    config = load_config(overrides)
    refuse(folder_problems("--out", out.parent if out.suffix == ".md" else out, label=f"--out {out}"))
    from stn.cards import write_card

    try:
        with reported():
            paths = write_card(config, out, count=count, png=png)
    except ValueError as err:  # a bad --count (UserErrors are reported above)
        fail(str(err), 2)
    typer.echo(f"wrote {', '.join(map(str, paths))}")


def _csv(value: str | None) -> list[str] | None:
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


def _seeds(value: str) -> list[int]:
    """--seeds '0,1,2' -> [0, 1, 2]; exit 2 on non-integers, negatives or repeats (two runs in one folder)."""
    try:
        seeds = [int(part) for part in _csv(value) or []]
    except ValueError:
        fail(f"--seeds {value!r}: must be comma-separated integers, e.g. --seeds 0,1,2", 2)
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    refuse([f"--seeds {value!r}: no seeds given; e.g. --seeds 0 or --seeds 0,1,2"] * (not seeds)
           + [f"--seeds {value!r}: seed {seed} is repeated; each seed is one run folder, give it once"
              for seed in repeated]
           + [f"--seeds {value!r}: seed {seed} is negative; seeds are 0 or more" for seed in seeds if seed < 0])
    return seeds



@app.command("reproduce-table")
def reproduce_table(
    overrides: Annotated[list[str] | None, typer.Argument(help=f"{OVERRIDES_HELP} (every cell)")] = None,
    grid: Annotated[Path, typer.Option(help="The table as data: rows, columns, the paper's numbers.")] = Path(
        "experiments/table1/grid.yaml"
    ),
    rows: Annotated[str | None, typer.Option(help='Row labels, e.g. "CNN,ST-CNN Aff" (default: all).')] = None,
    columns: Annotated[str | None, typer.Option(help="Column labels, e.g. R,RTS (default: all).")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; several give mean ± std per cell.")] = "0",
    preset: Annotated[TrainerPreset, typer.Option(help="Trainer preset.")] = "quick",
    executor: Annotated[Executor, typer.Option(help="local (processes here), slurm, debug (in-process).")] = "local",
    parallel: Annotated[int | None, typer.Option(help="Runs at once (local: 1; slurm: all).")] = None,
    out: Annotated[Path | None, typer.Option(help="Table folder (runs/tables/<grid>-<preset>).")] = None,
    slurm_partition: Annotated[str | None, typer.Option(help="Slurm partition.")] = None,
    slurm_gpus: Annotated[int, typer.Option(help="GPUs per Slurm job.")] = 1,
    slurm_cpus: Annotated[int | None, typer.Option(help="CPUs per Slurm job.")] = None,
    slurm_time: Annotated[int, typer.Option(help="Minutes per job (Slurm limit; local timeout).")] = 24 * 60,
) -> None:
    """Run the paper's Table 1 grid (or another grid file) and report ours beside the paper.

    Rerunning the same command resumes: finished cells are read back, half-finished ones continue from
    their checkpoint. Writes table.md, results.csv/json and ours_vs_paper.png in the table folder.
    """
    from rich.console import Console

    from stn.grid import load_grid
    from stn.launch import SlurmOptions
    from stn.report import rich_table
    from stn.tables import reproduce

    seed_list = _seeds(seeds)
    refuse([f"--parallel {parallel}: must be at least 1"] * (parallel is not None and parallel < 1)
           + [f"--slurm-gpus {slurm_gpus}: must be 0 or more"] * (slurm_gpus < 0)
           + [f"--slurm-cpus {slurm_cpus}: must be at least 1"] * (slurm_cpus is not None and slurm_cpus < 1)
           + [f"--slurm-time {slurm_time}: must be at least 1 (minutes)"] * (slurm_time < 1))
    console = Console()
    try:
        with reported():
            report = reproduce(
                grid,
                rows=_csv(rows),
                columns=_csv(columns),
                seeds=seed_list,
                preset=preset,
                overrides=overrides or [],
                executor=executor,
                parallel=parallel,
                out=out,
                slurm=SlurmOptions(partition=slurm_partition, gpus=slurm_gpus, cpus=slurm_cpus, time_min=slurm_time),
                log=lambda line: console.print(line, markup=False, highlight=False),
            )
    except KeyboardInterrupt:
        typer.secho("interrupted; rerun the same command to resume", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    console.print(rich_table(load_grid(grid), report.cells))
    stopped = f", {report.stopped} stopped early (rerun to continue)" if report.stopped else ""
    console.print(
        f"{report.ran} runs ran ({report.fresh} fresh, {report.resumed} resumed, {report.failed} failed"
        f"{stopped}), {report.cached} already done. Table folder {report.table_dir} (table.md, "
        f"results.csv, ours_vs_paper.png); W&B group {report.group}",
        markup=False,
        highlight=False,
    )
    if report.failed:
        raise typer.Exit(1)


@app.command("models")
def models(
    overrides: Annotated[list[str] | None, typer.Argument(help=f"{OVERRIDES_HELP} (applied to every row)")] = None,
    dataset: Annotated[
        list[str] | None, typer.Option("--dataset", "-d", help="Dataset columns (repeatable); default: R RTS P E TC.")
    ] = None,
) -> None:
    """Print every Table 1 model's parameter count and derived width per dataset."""
    from rich.console import Console
    from rich.table import Table

    from stn.models import TABLE1_MODELS, parameter_table

    datasets = tuple(dataset) if dataset else ("R", "RTS", "P", "E", "TC")
    unknown = [name for name in datasets if name not in group_choices("dataset")]
    refuse([f"--dataset {name!r}: not one of {', '.join(group_choices('dataset'))}" for name in unknown])
    with reported():
        rows = parameter_table(datasets, overrides or [])
    table = Table(title="Parameters per model and dataset (width: f = conv filters, u = FC units; "
                        "ratio: count / its target, the baseline's count or model.param_budget)")
    table.add_column("model")
    for name in datasets:
        table.add_column(name, justify="right")
    cells = {(row.model, row.dataset): row for row in rows}
    for label, _ in TABLE1_MODELS:
        line = [label]
        for name in datasets:
            row = cells[(label, name)]
            unit = "u" if row.width_name == "fc_units" else "f"
            line.append(f"{row.params:,} ({row.width}{unit}, {row.params / row.target:.3f})")
        table.add_row(*line)
    Console(width=200).print(table)


@app.command("visualize")
def visualize(
    checkpoint: Annotated[Path, typer.Argument(help="A training checkpoint, e.g. <run folder>/checkpoints/last.pt")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path("transformations.png"),
    count: Annotated[int, typer.Option("--count", "-n", help="How many test digits to draw.")] = 8,
    data_dir: Annotated[
        str | None, typer.Option(help="MNIST root (default: $STN_DATA_DIR, else the checkpoint's data_dir).")
    ] = None,
    recovery_digits: Annotated[int, typer.Option(
        help="Test digits to measure the distortion recovery on (stn.recovery), shown in the title; 0 = skip.")] = 1000,
    wandb: Annotated[bool, typer.Option(
        "--wandb", help="Also log the figure and the recovery to W&B: a 'visualize' run in the training's project "
        "and group (mode: WANDB_MODE, else the checkpoint's logger.mode), or the run active in this process.")]
    = False,
) -> None:
    """Draw test digits with the transformer's sampling grid T(G) and its output (the paper's Table 1, right),
    and print how consistently the transformer undoes the distortions (stn.recovery)."""
    refuse([f"--count {count}: choose 1 to {MAX_PICTURES // 4} (one column per digit)"]
           * (not 1 <= count <= MAX_PICTURES // 4)
           + [f"--recovery-digits {recovery_digits}: choose 0 to 10000"] * (not 0 <= recovery_digits <= 10_000)
           + [f"checkpoint {checkpoint}: no such file; pass a run's checkpoints/last.pt"] * (not checkpoint.is_file())
           + picture_problems("--out", out, "visualize"))
    from stn.visualize import render_checkpoint

    with reported():
        rendered = render_checkpoint(checkpoint, out, count=count, data_dir=data_dir, recovery_digits=recovery_digits)
    if rendered.recovery_text:
        typer.echo(rendered.recovery_text)
    typer.echo(f"wrote {rendered.path}")
    if wandb:
        from stn.tracking import log_visualization

        where = log_visualization(rendered, checkpoint)
        if where is not None:
            typer.echo(f"logged to W&B: {where}")


@app.command("wandb-report")
def wandb_report(
    entity: Annotated[str | None, typer.Option(help="W&B entity (default: $WANDB_ENTITY).")] = None,
    project: Annotated[str | None, typer.Option(help="W&B project (default: $WANDB_PROJECT, else stn).")] = None,
    group: Annotated[str | None, typer.Option(
        help="A table's W&B group (its folder name, e.g. table1-quick); default: every table1 run.")] = None,
    title: Annotated[str | None, typer.Option(help="The report's title.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Build the report and list its panels; send nothing.")]
    = False,
) -> None:
    """Create the Table 1 dashboard as a W&B report (needs wandb-workspaces: pip install 'stn[report]').

    Panels (stn.dashboard): test error and loss against training images per cell (mean, std over seeds), best
    test error per cell, ours against the paper, the transformers' images, and the table run's tables."""
    from stn.dashboard import PANELS, DashboardError, Template, build_report, save_report

    entity = entity or os.environ.get("WANDB_ENTITY")
    refuse(["--entity: give the W&B entity (user or team) that owns the project, or set WANDB_ENTITY"]
           * (not entity and not dry_run))
    template = Template(project=project or os.environ.get("WANDB_PROJECT") or "stn", entity=entity or "ENTITY",
                        group=group)
    if title:
        template.title = title
    with reported():
        try:
            if dry_run:
                build_report(template)
                for panel in PANELS:
                    typer.echo(f"{panel.source:>5} {panel.kind:<7} {panel.title}: "
                               + ", ".join(f"{kind} {name}" for kind, name in panel.keys()))
                typer.echo(f"built {len(PANELS)} panels for {template.entity}/{template.project}; nothing sent")
                return
            url = save_report(template)
        except DashboardError:
            raise
        except Exception as err:  # the W&B server refused or could not be reached
            fail(f"saving the report failed ({type(err).__name__}: {' '.join(str(err).split())[:300]})", 1)
    typer.echo(f"saved the report: {url}")


@app.command("recovery")
def recovery(
    checkpoint: Annotated[Path, typer.Argument(help="A training checkpoint, e.g. <run folder>/checkpoints/last.pt")],
    data_dir: Annotated[
        str | None, typer.Option(help="MNIST root (default: $STN_DATA_DIR, else the checkpoint's data_dir).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Measure the first N test digits only.")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the full result (per class) here.")
    ] = None,
) -> None:
    """How consistently the transformer undoes each test digit's known distortion (see stn.recovery)."""
    import json

    from stn.recovery import format_summary, recovery_checkpoint

    refuse([f"--limit {limit}: must be at least 1"] * (limit is not None and limit < 1)
           + (folder_problems("--json", json_out.parent, label=f"--json {json_out}") if json_out else []))
    with reported():
        summary = recovery_checkpoint(checkpoint, data_dir=data_dir, limit=limit)
    typer.echo(format_summary(summary))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(summary, indent=1) + "\n")
        typer.echo(f"wrote {json_out}")


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
    from stn.bench_data import bench_data, format_data_table

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
           + [f"--threads {threads}: must be 0 (torch's default) or more"] * (threads < 0))
    start = time.perf_counter()
    with reported():
        rows = bench_data(config.data_dir, images=images, batch_size=batch_size, workers=counts, datasets=names,
                          threads=threads or None)
    typer.echo(format_data_table(rows, counts))
    typer.echo(f"\n{images} images per measurement, batch {batch_size}; torch threads {threads or 'default'} "
               f"of {os.cpu_count()} CPUs; wall time {time.perf_counter() - start:.1f} s")


def _bench_models(names: str | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """--models 'cnn,st_cnn_aff' (or Table 1 labels) -> (label, config choices) pairs; None = the default five."""
    from stn.bench import TRAIN_MODELS
    from stn.models import TABLE1_MODELS

    if not names:
        return TRAIN_MODELS

    def slug(label: str) -> str:
        return label.lower().replace("-", "_").replace(" ", "_")

    known = {slug(label): (label, choice) for label, choice in TABLE1_MODELS}
    wanted = [slug(name) for name in _csv(names) or []]
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
    dataset: Annotated[str, typer.Option(help="Dataset of every measurement.")] = "R",
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
    overrides = [f"dataset={dataset}", f"trainer.device={device}", *(override or [])]
    config = load_config(overrides)
    from stn.bench import QUICK, TrainBenchSettings, bench_train, format_train_table, ratio_lines

    base = QUICK if quick else TrainBenchSettings()
    given = {"rounds": rounds, "steps": steps, "warmup": warmup, "workers": workers, "batch_size": batch_size,
             "min_turn_s": min_turn}
    settings = dataclasses.replace(base, **{key: value for key, value in given.items() if value is not None})
    if min(settings.rounds, settings.steps, settings.batch_size) < 1 or min(settings.warmup, threads) < 0 \
            or settings.min_turn_s < 0 or (settings.workers is not None and settings.workers < 0):
        fail("--rounds, --steps and --batch-size must be at least 1; --warmup, --workers, --threads and "
             "--min-turn at least 0", 2)
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


STUDY_OPTION = typer.Option(help="The study file: rows, columns, budgets, seeds, the record's path.")


@convergence_app.command("run")
def convergence_run(
    study: Annotated[Path, STUDY_OPTION] = Path("experiments/convergence/study.yaml"),
    rows: Annotated[str | None, typer.Option(help='Only these rows, e.g. "CNN,ST-CNN Aff".')] = None,
    columns: Annotated[str | None, typer.Option(help="Only these datasets, e.g. R,E.")] = None,
    budgets: Annotated[str | None, typer.Option(help="Only these budgets, e.g. 1/250,1/50.")] = None,
    seeds: Annotated[str | None, typer.Option(help="Only these seeds, e.g. 0,1,2 (default: the study's).")] = None,
    max_cells: Annotated[int | None, typer.Option(help="Stop after training this many cells.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells to train, train nothing.")] = False,
) -> None:
    """Train the study's cells not yet in its results.csv (cheapest budgets first), one row per finished cell.

    SIGTERM or Ctrl-C stops the running cell with a checkpoint; the same command continues it.
    """
    from stn.convergence import StudyError, load_study, plan, recorded_keys, run_study

    try:
        loaded = load_study(study)
        seed_list = None if seeds is None else [int(s) for s in _csv(seeds) or []]
        cells = plan(loaded, rows=_csv(rows), columns=_csv(columns), budgets=_csv(budgets), seeds=seed_list)
    except ValueError as err:  # StudyError, or a seed that is not an integer
        message = str(err) if isinstance(err, StudyError) else f"--seeds {seeds!r} must be integers, e.g. 0,1,2"
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if max_cells is not None and max_cells < 1:
        typer.secho(f"error: --max-cells {max_cells} must be at least 1", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if dry_run:
        done = recorded_keys(loaded)
        for cell in cells:
            state = "recorded" if cell.key in done else "to train"
            typer.echo(f"{cell.budget:>6} seed {cell.seed} {cell.column:>4} {cell.row:<12} "
                       f"{cell.config.trainer.iterations:>6} steps  {state}")
        return
    report = run_study(loaded, cells, max_cells=max_cells, log=lambda line: typer.echo(line))
    typer.echo(f"{len(report.done)} cells trained, {report.skipped} already recorded, {len(report.failed)} failed"
               + (", one stopped with a checkpoint (rerun to continue)" if report.stopped else "")
               + f"; record: {loaded.results}")
    if report.stopped:
        raise typer.Exit(130)
    if report.failed:
        raise typer.Exit(1)


@convergence_app.command("plot")
def convergence_plot(
    study: Annotated[Path, STUDY_OPTION] = Path("experiments/convergence/study.yaml"),
) -> None:
    """Per-dataset PNGs (plots/<study>/, test error vs training images, log-log, the paper dashed) and <study>.md
    beside the record."""
    from stn.convergence import StudyError, load_study
    from stn.convergence_plot import plot_study, summary_table

    try:
        loaded = load_study(study)
        written = plot_study(loaded.results, loaded.results.parent / "plots" / loaded.name)
        table = summary_table(loaded.results)
    except StudyError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    summary = loaded.results.parent / f"{loaded.name}.md"
    summary.write_text(f"# Study {loaded.name}: mean ± std (n seeds) of the test error (%) per budget\n\n"
                       f"Generated by `stn convergence plot --study {study}` from {loaded.results.name}; "
                       f"plots in plots/{loaded.name}/.\n\n{table}\n")
    typer.echo(table)
    typer.echo("wrote " + ", ".join(str(p) for p in [*written, summary]))
