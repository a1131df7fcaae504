"""stn.visualize: transformer grids drawn from a checkpoint, and previews of the datasets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stn.cli.main import app
from stn.compose import compose
from stn.config import to_dict
from stn.models import build_model

runner = CliRunner()


def config(*overrides: str):
    return compose(list(overrides))


def batch(cfg, count: int = 2) -> torch.Tensor:
    return torch.rand(count, 1, cfg.dataset.size, cfg.dataset.size)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def save_checkpoint(path, cfg, model) -> None:
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "step": 0}, path)


@pytest.mark.parametrize("variant", [(), ("transformer.placement=features",)], ids=["input", "features"])
def test_draw_transformations_writes_a_png(tmp_path, variant):
    from stn.visualize import draw_transformations

    cfg = config("dataset=RTS", "model=st_cnn", "transformer=tps", *variant)
    out = draw_transformations(
        build_model(cfg), batch(cfg, 3), torch.tensor([1, 2, 3]), tmp_path / "a" / "t.png"
    )
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5_000


def test_visualize_checkpoint_and_cli(tmp_path):
    from stn.checkpoints import load_model
    from stn.visualize import render_checkpoint

    cfg = config("dataset=P", "model=st_fcn", "transformer=projective")
    torch.manual_seed(4)
    model = build_model(cfg)
    path = tmp_path / "last.pt"
    save_checkpoint(path, cfg, model)
    loaded, loaded_cfg, _ = load_model(path, need_transformer=True)
    assert loaded_cfg == cfg and not loaded.training
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded_state[name]), name
    out = render_checkpoint(path, tmp_path / "v.png", count=4).path
    assert out.read_bytes()[:8] == PNG_MAGIC
    result = CliRunner().invoke(
        app, ["visualize", str(path), "--out", str(tmp_path / "cli.png"), "--count", "3"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli.png").read_bytes()[:8] == PNG_MAGIC


def test_visualize_rejects_bad_checkpoints(tmp_path):
    from functools import partial

    from stn.checkpoints import load_model
    from stn.runs import CheckpointError

    load_checkpoint = partial(load_model, need_transformer=True)

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(corrupt)
    bare = tmp_path / "bare.pt"
    torch.save({"weights": {}}, bare)
    with pytest.raises(CheckpointError, match="expected keys 'model' and 'config'"):
        load_checkpoint(bare)
    cnn_cfg = config("dataset=R", "model=cnn")
    baseline = tmp_path / "cnn.pt"
    save_checkpoint(baseline, cnn_cfg, build_model(cnn_cfg))
    with pytest.raises(CheckpointError, match="no spatial transformer"):
        load_checkpoint(baseline)
    st_cfg = config("dataset=R", "model=st_cnn", "transformer=affine")
    mismatched = tmp_path / "mismatched.pt"
    wrong_width = dataclasses.replace(st_cfg, model=dataclasses.replace(st_cfg.model, conv_filters=20))
    torch.save({"model": build_model(wrong_width).state_dict(), "config": to_dict(st_cfg)}, mismatched)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(mismatched)
    result = CliRunner().invoke(app, ["visualize", str(corrupt)])
    assert result.exit_code == 2 and "not a readable PyTorch checkpoint" in result.output


def test_cli_preview_writes_a_labelled_grid(data_dir, tmp_path):
    out = tmp_path / "grid" / "rts.png"
    result = runner.invoke(app, ["data", "preview", f"data_dir={data_dir}", "dataset=RTS", "--out", str(out),
                                 "--count", "10"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and str(out) in result.output
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        # 42 px canvases upscaled x3 = 126 px tiles, 4 columns x 3 rows, 6 px gaps, 22 px labels, 30 px header.
        assert image.size == (4 * (126 + 6) + 6, 30 + 3 * (126 + 22 + 6) + 6)
        assert image.mode == "RGB"


def test_cli_preview_of_the_training_split(data_dir, tmp_path):
    out = tmp_path / "train.png"
    result = runner.invoke(app, ["data", "preview", f"data_dir={data_dir}", "dataset=E", "--out", str(out),
                                 "--count", "4", "--split", "train"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.size == (2 * (112 + 6) + 6, 30 + 2 * (112 + 22 + 6) + 6)  # 28 px x4 tiles, 2x2


def test_cli_preview_without_data_is_a_clean_error(tmp_path):
    result = runner.invoke(app, ["data", "preview", f"data_dir={tmp_path}", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2  # a missing MNIST is the user's to fix
    assert "MNIST not found" in result.output and "Traceback" not in result.output


def _identity_checkpoint(tmp_path, wandb_id=None):
    """An untrained ST-CNN (affine) on R: its transformer is the identity, so its recovery is the
    distortion's own spread (stn.recovery's `before`)."""
    cfg = config("dataset=R", "model=st_cnn", "transformer=affine")
    torch.manual_seed(0)
    path = tmp_path / "last.pt"
    state = {"model": build_model(cfg).state_dict(), "config": to_dict(cfg), "step": 0}
    torch.save(state | ({"wandb_id": wandb_id} if wandb_id else {}), path)
    return path


def test_visualize_shows_the_recovery_of_the_model_it_draws(data_dir, tmp_path, monkeypatch):
    from stn.recovery import recovery_checkpoint
    from stn.visualize import render_checkpoint

    monkeypatch.setenv("STN_DATA_DIR", str(data_dir))
    path = _identity_checkpoint(tmp_path)
    expected = recovery_checkpoint(path, limit=150)["overall"]["rotation_std_deg"]
    line = f"recovery on 150 test digits: rotation_std_deg {expected:.3g} (identity {expected:.3g})"
    rendered = render_checkpoint(path, tmp_path / "v.png", count=3, recovery_digits=150)
    assert rendered.recovery_text == line and rendered.title.endswith("\n" + line)
    assert rendered.recovery_flat["recovery/rotation_std_deg"] == expected
    assert 40 < expected < 60  # R's drawn angles: U(-90, 90) has std 52 deg; the identity keeps all of it
    result = runner.invoke(app, ["visualize", str(path), "--out", str(tmp_path / "cli.png"), "--count", "3",
                                 "--recovery-digits", "150"])
    assert result.exit_code == 0, result.output
    assert line in result.output and (tmp_path / "cli.png").read_bytes()[:8] == PNG_MAGIC
    skipped = render_checkpoint(path, tmp_path / "s.png", count=2, recovery_digits=0)
    assert skipped.recovery == {} and "recovery" not in skipped.title


def test_visualize_logs_the_figure_and_recovery_to_wandb(data_dir, tmp_path, monkeypatch):
    """--wandb: a `visualize` run (offline here) holding the figure, captioned with the recovery line, the
    recovery in its summary and the training's W&B run id; inside an active run, the figure goes there."""
    import wandb

    from stn.tracking import log_visualization
    from stn.visualize import render_checkpoint
    from wandb_log import read_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STN_DATA_DIR", str(data_dir))
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    path = _identity_checkpoint(tmp_path, wandb_id="trainrun1")
    result = runner.invoke(app, ["visualize", str(path), "--out", str(tmp_path / "v.png"), "--count", "2",
                                 "--recovery-digits", "100", "--wandb"])
    assert result.exit_code == 0, result.output
    (folder,) = tmp_path.glob("wandb/offline-run-*")
    assert f"logged to W&B: {folder}" in result.output
    run = read_run(folder, lambda run: run["finished"])
    assert run["job_type"] == "visualize" and run["name"] == "R-st_cnn-affine-visualize"
    assert run["config"]["source_run"] == "trainrun1" and run["config"]["checkpoint"] == str(path.resolve())
    (row,) = [row for row in run["history"] if "transformations/_type" in row]
    recovery_line = next(line for line in result.output.splitlines() if line.startswith("recovery on 100"))
    assert row["transformations/_type"] == "image-file" and row["transformations/caption"] == recovery_line
    assert f"{run['summary']['recovery/rotation_std_deg']:.3g}" in recovery_line
    # A script's own active run gets the figure instead of a new run.
    rendered = render_checkpoint(path, tmp_path / "w.png", count=2, recovery_digits=100)
    active = wandb.init(mode="offline", project="mine", dir=str(tmp_path / "own"))
    try:
        assert log_visualization(rendered, path) == str(active.path)
    finally:
        active.finish()
    (own,) = (tmp_path / "own").glob("wandb/offline-run-*")
    mine = read_run(own, lambda run: run["finished"])
    assert any("transformations/_type" in row for row in mine["history"])
    assert mine["summary"]["recovery/rotation_std_deg"] == rendered.recovery_flat["recovery/rotation_std_deg"]


