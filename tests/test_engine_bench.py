"""stn.engine.bench: the cost table the planner reads, and a failing configuration that costs only its own row."""

from __future__ import annotations

from pathlib import Path

import pytest

from stn.engine import bench as engine_bench
from stn.engine.batched import BatchedModels
from stn.engine.options import EngineOptions


def tiny_bench(data_dir: Path, **kwargs):
    return engine_bench.bench_engine(["FCN"], ks=[2], batch_size=8, steps=1, warmup=1, device="cpu",
                                     options=EngineOptions(), data_dir=str(data_dir), log=lambda _: None, **kwargs)


def test_cost_rows_keep_the_faster_mode_per_kind(data_dir: Path) -> None:
    result = tiny_bench(data_dir, modes=["loop", "vmap"])
    assert sorted(r["mode"] for r in result["rows"]) == ["loop", "vmap"] and result["failed"] == []
    (cost,) = result["cost"]
    fastest = max(result["rows"], key=lambda r: r["pipeline_images_per_s"])
    assert (cost["mode"], cost["images_per_s"], cost["k"]) == (fastest["mode"], fastest["pipeline_images_per_s"], 2)


def test_a_failing_mode_is_logged_and_skipped(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse_loop(cfgs, device, options):
        if options.mode == "loop":
            raise RuntimeError("capture failed\nsecond line")
        return BatchedModels(cfgs, device, options)

    monkeypatch.setattr(engine_bench, "BatchedModels", refuse_loop)
    lines: list[str] = []
    result = engine_bench.bench_engine(["FCN"], ks=[2], modes=["loop", "vmap"], batch_size=8, steps=1, warmup=1,
                                       device="cpu", options=EngineOptions(), data_dir=str(data_dir), log=lines.append)
    assert [r["mode"] for r in result["rows"]] == ["vmap"]
    assert [c["mode"] for c in result["cost"]] == ["vmap"]
    assert result["failed"] == [{"kind": "FCN", "mode": "loop", "k": 2, "error": "RuntimeError: capture failed\nsecond line"}]
    assert any("loop K=2   failed: RuntimeError: capture failed" in line for line in lines), lines
