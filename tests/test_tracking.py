"""stn.tracking: what a W&B offline run holds after fit(), and that W&B can never stop training.

The offline run is read back from its own transaction log (wandb/offline-run-*/run-*.wandb), the file
`wandb sync` uploads, with wandb's protobuf `Record`; the log's framing (LevelDB log format, 32 KiB
blocks of CRC32C-length-type headed chunks after a 7-byte ':W&B' header) is parsed here in a few lines,
as wandb's own Python reader was removed when the SDK moved to its Go core.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb

from stn.compose import compose
from stn.config import to_dict
from stn.models import build_model
from stn.panels import sample_panels
from stn.tracking import Tracker, has_wandb_credentials
from stn.train import fit
from wandb_log import read_records, read_run


def offline_run(root: Path, timeout_s: float = 60.0) -> dict[str, Any]:
    """config, tags, group, history rows and final summary of the single offline run under root/wandb."""
    folders = list(root.glob("wandb/offline-run-*"))
    assert len(folders) == 1, folders
    return read_run(folders[0], lambda run: "id" in run and "test_error" in run["summary"] and run["finished"],
                    timeout_s)


@pytest.fixture(autouse=True)
def _wandb_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No outside W&B settings: the mode and folder come from the config and the working directory."""
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_DISABLED", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP",
                 "WANDB_NAME", "WANDB_TAGS"):
        monkeypatch.delenv(name, raising=False)




def test_offline_run_holds_what_fit_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = small("model=st_cnn", "transformer=affine", "logger.mode=offline", "logger.group=g1",
                "logger.tags=[extra]", "logger.images=3")
    summary = fit(cfg)
    run = offline_run(tmp_path)
    # summary.json says where the run is, and it is in ./wandb of the working directory (for `wandb sync`).
    assert summary["wandb"]["mode"] == "offline" and summary["wandb"]["id"] == run["id"]
    assert Path(summary["wandb"]["dir"]) == run["file"].parent
    assert run["file"].parent.parent == tmp_path / "wandb"
    # The config is the config as run (to_dict, run_dir filled in), the tags name the table cell.
    expected = to_dict(cfg)
    expected["run_dir"] = summary["run_dir"]
    assert {k: v for k, v in run["config"].items() if k != "_wandb"} == expected
    assert run["tags"] == ["R", "st_cnn", "affine", "extra"] and run["group"] == "g1"
    # Curves: the same numbers as metrics.jsonl, at the same steps.
    local = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    logged_losses = {row["_step"]: row["loss"] for row in run["history"] if "loss" in row}
    assert logged_losses == {m["step"]: m["loss"] for m in local if "loss" in m}
    assert all("lr" in row and "images_per_s" in row for row in run["history"] if "loss" in row)
    logged_errors = {row["_step"]: row["test_error"] for row in run["history"] if "test_error" in row}
    assert logged_errors == {m["step"]: m["test_error"] for m in local if "test_error" in m}
    # The curves are plotted against images seen (step x batch size); the test error's best and last values
    # are W&B's own summaries of its curve (define_metric), the last one being what fit() returned.
    batch = cfg.trainer.batch_size
    assert all(row["images_seen"] == row["_step"] * batch for row in run["history"] if "loss" in row or
               "test_error" in row)
    assert run["metrics"]["images_seen"] == {"step_metric": "", "summary": []}
    for key in ("loss", "lr", "images_per_s"):
        assert run["metrics"][key] == {"step_metric": "images_seen", "summary": []}
    assert run["metrics"]["test_error"] == {"step_metric": "images_seen", "summary": ["last", "min"]}
    assert run["summary"]["test_error"] == {"min": min(logged_errors.values()), "last": summary["test_error"]}
    assert run["summary"]["test_error_best"] == min(logged_errors.values())
    assert run["summary"]["steps"] == summary["steps"] == 20
    # Three input/rectified pairs as images (media keys arrive flattened: input_rectified/count, ...),
    # each 28 + 2 + 28 pixels wide, enlarged 4x, logged at the last step; their PNGs are in the run folder.
    rows = [row for row in run["history"] if "input_rectified/count" in row]
    assert len(rows) == 1 and rows[0]["_step"] == 20
    assert rows[0]["input_rectified/count"] == 3 and rows[0]["input_rectified/_type"] == "images/separated"
    assert rows[0]["input_rectified/width"] == 4 * (28 + 2 + 28)
    for name in rows[0]["input_rectified/filenames"]:
        assert (run["file"].parent / "files" / name).is_file()
    # The `stn visualize` figure of the same digits, captioned with the recovery headline of summary.json.
    figures = [row for row in run["history"] if "transformations/_type" in row]
    assert len(figures) == 1 and figures[0]["_step"] == 20 and figures[0]["transformations/_type"] == "image-file"
    assert f"rotation_std_deg {summary['recovery/rotation_std_deg']:.3g}" in figures[0]["transformations/caption"]
    # The checkpoint and a dataset card as artifacts (logger.artifacts, default on).
    model, card = run["artifacts"]
    assert model["name"] == f"model-{run['id']}" and model["type"] == "model" and model["aliases"] == ["last", "latest"]
    assert model["files"] == ["config.yaml", "last.pt", "summary.json"]
    assert model["metadata"]["test_error"] == summary["test_error"] and model["metadata"]["steps"] == 20
    # What `wandb sync` uploads is the checkpoint itself, which `stn visualize` loads (the colleague's side).
    from stn.checkpoints import load_model

    staged = Path(model["staged"]["last.pt"])
    assert staged.read_bytes() == (Path(summary["run_dir"]) / "checkpoints" / "last.pt").read_bytes()
    assert load_model(staged)[1] == dataclasses.replace(cfg, run_dir=summary["run_dir"])
    assert card["name"] == "card-R" and card["type"] == "dataset-card" and card["files"] == ["R.json", "R.md"]
    assert card["metadata"]["draws"] == cfg.logger.card_draws


