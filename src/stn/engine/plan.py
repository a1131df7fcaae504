"""Plan a table for the batched engine: its members, groups of same-shape models, their costs, chunks.

Members: one per (row, column, seed) of a grid file (experiments/table1/grid.yaml), composed as
`stn reproduce-table` composes its cells (`stn.grid.compose_cells`); further grids' members may be queued
beside them (`unique_members`: a cell two grids share trains once).
Groups: members whose models share every shape (`stn.engine.options.shape_signature`) and optimiser settings train
together in one `BatchedModels`: a cell's seeds, and one architecture across the 28x28 datasets R, P and E
(Table 1 at 3 seeds: 8 groups of 9 models on 28x28, 8 groups of 3 on RTS, 4 groups of 3 on TC).

Cost: seconds per step of a group measured in a table run (its results.json), else from a cost table
(`images_per_s` measured by `stn engine bench` per model kind, canvas size and K; the nearest K is used), else
from FLOPs per image (torch's FlopCounterMode) at an assumed achieved FLOP/s. `stn engine plan` defaults to the
first H200 loan's bench and table run; its per-conv-path predictions (roofline lower bounds for paths not
measured) are `stn.engine.step_cost`'s. `pack_chunks` cuts the remaining work into chunks of at most `budget_s` seconds in
run order (shortest group first, so cells finish as early as possible), splitting a group at a step boundary
when it does not fit; it is what tells how many loans a table needs.

Running the plan is stn.engine.table_run's (`run_table`: groups trained to a deadline, resumed from the
partly trained groups' states, stn.engine.states'); its record (results.json -> the per-cell results, table.md,
chart and W&B table that `stn reproduce-table` writes) is stn.engine.record's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stn.config import OPTIMISER_KEYS, Config
from stn.engine.options import shape_signature
from stn.grid import slug


class PlanError(RuntimeError):
    """A plan or saved progress that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Member:
    row: str
    column: str
    seed: int
    config: Config
    paper: float | None = None
    table: str = ""  # the grid file's name: a state may hold several tables' members (stn engine run --extra)

    @property
    def key(self) -> str:
        return f"{self.row}|{self.column}|{self.seed}"


@dataclass
class Group:
    gid: str
    members: list[Member]

    @property
    def k(self) -> int:
        return len(self.members)

    @property
    def trainer(self) -> Any:
        return self.members[0].config.trainer

    @property
    def iterations(self) -> int:
        return self.trainer.iterations

    @property
    def size(self) -> int:
        return self.members[0].config.dataset.size

    @property
    def kind(self) -> str:
        return self.members[0].row


def table_members(grid_path: str | Path, seeds: Sequence[int], preset: str, overrides: Sequence[str] = (),
                  rows: Sequence[str] | None = None, columns: Sequence[str] | None = None) -> list[Member]:
    """One Member per selected cell x seed of the grid file, composed as `stn reproduce-table` composes its cells
    (`stn.grid.compose_cells`); an override of a key a row or column sets is refused (its label would lie)."""
    from stn.grid import TableError, check_overrides, compose_cells, label_problems, load_grid, select_cells

    grid = load_grid(grid_path)
    selected = select_cells(grid, rows, columns)
    check_overrides(overrides, "--override")  # seed, run_dir, the preset: the engine's options set them
    problems = label_problems(overrides, [source for row, column in selected for source in
                                          ((f"row {row}", grid.rows[row]), (f"column {column}", grid.columns[column]))])
    if problems:
        raise TableError("\n".join(dict.fromkeys(problems)))
    cells = compose_cells(grid, selected, [int(s) for s in seeds], [f"trainer={preset}", *overrides])
    return [Member(c.row, c.column, c.seed, c.config, c.paper, table=grid.name) for c in cells]


def unique_members(members: Sequence[Member]) -> list[Member]:
    """Members with one key once (a cell two queued grids share trains once); PlanError if the two would
    train different configs under one key."""
    seen: dict[str, Member] = {}
    for member in members:
        other = seen.setdefault(member.key, member)
        if other.config != member.config:
            raise PlanError(f"cell {member.row} / {member.column} seed {member.seed} is in tables {other.table} and "
                            f"{member.table} with different configs; rename one's row or column")
    return list(seen.values())


