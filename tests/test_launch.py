"""stn.launch: submitit executors (Slurm parameters, the checkpointable cell task, no cluster = a clear error)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stn.config import Config
from stn.grid import TableError, load_grid
from stn.launch import SlurmOptions, slurm_parameters
from stn.tables import plan_jobs, reproduce

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
    from stn.launch import CellTask

    [job] = plan_jobs(load_grid(GRID), [("CNN", "R")], [0], "smoke", [], tmp_path, "g")
    task = CellTask()
    again = task.checkpoint(job.config, 2, None)
    assert again.function is task and again.args == (job.config, 2, None)
    assert again.args[0].trainer.resume is True  # so the requeued run continues from its checkpoint


@pytest.mark.skipif(shutil.which("srun") is not None, reason="this machine has Slurm: the error cannot occur")
def test_slurm_without_a_cluster_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="needs a Slurm cluster.*--executor local"):
        reproduce(GRID, rows=["CNN"], columns=["R"], preset="smoke", executor="slurm", out=tmp_path,
                  fit_fn=fake_fit, log=lambda _: None)  # fmt: skip
