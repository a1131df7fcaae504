"""`stn train` as a Hydra app: `-m` sweeps, `--cfg`, and Hydra's output-directory keys.

Owns what Hydra's own command line would do for `stn train`, on top of stn.config's compose:
- Sweeps (`stn train -m dataset=R,RTS model=cnn,fcn`): the overrides are expanded exactly as Hydra's
  basic sweeper expands them (its parser and `BasicSweeper.split_arguments`: comma lists, `range()`,
  `choice()`, `glob()`; the cartesian product in the order given), and the members are trained through
  stn.launch.executors, the same executors (local processes, Slurm, debug) that run a table's cells. Without `-m` a
  sweep value is refused, naming `-m`, instead of Hydra's "Ambiguous value".
- Output folders: `hydra.run.dir` is the run folder of one run (= `run_dir`); in a sweep, member `num` runs
  in `<hydra.sweep.dir>/<hydra.sweep.subdir>` (defaults `<runs_dir>/multirun/<date>/<time>` and
  `<num>-<run name>`); `${now:...}`, `${hydra.job.num}`, `${hydra.job.name}` and
  `${hydra.job.override_dirname}` resolve as in Hydra. `hydra.job.chdir=false` is what stn always does;
  every other `hydra.*` key is refused with one line naming what to use instead.
- `--cfg job|hydra|all` prints the composed config (a sweep: one YAML document per member) and exits;
  `--info` prints the config search path (with `--config-dir`, stn.compose), the primary config and each run's
  choices, overrides and folder.
- Run records: each run folder gets Hydra's `.hydra/` (config.yaml, hydra.yaml, overrides.yaml:
  `stn.hydra_record.write_hydra_folder`, called by stn.train when a run starts); a sweep's members share a W&B group named by the
  sweep folder (`sweep_group`).
- Resume as printed: `trainer.resume=true run_dir=X` alone continues X with the config recorded in X
  (`continue_recorded`); a stopped sweep's command is `resume_sweep_command`.
The typed command line is recorded in each run folder by stn.runs (command.txt); the sweep folder gets
sweep.json (command, members, their run folders and results), rewritten as members finish.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stn.cache import cached_compose
from stn.config import Config, ConfigError, UserError, to_dict
from stn.hydra_record import override_dirname, write_overrides
from stn.launch.job import Job
from stn.validation import output_problems, validate

CFG_CHOICES = ("job", "hydra", "all")
DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir")
LAUNCHER_HINT = "use --executor local|slurm|debug, --parallel N and the --slurm-* options"


class SweepError(UserError):
    """A Hydra-style command line stn cannot run as asked (exit code 2); one line per problem."""


@dataclass(frozen=True)
class HydraDirs:
    """The hydra.* output-folder keys given on the command line (unresolved), None where not given."""

    run_dir: str | None = None
    sweep_dir: str | None = None
    sweep_subdir: str | None = None


@dataclass(frozen=True)
class Member(Job):
    """One training of a sweep (or the single run): its job number, its overrides and its config."""

    num: int
    overrides: tuple[str, ...]
    config: Config

    @property
    def label(self) -> str:
        return f"#{self.num} {' '.join(self.overrides)}"


def _is_hydra_key(key: str) -> bool:
    bare = key.lstrip("+~")
    return bare == "hydra" or bare.startswith(("hydra.", "hydra/"))


def split_hydra(overrides: Sequence[str], multirun: bool) -> tuple[list[str], HydraDirs]:
    """(stn's overrides, the hydra.* folder keys); SweepError listing every hydra.* key stn does not honour."""
    kept: list[str] = []
    dirs: dict[str, str] = {}
    problems: list[str] = []
    for item in overrides:
        key, _, value = item.partition("=")
        if not _is_hydra_key(key):
            kept.append(item)
            continue
        bare = key.lstrip("+~")
        if bare == "hydra.job.chdir":
            if value.strip().lower() not in ("false", "0", "no"):
                problems.append(f"{item}: stn never changes the working directory (paths stay relative to where "
                                f"you run it); drop it, or give hydra.job.chdir=false")
        elif bare == "hydra.run.dir" and multirun:
            problems.append(f"{item}: a sweep (-m) has one folder per member; use hydra.sweep.dir (and "
                            f"hydra.sweep.subdir) instead")
        elif bare.startswith("hydra.sweep.") and bare in DIR_KEYS and not multirun:
            problems.append(f"{item}: applies to -m sweeps only; for one run use hydra.run.dir=... (or run_dir=...)")
        elif bare in DIR_KEYS:
            if not value.strip():
                problems.append(f"{item}: give a folder, e.g. {bare}=runs/mine")
            dirs[bare] = value
        elif bare.startswith(("hydra.launcher", "hydra/launcher")):
            problems.append(f"{item}: stn launches through submitit itself; {LAUNCHER_HINT}")
        elif bare.startswith(("hydra.sweeper", "hydra/sweeper")):
            problems.append(f"{item}: stn sweeps as Hydra's basic sweeper does; give the values on the command "
                            f"line with -m, e.g. -m dataset=R,RTS seed=range(3)")
        else:
            problems.append(f"{item}: not a key stn honours; stn train takes hydra.run.dir, hydra.sweep.dir, "
                            f"hydra.sweep.subdir and hydra.job.chdir=false (the run folder: run_dir)")
    given = {item.partition("=")[0].lstrip("+~") for item in kept}
    if "run_dir" in given and "hydra.run.dir" in dirs:
        problems.append("run_dir and hydra.run.dir both name the run folder: give one of them")
    if "run_dir" in given and multirun:
        problems.append("run_dir=... in a sweep (-m) would put every member in one folder; use "
                        "hydra.sweep.dir=... (each member gets <hydra.sweep.dir>/<hydra.sweep.subdir>)")
    if problems:
        raise SweepError("\n".join(problems))
    return kept, HydraDirs(dirs.get("hydra.run.dir"), dirs.get("hydra.sweep.dir"), dirs.get("hydra.sweep.subdir"))


MAX_MEMBERS = 10_000  # runs in one sweep: range() must not expand until memory runs out


def _check_sweep_size(parsed: Sequence[Any]) -> None:
    """Refuse a sweep of more than MAX_MEMBERS runs, or a range() that never ends (step 0), before Hydra lists
    its values (it would build every one of them in memory)."""
    from hydra.core.override_parser.types import ChoiceSweep, RangeSweep

    total, sizes = 1, []
    for override in parsed:
        value = override.value() if override.is_sweep_override() else None
        if isinstance(value, RangeSweep):
            if not value.step or not all(map(math.isfinite, (value.start, value.stop, value.step))):
                raise SweepError(f"{override.input_line}: range() needs a finite start, stop and a non-zero step")
            size = max(0, math.ceil((value.stop - value.start) / value.step))
        elif isinstance(value, ChoiceSweep):
            size = len(value.list)
        else:  # one value, or glob() over a config group's few choices
            continue
        sizes.append(f"{override.input_line}: {size:,}")
        total *= max(size, 1)
    if total > MAX_MEMBERS:
        raise SweepError(f"this sweep would train {total:,} runs ({'; '.join(sizes)}); at most {MAX_MEMBERS:,} in one "
                         f"sweep: narrow the ranges, or split it into several sweeps")


def expand(overrides: Sequence[str], multirun: bool) -> list[list[str]]:
    """The override lists of each job: Hydra's basic sweeper's expansion with -m; the overrides as given
    without it (a sweep value then is an error naming -m, where Hydra says "Ambiguous value")."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        from stn.compose import non_ascii_problems

        raise SweepError("\n".join(non_ascii_problems(overrides)) or str(err).strip().splitlines()[0]) from None
    if not multirun:
        sweeps = [override.input_line for override in parsed if override.is_sweep_override()]
        if sweeps:
            raise SweepError("\n".join(f"{line}: several values (a sweep); add -m (--multirun) to train one run per "
                                       f"value, or give one value" for line in sweeps))
        return [list(overrides)]
    _check_sweep_size(parsed)
    try:
        return [list(batch) for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]]
    except HydraException as err:
        raise SweepError(str(err).strip().splitlines()[0]) from None





def resolve_dir(key: str, value: str, job: dict[str, Any]) -> str:
    """A hydra.*.dir value with Hydra's interpolations resolved: ${now:%H-%M-%S}, ${hydra.job.num|name|...}."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("now"):
        OmegaConf.register_new_resolver("now", lambda pattern: dt.datetime.now().strftime(pattern), use_cache=True)
    try:
        return str(OmegaConf.create({"hydra": {"job": job}, "value": value}).value)
    except Exception as err:  # a grammar error, an unknown key or resolver
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SweepError(f"{key}={value}: cannot resolve it ({first}); use a plain path, ${{now:%Y-%m-%d}} or "
                         f"${{hydra.job.num}} / ${{hydra.job.name}} / ${{hydra.job.override_dirname}}") from None


def _compose(overrides: list[str], where: str) -> Config:
    try:
        return cached_compose(overrides)  # a user's --config-dir files are part of the cache key
    except ConfigError as err:
        raise ConfigError(f"{where}{err}" if where else str(err)) from None


def plan(overrides: Sequence[str], multirun: bool, now: dt.datetime | None = None) -> tuple[list[Member], Path | None]:
    """The jobs of `stn train [-m] overrides` with their run folders set, and the sweep folder (None for a
    single run). Raises SweepError / ConfigError (exit 2) before anything trains."""
    plain, dirs = split_hydra(overrides, multirun)
    batches = expand(plain, multirun)
    if not multirun:
        config = _compose(batches[0], "")
        if dirs.run_dir is not None:
            folder = resolve_dir("hydra.run.dir", dirs.run_dir, {"num": 0, "name": config.run_name,
                                                                  "override_dirname": override_dirname(plain)})
            config = validate(dataclasses.replace(config, run_dir=folder))
        return [Member(0, tuple(batches[0]), continue_recorded(config, batches[0]))], None
    now = now or dt.datetime.now()
    members: list[Member] = []
    sweep_dir: Path | None = None
    for num, batch in enumerate(batches):
        config = _compose(batch, f"job #{num} ({' '.join(batch)}): ")
        job = {"num": num, "name": config.run_name, "override_dirname": override_dirname(batch)}
        if sweep_dir is None:  # the first member's runs_dir holds the default sweep folder
            sweep_dir = Path(resolve_dir("hydra.sweep.dir", dirs.sweep_dir, job) if dirs.sweep_dir is not None
                             else Path(config.runs_dir) / "multirun" / now.strftime("%Y-%m-%d") / now.strftime("%H%M%S"))
        subdir = (resolve_dir("hydra.sweep.subdir", dirs.sweep_subdir, job) if dirs.sweep_subdir is not None
                  else f"{num}-{config.run_name}")
        # Workers may run elsewhere (Slurm) or in another cwd: absolute folders, as a table's cells get. The
        # members share a W&B group (as a table's cells do), named by the sweep folder unless logger.group is set.
        group = config.logger.group or sweep_group(sweep_dir, Path(config.runs_dir))
        config = validate(dataclasses.replace(config, run_dir=str(sweep_dir.resolve() / subdir),
                                              data_dir=str(Path(config.data_dir).resolve()),
                                              logger=dataclasses.replace(config.logger, group=group)))
        members.append(Member(num, tuple(batch), config))
    folders = [member.run_dir.resolve() for member in members]
    shared = sorted({str(f) for f in folders if folders.count(f) > 1})
    if shared:
        raise SweepError(f"hydra.sweep.subdir={dirs.sweep_subdir}: several members would share {shared[0]}; "
                         f"include ${{hydra.job.num}} or ${{hydra.job.override_dirname}}")
    return members, sweep_dir


# Keys a resume takes from this invocation, never from the run it continues: whether to resume, where, and
# when this invocation stops (a run stopped by trainer.stop_after=N must not stop again N steps later).
INVOCATION_KEYS = ("trainer.resume", "trainer.stop_after", "run_dir")
# Keys that follow the environment when its variable is set now (MNIST's place on this machine); every other
# key, logger.mode included, keeps its recorded value unless the command line names it.
ENVIRONMENT_KEYS = {"data_dir": ("STN_DATA_DIR",)}


def named_keys(overrides: Sequence[str]) -> list[str]:
    """The config keys a command line sets: `trainer.lr=0.1` -> trainer.lr, a group choice `model=cnn` -> the
    whole model section."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [override.key_or_group.replace("/", ".")
            for override in OverridesParser.create().parse_overrides(list(overrides))]


def continue_recorded(config: Config, overrides: Sequence[str]) -> Config:
    """`stn train trainer.resume=true run_dir=X`: continue X with the configuration recorded in X/config.yaml,
    so the command the stop message prints works as typed. The keys the command line names (and
    INVOCATION_KEYS, and ENVIRONMENT_KEYS where their variable is set) come from this invocation; a named key
    that differs from the record is then refused by the resume check as before (an identity key), or applies
    (e.g. trainer.iterations=N to train on). Without trainer.resume, without run_dir, or with no readable
    config.yaml there, `config` is returned as composed (the resume check words any problem)."""

    from stn.runs import CheckpointError, flatten, read_config

    if not (config.trainer.resume and config.run_dir):
        return config
    recorded = Path(config.run_dir) / "config.yaml"
    if not recorded.is_file():
        return config
    try:
        saved = flatten(read_config(recorded))
    except CheckpointError:  # not readable: the run's checkpoint check says what to do
        return config
    now = flatten(to_dict(config))
    named = [*named_keys(overrides), *INVOCATION_KEYS,
             *(key for key, names in ENVIRONMENT_KEYS.items() if any(os.environ.get(n) for n in names))]

    def from_command_line(key: str) -> bool:
        return any(key == n or key.startswith(n + ".") for n in named)

    merged = {key: now[key] for key in now if from_command_line(key)}
    # A key this stn has and the record lacks (added since) takes its schema default, as the resume check
    # assumes (stn.runs.differences).
    merged |= {key: value for key, value in saved.items() if not from_command_line(key)}
    from stn.compose import from_container

    return from_container(_unflatten(merged))


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return tree


def sweep_group(sweep_dir: Path, runs_dir: Path) -> str:
    """A sweep's W&B group: its folder's path under runs_dir joined by '-' (the default folder
    runs/multirun/2026-12-07/210500 -> multirun-2026-12-07-210500), else the folder's name (hydra.sweep.dir=x/y
    -> y). The same folder gives the same group, so a continued sweep stays in it."""
    try:
        return "-".join(sweep_dir.resolve().relative_to(runs_dir.resolve()).parts) or sweep_dir.resolve().name
    except ValueError:
        return sweep_dir.resolve().name


def print_configs(members: Sequence[Member], what: str, sweep_dir: Path | None, executor: str,
                  parallel: int | None) -> str:
    """`--cfg job|hydra|all`: the composed config(s) as YAML (a sweep: one document per member)."""
    from omegaconf import OmegaConf

    documents = []
    for member in members:
        tree: dict[str, Any] = to_dict(member.config) if what in ("job", "all") else {}
        if what in ("hydra", "all"):
            tree["hydra"] = {
                "mode": "MULTIRUN" if sweep_dir is not None else "RUN",
                "run": {"dir": member.config.run_dir if sweep_dir is None else None},
                "sweep": {"dir": None if sweep_dir is None else str(sweep_dir),
                          "subdir": None if sweep_dir is None else str(member.run_dir.relative_to(sweep_dir.resolve()))},
                "job": {"num": member.num, "name": member.config.run_name, "chdir": False,
                        "override_dirname": override_dirname(member.overrides)},
                "launcher": {"executor": executor, "parallel": parallel},
                "overrides": {"task": list(member.overrides)},
            }
        header = f"# job #{member.num}: {' '.join(member.overrides)}\n" if sweep_dir is not None else ""
        documents.append(header + OmegaConf.to_yaml(tree))
    return "---\n".join(documents)


def resume_sweep_command(command: str, sweep_dir: Path) -> str:
    """The sweep's own command line with trainer.resume=true and its sweep folder (replacing any given), less
    trainer.stop_after (a continued sweep trains to the end): its members, composed as before, land in the same
    folders and continue from their checkpoints."""
    import shlex

    words = [word for word in shlex.split(command)
             if not word.startswith(("trainer.resume=", "hydra.sweep.dir=", "trainer.stop_after="))]
    return shlex.join([*words, "trainer.resume=true", f"hydra.sweep.dir={sweep_dir}"])


def print_info(members: Sequence[Member], sweep_dir: Path | None) -> str:
    """`stn train --info`: the config search path, the primary config, and each run's group choices, overrides
    and folder (a new single run's folder is chosen when it starts: <runs_dir>/<date>/<time>-<run name>)."""
    from stn import __version__
    from stn.compose import search_path, user_config

    lines = [f"stn {__version__}", "Config search path (first match wins):",
             *[f"  {path}" for path in search_path()], f"Primary config: {user_config()[1]}"]
    if sweep_dir is not None:
        lines.append(f"Sweep folder: {sweep_dir}")
    for member in members:
        config = member.config
        folder = config.run_dir or f"{config.runs_dir}/<date>/<time>-{config.run_name} (new)"
        lines += [f"Run #{member.num}: {config.run_name}",
                  f"  choices: dataset={config.dataset.name} model={config.model.name} "
                  f"transformer={config.transformer.type} trainer={config.trainer.name}",
                  f"  overrides: {' '.join(member.overrides) or '(none)'}", f"  folder: {folder}"]
    return "\n".join(lines)


def _problems(members: Sequence[Member]) -> list[str]:
    problems: list[str] = []
    for member in members:
        problems += [p for p in output_problems(member.config) if p not in problems]
    return problems


@dataclass
class SweepReport:
    sweep_dir: Path
    results: dict[int, dict[str, Any]] = field(default_factory=dict)  # job number -> run_cell's summary

    def count(self, status: str) -> int:
        return sum(1 for summary in self.results.values() if summary.get("status") == status)


def _write_record(path: Path, command: str, members: Sequence[Member], report: SweepReport) -> None:
    from stn.runs import write_json

    write_json(path, {"command": command, "members": [
        {"num": m.num, "overrides": list(m.overrides), "run_dir": str(m.run_dir),
         **{k: v for k, v in report.results.get(m.num, {"status": "pending"}).items()
            if k in ("status", "test_error", "val_error", "error", "steps")}}
        for m in members]})


def run_sweep(members: Sequence[Member], sweep_dir: Path, *, command: str, executor: str = "local",
              parallel: int | None = None, slurm: Any = None, fit_fn: Callable[[Config], dict] | None = None,
              poll_s: float = 1.0, log: Callable[[str], None] = print) -> SweepReport:
    """Train every member through stn.launch.executors (local processes, Slurm jobs or in-process), at most `parallel`
    at once; a failed member never stops the others. Returns each member's summary (status done / failed /
    interrupted); sweep.json in `sweep_dir` says where each member is and how it ended."""
    from stn.launch.executors import SlurmOptions, run_jobs, sigterm_as_interrupt, start_pool
    from stn.step import eval_key

    problems = _problems(members)
    if problems:
        raise SweepError("\n".join(problems))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for member in members:  # each member's .hydra/overrides.yaml: its own overrides, as Hydra records a job's
        write_overrides(member.run_dir, member.overrides)
    report = SweepReport(sweep_dir.resolve())
    record = sweep_dir / "sweep.json"
    _write_record(record, command, members, report)
    queue = deque((m, "resumed" if (m.run_dir / "checkpoints").is_dir() else "fresh") for m in members)
    pool, width, threads = start_pool(executor, len(queue), parallel, sweep_dir / "submitit",
                                      slurm or SlurmOptions())
    log(f"sweep of {len(members)} runs ({executor}, {width} at once) -> {sweep_dir}")
    with sigterm_as_interrupt():
        for member, _source, summary in run_jobs(pool, queue, width, threads, fit_fn, poll_s, log):
            report.results[member.num] = summary
            status = summary.get("status")
            if status == "done":
                key = eval_key(member.config)  # val_error for a run on a validation split
                log(f"  {member.label}: {key.replace('_', ' ')} {float(summary[key]):.2f}% | run folder "
                    f"{member.run_dir}")
            elif status == "interrupted":
                log(f"  {member.label}: stopped at step {summary.get('step')} with a checkpoint; continue with: "
                    f"{resume_sweep_command(command, sweep_dir)}")
            else:
                log(f"  {member.label} FAILED: {summary.get('error')} (run folder {member.run_dir}, its log "
                    f"{member.run_dir / 'train.log'}; submitit's job logs {sweep_dir / 'submitit'})")
            _write_record(record, command, members, report)
            if status == "interrupted" and summary.get("signal") and executor == "debug":
                raise KeyboardInterrupt  # in-process, fit's handler caught the Ctrl-C meant for the sweep
    return report