def make_groups(members: Sequence[Member], max_k: int | None = None) -> list[Group]:
    """Members of one table with one shape and one optimiser, in order of first appearance; at most max_k per
    group. A queued table's members form their own groups: the first table's group names (a partial.pt's)
    stay what they were without it."""
    keys = (*OPTIMISER_KEYS, "iterations")
    buckets: dict[tuple, list[Member]] = {}
    for member in members:
        trainer = member.config.trainer
        key = (member.table, shape_signature(member.config), tuple(getattr(trainer, k) for k in keys))
        buckets.setdefault(key, []).append(member)
    groups = []
    for bucket in buckets.values():
        step = max_k or len(bucket)
        for part, start in enumerate(range(0, len(bucket), step)):
            chunk = bucket[start:start + step]
            columns = "-".join(dict.fromkeys(m.column for m in chunk))
            gid = f"{slug(chunk[0].row)}_{columns}" + (f"_{part}" if len(bucket) > step else "")
            groups.append(Group(gid, chunk))
    return groups


# ------------------------------------------------------------------------------------------------ cost


@dataclass
class CostModel:
    """Seconds per step of a group. table: rows {"kind", "size", "k", "images_per_s"} (from the bench);
    fallback: FLOPs per image / `flops_per_s` (an assumed achieved rate, e.g. a fraction of the peak)."""

    table: list[dict[str, Any]] = field(default_factory=list)
    flops_per_s: float = 1e12
    # seconds per step of whole groups measured in a table run (gid -> s/step: data, step, logging included);
    # they come before the bench rows (`table_run_seconds`)
    group_seconds: dict[str, float] = field(default_factory=dict)
    _flops: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None, flops_per_s: float = 1e12, table_run: str | Path | None = None
             ) -> CostModel:
        group_seconds = table_run_seconds(table_run) if table_run is not None else {}
        if path is None or not Path(path).is_file():
            return cls(flops_per_s=flops_per_s, group_seconds=group_seconds)
        data = json.loads(Path(path).read_text())
        rows = data.get("cost", data.get("rows", [])) if isinstance(data, dict) else data
        return cls(table=[r for r in rows if r.get("images_per_s")], flops_per_s=flops_per_s,
                   group_seconds=group_seconds)

    def flops_per_image(self, group: Group) -> float:
        cfg = group.members[0].config
        key = shape_signature(cfg)
        if key not in self._flops:
            from stn.measure import model_flops_per_image

            self._flops[key] = model_flops_per_image(cfg)
        return self._flops[key]

    def _row(self, group: Group) -> tuple[dict[str, Any] | None, bool]:
        """The measured row for this kind at the nearest K (at this canvas size, else at another size, if it
        carries flops_per_image); and whether it was measured at another size."""
        rows = [r for r in self.table if r.get("kind") == group.kind]
        same = [r for r in rows if int(r.get("size", 0)) == group.size]
        other = [r for r in rows if r.get("flops_per_image")]
        for candidates in (same, other):
            if candidates:
                return min(candidates, key=lambda r: (abs(math.log(int(r["k"]) / group.k)), -int(r["k"]))), \
                    candidates is other
        return None, False

    def images_per_s(self, group: Group) -> tuple[float, str]:
        """Measured rate of this kind at the nearest K: at this canvas size, else at another size scaled by
        the FLOPs per image (rows that carry flops_per_image); else the FLOP estimate."""
        if group.gid in self.group_seconds:
            return group.k * group.trainer.batch_size / self.group_seconds[group.gid], "measured in a table run"
        best, scaled = self._row(group)
        if best is None:
            return self.flops_per_s / self.flops_per_image(group), "FLOP estimate"
        rate = float(best["images_per_s"])
        if scaled:
            rate *= float(best["flops_per_image"]) / self.flops_per_image(group)
            return rate, f"measured at {best.get('size')}px, scaled by FLOPs (K={best['k']})"
        return rate, f"measured (K={best['k']})"

    def mode_for(self, group: Group, default: str = "vmap") -> str:
        """The engine mode of the measured row `images_per_s` uses (the bench keeps the faster mode per kind
        and K), or `default` where nothing was measured."""
        best, _ = self._row(group)
        return str(best.get("mode") or default) if best is not None else default

    def auto_mode(self, group: Group, device_type: str) -> str:
        """`--mode auto`'s choice for a group: the mode the bench measured faster for this kind at this canvas
        size (or, in experiments/bench/engine_ab.py's cost table, the winner of the nearest measured analogue,
        marked inferred_from); where it has none (another size's row only scales a rate, not a choice of path), the rule
        `stn.engine.conv_paths.conv_path_for`. The rule's "loop" is kept over a measured "im2col": it means this canvas's
        patch matrix exceeds the memory the rule allows (the TC CNN's is ~1.8 GB a step at K=3)."""
        from stn.engine.conv_paths import conv_path_for

        rule = conv_path_for(group.members[0].config, device_type)
        best, scaled = self._row(group)
        if best is None or scaled or not best.get("mode"):
            return rule
        measured = str(best["mode"])
        return rule if measured == "im2col" and rule == "loop" else measured

    def seconds_per_step(self, group: Group) -> float:
        return group.k * group.trainer.batch_size / self.images_per_s(group)[0]


