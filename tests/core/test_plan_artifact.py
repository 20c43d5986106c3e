"""The Plan is the artifact: ``apply_regularizer(model, plan)`` applies what ``timm_drop.plan`` showed.

Analysis (the shape pass: one forward of the root, plus block-local traces) runs once per apply path; each
regularizer is built once per site (planning and apply share one build); a plan refuses a model it was not made
for, naming the difference; ``timm_drop.applied_plans`` keeps every apply, oldest first, and ``summary`` reads it.
"""

from __future__ import annotations

import functools
import pickle

import pytest
import timm
import torch

import timm_drop
from timm_drop.regularizers.registry import get_regularizer_class

STAGE3 = {"rules": [{"regularizer": "dropout", "params": {"drop_prob": 0.3}, "sites": ["stage"], "stages": [3]}]}
STAGE4 = {"rules": [{"regularizer": "dropout", "params": {"drop_prob": 0.1}, "sites": ["stage"], "stages": [4]}]}
MIXED = {
    "rules": [
        {"regularizer": "dropout", "params": {"drop_prob": 0.2}, "sites": ["stage"]},
        {"regularizer": "droppath", "params": {"drop_prob": 0.1}, "sites": ["residual"], "stages": [3, 4]},
        {"regularizer": "dropout", "params": {"drop_prob": 0.1}, "sites": ["norm"], "name": ["layer1.0.bn1"],
         "on_conflict": "stack"},
    ]
}  # fmt: skip


def _resnet(name: str = "resnet10t") -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=3)


@pytest.fixture
def root_forwards(monkeypatch):
    """How often a model root's forward ran: the shape pass is the one forward of the root an analysis makes."""
    from timm.models.resnet import ResNet

    calls = []
    original = ResNet.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ResNet, "forward", counting)
    return calls


@pytest.fixture
def builds(monkeypatch):
    """Constructor calls of the dropout and droppath regularizers."""
    calls = []

    def counting(original):
        @functools.wraps(original)  # the spec check reads the signature
        def init(self, *args, **kwargs):
            calls.append(type(self).__name__)
            original(self, *args, **kwargs)

        return init

    for name in ("dropout", "droppath"):
        cls = get_regularizer_class(name)
        monkeypatch.setattr(cls, "__init__", counting(cls.__init__))
    return calls


def test_apply_takes_the_plan_and_analyses_nothing_again(root_forwards):
    model = _resnet()
    the_plan = timm_drop.plan(model, MIXED)
    assert len(root_forwards) == 1  # planning's shape pass
    out = timm_drop.apply_regularizer(model, the_plan)
    assert out is model and len(root_forwards) == 1  # apply ran no second analysis
    assert timm_drop.applied_plans(model) == [the_plan]
    kinds = {e.insertion for e in the_plan.entries}
    assert kinds == {"hook", "rewrite"}  # the plan's insertions, from its own data
    regs = [m for m in model.modules() if isinstance(m, timm_drop.Regularizer)]
    assert len(regs) == len(the_plan.entries)
    model.eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(model(x), timm_drop.strip_regularizers(model)(x))


def test_apply_with_a_spec_plans_once(root_forwards):
    timm_drop.apply_regularizer(_resnet(), MIXED)
    assert len(root_forwards) == 1


def test_cli_apply_analyses_the_model_once(root_forwards, tmp_path, capsys):
    from timm_drop.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text("rules:\n  - {regularizer: droppath, params: {drop_prob: 0.1}, sites: [residual], stages: [4]}\n")
    assert main(["apply", "resnet10t", str(spec), "--num-classes", "3", "--out", str(tmp_path / "m.pth")]) == 0
    assert "droppath" in capsys.readouterr().out  # the plan was shown
    assert len(root_forwards) == 1


