"""The `stn` command: the root Typer app, its sub-apps, and the commands that stand alone.

Typer parses, Hydra's compose API builds the config, plain functions do the work. Config overrides are
positional `key=value` words, exactly as Hydra takes them:
    stn train dataset=RTS model=st_cnn transformer=tps trainer=quick
This module owns the root app (`--version`, shell completion), `stn train` (Hydra's `-m`, `--cfg` and `hydra.*`
keys: stn.launch.sweep), `stn models`, `stn visualize`, `stn recovery` and `stn wandb-report`; the sub-apps live in
stn.cli.data, .table (reproduce-table), .bench, .convergence and .engine, the shared error handling and exit
codes in stn.cli.common. Each command imports its work module lazily so `stn --help` stays
fast, and checks its config, arguments and outputs (stn.validation) before torch or MNIST load.

Exit codes: 0 done; 2 something the user fixes by changing the command or its inputs (config, arguments,
the files it names, a missing or corrupt MNIST, a run folder that cannot be used); 1 a failure during a
run (a non-finite loss, a failed table cell, an I/O error); 128+N a run stopped by signal N, checkpointed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, get_args

import typer

from stn.cli import help_format
from stn.cli.bench import bench_app
from stn.cli.common import (
    OVERRIDES_HELP,
    DatasetName,
    ExecutorOption,
    ParallelOption,
    SlurmCpus,
    SlurmGpus,
    SlurmPartition,
    SlurmTime,
    fail,
    groups_help,
    launch_options,
    refuse,
    reported,
    typed_command,
)
from stn.cli.convergence import convergence_app
from stn.cli.data import data_app
from stn.cli.engine import engine_app
from stn.cli.table import reproduce_table
from stn.config import MNIST_TEST
from stn.validation import MAX_PICTURES, file_problems, output_problems, picture_problems, schedule_warning

help_format.apply()  # --help as written: no Rich markup, value names that say what an option takes

app = typer.Typer(
    name="stn",
    help="Spatial Transformer Networks (Jaderberg et al., 2015): distorted MNIST, training, Table 1.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion [bash|zsh|fish|powershell]
)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
app.add_typer(convergence_app, name="convergence")
app.add_typer(engine_app, name="engine")  # the batched engine: stn engine bench|plan|run


def package_version() -> str:
    """stn's version, said once in stn/__init__.py (pyproject.toml reads it from there)."""
    from stn import __version__

    return __version__


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


TRAIN_HELP = f"""Train one configuration, or with -m one run per combination of the swept values.

Hydra's command line: key=value overrides; -m (--multirun) sweeps comma lists, range() and choice() as Hydra's
basic sweeper does (stn train -m dataset=R,RTS model=cnn,fcn: 4 runs), through the executors of
reproduce-table (--executor, --parallel, --slurm-*). --cfg job|hydra|all prints the composed config and exits.
hydra.run.dir (one run) and hydra.sweep.dir / hydra.sweep.subdir (a sweep) choose the run folders; each run
folder's command.txt records the command line.

Config groups and their choices:

{groups_help()}"""


@app.command(help=TRAIN_HELP)
def train(
    overrides: Annotated[list[str] | None, typer.Argument(help=OVERRIDES_HELP)] = None,
    multirun: Annotated[bool, typer.Option("--multirun", "-m", help="Sweep: one run per combination of the "
                                           "comma-separated / range() / choice() values.")] = False,
    cfg: Annotated[bool, typer.Option(
        "--cfg", "-c", metavar="job|hydra|all",
        help="Print the composed config and exit without training: --cfg job (stn's config, the default), --cfg "
             "hydra (run folders and launcher) or --cfg all (both).")] = False,
    resolve: Annotated[bool, typer.Option("--resolve", help="Accepted for Hydra's sake: --cfg always prints "
                                          "resolved values.")] = False,
    executor: ExecutorOption = "local",
    parallel: ParallelOption = None,
    slurm_partition: SlurmPartition = None,
    slurm_gpus: SlurmGpus = 1,
    slurm_cpus: SlurmCpus = None,
    slurm_time: SlurmTime = 24 * 60,
    config_dir: Annotated[Path | None, typer.Option(
        "--config-dir", "-cd", help="A folder of your own configs, added to the search path after stn's conf/ "
        "(as Hydra's --config-dir): DIR/model/x.yaml is model=x, DIR/experiment/x.yaml (first line "
        "`# @package _global_`) is +experiment=x.")] = None,
    config_name: Annotated[str | None, typer.Option(
        "--config-name", "-cn", help="The primary config, a NAME.yaml in --config-dir (or conf/); its defaults "
        "list may start with stn's `config`. Default: config.")] = None,
    info: Annotated[bool, typer.Option("--info", help="Print where configs are searched, the primary config, "
                                       "each run's choices and folder, and exit (as Hydra's --info).")] = False,
) -> None:
    from stn.compose import user_config_set

    refuse([f"--config-dir {config_dir}: no such folder"] * bool(config_dir and not config_dir.is_dir())
           + [f"--config-name {config_name}: give the name without a folder or .yaml, e.g. --config-name mine"]
           * bool(config_name and ("/" in config_name or config_name.endswith(".yaml"))))
    with user_config_set(config_dir, config_name):
        _train(list(overrides or []), multirun, cfg, executor, parallel, slurm_partition, slurm_gpus, slurm_cpus,
               slurm_time, config_dir, config_name, info)


