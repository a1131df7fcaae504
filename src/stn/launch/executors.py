"""Running trainings through submitit (public API only): executors, the job body, the in-flight window.

The one fan-out mechanism of the package: a table's cells (stn.tables.reproduce) and a `stn train -m` sweep's members
(stn.launch.sweep) both run here. `local` runs them as processes on this machine, `slurm` as Slurm jobs, `debug` in
this process one after another. Each job calls `run_cell`, which never raises (a failed cell is a result,
not a crash of the table); `CellTask` is submitit's Checkpointable, so a Slurm preemption requeues the cell,
which resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
import submitit.helpers
import submitit.local.local

from stn.config import Config, UserError
from stn.launch.job import Job

EXECUTORS = ("local", "slurm", "debug")


class LaunchError(UserError):
    """An executor that cannot run here (an unknown kind, Slurm without a cluster); the message names the fix."""
FitFn = Callable[[Config], dict]


def run_cell(config: Config, threads: int | None = None, fit_fn: FitFn | None = None) -> dict[str, Any]:
    """The job body (runs in the worker). Returns fit's summary with status 'done', or status 'failed' /
    'interrupted' (stopped with a checkpoint) and the error; never raises, so one bad cell cannot take the
    table down (and submitit's debug executor, which opens pdb on an exception, never does)."""
    previous = None
    try:
        import torch

        if threads:
            # Parallel cells share the CPU: without this each would start one thread per core.
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
        if fit_fn is None:
            from stn.train import fit as fit_fn
        summary = dict(fit_fn(config))
        summary["status"] = "done"
        return summary
    except Exception as err:
        from stn.train import TrainingInterrupted

        if isinstance(err, TrainingInterrupted):  # a signal or trainer.stop_after: checkpointed, resumable
            return {
                "status": "interrupted",
                "error": str(err),
                "signal": err.exit_code != 0,
                "exit_code": err.exit_code,  # 128 + the signal's number (0: trainer.stop_after)
                "step": err.step,
            }
        return {
            "status": "failed",
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        }
    finally:
        if previous is not None:
            import torch

            torch.set_num_threads(previous)


class CellTask(submitit.helpers.Checkpointable):
    """The submitted callable: `run_cell`, checkpointable. On a Slurm time limit or preemption (submitit's
    USR2), submitit's Checkpointable requeues the same call; fit then resumes from the run's last checkpoint
    (trainer.resume=true), losing at most trainer.checkpoint_every steps."""

    def __call__(
        self, config: Config, threads: int | None = None, fit_fn: FitFn | None = None
    ) -> dict[str, Any]:
        return run_cell(config, threads, fit_fn)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None
    gpus: int = 1
    cpus: int | None = None
    time_min: int = 24 * 60


def slurm_parameters(options: SlurmOptions, parallel: int) -> dict[str, Any]:
    """submitit AutoExecutor parameters for one cell per Slurm job."""
    params: dict[str, Any] = {
        "timeout_min": options.time_min,
        "gpus_per_node": options.gpus,
        "tasks_per_node": 1,
        "nodes": 1,
        "slurm_array_parallelism": parallel,
        "name": "stn-table",
    }
    if options.partition:
        params["slurm_partition"] = options.partition
    if options.cpus:
        params["cpus_per_task"] = options.cpus
    return params


def build_executor(kind: str, folder: Path, parallel: int, slurm: SlurmOptions) -> Any:
    """The submitit executor for `kind` (local | slurm | debug); submitit keeps its logs under `folder`."""
    if kind == "local":
        executor = submitit.LocalExecutor(folder=folder)
        # A local job is killed at timeout_min (submitit's default is 2 minutes): give it the slurm time.
        executor.update_parameters(timeout_min=slurm.time_min)
        return executor
    if kind == "debug":
        return submitit.DebugExecutor(folder=folder)
    if kind == "slurm":
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        except RuntimeError as err:
            raise LaunchError(
                f"--executor slurm needs a Slurm cluster ({err}); use --executor local on this machine"
            ) from None
        executor.update_parameters(**slurm_parameters(slurm, parallel))
        return executor
    raise LaunchError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")


def start_pool(kind: str, count: int, parallel: int | None, folder: Path,
               slurm: SlurmOptions) -> tuple[Any, int, int | None]:
    """(executor, width, torch threads per job) for `count` jobs: at most `parallel` at once (default: local
    and debug one, slurm all); local jobs share this machine's cores, a Slurm job gets its own (cpus_per_task),
    debug runs in this process."""
    width = max(1, min(parallel or (count if kind == "slurm" else 1), count))
    threads = max(1, cpu_count() // width) if kind == "local" else None
    return build_executor(kind, folder, width, slurm), width, threads


def run_jobs(
    pool: Any,
    queue: deque[tuple[Job, str]],
    width: int,
    threads: int | None,
    fit_fn: FitFn | None,
    poll_s: float,
    log: Callable[[str], None],
) -> Iterator[tuple[Job, str, dict[str, Any]]]:
    """Keep at most `width` jobs in flight on the submitit executor; yield (job, source, summary) as each
    finishes, in finishing order. On Ctrl-C the jobs in flight are cancelled (they checkpoint and stop)."""
    in_flight: dict[Any, tuple[Job, str]] = {}
    try:
        while queue or in_flight:
            while queue and len(in_flight) < width:
                job, source = queue.popleft()
                job.run_dir.mkdir(parents=True, exist_ok=True)
                in_flight[pool.submit(CellTask(), job.config, threads, fit_fn)] = (job, source)
                log(f"  started {job.label} ({source})")
            done = [handle for handle in in_flight if handle.done()]
            if not done:
                time.sleep(poll_s)
            for handle in done:
                job, source = in_flight.pop(handle)
                try:
                    summary = handle.result()
                except Exception as err:  # the worker died (killed, out of memory): keep the table going
                    summary = {"status": "failed", "error": f"{type(err).__name__}: {err}".splitlines()[0]}
                yield job, source, summary
    except (KeyboardInterrupt, GeneratorExit):  # GeneratorExit: the caller was interrupted between yields
        stop_jobs(list(in_flight))
        raise


def stop_jobs(handles: Sequence[Any], wait_s: float = 60.0) -> None:
    """Stop running jobs so that fit writes a checkpoint first (it does on SIGTERM), then wait for them.

    A local job's id is its controller's pid (submitit's LocalExecutor), which forwards SIGTERM to the task;
    submitit's own cancel of a local job sends SIGINT, which a second Ctrl-C in fit would turn into an abort
    without a checkpoint. Slurm and debug jobs get `cancel` (scancel sends SIGTERM first).
    """
    for handle in handles:
        with contextlib.suppress(Exception):  # already gone
            if isinstance(handle, submitit.local.local.LocalJob):
                os.kill(int(handle.job_id), signal.SIGTERM)
            else:
                handle.cancel(check=False)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not all(_finished(handle) for handle in handles):
        time.sleep(0.2)  # still running after wait_s: leave it, its checkpoint stays resumable


def _finished(handle: Any) -> bool:
    try:
        return bool(handle.done())
    except Exception:  # a job whose state cannot be read any more counts as gone
        return True


class Stopped(KeyboardInterrupt):
    """A stop by a signal other than Ctrl-C; `exit_code` is 128 + its number (SIGTERM: 143), the code the command
    exits with (a plain KeyboardInterrupt, Ctrl-C, exits 130)."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


def stop_code(err: BaseException) -> int:
    """The exit code of a stopped command: 128 + the signal's number; 130 (SIGINT) for a plain Ctrl-C."""
    return getattr(err, "exit_code", 130)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """`kill <pid>` of the table process stops it like Ctrl-C (as `Stopped`, exit code 143): the runs in
    flight are stopped too, instead of training on as orphans that a rerun would start a second time."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Stopped(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