def test_fsdp_units_of_a_regularized_model_come_from_its_plan(root_forwards):
    from timm_drop.training.fsdp import fsdp_units

    model = timm_drop.apply_regularizer(_resnet(), MIXED)
    before = len(root_forwards)
    units = fsdp_units(model, torch.zeros(2, 3, 32, 32))
    assert len(root_forwards) == before  # the apply's analysis is reused
    assert units and units == sorted(units, key=lambda n: -n.count("."))
    assert set(units) == set(timm_drop.sites.find_blocks(_resnet()))


def test_a_regularizer_is_built_once_per_site(builds):
    spec = timm_drop.load_spec(MIXED)
    builds.clear()
    timm_drop.load_spec(spec)
    validation = len(builds)  # the spec's own check (one per rule at most)
    builds.clear()
    model = timm_drop.apply_regularizer(_resnet(), spec)
    entries = timm_drop.applied_plans(model)[-1].entries
    assert len(builds) - validation == len(entries)
    builds.clear()
    model = _resnet()
    the_plan = timm_drop.plan(model, spec)
    assert len(builds) - validation == len(the_plan.entries)
    builds.clear()
    timm_drop.apply_regularizer(model, the_plan)
    assert not builds  # apply places the regularizers planning built


def test_a_plan_applied_to_another_model_is_refused_naming_the_difference():
    the_plan = timm_drop.plan(_resnet("resnet10t"), STAGE3)
    other = _resnet("resnet18")
    with pytest.raises(timm_drop.RewriteError, match=r"resnet10t|planned") as ei:
        timm_drop.apply_regularizer(other, the_plan)
    message = str(ei.value)
    assert "plan" in message and "module" in message
    assert not timm_drop.applied_plans(other) and not any(
        isinstance(m, timm_drop.Regularizer) for m in other.modules()
    )  # nothing changed


def test_a_plan_refuses_a_model_changed_since_planning():
    model = _resnet()
    the_plan = timm_drop.plan(model, STAGE3)
    model.layer2 = torch.nn.Sequential(model.layer2, torch.nn.Identity())
    with pytest.raises(timm_drop.RewriteError, match="layer2"):
        timm_drop.apply_regularizer(model, the_plan)


def test_a_pickled_plan_applies_to_a_fresh_model_of_the_same_architecture():
    the_plan = pickle.loads(pickle.dumps(timm_drop.plan(_resnet(), MIXED)))
    model = _resnet()
    timm_drop.apply_regularizer(model, the_plan)  # no modules of its own: planned again on this model
    assert timm_drop.applied_plans(model)[0].entries == the_plan.entries
    assert len([m for m in model.modules() if isinstance(m, timm_drop.Regularizer)]) == len(the_plan.entries)


def test_applied_plans_keep_every_stacked_apply_oldest_first_and_strip_clears_them():
    model = _resnet()
    assert timm_drop.applied_plans(model) == []
    first = timm_drop.plan(model, STAGE3)
    timm_drop.apply_regularizer(model, first)
    timm_drop.apply_regularizer(model, STAGE4, stack=True)
    plans = timm_drop.applied_plans(model)
    assert [len(p.entries) for p in plans] == [1, 1]
    assert plans[0] is first and plans[1].entries[0].site == "stage:layer4"
    plans.clear()  # a copy: the model's own list is not the caller's
    assert len(timm_drop.applied_plans(model)) == 2
    timm_drop.strip_regularizers(model)
    assert timm_drop.applied_plans(model) == []


def test_summary_shows_the_rules_of_every_stacked_apply_oldest_first():
    model = _resnet()
    timm_drop.apply_regularizer(model, STAGE3)
    timm_drop.apply_regularizer(model, STAGE4, stack=True)
    rules = timm_drop.summary(model).rules
    # both specs' rule 1 is "rule 1 (dropout)": two rows, in apply order, each with its own site and strength
    assert [r.sites for r in rules] == [["stage:layer3"], ["stage:layer4"]]
    assert [r.strength["drop_prob"] for r in rules] == [(0.3, 0.3), (0.1, 0.1)]
