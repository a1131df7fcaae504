"""CUDA checks of the spatial transformer and the batched engine (skipped without a GPU).

Run by experiments/table1/paper-gpu/run_gpu.sh on the GPU machine. Comparisons are in float64 where the
question is arithmetic (CPU vs CUDA, CUDA graph vs eager, compiled vs eager, channels_last vs not), so the
tolerance is the one tests/test_batched.py derives (RTOL = 1e-9 of each tensor's largest entry); the ST-CNN's
max-pool ties (see there) are avoided by feeding noise images.

CPU against CUDA needs one more term. Both sides take the cross-entropy of float32 logits (as `stn train` does),
and the two devices' float32 log-softmax kernels (their exp, log and 10-term sums) round differently: the logit
gradient agrees to a few float32 ulps (2^-24 relative), not to float64's. Everything after it is float64 and
linear in that gradient (the backward pass, weight decay, momentum, the update), so each step's update carries
at most that relative error, and after T steps the parameters differ by at most ~LOSS_ULPS * 2^-24 times the
sum of the T updates' sizes (`path` below). LOSS_ULPS = 16 counts the roundings generously; the second-order
term (the next forward pass from parameters that differ by that much) is smaller by lr times the curvature.
Same-device comparisons (graph, channels_last, compiled vs eager) use the same loss kernel and keep RTOL alone.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from stn.compose import compose
from stn.engine.batched import BatchedModels
from stn.engine.group_run import GroupRun, train_for
from stn.engine.options import EngineOptions
from stn.engine.streams import BatchedStream
from stn.grid import TABLE1_MODELS
from stn.mnist import load_mnist
from stn.spatial import identity_params, make_grid, sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
RTOL = 1e-9
KINDS = dict(TABLE1_MODELS)


def configs(label: str, seeds=(0, 1, 2), dataset: str = "R", *extra: str):
    return [compose([f"dataset={dataset}", *KINDS[label], "trainer=smoke", "trainer.batch_size=16",
                     "trainer.lr_step=2", "trainer.weight_decay=0.001", "dataset.train_limit=64", f"seed={s}",
                     *extra]) for s in seeds]


def noise_batches(k: int, steps: int, size: int = 28):
    generator = torch.Generator().manual_seed(3)
    return [(torch.rand(k, 16, 1, size, size, generator=generator, dtype=torch.float64),
             torch.randint(0, 10, (k, 16), generator=generator)) for _ in range(steps)]


LOSS_ULPS = 16


def close_params(a: BatchedModels, b: BatchedModels, path: dict[str, float] | None = None) -> None:
    """Parameters equal to RTOL of each tensor's largest entry, plus, across devices, the float32-loss term."""
    for name, p in a.params.items():
        q = b.params[name].to(p.device)
        scale = float(p.detach().abs().max()) or 1.0
        bound = RTOL * scale + (LOSS_ULPS * 2.0 ** -24 * path[name] if path else 0.0)
        gap = float((p - q).detach().abs().max())
        assert gap <= bound, f"{name}: {gap:.3e} apart, bound {bound:.3e} (scale {scale:.3e})"


