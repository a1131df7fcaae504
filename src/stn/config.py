"""Typed run configuration: Hydra composes `conf/`, this module validates it once.

Every run is described by a frozen `Config` built from the YAML groups in `conf/` (dataset, model,
transformer, trainer, logger) plus command-line overrides such as `dataset=RTS model=st_cnn
transformer=tps trainer.iterations=2000`. A wrong key, a wrong type, a value out of its range (`RANGES`;
NaN and inf everywhere), an unsafe name or an impossible combination fails here, at start-up, before torch or
MNIST load, with a `ConfigError` holding one line per problem (key, value, fix), never after an hour of
training. The checks of what a command writes (`output_problems`, `picture_problems`) and the note on an
overridden schedule (`schedule_warning`) live here too. `UserError` is the base of every error the user fixes
by changing the command or its inputs (the CLI's exit code 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

GROUPS = ("dataset", "model", "transformer", "trainer", "logger")
DATA_DIR_ENV = "STN_DATA_DIR"


class UserError(ValueError):
    """Something the user fixes by changing the command or its inputs (the CLI exits with code 2)."""


class RunError(RuntimeError):
    """A run that failed while running (the CLI's exit code 1), e.g. a non-finite loss."""


class ConfigError(UserError):
    """A configuration that cannot run; one line per problem, naming the key, its value and the fix."""


@dataclass(frozen=True)
class DatasetConfig:
    """One distorted-MNIST variant (the paper's Appendix A). Angles in degrees, offsets in pixels."""

    name: str = "plain"
    size: int = 28  # side of the output canvas in pixels (28, 42 or 60)
    rotation: float = 0.0  # angle drawn uniformly from [-rotation, +rotation]
    scale_min: float = 1.0  # digit scale drawn uniformly from [scale_min, scale_max]
    scale_max: float = 1.0
    translate: bool = False  # place the (scaled) 28x28 digit at a uniformly random spot of the canvas
    corner_std: float = 0.0  # P: std of the normal offset of each of the four corners
    # P, readings of the paper's words (experiments/datasets/README.md): which four corners move (canvas: the
    # 28x28 canvas corners; image: those of the 28x28 digit image after its scaling; box20: those of the central
    # 20x20 box MNIST size-normalised its digits into, scaled; digit_box: those of the digit's ink bounding box,
    # scaled), how (per_axis: N(0, std) independently in x and y; diagonal: one N(0, std) stretch along the
    # corner's diagonal, outward positive) and what happens to draws whose moved corners form a folded
    # (non-convex) quad (keep them, or redraw them).
    corner_frame: str = "canvas"  # canvas | image | box20 | digit_box
    corner_direction: str = "per_axis"  # per_axis | diagonal
    folded: str = "keep"  # keep | redraw
    tps_std: float = 0.0  # E: std of the normal offset of each thin-plate-spline control point
    tps_grid: int = 4  # E: control points per side (4 -> 16 points)
    clutter: int = 0  # TC: number of clutter patches cut from other digits
    clutter_size: int = 6  # TC: side of each clutter patch
    st_output_pool: int = 1  # average-pool the transformer's output by this factor (RTS, TC: 2)
    fixed_train: bool = False  # distort the training set once, up front, instead of afresh each epoch
    test_seed: int = 20151207  # the fixed test set is a pure function of this seed
    train_limit: int | None = None  # use only the first N training digits (tests, smoke runs)
    # Hold out the last N of MNIST's 60k training digits as a validation set, for choosing hyperparameters
    # without the test set: training never sees them, and every evaluation of the run is on them (distorted
    # with test_seed + 1, logged as val_error); the test set is not evaluated at all. 0 = no validation split.
    validation: int = 0
    test_limit: int | None = None  # evaluate on the first N test digits only (tests, smoke runs)


@dataclass(frozen=True)
class ModelConfig:
    """Which network (the paper's Section 4.1); widths are matched to a parameter budget in `models`."""

    name: str = "cnn"  # fcn | cnn | st_fcn | st_cnn
    param_budget: int | None = None  # target parameter count; None = the matching baseline's count
    fc_units: int | None = None  # FCN hidden width; None = chosen to meet the budget
    conv_filters: int | None = None  # CNN filters per conv layer; None = chosen to meet the budget


@dataclass(frozen=True)
class TransformerConfig:
    """The spatial transformer: transformation family and where/how many."""

    type: str = "none"  # none | affine | projective | tps
    tps_grid: int = 4  # TPS control points per side (4 -> the paper's 16)
    output_size: int | None = None  # sampler output side in pixels; None = the input's side
    placement: str = "input"  # input | features (on the first conv block's feature maps)
    parallel: int = 1  # transformers side by side, their outputs concatenated along channels


@dataclass(frozen=True)
class TrainerConfig:
    """Optimisation and run-time settings. `paper` is the default; `quick` and `smoke` are CPU presets."""

    name: str = "paper"
    iterations: int = 150_000
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_step: int = 50_000  # divide the learning rate by lr_gamma**-1 every lr_step iterations
    lr_gamma: float = 0.1
    # step: the paper's (lr * lr_gamma every lr_step steps). onecycle: PyTorch's OneCycleLR over the whole run
    # with `lr` as its peak (its defaults: 30% warm-up, cosine, momentum cycled 0.85-0.95), a recipe beyond
    # the paper (experiments/convergence/README.md).
    schedule: str = "step"
    nesterov: bool = False  # Nesterov momentum (needs momentum > 0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast, on CUDA only
    # CPU arithmetic: float32 | bf16 (autocast; theta, grids and sampling stay float32) | auto (bf16 where
    # the CPU has bf16 hardware, else float32). `amp` keeps meaning "CUDA only", so recorded configs keep
    # their meaning; the precision a run actually used is in its summary.json.
    cpu_precision: str = "float32"
    channels_last: bool = True  # NHWC activations and conv weights (CPU and CUDA: faster on both)
    compile: bool = False  # torch.compile the model
    eval_every: int = 10_000  # evaluate on the test set every this many steps (and always at the end)
    log_every: int = 100  # read the running loss back from the device (one sync) this often
    checkpoint_every: int = 5_000
    eval_batch_size: int = 1_000
    resume: bool = False  # continue run_dir (or the newest run of this run_name) from its checkpoint
    # End this invocation after this many steps, with a checkpoint and no summary (time-sliced jobs);
    # continue later with trainer.resume=true. None = run to trainer.iterations.
    stop_after: int | None = None


@dataclass(frozen=True)
class LoggerConfig:
    """Weights & Biases; local JSONL metrics are always written regardless of this."""

    mode: str = "offline"  # online | offline | disabled
    project: str = "stn"
    entity: str | None = None
    group: str | None = None
    name: str | None = None  # the W&B run's display name; None = the run name
    tags: list[str] = field(default_factory=list)
    images: int = 8  # input/rectified pairs logged at the end
    # At the end of a training, the checkpoint(s) (type "model") and a dataset card ("dataset-card") as W&B
    # artifacts, so whoever syncs the run can download the model and `stn visualize` it (stn.tracking).
    artifacts: bool = True
    card_draws: int = 200  # test draws the card artifact measures (stn.cards; a cheap card: ~1 s); 0 = no card
    # Set by `stn reproduce-table` on its cells: table, row, column, cell, paper value. Tracker puts them in
    # the W&B config (top level) and tags, so a group's dashboard can group by row and column (stn.dashboard).
    cell: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # MNIST root (torchvision layout: <data_dir>/MNIST/raw); conf/config.yaml reads STN_DATA_DIR first
    data_dir: str = "data"
    download: bool = False  # let torchvision download MNIST when it is missing (needs internet)
    seed: int = 0
    name: str | None = None  # run name; None = derived from dataset/model/transformer
    runs_dir: str = "runs"
    run_dir: str | None = None  # an explicit run folder (also: the folder to resume)

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        parts = [self.dataset.name, self.model.name]
        if self.transformer.type != "none":
            parts.append(self.transformer.type)
        return "-".join(parts)


TRANSFORM_TYPES = ("none", "affine", "projective", "tps")
MODEL_NAMES = ("fcn", "cnn", "st_fcn", "st_cnn")
LOGGER_MODES = ("online", "offline", "disabled")
CORNER_FRAMES = ("canvas", "image", "box20", "digit_box")
CORNER_DIRECTIONS = ("per_axis", "diagonal")
FOLDED_CHOICES = ("keep", "redraw")
CPU_PRECISIONS = ("float32", "bf16", "auto")
SCHEDULES = ("step", "onecycle")
TrainerPreset = Literal["smoke", "quick", "paper"]  # conf/trainer/*.yaml (tests/test_cli.py checks): --preset
TRAINER_PRESETS: tuple[str, ...] = get_args(TrainerPreset)


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


MNIST_TRAIN, MNIST_TEST = 60_000, 10_000  # digits per MNIST split: the bounds of the limits and the batch
DIGIT = 28  # side of an MNIST digit in pixels
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}")  # a folder name on every OS, no path separator
PICTURE_FORMATS = {"preview": (".png", ".jpg", ".jpeg"), "visualize": (".png", ".jpg", ".jpeg", ".pdf", ".svg")}
MAX_PICTURES = 256  # samples per preview / visualize picture (and W&B image pairs: 64)

