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
