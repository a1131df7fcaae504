"""stn.engine.batched: K models in one process equal K runs of the `stn train` path (float64, CPU).

Tolerances. The equality tests build both sides in float64, where a dot product of n terms is exact to about
n * 2.2e-16 of its terms' magnitude; the largest reductions here (a conv input gradient, a 784-wide linear
layer, a batch mean) have n <= 2e4, so one op is exact to ~5e-12 relative, and a few layers and steps stay
far below RTOL = 1e-9 (relative to each tensor's largest entry). The loss is float32 on both sides (as
`stn.step.train_step` computes it), from logits equal to 1e-15, so both round them to the same float32
values and get the same float32 gradient. Nothing is tuned to this machine: the observed gaps are 1e-16 to
1e-15.

One exception is arithmetic, not numerical: max-pooling passes its gradient to one maximal element of each
window, and the distorted MNIST digits' constant background and saturated strokes make exact and near
(last-bit) ties common. Where the convolution before such a pool feeds a gradient that matters (an ST-CNN's
classification net, whose input gradient reaches the sampling grid), a different summation order can move a
near-tie's gradient to the window's other element: an equally valid subgradient, O(1) apart. The "loop"
mode runs the same kernels as `stn train` and is compared on real data for every kind; the "vmap" mode is
compared on real data where no such tie feeds a gradient (FCN, CNN, ST-FCN) and, for the ST-CNNs, on
tie-free inputs (noise images).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from engine_setup import CPU, KINDS, configs
from stn.compose import compose
from stn.data import TrainStream, make_test_set
from stn.engine.batched import BatchedModels
from stn.engine.options import EngineError, EngineOptions, shape_signature
from stn.engine.stacked_sgd import StackedSGD
from stn.engine.streams import BatchedStream
from stn.mnist import load_mnist
from stn.models import build_model
from stn.step import build_optimizer, build_scheduler, evaluate, fit_step, prepare_model

RTOL = 1e-9
STEPS = 5  # with lr_step=2: the rate changes twice; with 24 digits and batch 8: an epoch ends every 3 steps


class Float64Stream:
    """A TrainStream whose images are cast to float64 (the reference side of the float64 comparisons)."""

    def __init__(self, stream: TrainStream) -> None:
        self.stream = stream

    def next(self):
        images, labels = self.stream.next()
        return images.double(), labels


def reference_runs(cfgs, mnist, steps: int):
    """Each config trained alone through stn.train's own pieces (prepare_model, SGD, StepLR, fit_step)."""
    digits, labels = mnist
    models, losses = [], []
    for cfg in cfgs:
        model = prepare_model(cfg, CPU).double()
        optimizer = build_optimizer(model, cfg.trainer)
        scheduler = build_scheduler(optimizer, cfg.trainer)
        stream = Float64Stream(TrainStream(digits, labels, cfg.dataset, cfg.trainer.batch_size, cfg.seed, CPU))
        run = [float(fit_step(model, optimizer, scheduler, stream, amp=False, channels_last=False))
               for _ in range(steps)]
        models.append(model)
        losses.append(run)
    return models, losses


def assert_same_weights(engine: BatchedModels, models) -> None:
    for k, model in enumerate(models):
        mine = engine.member_state_dict(k)
        for name, ref in model.state_dict().items():
            scale = float(ref.abs().max()) or 1.0
            gap = float((mine[name] - ref).abs().max())
            assert gap <= RTOL * scale, f"model {k} {name}: {gap:.3e} apart (scale {scale:.3e})"


