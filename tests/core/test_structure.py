"""timm_drop.structure: one answer per question about a timm model, shared by sites, rewrite and LayerOut."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import timm_drop
from timm_drop import structure
from timm_drop.layerout import LayerOut


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet18", {}),
        ("convnext_atto", {}),  # stages with a downsample beside their blocks container
        ("efficientnet_b0", {}),  # blocks.3 / blocks.5 are not feature_info modules
        ("regnetx_002", {}),  # repeated composite children b1..bN
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 3}),
    ],
)
def test_spec_blocks_and_layerout_blocks_are_the_same_modules(name, kwargs):
    model = timm.create_model(name, pretrained=False, **kwargs)
    spec = {"rules": [{"regularizer": "dropout", "params": {"drop_prob": 0.1}, "sites": ["block"]}]}
    spec_blocks = [e.module for e in timm_drop.plan(model, spec).entries]
    units = LayerOut(unit="block").bind(model).unit_names
    assert spec_blocks and units == spec_blocks


def test_layerout_block_units_on_the_meta_device():
    with torch.device("meta"):
        model = timm.create_model("resnet20_cifar")
    assert LayerOut(unit="block").bind(model).unit_names == [
        f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)
    ]


def test_one_wrapper_detection_for_the_rewriter_and_layerout(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2))
    compiled = torch.compile(model, backend="eager")
    assert structure.wrapper_kind(compiled) == "compiled"
    assert structure.wrapper_kind(nn.DataParallel(model)) == "data_parallel"
    assert structure.unwrap(compiled) == (model, False, True)
    assert structure.unwrap(nn.DataParallel(model)) == (model, False, False)
    assert structure.wrapper_kind(model) is None


def test_names_are_matched_whole_with_globs_or_regexes_everywhere():
    model = timm.create_model("resnet18", pretrained=False)
    assert structure.match_pattern("layer1", "layer1") and not structure.match_pattern("layer1", "layer10")
    # LayerOut's unit names follow the spec's pattern rules, regexes included
    lo = LayerOut(unit=["re:layer[12]\\.0\\.conv1"]).bind(model)
    assert lo.unit_names == ["layer1.0.conv1", "layer2.0.conv1"]
