"""Many models of one shape trained together in one process: the batched engine.

K models that share one architecture (the seeds of a Table 1 cell; one architecture across the 28x28
datasets R, P and E) are stacked parameter by parameter (`torch.func.stack_module_state`) and run as one
function, `vmap(functional_call)`: PyTorch's batching rules turn the K convolutions into one grouped
convolution and the K linear layers into one batched matmul, so a step costs one set of kernel launches for
all K models instead of K. Each model keeps everything that makes it itself:

- its initialisation: built exactly as `stn.step.prepare_model` builds it (`torch.manual_seed(cfg.seed)`,
  then `build_model`), with the paper's layer order and plain nn.Conv2d (`build_model(cfg, fast=False)`:
  the fast layout's `autograd.Function` does not run under torch.func; same state dict either way);
- its data stream: batch b of epoch e of model k is `TrainStream(seed=cfg_k.seed)`'s batch, drawn from the
  same per-(seed, epoch, batch) generators; the draws are per model (small), the warps of every model that
  shares a dataset are one `grid_sample` over all their images (`stn.engine.streams.BatchedStream`);
- its loss (cross-entropy in float32 as `stn.step.train_step` computes it), its momentum buffer and its
  learning-rate schedule (`StackedSGD`: torch.optim.SGD's arithmetic, momentum, weight decay, StepLR).

The summed loss's gradient w.r.t. model k's slice of the stacked parameters is model k's own gradient (the
models share no computation), so "K batched models" equals "K runs of `stn train seed=k`" up to the
summation order inside the batched kernels (tests/test_batched.py checks this in float64 for every kind).

Three ways to run the K models' layers (`EngineOptions.mode`; `conv_path_for` says which a group takes):
"vmap" (the reference above), "loop" (a Python loop over the K models through `stn train`'s kernels; on CUDA
with cudnn.benchmark on) and "im2col" (`stn.engine.im2col`: every convolution as explicit patches times weights in
one `baddbmm` with the K models as the batch dimension, for the GPU, where vmap's grouped convolutions are
slow). All three equal `stn train`'s step in float64 (tests/test_engine_paths.py).

Options (`EngineOptions`): bf16 autocast (theta, grids and sampling stay float32: `SpatialTransformer`
turns autocast off around them), channels_last, `torch.compile` of the loss function, and a CUDA graph of
the whole step (forward, backward, SGD update; data is generated eagerly into the graph's static inputs).
The step never reads anything back to the host: the per-model losses accumulate on the device and are read
every `log_every` steps; a non-finite loss is pinned to its step per model on the device.

This module owns the model stack, `BatchedModels` (forward, step, CUDA graph, evaluation, state); which
configs can be batched and the options are `stn.engine.options`', the stacked SGD `stn.engine.stacked_sgd`'s,
the rule that picks a conv path `stn.engine.conv_paths`'. The data streams are `stn.engine.streams`'s, and
a group being trained to a deadline is `stn.engine.group_run`'s.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stn.config import OPTIMISER_KEYS, Config
from stn.engine.options import ENGINE_MODES, EngineError, EngineOptions, shape_signature
from stn.engine.stacked_sgd import StackedSGD

ENGINE_STATE_VERSION = 1


# ------------------------------------------------------------------------------------------- model shape


# ----------------------------------------------------------------------------------------- conv paths


def build_member(cfg: Config) -> nn.Module:
    """Model k as `stn.step.prepare_model` initialises it (seeded by cfg.seed), paper layer order, on the CPU."""
    from stn.models import build_model

    torch.manual_seed(cfg.seed)
    return build_model(cfg, fast=False)


# ----------------------------------------------------------------------------------------------- the SGD


# ---------------------------------------------------------------------------------------------- engine


def _nhwc(x: Tensor) -> Tensor:
    """(..., C, H, W) with each trailing (C, H, W) block laid out channels-last."""
    if x.dim() < 4:
        return x
    order = list(range(x.dim() - 3)) + [x.dim() - 2, x.dim() - 1, x.dim() - 3]
    back = list(range(x.dim() - 3)) + [x.dim() - 1, x.dim() - 3, x.dim() - 2]
    return x.permute(order).contiguous().permute(back)


class BatchedModels:
    """K models of one shape, as stacked parameters and one vmapped forward; see the module docstring.

    cfgs: one full Config per model (dataset, model, transformer, trainer, seed). The trainers must agree on
    the optimisation settings (batch size, lr, momentum, weight decay, schedule): they share one update.
    """

    def __init__(self, cfgs: Sequence[Config], device: torch.device | str = "cpu",
                 options: EngineOptions = EngineOptions()) -> None:
        if not cfgs:
            raise EngineError("no models to batch")
        self.cfgs, self.device, self.options = list(cfgs), torch.device(device), options
        signatures = {shape_signature(cfg) for cfg in self.cfgs}
        if len(signatures) != 1:
            raise EngineError("these models differ in shape and cannot be batched: "
                              + ", ".join(f"{c.run_name}(seed {c.seed})" for c in self.cfgs))
        trainers = {tuple(getattr(c.trainer, k) for k in OPTIMISER_KEYS) for c in self.cfgs}
        if len(trainers) != 1:
            raise EngineError(f"batched models share one optimiser: their trainer.{OPTIMISER_KEYS} differ "
                              f"({trainers})")
        beyond = sorted({f"trainer.{k}={getattr(c.trainer, k)}" for c in self.cfgs
                         for k, paper in (("schedule", "step"), ("nesterov", False), ("loc_lr_scale", 1.0),
                                          ("label_smoothing", 0.0), ("grad_clip", 0.0), ("ema_decay", 0.0))
                         if getattr(c.trainer, k) != paper})
        if beyond:
            raise EngineError(f"the engine trains the paper's recipe only (SGD, step schedule, one rate), not "
                              f"{', '.join(beyond)}: train these with stn train or stn reproduce-table")
        if options.cuda_graph and self.device.type != "cuda":
            raise EngineError("cuda_graph needs a CUDA device")
        members = [build_member(cfg) for cfg in self.cfgs]
        params, buffers = torch.func.stack_module_state(members)
        self.base = copy.deepcopy(members[0]).to("meta")  # the module structure; its own tensors are unused
        self.parameters_per_model = sum(p.numel() for p in members[0].parameters())
        self.names = list(params)

        def prepare(t: Tensor) -> Tensor:
            t = t.detach().to(device=self.device, dtype=options.dtype if t.is_floating_point() else t.dtype)
            return _nhwc(t) if options.channels_last and t.dim() == 5 else t.contiguous()

        self.params = {n: prepare(p).requires_grad_() for n, p in params.items()}
        self.buffers = {n: prepare(b) for n, b in buffers.items()}
        self.optimizer = StackedSGD(list(self.params.values()), self.cfgs[0].trainer)
        self.step_count = 0

        def one(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
            return torch.func.functional_call(self.base, (params, buffers), (x,))

        if options.mode == "vmap":
            self._forward = torch.func.vmap(one, in_dims=(0, 0, 0))
            self._forward_shared = torch.func.vmap(one, in_dims=(0, 0, None))
        elif options.mode == "loop":
            def looped(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, shared: bool = False
                       ) -> Tensor:
                return torch.stack([one({n: p[k] for n, p in params.items()}, {n: b[k] for n, b in buffers.items()},
                                        x if shared else x[k]) for k in range(self.k)])

            self._forward = looped
            self._forward_shared = functools.partial(looped, shared=True)
            if self.device.type == "cuda":
                # each model runs cuDNN's ordinary (ungrouped) convolutions: let cuDNN time its algorithms for
                # these shapes once (a process-wide switch; the shapes never change during training)
                torch.backends.cudnn.benchmark = True
        elif options.mode == "im2col":
            from stn.engine.im2col import stacked_forward

            def stacked(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
                return stacked_forward(self.base, params, x)  # these models hold no buffers

            self._forward = stacked
            self._forward_shared = lambda params, buffers, x: stacked(params, buffers, x.expand(self.k, *x.shape))
        else:
            raise EngineError(f"engine mode {options.mode!r}: expected one of {', '.join(ENGINE_MODES)}")
        loss_fn = self._losses
        if options.compile:
            loss_fn = torch.compile(loss_fn, backend=options.compile_backend)
        self._loss_fn = loss_fn
        self._graph: Any = None

    @property
    def k(self) -> int:
        return len(self.cfgs)

    # ---- forward and loss

    def _amp(self) -> Any:
        # cache_enabled=False: autocast's cache of cast weights must not outlive a CUDA-graph capture (PyTorch's
        # CUDA-graph notes); each weight is used once per forward here, so the cache saves nothing anyway
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.options.amp,
                              cache_enabled=False)

    def _inputs(self, images: Tensor) -> Tensor:
        images = images.to(self.options.dtype)
        return _nhwc(images) if self.options.channels_last else images

    def forward(self, images: Tensor) -> Tensor:
        """images (K, B, C, S, S) -> logits (K, B, 10)."""
        with self._amp():
            return self._forward(self.params, self.buffers, self._inputs(images))

    def _losses(self, params: dict[str, Tensor], buffers: dict[str, Tensor], images: Tensor,
                labels: Tensor) -> Tensor:
        with self._amp():
            logits = self._forward(params, buffers, images)  # (K, B, 10)
        # As train_step: cross-entropy of float32 logits, the mean over each model's own batch.
        per_image = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        return per_image.view(labels.shape).mean(dim=1)  # (K,)

    def losses(self, images: Tensor, labels: Tensor) -> Tensor:
        return self._loss_fn(self.params, self.buffers, self._inputs(images), labels)

    # ---- one step

    def _eager_step(self, images: Tensor, labels: Tensor) -> Tensor:
        for p in self.params.values():
            p.grad = None
        losses = self.losses(images, labels)
        losses.sum().backward()  # model k's slice of every gradient is d loss_k / d params_k
        self.optimizer.update()
        return losses.detach()

    def step(self, images: Tensor, labels: Tensor) -> Tensor:
        """One SGD step of all K models on their own batches; returns the (K,) losses, on the device."""
        if self.options.cuda_graph:
            losses = self._graph_step(images, labels)
        else:
            losses = self._eager_step(images, labels)
        self.optimizer.advance()
        self.step_count += 1
        return losses

    def _graph_step(self, images: Tensor, labels: Tensor) -> Tensor:
        if self._graph is None:
            self._capture(images, labels)
        static_images, static_labels, static_losses, graph = self._graph
        static_images.copy_(self._inputs(images))
        static_labels.copy_(labels)
        graph.replay()
        return static_losses.clone()

    def _capture(self, images: Tensor, labels: Tensor) -> None:
        """Capture forward + backward + update (rate from the device tensor). Warm-up steps on a side stream
        first, as CUDA graphs need; they are real steps only if `warmup` of them ran, so the warm-up here
        runs on throwaway copies of the parameters and momentum (the models are left untouched)."""
        static_images = self._inputs(images).clone()
        static_labels = labels.clone()
        saved = ({n: p.detach().clone() for n, p in self.params.items()},
                 [b.clone() for b in self.optimizer.buffers])

        def body() -> Tensor:
            losses = self._loss_fn(self.params, self.buffers, static_images, static_labels)
            losses.sum().backward()
            self.optimizer.update_from_tensor()
            return losses.detach()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                for p in self.params.values():
                    p.grad = None
                body()
        torch.cuda.current_stream().wait_stream(side)
        for p in self.params.values():
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_losses = body()
        with torch.no_grad():  # undo the warm-up and capture updates
            for name, p in self.params.items():
                p.copy_(saved[0][name])
            for mine, old in zip(self.optimizer.buffers, saved[1], strict=True):
                mine.copy_(old)
        self._graph = (static_images, static_labels, static_losses, graph)

    # ---- evaluation

    @torch.no_grad()
    def evaluate(self, test_sets: Sequence[Any], batch_size: int = 1000) -> list[float]:
        """Test error (%) of each model on its own test set (`stn.data.TestSet`, one per model; shared sets
        are read once per chunk). The same argmax rule as `stn.step.evaluate`."""
        if len(test_sets) != self.k:
            raise EngineError(f"{len(test_sets)} test sets for {self.k} models")
        count = {len(t) for t in test_sets}
        if len(count) != 1:
            raise EngineError(f"test sets of different lengths: {count}")
        total = count.pop()
        wrong = torch.zeros(self.k, dtype=torch.int64, device=self.device)
        shared = len({id(t) for t in test_sets}) == 1  # one test set for all: read each chunk once
        for start in range(0, total, batch_size):
            if shared:
                chunk = test_sets[0].images[start:start + batch_size].to(self.device)
                with self._amp():
                    logits = self._forward_shared(self.params, self.buffers, self._inputs(chunk[None])[0])
            else:
                chunk = torch.stack([t.images[start:start + batch_size] for t in test_sets]).to(self.device)
                logits = self.forward(chunk)
            labels = torch.stack([t.labels[start:start + batch_size] for t in test_sets]).to(self.device)
            wrong += (logits.argmax(dim=-1) != labels).sum(dim=1)
        return [100.0 * int(w) / total for w in wrong.cpu()]

    # ---- state

    def member_state_dict(self, k: int) -> dict[str, Tensor]:
        """Model k's weights as a plain state dict (loads into `build_model(cfg_k)`, fast or not)."""
        state = {n: p.detach()[k].contiguous().clone() for n, p in self.params.items()}
        state.update({n: b[k].clone() for n, b in self.buffers.items()})
        return state

    def state_dict(self) -> dict[str, Any]:
        return {"version": ENGINE_STATE_VERSION, "step": self.step_count,
                "params": {n: p.detach().clone() for n, p in self.params.items()},
                "buffers": {n: b.clone() for n, b in self.buffers.items()},
                "optimizer": self.optimizer.state_dict(),
                "members": [(c.run_name, c.seed) for c in self.cfgs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != ENGINE_STATE_VERSION:
            raise EngineError(f"engine state version {state.get('version')}, this stn reads {ENGINE_STATE_VERSION}")
        members = [tuple(m) for m in state["members"]]
        mine = [(c.run_name, c.seed) for c in self.cfgs]
        if members != mine:
            raise EngineError(f"engine state holds models {members}, this engine has {mine}")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["params"][name])
            for name, b in self.buffers.items():
                b.copy_(state["buffers"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self._graph = None

