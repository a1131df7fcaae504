"""The training benchmark and the fast training path: `stn bench` runs and ends with a ratio line per model;
FLOP counts match hand counts; the fast layer layout (pool before ReLU, InputGradConv2d, channels_last) computes
what the paper's layer order computes, to float rounding. Timings are not asserted (they belong in
experiments/bench/train.md)."""

from __future__ import annotations

import platform
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from stn.bench import (
    RATIO_FORMAT,
    TRAIN_MODELS,
    count_step_flops,
    model_flops_per_image,
    nominal_peak,
)
from stn.cli import app
from stn.compose import compose
from stn.data import distort
from stn.distortions import draws_whole_pixels
from stn.fastconv import InputGradConv2d, _ConvFoldInputGrad, fold_patches
from stn.models import build_model, conv_relu_pool
from stn.spatial import SpatialTransformer
from stn.train import cpu_has_bf16
from stn.warp import apply_distortion

runner = CliRunner()
RATIO_LINE = re.compile(r"^(?P<model>.+) ratio: (?P<ratio>\d+\.\d\d)$")


# ---------------------------------------------------------------------------------------- the fast path


def perturbed_pair(cfg, *, channels_last: bool = False) -> tuple[nn.Module, nn.Module]:
    """(fast model, paper-order model) with the same weights; regression weights nudged off zero so the
    localisation nets get gradients too."""
    models = []
    for fast in (True, False):
        torch.manual_seed(0)
        model = build_model(cfg, fast=fast)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, SpatialTransformer):
                    module.regression.weight.copy_(torch.randn(module.regression.weight.shape, generator=generator)
                                                   * 1e-2)
        models.append(model)
    if channels_last:
        models[0] = models[0].to(memory_format=torch.channels_last)
    return models[0], models[1]


