"""The recipe config's fields are data: each dataclass field carries its help; the reference table is made from them."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from timm_drop.problems import Problem, ProblemsError
from timm_drop.spec import SpecError
from timm_drop.training import ConfigError, load_config
from timm_drop.training.config import CONFIG_FIELDS, TrainConfig, config_field_table


def _leaves(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def test_every_config_field_has_one_line_help():
    assert [f.name for f in CONFIG_FIELDS] == _leaves(TrainConfig)
    for f in CONFIG_FIELDS:
        assert f.help.strip() and "\n" not in f.help, f.name
        assert f.type.strip(), f.name


def test_the_reference_table_lists_every_config_field():
    table = config_field_table()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == _leaves(TrainConfig)
    fields = {f.name: f for f in CONFIG_FIELDS}
    assert fields["train.precision"].choices == ("no", "bf16", "fp16")
    assert fields["data.batch_size"].default == 128
    assert "`'no'`" in table or "`no`" in table


def test_config_problems_are_the_shared_located_problem():
    with pytest.raises(ConfigError) as ei:
        load_config({"data": {"batch_sise": 64}, "train": {"epochs": 0}}, check_paths=False, resolve_spec=False)
    (problem,) = ei.value.problems
    assert isinstance(problem, Problem) and isinstance(ei.value, ProblemsError)
    assert issubclass(SpecError, ProblemsError)  # one engine: both documents' errors share the base and the type
    assert problem.field == problem.key == "data.batch_sise"
    assert "did you mean data.batch_size?" in problem.message
