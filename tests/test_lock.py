"""stn.lock: a held lock refuses a second writer and is released; a dead process's lock is taken over, another
host's is not; a requeued Slurm job takes over its own lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stn.lock import locked
from stn.runs import LOCK, RunFolderBusy, RunFolderError


def test_a_held_lock_refuses_a_second_writer_and_is_released(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with locked(folder):
        holder = json.loads((folder / LOCK).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(RunFolderBusy, match=f"in use by process {os.getpid()}"), locked(folder):
            pass
    assert not (folder / LOCK).exists()


@pytest.mark.subprocess
def test_a_dead_processs_lock_is_taken_over_another_hosts_is_not(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    (folder / LOCK).write_text(json.dumps({"pid": dead, "host": os.uname().nodename}))
    with locked(folder):
        assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    (folder / LOCK).write_text(json.dumps({"pid": dead, "host": "another-node"}))
    with pytest.raises(RunFolderError, match="on another-node"), locked(folder):
        pass  # its pid means nothing here: only the user can tell whether that process is gone
    (folder / LOCK).write_text('{"pid": ')  # cut short by kill -9 while writing: taken over
    with locked(folder):
        pass


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Preempted and requeued on another node: same SLURM_JOB_ID, another host; another job's lock holds."""
    folder = tmp_path / "run"
    folder.mkdir()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (folder / LOCK).write_text(json.dumps({"pid": 1, "host": "node-a", "job": "4242"}))
    with locked(folder):
        assert json.loads((folder / LOCK).read_text())["job"] == "4242"
    (folder / LOCK).write_text(json.dumps({"pid": 1, "host": "node-a", "job": "777"}))
    with pytest.raises(RunFolderError, match="on node-a"), locked(folder):
        pass
