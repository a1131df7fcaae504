"""stn.bench.train: `stn bench` runs and ends with a ratio line per model, in the documented format; bad model names
and the help screen. Timings are not asserted (they belong in experiments/bench/train.md)."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from stn.bench.train import RATIO_FORMAT, TRAIN_MODELS
from stn.cli.main import app
from stn.device import cpu_has_bf16

runner = CliRunner()
RATIO_LINE = re.compile(r"^(?P<model>.+) ratio: (?P<ratio>\d+\.\d\d)$")


# ------------------------------------------------------------------------------------------------ FLOPs


# -------------------------------------------------------------------------------------------------- CLI


def test_stn_bench_tiny_run_ends_with_a_ratio_line_per_model(data_dir):
    result = runner.invoke(app, [
        "bench", "--models", "cnn,st_cnn_aff", "--rounds", "1", "--steps", "1", "--warmup", "1", "--min-turn", "0",
        "--batch-size", "8", "--workers", "0", "--threads", "1", "--device", "cpu",
        "--override", f"data_dir={data_dir}", "--override", "dataset.train_limit=256",
    ])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    # float32 ratio lines, then (only on a CPU with bf16 hardware) one bf16 ratio line per model
    expected = ["CNN", "ST-CNN Aff"] + (["CNN bf16", "ST-CNN Aff bf16"] if cpu_has_bf16() else [])
    ratios = [RATIO_LINE.match(line) for line in lines[-len(expected):]]
    assert all(ratios), lines[-len(expected):]
    assert [match["model"] for match in ratios] == expected
    assert all(float(match["ratio"]) > 0 for match in ratios)
    assert ("bf16 hardware yes" if cpu_has_bf16() else "bf16 hardware no") in result.output
    assert "measured bf16 matmul" in result.output
    rows = [line for line in lines if line.startswith("| CNN ") or line.startswith("| ST-CNN Aff ")]
    assert len(rows) == 2
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        flops, ours, reference = (float(cell.replace(",", "")) for cell in cells[1:4])
        assert flops > 0 and ours > 0 and reference > 0
    assert "measured matmul peak" in result.output and "load average" in result.output


def test_stn_bench_on_tc_feeds_the_reference_its_clutter(data_dir):
    # the reference pipeline cuts TC's clutter from the training digits: it once got none and failed in the loader
    result = runner.invoke(app, [
        "bench", "--models", "fcn", "--dataset", "TC", "--rounds", "1", "--steps", "1", "--warmup", "1",
        "--min-turn", "0", "--batch-size", "8", "--workers", "0", "--threads", "1", "--device", "cpu",
        "--override", f"data_dir={data_dir}", "--override", "dataset.train_limit=256",
    ])
    assert result.exit_code == 0, result.output
    assert RATIO_LINE.match(result.output.strip().splitlines()[-1 - cpu_has_bf16()])


def test_ratio_format_is_the_documented_one():
    assert RATIO_FORMAT.format(model="CNN", ratio=3.104) == "CNN ratio: 3.10"
    assert [label for label, _ in TRAIN_MODELS] == ["FCN", "CNN", "ST-CNN Aff", "ST-CNN Proj", "ST-CNN TPS"]


def test_stn_bench_rejects_unknown_models():
    result = runner.invoke(app, ["bench", "--models", "cnn,resnet"])
    assert result.exit_code == 2
    assert "resnet" in result.output and "st_cnn_tps" in result.output and "Traceback" not in result.output


def test_stn_bench_help_documents_every_option():
    """Every option the bench command declares (click's own list) is on its help screen, with the subcommand."""
    import typer.main

    command = typer.main.get_command(app).commands["bench"]
    result = runner.invoke(app, ["bench", "--help"], terminal_width=200)
    assert result.exit_code == 0
    options = [opt for param in command.params for opt in param.opts if opt.startswith("--")]
    assert len(options) >= 10 and all(opt in result.output for opt in options), options
    assert "data" in command.commands and "│ data " in result.output
