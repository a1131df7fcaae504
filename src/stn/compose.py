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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
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


# Hydra's --config-dir / --config-name (`stn train -cd DIR -cn NAME`), set by stn.cli.main for one command (and
# inherited by its workers): DIR joins the search path after conf/ (as in Hydra), so a user's own group entries
# (DIR/model/x.yaml, DIR/experiment/x.yaml with `# @package _global_`) and primary configs (DIR/NAME.yaml, whose
# defaults may start with stn's `config`) compose without editing conf/. They always go through Hydra whole.
USER_DIR_ENV, USER_NAME_ENV = "STN_CONFIG_DIR", "STN_CONFIG_NAME"


def user_config() -> tuple[str | None, str]:
    """(the --config-dir in force or None, the primary config's name: --config-name, else 'config')."""
    return os.environ.get(USER_DIR_ENV) or None, os.environ.get(USER_NAME_ENV) or "config"


@contextlib.contextmanager
def user_config_set(config_dir: Path | None, config_name: str | None) -> typing.Iterator[None]:
    """--config-dir / --config-name in force for the commands composed inside (restored after: tests run many
    commands in one process)."""
    previous = {name: os.environ.get(name) for name in (USER_DIR_ENV, USER_NAME_ENV)}
    for name, value in ((USER_DIR_ENV, config_dir and str(Path(config_dir).resolve())), (USER_NAME_ENV, config_name)):
        if value:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def search_path() -> list[str]:
    """Where configs are looked for, in order (`stn train --info`)."""
    user_dir, name = user_config()
    if user_dir and (Path(user_dir) / f"{name}.yaml").is_file():
        return [user_dir, str(conf_dir())]
    return [str(conf_dir()), *([user_dir] if user_dir else [])]


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


def compose(overrides: Sequence[str] = ()) -> Config:
    """Compose `conf/config.yaml` with Hydra-style overrides into a validated, frozen `Config`.

    W&B's environment variables are read here (conf/logger/wandb.yaml), below any logger.* override. Plain
    overrides (group choices, `section.key=value`, `key=value`) are assembled from memoised sections (see
    below); anything else, and every error, goes through Hydra whole."""
    return compose_many([overrides])[0]


def compose_many(override_lists: Sequence[Sequence[str]]) -> list[Config]:
    """compose() of each list (a table's or a study's runs), the sections they need read once: a plan of any
    size costs one Hydra compose (conf/'s defaults) plus one per list outside the plain case."""
    environment = _environment()
    plans: list[_Plan | None] = []
    for overrides in override_lists:
        try:
            if user_config() != (None, "config"):  # a user's folder or primary config: Hydra reads it whole
                raise _NotPlain(USER_DIR_ENV)
            plans.append(_plan(tuple(overrides), environment))
        except Exception:  # not a plain case: Hydra composes it whole, below
            plans.append(None)
    configs = []
    _compose_sections([key for plan in plans if plan for key in plan.sections.values()], environment)
    for overrides, plan in zip(override_lists, plans, strict=True):
        try:
            assert plan is not None
            configs.append(_assemble(plan, environment))
        except Exception:  # Hydra composes it whole, and words the error if it has one
            try:
                configs.append(_hydra_config(overrides))
            except ConfigError as err:
                raise ComposeError(str(err), tuple(overrides)) from None
    return configs


class ComposeError(ConfigError):
    """compose_many's error: the message of one list's ConfigError, and that list (`overrides`), so a caller
    planning many runs names the run without composing them again one by one."""

    def __init__(self, message: str, overrides: tuple[str, ...]) -> None:
        super().__init__(message)
        self.overrides = overrides


def _hydra_config(overrides: Sequence[str], check: bool = True) -> Config:
    """One Hydra compose of conf/ with `overrides`, typed (and validated when `check`)."""
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
    user_dir, name = user_config()
    # As Hydra's --config-dir: the user's folder joins the search path after conf/; Hydra reads the primary
    # config from the first source only, so a --config-name found in the user's folder makes that one first.
    primary, extra = str(conf_dir()), ([f"hydra.searchpath=[file://{user_dir}]"] if user_dir else [])
    if user_dir and (Path(user_dir) / f"{name}.yaml").is_file():
        primary, extra = user_dir, [f"hydra.searchpath=[file://{conf_dir()}]"]
    try:
        with initialize_config_dir(config_dir=primary, version_base=None):
            raw = hydra_compose(config_name=name, overrides=[*overrides, *extra])
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError("\n".join(non_ascii_problems(overrides)) or _explain(err)) from None
    finally:
        GlobalHydra.instance().clear()
    return from_container(OmegaConf.to_container(raw, resolve=False), check=check)


