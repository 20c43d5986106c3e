"""timm_drop.summary: per rule sites, strength, schedule position and (opt-in) realised drop fraction."""

from __future__ import annotations

import pytest
import timm
import torch

import timm_drop
from timm_drop.cli import main
from timm_drop.summary import summary, track_drops

SPEC = {
    "rules": [
        {
            "regularizer": "dropout",
            "label": "half dropout",
            "params": {"drop_prob": 0.5},
            "sites": ["stage"],
            "schedule": {"kind": "linear", "start": 0.0, "end": 1.0},
        },
        {"regularizer": "droppath", "params": {"drop_prob": 0.2}, "sites": ["residual"], "depth_scaling": "linear"},
    ]
}


def _model():
    torch.manual_seed(0)
    return timm_drop.apply_regularizer(timm.create_model("resnet10t", num_classes=3), SPEC)


def test_summary_is_the_table_as_a_str_with_the_rules_as_data():
    import copy
    import pickle

    s = summary(_model())
    assert isinstance(s, str) and s == str(s) and repr(s) == str(s)  # prints, echoes and compares as its text
    lines = s.splitlines()
    assert lines[0].startswith("rule") and len(lines) == 2 + len(s.rules) == 4
    assert "half dropout" in lines[2] and s.upper().startswith("RULE")
    assert s.to_dict()["rules"][0]["regularizer"] == "dropout"
    for again in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert again == s and [r.rule for r in again.rules] == [r.rule for r in s.rules]


def test_summary_lists_each_rule_with_sites_strength_and_schedule_position():
    model = _model()
    s = summary(model)
    assert timm_drop.summary is summary
    assert [r.regularizer for r in s.rules] == ["dropout", "droppath"]
    drop, path = s.rules
    assert "half dropout" in drop.rule and len(drop.sites) == 4 and drop.sites[0].startswith("stage:")
    assert len(path.sites) == timm_drop.applied_plans(model)[-1].matches[1]
    assert drop.position == "not driven: full strength" and drop.strength == {"drop_prob": (0.5, 0.5)}
    assert path.position == "constant: full strength" and path.strength["drop_prob"][1] == pytest.approx(0.2)
    assert path.strength["drop_prob"][0] < 0.2  # depth scaling: shallow blocks drop less
    timm_drop.set_progress(model, 0.25)
    drop = summary(model).rules[0]
    assert drop.position == "progress 0.25" and drop.strength == {"drop_prob": (0.125, 0.125)}
    text = str(summary(model))
    assert "half dropout" in text and "progress 0.25" in text and "drop_prob=0.125" in text
    assert drop.drop_fraction is None  # tracking is off by default
    assert drop.ran == "0/4"  # no training forward yet
    model.train()(torch.rand(2, 3, 64, 64))
    drop = summary(model).rules[0]
    assert drop.ran == "4/4" and drop.to_dict()["sites_run"] == 4 and " 4/4 " in str(summary(model))


def test_tracking_reports_the_realised_drop_fraction_of_the_last_training_forward():
    model = _model().train()
    timm_drop.set_progress(model, 1.0)
    keys = set(model.state_dict())
    assert track_drops(model) == len(timm_drop.applied_plans(model)[-1].entries)
    assert set(model.state_dict()) == keys
    assert summary(model).rules[0].drop_fraction is None  # nothing measured yet
    model(torch.rand(8, 3, 64, 64))
    drop, path = summary(model).rules
    assert drop.drop_fraction == pytest.approx(0.5, abs=0.05)
    assert 0.0 <= path.drop_fraction <= 0.5
    timm_drop.set_progress(model, 0.2)
    model(torch.rand(8, 3, 64, 64))
    assert summary(model).rules[0].drop_fraction == pytest.approx(0.1, abs=0.04)
    model.eval()(torch.rand(8, 3, 64, 64))  # eval forwards leave the last training value
    assert summary(model).rules[0].drop_fraction == pytest.approx(0.1, abs=0.04)
    track_drops(model, enabled=False)
    model.train()
    reg = summary(model).rules[0].regs[0]
    before = reg.drop_fraction.clone()
    timm_drop.set_progress(model, 1.0)
    model(torch.rand(8, 3, 64, 64))
    assert torch.equal(reg.drop_fraction, before)  # off: not updated any more


def test_tracking_under_torch_compile_updates_in_place_without_recompiles():
    torch._dynamo.reset()
    reg = timm_drop.create_regularizer("dropout", drop_prob=0.5)
    reg.schedule = timm_drop.schedules.make_schedule("linear")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), reg).train()
    track_drops(model)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    values = []
    for p in (0.2, 1.0):
        timm_drop.set_progress(model, p)
        compiled(torch.rand(4, 3, 32, 32) + 0.1)
        values.append(float(reg.drop_fraction))
    assert len(compiles) == 1
    assert values[0] < values[1]
    torch._dynamo.reset()


def test_cli_summary_prints_the_rules(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(timm_drop.load_spec(SPEC).to_yaml())
    assert main(["summary", "resnet10t", str(path), "--input-size", "3", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "half dropout" in out and "not driven: full strength" in out and "droppath" in out
