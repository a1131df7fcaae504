"""stn.launch.executors: submitit executors (Slurm parameters, the checkpointable cell task, no cluster = a clear error)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stn.config import Config
from stn.grid import load_grid
from stn.launch.executors import LaunchError, SlurmOptions, slurm_parameters
from stn.tables.reproduce import plan_jobs, reproduce

GRID = Path(__file__).resolve().parents[1] / "experiments" / "table1" / "grid.yaml"
runner = CliRunner()


def fake_fit(cfg: Config) -> dict[str, Any]:
    return {"test_error": 1.0}


def test_slurm_parameters_reach_the_sbatch_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import submitit
    from submitit.slurm import slurm

    # No Slurm here: pretend srun exists so submitit builds the executor, then render its sbatch file.
    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(
        **slurm_parameters(SlurmOptions(partition="gpu", gpus=2, cpus=8, time_min=90), 4)
    )
    script = slurm._make_sbatch_string(
        command="python -c pass", folder=tmp_path, **executor._executor.parameters
    )
    for line in ("--partition=gpu", "--gpus-per-node=2", "--cpus-per-task=8", "--time=90"):
        assert f"#SBATCH {line}\n" in script


def test_cell_task_requeues_itself_with_the_same_arguments(tmp_path: Path) -> None:
    """submitit calls `checkpoint` on a time limit/preemption and resubmits what it returns: the same cell."""
    from stn.launch.executors import CellTask

    [job] = plan_jobs(load_grid(GRID), [("CNN", "R")], [0], "smoke", [], tmp_path, "g")
    task = CellTask()
    again = task.checkpoint(job.config, 2, None)
    assert again.function is task and again.args == (job.config, 2, None)
    assert again.args[0].trainer.resume is True  # so the requeued run continues from its checkpoint


@pytest.mark.skipif(shutil.which("srun") is not None, reason="this machine has Slurm: the error cannot occur")
def test_slurm_without_a_cluster_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="needs a Slurm cluster.*--executor local"):
        reproduce(GRID, rows=["CNN"], columns=["R"], preset="smoke", executor="slurm", out=tmp_path,
                  fit_fn=fake_fit, log=lambda _: None)  # fmt: skip


def test_table_cells_and_sweep_members_share_the_job_shape(tmp_path: Path) -> None:
    """run_jobs reads run_dir and label; both job kinds get run_dir from one place (stn.launch.job.Job)."""
    from stn.launch.job import Job
    from stn.launch.sweep import plan

    [cell] = plan_jobs(load_grid(GRID), [("CNN", "R")], [1], "smoke", [], tmp_path, "g")
    [member], _ = plan([f"hydra.run.dir={tmp_path / 'single'}", "dataset=R"], multirun=False)
    for job in (cell, member):
        assert isinstance(job, Job)
        assert job.run_dir == Path(job.config.run_dir)
    assert cell.run_dir == tmp_path / "cells" / cell.cell / "seed1"
    assert member.run_dir == tmp_path / "single"
    assert cell.label == "CNN / R seed 1" and member.label == "#0 dataset=R"


@pytest.mark.subprocess
def test_planning_a_sweep_does_not_import_submitit() -> None:
    """`stn train --cfg job` plans without launching: stn.launch.sweep must not pull in submitit (about 0.2 s)."""
    import subprocess
    import sys

    code = "import sys, stn.launch.sweep; print('submitit' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
