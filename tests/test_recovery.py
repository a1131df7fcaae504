"""Distortion recovery (stn.recovery) against closed forms: oracle transformers and the identity transformer.

The oracle's grids and the expected spreads are computed here in pixel coordinates from the drawn parameters
(angle, scale, translation, corner offsets) with numpy, independently of `stn.data`'s normalised maps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geometry import pixel_homography
from stn.compose import compose
from stn.data import TestSet
from stn.distortions import draw_distortion
from stn.recovery import flat_summary, format_summary, point_indices, recovery_from_grids, recovery_summary
from stn.spatial import target_points
from stn.warp import apply_distortion

CPU = torch.device("cpu")
N = 2000


def draws(name: str, count: int = N, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    cfg = compose([f"dataset={name}"]).dataset
    params = draw_distortion(cfg, count, torch.Generator().manual_seed(seed), CPU, clutter_pool=count)
    labels = torch.randint(0, 10, (count,), generator=torch.Generator().manual_seed(seed + 1))
    return params, labels, cfg.size


def rot(angle_deg: np.ndarray) -> np.ndarray:
    """(B, 2, 2) the datasets' Rot(angle) = [[c, s], [-s, c]] (counter-clockwise on screen, y down)."""
    a = np.radians(angle_deg)
    c, s = np.cos(a), np.sin(a)
    return np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2)


def output_points(size: int) -> tuple[torch.Tensor, np.ndarray]:
    """(normalised output points (N, 2), the same in px from the output centre) for an S x S output."""
    points = target_points(size, size, dtype=torch.float64)[point_indices(size, size)]
    return points, points.numpy() * size / 2


def affine_oracle(params: dict[str, torch.Tensor], size: int, pose_deg: float) -> torch.Tensor:
    """Grid (B, N, 2) of a transformer that undoes the rotation/scale/translation and shows every digit turned
    by pose_deg: the digit point at output g is p = Rot(-pose) g, shown in the canvas at t + s Rot(angle) p."""
    _, g = output_points(size)
    angle = params["angle_deg"].double().numpy()
    scale = params["scale"].double().numpy()[:, None, None]
    shift = params["translation"].double().numpy()[:, None, :]
    p = g @ rot(np.array(-pose_deg)).T  # (N, 2)
    q = shift + scale * (p[None] @ rot(angle).transpose(0, 2, 1))  # (B, N, 2) canvas px from its centre
    return torch.from_numpy(q / (size / 2))


def circular_std_deg(angles: np.ndarray) -> float:
    a = np.radians(angles)
    mean = np.arctan2(np.sin(a).mean(), np.cos(a).mean())
    residual = np.angle(np.exp(1j * (a - mean)))
    return float(np.degrees(np.sqrt((residual**2).mean())))


# Tolerances: the params are stored in float32 (relative 6e-8), so recovered poses carry ~1e-7 relative
# errors: 1e-3 deg, 1e-5 in log-scale and 1e-4 px are a thousand times that and far below any real effect.


@pytest.mark.parametrize("pose", [30.0, -30.0])
def test_r_oracle_has_no_spread_and_its_mean_pose(pose):
    params, labels, size = draws("R")
    points, _ = output_points(size)
    result = recovery_from_grids(affine_oracle(params, size, pose), points, (size, size), params, labels, "R")
    overall = result["overall"]
    assert result["headline"] == ["rotation_std_deg"] and result["lost_fraction"] == 0
    assert overall["rotation_std_deg"] < 1e-3
    assert overall["rotation_mean_deg"] == pytest.approx(pose, abs=1e-3)
    assert overall["scale_mean"] == pytest.approx(1.0, abs=1e-5)
    assert overall["grid_residual_px"] < 1e-4
    for row in result["per_class"].values():
        assert row["rotation_std_deg"] < 1e-3 and row["rotation_mean_deg"] == pytest.approx(pose, abs=1e-3)


