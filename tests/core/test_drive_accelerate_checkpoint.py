"""A driver registered with ``accelerator.register_for_checkpointing(driver)`` resumes its schedule through
Accelerate's own ``save_state`` / ``load_state`` (the route the drive docs name), with a real Accelerator on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import timm_drop
from timm_drop.regularizers import Regularizer

accelerate = pytest.importorskip("accelerate")

SPEC = {
    "rules": [
        {
            "regularizer": "dropout",
            "params": {"drop_prob": 0.4},
            "sites": "module",
            "name": "0",
            "schedule": {"kind": "linear", "start": 0.0, "end": 1.0},
        }
    ]
}


def _run(total_steps: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model = timm_drop.apply_regularizer(model, SPEC, example_input=torch.randn(2, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, opt)
    driver = timm_drop.drive(model, opt, total_steps)
    accelerator.register_for_checkpointing(driver)
    return accelerator, model, opt, driver


def _strength(model: nn.Module) -> float:
    (reg,) = [m for m in model.modules() if isinstance(m, Regularizer)]
    return float(reg.strength)


def test_register_for_checkpointing_resumes_the_drivers_schedule(tmp_path):
    accelerator, model, opt, driver = _run(total_steps=8)
    model.train()
    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert driver.step == 3 and _strength(model) == pytest.approx(3 / 8)
    accelerator.save_state(str(tmp_path / "ckpt"))

    accelerator2, model2, _, driver2 = _run(total_steps=8)
    assert driver2.step == 0 and _strength(model2) == 0.0
    accelerator2.load_state(str(tmp_path / "ckpt"))
    assert driver2.step == 3 and _strength(model2) == pytest.approx(3 / 8)
