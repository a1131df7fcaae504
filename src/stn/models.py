"""The paper's distorted-MNIST networks (Section 4.1, Appendix A): FCN, CNN, ST-FCN and ST-CNN.

Every model is a `DigitClassifier`: `before` (nothing, or the CNN's first conv block) -> spatial transformers
side by side, outputs concatenated along channels (none for the baselines) -> average pooling by
`dataset.st_output_pool` (RTS, TC: 2; input placement only) -> `after` (the rest of the classification net).

Architectures (ReLU everywhere; the softmax lives in the loss, so forward returns logits (B, 10)):
- FCN: two hidden fully-connected layers of `fc_units` + the classification layer.
- CNN: conv 9x9 -> max-pool 2 -> conv 7x7 -> max-pool 2 -> classification layer, `conv_filters` filters per
  conv, stride 1, no padding. Max-pooling rounds up (ceil mode): RTS's pooled transformer output is 21x21,
  and 21 -> 13 -> 7 -> 1 -> 1 only works with ceil; with floor the 7x7 conv would face a 6x6 map. It changes
  nothing on even-sized maps (28, 60, 30 -> only the last map of 42 and 30 grows by one row/column).
- ST-FCN: ST at the input, localisation net Flatten -> FC 32 -> FC 32 -> regression (three weight layers).
- ST-CNN: ST at the input, localisation net max-pool 2 (the "2x downsampled input") -> conv 5x5x20 ->
  max-pool 2 -> conv 5x5x20 -> FC 20 -> regression.
- transformer.placement=features (ST-CNN only): the transformers act on the feature maps after the first
  conv block (paper Section 4: STs deeper in the network). Their localisation net follows the SVHN one of
  Section 4.2 (two FC layers of 32 units) after a 2x max-pool of the maps, like the input nets' downsampling.
  The sampled feature maps are not pooled (pooling is the paper's rule for the input transformer).
- transformer.parallel=N: N transformers, each with its own localisation net, see the same input; their
  outputs are stacked as N channels (N * channels for features), so the next layer takes N times the channels.

Widths ("approximately the same number of parameters", Appendix A). What the paper gives: FCN 128-256
units, CNN 32-64 filters, "set so the parameter count matches"; the per-dataset widths are not printed.
What we do, per dataset (derived at build time, never written back into the config):
- CNN: 64 filters, the top of the paper's range (its count is then the dataset's reference budget).
- FCN: the integer width closest to the CNN's count, clamped to 128-256. On 28x28 (R, P, E) that is 208
  units and every Table 1 model of the dataset has ~208.6k parameters. On 42x42 and 60x60 the FCN's first
  layer alone outgrows the CNN even at 128 units, so the FCN stays at 128 (RTS 244k, TC 479k vs 229k, 270k).
- ST-FCN / ST-CNN: the classification net's width is the integer whose total (transformers included) is
  closest to its own baseline's count (FCN, resp. CNN) on that dataset.
`model.param_budget` replaces the target; `model.fc_units` / `model.conv_filters` fix the width outright.
The ~400k figure recalled from the appendix is out of reach inside those ranges on 28x28 (CNN at 64 filters:
209k, FCN at 256 units: 269k), so it is not used.

Initialisation: PyTorch's defaults for every layer of every model (Kaiming-uniform weights, a=sqrt(5), and
uniform biases), except the transformers' regression layers (zero weight, identity bias).

Input standardisation: images enter in [0, 1] and the sampler reads them raw, so its zero padding outside the
input is the black background. Every weight layer that reads pixels (the classification net's first layer,
after the transformer and its pooling; the localisation nets) sees them standardised with MNIST's pixel
statistics, (x - 0.1307) / 0.3081. Without it, PyTorch's small default initialisation leaves the FCN on its
initial loss plateau for hundreds of steps (measured: FCN on R after 1200 quick steps, 32.8% test error
raw vs 15.3% standardised). It has no parameters, so the counts above are unchanged.

Speed (build_model(cfg, fast=True), the default): every conv -> ReLU -> max-pool runs as conv -> max-pool ->
ReLU, and the classification net's first conv is an `InputGradConv2d` (stn.fastconv, with its reason). Both
give the same values and gradients as the paper's order with plain nn.Conv2d (fast=False; equal to float rounding, tests/test_bench.py)
and the same state dict; they only make a CPU training step faster (measured: experiments/bench/train.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stn.compose import compose_many
from stn.config import Config, ConfigError, TransformerConfig
from stn.fastconv import InputGradConv2d
from stn.grid import TABLE1_MODELS
from stn.spatial import SpatialTransformer

NUM_CLASSES = 10
FCN_UNITS_RANGE = (128, 256)  # the paper's range for FCN hidden layers
CNN_FILTERS_RANGE = (32, 64)  # the paper's range for CNN conv layers
LOC_FC_UNITS = 32  # ST-FCN (and feature-placement) localisation: hidden units per layer
LOC_CONV_FILTERS = 20  # ST-CNN localisation: filters per conv layer
LOC_CONV_FC_UNITS = 20  # ST-CNN localisation: the fully-connected layer before the regression
# Pixel mean and std of the 60k MNIST training digits in [0, 1] (computed: 0.13066, 0.30811).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MATCH_TOLERANCE = 0.05  # a derived width must land within 5% of its parameter target, or the build fails


@dataclass
class Trace:
    """What the first transformer did to a batch (see `DigitClassifier.trace`)."""

    source: Tensor  # the transformer's input (B, C, H, W): the images, or feature maps for placement=features
    output: Tensor  # its output after the configured pooling (B, C, H'', W'')
    theta: Tensor  # (B, P)
    grid: Tensor  # T_theta(G), normalised source coordinates (B, H', W', 2)


class Standardize(nn.Module):
    """(x - MNIST mean) / MNIST std; parameter-free, so it changes no parameter count."""

    def forward(self, x: Tensor) -> Tensor:
        return (x - MNIST_MEAN) / MNIST_STD


class DigitClassifier(nn.Module):
    """before -> [transformers side by side, channels concatenated] -> avg-pool -> after -> logits (B, 10)."""

    def __init__(
        self,
        name: str,
        before: nn.Module,
        transformers: nn.ModuleList,
        pool: int,
        after: nn.Module,
        widths: dict[str, int],
    ) -> None:
        super().__init__()
        self.name = name
        self.before = before
        self.transformers = transformers
        self.pool = pool
        self.after = after
        self.widths = widths  # the derived classification-net width(s), e.g. {"conv_filters": 62}
        self.standardize = Standardize()
        # With an empty `before`, `after` reads pixels (the images, or their rectified copies); otherwise
        # `before` reads the images and `after` reads feature maps.
        self.after_reads_pixels = isinstance(before, nn.Identity)

    def _pooled(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.pool) if self.pool > 1 else x

    def _stem(self, images: Tensor) -> Tensor:
        """What the transformers (or, without any, `after`) receive: raw pixels, or first-block features."""
        return images if self.after_reads_pixels else self.before(self.standardize(images))

    def forward(self, images: Tensor) -> Tensor:
        x = self._stem(images)
        if len(self.transformers) > 0:
            x = torch.cat([transformer(x) for transformer in self.transformers], dim=1)  # (B, N*C, H', W')
            x = self._pooled(x)
        if self.after_reads_pixels:
            x = self.standardize(x)
        return self.after(x)  # (B, 10)

    def trace(self, images: Tensor) -> Trace:
        """The first transformer's input, output (pooled as in forward), theta and grid."""
        if len(self.transformers) == 0:
            raise ValueError(f"model {self.name!r} has no spatial transformer: use st_fcn or st_cnn")
        source = self._stem(images)
        output, theta, grid = self.transformers[0].transform(source)
        return Trace(source=source, output=self._pooled(output), theta=theta, grid=grid)

    def rectify(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(the first transformer's output, pooled as in forward; its sampling grid (B, H', W', 2))."""
        trace = self.trace(images)
        return trace.output, trace.grid

    def extra_repr(self) -> str:
        return f"name={self.name!r}, pool={self.pool}, widths={self.widths}"


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- building blocks -------------------------------------------------------------------------------


def _conv_side(side: int, kernel: int) -> int:
    return side - kernel + 1  # stride 1, no padding


def _pool_side(side: int, *, ceil: bool) -> int:
    return (side + 1) // 2 if ceil else side // 2  # 2x2 window, stride 2


def fcn_classifier(channels: int, side: int, units: int) -> nn.Sequential:
    """(B, C, side, side) -> FC units -> FC units -> FC 10."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * side * side, units),
        nn.ReLU(),
        nn.Linear(units, units),
        nn.ReLU(),
        nn.Linear(units, NUM_CLASSES),
    )


def conv_relu_pool(channels: int, filters: int, kernel: int, *, ceil: bool, fast: bool,
                   conv: type[nn.Conv2d] = nn.Conv2d) -> list[nn.Module]:
    """conv -> ReLU -> max-pool 2, as [conv, ReLU, pool]; fast=True: [conv, pool, ReLU], the same function.

    max(relu(x)) = relu(max(x)) holds exactly, and so do the gradients: both send each window's gradient to
    its first maximal element, and both zero it where that maximum is <= 0. Pooling first runs the ReLU and
    its backward on a quarter of the elements. Parameterised layers keep their positions (0), so state dicts
    are the same either way.
    """
    pool = nn.MaxPool2d(2, ceil_mode=ceil)
    layer = conv(channels, filters, kernel)
    return [layer, pool, nn.ReLU()] if fast else [layer, nn.ReLU(), pool]


def cnn_first_block(channels: int, filters: int, *, fast: bool = True) -> nn.Sequential:
    """conv 9x9 -> ReLU -> max-pool 2 (ceil); fast: see `conv_relu_pool` and `InputGradConv2d`."""
    conv = InputGradConv2d if fast else nn.Conv2d
    return nn.Sequential(*conv_relu_pool(channels, filters, 9, ceil=True, fast=fast, conv=conv))


def cnn_first_side(side: int) -> int:
    return _pool_side(_conv_side(side, 9), ceil=True)


def cnn_second_block(channels: int, filters: int, side: int, *, fast: bool = True) -> nn.Sequential:
    """(B, C, side, side) -> conv 7x7 -> ReLU -> max-pool 2 (ceil) -> classification layer."""
    last = _pool_side(_conv_side(side, 7), ceil=True)
    return nn.Sequential(
        *conv_relu_pool(channels, filters, 7, ceil=True, fast=fast),
        nn.Flatten(),
        nn.Linear(filters * last * last, NUM_CLASSES),
    )


def fc_localisation(channels: int, side: int, *, downsample: bool) -> tuple[nn.Sequential, int]:
    """[max-pool 2 ->] Flatten -> FC 32 -> FC 32 (+ the regression layer: three weight layers)."""
    layers: list[nn.Module] = []
    if downsample:
        layers.append(nn.MaxPool2d(2))
        side = _pool_side(side, ceil=False)
    layers += [
        nn.Flatten(),
        nn.Linear(channels * side * side, LOC_FC_UNITS),
        nn.ReLU(),
        nn.Linear(LOC_FC_UNITS, LOC_FC_UNITS),
        nn.ReLU(),
    ]
    return nn.Sequential(*layers), LOC_FC_UNITS


def conv_localisation(channels: int, side: int, *, fast: bool = True) -> tuple[nn.Sequential, int]:
    """max-pool 2 -> conv 5x5x20 -> max-pool 2 -> conv 5x5x20 -> FC 20 (+ the regression layer)."""
    last = _conv_side(_pool_side(_conv_side(_pool_side(side, ceil=False), 5), ceil=False), 5)  # >= 1 from 28x28
    net = nn.Sequential(
        nn.MaxPool2d(2),
        *conv_relu_pool(channels, LOC_CONV_FILTERS, 5, ceil=False, fast=fast),
        nn.Conv2d(LOC_CONV_FILTERS, LOC_CONV_FILTERS, 5),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(LOC_CONV_FILTERS * last * last, LOC_CONV_FC_UNITS),
        nn.ReLU(),
    )
    return net, LOC_CONV_FC_UNITS


# ---- assembly --------------------------------------------------------------------------------------


def _family(name: str) -> str:
    return "fcn" if name in ("fcn", "st_fcn") else "cnn"


def _width_key(name: str) -> str:
    return "fc_units" if _family(name) == "fcn" else "conv_filters"


def assemble(cfg: Config, width: int, *, fast: bool = True) -> DigitClassifier:
    """The model of `cfg` with classification-net width `width` (units for FCNs, filters for CNNs).

    fast=False builds the layers as the paper lists them (conv, ReLU, pool; plain nn.Conv2d): the reference
    that the fast layout (`conv_relu_pool`, `InputGradConv2d`) must match; same parameters, same state dict.
    """
    name, size, spec = cfg.model.name, cfg.dataset.size, cfg.transformer
    widths = {_width_key(name): width}
    if name == "fcn":
        return DigitClassifier(
            name, nn.Identity(), nn.ModuleList(), 1, fcn_classifier(1, size, width), widths
        )
    if name == "cnn":
        side = cnn_first_side(size)
        after = nn.Sequential(
            cnn_first_block(1, width, fast=fast), cnn_second_block(width, width, side, fast=fast)
        )
        return DigitClassifier(name, nn.Identity(), nn.ModuleList(), 1, after, widths)

    copies = spec.parallel
    output_size = (spec.output_size, spec.output_size) if spec.output_size else None

    def transformer(localisation: tuple[nn.Module, int], *, reads_pixels: bool = True) -> SpatialTransformer:
        net, features = localisation
        return SpatialTransformer(net, features, spec.type, output_size=output_size, tps_grid=spec.tps_grid,
                                  preprocess=Standardize() if reads_pixels else None)

    if spec.placement == "features":  # st_cnn only (stn.validation)
        before = cnn_first_block(1, width, fast=fast)
        side = cnn_first_side(size)
        transformers = nn.ModuleList(
            transformer(fc_localisation(width, side, downsample=True), reads_pixels=False) for _ in range(copies)
        )
        out_side = spec.output_size or side  # >= 7 (stn.validation checks transformer.output_size)
        after = cnn_second_block(copies * width, width, out_side, fast=fast)
        return DigitClassifier(name, before, transformers, 1, after, widths)

    pool = cfg.dataset.st_output_pool
    side = (spec.output_size or size) // pool
    if name == "st_fcn":
        transformers = nn.ModuleList(
            transformer(fc_localisation(1, size, downsample=False)) for _ in range(copies)
        )
        after: nn.Module = fcn_classifier(copies, side, width)
    else:
        transformers = nn.ModuleList(
            transformer(conv_localisation(1, size, fast=fast)) for _ in range(copies)
        )
        after = nn.Sequential(
            cnn_first_block(copies, width, fast=fast),
            cnn_second_block(width, width, cnn_first_side(side), fast=fast),
        )
    return DigitClassifier(name, nn.Identity(), transformers, pool, after, widths)


def _count(cfg: Config, width: int) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return count_parameters(assemble(cfg, width))


def _closest_width(cfg: Config, target: int, *, limit: int = 1 << 14) -> int:
    """The integer width whose parameter count is closest to `target` (the count grows with the width)."""
    count = _count_polynomial(cfg, limit) or functools.partial(_count, cfg)
    low, high = 1, limit
    while low < high:  # smallest width with count >= target
        mid = (low + high) // 2
        if count(mid) >= target:
            high = mid
        else:
            low = mid + 1
    if low > 1 and target - count(low - 1) <= count(low) - target:
        return low - 1
    return low


def _count_polynomial(cfg: Config, limit: int) -> Callable[[int], int] | None:
    """The parameter count as an exact quadratic in the width, from 3 counts, or None if it is not one.

    Every tensor of these networks has at most two width-sized dimensions (a conv or linear layer from width
    to width), so the count is a polynomial of degree <= 2 in the width; checked at two more widths (a
    polynomial of degree <= 4 that agrees with the quadratic at 5 points is it). The width search then costs
    5 model builds instead of about 30 (each a few ms on meta tensors; `stn models` makes 40 searches).
    """
    c1, c2, c3 = (_count(cfg, width) for width in (1, 2, 3))
    a2 = c3 - 2 * c2 + c1  # 2a: the second difference
    if a2 % 2:
        return None
    a = a2 // 2
    b = c2 - c1 - 3 * a
    c = c1 - a - b

    def count(width: int) -> int:
        return (a * width + b) * width + c

    return count if all(count(w) == _count(cfg, w) for w in (7, limit)) else None


def baseline_config(cfg: Config, name: str) -> Config:
    """`cfg` with the baseline network `name` (fcn | cnn) and no transformer; widths left to the defaults."""
    model = replace(cfg.model, name=name, param_budget=None, fc_units=None, conv_filters=None)
    return replace(cfg, model=model, transformer=TransformerConfig())


def classifier_width(cfg: Config) -> int:
    """The classification net's width for `cfg` (see the module docstring for the rule)."""
    name, model = cfg.model.name, cfg.model
    fixed = model.fc_units if _family(name) == "fcn" else model.conv_filters
    if fixed is not None:
        return fixed
    if model.param_budget is not None:
        target = model.param_budget
    elif name == "cnn":
        return CNN_FILTERS_RANGE[1]
    elif name == "fcn":
        low, high = FCN_UNITS_RANGE
        return min(max(_closest_width(cfg, reference_parameters(cfg)), low), high)
    else:
        target = count_parameters_of(baseline_config(cfg, _family(name)))
    width = _closest_width(cfg, target)
    got = _count(cfg, width)
    if abs(got - target) > MATCH_TOLERANCE * target:
        source = (
            f"model.param_budget={target}" if model.param_budget is not None else f"the baseline's {target}"
        )
        raise ConfigError(
            f"no width of model={name} gets near {source} parameters (closest: {got} at "
            f"{_width_key(name)}={width}); raise model.param_budget or set model.{_width_key(name)}"
        )
    return width


def reference_parameters(cfg: Config) -> int:
    """The dataset's reference budget: the CNN baseline's count (64 filters) on cfg's dataset."""
    return count_parameters_of(baseline_config(cfg, "cnn"))


def count_parameters_of(cfg: Config) -> int:
    """The parameter count of the model `cfg` describes, without allocating it."""
    return _count(cfg, classifier_width(cfg))


def build_model(cfg: Config, *, fast: bool = True) -> DigitClassifier:
    """The network `cfg` describes, initialised (PyTorch defaults; identity regression layers).

    fast=False: the paper's layer order with plain nn.Conv2d, numerically the same model (see `assemble`);
    the throughput benchmark's reference pipeline uses it.
    """
    return assemble(cfg, classifier_width(cfg), fast=fast)


# ---- Table 1's parameter counts ----------------------------------------------------------------------



@dataclass(frozen=True)
class ParameterRow:
    model: str  # Table 1's label, e.g. "ST-CNN TPS"
    dataset: str
    params: int
    width_name: str  # fc_units | conv_filters
    width: int
    target: int  # the count it is matched to: model.param_budget, else its baseline's (a baseline: its own)


def parameter_table(
    datasets: tuple[str, ...] | list[str] = ("R", "RTS", "P", "E", "TC"),
    overrides: tuple[str, ...] | list[str] = (),
) -> list[ParameterRow]:
    """Every Table 1 model on every dataset, composed from conf/ (+ `overrides`), counted on meta tensors."""
    rows = []
    planned = [(dataset, label) for dataset in datasets for label, _ in TABLE1_MODELS]
    configs = compose_many([[f"dataset={dataset}", *choice, *overrides]
                            for dataset in datasets for _, choice in TABLE1_MODELS])
    for (dataset, label), cfg in zip(planned, configs, strict=True):
        width = classifier_width(cfg)
        params = _count(cfg, width)
        name = cfg.model.name
        if cfg.model.param_budget is not None:
            target = cfg.model.param_budget
        elif name in ("fcn", "cnn"):
            target = params
        else:
            target = count_parameters_of(baseline_config(cfg, _family(name)))
        rows.append(ParameterRow(label, dataset, params, _width_key(name), width, target))
    return rows
