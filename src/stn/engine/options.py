"""What a batched group is: which configs can train together (`shape_signature`), how its step runs
(`EngineOptions`, `ENGINE_MODES`) and the engine's error. Shared by the models (stn.engine.batched), their
optimiser (stn.engine.stacked_sgd), the conv-path rule (stn.engine.conv_paths) and the planner.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from stn.config import Config

ENGINE_MODES = ("vmap", "loop", "im2col")  # EngineOptions.mode


class EngineError(RuntimeError):
    """Models that cannot be batched together, or a state that does not fit; the message says why."""


def shape_signature(cfg: Config) -> str:
    """What must agree for two configs to be batched: the module tree with every layer's shape, the input size
    and the transformer's pooling. Built on the meta device (no memory, no initialisation); once per config
    up to its seed, which changes no shape (a plan asks for the same few configs many times)."""
    key = repr(dataclasses.replace(cfg, seed=0))
    if key not in _SIGNATURES:
        from stn.models import build_model

        with torch.device("meta"):
            model = build_model(cfg, fast=False)
        shapes = ";".join(f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters())
        _SIGNATURES[key] = f"size={cfg.dataset.size}|pool={cfg.dataset.st_output_pool}|{model!r}|{shapes}"
    return _SIGNATURES[key]


_SIGNATURES: dict[str, str] = {}


@dataclass(frozen=True)
class EngineOptions:
    """How the batched step runs. Defaults: eager float32 (the CPU path, bit-for-bit torch's arithmetic).

    amp under vmap on the CPU is float32 arithmetic: under `torch.autocast("cpu", torch.bfloat16)` a vmapped
    conv2d and a vmapped linear both return float32 from float32 inputs, where the same ops outside vmap
    return bf16 (torch 2.14.1; tests/test_engine_paths.py asserts both; for the conv, the batching rule's
    grouped aten::convolution is not on CPU autocast's list). So the engine's CPU "bf16" vmap steps ran their
    convolutions and matmuls in float32. "loop" (plain per-model calls) and "im2col" (baddbmm, its patches
    cast to autocast's dtype first) honour autocast on the CPU and on CUDA; theta, grids and sampling stay
    float32 on every path. Whether CUDA autocast reaches vmap's convolutions is not checked (no GPU here).
    """

    dtype: torch.dtype = torch.float32  # parameter dtype (float64 for the equality tests)
    amp: bool = False  # bf16 autocast of the forward (CUDA); theta, grids and sampling stay float32
    channels_last: bool = False  # each model's images and conv weights in NHWC layout
    compile: bool = False  # torch.compile the loss function (forward + loss)
    compile_backend: str = "inductor"  # e.g. "eager" to check tracing without a C++ compiler
    cuda_graph: bool = False  # capture forward + backward + update as one CUDA graph (CUDA only)
    fused_data: bool = True  # one warp per dataset for all models (see BatchedStream)
    # "vmap": one batched call per layer (grouped convs, batched matmuls); "loop": a Python loop over the
    # K models, each through the same kernels as `stn train` (the exactness reference and the K-runs baseline;
    # on CUDA it turns cudnn.benchmark on); "im2col": explicit patches @ weights per conv, one baddbmm for the
    # K models (stn.engine.im2col). `conv_path_for` is the rule that picks one per group.
    mode: str = "vmap"
    # "exact": each model's batches are its `stn train` stream's (BatchedStream); "block": drawn block_steps
    # steps at a time per dataset (BlockStream: same epoch order, other distortion samples, ~K*T fewer launches)
    data: str = "exact"
    # 128: a block's launches barely depend on its length, so per step they fall from 6-16 at 32 (the first
    # loan's README) to ~1.5-4; memory is two blocks per group in flight (BlockStream's docstring)
    block_steps: int = 128
    prefetch: bool | None = None  # block data: draw the next block ahead on a side stream (None: on CUDA only)
