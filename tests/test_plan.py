"""stn.engine.plan: grouping the table's cells by shape, packing chunks, and resuming a table across chunks."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import statistics
from pathlib import Path

import pytest
import torch

from stn.compose import compose
from stn.engine.options import EngineOptions
from stn.engine.plan import CostModel, Group, Member, PlanError, make_groups, pack_chunks, table_members
from stn.engine.record import RESULTS, TABLE_CSV
from stn.engine.states import (
    PARTIAL,
    STATE_OVERHEAD_BYTES,
    StateLimits,
    load_partials,
    next_to_start,
    pack_states,
    save_partials,
    state_bytes,
)
from stn.engine.table_run import PROGRESS, run_table
from stn.report import parse_errors

GRID = Path(__file__).resolve().parents[1] / "experiments" / "table1" / "grid.yaml"


def test_table1_groups_by_shape() -> None:
    """36 cells x 3 seeds: 8 architectures x {R, P, E} (9 models each), 8 on RTS and 4 on TC (3 each)."""
    members = table_members(GRID, seeds=(0, 1, 2), preset="paper")
    assert len(members) == 108
    groups = make_groups(members)
    sizes = sorted((g.size, g.k) for g in groups)
    assert sizes == [(28, 9)] * 8 + [(42, 3)] * 8 + [(60, 3)] * 4
    for group in groups:
        assert len({m.row for m in group.members}) == 1  # one architecture per group
        if group.size == 28:
            assert {m.column for m in group.members} == {"R", "P", "E"}
    assert sorted(m.key for g in groups for m in g.members) == sorted(m.key for m in members)
    assert len(make_groups(members, max_k=3)) == 36  # capped: one group per cell


def test_paper_table_groups_in_flight_fit_what_a_gpu_run_returns() -> None:
    """However the paper table's groups finish, the groups in flight (at most 8 asked for) are those whose
    states pack into 2 partial files of at most 16 MiB (the device tool returns at most 8 files of 16 MiB, 64 MiB
    in all; a loan's other 6 files are small), checked file by file here; and the cap still lets several fly."""
    groups = make_groups(table_members(GRID, seeds=(0, 1, 2), preset="paper"))
    limits = StateLimits()
    sizes = {g.gid: state_bytes(g) for g in groups}
    mib = {g.gid: sizes[g.gid] / 2**20 for g in groups}
    assert 14.0 < mib["cnn_R-P-E"] < 14.6 and 5.0 < mib["cnn_RTS"] < 5.6 and 10.8 < mib["fcn_TC"] < 11.3
    rng = random.Random(0)
    most = []
    for _ in range(30):
        pending, flying, peak = list(groups), [], 0
        rng.shuffle(pending)
        while pending or flying:
            while (group := next_to_start(pending, flying, sizes, limits, in_flight=8)) is not None:
                flying.append(group.gid)
                pending.remove(group)
            packing = pack_states({gid: sizes[gid] for gid in flying}, limits)
            assert packing is not None and sorted(g for f in packing for g in f) == sorted(flying)
            assert len(packing) <= 2 and 6 + len(packing) <= 8
            assert all(sum(sizes[g] for g in file) <= 16 * 2**20 for file in packing)
            assert sum(sizes[g] for g in flying) <= 64 * 2**20 - 4 * 2**20
            peak = max(peak, len(flying))
            flying.remove(rng.choice(flying))  # some group finishes
        most.append(peak)
    assert min(most) >= 3 and max(most) >= 5  # e.g. a 28x28 group beside two 42 px ones; five 42 px groups


def test_state_bytes_bounds_the_partial_files_of_real_paper_groups(tmp_path: Path, mnist) -> None:
    """The estimate packing relies on is an upper bound of the files written (and close to them): the 28x28
    CNN group (9 models, ~14.3 MiB) alone in one file, and the two largest 60 px groups (FCN TC, ST-FCN Aff TC,
    3 models, ~11 MiB each) that cannot share one."""
    from stn.engine.batched import BatchedModels
    from stn.engine.group_run import GroupRun
    from stn.engine.streams import make_stream

    groups = {g.gid: g for g in make_groups(table_members(GRID, seeds=(0, 1, 2), preset="paper"))}
    options = EngineOptions(data="block")
    entries = {}
    for gid in ("cnn_R-P-E", "fcn_TC", "st-fcn-aff_TC"):
        cfgs = [m.config for m in groups[gid].members]
        run = GroupRun(BatchedModels(cfgs, "cpu", options), make_stream(cfgs, *mnist, "cpu", options), 150_000)
        entries[gid] = {"gid": gid, "members": [m.key for m in groups[gid].members], "bytes": state_bytes(groups[gid]),
                        "data": {"mode": "block", "block_steps": 128}, "state": run.state_dict()}
    written = save_partials(tmp_path, entries, StateLimits(files=3), log=lambda _: None)
    assert [p.name for p in written] == [PARTIAL, "partial-2.pt", "partial-3.pt"]
    for path in written:
        held = torch.load(path, weights_only=True)["groups"]
        estimate = sum(entries[e["gid"]]["bytes"] for e in held)
        size = path.stat().st_size
        assert size <= estimate <= size + len(held) * STATE_OVERHEAD_BYTES and size <= 16 * 2**20, (path, size)
    assert load_partials(tmp_path).keys() == entries.keys()
    assert save_partials(tmp_path, {}, StateLimits(), log=lambda _: None) == [] and not list(tmp_path.iterdir())


def test_pack_states_first_fit_decreasing() -> None:
    limits = StateLimits(files=2, file_bytes=10, total_bytes=18)
    assert pack_states({"a": 6, "b": 4, "c": 5, "d": 3}, limits) == [["a", "b"], ["c", "d"]]
    assert pack_states({"a": 6, "b": 6, "c": 6}, limits) is None  # three files needed
    assert pack_states({"a": 9, "b": 9, "c": 1}, limits) is None  # total 19 > 18
    assert pack_states({"a": 11}, limits) is None  # larger than a file
    assert pack_states({}, limits) == []


def fake_groups(steps: dict[str, int], k: int = 3) -> list[Group]:
    cfg = compose(["trainer=smoke"])
    out = []
    for gid, iterations in steps.items():
        member_cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, iterations=iterations,
                                                                          batch_size=1))
        out.append(Group(gid, [Member(gid, "R", s, member_cfg) for s in range(k)]))
    return out


