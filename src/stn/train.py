"""Training: `fit(cfg)` runs one configuration end to end and leaves a self-describing run folder.

The loop is flat and hand-written: TrainStream batch -> `train_step` (SGD with momentum) -> StepLR, stepped
per iteration, so the paper's "lr / 10 every 50k iterations" is `lr_step=50000, lr_gamma=0.1`. The loss
stays on the device and is read back (one host-device sync) only every `trainer.log_every` steps; a
non-finite loss is pinned to its exact step on the device as well, and stops the run with a TrainingError.
The step and its parts (model, SGD, schedule, evaluation) are `stn.step`'s, the run folder and resume rules
`stn.runs`', the checkpoint `stn.checkpoints`'; this module runs the loop. Transformer models'
summary.json also holds recovery/* keys (how well the transformer undoes the distortion: `stn.recovery`).

Resuming restores model, optimizer, scheduler, RNG states and the data stream's position, so on the CPU
(float32, no autocast) a run stopped and resumed ends with exactly the weights of an uninterrupted one
(tests/test_train.py checks torch.equal). Precision: bf16 autocast on CUDA with trainer.amp, on the CPU with
trainer.cpu_precision (float32 by default; `resolve_precision`), recorded as summary["precision"] (and the
checkpoint's "precisions"); channels_last (trainer.channels_last) applies on both: on the CPU it makes
oneDNN's convolutions and the max-pooling faster (experiments/bench/train.md). On the CPU, `fit` also keeps freed memory in the process
(`keep_freed_memory`): a training step frees and reallocates the same large activations every iteration, and
returning them to the kernel made every step page-fault them in again.

Stopping: Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and raises TrainingInterrupted
(a second Ctrl-C aborts at once); trainer.stop_after=N does the same after N steps of this invocation.
`trainer.resume=true` continues from the checkpoint (see `stn.runs.locate_run` for what it picks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stn.checkpoints import check_step, checkpoint_state, load_checkpoint, restore, save_checkpoint
from stn.config import Config, RunError, to_yaml
from stn.device import (
    check_memory,
    code_commit,
    cpu_has_bf16,
    keep_freed_memory,
    machine_name,
    resolve_device,
    runtime_flags,
)
from stn.lock import locked
from stn.progress import Console, long_run_note, stop_on_signals
from stn.recovery import headline_line, recovery_metrics
from stn.runs import (
    CHECKPOINT,
    CheckpointError,
    append_metrics,
    best_test_error,
    check_resumable,
    finished_summary,
    locate_run,
    new_run_dir,
    record_command,
    truncate_metrics,
    write_atomic,
    write_json,
)
from stn.step import (
    all_finite,
    build_average,
    build_optimizer,
    build_scheduler,
    eval_key,
    evaluate,
    fit_step,
    prepare_model,
)
from stn.tracking import Tracker, say_once

LOG_FILE = "train.log"  # the run's log, in its folder (stn.runs.RUN_FILES lists it)
# The first log line at least this many steps into an invocation measures the rate a long CPU run's estimate
# uses (the first steps, warming up, are slower).
ESTIMATE_AFTER = 20


class TrainingError(RunError):
    """A run that cannot go on; the message names the step or file and what to do."""


class TrainingDiverged(TrainingError):
    """The loss became NaN/inf at `step`: the run cannot go on from its last checkpoint with the same settings (a
    resume replays the same steps), so a study records the seed as diverged instead of retrying it."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class TrainingInterrupted(TrainingError):
    """The run stopped early on request (signal or trainer.stop_after), with a checkpoint to resume from."""

    def __init__(self, message: str, step: int, run_dir: Path, exit_code: int) -> None:
        super().__init__(message)
        self.step, self.run_dir, self.exit_code = step, run_dir, exit_code


# ------------------------------------------------------------------------------------------ building blocks


# ------------------------------------------------------------------------------------------------- fit