# Every numeric field's inclusive range (None = no bound on that side); a float's must also be finite.
# Open lower bounds (lr > 0, lr_gamma > 0) are listed in _OPEN_LOW. None as a value means "unset" and is
# always allowed for the optional fields.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "dataset.size": (DIGIT, 512), "dataset.rotation": (0, 180), "dataset.scale_min": (0, 8),
    "dataset.scale_max": (0, 8), "dataset.corner_std": (0, 64), "dataset.tps_std": (0, 64),
    "dataset.tps_grid": (2, 16), "dataset.clutter": (0, 64), "dataset.clutter_size": (1, DIGIT),
    "dataset.st_output_pool": (1, 8), "dataset.test_seed": (0, 2**63 - 1),
    "dataset.train_limit": (1, MNIST_TRAIN), "dataset.test_limit": (1, MNIST_TEST),
    "dataset.validation": (0, MNIST_TRAIN - 1),
    "model.param_budget": (1, 10**8), "model.fc_units": (1, 1 << 14), "model.conv_filters": (1, 1 << 12),
    "transformer.tps_grid": (2, 16), "transformer.output_size": (1, 512), "transformer.parallel": (1, 16),
    "trainer.iterations": (1, 10**9), "trainer.batch_size": (1, MNIST_TRAIN), "trainer.lr": (0, None),
    "trainer.momentum": (0, 1), "trainer.weight_decay": (0, None), "trainer.lr_step": (1, 10**9),
    "trainer.lr_gamma": (0, 1), "trainer.eval_every": (1, 10**9), "trainer.log_every": (1, 10**9),
    "trainer.checkpoint_every": (1, 10**9), "trainer.eval_batch_size": (1, MNIST_TEST),
    "trainer.stop_after": (1, 10**9), "logger.images": (0, 64),
    "logger.card_draws": (0, MNIST_TEST), "seed": (0, 2**63 - 1),
}  # fmt: skip
_OPEN_LOW = {"dataset.scale_min", "dataset.scale_max", "trainer.lr", "trainer.lr_gamma"}