def test_r_identity_transformer_scores_the_distortions_spread():
    params, labels, size = draws("R")
    points, _ = output_points(size)
    identity = points.expand(N, *points.shape)
    result = recovery_from_grids(identity, points, (size, size), params, labels, "R")
    angles = params["angle_deg"].double().numpy()
    assert result["overall"]["rotation_std_deg"] == pytest.approx(circular_std_deg(angles), abs=1e-3)
    # U(-90, 90): std 180 / sqrt(12) = 51.96 deg; the std of 2000 draws is within 3 deg (6 standard errors:
    # SE = 51.96 * sqrt((1.8 - 1) / (4 * 2000)) = 0.52 deg)
    assert result["overall"]["rotation_std_deg"] == pytest.approx(180 / math.sqrt(12), abs=3.0)
    for label, row in result["per_class"].items():
        mask = (labels == int(label)).numpy()
        assert row["count"] == int(mask.sum())
        assert row["rotation_std_deg"] == pytest.approx(circular_std_deg(angles[mask]), abs=1e-3)
    assert sum(row["count"] for row in result["per_class"].values()) == N


def test_rts_identity_and_oracle():
    params, labels, size = draws("RTS")
    points, _ = output_points(size)
    identity = recovery_from_grids(points.expand(N, *points.shape), points, (size, size), params, labels, "RTS")
    o = identity["overall"]
    assert identity["headline"] == ["rotation_std_deg", "log_scale_std", "position_rms_px"]
    assert o["rotation_std_deg"] == pytest.approx(circular_std_deg(params["angle_deg"].double().numpy()), abs=1e-3)
    assert o["log_scale_std"] == pytest.approx(float(np.log(params["scale"].double().numpy()).std()), abs=1e-5)
    t = params["translation"].double().numpy()
    assert o["position_rms_px"] == pytest.approx(float(np.sqrt(((t - t.mean(0)) ** 2).sum(1).mean())), abs=1e-4)
    oracle = recovery_from_grids(affine_oracle(params, size, 30.0), points, (size, size), params, labels, "RTS")
    o = oracle["overall"]
    assert o["rotation_std_deg"] < 1e-3 and o["rotation_mean_deg"] == pytest.approx(30.0, abs=1e-3)
    assert o["log_scale_std"] < 1e-5 and o["scale_mean"] == pytest.approx(1.0, abs=1e-5)
    assert o["position_rms_px"] < 1e-4 and max(map(abs, o["position_mean_px"])) < 1e-4


def test_tc_identity_scores_the_positions_spread():
    params, labels, size = draws("TC")
    points, _ = output_points(size)
    result = recovery_from_grids(points.expand(N, *points.shape), points, (size, size), params, labels, "TC")
    t = params["translation"].double().numpy()
    expected = float(np.sqrt(((t - t.mean(0)) ** 2).sum(1).mean()))
    # whole-pixel positions 0..32 per axis: std sqrt((33^2 - 1) / 12) = 9.52 px, RMS over two axes 13.5 px
    assert expected == pytest.approx(math.sqrt(2 * (33**2 - 1) / 12), rel=0.05)
    assert result["overall"]["position_rms_px"] == pytest.approx(expected, abs=1e-4)
    assert result["overall"]["rotation_std_deg"] < 1e-3
    _, g = output_points(size)
    composed = g[None] - t[:, None, :]  # a pure translation: output px g shows digit px g - t
    assert result["overall"]["grid_residual_px"] == pytest.approx(framed_residual(composed), abs=1e-4)


def framed_residual(composed: np.ndarray) -> float:
    """The grid residual by its definition, in numpy: pairs whose source lies in the 28x28 digit frame."""
    inside = np.isfinite(composed).all(-1) & (np.abs(composed).max(-1) <= 14)
    total, pairs = 0.0, 0
    for point in range(composed.shape[1]):
        chosen = composed[inside[:, point], point]
        if len(chosen):
            total += np.linalg.norm(chosen - chosen.mean(0), axis=-1).sum()
            pairs += len(chosen)
    return total / pairs




