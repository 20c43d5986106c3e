"""Stage numbers counted from the end (``stages: [-2, -1]`` = the last two) and block sizes relative to each
site's map (``block_size: {fraction: 0.5}``), through the public ``plan``."""

from __future__ import annotations

import pytest
import timm
import torch

import timm_drop
from timm_drop.spec import SpecError, load_spec

pytestmark = pytest.mark.usefixtures("one_thread")

_MODELS: dict[str, torch.nn.Module] = {}


def _model(name: str) -> torch.nn.Module:
    if name not in _MODELS:  # plan() only reads the model
        _MODELS[name] = timm.create_model(name, pretrained=False).eval()
    return _MODELS[name]


def _rule(stages, stage_params=None, **params):
    rule = {"regularizer": "dropblock", "params": {"drop_prob": 0.1, "block_size": 3, **params}, "sites": ["stage"]}
    rule["stages"] = stages
    if stage_params is not None:
        rule["stage_params"] = stage_params
    return {"rules": [rule]}


def _table(p):
    return [(e.site, e.stage, e.params) for e in p.entries]


@pytest.mark.parametrize(
    "model,negative,positive",
    [
        ("resnet18", [-2, -1], [3, 4]),  # 4 stages
        ("resnet20_cifar", [-2, -1], [2, 3]),  # 3 stages
        ("efficientnet_b0", [-2, -1], [4, 5]),  # 5 stages
        ("resnet18", [-4], [1]),
    ],
)
def test_negative_stages_equal_their_positive_equivalents(model, negative, positive):
    m = _model(model)
    neg = timm_drop.plan(m, _rule(negative, {negative[0]: {"drop_prob": 0.025}}))
    pos = timm_drop.plan(m, _rule(positive, {positive[0]: {"drop_prob": 0.025}}))
    assert _table(neg) == _table(pos)
    assert [e.stage for e in neg.entries] == positive
    assert neg.entries[0].params["drop_prob"] == 0.025


def test_negative_stage_params_key_with_positive_stages():
    m = _model("resnet18")
    mixed = timm_drop.plan(m, _rule([3, 4], {-2: {"drop_prob": 0.025}}))
    assert [e.params["drop_prob"] for e in mixed.entries] == [0.025, 0.1]


def test_negative_stages_load_from_yaml_and_round_trip():
    spec = load_spec("rules:\n- {regularizer: dropout, params: {drop_prob: 0.1}, sites: stage, stages: [-2, -1],"
                     " stage_params: {'-2': {drop_prob: 0.05}}}\n")
    assert spec.rules[0].stages == (-2, -1)
    assert dict(spec.rules[0].stage_params) == {-2: {"drop_prob": 0.05}}
    assert load_spec(spec.to_dict()).to_dict() == spec.to_dict()


def test_stage_zero_is_refused_by_name():
    with pytest.raises(SpecError, match=r"stages\[0\].*0"):
        load_spec(_rule([0, 1]))


def test_stage_beyond_the_model_is_refused_naming_the_count():
    with pytest.raises(ValueError, match=r"stage -5.*4 stages"):
        timm_drop.plan(_model("resnet18"), _rule([-5]))


def test_same_stage_twice_through_both_signs_is_refused():
    with pytest.raises(ValueError, match=r"stage_params.*4"):
        timm_drop.plan(_model("resnet18"), _rule([4], {4: {"drop_prob": 0.2}, -1: {"drop_prob": 0.3}}))


# -- block sizes relative to the site's map ------------------------------------------------------------
def _sizes(model, spec, size):
    p = timm_drop.plan(model, spec, example_input=torch.randn(1, 3, size, size))
    return [e.params["block_size"] for e in p.entries]


def test_relative_block_size_follows_the_map_at_32_224_384():
    spec = _rule([-2, -1], {-2: {"block_size": {"fraction": 0.5}}, -1: {"block_size": {"fraction": 1.0}}})
    m = _model("resnet18")
    assert _sizes(m, spec, 224) == [7, 7]  # the paper's 7 at 14x14 and 7x7
    assert _sizes(m, spec, 32) == [1, 1]  # 2x2 and 1x1 maps
    assert _sizes(m, spec, 384) == [12, 12]  # 24x24 and 12x12


def test_relative_block_size_resolves_at_the_models_input_size_by_default():
    # the shape pass runs on a small input; the plan resolves at the model's configured 224 px
    spec = _rule([-2, -1], {-2: {"block_size": {"fraction": 0.5}}, -1: {"block_size": {"fraction": 1.0}}})
    p = timm_drop.plan(_model("resnet18"), spec)
    assert [e.params["block_size"] for e in p.entries] == [7, 7]
    assert "block_size=7" in str(p)


def test_relative_block_size_on_a_vit_token_grid():
    m = _model("vit_tiny_patch16_224")
    p = timm_drop.plan(m, _rule([-1], block_size={"fraction": 0.5}))
    assert p.entries[0].params["block_size"] == 7  # half of the 14x14 patch grid


@pytest.mark.parametrize("bad", [{"fraction": 0}, {"fraction": 1.5}, {"fraction": "half"}, {"frac": 0.5}])
def test_bad_relative_block_size_is_refused_naming_the_field(bad):
    with pytest.raises(SpecError, match=r"params\.block_size"):
        load_spec(_rule([-1], block_size=bad))
