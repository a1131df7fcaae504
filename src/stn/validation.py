"""Every validity check of a run's inputs, in one place: ranges, names, pairings, distortions, outputs.

`problems(cfg)` lists every reason a `Config` cannot run, one line each naming the key, its value and the fix
(a value out of its range in `RANGES`, NaN and inf everywhere, an unsafe name, an impossible combination,
a distortion that does not fit its canvas); `validate` raises them as one `ConfigError`. `stn.compose` calls
it on every config it builds, so a bad config fails at start-up, before torch or MNIST load, never after an
hour of training; `check_dataset` runs the distortion checks for dataset configs built in code. The checks of
what a command writes (`output_problems`, `folder_problems`, `picture_problems`) and the note on an overridden
schedule (`schedule_warning`) live here too. Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from stn.config import (
    CORNER_DIRECTIONS,
    CORNER_FRAMES,
    CPU_PRECISIONS,
    DIGIT,
    FOLDED_CHOICES,
    LOGGER_MODES,
    MNIST_TEST,
    MNIST_TRAIN,
    MODEL_NAMES,
    SCHEDULES,
    TRANSFORM_TYPES,
    Config,
    ConfigError,
    DatasetConfig,
    schema_keys,
)

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}")  # a folder name on every OS, no path separator
PICTURE_FORMATS = {"preview": (".png", ".jpg", ".jpeg"), "visualize": (".png", ".jpg", ".jpeg", ".pdf", ".svg")}
CNN_MIN_INPUT = 21  # smallest side the CNN's 9x9 conv -> ceil-pool 2 -> 7x7 conv (unpadded) accepts
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
    "trainer.lr_gamma": (0, 1), "trainer.loc_lr_scale": (0, 1000),
    "trainer.warmup": (0, 1), "trainer.label_smoothing": (0, 0.99), "trainer.grad_clip": (0, 10**6),
    "trainer.ema_decay": (0, 0.999999), "trainer.eval_every": (1, 10**9), "trainer.log_every": (1, 10**9),
    "trainer.checkpoint_every": (1, 10**9), "trainer.eval_batch_size": (1, MNIST_TEST),
    "trainer.stop_after": (1, 10**9), "logger.images": (0, 64),
    "logger.card_draws": (0, MNIST_TEST), "seed": (0, 2**63 - 1),
}  # fmt: skip
_OPEN_LOW = {"dataset.scale_min", "dataset.scale_max", "trainer.lr", "trainer.lr_gamma", "trainer.warmup"}


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
            variable = os.environ.get("STN_DATA_DIR")
            from_env = key == "data_dir" and variable is not None and not variable.strip()
            errors.append(f"{key}={value!r}: empty; give a folder path" if not from_env else
                          f"data_dir={value!r} comes from the environment variable STN_DATA_DIR, which is set but "
                          f"empty: set STN_DATA_DIR to the MNIST folder, or unset it (the default is data/)")
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
        minimum = CNN_MIN_INPUT if model == "st_cnn" else 1
        if side < minimum:
            errors.append(f"transformer.output_size={spec.output_size}, dataset.st_output_pool="
                          f"{data.st_output_pool}: the classification net gets {side}x{side} inputs, needs at "
                          f"least {minimum}x{minimum}; raise transformer.output_size or lower the pool")
    if is_st and spec.placement == "features" and spec.output_size is not None and spec.output_size < 7:
        errors.append(f"transformer.output_size={spec.output_size}: the CNN's second block (7x7 conv) needs "
                      f"at least 7; raise transformer.output_size")
    return errors


def dataset_problems(cfg: DatasetConfig) -> list[str]:
    """Distortions that fit their canvas (`check_dataset` raises them for configs built in code)."""
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
    if cfg.trainer.loc_lr_scale != 1 and not cfg.model.name.startswith("st_"):
        errors.append(f"trainer.loc_lr_scale={cfg.trainer.loc_lr_scale:g}: model={cfg.model.name} has no "
                      "localisation net; drop the override or use an ST model")
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


def check_dataset(cfg: DatasetConfig) -> None:
    """The distortion checks of `dataset_problems` as a ConfigError, for dataset configs built in code."""
    errors = dataset_problems(cfg)
    if errors:
        raise ConfigError(f"dataset {cfg.name}: " + "; ".join(errors))


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


def file_problems(key: str, path: str | os.PathLike, label: str | None = None) -> list[str]:
    """[] if `path` names a file stn may write (or replace): not a folder, not read-only, in a folder it can write
    or create; else one line saying why not. Checked before a command's work, not after it."""
    label = label or f"{key} {path}"
    target = Path(path).expanduser()
    if target.is_dir():
        return [f"{label}: {target} is a folder; give a file name, e.g. {target / 'result.json'}"]
    if target.exists() and not os.access(target, os.W_OK):
        return [f"{label}: {target} is not writable by this user; choose another file"]
    return folder_problems(key, target.parent, label=label)


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
    if "trainer.iterations" not in keys or "trainer.lr_step" in keys or cfg.trainer.schedule == "onecycle":
        return None  # (the one-cycle schedule spans trainer.iterations, whatever it is: nothing to warn about)
    trainer = cfg.trainer
    drops = list(range(trainer.lr_step, trainer.iterations, trainer.lr_step))
    where = (f"at step{'s' if len(drops) > 1 else ''} {', '.join(map(str, drops[:6]))}"
             f"{', ...' if len(drops) > 6 else ''}" if drops else "never")
    fractions = ", ".join(f"{d / trainer.iterations:.2g}" for d in drops[:6])
    return (f"note: trainer.iterations={trainer.iterations} with trainer.lr_step={trainer.lr_step} (not overridden): "
            f"the lr drops by trainer.lr_gamma={trainer.lr_gamma} {where}"
            f"{f' (fractions {fractions} of the run)' if drops else ''}. lr_step counts steps, not a fraction of the "
            f"run; to keep the preset's shape, scale trainer.lr_step with trainer.iterations")
