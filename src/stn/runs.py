"""The run record: one run's folder, what it holds, and the rules for continuing it.

Owns everything on disk about a run, so `stn.train` reads as the training loop and `stn.tables.reproduce` as the
table: atomic writes, metrics JSONL, where a run lives and how it starts (fresh,
resume, finished), and the one classification of config keys behind both "may this run be resumed with this
config?" (`may_resume`) and "is this finished run stale for this config?" (`is_stale`). The lock that keeps
two processes out of one folder is `stn.lock`'s; the checkpoint's contents, saving, loading and restoring are
`stn.checkpoints`'.

Run folder (cfg.run_dir, else <runs_dir>/<YYYY-MM-DD>/<HHMMSS>-<run_name>/):
    config.yaml          the resolved config as run (run_dir filled in)
    metrics.jsonl        one JSON object per log/eval: step, loss, lr, images_per_s, time_s | test_error
    summary.json         written last, atomically: its presence means the run finished
    command.txt          the typed command line of each invocation (`stn train ...`, the sweep's or the
                         table's command for its members and cells), one line each; absent for Python calls
    checkpoints/last.pt  every trainer.checkpoint_every steps and at the end, atomically (tmp + os.replace)
    .lock                while a process writes the folder: {"pid", "host", "job"}; a dead pid's lock (same
                         host), or the lock of the same Slurm job before its requeue, is taken over
    .hydra/, train.log   Hydra's record of the invocation and the run's log, where the command writes them

A folder counts as stn's only if it holds nothing but these (no symbolic link among them) and they parse as
what stn writes (`foreign_entries`); stn never writes through a link (files are replaced atomically or opened
with O_NOFOLLOW), so a link planted in a run folder cannot make it write elsewhere.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stn.compose import from_container
from stn.config import OPTIMISER_KEYS, Config, RunError, UserError, to_dict

if TYPE_CHECKING:  # torch is imported where a checkpoint is built or loaded, not with the module
    pass

CHECKPOINT = Path("checkpoints") / "last.pt"
CHECKPOINT_FILES = {"last.pt", "best.pt"}
LOCK = ".lock"
COMMAND_FILE = "command.txt"
COMMAND_ENV = "STN_COMMAND"  # the typed command line, set by stn.cli.main while it runs (inherited by its workers)
HYDRA_FOLDER, LOG_FILE = ".hydra", "train.log"  # written by the command around a run (Hydra's record, its log)
RUN_FILES = {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints", COMMAND_FILE, LOCK, HYDRA_FOLDER,
             LOG_FILE, "transformations.png"}  # the last: an ST run's end picture (stn.train)
# What stn writes before config.yaml: a run folder holding only these (a run that died while starting) is stn's.
BEFORE_CONFIG = {LOCK, HYDRA_FOLDER, LOG_FILE}
TEMPORARY = re.compile(r"^\.(.+)\.tmp\d+$")  # write_atomic's file beside its target, left by a killed process
RUN_FOLDER = re.compile(r"^(\d{6})(?:\.(\d+))?-(.+)$")  # HHMMSS[.k]-<run_name>

# One classification of config keys (a key names itself or a section, e.g. "dataset" = every dataset.* key):
# - IDENTITY: what is trained and how it is optimised. A resumed run must match its checkpoint here, and a
#   change makes a finished run stale.
# - RUNTIME: where things live and how they are run and logged. Free to change; never makes a run stale.
# - every other key (trainer.iterations, the intervals, amp, channels_last, dataset.test_limit, ...) changes
#   the outcome but may change between invocations: resumable, but a finished run with another value is stale.
IDENTITY = ("dataset", "model", "transformer", "seed", *(f"trainer.{key}" for key in OPTIMISER_KEYS),
            "trainer.schedule", "trainer.nesterov", "trainer.loc_lr_scale", "trainer.warmup", "trainer.label_smoothing",
            "trainer.grad_clip", "trainer.ema_decay")
RUNTIME = ("data_dir", "download", "runs_dir", "run_dir", "name", "trainer.resume", "trainer.stop_after",
           "trainer.device", "trainer.eval_batch_size", "trainer.compile", "logger")
OUTCOME_EXCEPTIONS = ("dataset.test_limit",)  # inside an IDENTITY section, but evaluation only


class RunFolderError(UserError):
    """A run folder that cannot be used as asked (exit code 2); the message names the folder and the fix."""


class RunFolderBusy(RunFolderError):
    """Another live process holds the run folder's lock (the same run started twice)."""


