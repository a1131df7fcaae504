"""stn.compose: every dataset x model x transformer combination of conf/ either composes (and builds its model
and one batch) or fails with a ConfigError naming the fix; typos and wrong types name the key; STN_DATA_DIR
sets the default data_dir and a command-line data_dir beats it; W&B's variables sit between the command line
and the defaults.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import stn.compose as compose_module
from stn.compose import compose, compose_many, group_choices
from stn.config import DATA_DIR_ENV, Config, ConfigError
from stn.data import distort
from stn.models import build_model

DATASETS = group_choices("dataset")
MODELS = group_choices("model")
TRANSFORMERS = group_choices("transformer")
ROOT = Path(__file__).resolve().parents[1]


def test_the_groups_are_the_papers_axes() -> None:
    assert set(DATASETS) >= {"R", "RTS", "P", "E", "TC", "plain"}
    assert set(MODELS) == {"fcn", "cnn", "st_fcn", "st_cnn"}
    assert set(TRANSFORMERS) == {"none", "affine", "projective", "tps"}
    assert set(group_choices("trainer")) >= {"paper", "quick", "smoke"}


# P's readings (P_box, ...) build the same 28x28 models as P: composed and drawn in tests/test_p_readings.py
SHAPES = [name for name in DATASETS if not name.startswith("P_")]


@pytest.mark.parametrize(("dataset", "model", "transformer"), list(itertools.product(SHAPES, MODELS, TRANSFORMERS)))
def test_every_combination_composes_or_names_the_fix(dataset: str, model: str, transformer: str) -> None:
    overrides = [f"dataset={dataset}", f"model={model}", f"transformer={transformer}"]
    valid = model.startswith("st_") == (transformer != "none")
    if not valid:
        with pytest.raises(ConfigError) as err:
            compose(overrides)
        # The message says what to change: add a transformer, or use the ST model / drop the transformer.
        fix = "add transformer=" if model.startswith("st_") else f"use model=st_{model}"
        assert fix in str(err.value)
        return
    cfg = compose(overrides)
    assert (cfg.dataset.name, cfg.model.name, cfg.transformer.type) == (dataset, model, transformer)
    assert cfg.run_name == "-".join([dataset, model] + ([transformer] if transformer != "none" else []))
    # The model builds and takes one distorted batch of this dataset (random digits: shapes, not content).
    generator = torch.Generator().manual_seed(0)
    digits = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8, generator=generator)
    images, _ = distort(digits, cfg.dataset, generator, clutter_source=digits)
    assert images.shape == (2, 1, cfg.dataset.size, cfg.dataset.size)
    with torch.no_grad():
        assert build_model(cfg)(images).shape == (2, 10)


def test_every_trainer_preset_composes_with_two_lr_drops() -> None:
    for preset in group_choices("trainer"):
        cfg = compose([f"trainer={preset}"])
        assert cfg.trainer.name == preset
        # Two lr drops within the run, like the paper's 150k iterations with drops at 50k and 100k (the demo's
        # one-cycle schedule has none: it anneals over the whole run).
        assert cfg.trainer.iterations // cfg.trainer.lr_step >= 2 or cfg.trainer.schedule == "onecycle"


def test_presets_have_the_papers_schedule() -> None:
    paper = compose([]).trainer
    assert (paper.name, paper.iterations, paper.batch_size, paper.lr, paper.lr_step, paper.lr_gamma) == (
        "paper", 150_000, 256, 0.01, 50_000, 0.1,
    )  # fmt: skip
    assert paper.weight_decay == 0.0
    quick = compose(["trainer=quick"]).trainer
    assert quick.iterations < paper.iterations and quick.lr == paper.lr


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.iteratons=5", "trainer.iterations"),  # a typo: the nearest key is suggested
        ("seeed=3", "did you mean seed"),
        ("trainer.iterations=abc", "trainer.iterations"),  # a wrong type
        ("seed=1.5", "seed"),
        ("logger.mode=loud", "logger.mode"),
        ("trainer.device=tpu", "trainer.device"),
        ("trainer.lr=-1", "trainer.lr"),
        ("trainer.stop_after=0", "trainer.stop_after"),
        ("logger.card_draws=-1", "logger.card_draws=-1: outside"),
        ("logger.artifacts=maybe", "logger.artifacts"),
        ("dataset=XYZ", "choices for dataset: E, P, P_axis, P_box, P_box20, P_image, P_redraw, R, RTS, TC, plain"),
    ],
)
def test_bad_overrides_name_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        compose([override])


def test_schema_keys_missing_from_the_yaml_can_be_overridden() -> None:
    # dataset.test_limit is a DatasetConfig field that conf/dataset/*.yaml do not list.
    assert compose(["dataset.test_limit=10"]).dataset.test_limit == 10
    assert compose(["dataset.test_limit=10"]).dataset.test_limit == 10


def test_data_dir_comes_from_the_environment_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert compose([]).data_dir == "data"
    monkeypatch.setenv(DATA_DIR_ENV, "/somewhere/mnist")
    assert compose([]).data_dir == "/somewhere/mnist"
    assert compose(["data_dir=/elsewhere"]).data_dir == "/elsewhere"  # the command line wins


def test_wandb_environment_variables_sit_between_the_command_line_and_the_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_NAME",
                 "WANDB_TAGS"):
        monkeypatch.delenv(name, raising=False)
    default = compose().logger
    assert (default.mode, default.project, default.entity, default.group, default.name, default.tags) == (
        "offline", "stn", None, None, None, [])
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "envproj")
    monkeypatch.setenv("WANDB_ENTITY", "team")
    monkeypatch.setenv("WANDB_RUN_GROUP", "g")
    monkeypatch.setenv("WANDB_NAME", "nice name")
    monkeypatch.setenv("WANDB_TAGS", "a, b,,c")
    env = compose().logger
    assert (env.mode, env.project, env.entity, env.group, env.name, env.tags) == (
        "disabled", "envproj", "team", "g", "nice name", ["a", "b", "c"])
    # A logger.* value on the command line wins over its variable; the others still come from the environment.
    cli = compose(["logger.mode=offline", "logger.project=cliproj", "logger.tags=[x]", "logger.name=n"]).logger
    assert (cli.mode, cli.project, cli.entity, cli.name, cli.tags) == ("offline", "cliproj", "team", "n", ["x"])
    # wandb's older mode names and WANDB_DISABLED are honoured; a bad WANDB_MODE is named in the error.
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert compose().logger.mode == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert compose().logger.mode == "disabled"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="logger.mode='sometimes' \\(WANDB_MODE='sometimes'"):
        compose()


# ------------------------------------------------ configs assembled from memoised sections == Hydra's compose

def hydra_whole(overrides: list[str]) -> Config:
    """The reference: one Hydra compose of the whole override list (what compose() did before assembling)."""
    return compose_module._hydra_config(overrides)


def planned_lists() -> list[list[str]]:
    """The override lists the table and the studies plan: every Table 1 cell at every preset (seed 2, a run
    folder, resume), and every cell of every study file at one seed."""
    from stn.convergence.study import budget_overrides, cell_dir, load_study
    from stn.grid import load_grid

    grid = load_grid(ROOT / "experiments" / "table1" / "grid.yaml")
    lists = [[*grid.rows[row], *grid.columns[column], f"trainer={preset}", "seed=2",
              f"run_dir=/tmp/t/{row}-{column}", "trainer.resume=true", "logger.group=t"]
             for row, column in grid.cells for preset in ("quick", "paper")]
    for path in sorted((ROOT / "experiments" / "convergence").glob("*.yaml")):
        study = load_study(path)
        for part in study.parts:
            lists += [[*study.grid.columns[column], *study.grid.rows[row], *study.overrides,
                       *budget_overrides(budget, study.batch_size), "seed=1",
                       f"run_dir={cell_dir(study, row, column, budget, 1)}", f"logger.group={study.name}"]
                      for budget in part.budgets for column in part.columns for row in part.rows]
    return lists


def test_assembled_configs_equal_hydras_whole_compose_for_every_planned_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lists = planned_lists()
    compose_module._SECTIONS.clear()
    calls = []
    whole = compose_module._hydra_config
    monkeypatch.setattr(compose_module, "_hydra_config", lambda *a, **k: calls.append(a) or whole(*a, **k))
    assembled = compose_many(lists)
    # One Hydra call, for conf/'s defaults; every other section is its group file merged into its schema.
    assert len(calls) == 1
    monkeypatch.setattr(compose_module, "_hydra_config", whole)
    for overrides, config in zip(lists, assembled, strict=True):
        assert config == hydra_whole(overrides), overrides


@pytest.mark.parametrize("overrides", [
    ["trainer.lr=1"],                                 # an int where the schema has a float
    ["name=123", "seed=4", "download=true"],          # top-level keys typed by the schema
    ["name=null", "run_dir=/x/y"],
    ["logger.tags=[a,b]", "model=st_cnn", "transformer=tps", "dataset.rotation=45"],
    ["dataset=R", "dataset=RTS"],                     # a group chosen twice: whatever Hydra does
    ["+trainer.foo=1"], ["~seed"], ["++seed=5"],       # additions, deletions: Hydra whole
    ["seed=1,2"],                                     # a sweep: refused as Hydra refuses it
    ["data_dir=${oc.env:HOME}"],                      # an interpolation: Hydra whole
    ["trainer.iterations=abc"], ["traner.lr=0.1"], ["dataset=nope"], ["model=st_cnn"],  # errors
])
def test_odd_overrides_give_what_hydra_gives(overrides: list[str]) -> None:
    try:
        expected: Config | str = hydra_whole(overrides)
    except ConfigError as err:
        expected = str(err)
    try:
        got: Config | str = compose(overrides)
    except ConfigError as err:
        got = str(err)
    assert got == expected


def test_an_error_in_a_batch_is_the_error_of_its_list() -> None:
    with pytest.raises(ConfigError) as alone:
        compose(["traner.lr=0.1"])
    with pytest.raises(ConfigError) as batched:
        compose_many([["dataset=RTS"], ["traner.lr=0.1"], ["dataset=E"]])
    assert str(batched.value) == str(alone.value)
    assert batched.value.overrides == ("traner.lr=0.1",)  # which list: the caller names its run from it


def test_assembled_configs_follow_the_environment_and_are_the_callers_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, "/first")
    monkeypatch.setenv("WANDB_PROJECT", "one")
    first = compose(["dataset=RTS"])
    assert (first.data_dir, first.logger.project) == ("/first", "one")
    monkeypatch.setenv(DATA_DIR_ENV, "/second")
    monkeypatch.setenv("WANDB_PROJECT", "two")
    second = compose(["dataset=RTS"])
    assert (second.data_dir, second.logger.project) == ("/second", "two")
    second.logger.tags.append("edited")  # frozen dataclasses still hold mutable lists
    assert compose(["dataset=RTS"]).logger.tags == []


def test_a_group_file_with_a_defaults_list_goes_through_hydra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group file the assembly cannot read alone (Hydra resolves its defaults list) still composes as
    Hydra composes it."""
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(compose_module.conf_dir(), conf)
    (conf / "dataset" / "R_wide.yaml").write_text("defaults:\n  - R\n  - _self_\nrotation: 120.0\n")
    monkeypatch.setenv("STN_CONF_DIR", str(conf))
    overrides = ["dataset=R_wide", "model=st_cnn", "transformer=affine", "seed=3"]
    config = compose(overrides)
    assert config == hydra_whole(overrides)
    assert (config.dataset.name, config.dataset.rotation) == ("R", 120.0)
    assert compose(["dataset=R"]).dataset.rotation == 90.0  # the plain files still assemble
    with pytest.raises(compose_module._NotPlain):  # so the first config above came from Hydra whole
        compose_module._load_section("dataset", "R_wide", ())
