"""Plan and run a table with the batched engine: groups of same-shape models, chunks that resume.

Members: one per (row, column, seed) of a grid file (experiments/table1/grid.yaml), composed as
`stn reproduce-table` composes its cells (`stn.grid.compose_cells`); further grids' members may be queued
beside them (`unique_members`: a cell two grids share trains once).
Groups: members whose models share every shape (`stn.engine.batched.shape_signature`) and optimiser settings train
together in one `BatchedModels`: a cell's seeds, and one architecture across the 28x28 datasets R, P and E
(Table 1 at 3 seeds: 8 groups of 9 models on 28x28, 8 groups of 3 on RTS, 4 groups of 3 on TC).

Cost: seconds per step of a group measured in a table run (its results.json), else from a cost table
(`images_per_s` measured by `stn engine bench` per model kind, canvas size and K; the nearest K is used), else
from FLOPs per image (torch's FlopCounterMode) at an assumed achieved FLOP/s. `stn engine plan` defaults to the
first H200 loan's bench and table run; its per-conv-path predictions (roofline lower bounds for paths not
measured) are `stn.engine.step_cost`'s. `pack_chunks` cuts the remaining work into chunks of at most `budget_s` seconds in
run order (shortest group first, so cells finish as early as possible), splitting a group at a step boundary
when it does not fit; it is what tells how many loans a table needs.

`run_table` executes from the saved progress until a deadline: groups in run order (partly trained groups
first), up to `in_flight` of them at once (`stn.engine.group_run.InFlight`: round-robin, one CUDA stream each), each
trained until it finishes (then evaluated, its members' results written, the next group started) or the
deadline would pass (then checkpointed). What travels between loans is `results.json` (every finished member:
test error, steps, wall time, images/s, data streams and grouping) plus the partial files (`partial.pt`,
`partial-2.pt`, ...: the in-flight groups' weights, momentum, loss windows and data positions), packed so that
they fit what a GPU run may return (`StateLimits`, `pack_states`): the groups in flight are capped by it.

The record: `cell_results` turns results.json into the per-cell results `stn reproduce-table` aggregates
(stn.report), so results.csv (every cell of the state), and per grid table.md, ours_vs_paper.png and the W&B
table run (`write_tables`, after a chunk) are the CPU table's; an ST member also records its distortion recovery.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stn.config import OPTIMISER_KEYS, Config
from stn.engine.batched import BatchedModels, EngineError, EngineOptions, shape_signature
from stn.engine.group_run import GroupRun, InFlight
from stn.engine.streams import make_stream
from stn.grid import slug
from stn.report import CellResult, render_csv, summarise
from stn.runs import save_checkpoint, write_atomic

RESULTS = "results.json"
PARTIAL = "partial.pt"
TABLE_CSV = "results.csv"
PROGRESS = "progress.json"
PLAN_VERSION = 1
PARTIAL_VERSION = 2  # partial files holding several groups each (1: one group per partial.pt)


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
        `stn.engine.batched.conv_path_for`. The rule's "loop" is kept over a measured "im2col": it means this canvas's
        patch matrix exceeds the memory the rule allows (the TC CNN's is ~1.8 GB a step at K=3)."""
        from stn.engine.batched import conv_path_for

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


def progress_of(groups: Sequence[Group], results: dict[str, dict[str, Any]], partials: dict[str, dict[str, Any]]
                ) -> dict[str, int]:
    done = {g.gid: g.iterations for g in groups if group_done(g, results)}
    for gid, entry in partials.items():
        done.setdefault(gid, int(entry["state"]["engine"]["step"]))
    return done


# ------------------------------------------------------------------------------------ partial states


@dataclass(frozen=True)
class StateLimits:
    """What the partly trained groups' states may take when a run's files come back from the GPU machine.

    The device tool returns at most 8 files of at most 16 MiB each, 64 MiB in all. A loan's other files (log,
    tests, bench, results.json/.csv, progress.json: 6 in run_gpu.sh's `loan`) leave `files` = 2 for the
    states and a few MiB of the total; the groups in flight are capped so that their states pack into these
    files (`pack_states`). One 28x28 group of 9 models is ~14.3 MiB (parameters and momentum, float32): a
    file holds one of those, or three of the 42 px CNN groups of 3 (~5.3 MiB each), or two of the 42 px
    FCN groups (~5.6 MiB) or 60 px groups (6.1-11 MiB)."""

    files: int = 2
    file_bytes: int = 16 * 2**20
    total_bytes: int = 60 * 2**20


