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

At the end of a training train.fit draws, and hands over to `log_pictures` and `log_artifacts` (this module
logs what it is given and draws nothing): sample images (the input with T(G) drawn over it, beside the
transformer's output), the `stn visualize` figure with the distortion recovery in its caption, and, with
logger.artifacts, the checkpoint (artifact `model-<run id>`, type "model", aliases last/best) and a dataset
card (`card-<dataset>`, type "dataset-card", stn.cards) as artifacts. A table's cells carry their row, column,
cell, table and paper value (logger.cell, set by stn.tables.reproduce) as top-level W&B config keys and as tags.
`log_visualization` puts a `stn visualize --wandb` figure in W&B.
"""

from __future__ import annotations

import dataclasses
import json
import netrc
import os
import sys
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

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


SERVICE_ENV = "WANDB_SERVICE"  # where wandb tells child processes about its service (see init_run)
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

    inherited = os.environ.get(SERVICE_ENV)
    try:
        if mode != "online":
            return start(mode)
        try:
            return start("online")
        except Exception as err:  # no network, a server that does not answer in time, a rejected key
            reason = " ".join(str(err).split())[:200]
            say_once(f"logger.mode=online could not reach W&B within {ONLINE_TIMEOUT_S} s ({type(err).__name__}: "
                     f"{reason}); logging offline instead, upload later with `wandb sync wandb/offline-run-*`")
            return start("offline")
    finally:
        # wandb advertises the service it started in this process's environment, for child processes to
        # share. The table process logs its run while it still submits cells: a Slurm job on another node (or
        # a local cell outliving a stopped table) must not be pointed at this process's service, so the
        # variable goes (this process keeps its own connection). One set by the caller is left alone.
        if inherited is None:
            os.environ.pop(SERVICE_ENV, None)


_KEPT: dict[str, Any] = {}  # W&B run id -> the run kept open by this process (`kept_run`)


def kept_run(mode: str, run_id: str, **kwargs: Any) -> Any:
    """The W&B run `run_id`, started (continued: resume="allow") at the first call of this process and kept
    open until `finish_kept`, so a run updated several times by one invocation (the table's, after every
    cell) is one offline folder per invocation instead of one per update. A failure to start raises (the
    caller handles it: W&B must never stop stn) and is not kept."""
    run = _KEPT.get(run_id)
    if run is None:
        if not _KEPT:  # a caller that fails before its finish_kept: the run still ends with the process
            import atexit

            atexit.unregister(finish_all_kept)
            atexit.register(finish_all_kept)
        run = _KEPT[run_id] = init_run(mode, id=run_id, resume="allow", reinit="create_new", **kwargs)
    return run


def finish_kept(run_id: str, exit_code: int = 0) -> None:
    """Finish the run `kept_run` holds open for `run_id` (nothing if none); never raises."""
    run = _KEPT.pop(run_id, None)
    if run is None:
        return
    try:
        run.finish(exit_code=exit_code)
    except Exception as err:
        say_once(f"finish failed ({type(err).__name__}: {err})")


def finish_all_kept() -> None:
    """Finish every run `kept_run` holds open (an invocation's end, e.g. `stn engine run` after its tables)."""
    for run_id in list(_KEPT):
        finish_kept(run_id)


def model_artifact_name(run_id: str) -> str:
    """The W&B artifact of a training's checkpoint(s): one per W&B run, versioned if it is logged again."""
    return f"model-{run_id}"


def card_artifact_name(dataset: str) -> str:
    """The dataset card's artifact: one per dataset name; W&B adds a version when the card's content differs."""
    return f"card-{dataset}"


def cell_tags(cfg: Config) -> list[str]:
    """A table cell's W&B tags (row:..., column:..., seed:..., paper:...); [] for a run outside a table."""
    cell = cfg.logger.cell
    if not cell:
        return []
    return [f"row:{cell.get('row')}", f"column:{cell.get('column')}", f"seed:{cfg.seed}",
            f"paper:{'none' if cell.get('paper_test_error') is None else cell['paper_test_error']}"]


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
        """Whether this run logs to W&B now: the caller draws the end-of-run pictures only then."""
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
                # Its own run even while another is open in this process (a table's, kept by `kept_run`):
                # wandb's default would hand that one back.
                reinit="create_new",
                notes=f"run folder: {self.run_dir}",
                tags=[cfg.dataset.name, cfg.model.name, cfg.transformer.type, *cell_tags(cfg), *cfg.logger.tags],
                # A table cell's row, column, ... at the top level, where W&B's panels group by them.
                config=to_dict(cfg) | dict(cfg.logger.cell),
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

    def log_pictures(self, pictures: dict[str, Any], step: int) -> None:
        """The end of a training's pictures, drawn by the caller (train.fit, `stn.panels.end_pictures`): the
        sample panels under pictures["key"] (input_rectified for ST models, input for baselines) and, for ST
        models, the `stn visualize` figure as `transformations`, captioned with the distortion recovery."""
        if self.run is None or not pictures["samples"]:
            return
        try:
            import wandb

            payload: dict[str, Any] = {pictures["key"]: [wandb.Image(panel, caption=caption)
                                                         for panel, caption in pictures["samples"]]}
            if pictures["transformations"] is not None:
                payload["transformations"] = wandb.Image(pictures["transformations"], caption=pictures["caption"])
            self.run.log(payload, step=step)
        except Exception as err:
            self._give_up("image logging", err)

    def give_up(self, where: str, err: BaseException) -> None:
        """A W&B record that could not be made (e.g. a picture the caller failed to draw): reported once, and
        W&B is off for the rest of this run; training goes on."""
        self._give_up(where, err)

    def log_artifacts(self, summary: dict[str, Any], card: tuple[dict[str, Any], str] | None = None) -> None:
        """With logger.artifacts: the run's checkpoints/last.pt (and best.pt where there is one) with its
        config.yaml and summary as the artifact `model-<run id>` (type "model", aliases last, best), and the
        dataset card the caller built (stn.cards: the card and its markdown) as `card-<dataset>` (type
        "dataset-card").
        Whoever syncs the run can then `wandb artifact get` the model and `stn visualize` its last.pt. A
        failure here is reported once and costs neither the run nor its other W&B records."""
        if self.run is None or not self.cfg.logger.artifacts:
            return
        try:
            import wandb

            cfg, folder = self.cfg, self.run_dir / "checkpoints"
            model = wandb.Artifact(
                model_artifact_name(str(self.run.id)), type="model",
                description=f"{cfg.run_name}: {cfg.model.name} {cfg.transformer.type} on {cfg.dataset.name}; "
                            "`stn visualize last.pt` draws it",
                metadata={key: summary.get(key) for key in ("test_error", "steps", "dataset", "model",
                                                            "transformer", "seed", "parameters", "run_dir")},
            )
            model.add_file(str(folder / "last.pt"), name="last.pt")
            aliases = ["last"]
            if (folder / "best.pt").is_file():
                model.add_file(str(folder / "best.pt"), name="best.pt")
                aliases.append("best")
            model.add_file(str(self.run_dir / "config.yaml"), name="config.yaml")
            with model.new_file("summary.json") as handle:
                handle.write(json.dumps(summary, indent=1, default=str) + "\n")
            self.run.log_artifact(model, aliases=aliases)
            if card is not None:
                card, markdown = card
                artifact = wandb.Artifact(
                    card_artifact_name(cfg.dataset.name), type="dataset-card",
                    description=f"dataset card of {cfg.dataset.name} over {card['draws']} test draws (stn.cards)",
                    metadata={"dataset": card["dataset"], "draws": card["draws"], "test_seed": card["test_seed"]},
                )
                with artifact.new_file(f"{cfg.dataset.name}.md") as handle:
                    handle.write(markdown)
                with artifact.new_file(f"{cfg.dataset.name}.json") as handle:
                    handle.write(json.dumps(card, indent=1) + "\n")
                self.run.log_artifact(artifact)
        except Exception as err:  # the run is done and saved locally: say so, keep the W&B run
            say_once(f"logging artifacts failed ({type(err).__name__}: {err}); the run folder {self.run_dir} "
                     "has the checkpoint")

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


def log_visualization(rendered: Any, checkpoint: str | os.PathLike) -> str | None:
    """A `stn visualize` figure (`stn.visualize.Rendered`) and its recovery metrics in W&B. Into the run
    already active in this process (a script's own `wandb.init`), else into a new run of job_type
    "visualize" in the training's project and group (the checkpoint's logger.*, below WANDB_PROJECT,
    WANDB_ENTITY, WANDB_RUN_GROUP) whose config names the checkpoint and the training's W&B run (source_run).
    Mode: WANDB_MODE, else the checkpoint's logger.mode (offline where that was disabled: the user asked).
    Returns where it went (the new run's folder, or the active run's path), None when W&B is disabled or
    failed (said once); never raises."""
    from stn.compose import wandb_mode_from_env

    cfg = rendered.config
    try:
        import wandb
        from PIL import Image

        with Image.open(rendered.path) as picture:
            figure = wandb.Image(picture.convert("RGB"), caption=rendered.recovery_text or rendered.title)
        active = wandb.run
        if active is not None:
            active.log({"transformations": figure})
            active.summary.update(rendered.recovery_flat)
            return str(active.path)
        logger = cfg.logger
        mode = wandb_mode_from_env(logger.mode if logger.mode != "disabled" else "offline")
        if mode == "disabled":
            say_once("WANDB_MODE=disabled: the figure is not logged to W&B")
            return None
        with init_run(
            effective_mode(mode),
            project=os.environ.get("WANDB_PROJECT") or logger.project,
            entity=os.environ.get("WANDB_ENTITY") or logger.entity,
            group=os.environ.get("WANDB_RUN_GROUP") or logger.group,
            name=f"{cfg.run_name}-visualize",
            job_type="visualize",
            tags=[cfg.dataset.name, cfg.model.name, cfg.transformer.type, "visualize"],
            config=to_dict(cfg) | {"checkpoint": str(Path(checkpoint).resolve()), "source_run": rendered.wandb_id},
            reinit="create_new",
        ) as run:
            run.log({"transformations": figure})
            run.summary.update(rendered.recovery_flat)
            folder = _folder(run)
        return folder
    except Exception as err:  # the picture is written; W&B is extra
        say_once(f"logging the figure to W&B failed ({type(err).__name__}: {err}); it is in {rendered.path}")
        return None
