"""Training: `fit(cfg)` runs one configuration end to end and leaves a self-describing run folder.

The loop is flat and hand-written: TrainStream batch -> `train_step` (SGD with momentum) -> StepLR, stepped
per iteration, so the paper's "lr / 10 every 50k iterations" is `lr_step=50000, lr_gamma=0.1`. The loss
stays on the device and is read back (one host-device sync) only every `trainer.log_every` steps; a
non-finite loss is pinned to its exact step on the device as well, and stops the run with a TrainingError.

Run folder (cfg.run_dir, else <runs_dir>/<YYYY-MM-DD>/<HHMMSS>-<run_name>/):
    config.yaml          the resolved config as run (run_dir filled in)
    metrics.jsonl        one JSON object per log/eval: step, loss, lr, images_per_s, time_s | test_error
    summary.json         written last, atomically: its presence means the run finished (with recovery/*
                         keys for transformer models: `stn.recovery`)
    checkpoints/last.pt  every trainer.checkpoint_every steps and at the end, atomically (tmp + os.replace)

Checkpoint: {"version", "step", "model", "optimizer", "scheduler", "rng": {"cpu", "cuda"}, "stream", "precisions",
"config", "clock"}, tensors and primitives only, so it loads with torch.load(weights_only=True). Resuming
restores all of it, so on the CPU (float32, no autocast) a run stopped and resumed ends with exactly the
weights of an uninterrupted one (tests/test_train.py checks torch.equal). Precision: bf16 autocast on CUDA
with trainer.amp, on the CPU with trainer.cpu_precision (float32 by default; `resolve_precision`), recorded as
summary["precision"]; channels_last (trainer.channels_last) applies on both: on the CPU it
makes oneDNN's convolutions and the max-pooling faster (experiments/bench/train.md). On the CPU, `fit` also
keeps freed memory in the process (`keep_freed_memory`): a training step frees and reallocates the same large
activations every iteration, and returning them to the kernel made every step page-fault them in again.

Stopping: Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and raises TrainingInterrupted
(a second Ctrl-C aborts at once); trainer.stop_after=N does the same after N steps of this invocation.
`trainer.resume=true` continues from the checkpoint (see `locate_run` for what it picks).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime as dt
import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stn.config import Config, TrainerConfig, to_dict, to_yaml
from stn.recovery import recovery_metrics
from stn.tracking import Tracker

CHECKPOINT_VERSION = 1
CHECKPOINT = Path("checkpoints") / "last.pt"
# Config keys a resumed run must share with its checkpoint: what is trained and how it is optimised.
# Everything else (iterations, intervals, device, logging, paths) may change between invocations.
RESUME_MUST_MATCH = ("dataset", "model", "transformer", "seed", "trainer.batch_size", "trainer.lr",
                     "trainer.momentum", "trainer.weight_decay", "trainer.lr_step", "trainer.lr_gamma")
RESUME_MAY_DIFFER = ("dataset.test_limit",)  # evaluation only


class TrainingError(RuntimeError):
    """A run that cannot go on; the message names the step or file and what to do."""


class TrainingInterrupted(TrainingError):
    """The run stopped early on request (signal or trainer.stop_after), with a checkpoint to resume from."""

    def __init__(self, message: str, step: int, run_dir: Path, exit_code: int) -> None:
        super().__init__(message)
        self.step, self.run_dir, self.exit_code = step, run_dir, exit_code


# ------------------------------------------------------------------------------------------ building blocks


def resolve_device(name: str) -> torch.device:
    """trainer.device -> torch.device: 'auto' is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"trainer.device={name} but no CUDA device is available: use trainer.device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TrainingError(f"trainer.device={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AVX512-BF16 or AMX), as oneDNN sees it.

    Without it bf16 is emulated: on a 2-core AMD EPYC exposing AVX2 only, a 1024^2 bf16 matmul ran at
    0.9 GFLOP/s against 133 in float32 (experiments/bench/precision.md).
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def resolve_precision(trainer: TrainerConfig, device: torch.device) -> str:
    """The arithmetic a run uses on `device`: 'bf16' (autocast) or 'float32'.

    CUDA: trainer.amp. CPU: trainer.cpu_precision, where 'auto' is bf16 only on CPUs with bf16 hardware.
    """
    if device.type == "cuda":
        return "bf16" if trainer.amp else "float32"
    if trainer.cpu_precision == "auto":
        return "bf16" if cpu_has_bf16() else "float32"
    return trainer.cpu_precision


