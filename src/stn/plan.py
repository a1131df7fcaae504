"""Plan and run a table with the batched engine: groups of same-shape models, chunks that resume.

Members: one per (row, column, seed) of a grid file (experiments/table1/grid.yaml), composed as
`stn reproduce-table` composes its cells (row and column overrides, `trainer=<preset>`, the seed).
Groups: members whose models share every shape (`stn.batched.shape_signature`) and optimiser settings train
together in one `BatchedModels`: a cell's seeds, and one architecture across the 28x28 datasets R, P and E
(Table 1 at 3 seeds: 8 groups of 9 models on 28x28, 8 groups of 3 on RTS, 4 groups of 3 on TC).

Cost: seconds per step of a group from a cost table (`images_per_s` measured by `stn engine bench` per model
kind, canvas size and K; the nearest K is used), else from FLOPs per image (torch's FlopCounterMode) at an
assumed achieved FLOP/s. `pack_chunks` cuts the remaining work into chunks of at most `budget_s` seconds in
run order (shortest group first, so cells finish as early as possible), splitting a group at a step boundary
when it does not fit; it is what tells how many loans a table needs.

`run_table` executes from the saved progress until a deadline: groups in run order (a partly trained group
first), each trained until it finishes or the deadline would pass (`stn.batched_run.train_for`), then either
evaluated (its members' results are written) or checkpointed. Sequential groups leave at most one partly
trained group, so the state that must travel between loans is `results.json` (every finished member: test
error, steps, wall time, images/s) plus one `partial.pt` (that group's weights, momentum and data positions).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stn.batched import BatchedModels, EngineOptions, shape_signature
from stn.batched_data import make_stream
from stn.batched_run import GroupRun, train_for
from stn.compose import compose_many
from stn.config import Config
from stn.runs import save_checkpoint, write_atomic

RESULTS = "results.json"
PARTIAL = "partial.pt"
TABLE_CSV = "results.csv"
PROGRESS = "progress.json"
PLAN_VERSION = 1


class PlanError(RuntimeError):
    """A plan or saved progress that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Member:
    row: str
    column: str
    seed: int
    config: Config
    paper: float | None = None

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


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def table_members(grid_path: str | Path, seeds: Sequence[int], preset: str, overrides: Sequence[str] = (),
                  rows: Sequence[str] | None = None, columns: Sequence[str] | None = None) -> list[Member]:
    """One Member per selected cell x seed of the grid file, composed like `stn reproduce-table` does."""
    from stn.grid import TableError, check_overrides, label_problems, load_grid, select_cells

    grid = load_grid(grid_path)
    members = []
    cells = select_cells(grid, rows, columns)
    check_overrides(overrides, "--override")  # seed, run_dir, the preset: the engine's options set them
    problems = label_problems(overrides, [source for row, column in cells for source in
                                          ((f"row {row}", grid.rows[row]), (f"column {column}", grid.columns[column]))])
    if problems:
        raise TableError("\n".join(dict.fromkeys(problems)))
    bases = compose_many([[*grid.rows[row], *grid.columns[column], f"trainer={preset}", *overrides]
                          for row, column in cells])
    for (row, column), base in zip(cells, bases, strict=True):
        for seed in seeds:
            members.append(Member(row, column, int(seed), dataclasses.replace(base, seed=int(seed)),
                                  grid.cells[(row, column)]))
    return members


def make_groups(members: Sequence[Member], max_k: int | None = None) -> list[Group]:
    """Members with one shape and one optimiser, in order of first appearance; at most max_k per group."""
    keys = ("batch_size", "lr", "momentum", "weight_decay", "lr_step", "lr_gamma", "iterations")
    buckets: dict[tuple, list[Member]] = {}
    for member in members:
        trainer = member.config.trainer
        key = (shape_signature(member.config), tuple(getattr(trainer, k) for k in keys))
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
    _flops: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None, flops_per_s: float = 1e12) -> CostModel:
        if path is None or not Path(path).is_file():
            return cls(flops_per_s=flops_per_s)
        data = json.loads(Path(path).read_text())
        rows = data.get("cost", data.get("rows", [])) if isinstance(data, dict) else data
        return cls(table=[r for r in rows if r.get("images_per_s")], flops_per_s=flops_per_s)

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

    def seconds_per_step(self, group: Group) -> float:
        return group.k * group.trainer.batch_size / self.images_per_s(group)[0]


