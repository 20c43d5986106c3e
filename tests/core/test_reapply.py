"""Models that are not a fresh timm classifier: rewritten already, plain containers, features_only wrappers,
configs whose input differs from the first conv, and models on the meta device (issue 7, items 4-6 and 10)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import timm_drop
from timm_drop.regularizers.base import Regularizer


def _rule(reg, sites, **kw):
    return {"regularizer": reg, "params": {"drop_prob": 0.3}, "sites": sites, **kw}


def _regs(model):
    return [m for m in model.modules() if isinstance(m, Regularizer)]


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("kind", ["residual", "shortcut", "merge", "norm"])
def test_a_rewritten_model_can_be_planned_and_stacked_again(kind):
    model = timm.create_model("test_resnet", pretrained=False, zero_init_last=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    text, keys = repr(model), list(model.state_dict())
    timm_drop.apply_regularizer(model, {"rules": [_rule("dropout", [kind], stages=[2])]})
    first = len(_regs(model))
    # a second look at the rewritten model sees the same sites, and a second rule goes on top
    again = timm_drop.plan(model, {"rules": [_rule("droppath", ["residual"])]})
    assert len(again) > 0 and {e.insertion for e in again.entries} == {"rewrite"}
    timm_drop.apply_regularizer(model, {"rules": [_rule("droppath", ["residual"])]}, stack=True)
    assert len(_regs(model)) == first + len(again)
    assert list(model.state_dict()) == keys
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(model.eval()(x), expected)
        torch.manual_seed(0)
        a = model.train()(x)
        torch.manual_seed(1)
        assert not torch.equal(a, model(x))
    model.load_state_dict(state)  # undo the BN statistics the train forwards moved
    timm_drop.strip_regularizers(model)
    assert repr(model) == text and not _regs(model) and _hooks(model) == 0
    with torch.no_grad():
        assert torch.equal(model.eval()(x), expected)


def _plain_sequential():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
    )


@pytest.mark.parametrize("sites", [["module"], ["norm"]])
def test_plain_sequential_with_a_hook_site_still_runs(sites):
    model = _plain_sequential()
    x = torch.randn(2, 3, 16, 16)
    keys = list(model.state_dict())
    text = repr(model)
    with torch.no_grad():
        expected = model.eval()(x)
    timm_drop.apply_regularizer(model, {"rules": [_rule("dropout", sites, name=["1", "2"])]})
    assert _regs(model) and list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model.eval()(x), expected)
        assert not torch.equal(model.train()(x), model.eval()(x))
    timm_drop.strip_regularizers(model)
    assert repr(model) == text and _hooks(model) == 0


def test_features_only_wrapper_with_hook_sites_still_runs():
    model = timm.create_model("resnet18", pretrained=False, features_only=True).eval()
    x = torch.randn(2, 3, 64, 64)
    keys = list(model.state_dict())
    with torch.no_grad():
        expected = model(x)
    timm_drop.apply_regularizer(model, {"rules": [_rule("dropout", ["module"], name=["layer1", "layer2.0"])]})
    assert len(_regs(model)) == 2 and list(model.state_dict()) == keys
    with torch.no_grad():
        out = model(x)
    assert len(out) == len(expected) and all(torch.equal(a, b) for a, b in zip(out, expected))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x)[1], expected[1])
    timm_drop.strip_regularizers(model)
    assert not _regs(model) and _hooks(model) == 0


def test_default_input_takes_channels_from_the_config_not_the_first_conv():
    # TResNet's space-to-depth stem feeds its first conv 48 channels; the config says 3
    model = timm.create_model("tresnet_m", pretrained=False, layers=[1, 1, 1, 1])
    p = timm_drop.plan(model, {"rules": [_rule("dropout", ["stage"])]})
    assert p.input_shape[1] == 3 and len(p) == 4


def test_default_input_follows_in_chans_when_the_config_does_not():
    # timm keeps pretrained_cfg['input_size'] at 3 channels when in_chans changes the first conv
    model = timm.create_model("resnet18", pretrained=False, in_chans=1)
    assert timm_drop.plan(model, {"rules": [_rule("dropout", ["stage"])]}).input_shape[1] == 1


def test_meta_device_model_is_planned_and_applied_without_materialising_it():
    # issue 18: transformers' from_pretrained and FSDP build models on the meta device (tests/core/test_meta_device.py
    # materialises and trains them)
    with torch.device("meta"):
        model = timm.create_model("resnet18", pretrained=False)
    assert len(timm_drop.plan(model, {"rules": [_rule("droppath", ["residual"])]})) == 8
    timm_drop.apply_regularizer(model, {"rules": [_rule("droppath", ["residual"])]})
    assert len(_regs(model)) == 8
    assert all(t.is_meta for t in model.parameters())