def _get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _range_errors(cfg: Config) -> list[str]:
    errors = []
    for key in schema_keys():
        value = _get(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{key}={value}: must be a finite number")
            continue
        if key not in RANGES or value is None or isinstance(value, bool):
            continue
        low, high = RANGES[key]
        if key == "trainer.batch_size":  # every step needs a full batch of distinct training digits
            high = cfg.dataset.train_limit or MNIST_TRAIN - cfg.dataset.validation
        too_low = low is not None and (value <= low if key in _OPEN_LOW else value < low)
        if too_low or (high is not None and value > high):
            interval = f"{'(' if key in _OPEN_LOW else '['}{low}, {high}]"
            why = (" (the training digits: dataset.train_limit or 60000 - dataset.validation)"
                   if key == "trainer.batch_size" else "")
            errors.append(f"{key}={value}: outside {interval}{why}; set {key} inside that range")
    return errors


def _name_errors(cfg: Config) -> list[str]:
    errors = []
    names = {"name": cfg.name, "dataset.name": cfg.dataset.name, "logger.project": cfg.logger.project}
    for key, value in names.items():
        if value is not None and (not SAFE_NAME.fullmatch(value) or value in (".", "..")):
            errors.append(f"{key}={value!r}: not a safe folder name; use letters, digits and . _ + = - "
                          f"(no / or spaces, at most 100 characters)")
    for key in ("data_dir", "runs_dir", "run_dir"):
        value = getattr(cfg, key)
        if value is not None and not str(value).strip():
            errors.append(f"{key}={value!r}: empty; give a folder path")
    return errors


def _pairing_errors(cfg: Config) -> list[str]:
    """Names, the model/transformer pairing, and the geometry every layer needs (no model is built)."""
    errors = []
    model, spec, data = cfg.model.name, cfg.transformer, cfg.dataset
    if model not in MODEL_NAMES:
        return [f"model.name={model!r}: not one of {', '.join(MODEL_NAMES)}"]
    if spec.type not in TRANSFORM_TYPES:
        return [f"transformer.type={spec.type!r}: not one of {', '.join(TRANSFORM_TYPES)}"]
    is_st = model.startswith("st_")
    if is_st and spec.type == "none":
        errors.append(f"model={model} needs a spatial transformer: add transformer=affine|projective|tps")
    if not is_st and spec.type != "none":
        errors.append(f"model={model} has no spatial transformer, but transformer={spec.type} was given: "
                      f"use model=st_{model} or drop the transformer override")
    if spec.placement not in ("input", "features"):
        errors.append(f"transformer.placement={spec.placement!r}: not 'input' or 'features'")
    elif spec.placement == "features" and model != "st_cnn":
        errors.append("transformer.placement=features needs model=st_cnn (an FCN has no feature maps)")
    if not is_st:
        unused = {"parallel": spec.parallel != 1, "placement": spec.placement != "input",
                  "output_size": spec.output_size is not None}
        errors += [f"transformer.{key}={getattr(spec, key)!r} is set, but model={model} has no spatial "
                   f"transformer: drop the override" for key, is_set in unused.items() if is_set]
    elif spec.placement == "input":
        side = (spec.output_size or data.size) // data.st_output_pool
        minimum = 21 if model == "st_cnn" else 1  # 9x9 conv -> ceil-pool 2 -> 7x7 conv, unpadded
        if side < minimum:
            errors.append(f"transformer.output_size={spec.output_size}, dataset.st_output_pool="
                          f"{data.st_output_pool}: the classification net gets {side}x{side} inputs, needs at "
                          f"least {minimum}x{minimum}; raise transformer.output_size or lower the pool")
    if is_st and spec.placement == "features" and spec.output_size is not None and spec.output_size < 7:
        errors.append(f"transformer.output_size={spec.output_size}: the CNN's second block (7x7 conv) needs "
                      f"at least 7; raise transformer.output_size")
    return errors


def dataset_problems(cfg: DatasetConfig) -> list[str]:
    """Distortions that fit their canvas (also checked by `stn.data` for configs built in code)."""
    errors = []
    if cfg.scale_min > cfg.scale_max:
        errors.append(f"dataset.scale_min={cfg.scale_min} exceeds dataset.scale_max={cfg.scale_max}: swap them")
    if cfg.corner_std > 0 and cfg.tps_std > 0:
        errors.append(f"dataset.corner_std={cfg.corner_std} and dataset.tps_std={cfg.tps_std} are both set; one "
                      "sampling grid is projective or thin-plate-spline, not both: set one of them to 0")
    if cfg.translate and DIGIT * cfg.scale_max > cfg.size:
        errors.append(f"dataset.scale_max={cfg.scale_max}: a digit of {DIGIT * cfg.scale_max:.1f} px does not fit "
                      f"the canvas dataset.size={cfg.size}; lower dataset.scale_max or raise dataset.size")
    # P readings (fields added with the dataset cards, see stn.cards)
    for key, allowed in (("corner_frame", CORNER_FRAMES), ("corner_direction", CORNER_DIRECTIONS),
                         ("folded", FOLDED_CHOICES)):
        if getattr(cfg, key) not in allowed:
            errors.append(f"dataset.{key}={getattr(cfg, key)!r} is not one of {allowed}")
    if cfg.clutter and cfg.clutter_size > min(DIGIT, cfg.size):
        errors.append(f"dataset.clutter_size={cfg.clutter_size}: must lie in [1, {min(DIGIT, cfg.size)}]")
    return errors


def problems(cfg: Config) -> list[str]:
    """Every reason `cfg` cannot run, one line each naming the key, its value and the fix ([] = it can)."""
    errors = _range_errors(cfg) + _name_errors(cfg) + _pairing_errors(cfg)
    if cfg.logger.mode not in LOGGER_MODES:
        source = f" (WANDB_MODE={os.environ['WANDB_MODE']!r} in the environment)" if os.environ.get("WANDB_MODE") else ""
        errors.append(f"logger.mode={cfg.logger.mode!r}{source}: not one of {', '.join(LOGGER_MODES)}")
    if cfg.trainer.cpu_precision not in CPU_PRECISIONS:
        errors.append(f"trainer.cpu_precision={cfg.trainer.cpu_precision!r} is not one of {CPU_PRECISIONS}")
    if cfg.trainer.schedule not in SCHEDULES:
        errors.append(f"trainer.schedule={cfg.trainer.schedule!r} is not one of {SCHEDULES}")
    if cfg.trainer.nesterov and cfg.trainer.momentum <= 0:
        errors.append("trainer.nesterov=true needs trainer.momentum > 0")
    held, limit = cfg.dataset.validation, cfg.dataset.train_limit
    if held and limit and limit + held > MNIST_TRAIN:
        errors.append(f"dataset.validation={held} with dataset.train_limit={limit}: the two must fit in MNIST's "
                      f"{MNIST_TRAIN} training digits; lower one of them")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.trainer.device):
        errors.append(f"trainer.device={cfg.trainer.device!r}: not one of auto, cpu, cuda, cuda:N")
    if not errors:  # the cross-field checks assume sane ranges
        errors += dataset_problems(cfg.dataset)
    return errors