def _train(overrides: list[str], multirun: bool, cfg: bool, executor: str, parallel: int | None,
           slurm_partition: str | None, slurm_gpus: int, slurm_cpus: int | None, slurm_time: int,
           config_dir: Path | None, config_name: str | None, info: bool) -> None:
    from stn.launch.sweep import CFG_CHOICES, plan

    # `--cfg job` as Hydra writes it: the flag's value arrives as a bare word among the overrides (an override
    # always has `=`, so job / hydra / all cannot be one).
    kinds = [word for word in overrides if word in CFG_CHOICES] if cfg else []
    overrides = [word for word in overrides if word not in kinds]
    bare = [word for word in overrides if "=" not in word] if cfg else []
    choices = ", ".join(CFG_CHOICES)
    refuse([f"--cfg {' '.join(kinds)}: give one of {choices}"] * (len(kinds) > 1)
           + [f"{word}: not a key=value override (after --cfg give one of {choices})" for word in bare])
    show = (kinds or ["job"])[0] if cfg else None
    slurm = launch_options(parallel, slurm_partition, slurm_gpus, slurm_cpus, slurm_time)
    with reported():
        members, sweep_dir = plan(overrides, multirun)
    note = schedule_warning(list(members[0].overrides), members[0].config)
    if note:
        typer.secho(note, fg=typer.colors.YELLOW, err=True)
    if show is not None:
        from stn.launch.sweep import print_configs

        typer.echo(print_configs(members, show, sweep_dir, executor, parallel))
        return
    if info:
        from stn.launch.sweep import print_info

        typer.echo(print_info(members, sweep_dir))
        return
    command = typed_command(["stn", "train", *["-m"] * multirun, *overrides]
                            + ["--config-dir", str(config_dir)] * bool(config_dir)
                            + ["--config-name", str(config_name)] * bool(config_name)
                            + ["--executor", executor] * (executor != "local")
                            + ["--parallel", str(parallel)] * bool(parallel))
    from stn.runs import command_recorded

    if sweep_dir is not None:
        _sweep(members, sweep_dir, command, executor, parallel, slurm)
        return
    config = members[0].config
    refuse(output_problems(config))
    from stn.hydra_record import overrides_recorded
    from stn.step import eval_key
    from stn.train import TrainingInterrupted, fit

    with reported(), command_recorded(command), overrides_recorded(members[0].overrides):
        try:
            summary = fit(config)
        except TrainingInterrupted as stopped:  # a requested stop, not a failure: say how to continue
            typer.secho(str(stopped), fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(stopped.exit_code) from None
    key = eval_key(config)  # val_error for a run on a validation split
    typer.echo(f"{key.replace('_', ' ')} {summary[key]:.2f}% | run folder {summary['run_dir']}")
    show_transformations(summary)


def show_transformations(summary: dict) -> None:
    """The end of an ST model's training: its picture of test inputs with the sampling grid T(G) and the
    transformer's outputs, written into the run folder (path printed; W&B got the same figure, as
    'transformations', at the end of the training), and what the recovery numbers mean. A failure to draw is
    a note: the run itself is done."""
    from stn.recovery import meaning_line

    meaning = meaning_line(summary)
    if not meaning:  # no transformer (or its recovery could not be measured): nothing to show
        return
    folder = Path(summary["run_dir"])
    try:
        from stn.visualize import render_checkpoint

        rendered = render_checkpoint(folder / "checkpoints" / "last.pt", folder / "transformations.png",
                                     recovery_digits=0, recovery_flat=summary)
    except Exception as err:  # noqa: BLE001 - the run is done; the picture is extra
        typer.secho(f"note: the picture of the transformations was not drawn ({type(err).__name__}: {err}); "
                    f"stn visualize {folder / 'checkpoints' / 'last.pt'} draws it", fg=typer.colors.YELLOW, err=True)
    else:
        logged = " (and in W&B as 'transformations')" if summary.get("wandb") else ""
        typer.echo(f"wrote {rendered.path}: test inputs with the transformer's sampling grid T(G), and its "
                   f"outputs{logged}")
    typer.echo(meaning)


def _sweep(members: list, sweep_dir: Path, command: str, executor: str, parallel: int | None, slurm) -> None:
    """`stn train -m`: the members through stn.launch.executors; exit 1 if one failed, 130 if stopped."""
    from stn.launch.sweep import run_sweep
    from stn.runs import command_recorded

    try:
        with reported(), command_recorded(command):
            report = run_sweep(members, sweep_dir, command=command, executor=executor, parallel=parallel,
                               slurm=slurm, log=typer.echo)
    except KeyboardInterrupt as stopped:  # Ctrl-C: 130; SIGTERM: 143 (stn.launch.executors.Stopped)
        from stn.launch.executors import stop_code
        from stn.launch.sweep import resume_sweep_command

        typer.secho(f"interrupted: the runs in flight stopped with a checkpoint; continue with: "
                    f"{resume_sweep_command(command, sweep_dir)}", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(stop_code(stopped)) from None
    done, failed = report.count("done"), report.count("failed")
    typer.echo(f"{done} of {len(members)} runs done, {failed} failed, {report.count('interrupted')} stopped; "
               f"sweep folder {report.sweep_dir} (sweep.json)")
    if failed:
        raise typer.Exit(1)


app.command("reproduce-table")(reproduce_table)


@app.command("models")
def models(
    overrides: Annotated[list[str] | None, typer.Argument(help=f"{OVERRIDES_HELP} (applied to every row)")] = None,
    dataset: Annotated[
        list[str] | None,  # typer takes no list of Literal: checked below, listing the choices as typer does
        typer.Option("--dataset", "-d", help=f"Dataset columns (repeatable): {', '.join(get_args(DatasetName))}; "
                                             f"default: R RTS P E TC.")
    ] = None,
) -> None:
    """Print every Table 1 model's parameter count and derived width per dataset."""
    from rich.console import Console
    from rich.table import Table

    from stn.grid import TABLE1_MODELS
    from stn.tables.parameters import cached_parameter_table

    datasets = tuple(dataset) if dataset else ("R", "RTS", "P", "E", "TC")
    choices = ", ".join(map(repr, get_args(DatasetName)))
    refuse([f"--dataset {name!r}: not one of {choices}" for name in datasets if name not in get_args(DatasetName)])
    from stn.grid import label_problems

    refuse(label_problems(overrides or [], [(f"row {label}", choice) for label, choice in TABLE1_MODELS]
                          + [(f"column {name}", [f"dataset={name}"]) for name in datasets]))
    with reported():
        rows = cached_parameter_table(datasets, overrides or [])
    table = Table(title="Parameters per model and dataset (width: f = conv filters, u = FC units; "
                        "ratio: count / its target, the baseline's count or model.param_budget)")
    table.add_column("model")
    for name in datasets:
        table.add_column(name, justify="right")
    cells = {(row["model"], row["dataset"]): row for row in rows}
    for label, _ in TABLE1_MODELS:
        line = [label]
        for name in datasets:
            row = cells[(label, name)]
            unit = "u" if row["width_name"] == "fc_units" else "f"
            line.append(f"{row['params']:,} ({row['width']}{unit}, {row['params'] / row['target']:.3f})")
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

    Panels (stn.tables.dashboard): test error and loss against training images per cell (mean, std over seeds), best
    test error per cell, ours against the paper, the transformers' images, and the table run's tables."""
    from stn.tables.dashboard import PANELS, DashboardError, Template, build_report, save_report

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

    refuse([f"--limit {limit}: choose 1 to {MNIST_TEST} (test digits)"] * (limit is not None and not 1 <= limit <= MNIST_TEST)
           + (file_problems("--json", json_out) if json_out else []))
    with reported():
        summary = recovery_checkpoint(checkpoint, data_dir=data_dir, limit=limit)
    typer.echo(format_summary(summary))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(summary, indent=1) + "\n")
        typer.echo(f"wrote {json_out}")