def batched_losses(engine: BatchedModels, stream: BatchedStream, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        images, labels = stream.next()
        out.append(engine.step(images, labels).tolist())
    return [list(column) for column in zip(*out, strict=True)]


def check_against_reference(cfgs, mnist, mode: str) -> None:
    engine = BatchedModels(cfgs, CPU, EngineOptions(dtype=torch.float64, mode=mode))
    stream = BatchedStream(cfgs, *mnist, CPU)
    mine = batched_losses(engine, stream, STEPS)
    models, theirs = reference_runs(cfgs, mnist, STEPS)
    assert_same_weights(engine, models)
    # losses: float32 means of the same float32 values, summed in another order (float32: ~1e-7)
    for a, b in zip(mine, theirs, strict=True):
        assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize("label", list(KINDS))
def test_loop_mode_equals_separate_train_runs(label, mnist) -> None:
    check_against_reference(configs(KINDS[label]), mnist, "loop")


@pytest.mark.parametrize("label", ["FCN", "CNN", "ST-FCN Aff", "ST-FCN Proj", "ST-FCN TPS"])
def test_vmap_mode_equals_separate_train_runs(label, mnist) -> None:
    check_against_reference(configs(KINDS[label]), mnist, "vmap")


def test_one_architecture_across_datasets_and_canvas_sizes(mnist) -> None:
    """R, P and E share every shape (28x28): one group, three data streams; RTS (pooled ST) and TC too."""
    check_against_reference(configs(KINDS["CNN"], datasets=("R", "P", "E"), seeds=(0, 1)), mnist, "vmap")
    check_against_reference(configs(KINDS["ST-CNN Aff"], datasets=("RTS",), seeds=(3, 4)), mnist, "loop")
    check_against_reference(configs(KINDS["ST-FCN Aff"], datasets=("TC",), seeds=(0, 1)), mnist, "vmap")


@pytest.mark.parametrize("label", ["ST-CNN Aff", "ST-CNN Proj", "ST-CNN TPS"])
def test_vmap_mode_st_cnn_gradients_on_tie_free_inputs(label) -> None:
    """Noise images have no max-pool ties: there the vmapped ST-CNN step equals the per-model SGD step."""
    cfgs = configs(KINDS[label], seeds=(0, 1))
    engine = BatchedModels(cfgs, CPU, EngineOptions(dtype=torch.float64, mode="vmap"))
    generator = torch.Generator().manual_seed(7)
    for _ in range(3):
        images = torch.rand(2, 8, 1, 28, 28, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 10, (2, 8), generator=generator)
        engine.step(images, labels)
    generator = torch.Generator().manual_seed(7)
    models = [prepare_model(cfg, CPU).double() for cfg in cfgs]
    optimizers = [build_optimizer(m, cfg.trainer) for m, cfg in zip(models, cfgs, strict=True)]
    schedulers = [build_scheduler(o, cfg.trainer) for o, cfg in zip(optimizers, cfgs, strict=True)]
    for _ in range(3):
        images = torch.rand(2, 8, 1, 28, 28, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 10, (2, 8), generator=generator)
        for k, (m, o, s) in enumerate(zip(models, optimizers, schedulers, strict=True)):
            o.zero_grad()
            F.cross_entropy(m(images[k]).float(), labels[k]).backward()
            o.step()
            s.step()
    assert_same_weights(engine, models)


def test_stacked_sgd_is_torch_sgd() -> None:
    """Momentum, weight decay and StepLR, update by update, against torch.optim.SGD on every slice."""
    trainer = dataclasses.replace(compose(["trainer=smoke"]).trainer, momentum=0.9, weight_decay=1e-3, lr=0.05,
                                  lr_step=3, lr_gamma=0.1)
    generator = torch.Generator().manual_seed(0)
    stacked = [torch.randn(3, 5, 4, generator=generator).requires_grad_(), torch.randn(3, 7, generator=generator)
               .requires_grad_()]
    mine = StackedSGD(stacked, trainer)
    slices = [[p.detach()[k].clone().requires_grad_() for p in stacked] for k in range(3)]
    torch_opts = [torch.optim.SGD(s, lr=trainer.lr, momentum=trainer.momentum, weight_decay=trainer.weight_decay)
                  for s in slices]
    schedulers = [build_scheduler(o, trainer) for o in torch_opts]
    for _ in range(10):
        grads = [torch.randn(p.shape, generator=generator) for p in stacked]
        for p, g in zip(stacked, grads, strict=True):
            p.grad = g.clone()
        assert mine.lr == torch_opts[0].param_groups[0]["lr"]
        mine.update()
        mine.advance()
        for k in range(3):
            for p, g in zip(slices[k], grads, strict=True):
                p.grad = g[k].clone()
            torch_opts[k].step()
            schedulers[k].step()
    for k in range(3):
        for p, ref in zip(stacked, slices[k], strict=True):
            # the same elementwise ops in the same order: equal to the last bit
            assert torch.equal(p.detach()[k], ref.detach())
    assert mine.lr == torch_opts[0].param_groups[0]["lr"]


def test_stacked_sgd_tensor_rate_update_matches_float_rate() -> None:
    """The CUDA-graph update (rate read from a device tensor) equals the host-rate update to rounding."""
    trainer = dataclasses.replace(compose(["trainer=smoke"]).trainer, weight_decay=1e-3, lr_step=2)
    generator = torch.Generator().manual_seed(1)
    a = [torch.randn(2, 6, generator=generator, dtype=torch.float64).requires_grad_()]
    b = [a[0].detach().clone().requires_grad_()]
    first, second = StackedSGD(a, trainer), StackedSGD(b, trainer)
    for _ in range(5):
        g = torch.randn(2, 6, generator=generator, dtype=torch.float64)
        a[0].grad, b[0].grad = g.clone(), g.clone()
        first.update()
        second.update_from_tensor()
        first.advance()
        second.advance()
    # lr * b as one product vs add's alpha: at most one rounding of ~1e-16 relative per update
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=5 * 2.3e-16 * float(a[0].detach().abs().max()) * 4)