def table_run_seconds(path: str | Path) -> dict[str, float]:
    """Seconds per step of each group a table run finished (its results.json: train_seconds / steps)."""
    path = Path(path)
    if not path.is_file():
        return {}
    members = json.loads(path.read_text()).get("members", {})
    return {m["group"]: m["train_seconds"] / m["steps"] for m in members.values() if m.get("steps")}


# ---------------------------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class Segment:
    gid: str
    start: int  # first step (steps already done)
    end: int  # step reached at the end of the segment
    seconds: float  # estimated, overhead included


def run_order(groups: Sequence[Group], costs: CostModel, first: str | Sequence[str] | None = None) -> list[Group]:
    """Shortest estimated group first (most cells finished early); `first` (partly trained groups) lead."""
    ordered = sorted(groups, key=lambda g: (costs.seconds_per_step(g) * g.iterations, g.gid))
    leading = {first} if isinstance(first, str) else set(first or ())
    ordered.sort(key=lambda g: g.gid not in leading)
    return ordered


def pack_chunks(groups: Sequence[Group], costs: CostModel, budget_s: float, *, done: dict[str, int] | None = None,
                granularity: int = 100, overhead_s: float = 10.0) -> list[list[Segment]]:
    """The remaining work as chunks of at most `budget_s` estimated seconds each, in run order.

    done: steps already trained per group (a finished group: its iterations). A group that does not fit the
    chunk's rest is split at a multiple of `granularity` steps; `overhead_s` per segment covers building the
    models, the first step's warm-up, evaluation and the checkpoint.
    """
    if budget_s <= overhead_s:
        raise PlanError(f"a chunk of {budget_s} s leaves no time after the {overhead_s} s per-segment overhead")
    done = done or {}
    chunks: list[list[Segment]] = [[]]
    left = budget_s
    for group in run_order(groups, costs, first=[g for g, s in done.items() if 0 < s < _iters(groups, g)]):
        step, per_step = done.get(group.gid, 0), costs.seconds_per_step(group)
        while step < group.iterations:
            fits = int((left - overhead_s) / per_step) if left > overhead_s else 0
            room = fits // granularity * granularity
            if room <= 0:
                if chunks[-1]:  # start a new chunk
                    chunks.append([])
                    left = budget_s
                    continue
                room = max(fits, 1)  # an empty chunk that holds less than a granule (a slow device): what fits
            end = min(group.iterations, step + room)
            seconds = overhead_s + (end - step) * per_step
            chunks[-1].append(Segment(group.gid, step, end, seconds))
            left -= seconds
            step = end
    return [c for c in chunks if c]


def _iters(groups: Sequence[Group], gid: str) -> int:
    return next(g.iterations for g in groups if g.gid == gid)
