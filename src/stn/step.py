"""One training step and its parts, as `fit` (stn.train) and the benches use them: the model on its device,
SGD and its schedule, the weight average, the step itself (loss, backward, update; the loss stays on the
device), and evaluation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stn.config import Config, TrainerConfig
from stn.device import runtime_flags


def prepare_model(cfg: Config, device: torch.device) -> nn.Module:
    """The initialised model (seeded by cfg.seed) on `device`, in channels_last if trainer.channels_last."""
    from stn.models import build_model

    torch.manual_seed(cfg.seed)  # the model's initialisation
    model = build_model(cfg).to(device)
    if runtime_flags(cfg.trainer, device, cfg.model)[1]:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(model: nn.Module, trainer: TrainerConfig) -> torch.optim.SGD:
    """SGD over every parameter at trainer.lr; with trainer.loc_lr_scale != 1, a second parameter group holds
    the transformers' localisation nets and regression layers at lr * loc_lr_scale (the classifier's group
    stays first, so param_groups[0] is the rate logged)."""
    options = {"lr": trainer.lr, "momentum": trainer.momentum, "weight_decay": trainer.weight_decay,
               "nesterov": trainer.nesterov}
    if trainer.loc_lr_scale == 1:
        return torch.optim.SGD(model.parameters(), **options)
    loc = [p for n, p in model.named_parameters() if n.startswith("transformers.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("transformers.")]
    return torch.optim.SGD([{"params": rest}, {"params": loc, "lr": trainer.lr * trainer.loc_lr_scale}], **options)


def build_scheduler(optimizer: torch.optim.Optimizer, trainer: TrainerConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per iteration. step: step s (1-based) trains with lr * lr_gamma ** ((s - 1) // lr_step).
    onecycle: PyTorch's OneCycleLR over trainer.iterations steps, peaking at lr after trainer.warmup of them
    (its defaults otherwise)."""
    if trainer.schedule == "onecycle":
        peaks = [trainer.lr * (1 if i == 0 else trainer.loc_lr_scale) for i in range(len(optimizer.param_groups))]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=trainer.iterations,
                                                   pct_start=trainer.warmup)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=trainer.lr_step, gamma=trainer.lr_gamma)


def eval_key(cfg: Config) -> str:
    """What the run's evaluations are called: val_error on a validation split (dataset.validation), else
    test_error."""
    return "val_error" if cfg.dataset.validation else "test_error"


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor,
               *, amp: bool = False, label_smoothing: float = 0.0, grad_clip: float = 0.0) -> Tensor:
    """One SGD step on a batch; returns the batch's mean cross-entropy (with label_smoothing, the smoothed
    one that is minimised) as a detached 0-d tensor (no sync). grad_clip > 0 scales the gradient down to at
    most that global L2 norm first (torch.nn.utils.clip_grad_norm_)."""
    with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(images)  # (B, 10)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    return loss.detach()


def build_average(model: nn.Module, trainer: TrainerConfig) -> torch.optim.swa_utils.AveragedModel | None:
    """The exponential moving average of the weights (trainer.ema_decay > 0; PyTorch's AveragedModel, buffers
    averaged too), or None. Its first update copies the weights, later ones move it by 1 - decay."""
    if not trainer.ema_decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(trainer.ema_decay), use_buffers=True)


def fit_step(forward: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, stream: Any, *, amp: bool,
             channels_last: bool, trainer: TrainerConfig | None = None,
             average: torch.optim.swa_utils.AveragedModel | None = None, model: nn.Module | None = None) -> Tensor:
    """One iteration of `fit`: next batch -> `train_step` (with `trainer`'s label smoothing and clipping) ->
    scheduler step -> the weight average's update from `model`; the loss stays on the device."""
    images, labels = stream.next()
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    recipe = {} if trainer is None else {"label_smoothing": trainer.label_smoothing, "grad_clip": trainer.grad_clip}
    loss = train_step(forward, optimizer, images, labels, amp=amp, **recipe)
    scheduler.step()
    if average is not None:
        average.update_parameters(model if model is not None else forward)
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, test_set: Any, batch_size: int, *, amp: bool = False,
             channels_last: bool = False) -> float:
    """Percentage of misclassified test images (argmax of the logits); the model is left in train mode."""
    model.eval()
    wrong = torch.zeros((), dtype=torch.int64, device=test_set.labels.device)
    for images, labels in test_set.batches(batch_size):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        wrong += (logits.argmax(dim=1) != labels).sum()
    model.train()
    return 100.0 * int(wrong) / len(test_set.labels)


def all_finite(model: nn.Module) -> bool:
    """Whether every parameter is finite (one sync); checked before a checkpoint is allowed to overwrite the last."""
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())
