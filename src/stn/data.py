"""Distorted MNIST as training consumes it: `distort` (draw + warp a batch), the training stream, the test set.

MNIST's files are `stn.mnist`'s, the random draws `stn.distortions`', the warp `stn.warp`'s; previews of these
datasets are drawn by `stn.visualize`.

Every random draw comes from an explicit `torch.Generator`; the training stream derives one per (seed,
epoch, batch index) and the test set one per (test_seed, chunk), so both are reproducible and resumable.
Draws are reproducible per device type (a CUDA generator gives other numbers than a CPU one), which is
why the test set is always generated on the CPU and then moved: CPU and GPU runs score the same digits.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from stn.config import DIGIT, Config, DatasetConfig
from stn.distortions import draw_distortion, draws_whole_pixels
from stn.mnist import load_mnist
from stn.validation import check_dataset
from stn.warp import apply_distortion

TEST_CHUNK = 1000  # test-set generation chunk: bounds memory, and makes a limited test set a prefix of the full one
FIXED_CHUNK = 4096  # chunk for distorting the whole training set once (fixed_train)


def distort(digits: Tensor, cfg: DatasetConfig, generator: torch.Generator,
            clutter_source: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Distort a batch of digits (B, 28, 28) into images (B, 1, S, S) float32 in [0, 1], on digits.device.

    Returns the images and the per-sample parameters (`distortion_params` plus, for TC, clutter_index
    (B, n), clutter_crop (B, n, 2) xy in the source digit and clutter_position (B, n, 2) xy top-left in the canvas).
    """
    device = digits.device
    if generator.device.type != device.type:
        raise ValueError(f"the generator is on {generator.device} but the digits are on {device}: use one device")
    if digits.dim() != 3 or digits.shape[1:] != (DIGIT, DIGIT):
        raise ValueError(f"digits must be (B, 28, 28), got {tuple(digits.shape)}")
    pool = 0 if clutter_source is None else len(clutter_source)
    params = draw_distortion(cfg, len(digits), generator, device, clutter_pool=pool, digits=digits)
    images = apply_distortion(digits, params, cfg.size, clutter_source, cfg.clutter_size,
                              whole_pixel=draws_whole_pixels(cfg))
    return images, params


