"""Hydra's record of a run, in its folder: `.hydra/config.yaml` (the composed config), `.hydra/hydra.yaml` (the
folder, the job's name and override_dirname, the config search path, stn's version) and `.hydra/overrides.yaml`
(the command line's overrides), as a Hydra user expects to find them. Written by stn.train when a run starts and
by stn.launch.sweep for each member; below both, so that neither imports the other's side of the launch."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from stn.config import Config


def override_dirname(overrides: Sequence[str]) -> str:
    """Hydra's hydra.job.override_dirname: the job's overrides, sorted, joined with commas."""
    return ",".join(sorted(overrides))


OVERRIDES_ENV = "STN_OVERRIDES"  # this invocation's overrides (JSON list), set by stn train for its one run


def overrides_recorded(overrides: Sequence[str]) -> contextlib.AbstractContextManager[None]:
    """$STN_OVERRIDES = `overrides` while the run starts (restored after), for its .hydra/overrides.yaml."""
    from stn.runs import environ_set

    return environ_set(OVERRIDES_ENV, json.dumps(list(overrides)))


def write_overrides(folder: Path, overrides: Sequence[str]) -> None:
    from stn.runs import write_atomic

    write_atomic(folder / ".hydra" / "overrides.yaml", "".join(f"- {json.dumps(item)}\n" for item in overrides)
                 if overrides else "[]\n")


def write_hydra_folder(folder: Path, config: Config) -> None:
    """Hydra's record in a run folder, rewritten by each invocation: .hydra/config.yaml (the composed config,
    as config.yaml), .hydra/hydra.yaml (the folder, the job's name and override_dirname, the config search
    path, stn's version) and .hydra/overrides.yaml (the command line's overrides: $STN_OVERRIDES for one run,
    written by run_sweep for a sweep member; left as it is when neither says)."""
    from omegaconf import OmegaConf

    from stn import __version__
    from stn.compose import search_path, user_config
    from stn.config import to_yaml
    from stn.runs import write_atomic

    hydra = folder / ".hydra"
    write_atomic(hydra / "config.yaml", to_yaml(config))
    given = os.environ.get(OVERRIDES_ENV)
    overrides = json.loads(given) if given else None
    if overrides is not None:
        write_overrides(folder, overrides)
    elif (hydra / "overrides.yaml").is_file():
        overrides = OmegaConf.to_container(OmegaConf.load(hydra / "overrides.yaml"))
    write_atomic(hydra / "hydra.yaml", OmegaConf.to_yaml({"hydra": {
        "run": {"dir": str(folder)},
        "job": {"name": config.run_name, "chdir": False,
                "override_dirname": override_dirname(overrides or [])},
        "runtime": {"version": f"stn {__version__}", "config_name": user_config()[1],
                    "config_sources": search_path()},
    }}))
