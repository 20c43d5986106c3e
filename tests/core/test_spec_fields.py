"""The spec's rule fields are data: one definition per field feeds validation, the docs table and the errors."""

from __future__ import annotations

import pytest

from timm_drop.problems import Problem
from timm_drop.spec import RULE_FIELDS, RULE_KEYS, SpecError, load_spec, spec_field_table


def test_every_rule_field_has_a_type_and_one_line_help():
    assert [f.name for f in RULE_FIELDS] == list(RULE_KEYS)
    for f in RULE_FIELDS:
        assert f.help.strip() and "\n" not in f.help, f.name
        assert f.type.strip(), f.name


def test_the_field_table_lists_every_rule_field_with_its_help():
    table = spec_field_table()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(RULE_KEYS)
    for f, row in zip(RULE_FIELDS, rows):
        assert f.help.replace("|", "\\|") in row
    assert "`after_norm`" in table  # a default is shown
    assert "`stack`" in table  # so are the allowed values


def test_choices_and_defaults_come_from_the_field_definitions():
    fields = {f.name: f for f in RULE_FIELDS}
    assert fields["on_conflict"].choices == ("error", "stack", "replace")
    assert fields["norm_position"].default == "after_norm"
    assert fields["regularizer"].required and fields["sites"].required
    assert not fields["params"].required


def test_an_unknown_rule_field_names_the_fields_from_the_definitions():
    with pytest.raises(SpecError) as ei:
        load_spec({"rules": [{"regularizer": "dropblock", "params": {"drop_prob": 0.1, "block_size": 3},
                              "sites": "norm", "on_conflit": "stack"}]})
    (problem,) = ei.value.problems
    assert isinstance(problem, Problem)
    assert problem.field == "on_conflit" and problem.section == "rule 1 (dropblock)"
    assert "did you mean 'on_conflict'" in problem.message
    assert ", ".join(repr(k) for k in RULE_KEYS) in problem.message
