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
    set_progress(model, 1.0, epoch=9)
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