def test_disabled_mode_writes_no_wandb_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small) -> None:
    monkeypatch.chdir(tmp_path)
    summary = fit(small("logger.mode=disabled"))
    assert summary["wandb"] is None
    assert not (tmp_path / "wandb").exists()


def test_a_failing_wandb_init_does_not_stop_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, small) -> None:
    monkeypatch.chdir(tmp_path)

    def broken_init(**kwargs: object) -> None:
        raise RuntimeError("the W&B service is down")

    monkeypatch.setattr(wandb, "init", broken_init)
    summary = fit(small("logger.mode=offline"))
    assert summary["steps"] == 20 and summary["wandb"] is None
    assert (Path(summary["run_dir"]) / "summary.json").is_file()
    err = capsys.readouterr().err
    assert err.count("the W&B service is down") == 1 and "continues without W&B" in err


def test_a_failing_wandb_log_does_not_stop_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, small) -> None:
    monkeypatch.chdir(tmp_path)
    real_init = wandb.init

    def init_with_broken_log(**kwargs: object) -> Any:
        run = real_init(**kwargs)

        def broken_log(*args: object, **kw: object) -> None:
            raise ConnectionError("lost the connection")

        run.log = broken_log
        return run

    monkeypatch.setattr(wandb, "init", init_with_broken_log)
    summary = fit(small("logger.mode=offline"))
    assert summary["steps"] == 20 and summary["wandb"] is None  # turned off after the first failure
    assert capsys.readouterr().err.count("lost the connection") == 1


def test_online_without_credentials_falls_back_to_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, small) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert not has_wandb_credentials()
    summary = fit(small("logger.mode=online"))
    assert summary["wandb"]["mode"] == "offline"
    assert offline_run(tmp_path)["summary"]["test_error"]["last"] == summary["test_error"]
    assert "no API key" in capsys.readouterr().err


def test_credentials_are_found_in_env_or_netrc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not has_wandb_credentials()  # no file
    netrc.write_text("machine example.com login user password secret\n")
    netrc.chmod(0o600)
    assert not has_wandb_credentials()  # another host
    netrc.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert has_wandb_credentials()
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert has_wandb_credentials()


