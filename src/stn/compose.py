"""Hydra composition: `conf/` plus command-line overrides -> a validated `Config`; a saved config.yaml read back.

`compose(["dataset=RTS", "model=st_cnn", "transformer=tps", "trainer.iterations=2000"])` composes the YAML
groups in `conf/` with Hydra's compose API (no run directory, no `@hydra.main`), merges them into the typed
schema (`stn.config`: a wrong key or type fails here, with the nearest valid key), and validates the result
(`stn.validation`). W&B's environment variables are read here, as resolvers of conf/logger/wandb.yaml, below
any logger.* override. `from_container` does the same for a plain dict, e.g. a run folder's config.yaml.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stn.config import GROUPS, Config, ConfigError, schema_keys
from stn.validation import validate


def conf_dir() -> Path:
    """The `conf/` folder: packaged beside the module in a wheel, at the repo root in a checkout."""
    override = os.environ.get("STN_CONF_DIR")
    candidates = [Path(override)] if override else []
    here = Path(__file__).resolve().parent
    candidates += [here / "conf", here.parents[1] / "conf"]
    for candidate in candidates:
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ConfigError(f"cannot find the config folder (looked in {', '.join(map(str, candidates))})")


def group_choices(group: str) -> list[str]:
    """The entries of one config group, e.g. group_choices('dataset') -> ['E', 'P', 'R', 'RTS', 'TC', 'plain']."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))



WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}  # wandb's older names, still accepted by wandb


def wandb_mode_from_env(default: str) -> str:
    """logger.mode's default as W&B documents its variables: WANDB_MODE (dryrun = offline, run = online),
    else WANDB_DISABLED=true means disabled, else `default`. A logger.mode override replaces it entirely."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode:
        return WANDB_MODE_ALIASES.get(mode, mode)
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        return "disabled"
    return default


def wandb_tags_from_env() -> list[str]:
    """WANDB_TAGS as W&B reads it: comma-separated tags."""
    return [tag.strip() for tag in os.environ.get("WANDB_TAGS", "").split(",") if tag.strip()]


def register_resolvers() -> None:
    """The resolvers conf/logger/wandb.yaml uses for W&B's environment variables."""
    OmegaConf.register_new_resolver("stn.wandb_mode", wandb_mode_from_env, replace=True)
    OmegaConf.register_new_resolver("stn.wandb_tags", wandb_tags_from_env, replace=True)


def compose(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Compose `conf/config.yaml` with Hydra-style overrides into a validated, frozen `Config`.

    W&B's environment variables are read here (conf/logger/wandb.yaml), below any logger.* override."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    # conf/config.yaml lists `stn_schema` first in its defaults, so every typed field exists (and is
    # type-checked) during composition: `dataset.train_limit=100` works although no YAML names it.
    ConfigStore.instance().store(name="stn_schema", node=_writable_schema())
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            raw = hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err)) from None
    finally:
        GlobalHydra.instance().clear()
    return from_container(OmegaConf.to_container(raw, resolve=False))


def _writable_schema() -> Any:
    """`Config` as an OmegaConf node that merges can write into.

    Frozen dataclasses make every node read-only, and merging needs writes: lift the flag node by node.
    """
    schema = OmegaConf.structured(Config)
    OmegaConf.set_readonly(schema, False)
    for group in GROUPS:
        OmegaConf.set_readonly(schema[group], False)
    return schema


def from_container(container: Any) -> Config:
    """Validate a plain dict (a composed config, or a saved `config.yaml`) into a `Config`."""
    schema = _writable_schema()
    try:
        merged = OmegaConf.merge(schema, container)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    assert isinstance(cfg, Config)
    return validate(cfg)



def _explain_key(key: str) -> str:
    """Why Hydra refused `key=...`: a typo; suggest the nearest keys and list the valid ones."""
    keys = schema_keys()
    section, _, leaf = key.rpartition(".")
    if section in GROUPS:
        names = [k.split(".", 1)[1] for k in keys if k.startswith(section + ".")]
    else:
        section, leaf = "", key
        names = list(GROUPS) + [k for k in keys if "." not in k]
    close = difflib.get_close_matches(leaf, names, n=2, cutoff=0.7)
    where = f" in {section}" if section else ""
    hint = f"did you mean {' or '.join(f'{section}.{c}' if section else c for c in close)}? " if close else ""
    return f"unknown key {key!r}: {hint}valid keys{where}: {', '.join(names)}"


def _explain(err: Exception) -> str:
    """One readable line from Hydra/OmegaConf errors, keeping the key they name."""
    text = str(err).strip()
    if err.__cause__ is not None and text.startswith("Error merging override"):
        text = f"{text.splitlines()[0]}: {err.__cause__}"  # the cause names the key and the type
    first = text.splitlines()[0] if text else type(err).__name__
    unknown = re.match(r"Could not (?:override|append to) '([\w.]+)'", first) or re.match(
        r"Key '(\w+)' not in 'Config'", first
    )
    if unknown:
        return f"invalid configuration: {_explain_key(unknown.group(1))}"
    key = getattr(err, "full_key", None)
    if key and key not in first:
        first = f"{key}: {first}"
    hint = ""
    for group in GROUPS:
        if f"'{group}'" in text or f"{group}/" in text or text.startswith(f"In '{group}"):
            hint = f" (choices for {group}: {', '.join(group_choices(group))})"
            break
    return f"invalid configuration: {first}{hint}"
