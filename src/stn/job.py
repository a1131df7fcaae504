"""The shape of a job that stn.launch runs: a config with its run folder, and a label for the log lines.

Its own module, without submitit, so that stn.sweep can build jobs without paying for stn.launch's imports on
commands that only plan (`stn train --cfg job`).
"""

from __future__ import annotations

from pathlib import Path

from stn.config import Config


class Job:
    """What `run_jobs` runs: a table cell x seed (stn.tables.CellJob) or a sweep member (stn.sweep.Member).
    Subclasses are frozen dataclasses with a `config` field and a `label` for the log lines."""

    config: Config  # a field of the subclass; the annotation here is for type checkers only

    @property
    def run_dir(self) -> Path:
        """The job's run folder: the config's run_dir, which whoever builds the job has always set."""
        assert self.config.run_dir is not None
        return Path(self.config.run_dir)

    @property
    def label(self) -> str:  # e.g. "CNN / R seed 0" or "#1 dataset=RTS model=cnn"
        raise NotImplementedError
