"""stn.tables.dashboard: every key the Table 1 report's panels read is logged by an offline table cell and table run.

One smoke cell (ST-CNN Aff on R, real training, W&B offline) runs through `stn.tables.reproduce.reproduce`; its
training run and the table's own run are read back from their transaction logs (tests/wandb_log.py) and
checked against `stn.tables.dashboard.KEYS`, the one list the panels are built from. Building the report objects
(wandb_workspaces) needs no network; saving it does, and is not tested here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stn.cli.main import app
from stn.tables.dashboard import KEYS, PANELS, RUN_COLUMNS, Key, Template, key
from stn.tables.reproduce import reproduce
from wandb_log import read_run

GRID = Path(__file__).resolve().parents[1] / "experiments" / "table1" / "grid.yaml"


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, small_data: list[str]
           ) -> dict[str, dict[str, Any]]:
    """The offline records of one smoke table cell's training run ("cell") and of its table run ("table")."""
    root = tmp_path_factory.mktemp("dashboard")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("WANDB_DIR", str(root))
        patch.setenv("STN_DATA_DIR", str(data_dir))
        for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_NAME", "WANDB_TAGS"):
            patch.delenv(name, raising=False)
        reproduce(GRID, rows=["ST-CNN Aff"], columns=["R"], seeds=[0], preset="smoke", executor="debug",
                  out=root / "table", log=lambda _: None,
                  overrides=["logger.mode=offline", "logger.images=2", "logger.card_draws=50", *small_data])
    runs = [read_run(folder, lambda run: run["finished"]) for folder in root.glob("wandb/offline-run-*")]
    (cell,) = [run for run in runs if run["job_type"] == "train"]
    table = max((run for run in runs if run["job_type"] == "table"), key=lambda run: run["history"][0]["_step"])
    return {"cell": cell, "table": table}


def is_logged(entry: Key, run: dict[str, Any]) -> bool:
    """Whether `run`'s offline record holds the key where `entry` says (media and tables: name/_type rows)."""
    if entry.kind == "config":
        return entry.name in run["config"]
    if entry.kind == "summary":
        return entry.name in run["summary"]
    return any(entry.name in row or f"{entry.name}/_type" in row for row in run["history"])


@pytest.mark.slow
def test_every_key_the_panels_read_is_logged_by_an_offline_cell_and_table_run(logged) -> None:
    missing = [f"{entry.source} {entry.kind} {entry.name}" for entry in KEYS if not is_logged(entry, logged[entry.source])]
    assert missing == []
    # Each panel reads declared keys only, each where it is declared (a summary read as a curve fails here).
    for panel in PANELS:
        for kind, name in panel.keys():
            assert key(name, panel.source).kind == kind, (panel.title, kind, name)
    assert {entry.name for entry in RUN_COLUMNS} == {"row", "column", "seed", "paper_test_error", "test_error_best"}
    # The values a group's dashboard groups by are the cell's: its row, column, seed and the paper's number.
    config = logged["cell"]["config"]
    assert (config["table"], config["row"], config["column"], config["cell"], config["seed"]) == (
        "table1", "ST-CNN Aff", "R", "R_st-cnn-aff", 0)
    assert config["paper_test_error"] == 0.7
    with pytest.raises(KeyError):
        key("no_such_metric", "cell")


@pytest.mark.slow
def test_the_report_objects_use_exactly_those_keys(logged) -> None:
    """wandb_workspaces builds the report offline; each panel's serialised spec names the keys it reads, and
    the runsets' filters select the runs read back above (their job type and group)."""
    pytest.importorskip("wandb_workspaces", reason="the report extra: pip install 'stn[report]'")
    import wandb_workspaces.expr as expr

    from stn.tables.dashboard import build_report

    group = logged["cell"]["group"]
    assert logged["table"]["group"] == group
    report = build_report(Template(project="stn", entity="someone", group=group))
    grids = [block for block in report.blocks if type(block).__name__ == "PanelGrid"]
    assert [len(grid.panels) for grid in grids] == [sum(p.source == "cell" for p in PANELS),
                                                     sum(p.source == "table" for p in PANELS)]
    specs = [p for p in PANELS if p.source == "cell"] + [p for p in PANELS if p.source == "table"]
    built = [panel for grid in grids for panel in grid.panels]
    for spec, panel in zip(specs, built, strict=True):
        text = panel._to_model().model_dump_json(by_alias=True)  # no network for panels
        for _kind, name in spec.keys():
            assert name in text, (spec.title, name)
    for grid, source in zip(grids, ("cell", "table"), strict=True):
        (runset,) = grid.runsets
        leaves = {(leaf.key.name, leaf.value) for leaf in expr.expr_to_filters(runset.filters).filters}
        assert leaves == {("jobType", logged[source]["job_type"]), ("group", group)}
    # Without a group, the table's runs are found by the grid's name (the cells' `table`, the table run's `name`).
    everything = build_report(Template(project="stn", entity="someone"))
    filters = [expr.expr_to_filters(grid.runsets[0].filters).filters
               for grid in everything.blocks if type(grid).__name__ == "PanelGrid"]
    assert {(leaf.key.section, leaf.key.name, leaf.value) for leaf in filters[0]} == {
        ("run", "jobType", "train"), ("config", "table", logged["cell"]["config"]["table"])}
    assert {(leaf.key.section, leaf.key.name, leaf.value) for leaf in filters[1]} == {
        ("run", "jobType", "table"), ("config", "name", logged["table"]["config"]["name"])}


def test_cli_dry_run_builds_the_report_and_saving_needs_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb_workspaces", reason="the report extra: pip install 'stn[report]'")
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    runner = CliRunner()
    result = runner.invoke(app, ["wandb-report", "--project", "stn", "--group", "table1-quick", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"built {len(PANELS)} panels" in result.output and "nothing sent" in result.output
    assert "history images_seen" in result.output and "config paper_test_error" in result.output
    result = runner.invoke(app, ["wandb-report", "--project", "stn"])
    assert result.exit_code == 2 and "--entity" in result.output
    result = runner.invoke(app, ["wandb-report", "--entity", "someone", "--project", "stn"])
    assert result.exit_code == 2 and "API key" in result.output


def test_a_missing_wandb_workspaces_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from stn.tables.dashboard import DashboardError, build_report

    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports.v2", None)
    with pytest.raises(DashboardError, match=r"pip install 'stn\[report\]'"):
        build_report(Template(project="stn", entity="someone"))
    result = CliRunner().invoke(app, ["wandb-report", "--entity", "someone", "--dry-run"])
    assert result.exit_code == 2 and "wandb-workspaces" in result.output


def test_keys_are_declared_once() -> None:
    pairs = [(entry.name, entry.source) for entry in KEYS]
    assert len(pairs) == len(set(pairs))
    assert all(entry.kind in ("history", "summary", "config") and entry.source in ("cell", "table")
               for entry in KEYS)
    assert json.dumps([panel.keys() for panel in PANELS])  # plain data, no wandb objects
