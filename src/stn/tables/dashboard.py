"""The Table 1 dashboard: a W&B report over a table's group, built with W&B's own report objects.

Owns the report template (`stn wandb-report`): which panels it has and which logged keys each reads. The
panels are plain data first (`PANELS`, `RUN_COLUMNS`: no wandb import, no network), and every key they read
is declared once in `KEYS` with where it is logged (history, summary or config) and by which run (a table
cell's training run, or the table's own run, stn.tables.reproduce). tests/test_dashboard.py trains a smoke cell
offline and checks each declared key is in the offline records, and each panel reads declared keys only:
a renamed metric breaks that test, not the dashboard. `build_report` turns the specs into
`wandb_workspaces.reports.v2` objects (the optional extra `stn[report]`; a clear error without it), and
`save_report` saves them to the W&B server (online only).

The cell runs carry their table, row, column, cell and paper value as top-level config keys
(stn.tracking, from logger.cell set by stn.tables.reproduce), so the panels group a table's runs per cell and the
line and bar plots show the mean and spread over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stn.config import UserError

REPORT_EXTRA = "pip install 'stn[report]'  (or: pip install wandb-workspaces)"


class DashboardError(UserError):
    """The report cannot be built or saved here (no wandb-workspaces, no credentials)."""


@dataclass(frozen=True)
class Key:
    """A key a panel reads: its name, where W&B keeps it and which run logs it."""

    name: str
    kind: str  # "history" (run.log: a curve, an image, a table), "summary" or "config"
    source: str  # "cell" (a table cell's training run) or "table" (the table's own run)


# Every key the report's panels and run tables read: the one list that the panels and the test share.
KEYS: tuple[Key, ...] = (
    Key("images_seen", "history", "cell"),  # the x axis: step x batch size (stn.tracking.IMAGES_SEEN)
    Key("test_error", "history", "cell"),
    Key("loss", "history", "cell"),
    Key("test_error_best", "summary", "cell"),
    Key("input_rectified", "history", "cell"),  # samples with T(G) over the input, beside the output
    Key("transformations", "history", "cell"),  # the `stn visualize` figure
    Key("table", "config", "cell"),  # logger.cell (stn.tables.reproduce): which table, row, column, cell, paper value
    Key("row", "config", "cell"),
    Key("column", "config", "cell"),
    Key("cell", "config", "cell"),
    Key("paper_test_error", "config", "cell"),
    Key("seed", "config", "cell"),
    Key("results", "history", "table"),  # the table run's wandb.Tables and chart (stn.report)
    Key("ours_paper", "history", "table"),
    Key("ours_vs_paper", "history", "table"),
    Key("cells_done", "history", "table"),
)


@dataclass(frozen=True)
class PanelSpec:
    """One panel, as data. kind: line (y against x, grouped), bar (a summary value, grouped), scatter
    (x against y, per run), media (logged images), table (a logged wandb.Table)."""

    kind: str
    title: str
    source: str  # which runs it shows: "cell" or "table"
    x: str | None = None  # line: None = W&B's own step
    y: tuple[str, ...] = ()
    groupby: str | None = None  # a config key: runs of one cell become one line / bar (mean, std over seeds)
    media: tuple[str, ...] = ()
    table: str | None = None

    def keys(self) -> list[tuple[str, str]]:
        """(kind, name) of every key this panel reads, as `KEYS` declares them."""
        if self.kind == "line":
            used = [("history", self.x), *[("history", y) for y in self.y]]
        elif self.kind == "bar":
            used = [("summary", y) for y in self.y]
        elif self.kind == "scatter":
            used = [("config", self.x), *[("summary", y) for y in self.y]]
        elif self.kind == "media":
            used = [("history", name) for name in self.media]
        elif self.kind == "table":
            used = [("history", self.table)]
        else:
            raise ValueError(f"unknown panel kind {self.kind!r}")
        if self.groupby:
            used.append(("config", self.groupby))
        return [(kind, name) for kind, name in used if name]


PANELS: tuple[PanelSpec, ...] = (
    PanelSpec("line", "Test error (%) vs training images, per cell (mean, std over seeds)", "cell",
              x="images_seen", y=("test_error",), groupby="cell"),
    PanelSpec("line", "Training loss vs training images, per cell", "cell", x="images_seen", y=("loss",),
              groupby="cell"),
    PanelSpec("bar", "Best test error (%) per cell (mean, std over seeds)", "cell", y=("test_error_best",),
              groupby="cell"),
    PanelSpec("scatter", "Ours vs the paper: best test error (%) against the paper's", "cell",
              x="paper_test_error", y=("test_error_best",)),
    PanelSpec("media", "Transformers: T(G) over the input, and the output", "cell",
              media=("input_rectified", "transformations")),
    PanelSpec("table", "Table 1: ours / paper", "table", table="ours_paper"),
    PanelSpec("table", "Per cell: mean, std, paper, difference, seeds", "table", table="results"),
    PanelSpec("media", "Ours vs the paper (bar chart)", "table", media=("ours_vs_paper",)),
    PanelSpec("line", "Cells finished (each update of the table run is one step)", "table", y=("cells_done",)),
)
# The cell runs' table in the report: these columns first (runs-table accessors, see `build_report`).
RUN_COLUMNS: tuple[Key, ...] = tuple(key for key in KEYS if key.source == "cell" and key.name in
                                     ("row", "column", "seed", "paper_test_error", "test_error_best"))


def key(name: str, source: str) -> Key:
    """The declared key `name` of `source` runs; KeyError if no panel may read it."""
    for entry in KEYS:
        if entry.name == name and entry.source == source:
            return entry
    raise KeyError(f"{source} key {name!r} is not declared in stn.tables.dashboard.KEYS")


@dataclass
class Template:
    """The report's settings: where it goes and which runs it shows."""

    project: str
    entity: str
    group: str | None = None  # a table's W&B group (its folder name); None: every table1 run of the project
    table: str = "table1"  # the grid's name, the cells' `table` config key
    title: str = "Table 1: Spatial Transformer Networks, reproduced"
    description: str = field(default="")

    def filters(self, job_type: str) -> str:
        """The runset filter (wandb_workspaces' expression syntax): this table's runs of one job type."""
        where = f"Group = '{self.group}'" if self.group else f"Config('table') = '{self.table}'"
        if job_type == "table" and not self.group:
            where = f"Config('name') = '{self.table}'"  # the table run's config names its grid (stn.report)
        return f"JobType = '{job_type}' and {where}"