@dataclass
class Session:
    """What one invocation of `fit` trains with: built objects, the run folder and the counters."""

    cfg: Config
    folder: Path
    device: torch.device
    model: nn.Module
    forward: nn.Module  # the model, or its torch.compile wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: Any
    test_set: Any
    parameters: int
    amp: bool
    channels_last: bool
    step: int = 0
    resumed_from: int | None = None
    precisions: list[str] = field(default_factory=list)  # every precision this run has trained in
    clock: dict[str, float] = field(default_factory=lambda: {"wall_time_s": 0.0, "train_time_s": 0.0})
    wandb_id: str | None = None  # this training's W&B run, continued on resume (stn.tracking.Tracker)
    average: torch.optim.swa_utils.AveragedModel | None = None  # trainer.ema_decay > 0: the weights' average

    @property
    def evaluated(self) -> nn.Module:
        """The model that evaluations, the recovery metric and the pictures see: the weights' average when the
        recipe keeps one, else the trained model (the compiled wrapper's weights are the model's)."""
        return self.forward if self.average is None else self.average.module

    def checkpoint(self) -> None:
        state = checkpoint_state(self.step, self.model, self.optimizer, self.scheduler, self.stream, self.cfg,
                                 self.clock)
        extra = {"precisions": self.precisions} | ({"wandb_id": self.wandb_id} if self.wandb_id else {})
        if self.average is not None:
            extra["average"] = self.average.state_dict()
        save_checkpoint(self.folder / CHECKPOINT, state | extra)

    def evaluate(self) -> float:
        return evaluate(self.evaluated, self.test_set, self.cfg.trainer.eval_batch_size, amp=self.amp,
                        channels_last=self.channels_last)


def start(cfg: Config, found: Path | None, state: dict[str, Any] | None, stack: contextlib.ExitStack) -> Session:
    """Build model, optimizer, schedule and data (in this order: the seeded initialisation comes first),
    claim and lock a new run folder (found None), write its config and restore the checkpoint `state` if resuming."""
    from stn.data import build_data
    from stn.models import count_parameters

    device = resolve_device(cfg.trainer.device)
    amp, channels_last = runtime_flags(cfg.trainer, device, cfg.model)
    if device.type == "cpu":
        keep_freed_memory()
        if amp and not cpu_has_bf16():
            print("warning: trainer.cpu_precision=bf16 on a CPU without bf16 hardware: bf16 is emulated here and "
                  "much slower than float32; use trainer.cpu_precision=float32 (or auto)", file=sys.stderr)
    model = prepare_model(cfg, device)
    check_memory(model, cfg, device)  # before the data is built: a too-large batch never starts
    optimizer, parameters = build_optimizer(model, cfg.trainer), count_parameters(model)
    scheduler = build_scheduler(optimizer, cfg.trainer)
    stream, test_set = build_data(cfg, device)
    folder = found
    if folder is None:  # a new folder under runs_dir (`fit` has locked an existing one)
        folder = new_run_dir(cfg)
        stack.enter_context(locked(folder))
    cfg = dataclasses.replace(cfg, run_dir=str(folder))
    write_atomic(folder / "config.yaml", to_yaml(cfg))
    record_command(folder)
    from stn.hydra_record import write_hydra_folder

    write_hydra_folder(folder, cfg)
    forward = torch.compile(model) if cfg.trainer.compile else model
    session = Session(cfg, folder, device, model, forward, optimizer, scheduler, stream, test_set, parameters,
                      amp, channels_last, precisions=["bf16" if amp else "float32"],
                      average=build_average(model, cfg.trainer))
    metrics = folder / "metrics.jsonl"
    if state is None:
        write_atomic(metrics, "")  # replaces, never writes through a link
        return session
    restore(state, folder / CHECKPOINT, model, optimizer, scheduler, stream)
    if session.average is not None:
        if "average" not in state:
            raise CheckpointError(f"{folder / CHECKPOINT} holds no weight average for trainer.ema_decay="
                                  f"{cfg.trainer.ema_decay}; delete it to start that run over")
        session.average.load_state_dict(state["average"])
    if cfg.trainer.schedule == "onecycle" and scheduler.total_steps != cfg.trainer.iterations:
        # the one cycle spans the run: its shape is fixed by the iterations it was started with
        raise CheckpointError(f"{folder / CHECKPOINT} runs a one-cycle schedule over {scheduler.total_steps} "
                              f"steps: resume it with trainer.iterations={scheduler.total_steps}")
    session.step = session.resumed_from = int(state["step"])
    session.clock = dict(state.get("clock", session.clock))
    session.precisions = sorted(set(state.get("precisions", ["float32"])) | set(session.precisions))
    session.wandb_id = state.get("wandb_id")
    truncate_metrics(metrics, session.step)
    return session


