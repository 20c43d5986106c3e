"""Create by name (timm_drop.create_model / timm.create_model('timm_drop_regularized', ...)); the spec travels
with the model through save_for_hf and local-dir loading."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

import timm_drop
from timm_drop.create import CFG_KEY, REGISTERED_NAME
from timm_drop.regularizers import Regularizer

SPEC = {
    "rules": [
        {
            "regularizer": "dropblock",
            "label": "db",
            "params": {"drop_prob": 0.2, "block_size": 3},
            "sites": ["stage"],
            "stages": [3, 4],
            "schedule": {"kind": "linear", "start": 0.0, "end": 1.0},
        },
        {"regularizer": "droppath", "params": {"drop_prob": 0.1}, "sites": ["residual"]},
    ]
}


def _table(model: nn.Module) -> list[tuple]:
    return [(e.site, e.regularizer, e.params, e.schedule, e.insertion) for e in model._timm_drop_plan.entries]


def _eval_out(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return model.eval()(torch.rand(2, 3, 32, 32))


def test_create_model_builds_the_timm_model_with_the_spec_applied():
    model = timm_drop.create_model("resnet10t", spec=SPEC, num_classes=5)
    bare = timm.create_model("resnet10t", num_classes=5)
    assert type(model) is type(bare) and model.num_classes == 5
    assert set(model.state_dict()) == set(bare.state_dict())
    assert {e.regularizer for e in model._timm_drop_plan.entries} == {"dropblock", "droppath"}
    assert _table(model) == _table(timm_drop.apply_regularizer(bare, SPEC))
    assert model.pretrained_cfg["architecture"] == REGISTERED_NAME
    assert model.pretrained_cfg[CFG_KEY]["model"] == "resnet10t"
    assert timm_drop.load_spec(model.pretrained_cfg[CFG_KEY]["spec"]) == timm_drop.load_spec(SPEC)


def test_unmodified_script_can_build_it_with_timm_create_model_and_kwargs(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(timm_drop.load_spec(SPEC).to_yaml())
    model = timm.create_model(REGISTERED_NAME, model="resnet10t", spec=str(path), num_classes=3)
    assert len(model._timm_drop_plan.entries) == len(timm_drop.create_model("resnet10t", SPEC, num_classes=3)._timm_drop_plan.entries)
    with pytest.raises(ValueError, match="model="):
        timm.create_model(REGISTERED_NAME, spec=SPEC)
    with pytest.raises(ValueError, match="spec="):
        timm.create_model(REGISTERED_NAME, model="resnet10t")


def test_pretrained_weights_load_before_the_rewrite(tmp_path):
    donor = timm.create_model("resnet10t", num_classes=4)
    ckpt = tmp_path / "weights.pth"
    torch.save(donor.state_dict(), ckpt)
    model = timm_drop.create_model(
        "resnet10t", spec=SPEC, pretrained=True, num_classes=4, pretrained_cfg_overlay={"file": str(ckpt), "num_classes": 4}
    )
    for k, v in donor.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    torch.testing.assert_close(_eval_out(model), _eval_out(donor))


def test_save_for_hf_then_local_dir_rebuilds_the_same_regularized_model(tmp_path):
    from timm.models import save_for_hf

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(timm_drop.load_spec(SPEC).to_yaml())
    model = timm.create_model(REGISTERED_NAME, model="resnet10t", spec=str(spec_file), num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # weights differ from any fresh init
    save_for_hf(model, tmp_path / "saved")
    spec_file.unlink()  # the folder carries the spec by value
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architecture"] == REGISTERED_NAME

    for load in (timm.create_model, timm_drop.create_model):
        again = load(f"local-dir:{tmp_path / 'saved'}", pretrained=True)
        assert _table(again) == _table(model)
        for k, v in model.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k
        torch.testing.assert_close(_eval_out(again), _eval_out(model))
        regs = [m for m in again.modules() if isinstance(m, Regularizer)]
        assert regs and all(r.training is False for r in regs)  # eval'd by _eval_out; still there
        again.train()
        torch.manual_seed(1)
        x = torch.rand(2, 3, 32, 32)
        assert not torch.equal(again(x), again(x))  # it still regularizes


def test_model_by_name_with_schedule_steps_moves_in_a_loop_that_never_calls_timm_drop():
    model = timm.create_model(REGISTERED_NAME, model="resnet10t", spec=SPEC, schedule_steps=4, num_classes=3)
    assert model.pretrained_cfg[CFG_KEY]["spec"]["rules"][0]["schedule"]["steps"] == 4
    scheduled = [m for m in model.modules() if isinstance(m, Regularizer) and m.schedule is not None]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    seen = []
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):  # a plain loop: forward, backward, step; no timm_drop call
            nn.functional.cross_entropy(model(torch.rand(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
            opt.step()
            opt.zero_grad()
            seen.append(scheduled[0].strength.item())
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError, match="schedule_steps"):
        timm_drop.create_model("resnet10t", SPEC, schedule_steps=0)
