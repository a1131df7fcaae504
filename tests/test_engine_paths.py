"""The batched engine's three paths (vmap, loop, im2col) against `stn train`'s single-model step, and the rule
that picks one per group (`stn.engine.conv_paths.conv_path_for`).

Every path, every Table 1 kind, every canvas (R 28 px, RTS 42 px, TC 60 px): K = 2 models trained a few SGD
steps in float64 must hold the weights `stn train`'s own pieces give each model alone (vmap and loop on R are
tests/test_batched.py's, not repeated here). Tolerances are
tests/test_batched.py's (RTOL = 1e-9 of each tensor's largest entry: a float64 reduction of n <= 2e4 terms,
the largest here being the TC conv's weight gradient over 8 * 52 * 52 = 21632 pixels, is exact to ~5e-12;
losses are float32 means of equal float32 values, rel 1e-6). Its pooling-tie caveat holds here too: where a
max-pool's input gradient reaches the sampling grid (the ST-CNNs' classification nets), a path that sums in
another order than oneDNN's convolution (vmap's grouped conv, im2col's matmul) may send a near-tie's gradient
to the window's other element, an equally valid subgradient. So the ST-CNNs run on real data through "loop"
(the same kernels as `stn train`) and on tie-free noise images through "vmap" and "im2col".
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from engine_setup import CPU, KINDS, configs
from stn.compose import compose
from stn.engine.batched import BatchedModels
from stn.engine.conv_paths import IM2COL_PATCH_LIMIT, conv_path_for, im2col_patch_bytes, options_for_mode
from stn.engine.im2col import PoolRelu
from stn.engine.options import EngineOptions
from stn.engine.streams import BatchedStream
from stn.step import build_optimizer, build_scheduler, prepare_model
from test_batched import assert_same_weights, batched_losses, reference_runs

STEPS = 3  # with lr_step=2 the rate changes once; weight decay and momentum act from step 2
SEEDS = (0, 1)
CANVASES = {"R": 28, "RTS": 42, "TC": 60}
PATHS = ("vmap", "loop", "im2col")
ST_CNNS = ("ST-CNN Aff", "ST-CNN Proj", "ST-CNN TPS")


def _real_data_cases():
    for dataset in CANVASES:
        for label in KINDS:
            for path in PATHS:
                if label in ST_CNNS and path != "loop":
                    continue  # the pooling-tie caveat: these run on noise below
                if dataset == "R" and path != "im2col":
                    continue  # tests/test_batched.py runs vmap and loop on R (5 steps, 3 seeds)
                yield pytest.param(path, label, dataset, id=f"{path}-{label}-{dataset}")


_REFERENCES: dict[tuple[str, str], tuple] = {}  # (kind, dataset) -> reference_runs: computed once for all paths


@pytest.mark.parametrize(("path", "label", "dataset"), list(_real_data_cases()))
def test_path_equals_stn_train_on_real_data(path, label, dataset, mnist) -> None:
    cfgs = configs(KINDS[label], datasets=(dataset,), seeds=SEEDS)
    assert cfgs[0].dataset.size == CANVASES[dataset]
    engine = BatchedModels(cfgs, CPU, EngineOptions(dtype=torch.float64, mode=path))
    mine = batched_losses(engine, BatchedStream(cfgs, *mnist, CPU), STEPS)
    if (label, dataset) not in _REFERENCES:
        _REFERENCES[label, dataset] = reference_runs(cfgs, mnist, STEPS)
    models, theirs = _REFERENCES[label, dataset]
    assert_same_weights(engine, models)
    for a, b in zip(mine, theirs, strict=True):
        assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize(("path", "dataset"), [("im2col", "R"), ("vmap", "RTS"), ("im2col", "RTS"), ("vmap", "TC"),
                                               ("im2col", "TC")])  # vmap on R: tests/test_batched.py
@pytest.mark.parametrize("label", ST_CNNS)
def test_st_cnn_path_equals_stn_train_on_tie_free_inputs(label, path, dataset) -> None:
    """Noise images have no max-pool ties: there each path's ST-CNN step equals the per-model SGD step."""
    cfgs = configs(KINDS[label], datasets=(dataset,), seeds=SEEDS)
    size, k = CANVASES[dataset], len(cfgs)

    def batches():
        generator = torch.Generator().manual_seed(7)
        for _ in range(STEPS):
            yield (torch.rand(k, 8, 1, size, size, generator=generator, dtype=torch.float64),
                   torch.randint(0, 10, (k, 8), generator=generator))

    engine = BatchedModels(cfgs, CPU, EngineOptions(dtype=torch.float64, mode=path))
    mine = [engine.step(images, labels).detach() for images, labels in batches()]
    models = [prepare_model(cfg, CPU).double() for cfg in cfgs]
    optimizers = [build_optimizer(m, cfg.trainer) for m, cfg in zip(models, cfgs, strict=True)]
    schedulers = [build_scheduler(o, cfg.trainer) for o, cfg in zip(optimizers, cfgs, strict=True)]
    for step, (images, labels) in enumerate(batches()):
        for j, (m, o, s) in enumerate(zip(models, optimizers, schedulers, strict=True)):
            o.zero_grad()
            loss = F.cross_entropy(m(images[j]).float(), labels[j])
            loss.backward()
            o.step()
            s.step()
            assert float(mine[step][j]) == pytest.approx(loss.item(), rel=1e-6)
    assert_same_weights(engine, models)


