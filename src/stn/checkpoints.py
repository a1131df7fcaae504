"""A run's checkpoint: what it holds, saving and loading it, putting it back into a model and its optimizer,
and reading a trained model back from one.

Checkpoint: {"version", "step", "model", "optimizer", "scheduler", "rng": {"cpu", "cuda"}, "stream",
"config", "clock", "precisions", "wandb_id" (the W&B run a resume continues, when W&B was on)}, tensors
and primitives only, so it loads with torch.load(weights_only=True). Where it lives in a run folder
(`checkpoints/last.pt`) and when a run may continue from it are stn.runs'.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stn.compose import from_container
from stn.config import Config, ConfigError, to_dict
from stn.runs import CheckpointError, write_atomic

if TYPE_CHECKING:  # torch is imported where a checkpoint is built or loaded, not with the module
    import torch
    from torch import nn


CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    # Serialised in memory first, then written by write_atomic: a full disk is then one OSError there (torch's
    # zip writer reports it as "unexpected pos ..."), and the previous checkpoint is kept.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())


def evaluated_weights(state: dict[str, Any]) -> dict[str, Any]:
    """The weights a checkpoint's run evaluates with: its weight average's (trainer.ema_decay > 0, saved by
    torch's AveragedModel as module.<name> beside n_averaged) when it keeps one, else the trained model's."""
    average = state.get("average")
    if not average:
        return state["model"]
    return {key.removeprefix("module."): value for key, value in average.items() if key.startswith("module.")}


def load_checkpoint(path: Path, device: Any) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (weights_only: tensors and primitives, no code)."""
    import torch

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated zip, a foreign pickle, ...: all mean "not a usable checkpoint"
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(err).__name__}: {str(err).splitlines()[0]}); "
            f"delete it to start that run over"
        ) from None
    required = {"version", "step", "model", "optimizer", "scheduler", "rng", "stream", "config"}
    if not isinstance(state, dict) or not required <= set(state):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} is not an stn checkpoint (expected keys {sorted(required)}, "
                              f"found {found}); delete it to start that run over")
    if state["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state['version']}, this stn reads "
                              f"{CHECKPOINT_VERSION}; delete it to start that run over")
    return state


def load_model(path: str | os.PathLike, *, need_transformer: bool = False) -> tuple[Any, Config, dict[str, Any]]:
    """(the model its config describes, in eval mode, on the CPU, with the checkpoint's weights; that config; the
    checkpoint itself) from a training checkpoint: the one loader for reading a trained model back (`stn
    visualize`, `stn recovery`). Needs only the `model` and `config` keys, so a checkpoint from another
    version of the format still draws. need_transformer: a model without a spatial transformer is an error."""
    import torch

    from stn.models import build_model

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass a run's checkpoints/last.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({_first_line(err)})") from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        found = sorted(state.keys()) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not an stn training checkpoint: expected keys 'model' and 'config', "
                              f"found {found}")
    try:
        cfg = from_container(state["config"])
    except ConfigError as err:
        raise CheckpointError(f"{path}: its saved config does not validate: {err}") from None
    if need_transformer and not cfg.model.name.startswith("st_"):
        raise CheckpointError(f"{path} holds model={cfg.model.name}, which has no spatial transformer: pass the "
                              "checkpoint of an st_fcn or st_cnn run")
    try:
        model = build_model(cfg)
    except ConfigError as err:
        raise CheckpointError(f"{path}: cannot rebuild its model: {err}") from None
    try:  # fit saves the model's own state_dict, never torch.compile's wrapper: no "_orig_mod." keys
        model.load_state_dict(evaluated_weights(state))  # the weight average's, for a run that kept one
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: its weights do not fit the model its config describes ({_first_line(err)[:300]})"
        ) from None
    return model.eval(), cfg, state


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def checkpoint_state(step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, stream: Any, cfg: Config,
                     clock: dict[str, float]) -> dict[str, Any]:
    """Everything a resumed run needs to continue exactly: weights, momentum, schedule, RNGs, data position."""
    import torch

    return {
        "version": CHECKPOINT_VERSION, "step": step, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "stream": stream.state_dict(), "config": to_dict(cfg), "clock": dict(clock),
    }  # fmt: skip


def restore(state: dict[str, Any], path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, stream: Any) -> None:
    """Load a checkpoint's states into freshly built objects (the inverse of `checkpoint_state`)."""
    import torch

    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["stream"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this model/data: {str(err).splitlines()[0]}; "
                            f"delete it to start that run over") from None
    torch.set_rng_state(state["rng"]["cpu"].cpu())
    cuda_states = state["rng"]["cuda"]
    if torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


def check_step(state: dict[str, Any], cfg: Config, path: Path) -> None:
    """Refuse to resume a checkpoint past trainer.iterations: it would end at once and be marked finished."""
    step = int(state["step"])
    if step > cfg.trainer.iterations:
        raise CheckpointError(
            f"trainer.iterations={cfg.trainer.iterations} is below the step of {path} ({step}): resume with "
            f"trainer.iterations>={step}, or start a new run (another run_dir)"
        )