def off_identity(*engines: BatchedModels) -> None:
    """Move every model's initial transform off the identity by one small offset, the same in each engine.

    At the identity every sampling point lies on a pixel centre, where bilinear sampling's gradient with respect
    to the grid jumps (from the difference with the left neighbour to the one with the right). Which side a
    device's float64 rounding of the pixel coordinate lands on is arbitrary, so CPU and CUDA can each return a
    different, equally valid subgradient, O(1) apart: the same kind of tie as max-pool's (tests/test_batched.py).
    Offsets of ~0.01 (a tenth of a pixel) put the points at generic sub-pixel positions; four small steps do not
    bring one within float64 rounding of a pixel centre.
    """
    bias = engines[0].params["transformers.0.regression.bias"]
    offset = 0.01 * torch.randn(bias.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        for engine in engines:
            engine.params["transformers.0.regression.bias"] += offset.to(engine.device)


def step_tracking_path(models: BatchedModels, images, targets, path: dict[str, float]):
    """One step of `models`, adding the size of each parameter's update (its largest entry) to `path`."""
    before = {name: p.detach().clone() for name, p in models.params.items()}
    losses = models.step(images, targets)
    for name, p in models.params.items():
        path[name] = path.get(name, 0.0) + float((p.detach() - before[name]).abs().max())
    return losses


@pytest.mark.parametrize("kind", ["affine", "projective", "tps"])
@pytest.mark.parametrize("size", [28, 42, 60])
def test_identity_warps_return_the_input(kind: str, size: int) -> None:
    images = torch.rand(4, 1, size, size, device=CUDA)
    theta = identity_params(kind).to(CUDA).repeat(4, 1)
    out = sample(images, make_grid(kind, theta, size, size))
    # pixel centres map to themselves up to float32 rounding of the grid: bilinear weights off by ~1e-6
    torch.testing.assert_close(out, images, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["affine", "projective", "tps"])
def test_float64_gradcheck_of_grid_and_sampler_on_cuda(kind: str) -> None:
    generator = torch.Generator(device=CUDA).manual_seed(0)
    theta = identity_params(kind).to(CUDA, torch.float64).repeat(2, 1)
    theta = (theta + 0.05 * torch.randn(theta.shape, generator=generator, device=CUDA, dtype=torch.float64))
    theta.requires_grad_()
    images = torch.rand(2, 1, 9, 9, generator=generator, device=CUDA, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, x: sample(x, make_grid(kind, t, 7, 7)), (theta, images))


@pytest.mark.parametrize("label", ["FCN", "CNN", "ST-FCN TPS"])
def test_cuda_engine_equals_cpu_engine_on_real_batches(label: str, data_dir) -> None:
    digits, labels = load_mnist(data_dir, train=True)
    cfgs = configs(label)
    cpu = BatchedModels(cfgs, "cpu", EngineOptions(dtype=torch.float64))
    gpu = BatchedModels(cfgs, CUDA, EngineOptions(dtype=torch.float64))
    stream = BatchedStream(cfgs, digits, labels, "cpu")
    path: dict[str, float] = {}
    for _ in range(4):
        images, targets = stream.next()
        step_tracking_path(cpu, images, targets, path)
        gpu.step(images.to(CUDA), targets.to(CUDA))
    close_params(cpu, gpu, path)


@pytest.mark.parametrize("label", ["ST-CNN Aff", "ST-CNN Proj", "ST-CNN TPS"])
def test_cuda_graph_and_channels_last_equal_eager(label: str) -> None:
    cfgs = configs(label, seeds=(0, 1))
    eager = BatchedModels(cfgs, CUDA, EngineOptions(dtype=torch.float64))
    graph = BatchedModels(cfgs, CUDA, EngineOptions(dtype=torch.float64, cuda_graph=True))
    nhwc = BatchedModels(cfgs, CUDA, EngineOptions(dtype=torch.float64, channels_last=True))
    cpu = BatchedModels(cfgs, "cpu", EngineOptions(dtype=torch.float64))
    off_identity(eager, graph, nhwc, cpu)
    path: dict[str, float] = {}
    for images, targets in noise_batches(2, 4):
        losses = eager.step(images.to(CUDA), targets.to(CUDA))
        torch.testing.assert_close(graph.step(images.to(CUDA), targets.to(CUDA)), losses, rtol=1e-6, atol=0)
        nhwc.step(images.to(CUDA), targets.to(CUDA))
        step_tracking_path(cpu, images, targets, path)
    close_params(eager, graph)
    close_params(eager, nhwc)
    close_params(cpu, eager, path)


@pytest.mark.skipif(os.environ.get("STN_CUDA_COMPILE_TEST") != "1",
                    reason="inductor compiles for a minute or more: STN_CUDA_COMPILE_TEST=1 runs it")
def test_compiled_step_equals_eager_on_cuda() -> None:
    cfgs = configs("ST-CNN Aff", seeds=(0, 1))
    eager = BatchedModels(cfgs, CUDA, EngineOptions(dtype=torch.float64))
    compiled = BatchedModels(cfgs, CUDA, EngineOptions(dtype=torch.float64, compile=True))
    for images, targets in noise_batches(2, 3):
        eager.step(images.to(CUDA), targets.to(CUDA))
        compiled.step(images.to(CUDA), targets.to(CUDA))
    close_params(eager, compiled)


def test_bf16_smoke_training_learns_on_cuda(data_dir) -> None:
    """ST-CNN Aff, K=3, bf16 autocast + CUDA graph, 300 steps of 64 on R: the loss falls well below its
    untrained value log(10) = 2.30 (a loose bar: this checks that the graphed bf16 step learns at all)."""
    digits, labels = load_mnist(data_dir, train=True)
    cfgs = [dataclasses.replace(c, trainer=dataclasses.replace(c.trainer, batch_size=64, iterations=300,
                                                               lr_step=10_000))
            for c in configs("ST-CNN Aff", (0, 1, 2), "R", "dataset.train_limit=null")]
    engine = BatchedModels(cfgs, CUDA, EngineOptions(amp=True, cuda_graph=True))
    run = GroupRun(engine, BatchedStream(cfgs, digits, labels, CUDA), iterations=300, log_every=50)
    train_for(run, deadline=float("inf"))
    assert run.done and run.bad_steps() == [-1, -1, -1]
    assert max(run.last_losses) < 1.2, run.last_losses
    theta_dtype = {}
    hook = engine.base.transformers[0].regression.register_forward_hook(
        lambda m, i, o: theta_dtype.update(dtype=o.dtype))  # returns None: a hook's return value replaces the output
    engine.forward(torch.rand(3, 2, 1, 28, 28, device=CUDA))
    hook.remove()
    assert theta_dtype["dtype"] == torch.float32


@pytest.mark.parametrize("data", ["exact", "block"])
@pytest.mark.parametrize("dataset", ["R", "TC"])
def test_no_host_sync_in_data_and_step(dataset: str, data: str, data_dir) -> None:
    """Drawing the K batches and the (graphed) step never wait for the GPU (torch's sync debug mode)."""
    from stn.engine.streams import make_stream
    from stn.measure import count_syncs

    digits, labels = load_mnist(data_dir, train=True)
    cfgs = configs("ST-CNN Aff" if dataset == "R" else "ST-FCN Aff", (0, 1, 2), dataset)
    options = EngineOptions(amp=True, cuda_graph=True, data=data, block_steps=2)
    run = GroupRun(BatchedModels(cfgs, CUDA, options), make_stream(cfgs, digits, labels, CUDA, options),
                   iterations=10, log_every=10)
    run.advance(2)  # warm-up and graph capture
    counted = {"syncs": 0}
    with count_syncs(CUDA, counted):
        run.advance(5)
    assert counted["syncs"] == 0, counted["where"]


# ---------------------------------------------------------------------------------- groups in flight, data ahead


def _kernels_by_stream(trace: str) -> dict[int, list[tuple[float, float]]]:
    """(start, end) in microseconds of every GPU kernel in a chrome trace, by the CUDA stream it ran on."""
    import json

    with open(trace) as handle:
        events = json.load(handle)["traceEvents"]
    out: dict[int, list[tuple[float, float]]] = {}
    for event in events:
        if event.get("cat") == "kernel" and "dur" in event:
            out.setdefault(int(event["args"]["stream"]), []).append((event["ts"], event["ts"] + event["dur"]))
    return out


def _overlap_us(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total time during which a kernel of `a` and a kernel of `b` both ran (each list: one stream, in order)."""
    a, b = sorted(a), sorted(b)
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_kernels_of_two_groups_in_flight_overlap(cuda_graph: bool, data_dir, tmp_path) -> None:
    """Two groups in flight on their own streams (stn.engine.group_run.InFlight): a profiler trace shows kernels of
    the two streams running at the same time (each group's work, data included, is on its own stream)."""
    from torch.profiler import ProfilerActivity, profile

    from stn.engine.group_run import InFlight

    digits, labels = load_mnist(data_dir, train=True)
    flight = InFlight(CUDA, streams=True, unit_steps=4)
    for label in ("CNN", "FCN"):
        cfgs = [dataclasses.replace(c, trainer=dataclasses.replace(c.trainer, batch_size=256))
                for c in configs(label, (0, 1, 2), "R", "dataset.train_limit=null")]
        engine = BatchedModels(cfgs, CUDA, EngineOptions(cuda_graph=cuda_graph))
        flight.add(GroupRun(engine, BatchedStream(cfgs, digits, labels, CUDA), iterations=10_000, log_every=4))
    for run in flight.runs:  # warm-up and graph capture, outside the trace
        run.advance(4)
    flight.drain()
    torch.cuda.synchronize()
    clock = iter(range(10_000))
    flight.clock = lambda: float(next(clock))
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        flight.train(deadline=40.0)  # a few units per group (fake clock), then every lane drained
    trace = str(tmp_path / "trace.json")
    prof.export_chrome_trace(trace)
    kernels = _kernels_by_stream(trace)
    lanes = {run.cuda_stream for run in flight.runs}
    assert len(lanes) == 2 and None not in lanes
    busy = sorted(kernels, key=lambda s: -len(kernels[s]))[:2]
    assert len(busy) == 2, f"kernels on streams {list(kernels)}"
    overlap = _overlap_us(kernels[busy[0]], kernels[busy[1]])
    assert overlap > 0, f"no overlap between streams {busy}: {[len(kernels[s]) for s in busy]} kernels"


def test_groups_in_flight_train_as_one_after_another_on_cuda(data_dir, tmp_path) -> None:
    """stn.engine.table_run.run_table with two groups in flight (streams, CUDA graphs, block data drawn ahead on side
    streams) gives the results of the same table run one group after another, float64."""
    import json

    from stn.engine.plan import CostModel, Member, make_groups
    from stn.engine.record import RESULTS
    from stn.engine.table_run import run_table

    members = []
    for label, seeds in (("FCN", (0, 1)), ("ST-CNN Aff", (0,))):
        base = configs(label, seeds=(0,), dataset="R")[0]
        base = dataclasses.replace(base, data_dir=str(data_dir), trainer=dataclasses.replace(
            base.trainer, iterations=12, log_every=4, device="cuda"), dataset=dataclasses.replace(
            base.dataset, test_limit=200))
        members += [Member(label, "R", s, dataclasses.replace(base, seed=s), 1.0) for s in seeds]
    groups = make_groups(members)
    costs = CostModel(table=[{"kind": g.kind, "size": 28, "k": g.k, "images_per_s": 1e9} for g in groups])
    options = EngineOptions(dtype=torch.float64, cuda_graph=True, data="block", block_steps=5)
    out = {}
    for in_flight in (1, 2):
        state = tmp_path / f"in{in_flight}"
        record = run_table(groups, state, budget_s=1e6, device=CUDA, options=options, costs=costs,
                           log=lambda _: None, in_flight=in_flight)
        assert record["done"] == 2
        out[in_flight] = json.loads((state / RESULTS).read_text())["members"]
    for key, one in out[1].items():
        two = out[2][key]
        assert one["test_error"] == two["test_error"]
        assert one["final_loss"] == pytest.approx(two["final_loss"], rel=1e-9)


@pytest.mark.parametrize("dataset", ["R", "TC"])
def test_block_data_drawn_ahead_on_a_side_stream_equals_drawn_inline(dataset: str, data_dir) -> None:
    """The side stream changes where the warps run, not what they draw: the same blocks, bit for bit."""
    from stn.engine.streams import BlockStream

    digits, labels = load_mnist(data_dir, train=True)
    cfgs = configs("CNN", (0, 1, 2), dataset)
    ahead = BlockStream(cfgs, digits, labels, CUDA, block_steps=3, prefetch=True)
    inline = BlockStream(cfgs, digits, labels, CUDA, block_steps=3, prefetch=False)
    assert ahead.side is not None and inline.side is None
    for _ in range(8):  # crosses blocks; the consumer uses each block right after the side stream's draw
        (a_images, a_labels), (b_images, b_labels) = ahead.next(), inline.next()
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)


@pytest.mark.parametrize(("label", "dataset", "mode"), [("ST-CNN Aff", "R", "im2col"), ("ST-CNN TPS", "TC", "im2col"),
                                                         ("CNN", "TC", "loop")])
def test_gpu_paths_equal_the_cpu_vmap_engine(label: str, dataset: str, mode: str) -> None:
    """The paths `conv_path_for` picks on CUDA (im2col; loop with channels_last and cudnn.benchmark for the TC CNN)
    equal the CPU's vmap engine in float64 (noise images: no max-pool ties), eager and CUDA-graphed."""
    from stn.engine.conv_paths import conv_path_for, options_for_mode

    cfgs = configs(label, (0, 1), dataset)
    paper = compose([f"dataset={dataset}", *KINDS[label]])  # the rule reads the paper's batch of 256
    assert conv_path_for(paper, "cuda") == mode
    options = options_for_mode(EngineOptions(dtype=torch.float64), conv_path_for(paper, "cuda"), "cuda")
    assert options.channels_last == (mode == "loop")
    gpu = BatchedModels(cfgs, CUDA, options)
    graph = BatchedModels(cfgs, CUDA, dataclasses.replace(options, cuda_graph=True))
    cpu = BatchedModels(cfgs, "cpu", EngineOptions(dtype=torch.float64))
    if label.startswith("ST"):
        off_identity(gpu, graph, cpu)
    path: dict[str, float] = {}
    size = cfgs[0].dataset.size
    for images, targets in noise_batches(2, 3, size):
        losses = gpu.step(images.to(CUDA), targets.to(CUDA))
        torch.testing.assert_close(graph.step(images.to(CUDA), targets.to(CUDA)), losses, rtol=1e-6, atol=0)
        step_tracking_path(cpu, images, targets, path)
    close_params(gpu, graph)
    close_params(cpu, gpu, path)


def test_im2col_runs_bf16_matmuls_under_cuda_autocast_with_theta_in_float32() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Dtypes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[torch.dtype] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.baddbmm.default:
                self.seen.append(args[1].dtype)
            return func(*args, **(kwargs or {}))

    cfgs = configs("ST-CNN Aff", (0, 1))
    engine = BatchedModels(cfgs, CUDA, EngineOptions(amp=True, mode="im2col"))
    images, targets = noise_batches(2, 1)[0]
    with Dtypes() as dtypes:
        losses = engine.step(images.float().to(CUDA), targets.to(CUDA))
    assert torch.isfinite(losses).all()
    # forward: localisation convs + FC in bf16, the regression (theta) in float32, the classifier in bf16
    assert dtypes.seen[:7] == [torch.bfloat16] * 3 + [torch.float32] + [torch.bfloat16] * 3