# ------------------------------------------------------------------------------------- stream and test set


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple, e.g. (seed, 'batch', epoch, index): independent streams, no shared state."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_generator(device: torch.device, *parts: int | str) -> torch.Generator:
    """A fresh generator on `device` seeded by `derive_seed(*parts)` (the batched engine's streams use it too)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(*parts))
    return generator


class TrainStream:
    """Endless training batches: a fresh permutation per epoch, a fresh distortion per batch.

    Batch b of epoch e depends only on (seed, e, b), so `state_dict()` = (epoch, position) is enough to resume
    exactly. The last partial batch of an epoch is dropped (every step sees `batch_size` images). With
    cfg.fixed_train the training set is distorted once up front and each epoch only reshuffles it.
    Digits live on `device`, copied there once; the whole split stays there as the clutter source.
    """

    def __init__(self, digits: Tensor, labels: Tensor, cfg: DatasetConfig, batch_size: int, seed: int,
                 device: torch.device | str = "cpu") -> None:
        self.cfg, self.seed, self.device = cfg, int(seed), torch.device(device)
        check_dataset(cfg)
        count = len(digits) if cfg.train_limit is None else min(cfg.train_limit, len(digits))
        if count <= 0 or not 0 < batch_size <= count:  # refused, never clamped: every batch is what was asked
            raise ValueError(f"need digits and a batch size in [1, {count}] (dataset.train_limit={cfg.train_limit}, "
                             f"batch_size={batch_size}, {len(digits)} digits)")
        all_digits = digits.to(self.device)
        self.clutter_source = all_digits if cfg.clutter else None
        self.digits, self.labels = all_digits[:count], labels[:count].to(self.device)
        self.batch_size = batch_size
        self.batches_per_epoch = count // self.batch_size
        self.epoch, self.position = 0, 0
        self._order: tuple[int, Tensor] | None = None
        self.fixed: Tensor | None = None
        if cfg.fixed_train:
            chunks = []
            for start in range(0, count, FIXED_CHUNK):
                generator = seeded_generator(self.device, self.seed, "fixed", start // FIXED_CHUNK)
                chunks.append(distort(self.digits[start:start + FIXED_CHUNK], cfg, generator, self.clutter_source)[0])
            self.fixed = torch.cat(chunks)  # (N, 1, S, S), float32

    def _permutation(self) -> Tensor:
        if self._order is None or self._order[0] != self.epoch:
            generator = seeded_generator(self.device, self.seed, "order", self.epoch)
            self._order = (self.epoch, torch.randperm(len(self.digits), generator=generator, device=self.device))
        return self._order[1]

    def next(self) -> tuple[Tensor, Tensor]:
        """The next (images (B, 1, S, S) float32, labels (B,) int64) on the stream's device."""
        index = self._permutation()[self.position * self.batch_size:(self.position + 1) * self.batch_size]
        if self.fixed is not None:
            images = self.fixed.index_select(0, index)
        else:
            generator = seeded_generator(self.device, self.seed, "batch", self.epoch, self.position)
            images, _ = distort(self.digits.index_select(0, index), self.cfg, generator, self.clutter_source)
        labels = self.labels.index_select(0, index)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return images, labels

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "digits": len(self.digits),
                "batch_size": self.batch_size, "dataset": self.cfg.name, "fixed_train": self.cfg.fixed_train}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off; refuses a state saved by a differently configured stream."""
        mine = self.state_dict()
        for key in ("seed", "digits", "batch_size", "dataset", "fixed_train"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"data stream state has {key}={state[key]!r} but this stream has {mine[key]!r}: "
                                 "resume with the configuration the run was started with")
        if not 0 <= int(state["position"]) < self.batches_per_epoch:
            raise ValueError(f"data stream state position={state['position']} is outside [0, {self.batches_per_epoch})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


@dataclass
class TestSet:
    """The fixed, distorted test split: images (N, 1, S, S) float32, labels (N,) int64, params per sample."""

    __test__ = False  # not a pytest class, despite the name

    images: Tensor
    labels: Tensor
    params: dict[str, Tensor]

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self), batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]


def make_test_set(digits: Tensor, labels: Tensor, cfg: DatasetConfig, device: torch.device | str = "cpu") -> TestSet:
    """Distort the test digits, a pure function of cfg.test_seed (bytes identical on every call and machine).

    Generated on the CPU in chunks of TEST_CHUNK with one generator per chunk, then moved to `device`;
    with cfg.test_limit=n the set is the first n samples of the full set. Clutter comes from the whole split.
    """
    check_dataset(cfg)
    digits, labels = digits.cpu(), labels.cpu()
    count = len(digits) if cfg.test_limit is None else min(cfg.test_limit, len(digits))
    if count <= 0:
        raise ValueError(f"dataset.test_limit={cfg.test_limit} leaves no test digits")
    clutter = digits if cfg.clutter else None
    images, params = [], []
    for start in range(0, count, TEST_CHUNK):
        generator = seeded_generator(torch.device("cpu"), cfg.test_seed, "test", start // TEST_CHUNK)
        chunk_images, chunk_params = distort(digits[start:start + TEST_CHUNK], cfg, generator, clutter)
        images.append(chunk_images)
        params.append(chunk_params)
    device = torch.device(device)
    return TestSet(
        images=torch.cat(images)[:count].to(device),
        labels=labels[:count].to(device),
        params={key: torch.cat([p[key] for p in params])[:count].to(device) for key in params[0]},
    )


def build_data(cfg: Config, device: torch.device | str) -> tuple[TrainStream, TestSet]:
    """Load MNIST from cfg.data_dir and build the training stream and the fixed set the run evaluates on:
    the test set, or with dataset.validation=N the last N training digits (never trained on), distorted with
    test_seed + 1 so that no validation draw repeats a test draw."""
    train_digits, train_labels = load_mnist(cfg.data_dir, train=True, download=cfg.download)
    held = cfg.dataset.validation
    if held:
        keep = len(train_digits) - held
        stream = TrainStream(train_digits[:keep], train_labels[:keep], cfg.dataset, cfg.trainer.batch_size,
                             cfg.seed, device)
        seed = dataclasses.replace(cfg.dataset, test_seed=cfg.dataset.test_seed + 1)
        return stream, make_test_set(train_digits[keep:], train_labels[keep:], seed, device)
    test_digits, test_labels = load_mnist(cfg.data_dir, train=False, download=cfg.download)
    stream = TrainStream(train_digits, train_labels, cfg.dataset, cfg.trainer.batch_size, cfg.seed, device)
    return stream, make_test_set(test_digits, test_labels, cfg.dataset, device)
