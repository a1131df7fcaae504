"""The second training recipe (trainer.schedule=onecycle, trainer.nesterov) and the validation split
(dataset.validation) it is tuned on: the schedule against the one-cycle formula written out here, the split's
digits and draws, what a validation run records, and the bad inputs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from stn.compose import compose
from stn.config import ConfigError
from stn.data import build_data
from stn.mnist import load_mnist
from stn.runs import CheckpointError
from stn.step import build_optimizer, build_scheduler, train_step
from stn.train import TrainingInterrupted, fit


def one_cycle_lr(step: int, total: int, peak: float) -> float:
    """The lr step `step` (0-based) trains with, from the one-cycle definition (Smith & Topin 2019, as PyTorch
    states it): cosine from peak/25 up to peak over the first 30% of the steps (reached at step 0.3*total - 1),
    then cosine down to peak/25/1e4 at the last step."""
    start, end = peak / 25, peak / 25 / 1e4
    top = 0.3 * total - 1
    if step <= top:
        t, low, high = step / top, start, peak
    else:
        t, low, high = (step - top) / (total - 1 - top), peak, end
    return high + (low - high) / 2 * (math.cos(math.pi * t) + 1)


def rates(*overrides: str) -> list[float]:
    """The lr each step of a composed trainer trains with (optimizer and scheduler stepped as fit steps them)."""
    cfg = compose(["trainer=quick", *overrides])
    optimizer = build_optimizer(nn.Linear(2, 2), cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer)
    seen = []
    for _ in range(cfg.trainer.iterations):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_onecycle_follows_the_one_cycle_formula():
    seen = rates("trainer.schedule=onecycle", "trainer.lr=0.05", "trainer.iterations=200")
    expected = [one_cycle_lr(s, 200, 0.05) for s in range(200)]
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert max(seen) == pytest.approx(0.05) and seen.index(max(seen)) == 59  # 0.3 * 200 - 1


def test_the_paper_schedule_is_unchanged_by_default():
    cfg = compose(["trainer=quick"])
    assert (cfg.trainer.schedule, cfg.trainer.nesterov) == ("step", False)
    optimizer = build_optimizer(nn.Linear(2, 2), cfg.trainer)
    assert isinstance(build_scheduler(optimizer, cfg.trainer), torch.optim.lr_scheduler.StepLR)
    assert optimizer.param_groups[0]["nesterov"] is False
    nesterov = compose(["trainer=quick", "trainer.nesterov=true"]).trainer
    assert build_optimizer(nn.Linear(2, 2), nesterov).param_groups[0]["nesterov"] is True


def test_the_validation_split_is_held_out_training_digits(data_dir):
    cfg = compose(["dataset=R", "dataset.validation=1000", f"data_dir={data_dir}", "trainer=smoke"])
    stream, held_out = build_data(cfg, "cpu")
    digits, labels = load_mnist(data_dir, train=True)
    assert len(stream.digits) == 59_000 and torch.equal(stream.digits, digits[:59_000])
    assert torch.equal(held_out.labels, labels[59_000:])
    # the held-out digits, distorted with test_seed + 1: not the test set's draws of the same positions
    _, test_set = build_data(compose(["dataset=R", f"data_dir={data_dir}", "trainer=smoke"]), "cpu")
    assert not torch.equal(held_out.params["angle_deg"], test_set.params["angle_deg"][:1000])
    again = build_data(cfg, "cpu")[1]
    assert torch.equal(again.images, held_out.images)  # a fixed set, like the test set


def test_a_validation_run_records_val_error_and_never_the_test_error(tmp_path, small):
    summary = fit(small("dataset.validation=300", "dataset.train_limit=512"))
    assert "val_error" in summary and "test_error" not in summary
    assert 0 <= summary["val_error"] <= 100
    metrics = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert any("val_error" in m for m in metrics) and not any("test_error" in m for m in metrics)


def test_a_onecycle_run_cannot_resume_with_other_iterations(tmp_path, small):
    recipe = ("dataset.train_limit=512", "trainer.schedule=onecycle", "trainer.nesterov=true")
    with pytest.raises(TrainingInterrupted) as stopped:
        fit(small(*recipe, "trainer.stop_after=10"))
    resume = (*recipe, "trainer.resume=true", f"run_dir={stopped.value.run_dir}")
    with pytest.raises(CheckpointError, match="one-cycle schedule over 20 steps"):
        fit(small(*resume, "trainer.iterations=100"))
    assert fit(small(*resume))["steps"] == 20  # with its own iterations it continues


@pytest.mark.parametrize("overrides, named", [
    (["trainer.schedule=cosine"], "trainer.schedule"),
    (["trainer.nesterov=true", "trainer.momentum=0"], "trainer.nesterov"),
    (["dataset.validation=20000", "dataset.train_limit=50000"], "dataset.validation"),
    (["dataset.validation=60000"], "dataset.validation"),
    (["dataset.validation=59900", "trainer.batch_size=128"], "trainer.batch_size"),
])
def test_bad_recipe_settings_name_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        compose(["trainer=quick", *overrides])


def test_stn_train_reports_the_validation_error(tmp_path, data_dir):
    from typer.testing import CliRunner

    from stn.cli.main import app

    result = CliRunner().invoke(app, ["train", "trainer=smoke", "trainer.device=cpu", "logger.mode=disabled",
                                      f"runs_dir={tmp_path}", f"data_dir={data_dir}", "dataset.train_limit=512",
                                      "dataset.validation=200"])
    assert result.exit_code == 0, result.output
    assert "val error " in result.output and "test error" not in result.output


# ------------------------------------------------------------------ recipe pieces (experiments/recipes/ablation)


def test_warmup_moves_the_one_cycle_peak():
    seen = rates("trainer.schedule=onecycle", "trainer.lr=0.05", "trainer.iterations=200", "trainer.warmup=0.1")
    assert max(seen) == pytest.approx(0.05) and seen.index(max(seen)) == 19  # 0.1 * 200 - 1


def test_label_smoothing_minimises_the_smoothed_cross_entropy_written_out():
    """train_step's loss with label_smoothing s is -(1 - s) log p_y - s/10 sum_j log p_j (Szegedy et al. 2016),
    computed here in float64 from the logits; the default (0) is the paper's plain cross-entropy. train_step
    takes the cross-entropy of float32 logits (as under autocast), so they agree to float32's ~1e-7 relative
    rounding of the logits, times the few terms summed: 1e-6."""
    torch.manual_seed(0)
    model = nn.Linear(6, 10).double()
    images, labels = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 10, (32,))
    for s in (0.0, 0.1, 0.3):
        log_p = torch.log_softmax(model(images).detach(), dim=1)
        expected = (-(1 - s) * log_p[torch.arange(32), labels] - s / 10 * log_p.sum(dim=1)).mean()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        loss = train_step(model, optimizer, images, labels, label_smoothing=s)
        assert float(loss) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("clip", [0.0, 0.05, 1e3])
def test_grad_clip_scales_the_step_to_the_global_norm_written_out(clip):
    """With plain SGD at lr 1, the step is -g * min(1, clip / (||g|| + 1e-6)) (the 1e-6: clip_grad_norm_'s
    guard against a zero norm), ||g|| the L2 norm over every parameter's
    gradient together (clip 0: no clipping, the paper's). The gradient is train_step's own loss (the
    cross-entropy of float32 logits), so only the clipping arithmetic differs: float64 up to 1e-12."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    images, labels = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 10, (16,))
    before = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(images).float(), labels), list(model.parameters()))
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    scale = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
    train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), images, labels, grad_clip=clip)
    for p, p0, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - scale * g, rtol=1e-12, atol=1e-14)
    if clip == 0.05:
        assert scale < 1  # the case that actually clips


