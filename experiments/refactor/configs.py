"""Print one line per planned Config (its YAML's sha256) for the table, the engine and the convergence studies:
run with the code before and after a change (PYTHONPATH=<checkout>/src) and diff the outputs."""
import hashlib
import sys
from pathlib import Path

from stn.config import to_yaml
from stn.convergence.study import load_study, plan
from stn.engine.plan import table_members
from stn.grid import load_grid, select_cells
from stn.tables.reproduce import plan_jobs

GRID = "experiments/table1/grid.yaml"


def line(what: str, cfg) -> str:
    return f"{what} {hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]}"


grid = load_grid(GRID)
for job in plan_jobs(grid, select_cells(grid), [0, 1, 2], "quick", ["trainer.iterations=300"], Path("/tmp/t"), "g"):
    print(line(f"table {job.row}/{job.column}/{job.seed}", job.config))
for member in table_members(GRID, [0, 1, 2], "paper"):
    print(line(f"engine {member.key}", member.config))
for study in sys.argv[1:]:
    for cell in plan(load_study(study)):
        print(line(f"{study} {cell.row}/{cell.column}/{cell.budget}/{cell.seed}", cell.config))
