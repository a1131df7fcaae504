"""Weights & Biases, as an optional layer over the run folder's own metrics.jsonl and summary.json.

The package's one `wandb.init` is `init_run` (the table's own W&B run, stn.report, goes through it too).
One `with Tracker(cfg, run_dir) as tracker:` per run: the run is always finished on exit, so runs started in
a loop never merge (lightning-hydra-template#289). W&B must never stop training: `logger.mode=online` with
no API key falls back to offline (said once per process), and any exception from wandb (init, log, images,
finish) is reported once and turns the tracker off for the rest of the run.

Offline runs go where wandb puts them by default, `./wandb/offline-run-*` under the working directory (or
$WANDB_DIR), so a later `wandb sync wandb/offline-run-*` finds them; `Tracker.info` (id, path, folder) ends up
in summary.json. `logger.mode=disabled` never imports wandb and writes no wandb folder.

The logger.* settings already hold W&B's environment variables (WANDB_MODE, WANDB_PROJECT, ...: read by
conf/logger/wandb.yaml, below any logger.* override; README "Runs, checkpoints, W&B"). One training is one
W&B run across stops and resumes (`Tracker.run_id`, kept in the checkpoint). Curves are plotted against
images_seen (define_metric); the test error is summarised as {min, last}.
"""

from __future__ import annotations

import dataclasses
import netrc
import os
import sys
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import Tensor, nn

from stn.config import Config, to_dict

DEFAULT_WANDB_HOST = "https://api.wandb.ai"
_said: set[str] = set()  # messages already printed by this process (say each once)


def say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        print(f"wandb: {message}", file=sys.stderr, flush=True)


def has_wandb_credentials() -> bool:
    """True when wandb can authenticate without a prompt: WANDB_API_KEY, an identity token, or a netrc entry."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_HOST)).netloc
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def effective_mode(mode: str) -> str:
    """logger.mode as it can run here: `online` without credentials becomes `offline` (said once)."""
    if mode == "online" and not has_wandb_credentials():
        say_once(
            "logger.mode=online but no API key (WANDB_API_KEY or a netrc entry): logging offline instead; "
            "upload later with `wandb sync wandb/offline-run-*`"
        )
        return "offline"
    return mode


ONLINE_TIMEOUT_S = 30  # how long `online` may wait for the W&B server before falling back to offline


def init_run(mode: str, **kwargs: Any) -> Any:
    """The package's one `wandb.init`: our settings (no console capture, silent) and per-run folder; the
    caller passes project, group, name, config, ... `online` waits at most ONLINE_TIMEOUT_S for the server
    and then, or on any other failure to go online, starts the run offline and says so once. Other failures
    propagate: the caller handles them (W&B must never stop stn)."""
    import wandb

    def start(mode: str) -> Any:
        return wandb.init(
            mode=mode,
            # Decided per run: wandb would otherwise keep the first run's folder for the whole process.
            dir=os.environ.get("WANDB_DIR") or os.getcwd(),
            # console="off": our progress bar is not W&B's business; silent: we print the one line that matters.
            settings=wandb.Settings(console="off", silent=True, init_timeout=ONLINE_TIMEOUT_S),
            **kwargs,
        )

    if mode != "online":
        return start(mode)
    try:
        return start("online")
    except Exception as err:  # no network, a server that does not answer in time, a rejected key
        reason = " ".join(str(err).split())[:200]
        say_once(f"logger.mode=online could not reach W&B within {ONLINE_TIMEOUT_S} s ({type(err).__name__}: "
                 f"{reason}); logging offline instead, upload later with `wandb sync wandb/offline-run-*`")
        return start("offline")


def image_pairs(model: nn.Module, images: Tensor) -> Tensor:
    """Inputs beside what the model's first transformer makes of them: (B, H, 2W + 2) in [0, 1], on the CPU.

    Baselines (no transformer) get the inputs alone, (B, H, W).
    """
    inputs = images[:, 0].float().cpu()  # (B, H, W)
    if len(getattr(model, "transformers", ())) == 0:
        return inputs
    was_training = model.training
    model.eval()
    with torch.no_grad():
        rectified, _grid = model.rectify(images)  # (B, C, H', W'), (B, H', W', 2)
    model.train(was_training)
    rectified = rectified[:, :1].float().cpu()
    if rectified.shape[-2:] != inputs.shape[-2:]:  # a downsampling transformer: show it at the input's size
        rectified = nn.functional.interpolate(rectified, size=inputs.shape[-2:], mode="nearest")
    gap = torch.ones(inputs.shape[0], inputs.shape[1], 2)  # a white 2-pixel line between the two
    return torch.cat([inputs, gap, rectified[:, 0]], dim=2).clamp(0, 1)


def enlarge(images: Tensor, side: int = 96) -> Tensor:
    """(B, H, W) -> (B, kH, kW) by pixel repetition, k = side // H, so 28-pixel digits stay legible in W&B."""
    k = max(1, side // images.shape[1])
    return images.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2)


IMAGES_SEEN = "images_seen"  # the x axis of the training curves: step x trainer.batch_size
CURVES = ("loss", "lr", "images_per_s", "test_error")  # what train.py logs, plotted against images seen
SUMMARISED = ("test_error",)  # W&B summarises these itself (min and last): never overwritten by set_summary