def unit_costs(groups, seconds_per_step: dict[str, float]) -> CostModel:
    # images/s such that a step of K models at batch 1 takes the given seconds
    return CostModel(table=[{"kind": g.kind, "size": g.size, "k": g.k, "images_per_s": g.k / seconds_per_step[g.gid]}
                            for g in groups])


def test_pack_chunks_covers_every_step_once_within_the_budget() -> None:
    groups = fake_groups({"small": 300, "big": 5000, "mid": 1200})
    costs = unit_costs(groups, {"small": 0.01, "big": 0.1, "mid": 0.05})
    assert costs.seconds_per_step(groups[1]) == pytest.approx(0.1)
    chunks = pack_chunks(groups, costs, budget_s=100, granularity=100, overhead_s=5)
    for chunk in chunks:
        assert sum(s.seconds for s in chunk) <= 100 + 1e-9
    for group in groups:  # contiguous, in order, from 0 to the end, multiples of the granularity inside
        segments = [s for c in chunks for s in c if s.gid == group.gid]
        assert segments[0].start == 0 and segments[-1].end == group.iterations
        for a, b in zip(segments, segments[1:], strict=False):
            assert a.end == b.start and a.end % 100 == 0
    order = [s.gid for c in chunks for s in c]
    assert order.index("small") < order.index("mid") < order.index("big")  # shortest first
    total = sum(s.seconds for c in chunks for s in c)
    assert len(chunks) == pytest.approx(total / 100, abs=1.5)
    # progress: the finished group disappears, the partial one resumes first, from its step
    rest = pack_chunks(groups, costs, budget_s=100, done={"small": 300, "big": 700}, granularity=100, overhead_s=5)
    assert rest[0][0].gid == "big" and rest[0][0].start == 700
    assert "small" not in {s.gid for c in rest for s in c}
    assert pack_chunks(groups, costs, budget_s=100, done={"small": 300, "big": 5000, "mid": 1200}) == []
    with pytest.raises(PlanError):
        pack_chunks(groups, costs, budget_s=3, overhead_s=5)
    # a slow device: less than one granule fits a chunk, so a chunk takes the steps that fit
    slow = pack_chunks(groups[:1], unit_costs(groups[:1], {"small": 2.0}), budget_s=50, granularity=100,
                       overhead_s=10)
    assert [(s.start, s.end) for c in slow for s in c][:2] == [(0, 20), (20, 40)] and len(slow) == 15