def _require_workspaces() -> Any:
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        raise DashboardError(f"the W&B report needs the wandb-workspaces package: {REPORT_EXTRA}") from None
    return wr


def build_panel(spec: PanelSpec, wr: Any) -> Any:
    """One `PanelSpec` as a wandb_workspaces panel."""
    group = wr.Config(spec.groupby) if spec.groupby else None
    if spec.kind == "line":
        return wr.LinePlot(title=spec.title, x=spec.x or "Step", y=list(spec.y), groupby=group,
                           groupby_aggfunc="mean" if group else None, groupby_rangefunc="stddev" if group else None)
    if spec.kind == "bar":
        return wr.BarPlot(title=spec.title, metrics=[wr.SummaryMetric(y) for y in spec.y], groupby=group,
                          groupby_aggfunc="mean", groupby_rangefunc="stddev", orientation="v")
    if spec.kind == "scatter":
        return wr.ScatterPlot(title=spec.title, x=wr.Config(spec.x), y=wr.SummaryMetric(spec.y[0]))
    if spec.kind == "media":
        return wr.MediaBrowser(title=spec.title, media_keys=list(spec.media), num_columns=2)
    if spec.kind == "table":
        return wr.WeavePanelSummaryTable(table_name=spec.table)
    raise ValueError(f"unknown panel kind {spec.kind!r}")


def build_report(template: Template) -> Any:
    """The report as wandb_workspaces objects (nothing sent: `save_report` does that). Two panel grids: the
    cells' runs (grouped per cell) and the table's own run."""
    wr = _require_workspaces()

    def accessor(entry: Key) -> str:
        return f"config:{entry.name}.value" if entry.kind == "config" else f"summary:{entry.name}"

    cells = wr.Runset(entity=template.entity, project=template.project, name="cells (training runs)",
                      filters=template.filters("train"), groupby=["config.cell"],
                      pinned_columns=[accessor(entry) for entry in RUN_COLUMNS])
    table = wr.Runset(entity=template.entity, project=template.project, name="table run",
                      filters=template.filters("table"))
    where = f"group `{template.group}`" if template.group else f"every `{template.table}` table"
    blocks = [
        wr.P(template.description or f"Built by `stn wandb-report` over {where} of {template.entity}/"
                                     f"{template.project}: the cells' runs (one per cell and seed; grouped per "
                                     "cell), then the table's own run, updated after every finished cell."),
        wr.H2("Cells"),
        wr.PanelGrid(runsets=[cells], panels=[build_panel(p, wr) for p in PANELS if p.source == "cell"]),
        wr.H2("The table"),
        wr.PanelGrid(runsets=[table], panels=[build_panel(p, wr) for p in PANELS if p.source == "table"]),
    ]
    return wr.Report(project=template.project, entity=template.entity, title=template.title,
                     description=f"stn, {where}", blocks=blocks, width="fluid")


def save_report(template: Template) -> str:
    """Build the report and save it to W&B (needs an API key and the network); returns its URL."""
    from stn.tracking import has_wandb_credentials

    report = build_report(template)
    if not has_wandb_credentials():
        raise DashboardError("saving a W&B report needs a W&B API key (`wandb login` or WANDB_API_KEY); "
                             "--dry-run builds it without one")
    saved = report.save()
    return str(getattr(saved, "url", "") or getattr(report, "url", ""))