# ---------------------------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class Segment:
    gid: str
    start: int  # first step (steps already done)
    end: int  # step reached at the end of the segment
    seconds: float  # estimated, overhead included


def run_order(groups: Sequence[Group], costs: CostModel, first: str | None = None) -> list[Group]:
    """Shortest estimated group first (most cells finished early); `first` (a partly trained group) leads."""
    ordered = sorted(groups, key=lambda g: (costs.seconds_per_step(g) * g.iterations, g.gid))
    if first is not None:
        ordered.sort(key=lambda g: g.gid != first)
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
    for group in run_order(groups, costs, first=next((g for g, s in done.items() if 0 < s < _iters(groups, g)),
                                                     None)):
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


# ------------------------------------------------------------------------------------------------- run


def load_results(state_dir: Path) -> dict[str, dict[str, Any]]:
    path = state_dir / RESULTS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise PlanError(f"{path} is not JSON ({err}); delete it to start the table over") from None
    if data.get("version") != PLAN_VERSION:
        raise PlanError(f"{path} has version {data.get('version')}, expected {PLAN_VERSION}")
    return data["members"]


def save_results(state_dir: Path, results: dict[str, dict[str, Any]]) -> None:
    text = json.dumps({"version": PLAN_VERSION, "members": results}, indent=1) + "\n"
    write_atomic(state_dir / RESULTS, text)


def group_done(group: Group, results: dict[str, dict[str, Any]]) -> bool:
    return all(m.key in results for m in group.members)


def progress_of(groups: Sequence[Group], results: dict[str, dict[str, Any]], partial: dict[str, Any] | None
                ) -> dict[str, int]:
    done = {g.gid: g.iterations for g in groups if group_done(g, results)}
    if partial is not None:
        done[partial["gid"]] = int(partial["state"]["engine"]["step"])
    return done


