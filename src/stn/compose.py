"""Hydra composition: `conf/` plus command-line overrides -> a validated `Config`; a saved config.yaml read back.

`compose(["dataset=RTS", "model=st_cnn", "transformer=tps", "trainer.iterations=2000"])` composes the YAML
groups in `conf/` with Hydra's compose API (no run directory, no `@hydra.main`), merges them into the typed
schema (`stn.config`: a wrong key or type fails here, with the nearest valid key), and validates the result
(`stn.validation`). W&B's environment variables are read here, as resolvers of conf/logger/wandb.yaml, below
any logger.* override. `from_container` does the same for a plain dict, e.g. a run folder's config.yaml.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import os
import re
import typing
from collections.abc import Callable, Iterator, Sequence
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


_open_session: list[Callable[..., Any]] = []  # Hydra's compose while a hydra_session() is open


@contextlib.contextmanager
def hydra_session() -> Iterator[None]:
    """Keep one Hydra instance for every compose() inside (a table's or a study's many configs): Hydra is set
    up once instead of once per config, about a third of a compose's time. Nested sessions share the outer."""
    if _open_session:
        yield
        return
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    # conf/config.yaml lists `stn_schema` first in its defaults, so every typed field exists (and is
    # type-checked) during composition: `dataset.train_limit=100` works although no YAML names it.
    ConfigStore.instance().store(name="stn_schema", node=_writable_schema())
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            _open_session.append(hydra_compose)
            yield
    finally:
        _open_session.clear()
        GlobalHydra.instance().clear()


def compose(overrides: Sequence[str] = ()) -> Config:
    """Compose `conf/config.yaml` with Hydra-style overrides into a validated, frozen `Config`.

    W&B's environment variables are read here (conf/logger/wandb.yaml), below any logger.* override. Plain
    overrides (group choices, `section.key=value`, `key=value`) are assembled from memoised sections (see
    below); anything else, and every error, goes through Hydra whole."""
    return compose_many([overrides])[0]


def compose_many(override_lists: Sequence[Sequence[str]]) -> list[Config]:
    """compose() of each list (a table's or a study's runs): the sections they need are composed together,
    in as few Hydra calls as the most varied group needs (5 for the paper's datasets)."""
    environment = _environment()
    plans: list[_Plan | None] = []
    for overrides in override_lists:
        try:
            plans.append(_plan(tuple(overrides), environment))
        except Exception:  # not a plain case: Hydra composes it whole, below
            plans.append(None)
    configs = []
    with hydra_session():
        _compose_sections([key for plan in plans if plan for key in plan.sections.values()], environment)
        for overrides, plan in zip(override_lists, plans, strict=True):
            try:
                assert plan is not None
                configs.append(_assemble(plan, environment))
            except Exception:  # Hydra composes it whole, and words the error if it has one
                configs.append(_hydra_config(overrides))
    return configs


