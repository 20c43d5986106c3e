"""A timm model inside someone else's wrapper gets its stage numbering (issue 18, item 7).

segmentation_models_pytorch's ``Unet("tu-resnet18")`` holds a timm ``features_only`` model at ``encoder.model``;
the wrapper itself has no ``feature_info``. A ``stages:`` rule applied to the wrapper numbers the stages of the one
timm model inside it (the plan says which), and with several timm models inside the error names them.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import timm_drop
from timm_drop.rewrite import RewriteError

smp = pytest.importorskip("segmentation_models_pytorch", reason="segmentation-models-pytorch is a dev extra")

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = {
    "rules": [
        {"regularizer": "dropblock", "params": {"drop_prob": 0.3, "block_size": 3}, "sites": ["stage"],
         "stages": [3, 4], "label": "db"}
    ]
}  # fmt: skip


def test_stage_rule_on_a_segmentation_models_unet_numbers_the_timm_encoders_stages():
    torch.manual_seed(0)
    unet = smp.Unet("tu-resnet18", encoder_weights=None, classes=2)
    plain = copy.deepcopy(unet).eval()
    the_plan = timm_drop.plan(unet, SPEC)
    assert [e.site for e in the_plan.entries] == ["stage:encoder.model.layer3", "stage:encoder.model.layer4"]
    assert "stages: feature_info of encoder.model (FeatureListNet)" in str(the_plan)
    timm_drop.apply_regularizer(unet, SPEC)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(unet.eval()(x), plain(x))
        unet.train()
        torch.manual_seed(1)
        a = unet(x)
        torch.manual_seed(2)
        assert not torch.equal(a, unet(x))


class _TwoBackbones(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rgb = timm.create_model("resnet10t", features_only=True)
        self.depth = timm.create_model("resnet10t", features_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rgb(x)[-1] + self.depth(x)[-1]


def test_stage_rule_on_a_wrapper_of_several_timm_models_names_them():
    with pytest.raises(RewriteError, match=r"holds several timm models \(rgb, depth\).*name: \['rgb\.\*'\]"):
        timm_drop.plan(_TwoBackbones(), SPEC)
    # and a name selector picks one
    spec = copy.deepcopy(SPEC)
    spec["rules"][0]["sites"] = ["module"]
    spec["rules"][0]["name"] = ["rgb.layer3", "rgb.layer4"]
    del spec["rules"][0]["stages"]
    assert [e.module for e in timm_drop.plan(_TwoBackbones(), spec).entries] == ["rgb.layer3", "rgb.layer4"]
