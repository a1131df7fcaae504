"""Draw what a trained spatial transformer does, like the paper's Table 1 (right).

For each test digit: the transformer's input with the sampling grid T_theta(G) drawn over it (in input pixel
coordinates, via `spatial.norm_to_pixel`; the thick line is the sampled region's outer edge, the thin ones
every few grid rows and columns through the sampling points), and below it the transformer's output
(pooled as the classifier sees it), titled with the label and the model's prediction. For
transformer.placement=features the "input" is the feature maps after the first conv block, drawn as their
mean over channels.

`draw_transformations(model, images, labels, out)` takes any batch; `render_checkpoint(path, out)` loads
a training checkpoint once (`stn.checkpoints.load_model`), draws the first digits of the configured fixed test set
and measures the model's distortion recovery (`stn.recovery`) for the title (`stn visualize --wandb` logs it). `overlay_grid` draws
the same T(G) lines into an enlarged image with PIL (the W&B sample images of `stn.panels`). `preview(cfg, out)` draws a grid of a dataset's
samples with their labels (`stn data preview`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stn.checkpoints import load_model
from stn.config import DATA_DIR_ENV, Config
from stn.models import DigitClassifier
from stn.spatial import norm_to_pixel

GRID_LINES = 7  # grid rows/columns drawn inside the outline
TILE_INCHES = 1.7


def _image(tensor: Tensor) -> Any:
    """(C, H, W) -> (H, W) numpy array to show: the only channel, or the mean over channels."""
    return tensor.float().mean(0).cpu().numpy()


def _to_edges(values: Any) -> Any:
    """(H', W') coordinates of pixel centres -> (H'+2, W'+2), extended by half a pixel step on every side
    (linear extrapolation: exact for affine maps), so the outline is the sampled region's outer edge."""
    import numpy as np

    for axis in (0, 1):
        if values.shape[axis] < 2:
            continue
        first, second = np.take(values, [0], axis), np.take(values, [1], axis)
        last, before = np.take(values, [-1], axis), np.take(values, [-2], axis)
        values = np.concatenate([1.5 * first - 0.5 * second, values, 1.5 * last - 0.5 * before], axis=axis)
    return values


def grid_lines(grid: Tensor, height: int, width: int) -> tuple[list[tuple[Any, Any]], tuple[Any, Any], Any, Any]:
    """T(G) (H', W', 2), normalised, as polylines in input pixel coordinates (pixel centres at integers):
    (the thin lines, every few grid rows and columns; the outline of the sampled region's outer edge; the
    edge-extended xs and ys, whose extent is the region's). Shared by the matplotlib figure and the PIL
    overlay of the W&B images, so both draw the same lines."""
    xs = norm_to_pixel(grid[..., 0].double(), width).cpu().numpy()  # (H', W') source pixel coordinates
    ys = norm_to_pixel(grid[..., 1].double(), height).cpu().numpy()
    rows, cols = xs.shape
    lines = [(xs[r], ys[r]) for r in sorted({round(i * (rows - 1) / (GRID_LINES + 1))
                                             for i in range(1, GRID_LINES + 1)})]
    lines += [(xs[:, c], ys[:, c]) for c in sorted({round(i * (cols - 1) / (GRID_LINES + 1))
                                                    for i in range(1, GRID_LINES + 1)})]
    ex, ey = _to_edges(xs), _to_edges(ys)
    outline_x = [*ex[0], *ex[:, -1], *ex[-1, ::-1], *ex[::-1, 0]]
    outline_y = [*ey[0], *ey[:, -1], *ey[-1, ::-1], *ey[::-1, 0]]
    return lines, (outline_x, outline_y), ex, ey


def _draw_grid(ax: Any, grid: Tensor, height: int, width: int) -> None:
    """Draw grid (H', W', 2), normalised, over an image of height x width pixels."""
    lines, (outline_x, outline_y), ex, ey = grid_lines(grid, height, width)
    for xs, ys in lines:
        ax.plot(xs, ys, color="tab:orange", linewidth=0.5, alpha=0.8)
    ax.plot(outline_x, outline_y, color="tab:red", linewidth=1.2)

    # Show the whole sampled region, even where it leaves the image (the sampler reads zeros there).
    # Limits: the image's own edges, pushed out (plus half a pixel) only where the region crosses them.
    def limits(values: Any, size: int) -> tuple[float, float]:
        low, high = float(values.min()), float(values.max())
        slack = 1e-3  # float rounding of an outline that sits exactly on the image edge
        return (-0.5 if low >= -0.5 - slack else low - 0.5), (
            size - 0.5 if high <= size - 0.5 + slack else high + 0.5
        )

    x_low, x_high = limits(ex, width)
    y_low, y_high = limits(ey, height)
    ax.set_xlim(x_low, x_high)
    ax.set_ylim(y_high, y_low)  # image rows grow downwards


OUTLINE_RGB = (214, 39, 40)  # matplotlib's tab:red and tab:orange, as in the figure
LINE_RGB = (255, 127, 14)


