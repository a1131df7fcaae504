"""A disk cache for start-up work that is slow and a pure function of stn's code, conf/ and the environment.

Hydra composes one config in about 0.3 s (OmegaConf merges), so a command that plans many runs (a table's 40
cells, the convergence study's 180, `stn models`' 40 rows of parameter counts, each a few width searches
after importing torch, `stn engine plan`'s groups and FLOP counts) took 10-40 s before printing anything. Those results depend only on the arguments,
stn's source files, the files in conf/, the versions of Hydra / OmegaConf / torch and the STN_* / WANDB_*
variables (conf/ reads STN_DATA_DIR and W&B's variables), so they are kept under
`$STN_CACHE_DIR` (default `$XDG_CACHE_HOME/stn`, else `~/.cache/stn`; `STN_CACHE_DIR=off` turns it off),
keyed by a digest of all of that: editing any stn source or config file starts afresh. Errors are never
cached (they are computed again, and raised, every time). Entries are pickles of stn's own frozen
dataclasses or plain data, written atomically; an unreadable entry is recomputed. At most MAX_ENTRIES
files per kind are kept (the oldest go first).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from stn.compose import compose
from stn.config import Config

CACHE_ENV = "STN_CACHE_DIR"
MAX_ENTRIES = 4096
_NOT_INPUTS = {CACHE_ENV, "STN_COMMAND"}  # variables that change no cached result
T = TypeVar("T")


def cache_dir() -> Path | None:
    """Where entries live, or None when caching is off (STN_CACHE_DIR=off or empty)."""
    given = os.environ.get(CACHE_ENV)
    if given is not None:
        return None if given.strip().lower() in ("", "off", "0", "false", "no") else Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stn"


def code_digest() -> str:
    """A digest of everything a cached result is computed from, other than its arguments and the environment:
    stn's Python files, conf/, and the versions of Python and of the libraries that compose and count."""
    from stn.compose import conf_dir

    return _digest(str(conf_dir().resolve()))


@functools.cache  # per process and config folder: files are read once
def _digest(conf_path: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    conf = Path(conf_path)
    for root, pattern in ((package, "*.py"), (conf, "*.yaml")):
        for path in sorted(root.rglob(pattern)):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
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
    root = cache_dir()
    if root is None:
        return compute()
    name = hashlib.sha256(json.dumps([kind, key, code_digest(), _environment()], sort_keys=True,
                                     default=str).encode()).hexdigest()[:40]
    path = root / kind / f"{name}.pkl"
    try:
        return pickle.loads(path.read_bytes())
    except Exception:  # missing, cut short, or written by another stn: compute it again
        pass
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(tmp, path)
        _prune(path.parent)
    except OSError:  # a read-only home, a full disk: the cache is only a speed-up
        pass
    return value


def _prune(folder: Path) -> None:
    entries = list(folder.glob("*.pkl"))
    if len(entries) <= MAX_ENTRIES:
        return
    entries.sort(key=lambda p: p.stat().st_mtime)
    for path in entries[: len(entries) - MAX_ENTRIES // 2]:
        path.unlink(missing_ok=True)


def cached_compose(overrides: Sequence[str] = ()) -> Config:
    """stn.compose.compose, cached on disk. Overrides holding an interpolation (`${...}`, e.g. an env var or
    the time) are composed afresh every time."""
    overrides = list(overrides)
    if any("${" in item for item in overrides):
        return compose(overrides)
    return memo("compose", overrides, lambda: compose(overrides))


def cached_parameter_table(datasets: Sequence[str], overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """stn.models.parameter_table's rows as dicts (model, dataset, params, width_name, width, target), cached
    on disk: a hit imports neither torch nor stn.models."""
    import dataclasses

    def count() -> list[dict[str, Any]]:
        from stn.models import parameter_table

        return [dataclasses.asdict(row) for row in parameter_table(tuple(datasets), list(overrides))]

    if any("${" in item for item in overrides):
        return count()
    return memo("parameters", [list(datasets), list(overrides)], count)