def test_cost_model_uses_the_nearest_measured_k_and_falls_back_to_flops() -> None:
    groups = fake_groups({"a": 10}, k=9)
    table = CostModel(table=[{"kind": "a", "size": 28, "k": 1, "images_per_s": 100.0},
                             {"kind": "a", "size": 28, "k": 8, "images_per_s": 600.0}])
    assert table.images_per_s(groups[0]) == (600.0, "measured (K=8)")
    scaled = CostModel(table=[{"kind": "a", "size": 42, "k": 9, "images_per_s": 100.0, "flops_per_image": 2e6}])
    rate, how = scaled.images_per_s(groups[0])  # 28px: fewer FLOPs per image than the measured 42px row
    assert how == "measured at 42px, scaled by FLOPs (K=9)"
    assert rate == pytest.approx(100.0 * 2e6 / scaled.flops_per_image(groups[0]))
    flops = CostModel(flops_per_s=1e9)
    rate, how = flops.images_per_s(groups[0])
    assert how == "FLOP estimate" and rate == pytest.approx(1e9 / flops.flops_per_image(groups[0]))


def test_cost_model_names_the_measured_mode_of_the_row_it_uses() -> None:
    groups = fake_groups({"a": 10}, k=9)
    table = CostModel(table=[{"kind": "a", "size": 28, "k": 1, "images_per_s": 100.0, "mode": "vmap"},
                             {"kind": "a", "size": 28, "k": 8, "images_per_s": 600.0, "mode": "loop"}])
    assert table.mode_for(groups[0]) == "loop"  # the K=8 row, nearest to K=9, as images_per_s uses
    assert CostModel().mode_for(groups[0]) == "vmap"  # nothing measured: the default
    assert CostModel(table=[{"kind": "b", "size": 28, "k": 9, "images_per_s": 1.0, "mode": "loop"}]).mode_for(
        groups[0], default="loop") == "loop"


def tiny_members(data_dir: Path) -> list[Member]:
    members = []
    for row, choice, seeds in (("FCN", ["model=fcn"], (0, 1)), ("ST-CNN Aff", ["model=st_cnn", "transformer=affine"],
                                                                (0,))):
        base = compose([*choice, "dataset=R", "trainer=smoke", "trainer.iterations=6", "trainer.batch_size=8",
                        "trainer.log_every=2", "trainer.lr_step=3", "dataset.train_limit=24", "dataset.test_limit=50",
                        f"data_dir={data_dir}", "trainer.device=cpu"])
        members += [Member(row, "R", s, dataclasses.replace(base, seed=s), 1.0) for s in seeds]
    return members


