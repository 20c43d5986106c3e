"""Placements by name: the papers' rules on every model family, through the public path users take."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import timm_drop
from timm_drop.placements import PLACEMENTS, PlacementError
from timm_drop.spec import SpecError, load_spec

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC_DIR = Path(__file__).resolve().parents[2] / "specs"
ALL = list(PLACEMENTS)
_MODELS: dict[str, torch.nn.Module] = {}


def _model(name: str) -> torch.nn.Module:
    if name not in _MODELS:  # plan() only reads the model
        _MODELS[name] = timm.create_model(name, pretrained=False).eval()
    return _MODELS[name]


def _table(p):
    """What a plan does, without the rule labels and source (which name the placement or the file)."""
    return [(e.site, e.kind, e.stage, e.regularizer, e.params, e.schedule, e.insertion) for e in p.entries]


def test_every_method_has_a_placement():
    assert set(ALL) == {"dropblock", "corrdrop", "selectscale", "selectout", "spatial_scale", "attentiondrop",
                        "spatial_dropout", "dropout", "droppath"}  # fmt: skip
    for p in PLACEMENTS.values():
        assert "../shared/papers/" in p.paper and p.rule


def test_dropblock_on_resnet50_is_the_papers_36_sites():
    m = _model("resnet50")
    by_name = timm_drop.plan(m, "dropblock")
    paper = timm_drop.plan(m, SPEC_DIR / "dropblock_resnet50.yaml")
    assert len(by_name.entries) == 36
    assert _table(by_name) == _table(paper)


@pytest.mark.parametrize("model", ["resnet20_cifar", "resnet56_cifar"])
def test_corrdrop_on_cifar_resnets_is_the_papers_configuration(model):
    m = _model(model)
    by_name = timm_drop.plan(m, "corrdrop")
    assert _table(by_name) == _table(timm_drop.plan(m, SPEC_DIR / "corrdrop_cifar_resnet.yaml"))
    assert [e.params["block_size"] for e in by_name.entries] == [9, 7, 5]


FAMILY_MODELS = {
    "cnn": ["resnet18", "convnext_atto", "regnetx_002", "efficientnet_b0", "mobilenetv3_small_050", "densenet121"],
    "transformer": ["pvt_v2_b0", "swin_tiny_patch4_window7_224"],
    "vit": ["vit_tiny_patch16_224", "deit_tiny_patch16_224"],
    "cifar": ["resnet20_cifar"],
}
#: (model, placement) pairs with no counterpart of the paper's rule, refused by name with the reason
REFUSED = {("densenet121", "droppath"): "no residual branch"}


@pytest.mark.parametrize(
    "model,family",
    [
        # attention under other names: ...Attn (Twins, CoaT, EdgeNeXt's cross-covariance attention), MHSA (ConViT)
        ("twins_svt_small", "transformer"),
        ("coat_lite_tiny", "transformer"),
        ("convit_tiny", "transformer"),
        ("edgenext_xx_small", "transformer"),
        # a CNN's "attention": selective kernels, and attention projected by 1x1 convs in a CNN stage
        ("skresnet18", "cnn"),
        ("botnet26t_256", "cnn"),
    ],
)
def test_family_follows_token_attention_whatever_its_class_is_called(model, family):
    description = timm_drop.placement_spec(_model(model), "dropblock").description
    assert description.startswith(f"dropblock on {model} ({family}):"), description


@pytest.mark.parametrize("family,model", [(f, m) for f, ms in FAMILY_MODELS.items() for m in ms])
def test_each_placement_plans_on_each_family(family, model):
    from timm_drop.placements import model_family
    from timm_drop.sites import analyze_model

    m = _model(model)
    analysis = analyze_model(m)
    assert model_family(m, analysis) == family
    rules = []
    for name in ALL:
        if (model, name) in REFUSED:
            with pytest.raises(PlacementError, match=rf"placement '{name}' on {model}.*{REFUSED[model, name]}"):
                timm_drop.placement_spec(m, name)
            continue
        spec = timm_drop.placement_spec(m, name, analysis=analysis)
        assert spec.source == f"placement {name!r}"
        rules += [{**r.to_dict(), "on_conflict": "stack"} for r in spec.rules]
    # one plan for all placements (stacked where they share a site): every rule places its regularizer
    entries = timm_drop.plan(m, {"rules": rules}).entries
    placed = {e.rule_label.split("'")[1].split(" ")[0] for e in entries}  # the label names the placement
    assert placed == {n for n in ALL if (model, n) not in REFUSED}
    for e in entries:  # relative block sizes are resolved per site to a size that fits the map
        if "block_size" in e.params:
            assert isinstance(e.params["block_size"], int) and e.params["block_size"] >= 1


@pytest.mark.parametrize("model", ["resnet18", "vit_tiny_patch16_224", "pvt_v2_b0"])
def test_a_name_plans_like_its_concrete_spec(model):
    m = _model(model)
    for name in ("dropblock", "selectscale", "droppath"):
        assert _table(timm_drop.plan(m, name)) == _table(timm_drop.plan(m, timm_drop.placement_spec(m, name)))


def test_late_groups_follow_the_stage_count():
    # the last two resolution groups: stages 3-4 of a 4-stage net, 4-5 of EfficientNet's 5
    assert timm_drop.placement_spec(_model("resnet18"), "dropblock").rules[0].stages == (3, 4)
    assert timm_drop.placement_spec(_model("efficientnet_b0"), "dropblock").rules[0].stages == (4, 5)
    # ViT: the paper's groups are quarters of the depth
    assert timm_drop.placement_spec(_model("vit_tiny_patch16_224"), "droppath").rules[0].stages == (10, 11, 12)


def test_placement_applies_and_trains_a_step():
    m = timm.create_model("convnext_atto", pretrained=False)
    timm_drop.apply_regularizer(m, "dropblock")
    m.train()
    m(torch.randn(2, 3, 64, 64)).sum().backward()
    assert len(timm_drop.applied_plans(m)[-1].entries) == 16
    timm_drop.strip_regularizers(m)


def test_dropblock_block_size_follows_the_input_size():
    m = _model("resnet18")
    sizes = {}
    for px in (32, 224, 384):
        p = timm_drop.plan(m, "dropblock", example_input=torch.randn(1, 3, px, px))
        sizes[px] = sorted({e.params["block_size"] for e in p.entries})
    assert sizes == {32: [1], 224: [7], 384: [12]}


# -- overrides: {"preset": name, **overrides} -------------------------------------------------------------
def test_override_strength_keeps_the_papers_group_factor():
    p = timm_drop.plan(_model("resnet50"), {"preset": "dropblock", "drop_prob": 0.2})
    assert {e.stage: e.params["drop_prob"] for e in p.entries} == {3: 0.05, 4: 0.2}


def test_override_stages_counted_from_the_end():
    m = _model("resnet50")
    last = timm_drop.plan(m, {"preset": "dropblock", "stages": [-1]})
    assert {e.stage for e in last.entries} == {4} and len(last.entries) == 12
    same = timm_drop.plan(m, {"preset": "dropblock", "stages": [4]})
    assert _table(last) == _table(same)


def test_override_as_yaml_text_and_stage_params_win():
    text = "{preset: dropblock, block_size: 3, stage_params: {-1: {drop_prob: 0.3}}}"
    p = timm_drop.plan(_model("resnet50"), text)
    assert {e.params["block_size"] for e in p.entries} == {3}
    assert {e.stage: e.params["drop_prob"] for e in p.entries} == {3: 0.025, 4: 0.3}


def test_unknown_placement_and_override_are_refused_by_name():
    m = _model("resnet18")
    with pytest.raises(SpecError, match=r"unknown placement 'dropblok'.*did you mean 'dropblock'"):
        timm_drop.plan(m, {"preset": "dropblok"})
    with pytest.raises(SpecError, match=r"'drop_rate' is not an override.*did you mean 'drop_prob'"):
        timm_drop.plan(m, {"preset": "dropblock", "drop_rate": 0.2})


def test_load_spec_of_a_name_says_it_needs_a_model():
    with pytest.raises(SpecError, match=r"'dropblock' is a placement by name.*placement_spec\(model, 'dropblock'\)"):
        load_spec("dropblock")


def test_placement_spec_is_a_concrete_spec_that_plans_the_same():
    m = _model("resnet50")
    spec = timm_drop.placement_spec(m, "selectscale")
    again = load_spec(spec.to_yaml())
    assert _table(timm_drop.plan(m, again)) == _table(timm_drop.plan(m, "selectscale"))
    # the paper's SelectScale ImageNet spec: every BN of groups 3-4, group 3 at half
    assert _table(timm_drop.plan(m, spec)) == _table(timm_drop.plan(m, SPEC_DIR / "selectscale_resnet50.yaml"))


# -- a name works wherever a spec does ---------------------------------------------------------------------
def test_create_model_with_a_placement_name_stores_the_concrete_spec():
    m = timm_drop.create_model("resnet18", spec="dropblock")
    assert len(timm_drop.applied_plans(m)[-1].entries) == 12
    stored = m.pretrained_cfg["timm_drop"]["spec"]
    assert stored["rules"][0]["regularizer"] == "dropblock" and stored["rules"][0]["stages"] == [3, 4]


def test_timm_create_model_registered_entrypoint_takes_a_name_with_overrides():
    m = timm.create_model("timm_drop_regularized", model="resnet18", spec={"preset": "droppath", "drop_prob": 0.2})
    assert [e.params["drop_prob"] for e in timm_drop.applied_plans(m)[-1].entries] == [0.2, 0.2]
    # train.py: --model timm_drop_regularized --model-kwargs model=resnet18 spec=droppath
    m = timm.create_model("timm_drop_regularized", model="resnet18", spec="droppath")
    assert [e.params["drop_prob"] for e in timm_drop.applied_plans(m)[-1].entries] == [0.1, 0.1]


def test_recipe_regularizer_accepts_a_placement():
    from timm_drop.training.config import ConfigError, TrainConfig, resolve_regularizer

    cfg = TrainConfig()
    cfg.regularizer = {"preset": "dropblock", "stages": [-1]}
    resolve_regularizer(cfg)  # kept as data: it becomes a spec when it meets the model
    assert cfg.regularizer == {"preset": "dropblock", "stages": [-1]}
    cfg.regularizer = "dropblock"
    resolve_regularizer(cfg)
    assert cfg.regularizer == {"preset": "dropblock"}
    cfg.regularizer = {"preset": "dropblok"}
    with pytest.raises(ConfigError, match=r"regularizer.*unknown placement 'dropblok'"):
        resolve_regularizer(cfg)


APPLY_MODELS = {"cnn": "resnet18", "transformer": "pvt_v2_b0", "vit": "deit_tiny_patch16_224", "cifar": "resnet20_cifar"}


@pytest.mark.parametrize("family", sorted(APPLY_MODELS))
def test_each_placement_applies_and_acts_in_training_on_each_family(family):
    """apply_regularizer(model, name), as a user calls it: every placement's regularizers run in a training step
    (none left unused) and change the output, and strip_regularizers gives the model back."""
    import copy
    import warnings

    base = timm.create_model(APPLY_MODELS[family], pretrained=False).eval()
    size = (1, *base.pretrained_cfg["input_size"])
    x = torch.randn(2, *size[1:])
    with torch.no_grad():
        clean = base(x)
    for name in ALL:
        if (APPLY_MODELS[family], name) in REFUSED:
            continue
        m = copy.deepcopy(base)
        assert timm_drop.apply_regularizer(m, name) is m
        assert timm_drop.applied_plans(m)[-1].entries, name
        timm_drop.set_progress(m, 1.0)  # the end of each schedule: full strength
        m.train()
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a rule that ran at none of its sites warns
            out = m(x)
        out.sum().backward()
        assert not torch.equal(out, clean), name  # eval-mode BN would agree; the regularizers act
        timm_drop.strip_regularizers(m)  # (the training step moved BN statistics: the module tree is compared)
        assert [(n, type(c)) for n, c in m.named_modules()] == [(n, type(c)) for n, c in base.named_modules()]
