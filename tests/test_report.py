"""stn.report: the ours-vs-paper chart (log axis, so sub-1% cells stay readable)."""

from __future__ import annotations

import matplotlib.pyplot as plt

from stn.report import CellResult, bars_figure, plot_bars


def cells() -> list[CellResult]:
    return [
        CellResult("CNN", "R", "cnn-R", 1.2, [0, 1, 2], {0: 5.2, 1: 5.4, 2: 5.3}, mean=5.3, std=0.1, diff=4.1),
        CellResult("ST-CNN Aff", "RTS", "st-RTS", 0.5, [0, 1, 2], {0: 0.9}, mean=0.9),
        CellResult("FCN", "TC", "fcn-TC", 13.2, [0], {}),  # not run yet: a gap, not a zero bar
    ]


def test_the_chart_has_a_log_error_axis_spanning_sub_percent_and_tens_of_percent(tmp_path):
    fig = bars_figure(cells(), "t")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    assert low < 0.5 and high > 13.2  # the smallest paper value and the largest are both on the axis
    plt.close(fig)
    path = plot_bars(cells(), tmp_path / "bars.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_third_series_sits_between_ours_and_the_paper() -> None:
    fig = bars_figure(cells(), "t", beside=[2.0, 0.7, float("nan")], beside_label="paper-sgd", ours_label="laptop")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["laptop", "paper-sgd", "paper"]
    from matplotlib.container import BarContainer

    ours, beside, paper = [c for c in ax.containers if isinstance(c, BarContainer)]
    heights = [[bar.get_height() for bar in group] for group in (beside, paper)]
    assert heights[0][:2] == [2.0, 0.7] and heights[1] == [1.2, 0.5, 13.2]
    centres = [[bar.get_x() + bar.get_width() / 2 for bar in group] for group in (ours, beside, paper)]
    assert all(a < b < c for a, b, c in zip(*centres, strict=True))  # ours, beside, paper, left to right per cell
    plt.close(fig)


def test_summarise_plans_seeds_per_cell_and_keeps_steps_only_when_they_agree() -> None:
    from stn.report import summarise

    runs = [{"row": "CNN", "column": "R", "seed": 0, "status": "done", "test_error": 2.0, "steps": 20},
            {"row": "CNN", "column": "R", "seed": 1, "status": "done", "test_error": 4.0, "steps": 30},
            {"row": "FCN", "column": "R", "seed": 0, "status": "done", "test_error": 1.0, "steps": 20},
            {"row": "FCN", "column": "R", "seed": 1, "status": "done", "test_error": 9.0, "steps": 20}]  # not planned
    cnn, fcn = summarise({("CNN", "R"): None, ("FCN", "R"): 2.1}, {("CNN", "R"): [0, 1], ("FCN", "R"): [0]}, runs)
    assert (cnn.mean, cnn.status, cnn.steps, cnn.diff) == (3.0, "done", None, None)  # steps differ; no paper
    assert (fcn.mean, fcn.std, fcn.status, fcn.steps, fcn.errors) == (1.0, None, "done", 20, {0: 1.0})