class Clock:
    """A fake clock: each reading is one second after the last."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def tiny_costs(groups) -> CostModel:
    return CostModel(table=[{"kind": g.kind, "size": 28, "k": g.k, "images_per_s": 1e9} for g in groups])


@pytest.mark.parametrize(("in_flight", "data"), [(1, "exact"), (2, "exact"), (2, "block")])
def test_run_table_stops_at_the_deadline_and_resumes_to_the_same_results(tmp_path: Path, data_dir: Path,
                                                                         in_flight: int, data: str) -> None:
    """Chunks cut by a deadline, each resumed from the saved state, give bit-identical results to one
    uninterrupted run of the groups one after another; with two groups in flight both are checkpointed at
    once, and with block data (drawn ahead: prefetch) the cuts fall inside blocks."""
    groups = make_groups(tiny_members(data_dir))
    assert [g.k for g in groups] == [2, 1]
    costs = tiny_costs(groups)
    options = EngineOptions(data=data, block_steps=4, prefetch=True)
    straight = run_table(groups, tmp_path / "straight", budget_s=1e6, device="cpu", costs=costs, log=lambda _: None,
                         options=options)
    assert straight["done"] == 2 and straight["partial"] == [] and straight["estimated_chunks_left"] == 0

    state = tmp_path / "chunked"
    chunk, most_partial = 0, 0
    while True:
        chunk += 1
        # 9 clock readings per chunk (one group) or 16 (two): a unit or two of 2 steps each, then a checkpoint
        record = run_table(groups, state, budget_s=9 if in_flight == 1 else 16, device="cpu", costs=costs,
                           log=lambda _: None, clock=Clock(), options=options, in_flight=in_flight)
        assert (state / PROGRESS).is_file() and (state / TABLE_CSV).is_file()
        if record["done"] == 2:
            break
        assert chunk < 10
        most_partial = max(most_partial, len(record["partial"]))
        assert [p["file"] for p in record["partial"]] == [PARTIAL] * len(record["partial"])
    assert chunk > 2 if in_flight == 1 else chunk > 1  # the deadline really cut groups
    assert most_partial == in_flight  # two groups partly trained at once when two fly
    assert not list(state.glob("partial*.pt"))
    a = json.loads((tmp_path / "straight" / RESULTS).read_text())["members"]
    b = json.loads((state / RESULTS).read_text())["members"]
    assert a.keys() == b.keys()
    grouping = {m.key: [x.key for x in g.members] for g in groups for m in g.members}
    for key in a:  # bit-exact resume on the CPU: same test errors and losses
        assert a[key]["test_error"] == b[key]["test_error"]
        assert a[key]["final_loss"] == b[key]["final_loss"]
        assert a[key]["steps"] == b[key]["steps"] == 6
        # the record names the data streams and the models whose blocks were drawn together
        assert b[key]["data"] == data and b[key]["block_steps"] == (4 if data == "block" else None)
        assert b[key]["grouping"] == grouping[key]
        assert b[key]["in_flight"] == in_flight
    # results.csv in the table record's one schema (stn.report), the same cells as the straight run's
    with (state / TABLE_CSV).open(newline="") as handle:
        rows = {r["row"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"FCN", "ST-CNN Aff"}
    for row in rows.values():
        assert row["status"] == "done" and row["paper"] == "1.0" and row["steps"] == "6"
        seeds = (0, 1) if row["row"] == "FCN" else (0,)
        assert row["seeds_done"] == row["seeds"] == str(len(seeds))
        errors = parse_errors(row["errors"])
        assert errors == {s: round(a[f"{row['row']}|R|{s}"]["test_error"], 4) for s in seeds}
        assert float(row["ours_mean"]) == pytest.approx(statistics.fmean(errors.values()), abs=1e-4)
        if len(seeds) > 1:
            assert float(row["ours_std"]) == pytest.approx(statistics.stdev(errors.values()), abs=1e-4)
        else:
            assert row["ours_std"] == ""  # one seed: no std, and no NaN
    # each member records how it trained, and each ST member its distortion recovery, as `stn train` does
    for key, record in b.items():
        assert record["mode"] == "vmap" and record["data"] == data and record["members"]
        assert key in record["members"]
        recovery = [k for k in record if k.startswith("recovery/")]
        assert bool(recovery) == key.startswith("ST-"), (key, recovery)
        assert "recovery/error" not in record


def test_a_stop_checkpoints_the_groups_in_flight_and_the_table_resumes_exactly(tmp_path: Path,
                                                                              data_dir: Path) -> None:
    """run_table's stop (what `stn engine run` sets on SIGTERM or Ctrl-C): nothing new starts, the groups in
    flight are checkpointed at a step boundary, and the resumed table equals one never stopped."""
    groups = make_groups(tiny_members(data_dir))
    costs = tiny_costs(groups)
    run_table(groups, tmp_path / "straight", budget_s=1e6, device="cpu", costs=costs, log=lambda _: None)
    asked = [0]

    def stop() -> bool:  # a signal arrives after a few units
        asked[0] += 1
        return asked[0] > 6

    state = tmp_path / "stopped"
    record = run_table(groups, state, budget_s=1e6, device="cpu", costs=costs, log=lambda _: None, stop=stop,
                       in_flight=2)
    assert record["done"] < 2 and record["partial"], record  # stopped with groups in flight, checkpointed
    assert 0 < min(p["step"] for p in record["partial"]) and max(p["step"] for p in record["partial"]) < 6
    resumed = run_table(groups, state, budget_s=1e6, device="cpu", costs=costs, log=lambda _: None, in_flight=2)
    assert resumed["done"] == 2 and resumed["partial"] == []
    a = json.loads((tmp_path / "straight" / RESULTS).read_text())["members"]
    b = json.loads((state / RESULTS).read_text())["members"]
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key]["test_error"], a[key]["final_loss"]) == (b[key]["test_error"], b[key]["final_loss"]), key


def test_a_resumed_group_keeps_the_block_length_it_was_drawn_with(tmp_path: Path, data_dir: Path) -> None:
    """Block draws depend on block_steps: a chunk resumed with another --block-steps continues each partly
    trained group with the length its state records (and says so), so the result equals an uninterrupted run."""
    groups = make_groups(tiny_members(data_dir))[:1]
    costs = tiny_costs(groups)
    drawn = EngineOptions(data="block", block_steps=4)
    run_table(groups, tmp_path / "straight", budget_s=1e6, device="cpu", costs=costs, log=lambda _: None,
              options=drawn)
    run_table(groups, tmp_path / "cut", budget_s=9, device="cpu", costs=costs, log=lambda _: None, clock=Clock(),
              options=drawn)
    assert (tmp_path / "cut" / PARTIAL).is_file()
    lines: list[str] = []
    record = run_table(groups, tmp_path / "cut", budget_s=1e6, device="cpu", costs=costs, log=lines.append,
                       options=EngineOptions(data="block", block_steps=3))
    assert record["done"] == 1
    assert any("resumes with the data it was drawn with (block, blocks of 4)" in line for line in lines), lines
    a = json.loads((tmp_path / "straight" / RESULTS).read_text())["members"]
    b = json.loads((tmp_path / "cut" / RESULTS).read_text())["members"]
    assert {k: v["final_loss"] for k, v in a.items()} == {k: v["final_loss"] for k, v in b.items()}
    assert {v["block_steps"] for v in b.values()} == {4}


def test_a_partial_state_of_another_grouping_is_refused(tmp_path: Path, data_dir: Path) -> None:
    """Same group id, other members (e.g. other --seeds): the saved weights and the blocks drawn belong to
    another grouping, so resuming is refused with one line naming both."""
    groups = make_groups(tiny_members(data_dir))[:1]
    assert [m.seed for m in groups[0].members] == [0, 1]
    costs = tiny_costs(groups)
    run_table(groups, tmp_path, budget_s=9, device="cpu", costs=costs, log=lambda _: None, clock=Clock())
    fewer = [Group(groups[0].gid, groups[0].members[:1])]
    with pytest.raises(PlanError, match="was trained \\(and its data blocks drawn\\) by") as caught:
        run_table(fewer, tmp_path, budget_s=9, device="cpu", costs=costs, log=lambda _: None, clock=Clock())
    assert "\n" not in str(caught.value)


def test_auto_mode_trains_each_group_in_its_measured_mode(tmp_path: Path, data_dir: Path) -> None:
    groups = make_groups(tiny_members(data_dir))
    modes = {"FCN": "vmap", "ST-CNN Aff": "loop"}
    costs = CostModel(table=[{"kind": g.kind, "size": 28, "k": g.k, "images_per_s": 1e9, "mode": modes[g.kind]}
                             for g in groups])
    lines: list[str] = []
    record = run_table(groups, tmp_path, budget_s=1e6, device="cpu", costs=costs, log=lines.append,
                       options=EngineOptions(mode="auto"))
    assert record["done"] == 2
    members = json.loads((tmp_path / RESULTS).read_text())["members"]
    assert {m["row"]: m["mode"] for m in members.values()} == modes
    assert any(" loop steps 0->6/6" in line for line in lines), lines


def test_auto_mode_takes_the_measured_path_at_this_size_else_the_rule() -> None:
    """`--mode auto` on the paper table: a kind measured at its own canvas takes the measured mode; one measured
    only at another size (a row that scales a rate) takes stn.engine.conv_paths.conv_path_for's; a measured im2col never
    overrides the rule's loop (the TC CNN's patch matrix, the memory the rule guards)."""
    from stn.engine.conv_paths import conv_path_for

    groups = {(g.kind, g.size): g for g in make_groups(table_members(GRID, seeds=(0, 1, 2), preset="paper"))}
    cnn_r, cnn_rts, cnn_tc = groups[("CNN", 28)], groups[("CNN", 42)], groups[("CNN", 60)]
    costs = CostModel(table=[
        {"kind": "CNN", "size": 28, "k": 9, "images_per_s": 1e6, "mode": "loop", "flops_per_image": 1e6},
        {"kind": "CNN", "size": 60, "k": 3, "images_per_s": 1e6, "mode": "im2col"},
    ])  # fmt: skip
    assert costs.auto_mode(cnn_r, "cuda") == "loop"  # measured at 28 px
    assert conv_path_for(cnn_rts.members[0].config, "cuda") == "im2col"
    assert costs.auto_mode(cnn_rts, "cuda") == "im2col"  # only 28 px measured: the rule
    assert conv_path_for(cnn_tc.members[0].config, "cuda") == "loop"
    assert costs.auto_mode(cnn_tc, "cuda") == "loop"  # measured im2col, but over the rule's memory limit
    assert CostModel().auto_mode(groups[("FCN", 28)], "cuda") == "vmap"  # no convolution: the rule's vmap


def test_a_partial_state_from_another_plan_is_refused(tmp_path: Path, data_dir: Path) -> None:
    groups = make_groups(tiny_members(data_dir))
    costs = tiny_costs(groups)
    run_table(groups, tmp_path, budget_s=9, device="cpu", costs=costs, log=lambda _: None, clock=Clock())
    gid = _partial_gid(tmp_path)
    others = [g for g in groups if g.gid != gid]
    with pytest.raises(PlanError, match="does not have"):
        run_table(others, tmp_path, budget_s=9, device="cpu", costs=costs, log=lambda _: None, clock=Clock(),
                  options=EngineOptions())


def _partial_gid(state: Path) -> str:
    return torch.load(state / PARTIAL, weights_only=True)["groups"][0]["gid"]

def test_a_one_group_partial_file_of_the_first_loan_resumes(tmp_path: Path, data_dir: Path) -> None:
    """The first GPU loan left `partial.pt` as {"gid", "state"} (one group, no loss windows, no record of its
    grouping or data): it is read, its block length taken from its stream state, and rewritten in the new form."""
    groups = make_groups(tiny_members(data_dir))[:1]
    costs = tiny_costs(groups)
    options = EngineOptions(data="block", block_steps=4)
    run_table(groups, tmp_path, budget_s=9, device="cpu", costs=costs, log=lambda _: None, clock=Clock(),
              options=options)
    entry = torch.load(tmp_path / PARTIAL, weights_only=True)["groups"][0]
    old_state = {k: v for k, v in entry["state"].items() if k not in ("loss_sum", "window_start", "window")}
    torch.save({"gid": entry["gid"], "state": old_state}, tmp_path / PARTIAL)
    lines: list[str] = []
    record = run_table(groups, tmp_path, budget_s=9, device="cpu", costs=costs, log=lines.append, clock=Clock(),
                       options=dataclasses.replace(options, block_steps=128))
    assert any("resuming at step 2/6" in line for line in lines) and any("blocks of 4" in line for line in lines)
    assert record["partial"][0]["step"] > 2
    assert "members" in torch.load(tmp_path / PARTIAL, weights_only=True)["groups"][0]


def test_engine_run_needs_a_group_in_flight(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stn.cli.main import app

    result = CliRunner().invoke(app, ["engine", "run", "--in-flight", "0", "--state", str(tmp_path / "state")])
    assert result.exit_code == 2 and "error: --in-flight 0" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "state").exists()


@pytest.mark.slow
def test_engine_run_writes_the_table_record_reproduce_table_writes(tmp_path: Path, data_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`stn engine run`: results.csv in the one schema, table.md in the paper's shape, the chart, one W&B table
    run continued across calls; an --extra grid's cells are queued and get their own table."""
    from typer.testing import CliRunner

    from stn.cli.engine import engine_app
    from stn.report import RESULT_COLUMNS
    from wandb_log import read_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    extra = tmp_path / "readings.yaml"
    extra.write_text("name: readings\nrows: {FCN: [model=fcn]}\ncolumns: {P_axis: [dataset=P_axis]}\n"
                     "cells: {FCN: {P_axis: 3.1}}\n")
    state = tmp_path / "state"
    args = ["run", "--grid", str(GRID), "--rows", "FCN", "--columns", "R", "--seeds", "0,1", "--preset", "smoke",
            "--device", "cpu", "--no-amp", "--state", str(state), "--extra", str(extra),
            *[f"--override={o}" for o in ("trainer.iterations=4", "dataset.train_limit=64", "dataset.test_limit=40",
                                          f"data_dir={data_dir}")]]  # fmt: skip
    result = CliRunner().invoke(engine_app, args)
    assert result.exit_code == 0, result.output
    members = json.loads((state / RESULTS).read_text())["members"]
    assert set(members) == {"FCN|R|0", "FCN|R|1", "FCN|P_axis|0", "FCN|P_axis|1"}
    with (state / TABLE_CSV).open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == RESULT_COLUMNS
        rows = {(r["row"], r["column"]): r for r in reader}
    errors = [members[f"FCN|R|{s}"]["test_error"] for s in (0, 1)]
    assert float(rows[("FCN", "R")]["ours_mean"]) == pytest.approx(statistics.fmean(errors), abs=1e-4)
    table = (state / "table.md").read_text()
    assert table.startswith("# Table 1") and f"| FCN | {statistics.fmean(errors):.2f} ± " in table
    assert "P_axis" not in table and "| FCN | P_axis |" in (state / "readings" / "table.md").read_text()
    assert (state / "ours_vs_paper.png").is_file() and (state / "readings" / "ours_vs_paper.png").is_file()
    ids = {name: entry["wandb_id"] for name, entry in json.loads((state / "table.json").read_text()).items()}
    assert set(ids) == {"table1", "readings"}
    runs = [read_run(folder, lambda run: run["finished"]) for folder in (tmp_path / "wandb").glob("offline-run-*")]
    assert sorted(run["id"] for run in runs) == sorted(ids.values())
    (main,) = [run for run in runs if run["id"] == ids["table1"]]
    assert main["job_type"] == "table" and main["summary"]["test_error/R_fcn"] == pytest.approx(statistics.fmean(errors))
    # --no-record writes no table; --budget 0 trains nothing and writes the record from the state, and with
    # nothing new trained the table's W&B run is not logged again
    (state / "table.md").unlink()
    result = CliRunner().invoke(engine_app, [*args, "--no-record"])
    assert result.exit_code == 0 and not (state / "table.md").exists(), result.output
    result = CliRunner().invoke(engine_app, [*args, "--budget", "0"])
    assert result.exit_code == 0, result.output
    def undated(text: str) -> list[str]:
        return [line for line in text.splitlines() if "(updated " not in line]

    assert undated((state / "table.md").read_text()) == undated(table)
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2