def runtime_flags(trainer: TrainerConfig, device: torch.device) -> tuple[bool, bool]:
    """(amp, channels_last) as they apply on `device`: bf16 autocast per `resolve_precision`, channels_last anywhere."""
    return resolve_precision(trainer, device) == "bf16", trainer.channels_last


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process instead of returning it to the kernel; False if not glibc.

    By default glibc serves big blocks with mmap and unmaps them on free (and trims the heap top), so the
    same activations of every training step are page-faulted in afresh: on the 2-core CPU that was over a
    quarter of a CNN step on RTS (266 -> 193 ms at batch 256, kernel time 5.0 -> 0.6 s) and a sixth on R
    (experiments/bench/train.md). M_MMAP_MAX=0 serves every block from the heap, M_TRIM_THRESHOLD=1 GiB
    keeps its free top. Process-wide, never undone.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another C library: leave its allocator alone
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_trim_threshold, 1 << 30)) and bool(mallopt(m_mmap_max, 0))


def prepare_model(cfg: Config, device: torch.device) -> nn.Module:
    """The initialised model (seeded by cfg.seed) on `device`, in channels_last if trainer.channels_last."""
    from stn.models import build_model

    torch.manual_seed(cfg.seed)  # the model's initialisation
    model = build_model(cfg).to(device)
    if runtime_flags(cfg.trainer, device)[1]:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(model: nn.Module, trainer: TrainerConfig) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=trainer.lr, momentum=trainer.momentum,
                           weight_decay=trainer.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, trainer: TrainerConfig) -> torch.optim.lr_scheduler.StepLR:
    """Stepped once per iteration: step s (1-based) trains with lr * lr_gamma ** ((s - 1) // lr_step)."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=trainer.lr_step, gamma=trainer.lr_gamma)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor,
               *, amp: bool = False) -> Tensor:
    """One SGD step on a batch; returns the batch's mean cross-entropy as a detached 0-d tensor (no sync)."""
    with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(images)  # (B, 10)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def fit_step(forward: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, stream: Any, *, amp: bool,
             channels_last: bool) -> Tensor:
    """One iteration of `fit`: next batch -> `train_step` -> scheduler step; the loss stays on the device."""
    images, labels = stream.next()
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    loss = train_step(forward, optimizer, images, labels, amp=amp)
    scheduler.step()
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


# ------------------------------------------------------------------------------------------------ files