class Meter:
    """The running loss and throughput between two log lines; the loss sum and the first non-finite step
    stay on the device (no sync per step) until `read`."""

    def __init__(self, session: Session, started: float) -> None:
        self.session, self.started, self.wall_before = session, started, session.clock["wall_time_s"]
        self.loss_sum = torch.zeros((), device=session.device)
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=session.device)
        self.interval_start, self.paused, self.logged_step = time.perf_counter(), 0.0, session.step
        self.images, self.seconds = 0, 0.0  # this invocation's logged training images and time
        self.final_loss: float | None = None
        self.loads: list[float] = []  # the machine's 1-minute load average at each log line (concurrent work)

    def add(self, loss: Tensor, step: int) -> None:
        self.loss_sum += loss
        self.bad_step = torch.where((self.bad_step < 0) & ~loss.isfinite(), step, self.bad_step)

    def read(self, step: int, lr: float) -> dict[str, float]:
        """The metrics record of the steps since the last read (one sync)."""
        now = time.perf_counter()
        seconds = max(now - self.interval_start - self.paused, 1e-9)
        images = (step - self.logged_step) * self.session.cfg.trainer.batch_size
        self.final_loss = float(self.loss_sum) / (step - self.logged_step)
        record = {"step": step, "loss": self.final_loss, "lr": lr, "images_per_s": images / seconds,
                  "time_s": self.wall_before + now - self.started}
        self.session.clock["train_time_s"] += seconds
        self.images, self.seconds = self.images + images, self.seconds + seconds
        self.rate = (step - self.logged_step) / seconds
        self.loads.append(os.getloadavg()[0])
        self.loss_sum.zero_()
        self.interval_start, self.paused, self.logged_step = now, 0.0, step
        return record

    def check_finite(self, before_checkpoint: bool = False) -> None:
        """Stop with TrainingDiverged at the first non-finite loss (or, before a checkpoint, parameter)."""
        first_bad, session = int(self.bad_step), self.session  # the sync
        if first_bad < 0 and not (before_checkpoint and not all_finite(session.model)):
            return
        at = f"step {first_bad}" if first_bad >= 0 else f"some step up to {session.step} (parameters)"
        saved = session.folder / CHECKPOINT
        kept = (f"the last good checkpoint {saved} (step {load_checkpoint(saved, torch.device('cpu'))['step']}) "
                f"is kept" if saved.is_file() else "no checkpoint was written before it")
        raise TrainingDiverged(f"{session.cfg.run_name}: the loss became NaN/inf at {at} with trainer.lr="
                               f"{session.cfg.trainer.lr}; {kept}. Lower trainer.lr and start a new run",
                               first_bad if first_bad >= 0 else session.step)


def fit(cfg: Config) -> dict[str, Any]:
    """Train `cfg` to the end (or resume it) and return the summary also written to <run_dir>/summary.json.

    Summary keys: test_error (%), run_dir, run_name, steps, wall_time_s (all invocations), train_time_s,
    images_per_s (training throughput, evaluation excluded), final_loss, device, precision (float32 | bf16 |
    bf16+float32 for a run resumed in another precision), parameters, machine (`stn.device.machine_name`: the CPU
    with its vector ISA, or the GPU), torch_threads, load_mean (the mean 1-minute load average at the log lines), commit (stn's, '' outside a git checkout), torch_version,
    dataset, model, transformer, seed, resumed_from (step or null), finished_at, wandb ({mode, id, path, dir}
    or null). Raises TrainingError (non-finite loss), TrainingInterrupted, ConfigError, MNISTDataError or
    stn.runs.RunFolderError (a folder or checkpoint that cannot be used).
    """
    started = time.perf_counter()
    code_commit()  # asked now and cached: the code this process imported, even if the checkout moves on
    found, how = locate_run(cfg)
    if found is not None and how == "finished":
        return finished_summary(found, cfg)
    with contextlib.ExitStack() as stack:
        state = None
        if found is not None:
            stack.enter_context(locked(found))
            if how == "resume":
                state = load_checkpoint(found / CHECKPOINT, resolve_device(cfg.trainer.device))
                check_resumable(state["config"], cfg, found / CHECKPOINT)
                check_step(state, cfg, found / CHECKPOINT)
        run = start(cfg, found, state, stack)
        return train_loop(run, started)


