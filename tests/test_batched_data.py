"""stn.engine.streams: the fused streams are each model's own TrainStream; block streams keep each model's
epoch order and resume mid-block."""

from __future__ import annotations

import pytest
import torch

from engine_setup import CPU, KINDS, configs
from stn.data import TrainStream
from stn.engine.options import EngineError
from stn.engine.streams import BatchedStream, BlockStream


@pytest.mark.parametrize("dataset", ["R", "RTS", "P", "E", "TC"])
def test_fused_stream_equals_each_models_train_stream(dataset, mnist) -> None:
    cfgs = configs(KINDS["CNN"], datasets=(dataset,), seeds=(0, 5, 9))
    fused = BatchedStream(cfgs, *mnist, CPU)
    own = [TrainStream(*mnist, cfg.dataset, cfg.trainer.batch_size, cfg.seed, CPU) for cfg in cfgs]
    for _ in range(4):  # crosses an epoch boundary (3 batches per epoch)
        images, labels = fused.next()
        for k, stream in enumerate(own):
            ref_images, ref_labels = stream.next()
            assert torch.equal(labels[k], ref_labels)
            # per-image warps: the same kernel on the same inputs, whatever else is in the batch
            torch.testing.assert_close(images[k], ref_images, rtol=0, atol=1e-6)
    assert fused.state_dict() == [s.state_dict() for s in own]


def test_block_stream_keeps_each_models_epoch_order(mnist) -> None:
    """Same digits and labels per step as each model's TrainStream; on plain MNIST (no random warp) the same
    images too. 7 steps in blocks of 3 with 3 batches per epoch: crosses blocks and epochs."""
    for dataset in ("plain", "R", "TC"):
        cfgs = configs(KINDS["CNN"], datasets=(dataset,), seeds=(0, 4))
        block = BlockStream(cfgs, *mnist, CPU, block_steps=3)
        own = [TrainStream(*mnist, cfg.dataset, cfg.trainer.batch_size, cfg.seed, CPU) for cfg in cfgs]
        for _ in range(7):
            images, labels = block.next()
            for k, stream in enumerate(own):
                ref_images, ref_labels = stream.next()
                assert torch.equal(labels[k], ref_labels)
                if dataset == "plain":
                    assert torch.equal(images[k], ref_images)
        if dataset != "plain":
            assert not torch.equal(images[0], images[1])


@pytest.mark.parametrize("prefetch", [False, True])
def test_block_stream_resumes_mid_block_and_is_reproducible(mnist, prefetch: bool) -> None:
    """Drawing the next block ahead (prefetch, as on CUDA's side stream) changes neither the batches nor the
    state: a stream that drew ahead resumes, mid-block, to the same batches as one that never did."""
    cfgs = configs(KINDS["CNN"], datasets=("P", "E"), seeds=(0, 1))
    straight = BlockStream(cfgs, *mnist, CPU, block_steps=4, prefetch=False)
    expected = [straight.next() for _ in range(9)]
    first = BlockStream(cfgs, *mnist, CPU, block_steps=4, prefetch=prefetch)
    for step in range(5):
        images, labels = first.next()
        assert torch.equal(images, expected[step][0]) and torch.equal(labels, expected[step][1])
    assert (first.ahead.index == 2) if prefetch else first.ahead is None  # block 1 served, block 2 drawn ahead
    resumed = BlockStream(cfgs, *mnist, CPU, block_steps=4, prefetch=prefetch)
    resumed.load_state_dict(first.state_dict())
    for images, labels in expected[5:]:
        got_images, got_labels = resumed.next()
        assert torch.equal(got_images, images) and torch.equal(got_labels, labels)
    with pytest.raises(EngineError, match="block"):
        BatchedStream(cfgs, *mnist, CPU).load_state_dict(first.state_dict())
    with pytest.raises(EngineError, match="same block_steps"):
        BlockStream(cfgs, *mnist, CPU, block_steps=2).load_state_dict(first.state_dict())