def write_atomic(path: Path, write: Any) -> None:
    """Write through `write(tmp_path)`, then rename over `path`: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TrainingError(f"cannot read {path} ({err}); delete it to run again") from None
    if not isinstance(data, dict):
        raise TrainingError(f"{path} does not hold a JSON object; delete it to run again")
    return data


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (weights_only: tensors and primitives, no code)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated zip, a foreign pickle, ...: all mean "not a usable checkpoint"
        raise TrainingError(
            f"checkpoint {path} is unreadable ({type(err).__name__}: {str(err).splitlines()[0]}); "
            f"delete it to start that run over"
        ) from None
    required = {"version", "step", "model", "optimizer", "scheduler", "rng", "stream", "config"}
    if not isinstance(state, dict) or not required <= set(state):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise TrainingError(f"checkpoint {path} is not an stn checkpoint (expected keys {sorted(required)}, "
                            f"found {found}); delete it to start that run over")
    if state["version"] != CHECKPOINT_VERSION:
        raise TrainingError(f"checkpoint {path} has format version {state['version']}, this stn reads "
                            f"{CHECKPOINT_VERSION}; delete it to start that run over")
    return state


def checkpoint_state(step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, stream: Any, cfg: Config,
                     clock: dict[str, float]) -> dict[str, Any]:
    """Everything a resumed run needs to continue exactly: weights, momentum, schedule, RNGs, data position."""
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
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["stream"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise TrainingError(f"checkpoint {path} does not fit this model/data: {str(err).splitlines()[0]}; "
                            f"delete it to start that run over") from None
    torch.set_rng_state(state["rng"]["cpu"].cpu())
    cuda_states = state["rng"]["cuda"]
    if torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    """'key: saved -> now' for every RESUME_MUST_MATCH setting that differs."""
    before, now = flatten(saved), flatten(to_dict(cfg))
    keys = [k for k in sorted(set(before) | set(now))
            if any(k == m or k.startswith(m + ".") for m in RESUME_MUST_MATCH) and k not in RESUME_MAY_DIFFER]
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]


def check_resumable(saved: dict[str, Any], cfg: Config, path: Path) -> None:
    changed = config_differences(saved, cfg)
    if changed:
        raise TrainingError(
            f"{path} was trained with a different configuration ({'; '.join(changed)}): resume with the "
            f"original settings, or start a new run (another run_dir, or trainer.resume=false)"
        )


# ------------------------------------------------------------------------------------------ run folders

RUN_FOLDER = re.compile(r"^(\d{6})(?:\.(\d+))?-(.+)$")  # HHMMSS[.k]-<run_name>


def new_run_dir(cfg: Config, now: dt.datetime | None = None) -> Path:
    """Claim <runs_dir>/<YYYY-MM-DD>/<HHMMSS>-<run_name>/ (mkdir is atomic: parallel runs get distinct folders)."""
    now = now or dt.datetime.now()
    day = Path(cfg.runs_dir) / now.strftime("%Y-%m-%d")
    day.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime("%H%M%S")
    for k in range(1000):
        folder = day / (f"{stamp}-{cfg.run_name}" if k == 0 else f"{stamp}.{k}-{cfg.run_name}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise TrainingError(f"cannot create a run folder under {day}: 1000 runs named {cfg.run_name} this second")


def newest_run_dir(runs_dir: Path, run_name: str) -> Path | None:
    """The most recently started run folder of `run_name` under runs_dir (by date, time and suffix)."""
    found = []
    for folder in runs_dir.glob("*/*"):
        match = RUN_FOLDER.match(folder.name)
        if folder.is_dir() and match and match.group(3) == run_name:
            found.append(((folder.parent.name, match.group(1), int(match.group(2) or 0)), folder))
    return max(found)[1] if found else None


def has_run(folder: Path) -> bool:
    return (folder / "summary.json").is_file() or (folder / CHECKPOINT).is_file()


def locate_run(cfg: Config) -> tuple[Path | None, str]:
    """Where this run lives and how it starts: (folder, 'finished' | 'resume' | 'fresh').

    trainer.resume=true: run_dir (or, without one, the newest folder of this run_name under runs_dir) with
    a summary.json is 'finished', with a checkpoint is 'resume', empty or missing starts fresh there.
    trainer.resume=false: run_dir if it holds no run yet (never overwrites one), else a new folder.
    folder None = a new folder under runs_dir, claimed by `new_run_dir` once the data and model are built
    (so a run that cannot start leaves no empty folder behind).
    """
    if cfg.run_dir:
        folder = Path(cfg.run_dir)
    elif cfg.trainer.resume:
        newest = newest_run_dir(Path(cfg.runs_dir), cfg.run_name)
        if newest is None:
            print(f"trainer.resume=true: no earlier run named {cfg.run_name} under {cfg.runs_dir}; starting a new one")
            return None, "fresh"
        folder = newest
    else:
        return None, "fresh"
    if not cfg.trainer.resume:
        if has_run(folder):
            raise TrainingError(f"run_dir={folder} already holds a run: continue it with trainer.resume=true, "
                                f"or choose another run_dir")
        return folder, "fresh"
    if (folder / "summary.json").is_file():
        return folder, "finished"
    if (folder / CHECKPOINT).is_file():
        return folder, "resume"
    print(f"trainer.resume=true: {folder} holds no checkpoint yet; starting fresh there")
    return folder, "fresh"


def finished_summary(folder: Path, cfg: Config) -> dict[str, Any]:
    """A finished run's summary.json, after checking it ran this configuration."""
    saved = folder / "config.yaml"
    if saved.is_file():
        from omegaconf import OmegaConf

        try:
            saved_cfg = OmegaConf.to_container(OmegaConf.load(saved))
        except Exception as err:
            raise TrainingError(f"cannot read {saved} ({err}); delete {folder} to run again") from None
        check_resumable(saved_cfg, cfg, saved)  # type: ignore[arg-type]
    summary = read_json(folder / "summary.json")
    print(f"{folder} already finished (test error {summary.get('test_error')}%); not training again")
    return summary


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics up to `step` (the checkpoint resumed from): a crashed run's later lines would repeat."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by the crash
            continue
    write_atomic(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


# -------------------------------------------------------------------------------------- console and signals


class Console:
    """A rich progress bar on a terminal; on a pipe or file, only the per-eval lines (no bar, no escape codes)."""

    def __init__(self, total: int, completed: int, title: str) -> None:
        self.progress = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} it/s  loss {task.fields[loss]}"), TimeRemainingColumn(),
            )  # fmt: skip
            self.task = self.progress.add_task(title, total=total, completed=completed, rate="-", loss="-")
            self.progress.start()

    def advance(self, step: int, loss: float | None = None, rate: float | None = None) -> None:
        if self.progress is None:
            return
        fields = {} if loss is None else {"loss": f"{loss:.4f}", "rate": f"{rate:.1f}"}
        self.progress.update(self.task, completed=step, **fields)

    def line(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict[str, int]]:
    """SIGINT/SIGTERM set flag['signal'] (the loop then checkpoints and stops); a second SIGINT aborts at once."""
    flag: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and flag:
            raise KeyboardInterrupt
        flag["signal"] = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              f"(Ctrl-C again aborts without one)", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------------------- fit