def test_a_queued_table_keeps_the_first_tables_groups() -> None:
    """--extra: the P readings' cells train in groups of their own, so Table 1's group names (and a partial.pt of
    one) are what they are without them; a cell both tables have is trained once."""
    from stn.engine.plan import unique_members

    extra = GRID.parent / "paper-gpu" / "p_readings.yaml"
    table1 = table_members(GRID, seeds=(0, 1, 2), preset="paper")
    readings = table_members(extra, seeds=(0, 1, 2), preset="paper")
    alone = {g.gid: [m.key for m in g.members] for g in make_groups(table1)}
    both = {g.gid: [m.key for m in g.members] for g in make_groups(unique_members([*table1, *readings]))}
    assert {gid: keys for gid, keys in both.items() if gid in alone} == alone
    assert sorted(set(both) - set(alone)) == ["cnn_P_axis-P_image", "fcn_P_axis-P_image"]
    again = unique_members([*table1, *table1[:3]])
    assert len(again) == len(table1)
    changed = dataclasses.replace(table1[0], config=dataclasses.replace(table1[0].config, seed=99), table="other")
    with pytest.raises(PlanError, match="in tables table1 and other with different configs"):
        unique_members([*table1, changed])


def test_engine_commands_read_seeds_and_devices_as_the_other_commands_do(tmp_path: Path) -> None:
    import torch
    from typer.testing import CliRunner

    from stn.cli.engine import engine_app

    for seeds, said in (("0,a", "must be comma-separated integers"), ("0,0", "seed 0 is repeated")):
        result = CliRunner().invoke(engine_app, ["plan", "--grid", str(GRID), "--seeds", seeds, "--preset", "smoke"])
        assert result.exit_code == 2 and said in result.output, result.output
    if not torch.cuda.is_available():
        result = CliRunner().invoke(engine_app, ["run", "--grid", str(GRID), "--rows", "FCN", "--columns", "R",
                                                 "--device", "cuda", "--state", str(tmp_path / "s")])
        assert result.exit_code == 2 and "no CUDA device" in result.output and not (tmp_path / "s").exists()
