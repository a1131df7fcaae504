"""stn.engine.step_cost: the roofline cost model of a batched step per conv path, and `stn engine plan`'s use of it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stn.cli.engine import LOAN_BENCH, LOAN_TABLE_RUN, engine_app
from stn.compose import compose
from stn.engine.kernels import Kernel, conv_flops, count_step, extrapolate, im2col_conv, im2col_kernels
from stn.engine.plan import CostModel, Group, Member, table_run_seconds
from stn.engine.step_cost import (
    DeviceSpec,
    StepPrediction,
    fit_latency,
    in_flight_seconds,
    path_estimates,
    predict,
)
from stn.grid import TABLE1_MODELS
from stn.measure import model_flops_per_image

REPO = Path(__file__).resolve().parents[1]
KINDS = dict(TABLE1_MODELS)
DEVICE = DeviceSpec("test", peak_flops=100e12, bandwidth=2e12, kernel_latency_s=5e-6, step_overhead_s=1e-4)


def test_conv_flops_and_im2col_kernels_by_hand() -> None:
    # K=2 models, B=3 images, 1 -> 4 channels, 3x3 kernel on 6x6: 4x4 outputs (L=16), depth 9
    assert conv_flops(batch=3, out_channels=8, in_per_group=1, kernel=9, out_positions=16) == 2 * 3 * 8 * 9 * 16
    conv = (2, 3, 1, 6, 6, 4, 3, 3, 4, 4, True, True, False)
    unfold, matmul = im2col_conv(conv, element_bytes=2)
    image, columns, outputs, weights, bias = 2 * 3 * 36 * 2, 2 * 48 * 9 * 2, 2 * 48 * 4 * 2, 2 * 9 * 4 * 2, 2 * 4 * 2
    assert (unfold.flops, unfold.bytes) == (0, image + columns)
    assert (matmul.flops, matmul.bytes) == (2 * 2 * 48 * 9 * 4, columns + weights + bias + outputs)
    backward = im2col_conv((*conv[:-1], True), element_bytes=2)
    assert [k.name for k in backward] == ["im2col.bmm_weight_grad", "im2col.bias_grad", "im2col.bmm_input_grad",
                                          "im2col.fold"]
    assert [k.flops for k in backward] == [2 * 2 * 48 * 9 * 4, 0, 2 * 2 * 48 * 9 * 4, 0]
    assert backward[3].bytes == columns + image
    no_input_grad = im2col_conv((*conv[:10], False, True, True), element_bytes=2)
    assert [k.name for k in no_input_grad] == ["im2col.bmm_weight_grad", "im2col.bias_grad"]


def test_prediction_arithmetic_by_hand() -> None:
    kernels = [Kernel("matmul", flops=2e9, bytes=1e6), Kernel("copy", flops=0.0, bytes=4e6), Kernel("tiny", 0.0, 0.0)]
    p = predict(kernels, DEVICE)
    # matmul: max(2e9 / 1e14, 1e6 / 2e12) = 2e-5; copy: 4e6 / 2e12 = 2e-6; tiny: 0
    assert p.busy_s == pytest.approx(2e-5 + 2e-6)
    assert p.latency_s == pytest.approx(3 * 5e-6 + 1e-4)
    assert p.seconds == pytest.approx(2.2e-5 + 1.15e-4)
    assert (p.kernels, p.flops, p.bytes) == (3, 2e9, 5e6)
    a, b = StepPrediction(1, 0, 0, busy_s=1e-3, latency_s=2e-3), StepPrediction(1, 0, 0, busy_s=3e-3, latency_s=4e-3)
    work = [(100, a), (50, b)]
    assert in_flight_seconds(work, 1) == pytest.approx(100 * 3e-3 + 50 * 7e-3)
    # two in flight: the busy parts add (0.1 + 0.15 s), the latencies (0.2 + 0.2 s) overlap two ways
    assert in_flight_seconds(work, 2) == pytest.approx(0.25 + 0.4 / 2)
    assert in_flight_seconds(work, 8) == in_flight_seconds(work, 2)  # no more in flight than there are groups
    with pytest.raises(ValueError):
        in_flight_seconds(work, 0)


def test_fit_latency_recovers_a_known_device() -> None:
    latency, overhead = 4e-6, 2e-4
    graphed = [(busy + n * latency, StepPrediction(n, 0, 0, busy, 0.0)) for n, busy in ((40, 2e-5), (90, 5e-5),
                                                                                         (100, 1e-4))]
    table = [(busy + n * latency + overhead, StepPrediction(n, 0, 0, busy, 0.0)) for n, busy in ((40, 1e-5),
                                                                                              (80, 3e-5))]
    assert fit_latency(graphed, table) == pytest.approx((latency, overhead))


def cnn_config(batch: int):
    return compose(["dataset=R", *KINDS["CNN"], f"trainer.batch_size={batch}"])


def test_counted_step_matches_an_independent_flop_count_and_extrapolates_exactly() -> None:
    """The vmap step's FLOPs equal K x B x FlopCounterMode's count on one unbatched model (torch's own
    convolution_backward formula would count vmap's grouped backward K times over); the count at batch 6,
    extrapolated from batches 2 and 4, equals a count made at batch 6."""
    from stn.engine.kernels import _count_at

    k, batch = 2, 6
    cfg = cnn_config(batch)
    kernels = count_step(cfg, k, "vmap")
    assert sum(x.flops for x in kernels) == pytest.approx(k * batch * model_flops_per_image(cfg), rel=1e-12)
    direct = _count_at(cfg, k, "vmap", batch)
    assert [x.name for x in kernels] == [x.name for x in direct]
    for a, b in zip(kernels, direct, strict=True):
        assert (a.flops, a.bytes) == pytest.approx((b.flops, b.bytes), rel=1e-12)
    loop = count_step(cfg, k, "loop")
    assert sum(x.flops for x in loop) == pytest.approx(sum(x.flops for x in kernels), rel=1e-12)
    assert len(loop) > len(kernels)  # K models' kernels, not one batched call per layer
    with pytest.raises(RuntimeError):
        extrapolate(kernels[:2], kernels[1:3], 2, 4, 6)


def test_im2col_replaces_every_convolution_and_keeps_the_arithmetic() -> None:
    cfg = cnn_config(4)
    vmap = count_step(cfg, 3, "vmap")
    im2col = count_step(cfg, 3, "im2col")
    assert im2col == im2col_kernels(vmap)
    assert not any(x.conv for x in im2col) and sum(x.conv is not None for x in vmap) == 4  # 2 layers, fwd + bwd
    assert sum(x.flops for x in im2col) == pytest.approx(sum(x.flops for x in vmap), rel=1e-12)
    names = [x.name for x in im2col]
    assert names.count("im2col.baddbmm") == 2 and names.count("im2col.fold") == 1  # the first layer: no input grad
    assert "clone" not in names  # vmap's layout copies dropped
    assert sum(x.name == "add" for x in im2col) == sum(x.name == "add" for x in vmap) - 2  # the bias adds fused


def test_path_estimates_label_measured_and_bounds() -> None:
    cfg = cnn_config(8)
    group = Group("cnn_R", [Member("CNN", "R", s, cfg) for s in range(3)])
    costs = CostModel(table=[{"kind": "CNN", "size": 28, "k": 3, "images_per_s": 2400.0, "mode": "vmap"}])
    est = path_estimates(group, costs, DEVICE)
    assert list(est) == ["vmap", "loop", "im2col"]
    assert est["vmap"].measured and est["vmap"].label == "measured (K=3)"
    assert est["vmap"].seconds_per_step == pytest.approx(3 * 8 / 2400.0)
    assert est["vmap"].prediction.seconds == pytest.approx(est["vmap"].seconds_per_step)
    for path in ("loop", "im2col"):
        assert not est[path].measured and est[path].label == f"{path}: lower bound, not measured"
        assert est[path].seconds_per_step == pytest.approx(est[path].prediction.seconds)
    # nothing measured for this kind: vmap is a bound too
    bare = path_estimates(group, CostModel(), DEVICE)
    assert bare["vmap"].label == "vmap: lower bound, not measured"
    fcn = compose(["dataset=R", *KINDS["FCN"], "trainer.batch_size=8"])
    assert list(path_estimates(Group("fcn_R", [Member("FCN", "R", 0, fcn)]), costs, DEVICE)) == ["vmap", "loop"]


def test_plan_defaults_to_the_repos_measured_cost_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --cost, `stn engine plan` reads the first H200 loan's bench and table run: ~9 GPU-hours for the
    table (its progress.json said 10 h left), not the 1,346 s that an assumed 100 TFLOP/s gave."""
    assert (REPO / LOAN_BENCH).is_file() and (REPO / LOAN_TABLE_RUN).is_file()
    assert table_run_seconds(REPO / LOAN_TABLE_RUN)["fcn_RTS"] == pytest.approx(48.3 / 150000, rel=1e-3)
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(engine_app, ["plan", "--no-paths"])
    assert result.exit_code == 0, result.output
    total = float(re.search(r"108 models, (\d+) s estimated", result.output).group(1))
    assert 30000 < total < 40000
    assert "cnn_TC" in result.output and "measured in a table run" in result.output
    bad = CliRunner().invoke(engine_app, ["plan", "--in-flight", "0"])
    assert bad.exit_code == 2
    missing = CliRunner().invoke(engine_app, ["plan", "--cost", "no-such.json"])
    assert missing.exit_code == 2 and "no such file" in missing.output


def test_pool_relu_fusion_by_hand() -> None:
    """c = 800 bytes of conv output (bf16), n = 100 pooled elements: relu reads and writes c, the pool reads c and
    writes 2n + 8n; fused: c + 3n (values and a 1-byte code). Backward: pool backward 2c + 10n, threshold 3c;
    fused: 3n + c."""
    from stn.engine.kernels import fuse_pool_relu

    c, n = 800.0, 100.0
    forward = [Kernel("im2col.baddbmm", 1.0, 1.0), Kernel("relu", 0, 2 * c), Kernel("max_pool2d_with_indices", 0,
                                                                                     c + 10 * n)]
    assert fuse_pool_relu(forward)[1:] == [Kernel("im2col.pool_relu", 0.0, c + 3 * n)]
    backward = [Kernel("max_pool2d_with_indices_backward", 0, 2 * c + 10 * n), Kernel("threshold_backward", 0, 3 * c),
                Kernel("im2col.bmm_weight_grad", 1.0, 1.0)]
    assert fuse_pool_relu(backward)[0] == Kernel("im2col.pool_relu_backward", 0.0, 3 * n + c)
    assert fuse_pool_relu(forward[1:]) == forward[1:]  # not after an im2col matmul: left alone


def test_recorder_counts_kernels_and_bytes_by_hand() -> None:
    """Floats at 2 bytes: an out-of-place add reads two tensors and writes one; an in-place add reads two and
    writes its first; a view, a reshape of a contiguous tensor and an allocation launch nothing."""
    import torch

    from stn.engine.kernels import KernelRecorder

    a, b = torch.ones(10, 10), torch.ones(10, 10)
    with KernelRecorder() as recorder:
        c = a + b
        a.add_(b)
        c.view(100).reshape(4, 25)
        torch.empty(5)
        torch.mm(a, b)
    assert [k.name for k in recorder.kernels] == ["add", "add_", "mm"]
    assert [k.bytes for k in recorder.kernels] == [300 * 2, 300 * 2, 300 * 2]
    assert recorder.kernels[2].flops == 2 * 10 * 10 * 10