def fit(cfg: Config) -> dict[str, Any]:
    """Train `cfg` to the end (or resume it) and return the summary also written to <run_dir>/summary.json.

    Summary keys: test_error (%), run_dir, run_name, steps, wall_time_s (all invocations), train_time_s,
    images_per_s (training throughput, evaluation excluded), final_loss, device, precision (float32 | bf16 |
    bf16+float32 for a run resumed in another precision),
    parameters, torch_version,
    dataset, model, transformer, seed, resumed_from (step or null), finished_at, wandb ({mode, id, path, dir}
    or null). Raises TrainingError (bad checkpoint, non-finite loss, no device) or TrainingInterrupted.
    """
    from stn.data import build_data
    from stn.models import count_parameters

    started = time.perf_counter()
    found, start = locate_run(cfg)
    if found is not None and start == "finished":
        return finished_summary(found, cfg)
    device = resolve_device(cfg.trainer.device)
    trainer = cfg.trainer
    amp, channels_last = runtime_flags(trainer, device)
    precision = "bf16" if amp else "float32"
    if device.type == "cpu":
        keep_freed_memory()
        if amp and not cpu_has_bf16():
            print("warning: trainer.cpu_precision=bf16 on a CPU without bf16 hardware: bf16 is emulated here and "
                  "much slower than float32; use trainer.cpu_precision=float32 (or auto)", file=sys.stderr)
    state = None
    if found is not None and start == "resume":
        state = load_checkpoint(found / CHECKPOINT, device)
        check_resumable(state["config"], cfg, found / CHECKPOINT)

    model = prepare_model(cfg, device)
    optimizer, parameters = build_optimizer(model, trainer), count_parameters(model)
    scheduler = build_scheduler(optimizer, trainer)
    stream, test_set = build_data(cfg, device)

    folder = found if found is not None else new_run_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, run_dir=str(folder))
    write_atomic(folder / "config.yaml", lambda tmp: tmp.write_text(to_yaml(cfg)))
    step, clock = 0, {"wall_time_s": 0.0, "train_time_s": 0.0}
    precisions = [precision]  # every precision this run has trained in, across invocations
    if state is not None:
        restore(state, folder / CHECKPOINT, model, optimizer, scheduler, stream)
        step, clock = int(state["step"]), dict(state.get("clock", clock))
        precisions = sorted(set(state.get("precisions", ["float32"])) | {precision})
    metrics_path = folder / "metrics.jsonl"
    if state is not None:
        truncate_metrics(metrics_path, step)
    else:
        metrics_path.write_text("")
    resumed_from = step if state is not None else None
    forward = torch.compile(model) if trainer.compile else model

    what = f"{cfg.run_name} on {device} ({parameters:,} parameters)"
    print(f"{'resuming' if state else 'training'} {what} from step {step} of {trainer.iterations}; "
          f"run folder {folder}", flush=True)
    wall_before, first_step = clock["wall_time_s"], step
    # On-device accumulators (no sync per step): the summed loss since the last log, and the first step
    # whose loss was not finite (-1: none yet).
    loss_sum = torch.zeros((), device=device)
    bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    interval_start, paused, logged_step = time.perf_counter(), 0.0, step  # paused: eval/checkpoint seconds
    run_images, run_seconds = 0, 0.0  # this invocation's logged training images and time
    final_loss: float | None = None
    test_error = math.nan

    def check_finite(before_checkpoint: bool = False) -> None:
        first_bad = int(bad_step)  # the sync
        if first_bad < 0 and not (before_checkpoint and not all_finite(model)):
            return
        at = f"step {first_bad}" if first_bad >= 0 else f"some step up to {step} (parameters)"
        saved = folder / CHECKPOINT
        kept = (f"the last good checkpoint {saved} (step {load_checkpoint(saved, torch.device('cpu'))['step']}) "
                f"is kept" if saved.is_file() else "no checkpoint was written before it")
        raise TrainingError(f"{cfg.run_name}: the loss became NaN/inf at {at} with trainer.lr={trainer.lr}; "
                            f"{kept}. Lower trainer.lr and start a new run")

    def run_eval() -> float:
        check_finite()
        return evaluate(forward, test_set, trainer.eval_batch_size, amp=amp, channels_last=channels_last)

    console = Console(trainer.iterations, step, cfg.run_name)
    try:
        with Tracker(cfg, folder) as tracker, stop_on_signals() as stop:
            while step < trainer.iterations:
                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it on)
                loss = fit_step(forward, optimizer, scheduler, stream, amp=amp, channels_last=channels_last)
                step += 1
                loss_sum += loss
                bad_step = torch.where((bad_step < 0) & ~loss.isfinite(), step, bad_step)
                console.advance(step)
                last = step == trainer.iterations
                stopping = "signal" in stop or step - first_step == trainer.stop_after
                if step % trainer.log_every == 0 or last or stopping:
                    check_finite()
                    now = time.perf_counter()
                    seconds = max(now - interval_start - paused, 1e-9)
                    images_done = (step - logged_step) * trainer.batch_size
                    final_loss = float(loss_sum) / (step - logged_step)
                    record = {"step": step, "loss": final_loss, "lr": lr,
                              "images_per_s": images_done / seconds, "time_s": wall_before + now - started}
                    append_metrics(metrics_path, record)
                    tracker.log({k: v for k, v in record.items() if k != "step"}, step)
                    console.advance(step, final_loss, (step - logged_step) / seconds)
                    clock["train_time_s"] += seconds
                    run_images, run_seconds = run_images + images_done, run_seconds + seconds
                    loss_sum.zero_()
                    interval_start, paused, logged_step = now, 0.0, step
                pause_start = time.perf_counter()
                if step % trainer.eval_every == 0 or last:
                    test_error = run_eval()
                    append_metrics(metrics_path, {"step": step, "test_error": test_error})
                    tracker.log({"test_error": test_error}, step)
                    loss_text = "-" if final_loss is None else f"{final_loss:.4f}"
                    console.line(f"{cfg.run_name} step {step}/{trainer.iterations} | loss {loss_text} | "
                                 f"lr {lr:.3g} | test error {test_error:.2f}%")
                if step % trainer.checkpoint_every == 0 or last or stopping:
                    check_finite(before_checkpoint=True)
                    clock["wall_time_s"] = wall_before + time.perf_counter() - started
                    save_checkpoint(folder / CHECKPOINT,
                                    checkpoint_state(step, model, optimizer, scheduler, stream, cfg, clock)
                                    | {"precisions": precisions})
                paused += time.perf_counter() - pause_start
                if stopping and not last:
                    console.close()
                    reason = (signal.Signals(stop["signal"]).name if "signal" in stop
                              else f"trainer.stop_after={trainer.stop_after}")
                    raise TrainingInterrupted(
                        f"{cfg.run_name} stopped at step {step}/{trainer.iterations} ({reason}); checkpoint "
                        f"{folder / CHECKPOINT}. Continue with trainer.resume=true run_dir={folder}",
                        step, folder, 128 + stop["signal"] if "signal" in stop else 0)
            if step == first_step:  # resumed from a checkpoint taken at the very end: evaluate it
                test_error = run_eval()
            console.close()
            count = cfg.logger.images
            tracker.log_images(model, test_set.images[:count], test_set.labels[:count], step)
            clock["wall_time_s"] = wall_before + time.perf_counter() - started
            summary = {
                "test_error": test_error, "run_dir": str(folder), "run_name": cfg.run_name, "steps": step,
                "wall_time_s": clock["wall_time_s"], "train_time_s": clock["train_time_s"],
                "images_per_s": run_images / run_seconds if run_seconds else None,
                "final_loss": final_loss, "device": str(device), "precision": "+".join(precisions),
                "parameters": parameters,
                "torch_version": torch.__version__, "dataset": cfg.dataset.name, "model": cfg.model.name,
                "transformer": cfg.transformer.type, "seed": cfg.seed, "resumed_from": resumed_from,
                "finished_at": dt.datetime.now().isoformat(timespec="seconds"), "wandb": tracker.info,
            }  # fmt: skip
            summary.update(recovery_metrics(model, test_set, cfg))  # stn.recovery: flat recovery/* keys
            tracker.set_summary(summary)
    finally:
        console.close()
    write_json(folder / "summary.json", summary)
    return summary
