"""timm_drop.drive: one call advances every schedule per optimizer step, in a plain loop and under Accelerate."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torch import nn

import timm_drop
from timm_drop import LayerOut
from timm_drop.regularizers import Regularizer

SPEC = {
    "rules": [
        {
            "regularizer": "dropblock",
            "label": "ramped dropblock",
            "params": {"drop_prob": 0.2, "block_size": 3},
            "sites": ["stage"],
            "schedule": {"kind": "linear", "start": 0.0, "end": 1.0},
        }
    ]
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return timm_drop.apply_regularizer(timm.create_model("resnet10t", pretrained=False, num_classes=3), SPEC)


def _strengths(model: nn.Module) -> list[float]:
    return [m.strength.item() for m in model.modules() if isinstance(m, Regularizer)]


def _batch(n: int = 4):
    return torch.rand(n, 3, 32, 32), torch.randint(0, 3, (n,))


def _step(model, opt, x, y, *, accumulate: int = 1) -> None:
    for xs, ys in zip(x.chunk(accumulate), y.chunk(accumulate)):
        nn.functional.cross_entropy(model(xs), ys).backward()
    opt.step()
    opt.zero_grad()


def test_plain_loop_with_drive_follows_the_schedule_per_optimizer_step_not_per_micro_batch():
    model = _model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    driver = timm_drop.drive(model, opt, total_steps=4)
    assert set(_strengths(model)) == {0.0}  # driven: the ramp starts at progress 0
    x, y = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a driven schedule never warns
        for k in range(1, 6):
            _step(model, opt, x, y, accumulate=2)  # two micro-batches, one step
            assert _strengths(model) == [pytest.approx(min(k / 4, 1.0))] * 4
    assert driver.step == 5 and driver.progress == 1.0
    model.eval()(x)  # eval forwards do not move it
    assert driver.step == 5


def test_plain_loop_without_drive_runs_the_spec_at_full_strength():
    model = _model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _batch()
    with pytest.warns(UserWarning, match="ramped dropblock"):
        _step(model, opt, x, y)
    assert set(_strengths(model)) == {1.0}


@pytest.mark.parametrize("before_prepare", [True, False])
def test_drive_survives_accelerator_prepare_and_counts_accumulated_steps(before_prepare):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = _model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if before_prepare:
        driver = timm_drop.drive(model, opt, total_steps=10)
    model, opt = accelerator.prepare(model, opt)
    if not before_prepare:
        driver = timm_drop.drive(model, opt, total_steps=10)
    x, y = _batch(2)
    for _ in range(6):  # 6 micro-batches, accumulation 2: 3 optimizer steps
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
    assert driver.step == 3
    assert _strengths(accelerator.unwrap_model(model)) == [pytest.approx(0.3)] * 4


def test_driver_state_dict_resumes_the_same_schedule():
    model = _model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    driver = timm_drop.drive(model, opt, total_steps=8)
    x, y = _batch()
    for _ in range(3):
        _step(model, opt, x, y)
    state = driver.state_dict()

    resumed = _model().train()
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.01)
    driver2 = timm_drop.drive(resumed, opt2, total_steps=8)
    driver2.load_state_dict(state)
    assert _strengths(resumed) == _strengths(model) == [pytest.approx(3 / 8)] * 4
    _step(model, opt, x, y)
    _step(resumed, opt2, x, y)
    assert driver2.step == 4 and _strengths(resumed) == _strengths(model)
    with pytest.raises(ValueError, match="total_steps"):
        timm_drop.drive(_model(), torch.optim.SGD(model.parameters()), total_steps=9).load_state_dict(state)


def test_a_step_the_grad_scaler_skips_does_not_move_the_schedule():
    model = _model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    driver = timm_drop.drive(model, opt, total_steps=4)
    x, y = _batch()
    for scale, expected in ((1.0, 1), (float("inf"), 1), (1.0, 2)):  # inf gradients: the scaler skips the step
        scaler.scale(nn.functional.cross_entropy(model(x), y) * scale).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        assert driver.step == expected and _strengths(model) == [pytest.approx(expected / 4)] * 4


def test_drive_also_moves_an_ema_copy_along_the_same_schedule():
    from timm.utils import ModelEmaV3

    model = _model().train()
    ema = ModelEmaV3(model, decay=0.9)  # a deepcopy: its own regularizer modules
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    driver = timm_drop.drive(model, opt, total_steps=4, also=[ema.module])
    assert _strengths(ema.module) == [0.0] * 4
    x, y = _batch()
    for k in (1, 2):
        _step(model, opt, x, y)
        ema.update(model, step=k)
        assert _strengths(model) == _strengths(ema.module) == [pytest.approx(k / 4)] * 4
    copy = ModelEmaV3(model, decay=0.9)
    resumed = timm_drop.drive(_model(), torch.optim.SGD(model.parameters()), total_steps=4, also=[copy.module])
    resumed.load_state_dict(dict(driver.state_dict(), step=3))
    assert _strengths(copy.module) == [pytest.approx(0.75)] * 4
    assert "also=1" in repr(driver)
    with pytest.raises(TypeError, match=r"also\[0\]"):
        timm_drop.drive(model, opt, total_steps=4, also=[ema.state_dict()])


def test_drive_runs_layerout_epochs_from_the_step_count():
    model = _model().train()
    lo = LayerOut(freeze_probs="random", seed=3).bind(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    driver = timm_drop.drive(model, opt, total_steps=6, layerout=lo, steps_per_epoch=2)
    assert lo.epoch == 0 and lo._hooks  # attached for us
    x, y = _batch()
    for step in range(6):
        epoch = step // 2
        assert lo.epoch == epoch
        assert lo.frozen_names == [n for n, f in zip(lo.unit_names, lo.draw(epoch).tolist()) if f]
        frozen = {id(p): p.detach().clone() for p in lo.frozen_parameters}
        assert frozen
        _step(model, opt, x, y)
        for p in model.parameters():
            if id(p) in frozen:
                assert torch.equal(p.detach(), frozen[id(p)])
    assert lo.epoch == 3 and driver.epoch == 3
    state = driver.state_dict()
    model2 = _model()
    lo2 = LayerOut(freeze_probs="random", seed=3).bind(model2)
    d2 = timm_drop.drive(model2, torch.optim.SGD(model2.parameters()), 6, layerout=lo2, steps_per_epoch=2)
    d2.load_state_dict(dict(state, step=3))
    assert lo2.epoch == 1 and lo2.frozen_names == [n for n, f in zip(lo2.unit_names, lo2.draw(1).tolist()) if f]


def test_remove_stops_driving_and_detaches_what_it_attached():
    model = _model().train()
    lo = LayerOut(freeze_probs="random", seed=0).bind(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    driver = timm_drop.drive(model, opt, total_steps=4, layerout=lo, steps_per_epoch=1)
    x, y = _batch()
    _step(model, opt, x, y)
    driver.remove()
    assert not lo._hooks and lo.frozen_names == []
    _step(model, opt, x, y)
    assert driver.step == 1 and _strengths(model) == [pytest.approx(0.25)] * 4


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 2.5}, "total_steps"),
        ({"total_steps": 4, "steps_per_epoch": 0}, "steps_per_epoch"),
        ({"total_steps": 4, "layerout": "lo"}, "steps_per_epoch"),
    ],
)
def test_drive_rejects_bad_arguments_by_name(kwargs, needle):
    model = _model()
    if kwargs.get("layerout") == "lo":
        kwargs["layerout"] = LayerOut().bind(model)
    with pytest.raises(ValueError, match=needle):
        timm_drop.drive(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    with pytest.raises(TypeError, match="Optimizer"):
        timm_drop.drive(model, object(), 4)
