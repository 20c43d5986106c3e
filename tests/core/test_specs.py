"""The paper specs in specs/ load, and plan on their target models with the site counts the papers imply."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import timm
import torch

import timm_drop
from timm_drop.spec import load_spec

SPEC_DIR = Path(__file__).resolve().parents[2] / "specs"
SPECS = sorted(p.name for p in SPEC_DIR.glob("*.yaml"))
EXPECTED_SPECS = {
    "dropblock_resnet50.yaml",
    "corrdrop_cifar_resnet.yaml",
    "selectscale_resnet.yaml",
    "selectscale_resnet50.yaml",
    "attentiondrop_resnet18.yaml",
    "spatial_dropout.yaml",
    "dropout.yaml",
    "droppath.yaml",
}


pytestmark = pytest.mark.usefixtures("one_thread")


_MODELS: dict[str, torch.nn.Module] = {}


def _model(name: str) -> torch.nn.Module:
    if not timm.is_model(name):
        pytest.skip(f"{name} is not registered in timm (timm_drop.models.cifar not available)")
    if name not in _MODELS:  # plan() is a dry run, so one instance serves every spec
        _MODELS[name] = timm.create_model(name, pretrained=False).eval()
    return _MODELS[name]


def _plan(spec: str, model_name: str, size: int):
    return timm_drop.plan(_model(model_name), SPEC_DIR / spec, example_input=torch.randn(1, 3, size, size))


def test_all_paper_specs_exist():
    assert EXPECTED_SPECS <= set(SPECS)


@pytest.mark.parametrize("spec", SPECS)
def test_spec_loads_and_cites_its_paper_section(spec):
    loaded = load_spec(SPEC_DIR / spec)
    assert loaded.rules
    text = (SPEC_DIR / spec).read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header, f"{spec} has no comment stating the paper placement it follows"
    assert any(w in " ".join(header) for w in ("Table", "section", "Algorithm")), spec
    # round trip: the loaded spec serialises to an equivalent spec
    assert load_spec(loaded.to_dict()).to_dict() == loaded.to_dict()


def _by(entries, key):
    return Counter(key(e) for e in entries)


def test_dropblock_resnet50_groups_3_4_four_sites_per_block():
    plan = _plan("dropblock_resnet50.yaml", "resnet50", 224)
    e = plan.entries
    # layer3: 6 bottlenecks, layer4: 3; each: after bn1, bn2, bn3 + the skip connection = 4 -> 36
    assert len(e) == 36
    assert _by(e, lambda x: x.kind) == {"norm": 27, "shortcut": 9}
    assert _by(e, lambda x: x.stage) == {3: 24, 4: 12}
    assert all(x.regularizer == "dropblock" and x.params["block_size"] == 7 for x in e)
    # TF reference: group 3 at a quarter of the rate; keep_prob 0.9 -> drop_prob 0.1 in group 4
    assert {x.params["drop_prob"] for x in e if x.stage == 3} == {0.025}
    assert {x.params["drop_prob"] for x in e if x.stage == 4} == {0.1}
    assert all("linear" in (x.schedule or "") for x in e)
    assert not any(".downsample" in x.module for x in e if x.kind == "norm")
    # the paper's feature-map sizes at 224: 14x14 in group 3 (after the first conv), 7x7 in group 4
    assert {tuple(x.shape[2:]) for x in e if x.stage == 3 and x.module != "layer3.0.bn1"} == {(14, 14)}
    assert {tuple(x.shape[2:]) for x in e if x.stage == 4 and x.module != "layer4.0.bn1"} == {(7, 7)}


def test_selectscale_resnet50_every_bn_of_groups_3_4_half_rate_in_group_3():
    e = _plan("selectscale_resnet50.yaml", "resnet50", 64).entries
    # every BN incl. the projection shortcut's: layer3 6*3+1 = 19, layer4 3*3+1 = 10
    assert _by(e, lambda x: x.stage) == {3: 19, 4: 10}
    assert {x.kind for x in e} == {"norm"}
    assert {x.params["q"] for x in e if x.stage == 3} == {0.4}
    assert {x.params["q"] for x in e if x.stage == 4} == {0.8}
    assert {x.params["top_rate"] for x in e} == {0.1}
    assert all("curriculum" in (x.schedule or "") for x in e)


@pytest.mark.parametrize(
    "spec,regularizer,drop_prob,count",
    [("spatial_dropout.yaml", "spatial_dropout", 0.1, 27), ("dropout.yaml", "dropout", 0.3, 27)],
)
def test_dropout_baselines_on_conv_branches_of_groups_3_4(spec, regularizer, drop_prob, count):
    e = _plan(spec, "resnet50", 64).entries
    assert len(e) == count  # 9 blocks x 3 BN, shortcuts excluded
    assert {(x.kind, x.regularizer, x.params["drop_prob"]) for x in e} == {("norm", regularizer, drop_prob)}
    assert _by(e, lambda x: x.stage) == {3: 18, 4: 9}


def test_droppath_baseline_on_group_4_residual_branches():
    e = _plan("droppath.yaml", "resnet50", 64).entries
    assert [(x.kind, x.stage) for x in e] == [("residual", 4)] * 3


@pytest.mark.parametrize("model_name,size", [("resnet18", 64), ("resnet18_cifar", 32)])
def test_attentiondrop_after_the_first_two_groups(model_name, size):
    e = _plan("attentiondrop_resnet18.yaml", model_name, size).entries
    assert [(x.kind, x.stage, x.module) for x in e] == [("stage", 1, "layer1"), ("stage", 2, "layer2")]
    assert all(x.params == {"drop_prob": 0.1, "top_rate": 0.2, "mode": "ad"} for x in e)


@pytest.mark.parametrize("model_name", ["resnet20_cifar", "resnet56_cifar", "resnet110_cifar"])
def test_corrdrop_after_each_group_with_block_sizes_9_7_5(model_name):
    e = _plan("corrdrop_cifar_resnet.yaml", model_name, 32).entries
    assert [(x.kind, x.stage, x.params["block_size"]) for x in e] == [
        ("stage", 1, 9),
        ("stage", 2, 7),
        ("stage", 3, 5),
    ]
    # the paper's map sizes after res_1..res_3 on CIFAR: 32, 16, 8
    assert [x.shape[-1] for x in e] == [32, 16, 8]
    assert {x.params["drop_prob"] for x in e} == {0.1}


@pytest.mark.parametrize(
    "model_name,convs",
    # ResNet-110 (option A shortcuts): stem + 54 blocks x 2 = 109; WRN-20-4 / WRN-28-10 (pre-act): stem +
    # 2 convs per block (3 / 4 blocks per group) + a 1x1 projection in the first block of each group
    [("resnet110_cifar", 109), ("wrn20_4_cifar", 22), ("wrn28_10_cifar", 28)],
)
def test_selectscale_after_every_conv_of_cifar_resnets_and_wrns(model_name, convs):
    model = _model(model_name)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == convs
    e = _plan("selectscale_resnet.yaml", model_name, 32).entries
    assert len(e) == convs
    assert {(x.kind, x.regularizer) for x in e} == {("module", "selectscale")}
    assert {x.module for x in e} == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