def test_recovery_meaning_line_says_lower_is_better_against_the_untouched_spread() -> None:
    from stn.recovery import meaning_line

    line = meaning_line({"recovery/rotation_std_deg": 36.7, "recovery/before/rotation_std_deg": 51.7,
                         "recovery/rotation_mean_deg": -6.8, "recovery/lost_fraction": 0.0})
    assert "lower is better" in line and "rotation spread 36.7° against 51.7° untouched" in line
    assert "(29% removed)" in line  # 1 - 36.7 / 51.7 = 0.290
    assert meaning_line({"test_error": 1.0}) == ""  # a model without a transformer: nothing to say


def test_stn_train_of_an_st_model_ends_with_the_picture_and_the_recovery_line(data_dir, tmp_path):
    """An ST model's `stn train` writes the inputs / T(G) / outputs picture into its run folder, prints its path
    and a recovery line that says what the number means; a model without a transformer prints neither."""
    small = ["trainer=smoke", "trainer.device=cpu", "logger.mode=disabled", "dataset.train_limit=256",
             "dataset.test_limit=100", f"data_dir={data_dir}"]
    result = runner.invoke(app, ["train", *small, "model=st_fcn", "transformer=affine", f"run_dir={tmp_path / 'st'}"])
    assert result.exit_code == 0, result.output
    picture = tmp_path / "st" / "transformations.png"
    assert f"wrote {picture}: test inputs with the transformer's sampling grid T(G)" in result.stdout
    assert picture.read_bytes()[:8] == PNG_MAGIC
    assert "distortion recovery (lower is better" in result.stdout and "untouched" in result.stdout
    plain = runner.invoke(app, ["train", *small, "model=fcn", f"run_dir={tmp_path / 'plain'}"])
    assert plain.exit_code == 0 and "T(G)" not in plain.stdout and "recovery" not in plain.stdout
    assert not (tmp_path / "plain" / "transformations.png").exists()