# the pickled structure, parameter names, stream states and bad-step/loss vectors of one group, and the zip
# container's per-record headers: measured 5.7 KB (CNN RTS, K = 3), 6.2 KB (CNN R-P-E, K = 9), 10.6 KB (ST-CNN
# TPS R-P-E, K = 9), either data stream; tests/test_plan.py checks the bound against real files
STATE_OVERHEAD_BYTES = 32 * 2**10
_COUNTS: dict[str, tuple[int, int]] = {}


def state_bytes(group: Group, dtype: torch.dtype = torch.float32) -> int:
    """An upper bound on the bytes of `group`'s saved state: K x (parameters + momentum + buffers) at `dtype`,
    plus `STATE_OVERHEAD_BYTES`. Counted on the meta device (no memory, no initialisation)."""
    cfg = group.members[0].config
    key = shape_signature(cfg)
    if key not in _COUNTS:
        from stn.models import build_model

        with torch.device("meta"):
            model = build_model(cfg, fast=False)
        _COUNTS[key] = (sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers()))
    parameters, buffers = _COUNTS[key]
    width = torch.empty((), dtype=dtype).element_size()
    return group.k * (2 * parameters + buffers) * width + STATE_OVERHEAD_BYTES


def pack_states(sizes: dict[str, int], limits: StateLimits) -> list[list[str]] | None:
    """The states (bytes per group id) packed into at most `limits.files` files of at most `limits.file_bytes`
    each, first fit by decreasing size; None if they do not fit (or their total exceeds `limits.total_bytes`)."""
    if sum(sizes.values()) > limits.total_bytes:
        return None
    files: list[list[str]] = []
    room: list[int] = []
    for gid in sorted(sizes, key=lambda g: (-sizes[g], g)):
        where = next((i for i, left in enumerate(room) if sizes[gid] <= left), None)
        if where is None:
            if len(files) == limits.files or sizes[gid] > limits.file_bytes:
                return None
            files.append([])
            room.append(limits.file_bytes)
            where = len(files) - 1
        files[where].append(gid)
        room[where] -= sizes[gid]
    return files


def next_to_start(pending: Sequence[Group], flying: Sequence[str], sizes: dict[str, int], limits: StateLimits,
                  in_flight: int) -> Group | None:
    """The first group of `pending` (in run order) whose state packs beside those of the groups in flight, if
    fewer than `in_flight` fly; None if none can start now. A group whose state alone exceeds the limits starts
    only when nothing else is in flight (its state is then written on its own, with a warning)."""
    if len(flying) >= in_flight:
        return None
    for group in pending:
        if not flying or pack_states({gid: sizes[gid] for gid in flying} | {group.gid: sizes[group.gid]},
                                     limits) is not None:
            return group
    return None


def partial_name(index: int) -> str:
    """partial.pt, partial-2.pt, partial-3.pt, ...: the first keeps the name one-group states always had."""
    return PARTIAL if index == 0 else PARTIAL.replace(".pt", f"-{index + 1}.pt")


def partial_files(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob(PARTIAL.replace(".pt", "*.pt")))


def load_partials(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Every partly trained group's entry, by group id, from the partial files (also the one-group files of
    2026-11-30: {"gid", "state"})."""
    entries: dict[str, dict[str, Any]] = {}
    for path in partial_files(state_dir):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file means the same thing
            raise PlanError(f"{path} is unreadable ({type(err).__name__}); delete it to retrain its groups") from None
        for entry in data["groups"] if "groups" in data else [data]:
            if entry["gid"] in entries:
                raise PlanError(f"group {entry['gid']!r} is in two partial files ({path.name} and another): keep "
                                f"the newer and delete the other")
            entries[entry["gid"]] = {**entry, "file": path.name}
    return entries


def load_partial(state_dir: Path) -> dict[str, Any] | None:
    """The first partly trained group's entry, or None (the one-group view older callers read)."""
    entries = load_partials(state_dir)
    return next(iter(entries.values()), None)


