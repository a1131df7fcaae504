"""The paper's distorted-MNIST networks (Section 4.1, Appendix A): FCN, CNN, ST-FCN and ST-CNN.

Every model is a `DigitClassifier`: `before` (nothing, or the CNN's first conv block) -> spatial transformers
side by side, outputs concatenated along channels (none for the baselines) -> average pooling by
`dataset.st_output_pool` (input placement only) -> `after` (the rest of the classification net); forward
returns logits. The layers, the widths matched to a parameter budget, the initialisation and the input
standardisation, with the paper's words and our choices: README "Models" and experiments/models/README.md.
Two things only the code shows: max-pooling rounds up (ceil mode), because RTS's pooled 21x21 transformer
output goes 21 -> 13 -> 7 -> 1 only with ceil (it changes nothing on even-sized maps); and widths are derived
at build time (`classifier_width`), never written back into the config.

Speed (build_model(cfg, fast=True), the default): every conv -> ReLU -> max-pool runs as conv -> max-pool ->
ReLU, and the classification net's first conv is an `InputGradConv2d` (stn.fastconv, with its reason). Both
give the same values and gradients as the paper's order with plain nn.Conv2d (fast=False; equal to float
rounding, tests/test_fastconv.py) and the same state dict; they only make a CPU training step faster
(measured: experiments/bench/train.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stn.config import Config, ConfigError, TransformerConfig
from stn.fastconv import InputGradConv2d
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


def model_family(name: str) -> str:
    return "fcn" if name in ("fcn", "st_fcn") else "cnn"


def width_key(name: str) -> str:
    return "fc_units" if model_family(name) == "fcn" else "conv_filters"


def assemble(cfg: Config, width: int, *, fast: bool = True) -> DigitClassifier:
    """The model of `cfg` with classification-net width `width` (units for FCNs, filters for CNNs).

    fast=False builds the layers as the paper lists them (conv, ReLU, pool; plain nn.Conv2d): the reference
    that the fast layout (`conv_relu_pool`, `InputGradConv2d`) must match; same parameters, same state dict.
    """
    name, size, spec = cfg.model.name, cfg.dataset.size, cfg.transformer
    widths = {width_key(name): width}
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


def count_at_width(cfg: Config, width: int) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return count_parameters(assemble(cfg, width))


def _closest_width(cfg: Config, target: int, *, limit: int = 1 << 14) -> int:
    """The integer width whose parameter count is closest to `target` (the count grows with the width)."""
    count = _count_polynomial(cfg, limit) or functools.partial(count_at_width, cfg)
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
    c1, c2, c3 = (count_at_width(cfg, width) for width in (1, 2, 3))
    a2 = c3 - 2 * c2 + c1  # 2a: the second difference
    if a2 % 2:
        return None
    a = a2 // 2
    b = c2 - c1 - 3 * a
    c = c1 - a - b

    def count(width: int) -> int:
        return (a * width + b) * width + c

    return count if all(count(w) == count_at_width(cfg, w) for w in (7, limit)) else None


def baseline_config(cfg: Config, name: str) -> Config:
    """`cfg` with the baseline network `name` (fcn | cnn) and no transformer; widths left to the defaults."""
    model = replace(cfg.model, name=name, param_budget=None, fc_units=None, conv_filters=None)
    return replace(cfg, model=model, transformer=TransformerConfig())


def classifier_width(cfg: Config) -> int:
    """The classification net's width for `cfg` (see the module docstring for the rule)."""
    name, model = cfg.model.name, cfg.model
    fixed = model.fc_units if model_family(name) == "fcn" else model.conv_filters
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
        target = count_parameters_of(baseline_config(cfg, model_family(name)))
    width = _closest_width(cfg, target)
    got = count_at_width(cfg, width)
    if abs(got - target) > MATCH_TOLERANCE * target:
        source = (
            f"model.param_budget={target}" if model.param_budget is not None else f"the baseline's {target}"
        )
        raise ConfigError(
            f"no width of model={name} gets near {source} parameters (closest: {got} at "
            f"{width_key(name)}={width}); raise model.param_budget or set model.{width_key(name)}"
        )
    return width


def reference_parameters(cfg: Config) -> int:
    """The dataset's reference budget: the CNN baseline's count (64 filters) on cfg's dataset."""
    return count_parameters_of(baseline_config(cfg, "cnn"))


def count_parameters_of(cfg: Config) -> int:
    """The parameter count of the model `cfg` describes, without allocating it."""
    return count_at_width(cfg, classifier_width(cfg))


def build_model(cfg: Config, *, fast: bool = True) -> DigitClassifier:
    """The network `cfg` describes, initialised (PyTorch defaults; identity regression layers).

    fast=False: the paper's layer order with plain nn.Conv2d, numerically the same model (see `assemble`);
    the throughput benchmark's reference pipeline uses it.
    """
    return assemble(cfg, classifier_width(cfg), fast=fast)