def validate(cfg: Config) -> Config:
    """`cfg` if it can run, else a ConfigError listing every problem (one line each)."""
    errors = problems(cfg)
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


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


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a plain dict (for saving and for W&B)."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def schema_keys() -> list[str]:
    """Every settable dotted key of `Config`, e.g. 'trainer.iterations', 'seed'."""
    keys = []
    for top in dataclasses.fields(Config):
        section = top.default_factory if top.default_factory is not dataclasses.MISSING else None
        if section is not None and dataclasses.is_dataclass(section):
            keys += [f"{top.name}.{inner.name}" for inner in dataclasses.fields(section)]
        else:
            keys.append(top.name)
    return keys


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


# ------------------------------------------------------------------------------------------ outputs


def folder_problems(key: str, path: str | os.PathLike, label: str | None = None) -> list[str]:
    """[] if `path` is a folder stn may write into (or create); else one line saying why not and the fix.
    `label` names the setting in the message (default `key=path`)."""
    label = label or f"{key}={path}"
    target = Path(path).expanduser()
    probe = target
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe == target and target.exists() and not target.is_dir():
        return [f"{label}: {target} is a file, not a folder; choose a folder path"]
    if not probe.is_dir():
        return [f"{label}: {probe} is a file, so no folder can be made under it; choose another path"]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [f"{label}: {probe} is not writable by this user; choose a folder you can write to"]
    return []


