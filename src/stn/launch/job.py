"""The shape of a job that stn.launch.executors runs: a config with its run folder, and a label for the log lines.

Its own module, without submitit, so that stn.launch.sweep can build jobs without paying for stn.launch.executors's imports on
commands that only plan (`stn train --cfg job`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from stn.config import Config


class Job(ABC):
    """What `run_jobs` runs: a table cell x seed (stn.tables.reproduce.CellJob) or a sweep member (stn.launch.sweep.Member).
    Subclasses are frozen dataclasses with a `config` field and a `label` for the log lines."""

    config: Config  # a field of the subclass; the annotation here is for type checkers only

    @property
    def run_dir(self) -> Path:
        """The job's run folder: the config's run_dir, which whoever builds the job has always set."""
        assert self.config.run_dir is not None
        return Path(self.config.run_dir)

    @property
    @abstractmethod
    def label(self) -> str:
        """What the log lines call the job, e.g. "CNN / R seed 0" or "#1 dataset=RTS model=cnn"."""