def test_sample_panels_draw_t_of_g_over_the_input_beside_the_output() -> None:
    """Each W&B sample: the input enlarged 4x with T(G) drawn over it, a white gap, the transformer's output.
    An untrained transformer is the identity, so the output half is the enlarged input exactly, and the
    input half is too wherever no grid line is drawn; the lines are the figure's colours."""
    from stn.panels import enlarge
    from stn.visualize import LINE_RGB, OUTLINE_RGB

    torch.manual_seed(0)
    images = torch.rand(4, 1, 28, 28)
    model = build_model(compose(["model=st_cnn", "transformer=affine"]))
    panels = sample_panels(model, images)
    assert model.training  # left in the mode it was in
    big = (enlarge(images[:, 0], 4) * 255).round().to(torch.uint8).numpy()  # (4, 112, 112)
    for panel, expected in zip(panels, big, strict=True):
        assert panel.shape == (112, 112 + 8 + 112, 3) and panel.dtype.name == "uint8"
        assert (panel[:, 112:120] == 255).all()
        assert (panel[:, 120:] == expected[..., None]).all()
        left = torch.from_numpy(panel[:, :112].copy()).int()
        drawn = (left != torch.from_numpy(expected).int()[..., None]).any(-1)
        colours = {tuple(pixel) for pixel in left[drawn].tolist()}
        assert colours <= {LINE_RGB, OUTLINE_RGB} and LINE_RGB in colours
        assert drawn.float().mean() < 0.2  # a few lines, not a filled picture
    # Baselines have nothing to rectify: the enlarged input alone, grey.
    grey = sample_panels(build_model(compose(["model=cnn"])), images)
    assert all((panel == expected[..., None]).all() for panel, expected in zip(grey, big, strict=True))


def test_overlay_grid_draws_the_sampled_region_where_the_affine_map_puts_it() -> None:
    """A transformer that samples the central half of the input (theta = 0.5 I): its outline is the square
    of input pixel edges 6.5 .. 20.5 (28 px, centre 13.5, half-width 7), i.e. enlarged 4x the pixel rows and
    columns (p + 0.5) * 4 - 0.5 = 27.5 .. 83.5; PIL rasterises it within a line width (2 px) of there."""
    from stn.spatial import target_points
    from stn.visualize import OUTLINE_RGB, overlay_grid

    grid = (0.5 * target_points(28, 28, dtype=torch.float64)).reshape(28, 28, 2)
    picture = torch.from_numpy(overlay_grid(torch.zeros(28, 28), grid, zoom=4).copy()).int()
    red = (picture == torch.tensor(OUTLINE_RGB)).all(-1).nonzero()
    assert len(red) > 4 * 50
    for axis in (0, 1):
        low, high = red[:, axis].min().item(), red[:, axis].max().item()
        assert 27.5 - 2 <= low <= 27.5 + 2 and 83.5 - 2 <= high <= 83.5 + 2, (axis, low, high)


def test_tracker_disabled_is_a_no_op(tmp_path: Path) -> None:
    with Tracker(compose(["logger.mode=disabled"]), tmp_path) as tracker:
        tracker.log({"loss": 1.0}, step=1)
        tracker.set_summary({"test_error": 1.0})
        assert not tracker.enabled and tracker.info is None
    assert not (tmp_path / "wandb").exists()


def test_online_without_a_reachable_server_falls_back_to_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, small) -> None:
    """A key but no network: wandb.init(mode=online) fails (here at once; for real after init_timeout, bounded
    by tracking.ONLINE_TIMEOUT_S): the run is logged offline instead, and the user is told."""
    import stn.tracking as tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    real_init = wandb.init
    modes = []

    def unreachable(**kwargs: Any) -> Any:
        modes.append(kwargs["mode"])
        assert kwargs["settings"].init_timeout == tracking.ONLINE_TIMEOUT_S
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("Network error (ConnectionError), entering retry loop")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", unreachable)
    summary = fit(small("logger.mode=online"))
    assert modes == ["online", "offline"]
    assert summary["wandb"]["mode"] == "offline"
    assert offline_run(tmp_path)["summary"]["test_error"]["last"] == summary["test_error"]
    err = capsys.readouterr().err
    assert "could not reach W&B" in err and "wandb sync" in err