def _hydra_config(overrides: Sequence[str], check: bool = True) -> Config:
    """One Hydra compose of conf/ with `overrides`, typed (and validated when `check`)."""
    from hydra.errors import HydraException

    with hydra_session():
        try:
            raw = _open_session[0](config_name="config", overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(_explain(err)) from None
    return from_container(OmegaConf.to_container(raw, resolve=False), check=check)


# ---------------------------------------------------------------- assembling a config from memoised sections
# Why this is Hydra's result: conf/config.yaml's defaults list is the schema, one file per group, then _self_;
# each group file is flat (no defaults list, no @package) and fills only its own section, the primary file
# only top-level keys, and no interpolation reads another section. Hydra merges them in that order and then
# applies the value overrides (`a.b=v`) in command-line order. So a group's section depends only on its
# choice and its own value overrides, and the top-level keys only on theirs: Hydra composes each distinct
# section once per process, and the top-level overrides are applied by Hydra's own override code. The
# convergence study's 180 planned runs cost 5 Hydra composes instead of 180 (compose_many); tests/test_compose.py
# checks the result equals a whole Hydra compose for every Table 1 cell and study cell, and for odd overrides.


class _NotPlain(Exception):
    """An override the assembly does not handle (+, ~, ++, sweeps, @package, interpolations, hydra.*)."""


def _environment() -> tuple[tuple[str, str], ...]:
    """What conf/ reads from the environment (STN_DATA_DIR, W&B's variables, STN_CONF_DIR)."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("STN_", "WANDB_"))))


SectionKey = tuple[str, "str | None", tuple[str, ...], tuple[tuple[str, str], ...]]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One override list, sorted: each group's section key (group, choice, its overrides, environment) and
    the top-level overrides (parsed)."""

    sections: dict[str, SectionKey]
    top_level: tuple[Any, ...]


def _plan(overrides: tuple[str, ...], environment: tuple[tuple[str, str], ...]) -> _Plan:
    choices: dict[str, str] = {}
    section_overrides: dict[str, list[str]] = {group: [] for group in GROUPS}
    top_level = []
    for item, override in zip(overrides, map(_parse, overrides), strict=True):
        if "${" in item or override.is_sweep_override() or override.is_add() or override.is_delete() \
                or override.is_force_add() or override.package is not None:
            raise _NotPlain(item)
        head, dot, _ = override.key_or_group.partition(".")
        if not dot and head in GROUPS:
            if head in choices or not isinstance(override.value(), str):
                raise _NotPlain(item)
            choices[head] = override.value()
        elif dot and head in GROUPS:
            section_overrides[head].append(item)
        elif not dot and head in TOP_LEVEL:
            top_level.append(override)
        else:
            raise _NotPlain(item)
    return _Plan({group: (group, choices.get(group), tuple(section_overrides[group]), environment)
                  for group in GROUPS}, tuple(top_level))


def _compose_sections(keys: list[SectionKey], environment: tuple[tuple[str, str], ...]) -> None:
    """Compose every missing section into _SECTIONS: one Hydra call per round, each round taking one missing
    section of every group (sections are independent: see above). A round Hydra refuses is composed key by
    key; a key that still fails is left out (its config then goes through Hydra whole, for the error)."""
    missing = list(dict.fromkeys(key for key in keys if key not in _SECTIONS))
    if ("", environment) not in _SECTIONS and not missing:
        missing = [(GROUPS[0], None, (), environment)]
    while missing:
        batch = list({key[0]: key for key in reversed(missing)}.values())
        missing = [key for key in missing if key not in batch]
        for keys_composed in ([batch] if len(batch) == 1 else [batch, *([key] for key in batch)]):
            try:
                composed = _hydra_config([*(f"{group}={choice}" for group, choice, _, _ in keys_composed if choice),
                                          *(item for key in keys_composed for item in key[2])], check=False)
            except ConfigError:
                continue
            for key in keys_composed:
                _SECTIONS[key] = getattr(composed, key[0])
            _SECTIONS.setdefault(("", environment), composed)
            if keys_composed is batch:
                break


def _assemble(plan: _Plan, environment: tuple[tuple[str, str], ...]) -> Config:
    """The config from its memoised sections and its top-level overrides, validated; its own copy (the memoised
    sections' lists and dicts, logger.tags and logger.cell, are not the caller's to edit)."""
    base = _SECTIONS[("", environment)]
    sections = {group: _SECTIONS[key] for group, key in plan.sections.items()}
    config = dataclasses.replace(base, **sections, **_top_level_values(base, list(plan.top_level)))
    return validate(copy.deepcopy(config))


TOP_LEVEL = tuple(f.name for f in dataclasses.fields(Config) if f.name not in GROUPS)
# (group, choice, its overrides, environment) -> that section as Hydra composes it; ("", environment) -> a
# config whose top-level keys are conf/'s (no top-level override was composed into it).
_SECTIONS: dict[tuple, Any] = {}


@functools.lru_cache(maxsize=8192)
def _parse(item: str) -> Any:
    """Hydra's parse of one override (key, value, kind), as Hydra's compose parses it."""
    return _parser().parse_overrides([item])[0]


@functools.cache
def _parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _top_level_values(base: Config, overrides: list[Any]) -> dict[str, Any]:
    """The top-level keys after Hydra's own override code has applied `overrides` to them (typed by the
    schema: `seed=3` an int, `name=null` None)."""
    if not overrides:
        return {}
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    node = OmegaConf.structured(_top_level_schema()(**{name: getattr(base, name) for name in TOP_LEVEL}))
    OmegaConf.set_struct(node, True)
    ConfigLoaderImpl._apply_overrides_to_config(overrides, node)
    values = OmegaConf.to_container(node, resolve=True)
    assert isinstance(values, dict)
    return values


@functools.cache
def _top_level_schema() -> type:
    hints = typing.get_type_hints(Config)
    return dataclasses.make_dataclass("TopLevel", [(name, hints[name]) for name in TOP_LEVEL])


def _writable_schema() -> Any:
    """`Config` as an OmegaConf node that merges can write into.

    Frozen dataclasses make every node read-only, and merging needs writes: lift the flag node by node.
    """
    schema = OmegaConf.structured(Config)
    OmegaConf.set_readonly(schema, False)
    for group in GROUPS:
        OmegaConf.set_readonly(schema[group], False)
    return schema


def from_container(container: Any, check: bool = True) -> Config:
    """Validate a plain dict (a composed config, or a saved `config.yaml`) into a `Config`."""
    schema = _writable_schema()
    try:
        merged = OmegaConf.merge(schema, container)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    assert isinstance(cfg, Config)
    return validate(cfg) if check else cfg



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
