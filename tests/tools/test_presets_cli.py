"""``timm-drop presets`` and placement names on the command line (in-process, as the console script runs)."""

from __future__ import annotations

import pytest
import yaml

from timm_drop.cli import main
from timm_drop.placements import PLACEMENTS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_presets_lists_each_placements_paper_rule(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name, p in PLACEMENTS.items():
        assert f"{name}  [{p.regularizer}]" in out
        assert p.rule in out
    assert "../shared/papers/dropblock.md" in out


def test_presets_with_a_model_prints_the_concrete_spec(capsys):
    assert main(["presets", "--model", "resnet50", "dropblock"]) == 0
    text = capsys.readouterr().out
    spec = yaml.safe_load(text)
    assert [r["sites"] for r in spec["rules"]] == [["norm"], ["shortcut"]]
    assert spec["rules"][0]["stages"] == [3, 4]
    assert spec["rules"][0]["stage_params"][3]["drop_prob"] == 0.025


def test_presets_refusal_names_the_reason(capsys):
    assert main(["presets", "--model", "densenet121", "droppath"]) == 2
    assert "no residual branch" in capsys.readouterr().err


def test_unknown_preset_suggests_the_nearest(capsys):
    assert main(["presets", "dropblok"]) == 2
    assert "did you mean 'dropblock'" in capsys.readouterr().err


def test_plan_takes_a_placement_name(capsys):
    assert main(["plan", "convnext_atto", "dropblock"]) == 0
    out = capsys.readouterr().out
    assert "dropblock" in out and "block_size=7" in out


def test_plan_takes_the_mapping_form_as_yaml_text(capsys):
    assert main(["plan", "resnet18", "{preset: droppath, drop_prob: 0.2}"]) == 0
    assert "drop_prob=0.2" in capsys.readouterr().out
