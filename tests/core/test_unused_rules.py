"""A rule none of whose sites ran in training warns once, naming the rule and the likely cause (issue 18, item 2).

The net under every way a host can bypass a regularizer: a hooked module replaced after the apply, a host that
runs only part of the model. The normal paths stay quiet: eval-only use, training the classifier, a
``features_only`` backbone, a feature extractor built around the regularized model, timm's EMA copy.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from timm.layers import convert_sync_batchnorm

import timm_drop

pytestmark = pytest.mark.usefixtures("one_thread")


def _rule(label: str, sites: list[str], **selectors) -> dict:
    return {"regularizer": "dropout", "params": {"drop_prob": 0.2}, "sites": sites, "label": label, **selectors}


def _step(model: torch.nn.Module, x: torch.Tensor, call=None) -> None:
    out = (call or model)(x)
    out = out if isinstance(out, torch.Tensor) else torch.cat([o.flatten(1) for o in out], 1)
    out.square().mean().backward()


def test_a_rule_whose_hooked_module_was_replaced_warns_once_naming_the_cause():
    # ResNet's stem norm is called by the model root: hooked on the norm itself, which SyncBN conversion replaces
    model = timm.create_model("resnet18", num_classes=10)
    timm_drop.apply_regularizer(model, {"rules": [_rule("stem", ["norm"], name="bn1"), _rule("all", ["stage"])]})
    model = convert_sync_batchnorm(model).train()
    x = torch.randn(2, 3, 64, 64)
    with pytest.warns(UserWarning, match=r"'stem' ran at none of its 1 site\(s\) \(norm:bn1\).*bn1 no longer carries"):
        _step(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(model, x)  # once


def test_a_host_that_runs_only_part_of_the_model_hears_about_the_rule_it_skips():
    model = timm.create_model("resnet18", num_classes=10)
    timm_drop.apply_regularizer(model, {"rules": [_rule("head", ["module"], name="fc"), _rule("all", ["stage"])]})
    model.train()
    x = torch.randn(2, 3, 64, 64)
    _step(model, x, model.forward_features)  # the model itself is never called: seen at the next forward
    with pytest.warns(UserWarning, match=r"'head' ran at none.*module:fc.*did not call fc.*forward_features"):
        _step(model, x, model.forward_features)


def _quiet(fn) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="timm_drop: .*ran at none")
        fn()


SPEC = {"rules": [_rule("stages", ["stage"]), _rule("residuals", ["residual"], stages=[4])]}


def test_normal_paths_do_not_warn():
    x = torch.randn(2, 3, 64, 64)
    model = timm_drop.apply_regularizer(timm.create_model("resnet18", num_classes=10), SPEC)

    def eval_only():
        with torch.no_grad():
            for _ in range(3):
                model.eval()(x)

    def train():
        model.train()
        for _ in range(3):
            _step(model, x)

    def ema_copy():
        ema = copy.deepcopy(model).train()
        for _ in range(2):
            _step(ema, x)

    def backbone():
        net = timm_drop.apply_regularizer(timm.create_model("resnet18", features_only=True), SPEC).train()
        for _ in range(2):
            _step(net, x)

    def extractor_around_the_model():
        net = timm_drop.apply_regularizer(timm.create_model("resnet18", num_classes=10), SPEC)
        features = timm.models.FeatureListNet(net, out_indices=(1, 2, 3, 4)).train()
        for _ in range(2):
            _step(features, x)

    for path in (eval_only, train, ema_copy, backbone, extractor_around_the_model):
        _quiet(path)