class CheckpointError(RunFolderError):
    """An unreadable, foreign or mismatched checkpoint; the message names the file and the fix."""


class DiskFullError(RunError):
    """A write failed for lack of space (exit 1): the message says what was kept and how to continue."""


def disk_full(path: Path) -> DiskFullError:
    return DiskFullError(
        f"the disk is full: writing {path} failed (no space left on device). Nothing written before is lost: "
        f"every record and checkpoint is replaced whole, so the previous {path.name} (if any) is kept; free "
        f"some space, then rerun the same command to continue from the last checkpoint"
    )


# ------------------------------------------------------------------------------------------ key classes


def _covers(prefixes: tuple[str, ...], key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def key_class(key: str) -> str:
    """'identity' | 'outcome' | 'runtime' for a dotted config key."""
    if _covers(RUNTIME, key):
        return "runtime"
    if _covers(IDENTITY, key) and key not in OUTCOME_EXCEPTIONS:
        return "identity"
    return "outcome"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(saved: dict[str, Any], cfg: Config, classes: tuple[str, ...]) -> list[str]:
    """'key: saved -> now' for every key of the given classes whose value differs. A key the saved config lacks
    was added to stn after that run was saved, with a default that keeps the old behaviour: it compares as
    that default."""
    before, now = flatten(to_dict(Config())) | flatten(saved), flatten(to_dict(cfg))
    keys = [k for k in sorted(set(before) | set(now)) if key_class(k) in classes]
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]


def may_resume(saved: dict[str, Any], cfg: Config) -> list[str]:
    """Why a run saved with `saved` may NOT continue as `cfg` ([] = it may): its identity keys differ."""
    return differences(saved, cfg, ("identity",))


def is_stale(saved: dict[str, Any], cfg: Config) -> list[str]:
    """Why a finished run saved with `saved` is NOT a result for `cfg` ([] = it is): any non-runtime key differs."""
    return differences(saved, cfg, ("identity", "outcome"))


def check_resumable(saved: dict[str, Any], cfg: Config, path: Path) -> None:
    changed = may_resume(saved, cfg)
    if changed:
        raise CheckpointError(
            f"{path} was trained with a different configuration ({'; '.join(changed)}): resume with the "
            f"original settings, or start a new run (another run_dir, or trainer.resume=false)"
        )


def read_config(path: Path) -> dict[str, Any]:
    """A saved config.yaml as a validated plain dict; CheckpointError naming the file if it is not one."""
    from omegaconf import OmegaConf

    try:
        return to_dict(from_container(OmegaConf.to_container(OmegaConf.load(path), resolve=False)))
    except Exception as err:  # yaml's, OmegaConf's and ConfigError: all mean "not a usable config"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable stn config ({first}); restore it, or move "
                              f"{path.parent} aside (it keeps its checkpoint) to start that run over") from None


# ------------------------------------------------------------------------------------------------ files