def load_partial(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / PARTIAL
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file means the same thing
        raise PlanError(f"{path} is unreadable ({type(err).__name__}); delete it to retrain that group") from None


def _test_sets(members: Sequence[Member], data_dir: str, device: torch.device, cache: dict) -> list[Any]:
    from stn.data import make_test_set
    from stn.mnist import load_mnist

    digits, labels = load_mnist(data_dir, train=False)
    out = []
    for member in members:
        dataset = member.config.dataset
        if dataset not in cache:
            cache[dataset] = make_test_set(digits, labels, dataset, device)
        out.append(cache[dataset])
    return out


def run_table(groups: Sequence[Group], state_dir: str | Path, *, budget_s: float, device: str | torch.device,
              options: EngineOptions | None = None, costs: CostModel | None = None,
              log: Callable[[str], None] = print, clock: Callable[[], float] = time.perf_counter,
              max_groups: int | None = None) -> dict[str, Any]:
    """Train from the saved progress in `state_dir` until every group is done or `budget_s` is spent.

    Returns the progress record also written to <state_dir>/progress.json: groups done / partial / left,
    seconds used, and the estimate of what is left (`pack_chunks`).
    """
    from stn.mnist import load_mnist

    options = options or EngineOptions()
    started = clock()
    deadline = started + budget_s
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    costs = costs or CostModel()
    results = load_results(state_dir)
    partial = load_partial(state_dir)
    known = {g.gid for g in groups}
    if partial is not None and partial["gid"] not in known:
        raise PlanError(f"{state_dir / PARTIAL} holds group {partial['gid']!r}, which this plan does not have; "
                        f"run it with the plan it was made with, or delete it")
    cache: dict = {}
    trained = 0
    for group in run_order(groups, costs, first=partial["gid"] if partial else None):
        if group_done(group, results):
            continue
        if max_groups is not None and trained >= max_groups:
            break
        eval_reserve = costs.seconds_per_step(group) * 10 + 2.0  # ~10k test images, forward only, + slack
        if clock() + eval_reserve + costs.seconds_per_step(group) * 2 > deadline:
            log(f"{group.gid}: no time left in this chunk")
            break
        cfgs = [m.config for m in group.members]
        digits, labels = load_mnist(cfgs[0].data_dir, train=True)
        # mode "auto": each group in the mode the cost table measured faster for its kind (loop and vmap train
        # the same models, tests/test_batched.py; a group may change mode between chunks)
        group_options = dataclasses.replace(options, mode=costs.mode_for(group)) if options.mode == "auto" else options
        engine = BatchedModels(cfgs, device, group_options)
        stream = make_stream(cfgs, digits, labels, device, group_options)
        run = GroupRun(engine, stream, iterations=group.iterations, log_every=group.trainer.log_every)
        if partial is not None and partial["gid"] == group.gid:
            run.load_state_dict(partial["state"])
            log(f"{group.gid}: resuming at step {run.step}/{group.iterations}")
        partial = None
        before, began = run.step, clock()
        train_for(run, deadline - eval_reserve, clock=clock)
        trained += 1
        rate = run.images / run.train_seconds if run.train_seconds else float("nan")
        log(f"{group.gid}: K={group.k} {group_options.mode} steps {before}->{run.step}/{group.iterations} in "
            f"{clock() - began:.1f} s "
            f"({rate:,.0f} images/s all models), losses {[round(x, 4) for x in run.last_losses]}")
        if not run.done:
            state = {"gid": group.gid, "state": run.state_dict()}
            save_checkpoint(state_dir / PARTIAL, state)
            break
        errors = engine.evaluate(_test_sets(group.members, cfgs[0].data_dir, device, cache),
                                 cfgs[0].trainer.eval_batch_size)
        bad = run.bad_steps()
        for k, member in enumerate(group.members):
            results[member.key] = {
                "row": member.row, "column": member.column, "seed": member.seed, "paper": member.paper,
                "test_error": errors[k] if bad[k] < 0 else math.nan, "first_nonfinite_step": bad[k],
                "final_loss": run.last_losses[k] if run.last_losses else None, "steps": run.step,
                "group": group.gid, "k": group.k, "train_seconds": run.train_seconds,
                "images_per_s_group": rate, "mode": group_options.mode, "device": str(device),
                "torch": torch.__version__,
            }  # fmt: skip
        save_results(state_dir, results)
        (state_dir / PARTIAL).unlink(missing_ok=True)
        log(f"{group.gid}: test error {[round(e, 2) for e in errors]}")
        write_progress(groups, state_dir, results, costs, budget_s, clock() - started, device)
    return write_progress(groups, state_dir, results, costs, budget_s, clock() - started, device)


def write_progress(groups: Sequence[Group], state_dir: Path, results: dict[str, dict[str, Any]], costs: CostModel,
                   budget_s: float, seconds: float, device: torch.device) -> dict[str, Any]:
    """progress.json and results.csv from what is saved now (written after every group, so a killed chunk
    still leaves its finished cells readable)."""
    partial = load_partial(state_dir)
    done = progress_of(groups, results, partial)
    remaining = pack_chunks(groups, costs, max(budget_s, 60.0), done=done)
    record = {
        "groups": len(groups), "done": sum(group_done(g, results) for g in groups),
        "partial": None if partial is None else {"gid": partial["gid"], "step": done[partial["gid"]]},
        "seconds": seconds, "device": str(device),
        "estimated_chunks_left": len(remaining),
        "estimated_seconds_left": sum(s.seconds for c in remaining for s in c),
    }
    write_atomic(state_dir / PROGRESS, json.dumps(record, indent=1) + "\n")
    write_atomic(state_dir / TABLE_CSV, table_csv(results))
    return record


def table_csv(results: dict[str, dict[str, Any]]) -> str:
    """Per cell: the paper's error, mean and sample std over the finished seeds, steps, time, images/s."""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in results.values():
        cells.setdefault((record["row"], record["column"]), []).append(record)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["row", "column", "paper", "mean", "std", "seeds", "errors", "steps", "train_seconds",
                     "images_per_s_group", "group", "k"])
    for (row, column), records in cells.items():
        records.sort(key=lambda r: r["seed"])
        errors = [r["test_error"] for r in records]
        finite = [e for e in errors if not math.isnan(e)]
        mean = statistics.fmean(finite) if finite else math.nan
        std = statistics.stdev(finite) if len(finite) > 1 else math.nan
        first = records[0]
        writer.writerow([row, column, first["paper"], f"{mean:.3f}", f"{std:.3f}",
                         ";".join(str(r["seed"]) for r in records), ";".join(f"{e:.2f}" for e in errors),
                         first["steps"], f"{first['train_seconds']:.1f}", f"{first['images_per_s_group']:.0f}",
                         first["group"], first["k"]])
    return out.getvalue()