def test_im2col_shared_input_equals_per_model_input() -> None:
    """evaluate's shared test chunk (one image batch for all K models) gives each model's own logits."""
    cfgs = configs(KINDS["ST-CNN Aff"], datasets=("RTS",), seeds=SEEDS)
    engine = BatchedModels(cfgs, CPU, EngineOptions(dtype=torch.float64, mode="im2col"))
    images = torch.rand(5, 1, 42, 42, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        shared = engine._forward_shared(engine.params, engine.buffers, images)
        separate = engine.forward(images.expand(len(cfgs), *images.shape))
    assert torch.equal(shared, separate)


def test_im2col_channels_last_option_changes_nothing() -> None:
    """EngineOptions.channels_last lays the images and conv weights out NHWC; im2col reads any layout."""
    cfgs = configs(KINDS["ST-CNN TPS"], seeds=SEEDS)
    plain = BatchedModels(cfgs, CPU, EngineOptions(dtype=torch.float64, mode="im2col"))
    nhwc = BatchedModels(cfgs, CPU, EngineOptions(dtype=torch.float64, mode="im2col", channels_last=True))
    generator = torch.Generator().manual_seed(5)
    for _ in range(2):
        images = torch.rand(2, 8, 1, 28, 28, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 10, (2, 8), generator=generator)
        torch.testing.assert_close(plain.step(images, labels), nhwc.step(images, labels), rtol=1e-6, atol=0)
    for name, p in plain.params.items():
        torch.testing.assert_close(p, nhwc.params[name], rtol=0, atol=1e-9 * float(p.detach().abs().max()))


# ---- the pooling step of the im2col path


# (side, ceil): odd and even maps in both modes; a 1x1 map only in ceil mode (floor mode has no window there)
@pytest.mark.parametrize(("side", "ceil"), [(7, True), (7, False), (8, True), (8, False), (13, True), (13, False),
                                            (1, True)])
@pytest.mark.parametrize("relu", [True, False])
def test_pool_relu_is_max_pool2d_then_relu_with_ties(side, ceil, relu) -> None:
    """Values and gradients equal to the last bit: integer inputs make exact ties (and zeros) common, and both
    must send a window's gradient to its first maximal element, row-major, and cut it where the max <= 0."""
    generator = torch.Generator().manual_seed(side)
    x = torch.randint(-2, 3, (3, 4, side, side), generator=generator).double()  # (N, C, H, W)
    upstream = torch.randn(3, 4, -(-side // 2) if ceil else side // 2, -(-side // 2) if ceil else side // 2,
                           generator=generator, dtype=torch.float64)
    ref_in = x.clone().requires_grad_()
    ref = F.max_pool2d(ref_in, 2, ceil_mode=ceil)
    ref = torch.relu(ref) if relu else ref
    ref.backward(upstream)
    mine_in = x.permute(0, 2, 3, 1).contiguous().requires_grad_()  # (N, H, W, C)
    mine = PoolRelu.apply(mine_in, ceil, relu)
    mine.backward(upstream.permute(0, 2, 3, 1))
    assert torch.equal(mine.permute(0, 3, 1, 2), ref)
    assert torch.equal(mine_in.grad.permute(0, 3, 1, 2), ref_in.grad)


# ---- bf16 autocast on the CPU


def test_vmap_leaves_cpu_autocast_convolutions_and_linears_in_float32() -> None:
    """The finding EngineOptions states: under vmap, CPU bf16 autocast does not reach conv2d or linear."""
    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(3, 4, 1, 12, 12, generator=generator), torch.randn(3, 5, 1, 3, 3, generator=generator),
               torch.randn(3, 5, generator=generator))
    features, weights = torch.randn(3, 4, 9, generator=generator), torch.randn(3, 5, 9, generator=generator)
    with torch.autocast("cpu", torch.bfloat16):
        assert F.conv2d(x[0], w[0], b[0]).dtype == torch.bfloat16  # outside vmap: autocast applies
        assert torch.func.vmap(F.conv2d)(x, w, b).dtype == torch.float32
        assert F.linear(features[0], weights[0], b[0]).dtype == torch.bfloat16
        assert torch.func.vmap(F.linear)(features, weights, b).dtype == torch.float32


class _MatmulDtypes(TorchDispatchMode):
    """The dtypes of every baddbmm's operands and of every grid_sample's input."""

    def __init__(self) -> None:
        super().__init__()
        self.baddbmm: list[torch.dtype] = []
        self.sampled: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.baddbmm.default:
            self.baddbmm.append(args[1].dtype)
        if func is torch.ops.aten.grid_sampler_2d.default:
            self.sampled.extend([args[0].dtype, args[1].dtype])
        return func(*args, **(kwargs or {}))


def test_im2col_honours_cpu_bf16_autocast_with_the_transformer_in_float32(mnist) -> None:
    cfgs = configs(KINDS["ST-CNN Aff"], seeds=SEEDS)
    engine = BatchedModels(cfgs, CPU, EngineOptions(amp=True, mode="im2col"))
    stream = BatchedStream(cfgs, *mnist, CPU)
    with _MatmulDtypes() as seen:
        losses = engine.step(*stream.next())
    assert torch.isfinite(losses).all()
    # forward: 2 localisation convs + 1 FC, then the regression (theta: float32), 2 classifier convs + 1 FC
    assert seen.baddbmm[:7] == [torch.bfloat16] * 3 + [torch.float32] + [torch.bfloat16] * 3
    assert seen.sampled[:2] == [torch.float32, torch.float32]  # the image and the grid
    assert all(p.dtype == torch.float32 for p in engine.params.values())


# ---- the rule


def _cfg(dataset: str, label: str, *extra: str):
    return compose([f"dataset={dataset}", *KINDS[label], *extra])


@pytest.mark.parametrize("dataset", ["R", "P", "E", "RTS", "TC", "P_axis", "P_box", "P_box20", "P_image",
                                     "P_redraw"])
@pytest.mark.parametrize("label", list(KINDS))
def test_conv_path_rule(dataset, label) -> None:
    cfg = _cfg(dataset, label)
    assert conv_path_for(cfg, "cpu") == "vmap"  # oneDNN's grouped convolutions: the CPU's measured path
    if label.startswith(("FCN", "ST-FCN")):
        expected = "vmap"  # no convolution anywhere
    elif label == "CNN" and dataset == "TC":
        expected = "loop"  # the explicit patches of its 7x7 conv on a 26x26 map: 612 MiB per model in bf16
    else:
        expected = "im2col"
    assert conv_path_for(cfg, "cuda") == expected


def test_patch_bytes_follow_the_convolution_arithmetic() -> None:
    """Independent of the traced shapes: TC's CNN, 60 -> conv 9 -> 52 -> pool -> 26 -> conv 7 -> 20, 64 filters."""
    cnn_tc = _cfg("TC", "CNN")
    assert im2col_patch_bytes(cnn_tc) == 256 * 20 * 20 * 64 * 7 * 7 * 2 > IM2COL_PATCH_LIMIT
    assert im2col_patch_bytes(_cfg("R", "CNN")) == 256 * 4 * 4 * 64 * 7 * 7 * 2  # 28 -> 20 -> 10 -> 4
    assert im2col_patch_bytes(_cfg("TC", "FCN")) == 0
    # the rule reads the bytes, not the canvas: the TC CNN at a quarter of the batch fits under the limit
    assert conv_path_for(_cfg("TC", "CNN", "trainer.batch_size=64"), "cuda") == "im2col"


def test_options_for_mode_adds_channels_last_to_cuda_loop_only() -> None:
    loop = options_for_mode(EngineOptions(amp=True), conv_path_for(_cfg("TC", "CNN"), "cuda"), "cuda")
    assert (loop.mode, loop.channels_last, loop.amp) == ("loop", True, True)
    im2col = options_for_mode(EngineOptions(), conv_path_for(_cfg("R", "CNN"), "cuda"), "cuda")
    assert (im2col.mode, im2col.channels_last) == ("im2col", False)
    assert options_for_mode(EngineOptions(), "loop", "cpu").channels_last is False


def test_unknown_mode_is_refused_with_the_known_ones() -> None:
    from stn.engine.options import EngineError

    with pytest.raises(EngineError, match="vmap, loop, im2col"):
        BatchedModels(configs(KINDS["CNN"], seeds=(0,)), CPU, EngineOptions(mode="grouped"))