def logits_and_grads(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    labels = torch.arange(len(images)) % 10
    model.zero_grad()
    logits = model(images)
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


FAST_CASES = [
    ("dataset=R", "model=cnn"),
    ("dataset=R", "model=st_cnn", "transformer=affine"),
    ("dataset=P", "model=st_cnn", "transformer=projective"),
    ("dataset=E", "model=st_cnn", "transformer=tps"),
    ("dataset=RTS", "model=st_cnn", "transformer=tps"),  # odd maps (21 -> 13 -> 7): ceil-mode pooling
    ("dataset=R", "model=st_cnn", "transformer=affine", "transformer.parallel=2"),  # two-channel first conv
    ("dataset=R", "model=st_cnn", "transformer=affine", "transformer.placement=features"),
]


@pytest.mark.parametrize("overrides", FAST_CASES, ids=lambda case: "-".join(o.split("=")[1] for o in case))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fast_model_computes_what_the_paper_order_computes(overrides, channels_last):
    """The same function and gradients, compared in float64 so the tolerance follows from the arithmetic: the
    paths sum at most ~5k products per output in different orders (each rounding <= 2^-53 relative, so
    <= ~1e-12 apart), while a wrong layer order or gradient would differ at order 1e-2."""
    cfg = compose(list(overrides))
    fast, plain = (model.double() for model in perturbed_pair(cfg, channels_last=channels_last))
    assert list(fast.state_dict()) == list(plain.state_dict())  # checkpoints load into either
    images = torch.rand(6, 1, cfg.dataset.size, cfg.dataset.size, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64)
    fast_logits, fast_grads = logits_and_grads(fast, images)
    plain_logits, plain_grads = logits_and_grads(plain, images)
    if not channels_last:  # same kernels forward, and the layer swap is exact
        assert torch.equal(fast_logits, plain_logits)
    torch.testing.assert_close(fast_logits, plain_logits, rtol=1e-10, atol=1e-10)
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, f"no gradient for {name}"
        scale = grad.abs().max()
        torch.testing.assert_close(fast_grads[name] / scale, grad / scale, rtol=1e-10, atol=1e-10,
                                   msg=lambda text, name=name: f"{name}: {text}")


@pytest.mark.parametrize("ceil", [True, False])
@pytest.mark.parametrize("side", [8, 7])
def test_pool_before_relu_is_exact_with_ties_and_negatives(ceil, side):
    """max(relu(x)) = relu(max(x)), and the gradients too: ties (flat background, zeros) and all-negative windows."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, side, side, generator=generator)
    x[:, :, :3] = 0.25  # a flat positive region: every window there is a tie
    x[:, :, 3:5, :4] = -1.0  # all-negative windows
    x[0, 0, 5:, 5:] = 0.0  # zeros
    grad = torch.randn(3, 4, *(((side + 1) // 2 if ceil else side // 2),) * 2, generator=generator)
    results = []
    for fast in (False, True):
        _, *layers = conv_relu_pool(4, 4, 1, ceil=ceil, fast=fast)  # drop the conv: pool and ReLU only
        inputs = x.clone().requires_grad_()
        out = nn.Sequential(*layers)(inputs)
        out.backward(grad)
        results.append((out.detach(), inputs.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_fold_input_gradient_gradcheck():
    """float64 gradcheck of the matmul + fold input gradient (and the weight/bias gradients), 3 input channels."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(4, 3, 3, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(_ConvFoldInputGrad.apply, (x, weight, bias))


@pytest.mark.parametrize("shape, kernel", [((2, 1, 28, 28), (9, 9)), ((3, 2, 7, 9), (3, 4))])
def test_fold_patches_equals_torch_fold(shape, kernel):
    batch, channels, height, width = shape
    locations = (height - kernel[0] + 1) * (width - kernel[1] + 1)
    columns = torch.randn(batch, channels * kernel[0] * kernel[1], locations, dtype=torch.float64)
    torch.testing.assert_close(fold_patches(columns, torch.Size(shape), kernel),
                               F.fold(columns, (height, width), kernel))


def test_input_grad_conv_under_cpu_autocast_is_plain_conv2d():
    conv = InputGradConv2d(1, 4, 3)
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16 and "Fold" not in out.grad_fn.name()
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_input_grad_conv_matches_conv2d_and_falls_back_without_input_gradient():
    """In float64 (the custom backward is dtype-generic): 81 products per input pixel summed in another
    order stay within ~1e-14; a wrong fold would be off at order 1."""
    torch.manual_seed(0)
    conv = InputGradConv2d(1, 16, 9).double()
    reference = nn.Conv2d(1, 16, 9).double()
    reference.load_state_dict(conv.state_dict())
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    grad = torch.randn(5, 16, 20, 20, dtype=torch.float64)
    outputs = []
    for layer in (conv, reference):
        inputs = x.clone().requires_grad_()
        out = layer(inputs)
        out.backward(grad)
        outputs.append((out.detach(), inputs.grad, layer.weight.grad, layer.bias.grad))
    assert torch.equal(outputs[0][0], outputs[1][0])  # the forward is F.conv2d itself
    for ours, theirs in zip(outputs[0][1:], outputs[1][1:], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    assert "Fold" in conv(x.clone().requires_grad_()).grad_fn.name()
    assert conv(x).grad_fn.name() == "ConvolutionBackward0"  # no input gradient needed: plain nn.Conv2d


def test_training_steps_of_fast_and_paper_models_stay_together():
    """Ten SGD steps of ST-CNN TPS on the CPU (fast layout in channels_last vs paper order): the same weights.

    In float64, so the tolerance follows from the arithmetic, not from one CPU's kernels. The two paths sum
    the same products in different orders (oneDNN's blocking differs between CPUs: in float32 an AMD EPYC
    ended 1.6e-4 apart, an Intel Xeon within 1e-5). Each rounding is at most 2^-53 ~ 1.1e-16 relative; ten
    steps amplified the float32 differences by about 3e3 (1.6e-4 from float32's 6e-8), so float64 paths
    that compute the same function stay within ~1e-12. 1e-9 leaves a thousandfold margin while a real
    difference between the layouts (a wrong gradient: order 1e-3 after one step) still fails.
    """
    cfg = compose(["dataset=E", "model=st_cnn", "transformer=tps"])
    fast, plain = (model.double() for model in perturbed_pair(cfg, channels_last=True))
    initial = {name: p.detach().clone() for name, p in plain.named_parameters()}
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (fast, plain)]
    generator = torch.Generator().manual_seed(3)
    for _ in range(10):
        images = torch.rand(16, 1, 28, 28, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 10, (16,), generator=generator)
        for model, optimizer in zip((fast, plain), optimizers, strict=True):
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    moved = 0.0
    for (name, ours), theirs in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9, msg=lambda text, name=name: f"{name}: {text}")
        moved = max(moved, float((ours.detach() - initial[name]).abs().max()))
    assert moved > 1e-4  # the steps changed the weights far beyond the tolerance: the comparison is not vacuous


KEPT_MEMORY = """
import sys, torch
from stn.train import keep_freed_memory
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096
if sys.argv[1] == 'keep':
    assert keep_freed_memory()
base = rss(); block = torch.ones(16 << 20); peak = rss(); del block; after = rss()
print(peak - base, after - base)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc only")
def test_keep_freed_memory_keeps_a_freed_block_resident():
    """A 64 MiB tensor: glibc serves it with mmap and returns it to the kernel on free (resident memory falls
    back), unless keep_freed_memory made the heap serve and keep it. Fresh processes: the setting is global."""
    held = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", KEPT_MEMORY, mode], capture_output=True, text=True, check=True)
        grown, kept = map(int, out.stdout.split())
        assert grown >= 60 << 20  # the block was touched: 64 MiB resident
        held[mode] = kept / grown
    assert held["default"] < 0.1 and held["keep"] > 0.9, held


@pytest.mark.parametrize("dataset", ["plain", "R", "RTS", "P", "E", "TC"])
def test_distort_without_reading_tensors_back_gives_the_same_images(dataset):
    """distort decides 'whole-pixel paste or sampler' from the config (no host-device sync on CUDA); the
    inspecting path (whole_pixel=None) must give the same images."""
    cfg = compose([f"dataset={dataset}"]).dataset
    generator = torch.Generator().manual_seed(0)
    digits = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8, generator=generator)
    images, params = distort(digits, cfg, torch.Generator().manual_seed(1), digits)
    inspected = apply_distortion(digits, params, cfg.size, digits, cfg.clutter_size, whole_pixel=None)
    assert draws_whole_pixels(cfg) == (dataset in ("plain", "TC"))
    assert torch.equal(images, inspected)


# ------------------------------------------------------------------------------------------------ FLOPs


def test_flop_count_of_a_tiny_model_equals_the_hand_count():
    """conv 1->2 3x3 on 5x5 (3x3 out) -> Linear 18 -> 10. Multiply-adds per image: conv forward 3*3*2*9 = 162,
    its weight gradient 162 (no input gradient: the images need none); Linear forward 180, weight gradient 180,
    input gradient 180 (the conv needs it). 864 multiply-adds = 1728 FLOPs per image."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 10))
    batch = 3
    flops = count_step_flops(model, torch.rand(batch, 1, 5, 5), torch.arange(batch))
    assert flops == 1728 * batch


