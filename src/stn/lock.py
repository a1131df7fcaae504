"""The lock that keeps two processes out of one run folder: <folder>/.lock holds {"pid", "host", "job"}.

A second process on the same folder (a duplicated seed, a table worker orphaned by kill -9 and its rerun)
gets a RunFolderError instead of interleaved files. The lock of a process that is gone (same host, dead
pid), or of the same Slurm job before its requeue, is taken over; a run that could not start leaves no empty
folder behind. The rest of the run folder is `stn.runs`'.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from stn.runs import LOCK, RunFolderBusy, RunFolderError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold <folder>/.lock while writing the run: a second process (a duplicated seed, a table worker
    orphaned by kill -9 and its rerun) gets a RunFolderError instead of interleaved files. The lock of a
    process that is gone (same host, dead pid) is taken over."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    # A Slurm job requeued after preemption keeps its SLURM_JOB_ID but may land on another node: the lock of
    # its previous incarnation is taken over (that incarnation is gone once the job runs again).
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "job": os.environ.get("SLURM_JOB_ID")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except (OSError, ValueError, KeyError, TypeError):  # half-written by a process killed at once
                holder, pid, host = {}, -1, mine["host"]
            same_job = mine["job"] is not None and holder.get("job") == mine["job"]
            if same_job or (host == mine["host"] and (pid < 0 or not _alive(pid))):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise RunFolderBusy(
                f"run folder {folder} is in use by process {pid} on {host} (lock file {path}): wait for it to "
                f"end, or delete {path} if that process is gone"
            ) from None
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(mine))
        break
    else:
        raise RunFolderError(f"cannot take the lock {path}; delete it if no process is using {folder}")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        if created:  # a run that could not start leaves no empty folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()
