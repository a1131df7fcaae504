"""Typed run configuration: Hydra composes `conf/`, this module validates it once.

Every run is described by a frozen `Config` built from the YAML groups in `conf/` (dataset, model,
transformer, trainer, logger) plus command-line overrides such as `dataset=RTS model=st_cnn
transformer=tps trainer.iterations=2000`. A wrong key, a wrong type or an impossible combination fails
here, at start-up, with a `ConfigError` naming the key, never after an hour of training.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

GROUPS = ("dataset", "model", "transformer", "trainer", "logger")
DATA_DIR_ENV = "STN_DATA_DIR"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending key and the fix."""


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
    tags: list[str] = field(default_factory=list)
    images: int = 8  # input/rectified pairs logged at the end


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


def validate(cfg: Config) -> Config:
    """Checks that need more than types: allowed names and model/transformer pairing."""
    if cfg.model.name not in MODEL_NAMES:
        raise ConfigError(f"model.name={cfg.model.name!r} is not one of {MODEL_NAMES}")
    if cfg.transformer.type not in TRANSFORM_TYPES:
        raise ConfigError(f"transformer.type={cfg.transformer.type!r} is not one of {TRANSFORM_TYPES}")
    is_st = cfg.model.name.startswith("st_")
    if is_st and cfg.transformer.type == "none":
        raise ConfigError(
            f"model={cfg.model.name} needs a spatial transformer: add transformer=affine|projective|tps"
        )
    if not is_st and cfg.transformer.type != "none":
        raise ConfigError(
            f"model={cfg.model.name} has no spatial transformer, but transformer={cfg.transformer.type} "
            f"was given: use model=st_{cfg.model.name} or drop the transformer override"
        )
    if cfg.transformer.placement not in ("input", "features"):
        raise ConfigError(f"transformer.placement={cfg.transformer.placement!r} is not 'input' or 'features'")
    if cfg.transformer.placement == "features" and cfg.model.name != "st_cnn":
        raise ConfigError("transformer.placement=features needs model=st_cnn (an FCN has no feature maps)")
    if cfg.transformer.parallel < 1:
        raise ConfigError(f"transformer.parallel={cfg.transformer.parallel} must be >= 1")
    if cfg.trainer.cpu_precision not in CPU_PRECISIONS:
        raise ConfigError(f"trainer.cpu_precision={cfg.trainer.cpu_precision!r} is not one of {CPU_PRECISIONS}")
    if cfg.logger.mode not in LOGGER_MODES:
        raise ConfigError(f"logger.mode={cfg.logger.mode!r} is not one of {LOGGER_MODES}")
    positive = {
        "trainer.iterations": cfg.trainer.iterations,
        "trainer.batch_size": cfg.trainer.batch_size,
        "trainer.lr_step": cfg.trainer.lr_step,
        "trainer.log_every": cfg.trainer.log_every,
        "trainer.eval_every": cfg.trainer.eval_every,
        "trainer.checkpoint_every": cfg.trainer.checkpoint_every,
        "trainer.eval_batch_size": cfg.trainer.eval_batch_size,
        "dataset.size": cfg.dataset.size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    if cfg.trainer.lr <= 0:
        raise ConfigError(f"trainer.lr={cfg.trainer.lr} must be positive")
    if cfg.trainer.stop_after is not None and cfg.trainer.stop_after <= 0:
        raise ConfigError(f"trainer.stop_after={cfg.trainer.stop_after} must be positive (or null)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.trainer.device):
        raise ConfigError(f"trainer.device={cfg.trainer.device!r} is not one of auto, cpu, cuda, cuda:N")
    if cfg.dataset.size < 28:
        raise ConfigError(f"dataset.size={cfg.dataset.size} is smaller than an MNIST digit (28)")
    if not cfg.dataset.scale_min <= cfg.dataset.scale_max:
        raise ConfigError("dataset.scale_min must not exceed dataset.scale_max")
    # P readings (fields added with the dataset cards, see stn.cards)
    for key, allowed in (("corner_frame", CORNER_FRAMES), ("corner_direction", CORNER_DIRECTIONS),
                         ("folded", FOLDED_CHOICES)):
        if getattr(cfg.dataset, key) not in allowed:
            raise ConfigError(f"dataset.{key}={getattr(cfg.dataset, key)!r} is not one of {allowed}")
    return cfg


def compose(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Compose `conf/config.yaml` with Hydra-style overrides into a validated, frozen `Config`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    # conf/config.yaml lists `stn_schema` first in its defaults, so every typed field exists (and is
    # type-checked) during composition: `dataset.train_limit=100` works although no YAML names it.
    ConfigStore.instance().store(name="stn_schema", node=_writable_schema())
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