def test_flop_count_of_the_fcn_equals_the_hand_count():
    """FCN on R, 208 units: forward 784*208 + 208*208 + 208*10 multiply-adds, weight gradients the same again,
    input gradients of the last two layers only (the images need none)."""
    cfg = compose(["dataset=R", "model=fcn"])
    units = build_model(cfg).widths["fc_units"]
    forward = 784 * units + units * units + units * 10
    expected = 2 * (2 * forward + units * units + units * 10)
    assert model_flops_per_image(cfg) == expected


def test_fast_and_paper_models_count_the_same_flops():
    cfg = compose(["dataset=R", "model=st_cnn", "transformer=affine"])
    fast, plain = perturbed_pair(cfg)
    images, labels = torch.rand(2, 1, 28, 28), torch.arange(2)
    assert count_step_flops(fast, images, labels) == count_step_flops(plain, images, labels)


def test_nominal_peaks_by_device_name():
    assert nominal_peak("NVIDIA H100 80GB HBM3") == (989.0, 67.0)
    assert nominal_peak("NVIDIA H100 PCIe") == (756.0, 51.0)
    assert nominal_peak("NVIDIA A100-SXM4-80GB") == (312.0, 19.5)
    assert nominal_peak("Some Future GPU") is None


# -------------------------------------------------------------------------------------------------- CLI


def test_stn_bench_tiny_run_ends_with_a_ratio_line_per_model(data_dir):
    result = runner.invoke(app, [
        "bench", "--models", "cnn,st_cnn_aff", "--rounds", "1", "--steps", "1", "--warmup", "1", "--min-turn", "0",
        "--batch-size", "8", "--workers", "0", "--threads", "1", "--device", "cpu",
        "--override", f"data_dir={data_dir}", "--override", "dataset.train_limit=256",
    ])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    # float32 ratio lines, then (only on a CPU with bf16 hardware) one bf16 ratio line per model
    expected = ["CNN", "ST-CNN Aff"] + (["CNN bf16", "ST-CNN Aff bf16"] if cpu_has_bf16() else [])
    ratios = [RATIO_LINE.match(line) for line in lines[-len(expected):]]
    assert all(ratios), lines[-len(expected):]
    assert [match["model"] for match in ratios] == expected
    assert all(float(match["ratio"]) > 0 for match in ratios)
    assert ("bf16 hardware yes" if cpu_has_bf16() else "bf16 hardware no") in result.output
    assert "measured bf16 matmul" in result.output
    rows = [line for line in lines if line.startswith("| CNN ") or line.startswith("| ST-CNN Aff ")]
    assert len(rows) == 2
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        flops, ours, reference = (float(cell.replace(",", "")) for cell in cells[1:4])
        assert flops > 0 and ours > 0 and reference > 0
    assert "measured matmul peak" in result.output and "load average" in result.output


def test_ratio_format_is_the_documented_one():
    assert RATIO_FORMAT.format(model="CNN", ratio=3.104) == "CNN ratio: 3.10"
    assert [label for label, _ in TRAIN_MODELS] == ["FCN", "CNN", "ST-CNN Aff", "ST-CNN Proj", "ST-CNN TPS"]


def test_stn_bench_rejects_unknown_models():
    result = runner.invoke(app, ["bench", "--models", "cnn,resnet"])
    assert result.exit_code == 2
    assert "resnet" in result.output and "st_cnn_tps" in result.output and "Traceback" not in result.output


def test_stn_bench_help_documents_every_option():
    """Every option the bench command declares (click's own list) is on its help screen, with the subcommand."""
    import typer.main

    command = typer.main.get_command(app).commands["bench"]
    result = runner.invoke(app, ["bench", "--help"], terminal_width=200)
    assert result.exit_code == 0
    options = [opt for param in command.params for opt in param.opts if opt.startswith("--")]
    assert len(options) >= 10 and all(opt in result.output for opt in options), options
    assert "data" in command.commands and "│ data " in result.output