class Tracker:
    """A W&B run for one training run, or nothing at all; never raises out of its methods.

    `run_dir` is the run's own folder: its path goes into the W&B config (run_dir) and W&B's notes, so a
    W&B run leads back to config.yaml, metrics.jsonl and the checkpoint. W&B's files go to ./wandb.
    `run_id` (from the checkpoint when resuming) continues that W&B run; `Tracker.run_id` is the id to keep.
    Offline, each invocation writes its own wandb/offline-run-*-<id> folder with the same id; `wandb sync`
    uploads them in start order into the one run (wandb >= 0.29). Steps a crashed invocation logged after its
    last checkpoint are not rewound: online, W&B ignores a step below the run's last one, so those steps keep
    the crashed invocation's values (metrics.jsonl, truncated to the checkpoint, has the resumed ones).
    """

    def __init__(self, cfg: Config, run_dir: Path, run_id: str | None = None) -> None:
        self.cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
        self.run_dir = Path(run_dir)
        self.run: Any = None
        self.mode = cfg.logger.mode
        # The W&B run id of this training, kept in its checkpoint: a resumed training continues that W&B run
        # (id=..., resume="allow") instead of starting a second run of the same name.
        self.run_id = run_id

    def __enter__(self) -> Tracker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def start(self) -> None:
        if self.mode == "disabled":
            return
        self.mode = effective_mode(self.mode)
        cfg = self.cfg
        resume = {"id": self.run_id, "resume": "allow"} if self.run_id else {}
        try:
            self.run = init_run(
                self.mode,
                **resume,
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                group=cfg.logger.group,
                name=cfg.logger.name or cfg.run_name,
                job_type="train",
                notes=f"run folder: {self.run_dir}",
                tags=[cfg.dataset.name, cfg.model.name, cfg.transformer.type, *cfg.logger.tags],
                config=to_dict(cfg),
            )
            if self.run is not None and self.mode == "online" and self.run.settings.mode != "online":
                self.mode = "offline"  # init_run fell back
            if self.run is not None:
                self.run_id = str(self.run.id)
                self._define_metrics()
        except Exception as err:  # W&B must never stop training
            self._give_up("init", err)

    def _define_metrics(self) -> None:
        """The curves against images seen (step x batch size: presets differ in batch size, so steps do not
        compare across them), and the test error's best (min) and last values in the summary."""
        self.run.define_metric(IMAGES_SEEN)
        for key in CURVES:
            self.run.define_metric(key, step_metric=IMAGES_SEEN, summary="min,last" if key == "test_error" else None)

    def _give_up(self, where: str, err: BaseException) -> None:
        say_once(f"{where} failed ({type(err).__name__}: {err}); training continues without W&B for this run")
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # already reported; nothing more to do
                pass

    def mark_preempting(self) -> None:
        """The training stops to be resumed (a signal, trainer.stop_after): W&B's preempting mark, so the cut-off
        invocation reads as preempted rather than as a plain failure."""
        if self.run is None:
            return
        try:
            self.run.mark_preempting()
        except Exception as err:
            self._give_up("mark_preempting", err)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics | {IMAGES_SEEN: step * self.cfg.trainer.batch_size}, step=step)
        except Exception as err:
            self._give_up("log", err)

    def log_images(self, model: nn.Module, images: Tensor, labels: Tensor, step: int) -> None:
        """A few test inputs, each beside its rectified version (ST models), as W&B images."""
        if self.run is None or len(images) == 0:
            return
        try:
            import wandb

            pairs = image_pairs(model, images)
            key = "input_rectified" if pairs.shape[-1] > images.shape[-1] else "input"
            pictures = [
                wandb.Image((pair * 255).round().to(torch.uint8).numpy(), caption=f"label {int(label)}")
                for pair, label in zip(enlarge(pairs), labels.tolist(), strict=True)
            ]
            self.run.log({key: pictures}, step=step)
        except Exception as err:
            self._give_up("image logging", err)

    def set_summary(self, summary: dict[str, Any]) -> None:
        """`summary` (flat keys only) into the W&B summary, except test_error, which W&B keeps as
        {"min", "last"} from the logged curve (define_metric)."""
        if self.run is None:
            return
        try:
            self.run.summary.update({k: v for k, v in summary.items()
                                     if not isinstance(v, dict) and k not in SUMMARISED})
        except Exception as err:
            self._give_up("summary", err)

    @property
    def info(self) -> dict[str, str] | None:
        """Where this run lives in W&B (for summary.json), or None when W&B is off."""
        if self.run is None:
            return None
        return {"mode": self.mode, "id": str(self.run.id), "path": str(self.run.path), "dir": _folder(self.run)}

    def finish(self, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        folder = _folder(run)
        try:
            run.finish(exit_code=exit_code)
        except Exception as err:
            say_once(f"finish failed ({type(err).__name__}: {err})")
            return
        if self.mode == "offline":
            print(f"wandb: offline run saved; upload with `wandb sync {folder}`", file=sys.stderr, flush=True)


def _folder(run: Any) -> str:
    """The run's own folder (wandb/offline-run-*/): what `wandb sync` takes. run.dir is its files/ subfolder."""
    return str(Path(run.dir).parent)
