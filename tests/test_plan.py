"""stn.plan: grouping the table's cells by shape, packing chunks, and resuming a table across chunks."""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from pathlib import Path

import pytest

from stn.batched import EngineOptions
from stn.compose import compose
from stn.plan import (
    PARTIAL,
    PROGRESS,
    RESULTS,
    TABLE_CSV,
    CostModel,
    Group,
    Member,
    PlanError,
    make_groups,
    pack_chunks,
    run_table,
    table_members,
)
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


def test_run_table_stops_at_the_deadline_and_resumes_to_the_same_results(tmp_path: Path, data_dir: Path) -> None:
    groups = make_groups(tiny_members(data_dir))
    assert [g.k for g in groups] == [2, 1]
    costs = CostModel(table=[{"kind": g.kind, "size": 28, "k": g.k, "images_per_s": 1e9} for g in groups])
    straight = run_table(groups, tmp_path / "straight", budget_s=1e6, device="cpu", costs=costs, log=lambda _: None)
    assert straight["done"] == 2 and straight["partial"] is None and straight["estimated_chunks_left"] == 0

    state = tmp_path / "chunked"
    chunk = 0
    while True:
        chunk += 1
        # 9 clock readings per chunk: two slices of 2 steps at most, then a checkpoint
        record = run_table(groups, state, budget_s=9, device="cpu", costs=costs, log=lambda _: None, clock=Clock())
        assert (state / PROGRESS).is_file() and (state / TABLE_CSV).is_file()
        if record["done"] == 2:
            break
        assert chunk < 10
        assert (state / PARTIAL).is_file() or record["partial"] is None
    assert chunk > 2  # the deadline really cut groups
    assert not (state / PARTIAL).exists()
    a = json.loads((tmp_path / "straight" / RESULTS).read_text())["members"]
    b = json.loads((state / RESULTS).read_text())["members"]
    assert a.keys() == b.keys()
    for key in a:  # bit-exact resume on the CPU: same test errors and losses
        assert a[key]["test_error"] == b[key]["test_error"]
        assert a[key]["final_loss"] == b[key]["final_loss"]
        assert a[key]["steps"] == b[key]["steps"] == 6
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
        assert record["mode"] == "vmap" and record["data"] == "exact" and record["members"]
        assert key in record["members"]
        recovery = [k for k in record if k.startswith("recovery/")]
        assert bool(recovery) == key.startswith("ST-"), (key, recovery)
        assert "recovery/error" not in record


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


def test_a_partial_state_from_another_plan_is_refused(tmp_path: Path, data_dir: Path) -> None:
    groups = make_groups(tiny_members(data_dir))
    costs = CostModel(table=[{"kind": g.kind, "size": 28, "k": g.k, "images_per_s": 1e9} for g in groups])
    run_table(groups, tmp_path, budget_s=9, device="cpu", costs=costs, log=lambda _: None, clock=Clock())
    gid = _partial_gid(tmp_path)
    others = [g for g in groups if g.gid != gid]
    with pytest.raises(PlanError, match="does not have"):
        run_table(others, tmp_path, budget_s=9, device="cpu", costs=costs, log=lambda _: None, clock=Clock(),
                  options=EngineOptions())


def _partial_gid(state: Path) -> str:
    import torch

    return torch.load(state / PARTIAL, weights_only=True)["gid"]


@pytest.mark.slow
def test_engine_run_writes_the_table_record_reproduce_table_writes(tmp_path: Path, data_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`stn engine run`: results.csv in the one schema, table.md in the paper's shape, the chart, one W&B table
    run continued across calls; an --extra grid's cells are queued and get their own table."""
    from typer.testing import CliRunner

    from stn.engine_cli import engine_app
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
    from stn.plan import unique_members

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

    from stn.engine_cli import engine_app

    for seeds, said in (("0,a", "must be comma-separated integers"), ("0,0", "seed 0 is repeated")):
        result = CliRunner().invoke(engine_app, ["plan", "--grid", str(GRID), "--seeds", seeds, "--preset", "smoke"])
        assert result.exit_code == 2 and said in result.output, result.output
    if not torch.cuda.is_available():
        result = CliRunner().invoke(engine_app, ["run", "--grid", str(GRID), "--rows", "FCN", "--columns", "R",
                                                 "--device", "cuda", "--state", str(tmp_path / "s")])
        assert result.exit_code == 2 and "no CUDA device" in result.output and not (tmp_path / "s").exists()