def test_ema_is_the_recurrence_written_out_and_what_evaluation_sees(small):
    """With trainer.ema_decay d the evaluated weights are a_1 = w_1, a_t = d a_{t-1} + (1 - d) w_t over the
    trained weights w_t after each step; evaluations and the checkpoint's evaluated weights are the average's."""
    from stn.checkpoints import evaluated_weights, load_checkpoint
    from stn.step import build_average, fit_step

    cfg = small("dataset.train_limit=512", "trainer.ema_decay=0.9", "model=fcn")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    average = build_average(model, cfg.trainer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100)

    class Stream:
        def next(self):
            return torch.randn(8, 1, 2, 2, dtype=torch.float64), torch.randint(0, 3, (8,))

    expected = None
    for _ in range(5):
        fit_step(model, optimizer, scheduler, Stream(), amp=False, channels_last=False, trainer=cfg.trainer,
                 average=average, model=model)
        w = [p.detach().clone() for p in model.parameters()]
        expected = w if expected is None else [0.9 * a + 0.1 * x for a, x in zip(expected, w, strict=True)]
    for got, want in zip(average.module.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert not torch.equal(next(average.module.parameters()), next(model.parameters()))
    # a real run keeps the average in its checkpoint, and the evaluated weights are the average's
    summary = fit(cfg)
    state = load_checkpoint(Path(summary["run_dir"]) / "checkpoints" / "last.pt", "cpu")
    weights = evaluated_weights(state)
    assert set(weights) == set(state["model"]) and any(not torch.equal(weights[k], state["model"][k]) for k in weights)
    assert evaluated_weights({"model": state["model"]}) is state["model"]  # no average: the trained weights


def test_an_ema_run_resumes_exactly(small):
    recipe = ("dataset.train_limit=512", "trainer.ema_decay=0.8", "trainer.label_smoothing=0.1",
              "trainer.grad_clip=1.0", "model=fcn")
    whole = fit(small(*recipe))
    with pytest.raises(TrainingInterrupted) as stopped:
        fit(small(*recipe, "trainer.stop_after=7"))
    resumed = fit(small(*recipe, "trainer.resume=true", f"run_dir={stopped.value.run_dir}"))
    from stn.checkpoints import load_checkpoint

    a = load_checkpoint(Path(whole["run_dir"]) / "checkpoints" / "last.pt", "cpu")
    b = load_checkpoint(Path(resumed["run_dir"]) / "checkpoints" / "last.pt", "cpu")
    for key in a["average"]:
        assert torch.equal(a["average"][key], b["average"][key]), key
    assert resumed["test_error"] == whole["test_error"]
    with pytest.raises(CheckpointError, match="ema_decay"):  # the average is part of what the run is
        fit(small(*recipe[:1], *recipe[2:], "trainer.resume=true",
                  f"run_dir={stopped.value.run_dir}", "trainer.iterations=30"))


@pytest.mark.parametrize("override", ["trainer.label_smoothing=1", "trainer.grad_clip=-1", "trainer.ema_decay=1",
                                      "trainer.warmup=0", "trainer.warmup=1.5"])
def test_recipe_pieces_out_of_range_name_the_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        compose(["trainer=quick", override])


def test_the_ablation_table_keeps_only_a_piece_that_helps_beyond_the_spread(tmp_path):
    """experiments/recipes/ablation_table.py's rule on a made-up record: a piece lower beyond the seed spread
    and nowhere higher is kept; one with a collapsed seed, or within the spread, is dropped; one with cells
    missing is undecided."""
    import importlib.util

    from stn.convergence.study import COLUMNS

    script = Path(__file__).resolve().parents[1] / "experiments" / "recipes" / "ablation_table.py"
    spec = importlib.util.spec_from_file_location("ablation_table", script)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    errors = {"onecycle": (2.0, 2.1, 2.2), "onecycle+good": (1.5, 1.55, 1.6), "onecycle+same": (2.0, 2.2, 2.1),
              "onecycle+unstable": (1.0, 1.1, 89.4), "onecycle+partial": (1.5, 1.5, 1.5)}
    rows = [{c: "" for c in COLUMNS if c != "test_error"} | {
        "recipe": recipe, "dataset": dataset, "model": "CNN", "budget": "1/50", "images": "768000",
        "seed": str(seed), "val_error": str(e)}
        for recipe, seeds in errors.items() for dataset in ("R", "P") for seed, e in enumerate(seeds)
        if not (recipe == "onecycle+partial" and dataset == "P")]
    lines, decided = table.verdicts(rows, "onecycle")
    assert decided["onecycle+good"].startswith("kept: lower beyond the spread in 2 cell(s)")
    assert decided["onecycle+same"] == "dropped: within the seed spread everywhere"
    assert decided["onecycle+unstable"].startswith("dropped: 2 seed(s) collapsed")
    assert decided["onecycle+partial"].startswith("undecided")
    assert any("| onecycle+good | R | CNN | 1/50 | 1.55 ± 0.05 (3) | 2.10 ± 0.10 (3) | -0.55 |" in line for line in lines)


def ablation_table_module():
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "experiments" / "recipes" / "ablation_table.py"
    spec = importlib.util.spec_from_file_location("ablation_table", script)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    return table


def val_rows(errors: dict[tuple[str, str], tuple[float, ...]]) -> list[dict[str, str]]:
    """Record rows of the CNN at 1/50: (recipe, dataset) -> the seeds' validation errors."""
    from stn.convergence.study import COLUMNS

    return [{c: "" for c in COLUMNS if c != "test_error"} | {
        "recipe": recipe, "dataset": dataset, "model": "CNN", "budget": "1/50", "images": "768000",
        "seed": str(seed), "val_error": str(e)}
        for (recipe, dataset), seeds in errors.items() for seed, e in enumerate(seeds)]


def test_a_cell_counts_only_with_every_seed_of_the_study_in_so_a_drop_is_final() -> None:
    """With the study's cells (R, P, RTS at 3 seeds) planned: a piece higher beyond the spread on R with every seed
    in is dropped whatever RTS will say; higher with two seeds only, or lower on R and P with RTS (base or piece)
    untrained, is undecided, never kept early."""
    table = ablation_table_module()
    planned = {recipe: ({(d, "CNN", "1/50") for d in ("R", "P", "RTS")}, 3)
               for recipe in ("onecycle", "onecycle+worse", "onecycle+early", "onecycle+better")}
    base = {("onecycle", "R"): (2.0, 2.1, 2.2), ("onecycle", "P"): (1.0, 1.1, 1.2)}
    rows = val_rows(base | {("onecycle+worse", "R"): (3.0, 3.1, 3.2), ("onecycle+worse", "P"): (1.0, 1.1, 1.2),
                            ("onecycle+early", "R"): (3.0, 3.1), ("onecycle+better", "R"): (1.0, 1.1, 1.2),
                            ("onecycle+better", "P"): (0.5, 0.6, 0.7)})
    _, decided = table.verdicts(rows, "onecycle", planned)
    assert decided["onecycle+worse"] == "dropped: higher beyond the spread in 1 cell(s)"
    assert decided["onecycle+early"] == "undecided: 3 cell(s) not yet trained with 3 seeds"
    assert decided["onecycle+better"] == "undecided: 1 cell(s) not yet trained with 3 seeds"  # RTS: neither side
    rows += val_rows({("onecycle", "RTS"): (1.5, 1.6, 1.7), ("onecycle+better", "RTS"): (1.5, 1.6, 1.7)})
    _, decided = table.verdicts(rows, "onecycle", planned)
    assert decided["onecycle+better"] == "kept: lower beyond the spread in 2 cell(s), higher in none"


def test_dropped_answers_for_a_study_file_by_its_exit_code(tmp_path: Path) -> None:
    """`ablation_table.py --dropped STUDY`: 0 and the reason for a dropped piece (ablate.sh then skips its RTS
    cells), 1 for one not dropped (yet) and for the base, 2 for a file that is not a study."""
    import subprocess
    import sys

    from stn.convergence.study import COLUMNS

    studies = tmp_path / "ablation"
    studies.mkdir()
    grid = Path(__file__).resolve().parents[1] / "experiments" / "table1" / "grid.yaml"
    for name in ("onecycle", "onecycle+worse", "onecycle+open"):
        (studies / f"{name}.yaml").write_text(
            f"name: s{len(name)}\nrecipe: {name}\ngrid: {grid}\nresults: {tmp_path / 'ablation.csv'}\n"
            "validation: 10000\nbatch_size: 128\nseeds: [0, 1, 2]\n"
            "parts:\n  - {rows: [CNN], columns: [R, RTS], budgets: ['1/50']}\n")
    rows = val_rows({("onecycle", "R"): (2.0, 2.1, 2.2), ("onecycle+worse", "R"): (3.0, 3.1, 3.2),
                     ("onecycle+open", "R"): (2.0, 2.1, 2.2)})
    with (tmp_path / "ablation.csv").open("w") as handle:
        columns = [c for c in COLUMNS if c != "test_error"] + ["val_error"]
        handle.write(",".join(columns) + "\n" + "".join(",".join(r.get(c, "") for c in columns) + "\n" for r in rows))
    script = Path(__file__).resolve().parents[1] / "experiments" / "recipes" / "ablation_table.py"

    def dropped(study: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), "--record", str(tmp_path / "ablation.csv"), "--studies",
                               str(studies), "--dropped", str(study)], capture_output=True, text=True, timeout=120)

    worse = dropped(studies / "onecycle+worse.yaml")
    assert worse.returncode == 0 and "onecycle+worse: dropped: higher beyond the spread in 1 cell(s)" in worse.stdout
    assert dropped(studies / "onecycle+open.yaml").returncode == 1  # R within the spread, RTS to come
    assert dropped(studies / "onecycle.yaml").returncode == 1
    missing = dropped(tmp_path / "nothing.yaml")
    assert missing.returncode == 2 and "no study file" in missing.stderr


