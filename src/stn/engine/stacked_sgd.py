"""The batched engine's optimiser: torch.optim.SGD's arithmetic and StepLR's schedule over K models' stacked
parameters, one foreach update for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from stn.config import TrainerConfig
from stn.engine.options import EngineError


class StackedSGD:
    """torch.optim.SGD (momentum, dampening 0, no Nesterov, weight decay) + StepLR for stacked parameters.

    The arithmetic is torch's: d = g + wd * p; b = momentum * b + d (b = d on the first step); p -= lr * b.
    The momentum buffers start at zero, so the first update's `0 * momentum + d` is d exactly, as torch's
    clone. The rate follows StepLR's recursion (lr *= gamma every lr_step steps, on the host), so step s
    (1-based) trains with the same float as torch's scheduler gives it. `lr_tensor` holds the same rate on
    the device for the CUDA-graph step, which cannot take a new Python float per replay.
    """

    def __init__(self, params: Sequence[Tensor], trainer: TrainerConfig) -> None:
        self.params = list(params)
        self.momentum, self.weight_decay = float(trainer.momentum), float(trainer.weight_decay)
        self.base_lr, self.lr_step, self.gamma = float(trainer.lr), int(trainer.lr_step), float(trainer.lr_gamma)
        self.lr = self.base_lr
        self.steps = 0  # updates done so far
        self.buffers = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.lr_tensor = torch.full((), self.lr, dtype=torch.float64, device=self.params[0].device)

    def _directions(self) -> list[Tensor]:
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            raise EngineError("a stacked parameter has no gradient: call backward before the update")
        if self.weight_decay:
            grads = torch._foreach_add(grads, self.params, alpha=self.weight_decay)
        if self.momentum:
            torch._foreach_mul_(self.buffers, self.momentum)
            torch._foreach_add_(self.buffers, grads)
            return self.buffers
        return grads

    @torch.no_grad()
    def update(self) -> None:
        """p -= lr * direction with the host's rate (bitwise torch.optim.SGD's single-tensor arithmetic)."""
        torch._foreach_add_(self.params, self._directions(), alpha=-self.lr)

    @torch.no_grad()
    def update_from_tensor(self) -> None:
        """The same update reading the rate from `lr_tensor` (capturable in a CUDA graph)."""
        directions = self._directions()
        scale = (-self.lr_tensor).to(self.params[0].dtype)
        torch._foreach_add_(self.params, torch._foreach_mul(directions, scale))

    def advance(self) -> None:
        """The scheduler's step, once per iteration after the update (StepLR's recursive form)."""
        self.steps += 1
        if self.steps % self.lr_step == 0:
            self.lr = self.lr * self.gamma
            self.lr_tensor.fill_(self.lr)

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "steps": self.steps, "buffers": [b.detach().clone() for b in self.buffers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["buffers"]) != len(self.buffers):
            raise EngineError("optimizer state has another number of parameters")
        with torch.no_grad():
            for mine, saved in zip(self.buffers, state["buffers"], strict=True):
                mine.copy_(saved)
        self.lr, self.steps = float(state["lr"]), int(state["steps"])
        self.lr_tensor.fill_(self.lr)