def apply_h(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    uvw = np.concatenate([points, np.ones((len(points), 1))], 1) @ h.T
    return uvw[:, :2] / uvw[:, 2:]


def test_p_identity_and_oracle_against_per_sample_homographies():
    count = 300
    params, labels, size = draws("P_redraw", count)  # no folded draws: every point is finite
    points, g = output_points(size)
    corners = np.array([[-0.5, -0.5], [27.5, -0.5], [27.5, 27.5], [-0.5, 27.5]])
    offsets = params["corner_offsets"].double().numpy()
    scale = params["scale"].double().numpy()
    composed, oracle = [], []
    for i in range(count):
        h = pixel_homography(corners, corners + offsets[i])  # pre-warp canvas px -> output canvas px
        # identity transformer: output px g shows pre-warp point H^-1(g), i.e. digit px (from centre) / s
        composed.append((apply_h(np.linalg.inv(h), g + 13.5) - 13.5) / scale[i])
        # oracle: show digit point Rot(-30) g at g: pre-warp 13.5 + s p, then H
        p = g @ rot(np.array(-30.0)).T
        oracle.append((apply_h(h, 13.5 + scale[i] * p) - 13.5) / 14)
    composed = np.stack(composed)
    expected = framed_residual(composed)
    identity = recovery_from_grids(points.expand(count, *points.shape), points, (size, size), params, labels, "P")
    assert identity["headline"] == ["grid_residual_px"]
    # float32 params: relative 1e-7 of maps spanning tens of px; the homographies are well conditioned here
    assert identity["overall"]["grid_residual_px"] == pytest.approx(expected, abs=1e-3)
    result = recovery_from_grids(torch.from_numpy(np.stack(oracle)), points, (size, size), params, labels, "P")
    assert result["overall"]["grid_residual_px"] < 1e-3
    assert result["overall"]["rotation_mean_deg"] == pytest.approx(30.0, abs=1e-3)


def test_points_off_the_digit_and_near_a_horizon_are_left_out():
    params, labels, size = draws("P", 4)
    params["source_projective"][0] = torch.tensor([1.0, 0, 5.0, 0, 1.0, 0, 0, 0])  # shows x + 5: never the digit
    params["source_projective"][1] = torch.tensor([1.0, 0, 0, 0, 1.0, 0, 1.0, 0])  # w = x + 1: 0 on the left edge
    points, _ = output_points(size)
    result = recovery_from_grids(points.expand(4, *points.shape), points, (size, size), params, labels, "P")
    assert result["samples"] == 4 and result["lost_fraction"] == pytest.approx(0.25)
    assert result["overall"]["pose_count"] == 3 and result["overall"]["count"] == 4
    assert math.isfinite(result["overall"]["grid_residual_px"])
    assert math.isfinite(result["overall"]["position_rms_px"])


class FakeModel:
    """Stands in for DigitClassifier: trace() hands out precomputed grids batch by batch."""

    def __init__(self, grid: torch.Tensor) -> None:
        self.grid, self.offset, self.training, self.transformers = grid, 0, True, [object()]

    def eval(self) -> FakeModel:
        self.training = False
        return self

    def train(self, mode: bool = True) -> FakeModel:
        self.training = mode
        return self

    def trace(self, images: torch.Tensor) -> object:
        grid = self.grid[self.offset:self.offset + len(images)]
        self.offset += len(images)
        return type("Trace", (), {"grid": grid})()


def test_recovery_summary_batches_a_full_grid_oracle_and_restores_the_mode():
    cfg = compose(["dataset=R", "model=st_cnn", "transformer=affine", "trainer.eval_batch_size=300"])
    params, labels, size = draws("R", 700)
    full = target_points(size, size, dtype=torch.float64)
    _, g_all = full, full.numpy() * size / 2
    angle = params["angle_deg"].double().numpy()
    grid = (g_all @ rot(np.array(-30.0)).T)[None] @ rot(angle).transpose(0, 2, 1) / (size / 2)
    test_set = TestSet(images=torch.zeros(700, 1, size, size), labels=labels, params=params)
    model = FakeModel(torch.from_numpy(grid).float().reshape(700, size, size, 2))
    summary = recovery_summary(model, test_set, cfg)
    assert model.training and model.offset == 700
    assert summary["overall"]["rotation_std_deg"] < 1e-3  # float32 grid: relative 6e-8
    assert summary["overall"]["rotation_mean_deg"] == pytest.approx(30.0, abs=1e-3)
    assert summary["before"]["overall"]["rotation_std_deg"] == pytest.approx(circular_std_deg(angle), abs=1e-3)
    flat = flat_summary(summary)
    assert flat["recovery/rotation_std_deg"] == summary["overall"]["rotation_std_deg"]
    assert flat["recovery/before/rotation_std_deg"] == summary["before"]["overall"]["rotation_std_deg"]
    assert "rotation_std_deg: " in format_summary(summary)


def test_an_untrained_transformer_recovers_nothing_more_than_the_identity():
    from stn.models import build_model

    cfg = compose(["dataset=RTS", "model=st_cnn", "transformer=affine"])
    params, labels, size = draws("RTS", 64)
    digits = torch.zeros(64, 28, 28, dtype=torch.uint8)
    digits[:, 6:22, 10:18] = 200
    test_set = TestSet(images=apply_distortion(digits, params, size), labels=labels, params=params)
    summary = recovery_summary(build_model(cfg), test_set, cfg)
    after, before = summary["overall"], summary["before"]["overall"]
    for key in ("rotation_std_deg", "log_scale_std", "position_rms_px", "grid_residual_px"):
        assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-5), key  # identity at init
    assert recovery_summary(build_model(compose(["dataset=RTS", "model=cnn"])), test_set, cfg) == {}