def _create(path: Path, flags: int) -> int:
    """os.open(path) for writing, never through a symbolic link (O_NOFOLLOW): a link planted in a run folder
    is refused, its target untouched."""
    try:
        return os.open(path, flags | os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise RunFolderError(f"{path} is a symbolic link: stn writes only files it made; remove the link "
                                 f"(its target is left as it is) or choose another run folder") from None
        if err.errno == errno.ENOSPC:
            raise disk_full(path) from None
        raise


def write_atomic(path: Path, data: str | bytes | Callable[[Path], Any]) -> None:
    """Write `data` (text, bytes, or a function that writes a given path) next to `path`, flush it to disk,
    then rename it over `path`: readers never see half a file, and a symbolic link at `path` is replaced,
    never written through. A full disk raises DiskFullError and leaves the old `path` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)  # a leftover of a killed process with this pid (or a link): start clean
        handle = os.fdopen(_create(tmp, os.O_EXCL), "wb")
        with handle:
            if not callable(data):
                handle.write(data.encode() if isinstance(data, str) else data)
        if callable(data):
            data(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise disk_full(path) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def append_line(path: Path, line: str) -> None:
    """Append one line to a run folder's file (created if missing), never through a symbolic link."""
    try:
        with os.fdopen(_create(path, os.O_APPEND), "a") as handle:
            handle.write(line + "\n")
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise disk_full(path) from None
        raise


def record_command(folder: Path) -> None:
    """Append this invocation's command line ($STN_COMMAND) to <folder>/command.txt, one line per invocation
    (a resume adds one); nothing when fit is called from Python without it."""
    line = os.environ.get(COMMAND_ENV, "").strip()
    if line:
        append_line(folder / COMMAND_FILE, " ".join(line.splitlines()))


@contextlib.contextmanager
def environ_set(name: str, value: str) -> Iterator[None]:
    """$name = value inside the block, restored (or removed) after: tests run many commands in one process."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def command_recorded(line: str) -> contextlib.AbstractContextManager[None]:
    """$STN_COMMAND = `line` while the runs it starts are set up."""
    return environ_set(COMMAND_ENV, line)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunFolderError(f"cannot read {path} ({err}); delete {path} (that file alone) to run again") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path} does not hold a JSON object; delete {path} (that file alone) to run again")
    return data


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics up to `step` (the checkpoint resumed from): a crashed run's later lines would repeat."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by the crash
            continue
    write_atomic(path, "".join(line + "\n" for line in kept))


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    append_line(path, json.dumps(record))


def best_test_error(path: Path) -> float | None:
    """The lowest test error in metrics.jsonl (every invocation of a resumed run), None before any evaluation."""
    errors = [record["test_error"] for record in map(json.loads, path.read_text().splitlines())
              if "test_error" in record] if path.is_file() else []
    return min(errors) if errors else None


# ------------------------------------------------------------------------------------------ run folders


def new_run_dir(cfg: Config, now: dt.datetime | None = None) -> Path:
    """Claim <runs_dir>/<YYYY-MM-DD>/<HHMMSS>-<run_name>/ (mkdir is atomic: parallel runs get distinct folders)."""
    now = now or dt.datetime.now()
    day = Path(cfg.runs_dir) / now.strftime("%Y-%m-%d")
    day.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime("%H%M%S")
    for k in range(1000):
        folder = day / (f"{stamp}-{cfg.run_name}" if k == 0 else f"{stamp}.{k}-{cfg.run_name}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RunFolderError(f"cannot create a run folder under {day}: 1000 runs named {cfg.run_name} this second")


def newest_run_dir(runs_dir: Path, run_name: str) -> Path | None:
    """The most recently started run folder of `run_name` under runs_dir (by date, time and suffix)."""
    found = []
    for folder in runs_dir.glob("*/*"):
        match = RUN_FOLDER.match(folder.name)
        if folder.is_dir() and match and match.group(3) == run_name:
            found.append(((folder.parent.name, match.group(1), int(match.group(2) or 0)), folder))
    return max(found)[1] if found else None


def has_run(folder: Path) -> bool:
    return (folder / "summary.json").is_file() or (folder / CHECKPOINT).is_file()


def _metrics_lines(path: Path) -> bool:
    """Whether metrics.jsonl reads as stn's: JSON objects with an integer step, one a line (the last may be cut
    short by a crash: `truncate_metrics` drops it on resume)."""
    lines = path.read_text(errors="replace").splitlines()
    for index, line in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                return False
        except ValueError:
            if index < len(lines) - 1:
                return False
    return True


def _is_stn_config(path: Path) -> bool:
    """Whether config.yaml is a config stn saved: a mapping with stn's sections that reads as a Config."""
    from omegaconf import OmegaConf

    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if not isinstance(raw, dict) or not {"dataset", "model", "trainer", "seed"} <= set(raw):
            return False
        from_container(raw)
    except Exception:  # yaml's, OmegaConf's and ConfigError: not a config stn wrote
        return False
    return True


