"""stn.measure: FLOP counts equal hand counts (a tiny model, the FCN); nominal GPU peaks by device name."""

from __future__ import annotations

import torch
from torch import nn

from stn.compose import compose
from stn.measure import count_step_flops, model_flops_per_image, nominal_peak
from stn.models import build_model


def test_flop_count_of_a_tiny_model_equals_the_hand_count():
    """conv 1->2 3x3 on 5x5 (3x3 out) -> Linear 18 -> 10. Multiply-adds per image: conv forward 3*3*2*9 = 162,
    its weight gradient 162 (no input gradient: the images need none); Linear forward 180, weight gradient 180,
    input gradient 180 (the conv needs it). 864 multiply-adds = 1728 FLOPs per image."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 10))
    batch = 3
    flops = count_step_flops(model, torch.rand(batch, 1, 5, 5), torch.arange(batch))
    assert flops == 1728 * batch


def test_flop_count_of_the_fcn_equals_the_hand_count():
    """FCN on R, 208 units: forward 784*208 + 208*208 + 208*10 multiply-adds, weight gradients the same again,
    input gradients of the last two layers only (the images need none)."""
    cfg = compose(["dataset=R", "model=fcn"])
    units = build_model(cfg).widths["fc_units"]
    forward = 784 * units + units * units + units * 10
    expected = 2 * (2 * forward + units * units + units * 10)
    assert model_flops_per_image(cfg) == expected


def test_nominal_peaks_by_device_name():
    assert nominal_peak("NVIDIA H100 80GB HBM3") == (989.0, 67.0)
    assert nominal_peak("NVIDIA H100 PCIe") == (756.0, 51.0)
    assert nominal_peak("NVIDIA A100-SXM4-80GB") == (312.0, 19.5)
    assert nominal_peak("Some Future GPU") is None