# ---------------------------------------------------------------- assembling a config from memoised sections
# Why this is Hydra's result: conf/config.yaml's defaults list is the schema, one file per group, then _self_;
# each group file is flat (no defaults list, no @package) and fills only its own section, the primary file
# only top-level keys, and no interpolation reads another section. Hydra merges them in that order and then
# applies the value overrides (`a.b=v`) in command-line order. So a group's section depends only on its
# choice and its own value overrides, and the top-level keys only on theirs. Hydra composes conf/'s defaults
# once per process; any other section is its group file merged into the section's schema with the group's
# overrides applied by Hydra's own override code, memoised; the top-level overrides likewise. A file outside
# that shape (a defaults list, a package header) sends its configs through Hydra whole. The convergence study's
# 180 planned runs cost one Hydra compose instead of 180; tests/test_compose.py checks the result equals a
# whole Hydra compose for every Table 1 cell and study cell, for odd overrides and errors, and for a group file
# with a defaults list.


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
    """Put every missing section into _SECTIONS: conf/'s defaults from one Hydra compose, every other section
    read from its group file (`_load_section`). A section that cannot be read so is left out: its configs then
    go through Hydra whole (which also words any error)."""
    if ("", environment) not in _SECTIONS:  # the top-level keys and the default sections
        with contextlib.suppress(ConfigError):
            default = _hydra_config([], check=False)
            _SECTIONS[("", environment)] = default
            for group in GROUPS:
                _SECTIONS[(group, None, (), environment)] = getattr(default, group)
    for key in dict.fromkeys(key for key in keys if key not in _SECTIONS):
        with contextlib.suppress(Exception):  # a file Hydra must read itself, or an error
            _SECTIONS[key] = _load_section(*key[:3])


def _load_section(group: str, choice: str | None, overrides: tuple[str, ...]) -> Any:
    """One group's section as Hydra composes it, without Hydra's defaults tree (a hundred times cheaper): the
    group file merged into the section's schema, then the group's overrides applied by Hydra's override code.
    Refuses (_NotPlain) what Hydra would treat otherwise: a file with a defaults list or a package header, or a
    primary config whose own body writes into a group."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    primary = _primary_config()
    if any(name in GROUPS for name in primary if name != "defaults"):
        raise _NotPlain("conf/config.yaml sets group keys itself")
    chosen = choice if choice is not None else _default_choices(primary).get(group)
    path = conf_dir() / group / f"{chosen}.yaml"
    text = path.read_text()
    loaded = OmegaConf.create(text)
    if "@package" in text or "defaults" in loaded:
        raise _NotPlain(str(path))
    schema = OmegaConf.structured(typing.get_type_hints(Config)[group])
    OmegaConf.set_readonly(schema, False)
    root = OmegaConf.create({group: OmegaConf.merge(schema, loaded)})
    OmegaConf.set_struct(root, True)
    ConfigLoaderImpl._apply_overrides_to_config([_parse(item) for item in overrides], root)
    register_resolvers()
    return OmegaConf.to_object(root[group])


def _primary_config() -> Any:
    return OmegaConf.load(conf_dir() / "config.yaml")


def _default_choices(primary: Any) -> dict[str, str]:
    """{group: option} from conf/config.yaml's defaults list (`- dataset: R`)."""
    return {name: str(option) for entry in primary.get("defaults", []) if isinstance(entry, DictConfig)
            for name, option in entry.items()}


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


def non_ascii_problems(overrides: Sequence[str]) -> list[str]:
    """Hydra's override grammar takes only ASCII outside quotes (its lexer's LexerNoViableAltException): one line
    per such override, with the quoted form that works."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and not value.isascii() and not (value[:1] in "'\"" and value[-1:] == value[:1] and len(value) > 1):
            problems.append(f"{item}: a value with non-ASCII characters must be quoted in Hydra's override "
                            f"syntax: {key}='{value}' (quote it for the shell too: \"{key}='{value}'\")")
        elif not key.isascii():
            problems.append(f"{item}: keys are ASCII names such as trainer.lr")
    return problems


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