def foreign_entries(folder: Path) -> list[str]:
    """What in `folder` stn did not write, each with why ([] = an stn run folder, or an empty one): a name off
    RUN_FILES, a symbolic link, a file that does not parse as what stn writes under that name, or any file
    but those stn writes first (BEFORE_CONFIG) without a config.yaml of stn's."""
    entries = {p.name: p for p in folder.iterdir()}
    foreign = []
    for name, path in sorted(entries.items()):
        if path.is_symlink():
            foreign.append(f"{name} (a symbolic link)")
        elif TEMPORARY.match(name) and TEMPORARY.match(name).group(1) in RUN_FILES:
            continue  # a half-written file of a killed process: replaced on the next write
        elif name not in RUN_FILES:
            foreign.append(name)
        elif name in ("checkpoints", HYDRA_FOLDER) and not path.is_dir():
            foreign.append(f"{name} (not a folder)")
        elif name not in ("checkpoints", HYDRA_FOLDER) and not path.is_file():
            foreign.append(f"{name} (not a file)")
        elif name == "checkpoints":  # last.pt (best.pt where a run keeps one) and their temporary files
            foreign += [f"checkpoints/{p.name}" for p in path.iterdir() if p.is_symlink() or not p.is_file()
                        or not (p.name in CHECKPOINT_FILES or TEMPORARY.match(p.name))]
        elif name == HYDRA_FOLDER:  # Hydra's config.yaml, hydra.yaml, overrides.yaml
            foreign += [f"{name}/{p.name}" for p in path.iterdir()
                        if p.is_symlink() or not p.is_file() or p.suffix != ".yaml"]
    if foreign:
        return foreign
    if "config.yaml" in entries:
        if not _is_stn_config(entries["config.yaml"]):
            return ["config.yaml (not a config stn saved)"]
        if "metrics.jsonl" in entries and not _metrics_lines(entries["metrics.jsonl"]):
            return ["metrics.jsonl (not stn's metrics: one JSON object with a step per line)"]
        return []
    return [f"{name} (without an stn config.yaml)" for name in sorted(set(entries) - BEFORE_CONFIG)
            if not TEMPORARY.match(name)]


def check_usable(folder: Path) -> None:
    """Refuse a run_dir that is a file, or a non-empty folder that is not an stn run (`foreign_entries`):
    stn never writes into someone else's folder, nor through a link planted in one."""
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"run_dir={folder} is a file, not a folder: choose another run_dir")
    if folder.is_dir():
        foreign = foreign_entries(folder)
        if foreign:
            raise RunFolderError(
                f"run_dir={folder} is not empty and holds no stn run ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}): stn never writes into someone else's folder; "
                f"choose a new or empty run_dir"
            )


def locate_run(cfg: Config) -> tuple[Path | None, str]:
    """Where this run lives and how it starts: (folder, 'finished' | 'resume' | 'fresh').

    trainer.resume=true: run_dir (or, without one, the newest folder of this run_name under runs_dir) with
    a summary.json is 'finished', with a checkpoint is 'resume', empty or missing starts fresh there.
    trainer.resume=false: run_dir if it holds no run yet (never overwrites one), else a new folder.
    folder None = a new folder under runs_dir, claimed by `new_run_dir` once the data and model are built
    (so a run that cannot start leaves no empty folder behind). A non-empty folder that is not an stn run
    is refused either way.
    """
    if cfg.run_dir:
        folder = Path(cfg.run_dir)
    elif cfg.trainer.resume:
        newest = newest_run_dir(Path(cfg.runs_dir), cfg.run_name)
        if newest is None:
            print(f"trainer.resume=true: no earlier run named {cfg.run_name} under {cfg.runs_dir}; starting a new one")
            return None, "fresh"
        folder = newest
    else:
        return None, "fresh"
    check_usable(folder)
    if not cfg.trainer.resume:
        if has_run(folder):
            raise RunFolderError(f"run_dir={folder} already holds a run: continue it with trainer.resume=true, "
                                 f"or choose another run_dir")
        return folder, "fresh"
    if (folder / "summary.json").is_file():
        return folder, "finished"
    if (folder / CHECKPOINT).is_file():
        return folder, "resume"
    print(f"trainer.resume=true: {folder} holds no checkpoint yet; starting fresh there")
    return folder, "fresh"


def finished_summary(folder: Path, cfg: Config) -> dict[str, Any]:
    """A finished run's summary.json, after checking it ran this configuration."""
    saved = folder / "config.yaml"
    if saved.is_file():
        check_resumable(read_config(saved), cfg, saved)
    summary = read_json(folder / "summary.json")
    print(f"{folder} already finished (test error {summary.get('test_error')}%); not training again")
    return summary


