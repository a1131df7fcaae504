"""stn.data: the test set is a pure function of its seed; the training stream resumes exactly and redraws."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from geometry import synthetic_digits
from stn.data import TrainStream, make_test_set


def test_test_set_is_a_pure_function_of_its_seed(datasets):
    digits, labels = synthetic_digits(2500, seed=4), torch.arange(2500) % 10
    for name in ("RTS", "TC", "E"):
        cfg = datasets[name]
        first = make_test_set(digits, labels, cfg)
        again = make_test_set(digits, labels, cfg)
        assert first.images.shape == (2500, 1, cfg.size, cfg.size) and first.images.dtype == torch.float32
        assert first.images.numpy().tobytes() == again.images.numpy().tobytes()
        other = make_test_set(digits, labels, dataclasses.replace(cfg, test_seed=cfg.test_seed + 1))
        assert not torch.equal(first.images, other.images)
        limited = make_test_set(digits, labels, dataclasses.replace(cfg, test_limit=1200))
        assert len(limited) == 1200 and torch.equal(limited.images, first.images[:1200])  # a prefix
        assert torch.equal(limited.labels, labels[:1200])


def test_train_stream_resumes_exactly(datasets):
    digits, labels = synthetic_digits(100, seed=6), torch.arange(100)
    for fixed in (False, True):
        cfg = dataclasses.replace(datasets["RTS"], fixed_train=fixed)
        a = TrainStream(digits, labels, cfg, batch_size=16, seed=7)
        assert a.batches_per_epoch == 6
        batches, states = [], []
        for _ in range(14):  # crosses two epoch boundaries
            states.append(a.state_dict())
            batches.append(a.next())
        for j in (3, 6, 9):
            b = TrainStream(digits, labels, cfg, batch_size=16, seed=7)
            b.load_state_dict(states[j])
            for k in range(j, 14):
                images, batch_labels = b.next()
                assert torch.equal(images, batches[k][0]) and torch.equal(batch_labels, batches[k][1])
        assert a.epoch == 2 and a.position == 2


def test_train_stream_redraws_each_epoch_unless_fixed(datasets):
    digits, labels = synthetic_digits(64, seed=8), torch.arange(64)  # labels = digit ids
    for fixed in (False, True):
        stream = TrainStream(digits, labels, dataclasses.replace(datasets["R"], fixed_train=fixed), 64, seed=1)
        (x0, y0), (x1, y1) = stream.next(), stream.next()  # epochs 0 and 1: one batch each
        assert not torch.equal(y0, y1)  # reshuffled
        same = torch.equal(x0[y0.argsort()], x1[y1.argsort()])
        assert same == fixed


def test_train_stream_limit_and_state_checks(datasets):
    digits, labels = synthetic_digits(50), torch.arange(50)
    cfg = dataclasses.replace(datasets["R"], train_limit=20)
    stream = TrainStream(digits, labels, cfg, batch_size=8, seed=0)
    seen = torch.cat([stream.next()[1] for _ in range(stream.batches_per_epoch)])
    assert stream.batches_per_epoch == 2 and int(seen.max()) < 20 and len(set(seen.tolist())) == 16
    other = TrainStream(digits, labels, cfg, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(stream.state_dict())