def picture_problems(key: str, path: str | os.PathLike, command: str) -> list[str]:
    """[] if `path` names a picture file `command` can write (a supported suffix, in a writable folder)."""
    formats = PICTURE_FORMATS[command]
    target = Path(path).expanduser()
    if target.suffix.lower() not in formats:
        return [f"{key} {path}: unsupported picture format {target.suffix or '(none)'!r}; end the name with "
                f"{', '.join(formats)}"]
    if target.is_dir():
        return [f"{key} {path}: is a folder; give a file name such as {target / ('picture' + formats[0])}"]
    return folder_problems(key, target.parent, label=f"{key} {path}")


def output_problems(cfg: Config) -> list[str]:
    """Whether the run folder (run_dir, else runs_dir) can be written; checked before anything loads."""
    return folder_problems("run_dir", cfg.run_dir) if cfg.run_dir else folder_problems("runs_dir", cfg.runs_dir)


def schedule_warning(overrides: list[str] | tuple[str, ...], cfg: Config) -> str | None:
    """A loud note when trainer.iterations is overridden without trainer.lr_step: the lr then still drops
    every lr_step steps (absolute, as recorded configs mean it), so the schedule's shape changes."""
    keys = {item.split("=", 1)[0].lstrip("+~") for item in overrides}
    if "trainer.iterations" not in keys or "trainer.lr_step" in keys:
        return None
    trainer = cfg.trainer
    drops = list(range(trainer.lr_step, trainer.iterations, trainer.lr_step))
    where = (f"at step{'s' if len(drops) > 1 else ''} {', '.join(map(str, drops[:6]))}"
             f"{', ...' if len(drops) > 6 else ''}" if drops else "never")
    fractions = ", ".join(f"{d / trainer.iterations:.2g}" for d in drops[:6])
    return (f"note: trainer.iterations={trainer.iterations} with trainer.lr_step={trainer.lr_step} (not overridden): "
            f"the lr drops by trainer.lr_gamma={trainer.lr_gamma} {where}"
            f"{f' (fractions {fractions} of the run)' if drops else ''}. lr_step counts steps, not a fraction of the "
            f"run; to keep the preset's shape, scale trainer.lr_step with trainer.iterations")