def overlay_grid(image: Tensor, grid: Tensor, zoom: int) -> Any:
    """(H, W) image in [0, 1] enlarged `zoom` times (pixel repetition) as an RGB uint8 array (zH, zW, 3),
    with T(G) (grid (H', W', 2), normalised) drawn over it as in `draw_transformations`: thin orange grid
    lines, the red outline of the sampled region. Lines leaving the image are clipped (the W&B images keep
    the input's frame). Pixel centre p of the input lies at (p + 0.5) * zoom - 0.5 in the enlarged image."""
    import numpy as np
    from PIL import Image, ImageDraw

    height, width = image.shape
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    canvas = Image.fromarray(pixels, mode="L").resize((width * zoom, height * zoom), Image.NEAREST).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    lines, outline, _, _ = grid_lines(grid, height, width)

    def scaled(xs: Any, ys: Any) -> list[tuple[float, float]]:
        return [((x + 0.5) * zoom - 0.5, (y + 0.5) * zoom - 0.5) for x, y in zip(xs, ys, strict=True)]

    for xs, ys in lines:
        draw.line(scaled(xs, ys), fill=LINE_RGB, width=1)
    draw.line(scaled(*outline), fill=OUTLINE_RGB, width=max(1, zoom // 2))
    return np.asarray(canvas)


def draw_transformations(
    model: DigitClassifier, images: Tensor, labels: Tensor, out: str | os.PathLike, *, title: str = ""
) -> Path:
    """Write a PNG: per digit, the input with T_theta(G) over it, and the transformer's output below."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    if images.ndim != 4 or len(images) == 0 or len(images) != len(labels):
        raise ValueError(
            f"images must be (B, C, H, W) with B = len(labels) >= 1, got {tuple(images.shape)} "
            f"and {len(labels)} labels"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        images = images.to(device)
        trace = model.trace(images)
        predictions = model(images).argmax(dim=1).cpu()
    model.train(was_training)
    count = len(images)
    height, width = trace.source.shape[-2:]
    figure = Figure(figsize=(TILE_INCHES * count, TILE_INCHES * 2 + 0.6 + 0.2 * title.count("\n")), dpi=100)
    axes = figure.subplots(2, count, squeeze=False)
    source_name = "input" if trace.source.shape[1] == images.shape[1] else "feature maps (mean)"
    for i in range(count):
        top, bottom = axes[0, i], axes[1, i]
        top.set_facecolor("0.85")  # grey: outside the input, where the sampler reads zeros
        top.imshow(_image(trace.source[i]), cmap="gray", interpolation="nearest")
        _draw_grid(top, trace.grid[i], height, width)
        bottom.imshow(_image(trace.output[i]), cmap="gray", interpolation="nearest")
        label, predicted = int(labels[i]), int(predictions[i])
        top.set_title(
            f"label {label} / pred {predicted}", fontsize=8, color="black" if label == predicted else "red"
        )
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel(f"{source_name} + T(G)", fontsize=8)
    axes[1, 0].set_ylabel("transformer output", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    return out


RECOVERY_DIGITS = 1000  # test digits `stn visualize` measures the distortion recovery on (stn.recovery)


@dataclasses.dataclass
class Rendered:
    """What `render_checkpoint` drew: the file, its title, the recovery measured for the model shown."""

    path: Path
    title: str
    config: Config
    recovery: dict[str, Any]  # stn.recovery.recovery_summary ({} when not measured)
    recovery_flat: dict[str, Any]  # its headline as flat recovery/* keys (stn.recovery.flat_summary)
    recovery_text: str  # one line: the headline after, and with the identity transformer
    wandb_id: str | None  # the training's W&B run id, kept in its checkpoint (None: W&B was off)


def render_checkpoint(
    path: str | os.PathLike, out: str | os.PathLike, *, count: int = 8, data_dir: str | None = None,
    recovery_digits: int = RECOVERY_DIGITS, recovery_flat: dict[str, Any] | None = None,
) -> Rendered:
    """Draw the first `count` digits of the checkpoint's fixed test set, with the distortion recovery
    (stn.recovery: the spread of the composition of the transformer's map with each digit's true distortion)
    measured on its first `recovery_digits` (0: not measured) and shown in the figure's title. MNIST is read
    from `data_dir`, else $STN_DATA_DIR, else the data_dir saved in the checkpoint's config. `recovery_flat`
    (a run summary's recovery/* keys, measured on its whole test set) is shown instead of measuring again."""
    from stn.data import make_test_set
    from stn.mnist import load_mnist
    from stn.recovery import flat_summary, headline_line, recovery_summary

    if count < 1:
        raise ValueError(f"count={count} must be at least 1")
    if recovery_digits < 0:
        raise ValueError(f"recovery_digits={recovery_digits} must be 0 or more")
    model, cfg, state = load_model(path, need_transformer=True)
    root = data_dir or os.environ.get(DATA_DIR_ENV) or cfg.data_dir
    digits, labels = load_mnist(root, train=False, download=cfg.download)
    # With test_limit=n the test set is the first n samples of the full one: the digits evaluation scored.
    test_set = make_test_set(digits, labels, dataclasses.replace(cfg.dataset, test_limit=max(count, recovery_digits)))
    spec = cfg.transformer
    title = (
        f"{cfg.run_name}: {cfg.model.name} {spec.type} on {cfg.dataset.name} "
        f"(placement={spec.placement}, parallel={spec.parallel}; first transformer shown)"
    )
    recovery: dict[str, Any] = {}
    flat: dict[str, Any] = {}
    text = ""
    if recovery_flat:
        flat = {key: value for key, value in recovery_flat.items() if key.startswith("recovery/")}
        text = f"recovery on the run's test set: {headline_line(flat)}"
        title += "\n" + text
    elif recovery_digits:
        measured = test_set if recovery_digits >= count else make_test_set(
            digits, labels, dataclasses.replace(cfg.dataset, test_limit=recovery_digits))
        try:
            recovery = recovery_summary(model, measured, cfg)
        except Exception as err:  # noqa: BLE001 - a metric must not cost the picture
            text = f"recovery not measured ({type(err).__name__}: {err})"[:200]
        else:
            flat = flat_summary(recovery)
            text = (f"recovery on {recovery['samples']} test digits: {headline_line(flat)}" if flat
                    else f"recovery: all {recovery['samples']} digits lost (the output never shows the digit's frame)")
        title += "\n" + text
    drawn = draw_transformations(model, test_set.images[:count], test_set.labels[:count], out, title=title)
    return Rendered(path=drawn, title=title, config=cfg, recovery=recovery, recovery_flat=flat,
                    recovery_text=text, wandb_id=state.get("wandb_id"))


# ---------------------------------------------------------------------------------------- dataset previews

PREVIEW_TILE = 112  # target tile side in pixels; digits are upscaled by round(PREVIEW_TILE / S)
PREVIEW_LABEL = 22  # height of the label strip under each tile
PREVIEW_GAP = 6
PREVIEW_HEADER = 30


def preview_layout(size: int, count: int) -> tuple[int, int, int, int]:
    """(zoom, columns, rows, tile) of a preview grid of `count` S x S samples."""
    zoom = max(1, round(PREVIEW_TILE / size))
    columns = math.ceil(math.sqrt(count))
    return zoom, columns, math.ceil(count / columns), size * zoom


def draw_grid(images: Tensor, labels: Tensor, title: str) -> Any:
    """A PIL image: samples upscaled (nearest, so pixels stay visible), framed, each label drawn below it."""
    from PIL import Image, ImageDraw, ImageFont

    count, size = len(images), images.shape[-1]
    zoom, columns, rows, tile = preview_layout(size, count)
    width = columns * (tile + PREVIEW_GAP) + PREVIEW_GAP
    height = PREVIEW_HEADER + rows * (tile + PREVIEW_LABEL + PREVIEW_GAP) + PREVIEW_GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=16)
    draw.text((PREVIEW_GAP, 6), title, fill=(0, 0, 0), font=font)
    pixels = (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    for i in range(count):
        row, col = divmod(i, columns)
        x = PREVIEW_GAP + col * (tile + PREVIEW_GAP)
        y = PREVIEW_HEADER + row * (tile + PREVIEW_LABEL + PREVIEW_GAP)
        digit = Image.fromarray(pixels[i], mode="L").resize((tile, tile), Image.NEAREST)
        canvas.paste(digit.convert("RGB"), (x, y))
        draw.rectangle((x - 1, y - 1, x + tile, y + tile), outline=(150, 150, 150))  # the canvas edge
        draw.text((x + tile // 2, y + tile + PREVIEW_LABEL // 2), str(int(labels[i])), fill=(200, 0, 0),
                  font=font, anchor="mm")
    return canvas


def preview(cfg: Config, out: Path, count: int = 64, split: str = "test") -> Path:
    """Write a PNG grid of `count` distorted samples of `split` (test: the fixed test set; train: a first batch)."""
    if split not in ("test", "train"):
        raise ValueError(f"split={split!r}: expected 'test' or 'train'")
    if count <= 0:
        raise ValueError(f"count={count} must be positive")
    from stn.data import TrainStream, make_test_set
    from stn.mnist import load_mnist

    dataset = cfg.dataset
    digits, labels = load_mnist(cfg.data_dir, train=split == "train", download=cfg.download)
    if split == "test":
        test_set = make_test_set(digits, labels, dataclasses.replace(dataset, test_limit=count))
        images, shown = test_set.images, test_set.labels
    else:
        stream = TrainStream(digits, labels, dataclasses.replace(dataset, fixed_train=False), count, cfg.seed)
        images, shown = stream.next()
    title = f"{dataset.name}: {len(images)} {split} samples, {dataset.size}x{dataset.size}"
    title += f" (test_seed {dataset.test_seed})" if split == "test" else f" (seed {cfg.seed}, epoch 0)"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_grid(images, shown, title).save(out)
    return out