def save_partials(state_dir: Path, entries: dict[str, dict[str, Any]], limits: StateLimits,
                  log: Callable[[str], None] = print) -> list[Path]:
    """Write the entries packed into partial files (`pack_states` on their estimated sizes), then remove any
    older partial file not rewritten; returns the files written. A state too large for the limits is still
    written (one file per group) with a warning: losing it would lose its training."""
    sizes = {gid: int(entry["bytes"]) for gid, entry in entries.items()}
    packing = pack_states(sizes, limits)
    if packing is None:
        log(f"warning: the partial states ({sum(sizes.values()) / 2**20:.1f} MiB) do not fit {limits}: "
            f"one file per group")
        packing = [[gid] for gid in sorted(sizes)]
    written = []
    for index, gids in enumerate(packing):
        path = state_dir / partial_name(index)
        payload = {"version": PARTIAL_VERSION,
                   "groups": [{k: v for k, v in entries[gid].items() if k != "file"} for gid in gids]}
        save_checkpoint(path, payload)
        written.append(path)
    for path in partial_files(state_dir):
        if path not in written:
            path.unlink()
    return written


def _data_of(entry: dict[str, Any]) -> dict[str, Any]:
    """The data streams an entry was trained with (recorded since the concurrent engine; older entries: read
    from their stream state, a list for the exact streams, a dict with block_steps for block streams)."""
    if "data" in entry:
        return dict(entry["data"])
    streams = entry["state"]["streams"]
    if isinstance(streams, dict):
        return {"mode": "block", "block_steps": int(streams["block_steps"])}
    return {"mode": "exact", "block_steps": None}


def _check_partials(partials: dict[str, dict[str, Any]], groups: Sequence[Group], state_dir: Path) -> None:
    by_gid = {g.gid: g for g in groups}
    for gid, entry in partials.items():
        where = state_dir / entry["file"]
        if gid not in by_gid:
            raise PlanError(f"{where} holds group {gid!r}, which this plan does not have; "
                            f"run it with the plan it was made with, or delete it")
        mine = [m.key for m in by_gid[gid].members]
        if "members" in entry and list(entry["members"]) != mine:
            raise PlanError(f"{where}: group {gid!r} was trained (and its data blocks drawn) by {entry['members']}, "
                            f"this plan's group {gid!r} has {mine}: resume with the --seeds/--max-k/--rows/--columns "
                            f"it was started with, or delete {entry['file']} to retrain that group")


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


@dataclass
class _Flying:
    group: Group
    run: GroupRun
    options: EngineOptions
    began: float
    first_step: int


