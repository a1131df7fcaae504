"""Running a table with the batched engine until a deadline, resuming from the saved progress.

`run_table` trains groups in run order (partly trained groups first), up to `in_flight` of them at once
(`stn.engine.group_run.InFlight`: round-robin, one CUDA stream each), each until it finishes (then evaluated,
its members' results written, the next group started) or the deadline would pass (then checkpointed into the
partial files of stn.engine.states). After every group, progress.json and results.csv are written, so a
killed chunk still leaves its finished cells readable.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stn.config import Config
from stn.engine.batched import BatchedModels
from stn.engine.conv_paths import options_for_mode
from stn.engine.group_run import GroupRun, InFlight
from stn.engine.options import EngineError, EngineOptions
from stn.engine.plan import CostModel, Group, Member, PlanError, pack_chunks, run_order
from stn.engine.record import TABLE_CSV, load_results, save_results, table_csv
from stn.engine.states import (
    StateLimits,
    check_partials,
    data_of,
    load_partials,
    next_to_start,
    pack_states,
    save_partials,
    state_bytes,
)
from stn.engine.streams import make_stream
from stn.runs import write_atomic

PROGRESS = "progress.json"


def group_done(group: Group, results: dict[str, dict[str, Any]]) -> bool:
    return all(m.key in results for m in group.members)


def progress_of(groups: Sequence[Group], results: dict[str, dict[str, Any]], partials: dict[str, dict[str, Any]]
                ) -> dict[str, int]:
    done = {g.gid: g.iterations for g in groups if group_done(g, results)}
    for gid, entry in partials.items():
        done.setdefault(gid, int(entry["state"]["engine"]["step"]))
    return done


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
    started = clock()
    device = torch.device(device)
    costs = costs or CostModel()
    if in_flight < 1:
        raise PlanError(f"in_flight={in_flight}: at least one group must be in flight")
    table = _TableRun(groups, Path(state_dir), options or EngineOptions(), costs, device, log, clock,
                      deadline=started + budget_s, limits=limits, in_flight=in_flight, max_groups=max_groups,
                      stop=stop, mode_for=mode_for, streams=group_streams and in_flight > 1, unit_s=unit_s)
    while True:
        table.admit()
        if not table.flying:
            break
        done_runs = table.flight.train(table.deadline - table.held())
        if not done_runs:
            break
        for run in done_runs:
            table.finish(run)
            write_progress(groups, table.state_dir, table.results, costs, budget_s, clock() - started, device)
    if table.flying:  # the deadline: every group in flight is checkpointed (with those saved before and not started)
        table.checkpoint_flying()
    return write_progress(groups, table.state_dir, table.results, costs, budget_s, clock() - started, device)


class _TableRun:
    """One call of `run_table`: the results and partial states read from `state_dir`, the groups left in run
    order, the groups in flight, and what starts, reports, finishes and checkpoints them."""

    def __init__(self, groups: Sequence[Group], state_dir: Path, options: EngineOptions, costs: CostModel,
                 device: torch.device, log: Callable[[str], None], clock: Callable[[], float], *, deadline: float,
                 limits: StateLimits, in_flight: int, max_groups: int | None, stop: Callable[[], bool],
                 mode_for: Callable[[Group], str] | None, streams: bool, unit_s: float | None) -> None:
        self.state_dir, self.options, self.costs, self.device, self.log, self.clock = (
            state_dir, options, costs, device, log, clock)
        self.deadline, self.limits, self.in_flight, self.max_groups, self.stop, self.mode_for = (
            deadline, limits, in_flight, max_groups, stop, mode_for)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.results = load_results(state_dir)
        self.partials = load_partials(state_dir)
        check_partials(self.partials, groups, state_dir)
        self.sizes = {g.gid: state_bytes(g, options.dtype) for g in groups}
        for gid, entry in self.partials.items():
            entry.setdefault("bytes", self.sizes[gid])  # files of 2026-11-30 did not record it
        finished_before = [gid for gid in self.partials
                           if group_done(next(g for g in groups if g.gid == gid), self.results)]
        for gid in finished_before:  # saved as finished after its last checkpoint (a chunk killed in between)
            del self.partials[gid]
        if finished_before:
            save_partials(state_dir, self.partials, limits, log)
        self.pending = [g for g in run_order(groups, costs, first=list(self.partials))
                        if not group_done(g, self.results)]
        self.flying: dict[str, _Flying] = {}
        self.flight = InFlight(device, streams=streams, clock=clock,
                               unit_s=unit_s if unit_s is not None else (0.05 if device.type == "cuda" else None))
        self.flight.stopping = stop
        self.cache: dict = {}  # test sets, one per dataset config
        self.admitted = 0

    def reserve(self, group: Group) -> float:
        """Seconds kept back for evaluating `group`: ~10k test images, forward only, + slack."""
        return self.costs.seconds_per_step(group) * 10 + 2.0

    def held(self) -> float:
        return sum(self.reserve(f.group) for f in self.flying.values())

    def admit(self) -> None:
        """Start groups in run order while the in-flight count, the state limits and the deadline allow."""
        while (self.max_groups is None or self.admitted < self.max_groups) and not self.stop():
            group = next_to_start(self.pending, list(self.flying), self.sizes, self.limits, self.in_flight)
            if group is None:
                return
            if pack_states({group.gid: self.sizes[group.gid]}, self.limits) is None:
                self.log(f"warning: {group.gid}'s state ({self.sizes[group.gid] / 2**20:.1f} MiB) exceeds "
                         f"{self.limits}: alone")
            if self.clock() + self.held() + self.reserve(group) + self.costs.seconds_per_step(group) * 2 > \
                    self.deadline:
                self.log(f"{group.gid}: no time left in this chunk")
                return
            self.flying[group.gid] = self.start(group)
            self.pending.remove(group)
            self.admitted += 1

    def start(self, group: Group) -> _Flying:
        """Build `group`'s engine and data stream (resumed from its partial state when it has one) and put it in
        flight."""
        from stn.mnist import load_mnist

        cfgs = [m.config for m in group.members]
        digits, labels = load_mnist(cfgs[0].data_dir, train=True)
        # mode "auto": each group in the mode the cost table measured faster for its kind, else the rule's
        # (every mode trains the same models, tests/test_engine_paths.py; a group may change mode between chunks)
        mode = self.mode_for(group) if self.mode_for is not None else \
            (self.costs.auto_mode(group, self.device.type) if self.options.mode == "auto" else self.options.mode)
        group_options = options_for_mode(self.options, mode, self.device.type)
        entry = self.partials.get(group.gid)
        if entry is not None:
            # a resumed group keeps the data streams its blocks were drawn with (block draws depend on
            # block_steps and on the group's members, checked above)
            data = data_of(entry)
            drawn = dataclasses.replace(group_options, data=data["mode"],
                                        block_steps=data["block_steps"] or group_options.block_steps)
            if (drawn.data, drawn.block_steps) != (group_options.data, group_options.block_steps):
                self.log(f"{group.gid}: resumes with the data it was drawn with ({drawn.data}"
                         f"{f', blocks of {drawn.block_steps}' if drawn.data == 'block' else ''})")
            group_options = drawn
        engine = BatchedModels(cfgs, self.device, group_options)
        stream = make_stream(cfgs, digits, labels, self.device, group_options)
        run = GroupRun(engine, stream, iterations=group.iterations, log_every=group.trainer.log_every)
        if entry is not None:
            try:
                run.load_state_dict(entry["state"])
            except (EngineError, ValueError) as err:
                raise PlanError(f"{self.state_dir / entry['file']}: group {group.gid!r} cannot resume ({err}); "
                                f"delete the file to retrain it") from None
            self.log(f"{group.gid}: resuming at step {run.step}/{group.iterations}")
        self.flight.add(run)
        return _Flying(group, run, group_options, self.clock(), run.step)

    def report(self, f: _Flying) -> float:
        """Log a group's steps, speed and losses so far; returns its images/s (all models)."""
        run = f.run
        rate = run.images / run.train_seconds if run.train_seconds else float("nan")
        self.log(f"{f.group.gid}: K={f.group.k} {f.options.mode} steps {f.first_step}->{run.step}/"
                 f"{f.group.iterations} in {self.clock() - f.began:.1f} s ({rate:,.0f} images/s all models, "
                 f"{len(self.flying)} in flight), losses {[round(x, 4) for x in run.read_losses()]}")
        return rate

    def finish(self, run: GroupRun) -> None:
        """A group trained to the end: evaluate it, record its members' results, drop its partial state."""
        f = next(f for f in self.flying.values() if f.run is run)
        group = f.group
        rate = self.report(f)
        self.flight.remove(run)
        cfgs = [m.config for m in group.members]
        with run.lane():
            test_sets = _test_sets(group.members, cfgs[0].data_dir, self.device, self.cache)
            errors = run.engine.evaluate(test_sets, cfgs[0].trainer.eval_batch_size)
            records = member_records(group, run.engine, run, errors, test_sets, f.options, rate, self.device)
        for record in records.values():
            # the groups trained beside this one, and the models drawn together (block draws depend on them)
            record.update({"in_flight": self.in_flight, "grouping": [m.key for m in group.members]})
        self.results.update(records)
        save_results(self.state_dir, self.results)
        del self.flying[group.gid]
        if group.gid in self.partials:
            del self.partials[group.gid]
            save_partials(self.state_dir, self.partials, self.limits, self.log)
        self.log(f"{group.gid}: test error {[round(e, 2) for e in errors]}")

    def checkpoint_flying(self) -> None:
        """At the deadline (or a stop): every group in flight saved into the partial files, beside those saved
        before and not started."""
        self.flight.drain()
        for f in self.flying.values():
            self.report(f)
            self.partials[f.group.gid] = {
                "gid": f.group.gid, "members": [m.key for m in f.group.members], "bytes": self.sizes[f.group.gid],
                "data": {"mode": f.options.data,
                         "block_steps": f.options.block_steps if f.options.data == "block" else None},
                "state": f.run.state_dict()}  # fmt: skip
        for path in save_partials(self.state_dir, self.partials, self.limits, self.log):
            self.log(f"{path.name}: {path.stat().st_size / 2**20:.1f} MiB")


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