def train_loop(run: Session, started: float) -> dict[str, Any]:
    """The paper's loop: SGD steps with the step schedule, a log line every log_every steps, an evaluation
    every eval_every, a checkpoint every checkpoint_every; then the summary."""
    trainer, cfg, first_step = run.cfg.trainer, run.cfg, run.step
    meter, test_error = Meter(run, started), math.nan
    # Every line also goes to the run folder's train.log (appended by each invocation), as Hydra logs a job.
    console = Console(trainer.iterations, run.step, cfg.run_name, log_file=run.folder / LOG_FILE)
    console.line(f"{'resuming' if run.resumed_from is not None else 'training'} {cfg.run_name} on {run.device} "
                 f"({run.parameters:,} parameters) from step {run.step} of {trainer.iterations} "
                 f"(trainer={trainer.name}); run folder {run.folder}")
    estimated = False
    try:
        with Tracker(cfg, run.folder, run.wandb_id) as tracker, stop_on_signals() as stop:
            run.wandb_id = tracker.run_id  # kept even while W&B is off for an invocation
            while run.step < trainer.iterations:
                lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it on)
                loss = fit_step(run.forward, run.optimizer, run.scheduler, run.stream, amp=run.amp,
                                channels_last=run.channels_last, trainer=trainer, average=run.average,
                                model=run.model)
                run.step += 1
                step, last = run.step, run.step == trainer.iterations
                meter.add(loss, step)
                console.advance(step)
                stopping = "signal" in stop or step - first_step == trainer.stop_after
                if step % trainer.log_every == 0 or last or stopping:
                    meter.check_finite()
                    record = meter.read(step, lr)
                    append_metrics(run.folder / "metrics.jsonl", record)
                    tracker.log({k: v for k, v in record.items() if k != "step"}, step)
                    console.advance(step, meter.final_loss, meter.rate)
                    if not estimated and step - first_step >= ESTIMATE_AFTER:  # the rate is measured: say how long
                        estimated = True
                        note = long_run_note(trainer.iterations - step, meter.rate, trainer.batch_size, trainer.name,
                                             run.device.type)
                        if note:
                            console.line(note)
                pause_start = time.perf_counter()
                if step % trainer.eval_every == 0 or last:
                    meter.check_finite()
                    test_error = run.evaluate()
                    append_metrics(run.folder / "metrics.jsonl", {"step": step, eval_key(cfg): test_error})
                    tracker.log({eval_key(cfg): test_error}, step)
                    loss_text = "-" if meter.final_loss is None else f"{meter.final_loss:.4f}"
                    console.line(f"{cfg.run_name} step {step}/{trainer.iterations} | loss {loss_text} | "
                                 f"lr {lr:.3g} | {eval_key(cfg).replace('_', ' ')} {test_error:.2f}%")
                if step % trainer.checkpoint_every == 0 or last or stopping:
                    meter.check_finite(before_checkpoint=True)
                    run.clock["wall_time_s"] = meter.wall_before + time.perf_counter() - started
                    run.checkpoint()
                meter.paused += time.perf_counter() - pause_start
                if stopping and not last:
                    console.close()
                    tracker.mark_preempting()
                    stopped = interrupted(run, stop)
                    console.log(str(stopped))  # the caller prints it
                    raise stopped
            if run.step == first_step:  # resumed from a checkpoint taken at the very end: evaluate it
                meter.check_finite()
                test_error = run.evaluate()
                tracker.log({eval_key(cfg): test_error}, run.step)
            console.close()
            run.clock["wall_time_s"] = meter.wall_before + time.perf_counter() - started
            summary = make_summary(run, meter, test_error, tracker.info)
            recovery = recovery_metrics(run.evaluated, run.test_set, cfg)  # stn.recovery: flat recovery/* keys
            summary.update(recovery)
            # W&B's end of a training: samples with T(G), the visualize figure, the summary, the artifacts.
            if tracker.enabled:  # drawn here, only for W&B; tracking logs them
                hand_pictures(tracker, run, recovery)
            # W&B's test_error {min, last} covers what this invocation logged; test_error_best every invocation.
            tracker.set_summary(summary | {"test_error_best": best_test_error(run.folder / "metrics.jsonl")})
            tracker.log_artifacts(summary, dataset_card(cfg) if tracker.enabled else None)
    finally:
        console.close()
    write_json(run.folder / "summary.json", summary)
    console.log(f"finished: {eval_key(cfg).replace('_', ' ')} {test_error:.2f}%")
    return summary