def test_shapes_that_differ_are_refused(mnist) -> None:
    cfgs = configs(KINDS["CNN"], datasets=("R", "RTS"), seeds=(0,))
    assert shape_signature(cfgs[0]) != shape_signature(cfgs[1])
    with pytest.raises(EngineError, match="differ in shape"):
        BatchedModels(cfgs, CPU)
    same = configs(KINDS["ST-CNN TPS"], datasets=("R", "P", "E"), seeds=(0,))
    assert len({shape_signature(c) for c in same}) == 1


@pytest.mark.parametrize("beyond", ["trainer.schedule=onecycle", "trainer.nesterov=true", "trainer.loc_lr_scale=0.1",
                                    "trainer.label_smoothing=0.1", "trainer.grad_clip=1.0", "trainer.ema_decay=0.9"])
def test_recipes_beyond_the_papers_are_refused_not_silently_replaced(beyond) -> None:
    """StackedSGD implements the paper's SGD + step schedule only: anything else must not train as if it were."""
    with pytest.raises(EngineError, match=beyond.replace(".", r"\.").replace("true", "True")):
        BatchedModels(configs(KINDS["ST-CNN Aff"], seeds=(0,), extra=(beyond,)), CPU)


def test_evaluate_is_stn_train_evaluate(mnist, data_dir) -> None:
    cfgs = configs(KINDS["ST-CNN Aff"], datasets=("R", "P"), seeds=(0,))
    engine = BatchedModels(cfgs, CPU, EngineOptions(mode="vmap"))
    stream = BatchedStream(cfgs, *mnist, CPU)
    for _ in range(3):
        engine.step(*stream.next())
    test_digits, test_labels = load_mnist(data_dir, train=False)
    sets = [make_test_set(test_digits, test_labels, cfg.dataset) for cfg in cfgs]
    errors = engine.evaluate(sets, batch_size=16)
    for k, cfg in enumerate(cfgs):
        model = build_model(cfg, fast=False)
        model.load_state_dict(engine.member_state_dict(k))
        assert errors[k] == evaluate(model, sets[k], 16)
    shared = engine.evaluate([sets[0], sets[0]], batch_size=16)
    assert shared[0] == errors[0]


def test_compiled_loss_traces_through_vmap(mnist) -> None:
    """trainer-style torch.compile of the batched loss (eager backend: no C++ compiler needed) changes nothing."""
    cfgs = configs(KINDS["ST-FCN TPS"], seeds=(0, 1))
    plain = BatchedModels(cfgs, CPU, EngineOptions(dtype=torch.float64))
    compiled = BatchedModels(cfgs, CPU, EngineOptions(dtype=torch.float64, compile=True, compile_backend="eager"))
    stream_a, stream_b = BatchedStream(cfgs, *mnist, CPU), BatchedStream(cfgs, *mnist, CPU)
    for _ in range(2):
        a = plain.step(*stream_a.next())
        b = compiled.step(*stream_b.next())
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    for name, p in plain.params.items():
        torch.testing.assert_close(p, compiled.params[name], rtol=0, atol=RTOL * float(p.abs().max()))


def test_bf16_autocast_keeps_the_transformer_in_float32(mnist) -> None:
    cfgs = configs(KINDS["ST-CNN Proj"], seeds=(0, 1))
    engine = BatchedModels(cfgs, CPU, EngineOptions(amp=True, channels_last=True))
    stream = BatchedStream(cfgs, *mnist, CPU)
    seen = {}

    def hook(module, inputs, output) -> None:
        seen["theta"] = output.dtype

    handle = engine.base.transformers[0].regression.register_forward_hook(hook)
    try:
        losses = engine.step(*stream.next())
    finally:
        handle.remove()
    assert seen["theta"] == torch.float32 and torch.isfinite(losses).all()
    assert all(p.dtype == torch.float32 for p in engine.params.values())
