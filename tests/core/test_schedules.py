"""Drop-strength schedules: their values, validation, and how ``set_progress`` drives a model's regularizers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import timm_drop
from timm_drop import create_regularizer, set_progress
from timm_drop.regularizers import Regularizer
from timm_drop.schedules import Schedule, constant, curriculum, linear, make_schedule


class _Shrink(Regularizer):
    """Minimal regularizer for schedule plumbing: multiplies by ``1 - strength * amount``."""

    def __init__(self, amount: float = 0.5) -> None:
        super().__init__()
        self.amount = amount

    def regularize(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 - self.effective(self.amount)).to(x.dtype)


# -- values -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_constant_is_full_strength_everywhere(progress):
    assert constant(progress) == 1.0
    assert Schedule()(progress) == 1.0
    assert make_schedule("constant")(progress) == 1.0


def test_linear_ramps_from_initial_at_start_to_one_at_end_then_holds():
    s = Schedule(kind="linear", start=0.2, end=0.6, initial=0.1)
    assert s(0.0) == pytest.approx(0.1) and s(0.2) == pytest.approx(0.1)
    assert s(0.4) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(0.6) == 1.0 and s(1.0) == 1.0
    values = [s(p / 100) for p in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_default_linear_is_scheduled_dropblock_ramp_over_the_whole_run():
    # Ghiasi et al.: keep = 1 - (step / total) * (1 - keep_prob), i.e. drop_prob * progress.
    s = make_schedule("linear")
    for progress in (0.0, 0.25, 0.5, 0.9, 1.0):
        assert s(progress) == pytest.approx(progress)
    assert linear(0.5) == pytest.approx(0.5)


def test_curriculum_follows_morerio_keep_probability():
    # theta(t) = (1 - theta_bar) exp(-gamma t) + theta_bar, so drop(t) / drop_bar = 1 - exp(-gamma t).
    s = make_schedule({"kind": "curriculum", "gamma": 5.0})
    theta_bar = 0.75
    for t in (0.0, 0.1, 0.5, 1.0):
        theta = (1 - theta_bar) * math.exp(-5.0 * t) + theta_bar
        assert (1 - theta) == pytest.approx((1 - theta_bar) * s(t))
    assert s(0.0) == 0.0
    assert curriculum(1.0, gamma=10.0) == pytest.approx(1 - math.exp(-10))
    assert curriculum(0.1, gamma=10.0) > curriculum(0.1, gamma=2.0)


def test_schedule_serialises_only_its_own_fields():
    assert Schedule().to_dict() == {"kind": "constant"}
    lin = Schedule(kind="linear", start=0.1, end=0.9, initial=0.0)
    assert lin.to_dict() == {"kind": "linear", "start": 0.1, "end": 0.9, "initial": 0.0}
    assert make_schedule(lin.to_dict()) == lin
    assert Schedule(kind="curriculum", gamma=3.0).to_dict() == {"kind": "curriculum", "gamma": 3.0}
    assert str(lin) == "kind=linear,start=0.1,end=0.9,initial=0.0"


def test_make_schedule_accepts_names_mappings_instances_and_none():
    s = Schedule(kind="linear")
    assert make_schedule(s) is s
    assert make_schedule(None) is None
    assert make_schedule("curriculum").kind == "curriculum"
    assert make_schedule({"kind": "linear", "end": 0.5})(0.25) == pytest.approx(0.5)


# -- validation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, exc, needle",
    [
        ("cosine", ValueError, "kind"),
        ({"kind": "step"}, ValueError, "kind"),
        ({"start": 0.1}, ValueError, "kind"),
        ({"kind": "linear", "stop": 0.5}, ValueError, "stop"),
        ({"kind": "linear", "start": 0.6, "end": 0.4}, ValueError, "start < end"),
        ({"kind": "linear", "start": 0.5, "end": 0.5}, ValueError, "start < end"),
        ({"kind": "linear", "end": 1.5}, ValueError, "'end'"),
        ({"kind": "linear", "initial": -0.1}, ValueError, "'initial'"),
        ({"kind": "linear", "start": True}, ValueError, "'start'"),
        ({"kind": "linear", "start": "0"}, ValueError, "'start'"),
        ({"kind": "curriculum", "gamma": 0}, ValueError, "gamma"),
        ({"kind": "curriculum", "gamma": -1.0}, ValueError, "gamma"),
        (3, TypeError, "schedule"),
        (["linear"], TypeError, "schedule"),
    ],
)
def test_invalid_schedules_are_rejected_naming_the_field(spec, exc, needle):
    with pytest.raises(exc, match=needle):
        make_schedule(spec)


@pytest.mark.parametrize("progress", [-0.1, 1.0001, float("nan"), True, "0.5", None])
def test_progress_outside_unit_interval_is_rejected(progress):
    model = nn.Sequential(_Shrink())
    with pytest.raises(ValueError, match="progress"):
        set_progress(model, progress)
    assert model[0].strength.item() == 1.0  # nothing was written


# -- set_progress on a model ----------------------------------------------------------------------------------
def _model() -> nn.Sequential:
    lin, cur, none = _Shrink(), _Shrink(), _Shrink()
    lin.schedule = make_schedule({"kind": "linear", "start": 0.0, "end": 0.5})
    cur.schedule = make_schedule({"kind": "curriculum", "gamma": 4.0})
    corr = create_regularizer("corrdrop", drop_prob=0.2, block_size=3)
    corr.schedule = make_schedule("linear")
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), lin, nn.ReLU(), nn.Sequential(cur, none), corr)


def test_set_progress_moves_every_regularizer_along_its_own_schedule():
    model = _model().train()
    lin, cur, none, corr = model[1], model[3][0], model[3][1], model[4]
    assert set_progress(model, 0.25) == 4
    assert lin.strength.item() == pytest.approx(0.5)
    assert cur.strength.item() == pytest.approx(1 - math.exp(-1.0))
    assert none.strength.item() == 1.0
    assert corr.strength.item() == pytest.approx(0.25)
    assert timm_drop.set_progress is set_progress
    set_progress(model, 1.0)
    assert [m.strength.item() for m in (lin, none, corr)] == [1.0, 1.0, 1.0]
    assert cur.strength.item() == pytest.approx(1 - math.exp(-4.0))


def test_strength_is_written_in_place_and_drives_the_forward():
    model = _model().train()
    corr = model[4]
    buffer = corr.strength
    x = torch.rand(8, 3, 9, 9)
    set_progress(model, 0.0)
    assert corr.strength is buffer and buffer.item() == 0.0
    y0 = model[4](x + 0.5)
    assert torch.equal(y0, x + 0.5)  # linear at progress 0: CorrDrop is the identity
    set_progress(model, 1.0)
    assert buffer.item() == 1.0
    assert (model[4](x + 0.5) == 0).any()


def test_regularizer_without_a_schedule_runs_at_full_strength():
    m = _Shrink(amount=0.5).train()
    x = torch.ones(2, 3, 4, 4)
    assert m.schedule is None and m.strength.item() == 1.0
    torch.testing.assert_close(m(x), x * 0.5)  # before any set_progress
    set_progress(nn.Sequential(m), 0.0)
    assert m.strength.item() == 1.0  # no schedule: progress cannot weaken it
    torch.testing.assert_close(m(x), x * 0.5)


def test_set_progress_on_a_model_without_regularizers_sets_nothing():
    assert set_progress(nn.Sequential(nn.Linear(2, 2)), 0.5) == 0


def test_strength_is_not_saved_and_survives_half_precision_models():
    model = _model()
    assert not any("strength" in k for k in model.state_dict())
    model.half()
    set_progress(model, 0.25)
    assert model[1].strength.dtype == torch.float16
    assert model[1].effective(0.4).dtype == torch.float32
    assert model[1].effective(0.4).item() == pytest.approx(0.2, rel=1e-3)


# -- full strength until driven, warn once, self-counting schedules ------------------------------------------------
_SCHEDULED_SPEC = {
    "rules": [
        {
            "regularizer": "dropblock",
            "label": "scheduled dropblock",
            "params": {"drop_prob": 0.3, "block_size": 3},
            "sites": ["stage"],
            "schedule": {"kind": "linear", "start": 0.0, "end": 1.0},
        }
    ]
}


def _scheduled_resnet(schedule: dict | None = None) -> nn.Module:
    import timm

    spec = {"rules": [dict(_SCHEDULED_SPEC["rules"][0])]}
    if schedule is not None:
        spec["rules"][0]["schedule"] = schedule
    model = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    return timm_drop.apply_regularizer(model, spec)


def _regs(model: nn.Module) -> list[Regularizer]:
    return [m for m in model.modules() if isinstance(m, Regularizer)]


def test_applied_scheduled_regularizers_run_at_full_strength_until_the_first_set_progress():
    model = _scheduled_resnet().train()
    regs = _regs(model)
    assert len(regs) == 4 and all(r.strength.item() == 1.0 for r in regs)
    x = torch.rand(2, 3, 32, 32)
    with pytest.warns(UserWarning):
        outs = [model(x) for _ in range(2)]
    assert not torch.equal(outs[0], outs[1])  # it regularizes: two forwards draw different masks
    set_progress(model, 0.0)
    assert all(r.strength.item() == 0.0 for r in regs)
    torch.testing.assert_close(model(x), model(x))  # the schedule now holds it at 0


def test_first_training_forward_of_an_undriven_schedule_warns_once_naming_the_rule_and_the_fix():
    model = _scheduled_resnet()
    x = torch.rand(2, 3, 32, 32)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.eval()(x)  # eval forwards never warn
        assert caught == []
        model.train()(x)
        first = [str(w.message) for w in caught]
        model(x)
    assert len(first) == 4 and len(caught) == 4  # once per regularizer, first training forward only
    assert "'scheduled dropblock'" in first[0]
    assert "timm_drop.set_progress" in first[0] and "timm_drop.drive" in first[0]


def test_a_driven_or_unscheduled_regularizer_never_warns():
    import warnings

    driven = _scheduled_resnet().train()
    set_progress(driven, 0.5)
    plain_spec = {"rules": [{k: v for k, v in _SCHEDULED_SPEC["rules"][0].items() if k != "schedule"}]}
    import timm

    bare = timm_drop.apply_regularizer(timm.create_model("resnet10t", num_classes=4), plain_spec).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for model in (driven, bare):
            model(torch.rand(2, 3, 32, 32))


def _counting_backend(compiles: list):
    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    return backend


def _tiny_scheduled(schedule: dict) -> nn.Sequential:
    reg = create_regularizer("dropblock", drop_prob=0.3, block_size=3)
    reg.schedule = make_schedule(schedule)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), reg)


def test_undriven_warning_and_set_progress_cause_no_graph_break_nor_recompile():
    torch._dynamo.reset()
    model = _tiny_scheduled("linear").train()
    compiles: list = []
    compiled = torch.compile(model, backend=_counting_backend(compiles), fullgraph=True)
    x = torch.rand(2, 3, 32, 32)
    compiled(x)
    for p in (0.0, 0.5, 1.0):
        set_progress(model, p)
        compiled(x)
    assert len(compiles) == 1
    torch._dynamo.reset()


def test_steps_schedule_counts_its_own_training_forwards():
    model = _scheduled_resnet({"kind": "linear", "start": 0.0, "end": 1.0, "steps": 4}).train()
    regs = _regs(model)
    x = torch.rand(2, 3, 32, 32)
    import warnings

    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # self-driven: nothing to warn about
        for _ in range(6):
            model(x)
            seen.append(regs[0].strength.item())
        model.eval()(x)  # eval forwards do not count
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    assert all(r.schedule_count.item() == 6 for r in regs)
    assert not any("schedule_count" in k for k in model.state_dict())
    import copy

    twin = copy.deepcopy(model)  # timm's EMA copy keeps the position
    assert all(r.schedule_count.item() == 6 for r in _regs(twin))
    set_progress(model.train(), 0.5)  # an explicit call moves it; counting goes on from there
    assert regs[0].schedule_count.item() == 2 and regs[0].strength.item() == 0.5
    model(x)
    assert regs[0].strength.item() == 0.5 and regs[0].schedule_count.item() == 3


def test_steps_schedule_counts_in_place_under_torch_compile_without_recompiles():
    torch._dynamo.reset()
    model = _tiny_scheduled({"kind": "curriculum", "gamma": 2.0, "steps": 3}).train()
    compiles: list = []
    compiled = torch.compile(model, backend=_counting_backend(compiles), fullgraph=True)
    x = torch.rand(2, 3, 32, 32)
    for _ in range(4):
        compiled(x)
    reg = _regs(model)[0]
    assert len(compiles) == 1 and reg.schedule_count.item() == 4
    assert reg.strength.item() == pytest.approx(1 - math.exp(-2.0))
    torch._dynamo.reset()


def test_steps_schedule_tensor_curve_matches_the_scalar_curve():
    for s in (
        Schedule(kind="linear", start=0.2, end=0.6, initial=0.1, steps=10),
        Schedule(kind="curriculum", gamma=3.0, steps=10),
        Schedule(kind="constant", steps=10),
    ):
        for p in (0.0, 0.1, 0.2, 0.45, 0.6, 0.9, 1.0):
            assert s.at(torch.tensor(p)).item() == pytest.approx(s(p), abs=1e-6)
    assert make_schedule({"kind": "linear", "steps": 100}).to_dict()["steps"] == 100
    for bad in (0, -3, 1.5, True, "10"):
        with pytest.raises(ValueError, match="'steps'"):
            make_schedule({"kind": "linear", "steps": bad})