def run_table(groups: Sequence[Group], state_dir: str | Path, *, budget_s: float, device: str | torch.device,
              options: EngineOptions | None = None, costs: CostModel | None = None,
              log: Callable[[str], None] = print, clock: Callable[[], float] = time.perf_counter,
              max_groups: int | None = None, in_flight: int = 1, limits: StateLimits = StateLimits(),
              group_streams: bool = True, stop: Callable[[], bool] = lambda: False, mode_for: Callable[[Group], str] | None = None,
              unit_s: float | None = None) -> dict[str, Any]:
    """Train from the saved progress in `state_dir` until every group is done or `budget_s` is spent.

    in_flight: groups trained at once (`stn.engine.group_run.InFlight`: round-robin, one CUDA stream each with
    group_streams); further capped so that their states fit `limits` (`pack_states`). A finished group is
    evaluated and the next in run order that fits is started; at the deadline every group in flight is
    checkpointed into the partial files. mode_for: the engine mode of each group (default: options.mode, or
    with "auto" the mode its cost-table row measured). unit_s: seconds per unit of steps in a lane (default
    0.05 on CUDA: short queues, few launches per unit; fixed units of log_every on the CPU). stop: asked before
    every unit and every start; once True (a signal), nothing new starts and the groups in flight are checkpointed
    as at the deadline, at a step boundary, so a SIGTERM loses no finished step.

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
    if in_flight < 1:
        raise PlanError(f"in_flight={in_flight}: at least one group must be in flight")
    results = load_results(state_dir)
    partials = load_partials(state_dir)
    _check_partials(partials, groups, state_dir)
    sizes = {g.gid: state_bytes(g, options.dtype) for g in groups}
    for gid, entry in partials.items():
        entry.setdefault("bytes", sizes[gid])  # files of 2026-11-30 did not record it
    finished_before = [gid for gid in partials if group_done(next(g for g in groups if g.gid == gid), results)]
    for gid in finished_before:  # saved as finished after its last checkpoint (a chunk killed in between)
        del partials[gid]
    if finished_before:
        save_partials(state_dir, partials, limits, log)
    pending = [g for g in run_order(groups, costs, first=list(partials)) if not group_done(g, results)]
    flight = InFlight(device, streams=group_streams and in_flight > 1, clock=clock,
                      unit_s=unit_s if unit_s is not None else (0.05 if device.type == "cuda" else None))
    flight.stopping = stop
    flying: dict[str, _Flying] = {}
    cache: dict = {}
    admitted = 0

    def reserve(group: Group) -> float:
        return costs.seconds_per_step(group) * 10 + 2.0  # ~10k test images, forward only, + slack

    def admit() -> None:
        nonlocal admitted
        while (max_groups is None or admitted < max_groups) and not stop():
            group = next_to_start(pending, list(flying), sizes, limits, in_flight)
            if group is None:
                return
            if pack_states({group.gid: sizes[group.gid]}, limits) is None:
                log(f"warning: {group.gid}'s state ({sizes[group.gid] / 2**20:.1f} MiB) exceeds {limits}: alone")
            held = sum(reserve(f.group) for f in flying.values())
            if clock() + held + reserve(group) + costs.seconds_per_step(group) * 2 > deadline:
                log(f"{group.gid}: no time left in this chunk")
                return
            flying[group.gid] = _start(group)
            pending.remove(group)
            admitted += 1

    def _start(group: Group) -> _Flying:
        cfgs = [m.config for m in group.members]
        digits, labels = load_mnist(cfgs[0].data_dir, train=True)
        # mode "auto": each group in the mode the cost table measured faster for its kind, else the rule's
        # (every mode trains the same models, tests/test_engine_paths.py; a group may change mode between chunks)
        mode = mode_for(group) if mode_for is not None else \
            (costs.auto_mode(group, device.type) if options.mode == "auto" else options.mode)
        group_options = dataclasses.replace(options, mode=mode)
        if mode == "loop" and device.type == "cuda":  # cuDNN's fast bf16 convolutions are its NHWC ones
            group_options = dataclasses.replace(group_options, channels_last=True)
        entry = partials.get(group.gid)
        if entry is not None:
            # a resumed group keeps the data streams its blocks were drawn with (block draws depend on
            # block_steps and on the group's members, checked above)
            data = _data_of(entry)
            drawn = dataclasses.replace(group_options, data=data["mode"],
                                        block_steps=data["block_steps"] or group_options.block_steps)
            if (drawn.data, drawn.block_steps) != (group_options.data, group_options.block_steps):
                log(f"{group.gid}: resumes with the data it was drawn with ({drawn.data}"
                    f"{f', blocks of {drawn.block_steps}' if drawn.data == 'block' else ''})")
            group_options = drawn
        engine = BatchedModels(cfgs, device, group_options)
        stream = make_stream(cfgs, digits, labels, device, group_options)
        run = GroupRun(engine, stream, iterations=group.iterations, log_every=group.trainer.log_every)
        if entry is not None:
            try:
                run.load_state_dict(entry["state"])
            except (EngineError, ValueError) as err:
                raise PlanError(f"{state_dir / entry['file']}: group {group.gid!r} cannot resume ({err}); delete "
                                f"the file to retrain it") from None
            log(f"{group.gid}: resuming at step {run.step}/{group.iterations}")
        flight.add(run)
        return _Flying(group, run, group_options, clock(), run.step)

    def report(f: _Flying) -> float:
        run = f.run
        rate = run.images / run.train_seconds if run.train_seconds else float("nan")
        log(f"{f.group.gid}: K={f.group.k} {f.options.mode} steps {f.first_step}->{run.step}/{f.group.iterations} "
            f"in {clock() - f.began:.1f} s ({rate:,.0f} images/s all models, {len(flying)} in flight), "
            f"losses {[round(x, 4) for x in run.read_losses()]}")
        return rate

    while True:
        admit()
        if not flying:
            break
        held = sum(reserve(f.group) for f in flying.values())
        done_runs = flight.train(deadline - held)
        if not done_runs:
            break
        for run in done_runs:
            f = next(f for f in flying.values() if f.run is run)
            group = f.group
            rate = report(f)
            flight.remove(run)
            cfgs = [m.config for m in group.members]
            with run.lane():
                test_sets = _test_sets(group.members, cfgs[0].data_dir, device, cache)
                errors = run.engine.evaluate(test_sets, cfgs[0].trainer.eval_batch_size)
                records = member_records(group, run.engine, run, errors, test_sets, f.options, rate, device)
            for record in records.values():
                # the groups trained beside this one, and the models drawn together (block draws depend on them)
                record.update({"in_flight": in_flight, "grouping": [m.key for m in group.members]})
            results.update(records)
            save_results(state_dir, results)
            del flying[group.gid]
            if group.gid in partials:
                del partials[group.gid]
                save_partials(state_dir, partials, limits, log)
            log(f"{group.gid}: test error {[round(e, 2) for e in errors]}")
            write_progress(groups, state_dir, results, costs, budget_s, clock() - started, device)
    if flying:  # the deadline: every group in flight is checkpointed (with those saved before and not started)
        flight.drain()
        for f in flying.values():
            report(f)
            partials[f.group.gid] = {
                "gid": f.group.gid, "members": [m.key for m in f.group.members], "bytes": sizes[f.group.gid],
                "data": {"mode": f.options.data,
                         "block_steps": f.options.block_steps if f.options.data == "block" else None},
                "state": f.run.state_dict()}  # fmt: skip
        for path in save_partials(state_dir, partials, limits, log):
            log(f"{path.name}: {path.stat().st_size / 2**20:.1f} MiB")
    return write_progress(groups, state_dir, results, costs, budget_s, clock() - started, device)


def write_progress(groups: Sequence[Group], state_dir: Path, results: dict[str, dict[str, Any]], costs: CostModel,
                   budget_s: float, seconds: float, device: torch.device) -> dict[str, Any]:
    """progress.json and results.csv from what is saved now (written after every group, so a killed chunk
    still leaves its finished cells readable)."""
    partials = load_partials(state_dir)
    done = progress_of(groups, results, partials)
    remaining = pack_chunks(groups, costs, max(budget_s, 60.0), done=done)
    record = {
        "groups": len(groups), "done": sum(group_done(g, results) for g in groups),
        "partial": [{"gid": gid, "step": done[gid], "file": entry["file"]} for gid, entry in partials.items()],
        "seconds": seconds, "device": str(device),
        "estimated_chunks_left": len(remaining),
        "estimated_seconds_left": sum(s.seconds for c in remaining for s in c),
    }
    write_atomic(state_dir / PROGRESS, json.dumps(record, indent=1) + "\n")
    write_atomic(state_dir / TABLE_CSV, table_csv(groups, results))
    return record


def member_records(group: Group, engine: BatchedModels, run: GroupRun, errors: Sequence[float],
                   test_sets: Sequence[Any], options: EngineOptions, rate: float, device: torch.device
                   ) -> dict[str, dict[str, Any]]:
    """What results.json keeps of each member of a finished group: its test error (None after a non-finite
    loss), how it trained (steps, group, K, the conv path `mode`, the `data` streams and, for block data, the
    grouping that drew them) and, for ST models, the distortion recovery `stn train` records (stn.recovery)."""
    bad = run.bad_steps()
    records = {}
    for k, member in enumerate(group.members):
        record = {
            "row": member.row, "column": member.column, "seed": member.seed, "paper": member.paper,
            "table": member.table, "test_error": errors[k] if bad[k] < 0 else None, "first_nonfinite_step": bad[k],
            "final_loss": run.last_losses[k] if run.last_losses else None, "steps": run.step,
            "group": group.gid, "k": group.k, "members": [m.key for m in group.members],
            "train_seconds": run.train_seconds, "images_per_s_group": rate, "mode": options.mode,
            "data": options.data, "block_steps": options.block_steps if options.data == "block" else None,
            "amp": options.amp, "device": str(device), "torch": torch.__version__,
        }  # fmt: skip
        if member.config.model.name.startswith("st_") and bad[k] < 0:
            record.update(member_recovery(engine, k, member.config, test_sets[k], device))
        records[member.key] = record
    return records


def member_recovery(engine: BatchedModels, k: int, cfg: Config, test_set: Any, device: torch.device
                    ) -> dict[str, Any]:
    """Model k of the group as the single model `stn train` builds, and its recovery metrics (flat
    recovery/* keys, as in a run's summary.json; recovery/error when it could not be measured)."""
    from stn.models import build_model
    from stn.recovery import recovery_metrics

    model = build_model(cfg).to(device)
    model.load_state_dict(engine.member_state_dict(k))
    return recovery_metrics(model.eval(), test_set, cfg)


def member_run(record: dict[str, Any]) -> dict[str, Any]:
    """A results.json member record as the table record's per-run record (`stn.report.summarise`): done with
    its test error, or failed after a non-finite loss (None; NaN in state written before None was used)."""
    error = record.get("test_error")
    done = error is not None and math.isfinite(float(error))
    run = {"row": record["row"], "column": record["column"], "seed": record["seed"], "steps": record.get("steps"),
           "status": "done" if done else "failed"}
    if done:
        run["test_error"] = float(error)
    else:
        run["error"] = f"non-finite loss from step {record.get('first_nonfinite_step')}"
    return run


def cell_results(members: Sequence[Member], results: dict[str, dict[str, Any]]) -> list[CellResult]:
    """The table record of `members` (one grid's, in plan order) from results.json: the same per-cell results
    `stn reproduce-table` aggregates (mean, sample std, seeds done), for results.csv, table.md and W&B."""
    papers = {(m.row, m.column): m.paper for m in members}
    seeds: dict[tuple[str, str], list[int]] = {}
    for m in members:
        seeds.setdefault((m.row, m.column), []).append(m.seed)
    return summarise(papers, seeds, [member_run(results[m.key]) for m in members if m.key in results])


def table_csv(groups: Sequence[Group], results: dict[str, dict[str, Any]]) -> str:
    """results.csv of the state: every member's cell in the table record's one schema (stn.report)."""
    return render_csv(cell_results([m for g in groups for m in g.members], results))


# ---------------------------------------------------------------------------------------------- record

TABLE_META = "table.json"  # per grid: its W&B table run's id and last step, and how many seeds it had logged


def write_tables(state_dir: str | Path, tables: Sequence[tuple[Any, Sequence[Member]]], *, preset: str,
                 overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> dict[str, list[CellResult]]:
    """What `stn reproduce-table` writes for a table, from the state's results.json, per grid (the first in
    `state_dir`, each extra one in `state_dir/<grid name>/`): table.md, ours_vs_paper.png and the W&B table run
    (stn.report; job_type table, continued across chunks, logged again only when more seeds finished).
    results.csv of every cell is write_progress's. Returns each grid's per-cell results."""
    from stn.cache import cached_compose
    from stn.report import log_table_to_wandb, new_run_id, plot_bars, write_table

    state_dir = Path(state_dir)
    results = load_results(state_dir)
    saved = json.loads((state_dir / TABLE_META).read_text()) if (state_dir / TABLE_META).is_file() else {}
    template = cached_compose([f"trainer={preset}", *overrides])  # W&B project, entity, mode, group
    group = template.logger.group or state_dir.resolve().name
    out: dict[str, list[CellResult]] = {}
    for index, (grid, members) in enumerate(tables):
        folder = state_dir if index == 0 else state_dir / grid.name
        folder.mkdir(parents=True, exist_ok=True)
        cells = out[grid.name] = cell_results(members, results)
        previous = saved.get(grid.name, {})
        meta: dict[str, Any] = {
            "grid": str(grid.path), "name": grid.name, "preset": preset,
            "seeds": sorted({m.seed for m in members}), "overrides": list(overrides), "executor": "engine",
            "group": group if index == 0 else f"{group}-{grid.name}", "table_dir": str(folder.resolve()),
            "wandb_id": previous.get("wandb_id") or new_run_id(), "wandb_step": int(previous.get("wandb_step", 0)),
        }  # fmt: skip
        # the state's own results.csv (write_progress) holds every cell of every grid
        write_table(folder, grid, cells, meta, with_csv=index > 0)
        chart = plot_bars(cells, folder / "ours_vs_paper.png", f"{grid.title} [{preset}]")
        done = sum(len(c.errors) for c in cells)
        if done and done != previous.get("runs_done"):
            meta["wandb_step"] += 1
            wandb_dir = log_table_to_wandb(grid, cells, chart, meta, template)
            if wandb_dir is not None:
                log(f"{grid.name}: W&B table run {wandb_dir}")
        saved[grid.name] = {"wandb_id": meta["wandb_id"], "wandb_step": meta["wandb_step"], "runs_done": done}
        log(f"{grid.name}: {sum(c.status == 'done' for c in cells)}/{len(cells)} cells done -> {folder / 'table.md'}")
    if template.logger.mode != "disabled":  # no W&B run to continue: no file (a GPU loan counts its files)
        write_atomic(state_dir / TABLE_META, json.dumps(saved, indent=1) + "\n")
    return out