def hand_pictures(tracker: Tracker, run: Session, recovery: dict[str, Any]) -> None:
    """The end-of-run pictures (`stn.panels.end_pictures`) of the first logger.images test digits, to W&B. A
    picture that cannot be drawn costs W&B for this run, never the training."""
    from stn.panels import end_pictures

    cfg, count = run.cfg, run.cfg.logger.images
    caption = f"{cfg.run_name}, step {run.step}; recovery: {headline_line(recovery) or 'not measured'}"
    try:
        pictures = end_pictures(run.evaluated, run.test_set.images[:count], run.test_set.labels[:count], caption)
    except Exception as err:  # noqa: BLE001 - W&B must never stop training
        tracker.give_up("drawing the W&B pictures", err)
        return
    tracker.log_pictures(pictures, run.step)


def dataset_card(cfg: Config) -> tuple[dict[str, Any], str] | None:
    """The dataset card W&B keeps beside the checkpoint (logger.artifacts, logger.card_draws test draws;
    stn.cards) with its markdown, or None (not asked for, or it failed: said once, the run goes on)."""
    if not (cfg.logger.artifacts and cfg.logger.card_draws):
        return None
    try:
        from stn.cards import build_card, card_markdown

        card, _stats = build_card(cfg, count=cfg.logger.card_draws)
        return card, card_markdown(card)
    except Exception as err:  # noqa: BLE001 - a card must not cost the run or its other W&B records
        say_once(f"building the dataset card failed ({type(err).__name__}: {err}); W&B gets the run without it")
        return None


def interrupted(run: Session, stop: dict[str, int]) -> TrainingInterrupted:
    reason = (signal.Signals(stop["signal"]).name if "signal" in stop
              else f"trainer.stop_after={run.cfg.trainer.stop_after}")
    return TrainingInterrupted(
        f"{run.cfg.run_name} stopped at step {run.step}/{run.cfg.trainer.iterations} ({reason}); checkpoint "
        f"{run.folder / CHECKPOINT}. Continue with: {resume_command(run.folder)}",
        run.step, run.folder, 128 + stop["signal"] if "signal" in stop else 0)


def resume_command(folder: Path) -> str:
    """The command that continues the run in `folder` as it was configured (stn.launch.sweep.continue_recorded reads
    its config.yaml), quoted for a POSIX shell."""
    import shlex

    return f"stn train trainer.resume=true run_dir={shlex.quote(str(folder))}"


def make_summary(run: Session, meter: Meter, test_error: float, wandb: dict[str, str] | None) -> dict[str, Any]:
    cfg = run.cfg
    return {
        eval_key(cfg): test_error, "run_dir": str(run.folder), "run_name": cfg.run_name, "steps": run.step,
        "wall_time_s": run.clock["wall_time_s"], "train_time_s": run.clock["train_time_s"],
        "images_per_s": meter.images / meter.seconds if meter.seconds else None,
        "final_loss": meter.final_loss, "device": str(run.device), "precision": "+".join(run.precisions),
        "parameters": run.parameters, "machine": machine_name(run.device), "torch_threads": torch.get_num_threads(),
        # the mean 1-minute load average over this invocation's log lines: how busy the machine was (other runs)
        "load_mean": sum(meter.loads) / len(meter.loads) if meter.loads else None,
        "commit": code_commit(), "torch_version": torch.__version__, "dataset": cfg.dataset.name, "model": cfg.model.name,
        "transformer": cfg.transformer.type, "seed": cfg.seed, "resumed_from": run.resumed_from,
        "finished_at": dt.datetime.now().isoformat(timespec="seconds"), "wandb": wandb,
    }  # fmt: skip
