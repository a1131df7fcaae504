"""Does the custom first-conv input gradient (InputGradConv2d) pay in float32 on this CPU?

    STN_DATA_DIR=... python experiments/bench/inputgrad_ab.py

Train steps (batch 128, R, channels_last, float32, SGD with momentum) of the fast model against the same model
whose InputGradConv2d layers are replaced by plain nn.Conv2d with the same weights, alternating 8 rounds of 5
steps in one process; prints the median and range of the per-round ratio plain / custom (> 1: custom pays).
"""

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from stn.compose import compose
from stn.fastconv import InputGradConv2d
from stn.models import build_model


def plain_first_conv(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, InputGradConv2d):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size)
                conv.load_state_dict(child.state_dict())
                setattr(module, name, conv)
    return model


def make(cfg, plain: bool):
    torch.manual_seed(0)
    model = build_model(cfg)
    if plain:
        model = plain_first_conv(model)
    model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def step(model, optimizer, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


for extra in (["model=st_cnn", "transformer=affine"], ["model=st_cnn", "transformer=tps"], ["model=cnn"]):
    cfg = compose(["dataset=R", *extra])
    x = torch.rand(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    custom, plain = make(cfg, False), make(cfg, True)
    for _ in range(3):
        step(*custom, x, y)
        step(*plain, x, y)
    ratios = []
    for _ in range(8):
        start = time.perf_counter()
        for _ in range(5):
            step(*custom, x, y)
        custom_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(5):
            step(*plain, x, y)
        ratios.append((time.perf_counter() - start) / custom_s)
    print(f"{' '.join(extra)}: custom {custom_s / 5 * 1e3:.1f} ms/step, plain / custom median "
          f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})", flush=True)
