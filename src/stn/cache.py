"""A disk cache for start-up work that is slow and a pure function of stn's code, conf/ and the environment.

A command that plans many runs (a table's 40 cells, the convergence study's 180, `stn models`' 40 rows of
parameter counts, each a few width searches after importing torch, `stn engine plan`'s groups and FLOP counts)
took 10-40 s before printing anything when each config was a Hydra compose (about 0.3 s: OmegaConf merges);
stn.compose now assembles most configs from memoised sections, and what remains slow is kept here. Those
results depend only on the arguments, stn's source files, the files in conf/, the versions of Hydra /
OmegaConf / torch and the STN_* / WANDB_* variables (conf/ reads STN_DATA_DIR and W&B's variables), so they
are kept under `$STN_CACHE_DIR` (default `$XDG_CACHE_HOME/stn`, else `~/.cache/stn`; `STN_CACHE_DIR=off`
turns it off), keyed by a digest of all of that: editing a config file, or a source file the result depends
on (for composed configs only stn.compose and the modules it imports), starts afresh. Errors are never
cached (they are computed again, and raised, every time). Entries are JSON (stn.config's dataclasses and
tuples tagged by name), written atomically: never a pickle, which would run the code of whoever can write the
cache folder. An entry is read only if this user owns it and no one else may write it; an unreadable, foreign
or malformed entry is computed again. At most MAX_ENTRIES files per kind are kept (the oldest go first).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from stn import config as config_module
from stn.compose import compose_many
from stn.config import Config

CACHE_ENV = "STN_CACHE_DIR"
MAX_ENTRIES = 4096
ENTRY_SUFFIX = ".json"
FORMAT = 1  # of an entry: {"stn_cache": FORMAT, "value": ...}
_NOT_INPUTS = {CACHE_ENV, "STN_COMMAND"}  # variables that change no cached result
T = TypeVar("T")


def cache_dir() -> Path | None:
    """Where entries live, or None when caching is off (STN_CACHE_DIR=off or empty)."""
    given = os.environ.get(CACHE_ENV)
    if given is not None:
        return None if given.strip().lower() in ("", "off", "0", "false", "no") else Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stn"


# The modules a composed config depends on (stn.compose and what it imports; a test keeps this list true):
# editing any other module (train.py, models.py, ...) leaves the composed-config entries valid.
COMPOSE_SOURCES = ("compose.py", "config.py", "validation.py")


def code_digest(kind: str = "") -> str:
    """A digest of everything a cached result of `kind` is computed from, other than its arguments and the
    environment: conf/, the versions of Python and of the libraries that compose and count, stn's Python
    files (for composed configs only COMPOSE_SOURCES), and the YAML files of the user's --config-dir when one
    is in force (read on every call: a user edits those between commands of one session)."""
    from stn.compose import conf_dir, user_config

    package = str(Path(__file__).resolve().parent)
    code = _digest(str(conf_dir().resolve()), package, COMPOSE_SOURCES if kind == "compose" else None)
    user_dir = user_config()[0]
    if user_dir is None:
        return code
    digest = hashlib.sha256(code.encode())
    _add_files(digest, Path(user_dir), sorted(Path(user_dir).rglob("*.yaml")))
    return digest.hexdigest()


def _add_files(digest: Any, root: Path, paths: Sequence[Path]) -> None:
    for path in paths:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")


@functools.cache  # per process, config folder and scope: files are read once
def _digest(conf_path: str, package_path: str, sources: tuple[str, ...] | None) -> str:
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    package, conf = Path(package_path), Path(conf_path)
    python = sorted(package.rglob("*.py")) if sources is None else [package / name for name in sources]
    for root, paths in ((package, python), (conf, sorted(conf.rglob("*.yaml")))):
        _add_files(digest, root, paths)
    digest.update(str(conf).encode() + sys.version.encode())
    for name in ("hydra-core", "omegaconf", "torch"):
        try:
            digest.update(f"{name}={version(name)}".encode())
        except PackageNotFoundError:
            digest.update(f"{name}=none".encode())
    return digest.hexdigest()


def _environment() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(("STN_", "WANDB_")) and k not in _NOT_INPUTS}


def memo(kind: str, key: Any, compute: Callable[[], T]) -> T:
    """compute(), or its earlier result for the same kind, key (JSON-able), code and environment."""
    return memo_many(kind, [key], lambda keys: [compute()])[0]


def memo_many(kind: str, keys: Sequence[Any], compute: Callable[[list[Any]], list[T]]) -> list[T]:
    """memo for many keys at once: compute(the keys not in the cache) is called once, with those keys."""
    root = cache_dir()
    if root is None:
        return compute(list(keys))
    digest, environment = code_digest(kind), _environment()
    paths = [root / kind / (hashlib.sha256(json.dumps([kind, key, digest, environment], sort_keys=True,
                                                      default=str).encode()).hexdigest()[:40] + ENTRY_SUFFIX)
             for key in keys]
    values: dict[int, Any] = {}
    for index, path in enumerate(paths):
        try:
            values[index] = _load(path)
        except Exception:  # missing, cut short, foreign, or written by another stn: compute it again
            pass
    todo = [index for index in range(len(keys)) if index not in values]
    if todo:
        for index, value in zip(todo, compute([keys[index] for index in todo]), strict=True):
            values[index] = value
            _store(paths[index], value)
    return [values[index] for index in range(len(keys))]


# The dataclasses an entry may hold, by name: stn.config's (a composed Config and its sections), nothing else.
CACHEABLE = {name: value for name, value in vars(config_module).items()
             if isinstance(value, type) and dataclasses.is_dataclass(value)}


def encode(value: Any) -> Any:
    """`value` as JSON-able data that `decode` turns back into an equal value; TypeError for what it cannot hold."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if CACHEABLE.get(type(value).__name__) is not type(value):
            raise TypeError(f"{type(value).__name__} is not one of the cacheable dataclasses")
        return {"dataclass": type(value).__name__,
                "fields": {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, tuple):
        return {"tuple": [encode(item) for item in value]}
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("only dicts with string keys are cacheable")
        return {"dict": {key: encode(item) for key, item in value.items()}}
    if isinstance(value, list):
        return [encode(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{type(value).__name__} is not cacheable")


def decode(data: Any) -> Any:
    """The inverse of `encode`: builds only CACHEABLE dataclasses, tuples, dicts, lists and scalars (no code runs
    but those dataclasses' constructors); ValueError for anything else."""
    if isinstance(data, list):
        return [decode(item) for item in data]
    if isinstance(data, dict):
        if set(data) == {"dataclass", "fields"} and isinstance(data["fields"], dict):
            cls = CACHEABLE[data["dataclass"]]
            return cls(**{name: decode(item) for name, item in data["fields"].items()})
        if set(data) == {"tuple"} and isinstance(data["tuple"], list):
            return tuple(decode(item) for item in data["tuple"])
        if set(data) == {"dict"} and isinstance(data["dict"], dict):
            return {key: decode(item) for key, item in data["dict"].items()}
        raise ValueError("not a cache entry")
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    raise ValueError("not a cache entry")


def _load(path: Path) -> Any:
    """An entry's value, if this user wrote it: a file owned by someone else, or writable by others, is ignored
    (a shared cache folder must not let another user choose what stn computes)."""
    with open(path, "rb") as handle:
        info = os.fstat(handle.fileno())
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ValueError(f"{path} is not this user's own entry")
        entry = json.loads(handle.read())
    if not isinstance(entry, dict) or entry.get("stn_cache") != FORMAT or "value" not in entry:
        raise ValueError(f"{path} is not a cache entry of this stn")
    return decode(entry["value"])


def _store(path: Path, value: Any) -> None:
    try:
        text = json.dumps({"stn_cache": FORMAT, "value": encode(value)})
    except (TypeError, ValueError):  # a value JSON cannot hold: not cached
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
        _prune(path.parent)
    except OSError:  # a read-only home, a full disk: the cache is only a speed-up
        pass


def _prune(folder: Path) -> None:
    entries = list(folder.glob(f"*{ENTRY_SUFFIX}"))
    if len(entries) <= MAX_ENTRIES:
        return
    entries.sort(key=lambda p: p.stat().st_mtime)
    for path in entries[: len(entries) - MAX_ENTRIES // 2]:
        path.unlink(missing_ok=True)


def cached_compose(overrides: Sequence[str] = ()) -> Config:
    """stn.compose.compose, cached on disk. Overrides holding an interpolation (`${...}`, e.g. an env var or
    the time) are composed afresh every time."""
    return cached_compose_many([overrides])[0]


def cached_compose_many(override_lists: Sequence[Sequence[str]]) -> list[Config]:
    """stn.compose.compose_many, cached on disk per list (as cached_compose)."""
    lists = [list(overrides) for overrides in override_lists]
    fresh = [index for index, overrides in enumerate(lists) if any("${" in item for item in overrides)]
    kept = [index for index in range(len(lists)) if index not in fresh]
    configs: dict[int, Config] = {}
    if fresh:
        configs.update(zip(fresh, compose_many([lists[index] for index in fresh]), strict=True))
    if kept:
        configs.update(zip(kept, memo_many("compose", [lists[index] for index in kept], compose_many), strict=True))
    return [configs[index] for index in range(len(lists))]
