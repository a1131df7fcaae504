"""Shared pieces of the `stn` command line: error reporting and exit codes, config loading, fixed-choice types.

Every command module of stn.cli (data, table, bench, convergence, engine, the root main) uses these, so
one command fails the way every other does: `error:` lines on stderr, exit 2 for what the user fixes
(config, arguments, the files it names, a missing or corrupt MNIST, an unusable run folder), 1 for a run
that failed (a non-finite loss, a failed table cell, an I/O error), 128+N for a run stopped by signal N.
Importing it is cheap (no torch): each command imports its work module lazily.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, NoReturn

# OpenMP worker threads that find no work spin-wait by default. When other processes also load every core
# (parallel table cells, a shared machine), a torch op's threads wait for descheduled spinners: on a busy
# 2-core CPU a CNN training step at batch 256 ran 3.9x slower, an ST-CNN at batch 8 42x slower; PASSIVE (sleep
# instead) cost 4-9% on the idle machine (experiments/bench/train.md). It must be set before torch (and its
# OpenMP runtime) loads, which every command does lazily; an OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402

from stn.cache import cached_compose  # noqa: E402
from stn.compose import group_choices  # noqa: E402
from stn.config import GROUPS, Config, ConfigError, RunError, UserError  # noqa: E402
from stn.validation import schedule_warning  # noqa: E402

if TYPE_CHECKING:
    from stn.launch.executors import SlurmOptions

# Options with a fixed set of values are Literal types: Typer shows the choices in --help, and a value outside
# them exits 2 listing them. (stn.launch.executors is not imported for its EXECUTORS: commands import lazily.)
Executor = Literal["local", "slurm", "debug"]  # = stn.launch.executors.EXECUTORS (tests/test_cli.py checks)
Split = Literal["test", "train"]


def _datasets() -> tuple[str, ...]:
    try:
        return tuple(group_choices("dataset"))
    except ConfigError:  # no conf/ folder: every command then fails with that error when it composes
        return ("R",)


DatasetName = Literal[_datasets()]  # type: ignore[valid-type]  # conf/dataset/*.yaml, read when stn starts
# Short flags mean one thing everywhere (tests/test_cli.py): -o is --out, -n is --count; --override is long-only.
OVERRIDES_HELP = "Config overrides, Hydra syntax: dataset=RTS model=st_cnn transformer=tps trainer.iterations=500"


def groups_help() -> str:
    try:
        return "\n\n".join(f"{group}: {', '.join(group_choices(group))}" for group in GROUPS)
    except ConfigError as err:
        return str(err)


def load_config(overrides: list[str] | None) -> Config:
    """Compose the config or exit 2 with one line per problem (no traceback); warn about the lr schedule."""
    try:
        config = cached_compose(overrides or [])
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
        if err.errno == errno.ENOSPC:
            where = f" writing {err.filename}" if err.filename else ""
            fail(f"the disk is full{where} (no space left on device): what was finished before is kept (run "
                 f"folders, checkpoints and records are replaced whole, never cut short); free some space, then "
                 f"rerun the same command to continue", 1)
        fail(f"{type(err).__name__}: {err}", 1)


def csv_list(value: str | None) -> list[str] | None:
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


MAX_SEED = 2**63 - 1  # = the config's bound on seed (stn.validation)


def parse_seeds(value: str) -> list[int]:
    """--seeds '0,1,2' -> [0, 1, 2]; exit 2 on non-integers, negatives or repeats (two runs in one folder)."""
    try:
        seeds = [int(part) for part in csv_list(value) or []]
    except ValueError:
        fail(f"--seeds {value!r}: must be comma-separated integers, e.g. --seeds 0,1,2", 2)
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    refuse([f"--seeds {value!r}: no seeds given; e.g. --seeds 0 or --seeds 0,1,2"] * (not seeds)
           + [f"--seeds {value!r}: seed {seed} is repeated; each seed is one run folder, give it once"
              for seed in repeated]
           + [f"--seeds {value!r}: seed {seed} is negative; seeds are 0 or more" for seed in seeds if seed < 0]
           + [f"--seeds {value!r}: seed {seed} is too large; seeds are at most 2**63-1 (torch's seed range)"
              for seed in seeds if seed > MAX_SEED])
    return seeds


# How runs fan out (stn.launch.executors): the same options for a table's cells and a `stn train -m` sweep's members.
ExecutorOption = Annotated[Executor, typer.Option(help="local (processes here), slurm, debug (in-process).")]
ParallelOption = Annotated[int | None, typer.Option(help="Runs at once (local: 1; slurm: all).")]
SlurmPartition = Annotated[str | None, typer.Option(help="Slurm partition.")]
SlurmGpus = Annotated[int, typer.Option(help="GPUs per Slurm job.")]
SlurmCpus = Annotated[int | None, typer.Option(help="CPUs per Slurm job.")]
SlurmTime = Annotated[int, typer.Option(help="Minutes per job (Slurm limit; local timeout).")]


MAX_PARALLEL, MAX_MINUTES = 1024, 30 * 24 * 60  # runs or CPUs at once; a job's minutes (30 days)


def launch_options(parallel: int | None, partition: str | None, gpus: int, cpus: int | None,
                   time_min: int) -> SlurmOptions:
    """The Slurm/local job settings, or exit 2 naming each bad value."""
    refuse([f"--parallel {parallel}: choose 1 to {MAX_PARALLEL}"]
           * (parallel is not None and not 1 <= parallel <= MAX_PARALLEL)
           + [f"--slurm-gpus {gpus}: choose 0 to 64"] * (not 0 <= gpus <= 64)
           + [f"--slurm-cpus {cpus}: choose 1 to {MAX_PARALLEL}"] * (cpus is not None and not 1 <= cpus <= MAX_PARALLEL)
           + [f"--slurm-time {time_min}: choose 1 to {MAX_MINUTES} (minutes)"] * (not 1 <= time_min <= MAX_MINUTES))
    from stn.launch.executors import SlurmOptions

    return SlurmOptions(partition=partition, gpus=gpus, cpus=cpus, time_min=time_min)


def typed_command(words: list[str]) -> str:
    """The command line as typed, for the run folders' command.txt: this process's argv when it is the stn
    program (`stn ...` or `python -m stn ...`), else `words`, the command rebuilt from its parsed arguments
    (stn called in-process, e.g. by typer's CliRunner)."""
    import shlex
    import sys

    argv = sys.argv or [""]
    if Path(argv[0]).name == "stn":
        return shlex.join(["stn", *argv[1:]])
    if Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "stn":
        return shlex.join(["python", "-m", "stn", *argv[1:]])
    return shlex.join(words)