def test_ablate_sh_queues_r_and_p_first_a_study_without_them_whole_then_rts(tmp_path: Path) -> None:
    """ablate.sh's order (with a stand-in for `stn` that only logs what it is asked): every study's R and P in the
    order given, a study with neither (the validation's E and TC) whole in its place, then each study's other
    columns (RTS, and any other it has: none is left out); a study run whole gets no second pass. Two queues run the same order; the first appearance of each call
    is that order."""
    import subprocess
    import sys

    grid = Path(__file__).resolve().parents[1] / "experiments" / "table1" / "grid.yaml"
    studies = {"a": "[R, P, RTS]", "v": "[E, TC]", "b": "[P, RTS, R, E]"}
    for name, columns in studies.items():
        (tmp_path / f"{name}.yaml").write_text(
            f"name: {name}\nrecipe: onecycle+{name}\ngrid: {grid}\nresults: {tmp_path / 'record.csv'}\n"
            "validation: 10000\nbatch_size: 128\nseeds: [0]\n"
            f"parts:\n  - {{rows: [CNN], columns: {columns}, budgets: ['1/50']}}\n")
    log = tmp_path / "calls.log"
    stand_in = tmp_path / "stn"
    stand_in.write_text(f'#!/bin/bash\necho "$(basename "$4") $6" >> {log}\n')  # convergence run --study S --columns C
    stand_in.chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "experiments" / "recipes" / "ablate.sh"
    env = {**os.environ, "STN": str(stand_in), "PYTHON": sys.executable, "QUEUE_GAP_S": "0"}
    done = subprocess.run(["bash", str(script), *(str(tmp_path / f"{n}.yaml") for n in studies)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 2 * 5  # each queue: three first passes, two RTS passes
    assert list(dict.fromkeys(calls)) == ["a.yaml R,P", "v.yaml E,TC", "b.yaml P,R", "a.yaml RTS", "b.yaml RTS,E"]


def test_whole_recipe_validation_rule_accepts_rejects_and_waits() -> None:
    """validation_verdict: a candidate higher than the base beyond the spread on one dataset, or with one collapsed
    seed anywhere, is rejected; lower or within the spread everywhere with every seed in is accepted; a missing seed
    leaves it undecided; the base alone is judged by collapses only."""
    table = ablation_table_module()
    cells = {(d, "CNN", "1/50") for d in ("R", "TC")}
    base = {("onecycle", "R"): (2.0, 2.1, 2.2), ("onecycle", "TC"): (3.0, 3.2, 3.4)}
    rows = val_rows(base | {("good", "R"): (1.5, 1.6, 1.7), ("good", "TC"): (3.1, 3.2, 3.3),
                            ("worse", "R"): (1.5, 1.6, 1.7), ("worse", "TC"): (4.0, 4.1, 4.2),
                            ("unstable", "R"): (1.5, 1.6, 1.7), ("unstable", "TC"): (3.1, 3.2, 89.4),
                            ("early", "R"): (1.5, 1.6, 1.7), ("early", "TC"): (3.1, 3.2)})
    verdict = {name: table.validation_verdict(rows, "onecycle", name, cells, 3)[1]
               for name in ("good", "worse", "unstable", "early", "onecycle")}
    assert verdict["good"] == ("accepted: no seed collapsed in 2 cells, higher than onecycle beyond the spread in "
                               "none (lower in 1)")
    assert verdict["worse"] == "rejected: higher than onecycle beyond the spread in 1 cell(s)"
    assert verdict["unstable"] == "rejected: 1 seed(s) collapsed (89.4%)"
    assert verdict["early"] == "undecided: 1 cell(s) not yet trained with 3 seeds"
    assert verdict["onecycle"] == "accepted: no seed collapsed in 2 cells"
    collapsed_base = val_rows({("onecycle", "R"): (2.0, 2.1, 2.2), ("onecycle", "TC"): (3.0, 89.4)})
    assert table.validation_verdict(collapsed_base, "onecycle", "onecycle", cells, 3)[1] == \
        "rejected: 1 seed(s) collapsed (89.4%)"  # caught with the third seed still to come


def test_a_diverged_seed_counts_as_collapsed_in_both_rules() -> None:
    """A seed recorded with val_error nan (its loss became NaN/inf, stn.convergence.study.diverged_row) drops a
    piece and rejects a whole recipe, like a seed stuck at a constant prediction."""
    table = ablation_table_module()
    rows = val_rows({("onecycle", "R"): (2.0, 2.1, 2.2), ("onecycle+nan", "R"): (1.5, 1.6)})
    rows += val_rows({("onecycle+nan", "R"): (math.nan,)})
    rows[-1]["seed"] = "2"
    _, decided = table.verdicts(rows, "onecycle", {"onecycle+nan": ({("R", "CNN", "1/50")}, 3)})
    assert decided["onecycle+nan"] == "dropped: 1 seed(s) collapsed (diverged)"
    verdict = table.validation_verdict(rows, "onecycle", "onecycle+nan", {("R", "CNN", "1/50")}, 3)[1]
    assert verdict == "rejected: 1 seed(s) collapsed (diverged)"
