"""The batched engine's training data: K models' streams drawn together (`stn.engine.batched.BatchedModels` eats them).

Two kinds, chosen by `EngineOptions.data`: "exact" (`BatchedStream`: each model's batches are exactly its
`stn train` stream's, the warps of one dataset fused into one call) and "block" (`BlockStream`: the same
epoch orders, distortions drawn many steps at a time, far fewer kernel launches, another sample). Both read
`stn.data.TrainStream`'s own position and generators, so a model's stream resumes with the same state either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from stn.config import Config, DatasetConfig
from stn.data import TrainStream, seeded_generator
from stn.distortions import draw_distortion, draws_whole_pixels
from stn.engine.options import EngineError, EngineOptions
from stn.warp import apply_distortion


class BatchedStream:
    """K training streams, one per model, each the exact `TrainStream(seed=cfg_k.seed)` of `stn train`.

    next() -> images (K, B, 1, S, S) float32, labels (K, B). Per model: its epoch permutation and its batch's
    distortion draws come from the model's own generators (as `TrainStream.next`); the warps of all models
    with the same dataset are then applied in one `apply_distortion` call over their K_d * B digits.
    fused=False calls each stream's own next() instead (the reference the fused path is tested against).
    """

    def __init__(self, cfgs: Sequence[Config], digits: Tensor, labels: Tensor, device: torch.device | str,
                 *, fused: bool = True) -> None:
        self.device = torch.device(device)
        digits, labels = digits.to(self.device), labels.to(self.device)  # one copy shared by all K streams
        self.streams = [TrainStream(digits, labels, cfg.dataset, cfg.trainer.batch_size, cfg.seed, self.device)
                        for cfg in cfgs]
        sizes = {s.cfg.size for s in self.streams}
        batches = {s.batch_size for s in self.streams}
        if len(sizes) != 1 or len(batches) != 1:
            raise EngineError(f"batched streams need one canvas size and batch size, got {sizes} and {batches}")
        self.fused = fused and not any(s.cfg.fixed_train for s in self.streams)
        groups: dict[DatasetConfig, list[int]] = {}
        for k, stream in enumerate(self.streams):
            groups.setdefault(stream.cfg, []).append(k)
        self.groups = list(groups.items())

    def __len__(self) -> int:
        return len(self.streams)

    def next(self) -> tuple[Tensor, Tensor]:
        if not self.fused:
            pairs = [stream.next() for stream in self.streams]
            return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        images: list[Tensor | None] = [None] * len(self.streams)
        labels: list[Tensor | None] = [None] * len(self.streams)
        for cfg, members in self.groups:
            chosen, params = [], []
            for k in members:
                stream = self.streams[k]
                start = stream.position * stream.batch_size
                index = stream._permutation()[start:start + stream.batch_size]
                generator = seeded_generator(self.device, stream.seed, "batch", stream.epoch, stream.position)
                pool = 0 if stream.clutter_source is None else len(stream.clutter_source)
                params.append(draw_distortion(cfg, len(index), generator, self.device, clutter_pool=pool))
                chosen.append(stream.digits.index_select(0, index))
                labels[k] = stream.labels.index_select(0, index)
                stream.position += 1
                if stream.position == stream.batches_per_epoch:
                    stream.epoch, stream.position = stream.epoch + 1, 0
            merged = {key: torch.cat([p[key] for p in params]) for key in params[0]}
            first = self.streams[members[0]]
            warped = apply_distortion(torch.cat(chosen), merged, cfg.size, first.clutter_source, cfg.clutter_size,
                                      whole_pixel=draws_whole_pixels(cfg))
            for i, k in enumerate(members):
                images[k] = warped[i * first.batch_size:(i + 1) * first.batch_size]
        return torch.stack(images), torch.stack(labels)  # type: ignore[arg-type]

    def state_dict(self) -> list[dict[str, Any]]:
        return [stream.state_dict() for stream in self.streams]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        if not isinstance(states, list):
            raise EngineError("this stream state was saved with block streams (data=block): resume with those")
        if len(states) != len(self.streams):
            raise EngineError(f"stream state holds {len(states)} streams, this engine has {len(self.streams)}")
        for stream, state in zip(self.streams, states, strict=True):
            stream.load_state_dict(state)


@dataclass
class _Block:
    """One drawn block: block_steps steps of every model, the stream states it was drawn from, and (on CUDA) the
    event its side stream recorded when the draw was issued."""

    index: int
    images: Tensor  # (T, K, B, 1, S, S) float32
    labels: Tensor  # (T, K, B) int64
    start: list[dict[str, Any]]  # the models' TrainStream states before this block
    ready: Any = None  # torch.cuda.Event on CUDA, None on the CPU


class BlockStream:
    """K training streams drawn `block_steps` steps at a time: far fewer kernel launches than BatchedStream.

    Each model keeps its own epoch order (its `TrainStream`'s permutation, so every step it sees the same
    digits and labels as `stn train seed=k` would), but the distortions are not its TrainStream's: per
    dataset, one generator per block, seeded by (the models' seeds, the dataset, the block index), draws the
    distortions of all its models' next `block_steps` batches, and one `apply_distortion` warps them. Every
    model's stream stays independent of the others' draws within a block (disjoint slices of one draw),
    reproducible and resumable (the state is the block's start and the offset in it), with the distribution
    `stn.distortions` defines; it is simply not the same sample as the exact streams. The draws depend on
    which models share the group (their seeds seed the generator) and on block_steps: the state and
    `stn.engine.plan`'s record say both.

    Off the critical path (`prefetch`, default on CUDA): while the steps consume block n, block n+1 is drawn on
    a side CUDA stream of its own; the consuming stream waits for that block's event only when it reaches it,
    so the warps overlap the training kernels instead of stalling them every block_steps steps. The values are
    the same either way (a block is a function of its start state and index); on the CPU the draw is simply
    made one block early. Memory: block_steps * K * B images of S x S float32 per block (128 x 9 x 256 at
    28x28: 0.92 GB; 128 x 3 x 256 at 60x60: 1.4 GB), two blocks with prefetch, plus the warp's grid while drawing.
    """

    def __init__(self, cfgs: Sequence[Config], digits: Tensor, labels: Tensor, device: torch.device | str,
                 *, block_steps: int = 32, prefetch: bool | None = None) -> None:
        if block_steps < 1:
            raise EngineError(f"block_steps={block_steps} must be at least 1")
        self.inner = BatchedStream(cfgs, digits, labels, device, fused=False)
        self.streams, self.device, self.block_steps = self.inner.streams, self.inner.device, int(block_steps)
        if any(s.cfg.fixed_train for s in self.streams):
            raise EngineError("dataset.fixed_train distorts once up front: use the exact streams (data=exact)")
        self.groups = self.inner.groups
        self.prefetch = self.device.type == "cuda" if prefetch is None else bool(prefetch)
        # the side stream the draws run on (CUDA): it must first see the digits copied on the current stream
        self.side: Any = None
        if self.prefetch and self.device.type == "cuda":
            self.side = torch.cuda.Stream(device=self.device)
            self.side.wait_stream(torch.cuda.current_stream(self.device))
        # each dataset's model positions, on the device once (a host-to-device copy per block could wait)
        self.where = [torch.tensor(members, device=self.device) for _, members in self.groups]
        self.block = 0  # index of the next block to draw
        self.offset = 0  # steps served from the current block
        self.current: _Block | None = None
        self.ahead: _Block | None = None  # the next block, drawn early (prefetch)

    def __len__(self) -> int:
        return len(self.streams)

    @property
    def buffer(self) -> tuple[Tensor, Tensor] | None:
        """The block being served (images, labels), or None before the first draw."""
        return None if self.current is None else (self.current.images, self.current.labels)

    def _indices(self, stream: TrainStream) -> Tensor:
        """The digit indices of this model's next block_steps batches (its epoch order), advancing it."""
        parts = []
        for _ in range(self.block_steps):
            start = stream.position * stream.batch_size
            parts.append(stream._permutation()[start:start + stream.batch_size])
            stream.position += 1
            if stream.position == stream.batches_per_epoch:
                stream.epoch, stream.position = stream.epoch + 1, 0
        return torch.cat(parts)  # (T * B,)

    def _draw(self) -> _Block:
        """Draw block `self.block` from the streams' current states (on the side stream when there is one)."""
        start = self.inner.state_dict()
        context = torch.cuda.stream(self.side) if self.side is not None else contextlib.nullcontext()
        with context:
            images, labels = self._fill()
            ready = None
            if self.side is not None:
                ready = torch.cuda.Event()
                ready.record(self.side)
        block = _Block(self.block, images, labels, start, ready)
        self.block += 1
        return block

    def _fill(self) -> tuple[Tensor, Tensor]:
        steps, k = self.block_steps, len(self.streams)
        first = self.streams[0]
        batch, size = first.batch_size, first.cfg.size
        images = torch.empty(steps, k, batch, 1, size, size, device=self.device)
        labels = torch.empty(steps, k, batch, dtype=torch.int64, device=self.device)
        for (cfg, members), where in zip(self.groups, self.where, strict=True):
            index = torch.stack([self._indices(self.streams[m]).view(steps, batch) for m in members], dim=1)
            flat = index.reshape(-1)  # (T * K_d * B,), step-major
            lead = self.streams[members[0]]
            seeds = tuple(self.streams[m].seed for m in members)
            generator = seeded_generator(self.device, "block", seeds, cfg.name, self.block)
            pool = 0 if lead.clutter_source is None else len(lead.clutter_source)
            params = draw_distortion(cfg, len(flat), generator, self.device, clutter_pool=pool)
            warped = apply_distortion(lead.digits.index_select(0, flat), params, cfg.size, lead.clutter_source,
                                      cfg.clutter_size, whole_pixel=draws_whole_pixels(cfg))
            images.index_copy_(1, where, warped.view(steps, len(members), batch, 1, size, size))
            labels.index_copy_(1, where, lead.labels.index_select(0, flat).view(steps, len(members), batch))
        return images, labels

    def _serve(self, block: _Block) -> None:
        """Make `block` the one served; the consuming (current) stream waits for its draw, and the allocator is
        told the consumer uses its memory (allocated on the side stream), so it is not reused too early."""
        if block.ready is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(block.ready)
            block.images.record_stream(consumer)
            block.labels.record_stream(consumer)
        self.current, self.offset = block, 0

    def next(self) -> tuple[Tensor, Tensor]:
        """images (K, B, 1, S, S) float32, labels (K, B): the next step of every model."""
        if self.current is None or self.offset == self.block_steps:
            block, self.ahead = (self.ahead, None) if self.ahead is not None else (self._draw(), None)
            self._serve(block)
        if self.prefetch and self.ahead is None:
            self.ahead = self._draw()  # issued now, on the side stream: ready long before the steps reach it
        current = self.current
        assert current is not None
        self.offset += 1
        return current.images[self.offset - 1], current.labels[self.offset - 1]

    def state_dict(self) -> dict[str, Any]:
        """Where the served block began, its index and how far into it we are (it is redrawn on load); a block
        drawn ahead is not part of the state (it is a function of the served block's end)."""
        if self.current is None:
            return {"block": self.block, "offset": 0, "streams": self.inner.state_dict(),
                    "block_steps": self.block_steps}
        return {"block": self.current.index, "offset": self.offset, "streams": self.current.start,
                "block_steps": self.block_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise EngineError("this stream state was saved with the exact streams (data=exact): resume with those")
        if int(state["block_steps"]) != self.block_steps:
            raise EngineError(f"stream state was drawn in blocks of {state['block_steps']} steps, this stream "
                              f"uses {self.block_steps}: resume with the same block_steps")
        self.inner.load_state_dict(state["streams"])
        self.block, self.current, self.ahead, self.offset = int(state["block"]), None, None, 0
        if state["offset"]:
            self._serve(self._draw())
            self.offset = int(state["offset"])


def make_stream(cfgs: Sequence[Config], digits: Tensor, labels: Tensor, device: torch.device | str,
                options: EngineOptions) -> BatchedStream | BlockStream:
    """The data streams `options.data` asks for: "exact" (BatchedStream) or "block" (BlockStream)."""
    if options.data == "exact":
        return BatchedStream(cfgs, digits, labels, device, fused=options.fused_data)
    if options.data == "block":
        return BlockStream(cfgs, digits, labels, device, block_steps=options.block_steps, prefetch=options.prefetch)