def test_a_stopped_and_resumed_training_is_one_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small) -> None:
    """Stop at step 8 (trainer.stop_after), resume to 20: both invocations log to one W&B run id (kept in
    the checkpoint), the second resumes it, and together their offline logs hold every step once."""
    from stn.checkpoints import load_checkpoint
    from stn.runs import CHECKPOINT
    from stn.train import TrainingInterrupted

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "one"
    with pytest.raises(TrainingInterrupted):
        fit(small("logger.mode=offline", f"run_dir={run_dir}", "trainer.stop_after=8"))
    first_id = load_checkpoint(run_dir / CHECKPOINT, torch.device("cpu"))["wandb_id"]
    inits: list[dict[str, Any]] = []
    real_init = wandb.init

    def recording_init(**kwargs: Any) -> Any:
        inits.append(kwargs)
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", recording_init)
    summary = fit(small("logger.mode=offline", f"run_dir={run_dir}", "trainer.resume=true"))
    assert summary["resumed_from"] == 8 and summary["wandb"]["id"] == first_id
    assert inits[0]["id"] == first_id and inits[0]["resume"] == "allow"
    folders = sorted(tmp_path.glob("wandb/offline-run-*"))  # one per invocation, as wandb writes offline
    assert len(folders) == 2 and all(f"-{first_id}" in folder.name for folder in folders)  # (-1: same second)
    first = read_run(folders[0], lambda run: "id" in run and any("loss" in row for row in run["history"]))
    second = read_run(folders[1], lambda run: "id" in run and "test_error" in run["summary"])
    assert first["id"] == second["id"] == first_id
    # The cut-off invocation carries W&B's preempting mark (a resumable stop, not a crash); the last does not.
    kinds = [[record.WhichOneof("record_type") for record in read_records(run["file"])] for run in (first, second)]
    assert "preempting" in kinds[0] and "preempting" not in kinds[1]
    # test_error_best covers both invocations (W&B's own min covers what each invocation logged).
    errors = [row["test_error"] for run in (first, second) for row in run["history"] if "test_error" in row]
    assert second["summary"]["test_error_best"] == min(errors)
    steps = [row["_step"] for run in (first, second) for row in run["history"] if "loss" in row]
    local = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [m["step"] for m in local if "loss" in m] and max(steps) == 20 and len(set(steps)) == len(steps)
    # The checkpoint at the end still names the run, and a fresh training gets another id.
    assert load_checkpoint(run_dir / CHECKPOINT, torch.device("cpu"))["wandb_id"] == first_id
    other = fit(small("logger.mode=offline"))
    assert other["wandb"]["id"] != first_id and "resume" not in inits[-1]


def test_wandb_environment_variables_reach_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small) -> None:
    """WANDB_MODE=disabled writes no W&B run at all; WANDB_PROJECT / WANDB_NAME / WANDB_TAGS name the run
    (read back from the offline log), below a logger.* value given on the command line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    summary = fit(small(wandb_from_env=True))
    assert summary["wandb"] is None and not (tmp_path / "wandb").exists()
    monkeypatch.setenv("WANDB_PROJECT", "envproj")
    monkeypatch.setenv("WANDB_NAME", "from-env")
    monkeypatch.setenv("WANDB_TAGS", "t1,t2")
    summary = fit(small("logger.mode=offline", "logger.tags=[cli]", "logger.artifacts=false"))  # CLI wins
    run = offline_run(tmp_path)
    assert run["name"] == "from-env" and run["tags"] == ["R", "cnn", "none", "cli"]
    assert run["artifacts"] == []  # logger.artifacts=false: no checkpoint, no card
    assert run["config"]["logger"]["project"] == "envproj" and summary["wandb"]["path"].endswith("envproj/" + run["id"])
