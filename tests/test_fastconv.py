"""The fast training path (stn.fastconv and the fast layer layout of stn.models): pool before ReLU,
InputGradConv2d and channels_last compute what the paper's layer order computes, to float rounding, and
count the same FLOPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stn.compose import compose
from stn.fastconv import InputGradConv2d, _ConvFoldInputGrad, fold_patches
from stn.measure import count_step_flops
from stn.models import build_model, conv_relu_pool
from stn.spatial import SpatialTransformer


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


def test_fast_and_paper_models_count_the_same_flops():
    cfg = compose(["dataset=R", "model=st_cnn", "transformer=affine"])
    fast, plain = perturbed_pair(cfg)
    images, labels = torch.rand(2, 1, 28, 28), torch.arange(2)
    assert count_step_flops(fast, images, labels) == count_step_flops(plain, images, labels)