def test_fit_summary_and_the_cli_report_recovery(tmp_path, data_dir):
    from typer.testing import CliRunner

    from stn.cli.main import app
    from stn.train import fit

    cfg = compose(["dataset=R", "model=st_cnn", "transformer=affine", "trainer=smoke", "logger.mode=disabled",
                   f"data_dir={data_dir}", f"run_dir={tmp_path / 'run'}", "dataset.test_limit=300",
                   "dataset.train_limit=2000", "trainer.device=cpu"])
    summary = fit(cfg)
    assert {"recovery/rotation_std_deg", "recovery/before/rotation_std_deg", "recovery/rotation_mean_deg",
            "recovery/lost_fraction"} <= summary.keys()
    before = summary["recovery/before/rotation_std_deg"]
    assert 40 < before < 65  # the std of 300 U(-90, 90) draws: 51.96 deg, SE 1.34 deg; bounds beyond 8 SE
    result = CliRunner().invoke(app, ["recovery", str(tmp_path / "run" / "checkpoints" / "last.pt"),
                                      f"--data-dir={data_dir}", "--limit", "300", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "rotation_std_deg:" in result.output and "identity transformer" in result.output
    import json

    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["overall"]["rotation_std_deg"] == pytest.approx(summary["recovery/rotation_std_deg"], abs=1e-6)
    assert set(saved["per_class"]) == {str(c) for c in range(10)}
    missing = CliRunner().invoke(app, ["recovery", str(tmp_path / "nope.pt")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


@pytest.mark.parametrize("name", ["R", "RTS", "P", "E", "TC"])
def test_source_points_continue_the_sampling_grid(name):
    """`source_points` (cards and recovery evaluate the distortion with it) equals `source_grid` at the pixel
    centres, both in float64, and takes per-sample points as well as shared ones."""
    from stn.warp import source_grid, source_points

    params, _, size = draws(name, 16)
    as64 = {key: value.double() if value.is_floating_point() else value for key, value in params.items()}
    grid = source_grid(as64, size).reshape(16, -1, 2)
    shared = target_points(size, size, dtype=torch.float64)
    finite = torch.isfinite(grid).all(-1)
    got = source_points(params, shared)
    torch.testing.assert_close(got[finite], grid[finite], atol=1e-9, rtol=1e-9)
    per_sample = source_points(params, shared.expand(16, *shared.shape))
    torch.testing.assert_close(per_sample[finite], grid[finite], atol=1e-9, rtol=1e-9)
