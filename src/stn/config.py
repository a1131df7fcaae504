"""The typed run configuration: the frozen dataclasses every run is described by, and the error classes.

A run is a frozen `Config` (dataset, model, transformer, trainer, logger, plus seed and folders), built by
`stn.compose` from the YAML groups in `conf/` and checked by `stn.validation` before anything loads. This
module is the schema only: fields, their defaults and meaning, the allowed choices, and `to_dict`/`to_yaml`
for saving a config as it ran. `UserError` is the base of every error the user fixes by changing the command
or its inputs (the CLI's exit code 2); `RunError` of failures while running (exit code 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from omegaconf import OmegaConf

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
    # The localisation nets' (and regression layers') learning rate as a multiple of `lr`, through both
    # schedules; 1 is the paper's single rate. Beyond the paper (experiments/rectify/README.md, TC at 1/50).
    loc_lr_scale: float = 1.0
    # Pieces of a training recipe beyond the paper (experiments/recipes/: each is scored on validation digits
    # before it is kept); every default is the paper's, i.e. off.
    warmup: float = 0.3  # onecycle only: the fraction of the run spent rising to the peak lr (OneCycleLR pct_start)
    label_smoothing: float = 0.0  # cross-entropy against (1 - s) one-hot + s / 10 uniform
    grad_clip: float = 0.0  # > 0: scale each step's gradient down to at most this global L2 norm
    # > 0: an exponential moving average of the weights (decay per step), updated after every step; every
    # evaluation (and the recovery metric, the pictures) uses the average, the optimiser the raw weights
    ema_decay: float = 0.0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast, on CUDA only
    # CPU arithmetic: float32 | bf16 (autocast; theta, grids and sampling stay float32) | auto (bf16 where
    # the CPU has bf16 hardware and bf16 speeds the model up there: the CNN, and the ST-CNNs with AMX;
    # else float32; stn.device.resolve_precision). `amp` keeps meaning "CUDA only", so recorded configs keep
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
    # the W&B config (top level) and tags, so a group's dashboard can group by row and column (stn.tables.dashboard).
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
TrainerPreset = Literal["smoke", "quick", "demo", "paper"]  # conf/trainer/*.yaml (tests/test_cli.py checks): --preset
TRAINER_PRESETS: tuple[str, ...] = get_args(TrainerPreset)
# The trainer keys of one SGD update: runs that agree on them can share an optimiser (the batched engine's
# groups), and a resumed run must keep them (stn.runs.IDENTITY).
OPTIMISER_KEYS = ("batch_size", "lr", "momentum", "weight_decay", "lr_step", "lr_gamma")

MNIST_TRAIN, MNIST_TEST = 60_000, 10_000  # digits per MNIST split: the bounds of the limits and the batch
DIGIT = 28  # side of an MNIST digit in pixels


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
