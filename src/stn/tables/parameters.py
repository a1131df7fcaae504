"""Table 1's parameter counts (`stn models`): every Table 1 model on every dataset, composed from conf/ and
counted on meta tensors (no memory, no initialisation), beside the count each is matched to.

Kept out of `stn.models`, which builds one model from one config: this table needs the composer and Table 1's
rows (`stn.grid.TABLE1_MODELS`), which sit above the models. `cached_parameter_table` keeps it on disk (the
disk cache, `stn.cache.memo`), so a second `stn models` imports neither torch nor stn.models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stn.cache import memo
from stn.compose import compose_many
from stn.grid import TABLE1_MODELS


@dataclass(frozen=True)
class ParameterRow:
    model: str  # Table 1's label, e.g. "ST-CNN TPS"
    dataset: str
    params: int
    width_name: str  # fc_units | conv_filters
    width: int
    target: int  # the count it is matched to: model.param_budget, else its baseline's (a baseline: its own)


def parameter_table(
    datasets: tuple[str, ...] | list[str] = ("R", "RTS", "P", "E", "TC"),
    overrides: tuple[str, ...] | list[str] = (),
) -> list[ParameterRow]:
    """Every Table 1 model on every dataset, composed from conf/ (+ `overrides`), counted on meta tensors."""
    from stn.models import (  # here: a cache hit (cached_parameter_table) must not import torch
        baseline_config,
        classifier_width,
        count_at_width,
        count_parameters_of,
        model_family,
        width_key,
    )

    rows = []
    planned = [(dataset, label) for dataset in datasets for label, _ in TABLE1_MODELS]
    configs = compose_many([[f"dataset={dataset}", *choice, *overrides]
                            for dataset in datasets for _, choice in TABLE1_MODELS])
    for (dataset, label), cfg in zip(planned, configs, strict=True):
        width = classifier_width(cfg)
        params = count_at_width(cfg, width)
        name = cfg.model.name
        if cfg.model.param_budget is not None:
            target = cfg.model.param_budget
        elif name in ("fcn", "cnn"):
            target = params
        else:
            target = count_parameters_of(baseline_config(cfg, model_family(name)))
        rows.append(ParameterRow(label, dataset, params, width_key(name), width, target))
    return rows


def cached_parameter_table(datasets: Sequence[str], overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """parameter_table's rows as dicts (model, dataset, params, width_name, width, target), cached on disk: a
    hit imports neither torch nor stn.models."""

    def count() -> list[dict[str, Any]]:
        return [dataclasses.asdict(row) for row in parameter_table(tuple(datasets), list(overrides))]

    if any("${" in item for item in overrides):
        return count()
    return memo("parameters", [list(datasets), list(overrides)], count)
