"""Backbones for detection and segmentation: specs on timm's ``features_only`` models (issue 10).

A ``features_only`` model is one of timm's feature wrappers (``FeatureListNet``, ``FeatureDictNet``,
``FeatureHookNet``, ``FeatureGetterNet``, the FX ``FeatureGraphNet``) or a model's own ``*Features`` class. Each
must take the same spec as the classifier of the same architecture: same stage numbering, regularizing in train
mode, bit-identical in eval, stripped cleanly, with ``feature_info``, ``out_indices`` and the output structure
(list or dict) unchanged.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import timm_drop

pytestmark = pytest.mark.usefixtures("one_thread")


def stage_spec(regularizer: str = "dropblock", stages=(3, 4), **params) -> dict:
    params = params or ({"drop_prob": 0.3, "block_size": 3} if regularizer == "dropblock" else {"drop_prob": 0.3})
    return {"rules": [{"regularizer": regularizer, "params": params, "sites": ["stage"], "stages": list(stages)}]}


DROPBLOCK_34 = stage_spec()
# ViT tokens: a token-wise method (DropBlock acts on maps); NLC sites are (B, L, C)
TOKENS_34 = stage_spec("dropout")


def create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs)


def _flat(out) -> list[torch.Tensor]:
    return list(out.values()) if isinstance(out, dict) else list(out)


def _structure(out):
    if isinstance(out, dict):
        return ("dict", tuple(out), tuple(tuple(v.shape) for v in out.values()))
    return (type(out).__name__, tuple(tuple(v.shape) for v in out))


def _hooks(model: torch.nn.Module) -> dict[str, int]:
    return {
        n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()
    }


def check_backbone(name: str, spec: dict, size=(64, 64), clean: int | None = None, **kwargs) -> torch.nn.Module:
    """Apply ``spec`` with default arguments to a features_only ``name`` and check every guarantee.

    ``clean``: how many leading outputs come before the first regularized stage (bit-identical to the unmodified
    backbone in train mode too); default: all but the last two.
    """
    ref = create(name, features_only=True, **kwargs)
    model = create(name, features_only=True, **kwargs)
    cls = type(model)
    info = copy.deepcopy(model.feature_info.get_dicts())
    indices = tuple(model.feature_info.out_indices)
    keys = set(model.state_dict())
    structure_modules = {n: type(m) for n, m in model.named_modules()}
    hooks = _hooks(model)

    assert timm_drop.apply_regularizer(model, spec) is model
    assert type(model) is cls
    assert model.feature_info.get_dicts() == info and tuple(model.feature_info.out_indices) == indices
    assert set(model.state_dict()) == keys
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref.eval(), model.eval()
        y_ref, y = ref(x), model(x)
        assert _structure(y) == _structure(y_ref)
        for a, b in zip(_flat(y), _flat(y_ref)):
            assert torch.equal(a, b), f"{name}: eval output differs from the unmodified backbone"
        ref.train(), model.train()
        torch.manual_seed(1)  # the same draws for any randomness of the backbone itself (Swin's drop_path)
        r = _flat(ref(x))
        torch.manual_seed(1)
        a = _flat(model(x))
        torch.manual_seed(2)
        b = _flat(model(x))
    clean = len(r) - 2 if clean is None else clean
    for i in range(len(r)):
        if i < clean:
            assert torch.equal(a[i], r[i]), f"{name}: output {i} (before the regularized stages) changed"
        else:
            assert not torch.equal(a[i], b[i]), f"{name}: output {i} is not regularized in train mode"

    assert timm_drop.strip_regularizers(model) is model
    assert {n: type(m) for n, m in model.named_modules()} == structure_modules
    assert _hooks(model) == hooks and set(model.state_dict()) == keys
    with torch.no_grad():
        model.train()
        torch.manual_seed(3)
        stripped = _flat(model(x))
        torch.manual_seed(3)
        for p, q in zip(stripped, _flat(ref(x))):
            assert torch.equal(p, q), f"{name}: strip did not restore the backbone"
    return model


# ---------------------------------------------------------------------------------------------------------
# the issue's table
# ---------------------------------------------------------------------------------------------------------
TABLE = [
    ("resnet18", DROPBLOCK_34, {}, {}),  # side container was iterated by FeatureListNet
    ("convnext_atto", DROPBLOCK_34, {}, {}),  # feature_info names stages.N, the wrapper holds stages_N
    ("vit_tiny_patch16_224", TOKENS_34, {"img_size": 32}, {"clean": 0}),  # FeatureGetterNet
    # EfficientNetFeatures (worked already): five stages (blocks.0 is stage 1), so stage 5 follows too
    ("efficientnet_b0", DROPBLOCK_34, {}, {"clean": 2}),
]


@pytest.mark.parametrize("name,spec,kwargs,check", TABLE, ids=[t[0] for t in TABLE])
def test_issue_table_features_only_backbone_takes_a_stage_spec(name, spec, kwargs, check):
    size = (kwargs["img_size"],) * 2 if "img_size" in kwargs else (64, 64)
    check_backbone(name, spec, size=size, **check, **kwargs)


@pytest.mark.parametrize("name,spec,kwargs,check", TABLE, ids=[t[0] for t in TABLE])
def test_features_only_stage_numbering_is_the_classifiers(name, spec, kwargs, check):
    """Stage k of the backbone is stage k of the classifier: same stages, channels and shapes in the plan."""

    def stages(model):
        x = torch.randn(1, 3, *((kwargs["img_size"],) * 2 if "img_size" in kwargs else (64, 96)))
        entries = timm_drop.plan(model, stage_spec("dropout", stages=(1, 2, 3, 4)), example_input=x).entries
        return [(e.stage, e.shape) for e in entries]

    backbone = stages(create(name, features_only=True, **kwargs))
    assert [s for s, _ in backbone] == [1, 2, 3, 4]
    assert backbone == stages(create(name, **kwargs))


# ---------------------------------------------------------------------------------------------------------
# every timm feature wrapper
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "feature_cls,expected", [("list", "FeatureListNet"), ("dict", "FeatureDictNet"), ("hook", "FeatureHookNet")]
)
def test_every_feature_wrapper_takes_a_stage_spec(feature_cls, expected):
    model = check_backbone("resnet18", DROPBLOCK_34, feature_cls=feature_cls)
    assert type(model).__name__ == expected


def test_fx_feature_wrapper_is_refused_by_name_and_left_unchanged():
    """``feature_cls='fx'`` holds a traced graph that never calls its stage modules: hooks there would be a silent
    no-op. The error says to apply first and build the graph afterwards (tested below)."""
    model = create("resnet18", features_only=True, feature_cls="fx")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(timm_drop.RewriteError, match="FX GraphModule.*apply regularizers to the model first"):
        timm_drop.apply_regularizer(model, DROPBLOCK_34)
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_out_indices_subset_keeps_its_outputs_and_numbering():
    # stages 3 and 4 of resnet18 are outputs 0 and 1 when only they are asked for
    model = check_backbone("resnet18", DROPBLOCK_34, clean=0, out_indices=(3, 4))
    assert tuple(model.feature_info.out_indices) == (3, 4)


def test_feature_getter_wrapper_of_a_vit_regularizes_only_from_the_selected_stage():
    # stage = block for a ViT; out_indices (9, 10, 11) all follow block 3
    model = check_backbone("vit_tiny_patch16_224", TOKENS_34, size=(32, 32), clean=0, img_size=32)
    assert type(model).__name__ == "FeatureGetterNet"


# ---------------------------------------------------------------------------------------------------------
# classifier first, backbone derived afterwards
# ---------------------------------------------------------------------------------------------------------
def test_features_only_from_create_model_starts_without_regularizers_of_an_earlier_classifier():
    """timm's ``features_only=True`` builds a fresh model: a spec applied to a classifier does not carry over;
    apply it to the backbone (README: "Backbones")."""
    clf = timm_drop.apply_regularizer(create("resnet18"), DROPBLOCK_34)
    assert any(isinstance(m, timm_drop.Regularizer) for m in clf.modules())
    backbone = create("resnet18", features_only=True)
    assert not any(isinstance(m, timm_drop.Regularizer) for m in backbone.modules())
    timm_drop.apply_regularizer(backbone, DROPBLOCK_34)  # and the same spec applies to it


@pytest.mark.parametrize("wrapper", ["FeatureListNet", "FeatureDictNet", "FeatureHookNet", "FeatureGraphNet"])
def test_wrapping_a_rewritten_classifier_keeps_its_regularizers_and_their_mode(wrapper):
    """``timm.models.FeatureListNet(model)`` & co. on a rewritten classifier: the regularizers come along, act on
    the stage outputs the wrapper returns, follow the wrapper's ``train()`` / ``eval()``, and the wrapper's forward
    never calls timm_drop's own modules. ``FeatureGraphNet`` traces the rewritten model (timm_drop.fx)."""
    from timm.models import _features, _features_fx

    module = _features_fx if wrapper == "FeatureGraphNet" else _features
    ref = create("resnet18", zero_init_last=False)
    clf = timm_drop.apply_regularizer(create("resnet18", zero_init_last=False), DROPBLOCK_34)
    kwargs = {"out_indices": (1, 2, 3, 4)}
    wrapped = getattr(module, wrapper)(clf, **kwargs)
    wrapped_ref = getattr(module, wrapper)(ref, **kwargs)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        wrapped.eval(), wrapped_ref.eval()
        for a, b in zip(_flat(wrapped(x)), _flat(wrapped_ref(x))):
            assert torch.equal(a, b)
        wrapped.train()
        torch.manual_seed(1)
        a = _flat(wrapped(x))
        torch.manual_seed(2)
        b = _flat(wrapped(x))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[2], b[2]) and not torch.equal(a[3], b[3])


# ---------------------------------------------------------------------------------------------------------
# family matrix: tiny variants, small inputs
# ---------------------------------------------------------------------------------------------------------
FAMILIES = [
    ("regnetx_002", DROPBLOCK_34, {}, {}),
    # Swin stages are NHWC; a tiny config keeps it fast
    (
        "swin_tiny_patch4_window7_224",
        DROPBLOCK_34,
        {"img_size": 64, "window_size": 2, "embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
        {},
    ),
    ("mobilenetv3_small_050", DROPBLOCK_34, {}, {}),
    ("cs3darknet_s", DROPBLOCK_34, {}, {}),
    ("test_convnext", DROPBLOCK_34, {}, {}),
    ("test_resnet", DROPBLOCK_34, {}, {}),
    ("test_efficientnet", DROPBLOCK_34, {}, {"clean": 2}),
    ("test_vit", TOKENS_34, {"img_size": 32}, {"clean": 0}),
]


@pytest.mark.parametrize("name,spec,kwargs,check", FAMILIES, ids=[t[0] for t in FAMILIES])
def test_family_matrix_features_only(name, spec, kwargs, check):
    size = (kwargs["img_size"],) * 2 if "img_size" in kwargs else (64, 64)
    check_backbone(name, spec, size=size, **check, **kwargs)


def test_swin_backbone_stage_sites_are_channels_last():
    kwargs = FAMILIES[1][2]
    entries = timm_drop.plan(create("swin_tiny_patch4_window7_224", features_only=True, **kwargs), DROPBLOCK_34)
    assert [e.layout for e in entries.entries] == ["NHWC", "NHWC"]


# ---------------------------------------------------------------------------------------------------------
# stage sites wherever feature_info names a stage
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("features_only", [False, True], ids=["classifier", "features_only"])
def test_coat_stage_is_the_last_block_of_its_iterated_container(features_only):
    # CoaT's serial_blocksN are ModuleLists the model iterates and never calls
    model = create("coat_lite_tiny", features_only=features_only)
    entries = timm_drop.plan(model, TOKENS_34).entries
    prefix = "model." if features_only else ""
    assert [(e.module, e.stage) for e in entries] == [
        (f"{prefix}serial_blocks3.1", 3),
        (f"{prefix}serial_blocks4.1", 4),
    ]


def test_coat_backbone_regularizes_its_stages():
    check_backbone("coat_lite_tiny", TOKENS_34, size=(64, 64), clean=2, img_size=64)


@pytest.mark.parametrize("features_only", [False, True], ids=["classifier", "features_only"])
def test_twins_stages_named_block_n_in_feature_info_are_its_blocks_n(features_only):
    # timm's Twins lists block.N in feature_info; its stages are blocks.N, ModuleLists its forward iterates
    model = create("twins_svt_small", features_only=features_only, depths=(1, 1, 2, 1))
    entries = timm_drop.plan(model, DROPBLOCK_34).entries
    prefix = "model." if features_only else ""
    assert [(e.module, e.stage) for e in entries] == [(f"{prefix}blocks.2.1", 3), (f"{prefix}blocks.3.0", 4)]


@pytest.mark.parametrize("features_only", [False, True], ids=["classifier", "features_only"])
def test_hrnet_stages_3_and_4_are_its_modules_with_a_site_per_branch(features_only):
    # stage3 / stage4 return one map per resolution branch (3 and 4 of them): each branch is regularized
    model = create("hrnet_w18_small", features_only=features_only)
    entries = timm_drop.plan(model, DROPBLOCK_34).entries
    assert [(e.module, e.branch, e.stage) for e in entries] == [
        *[("stage3", b, 3) for b in range(3)],
        *[("stage4", b, 4) for b in range(4)],
    ]


def test_hrnet_backbone_regularizes_every_output_after_its_stages_3_and_4():
    # every output but the stem's comes out of stage4 (through the incre modules)
    check_backbone("hrnet_w18_small", DROPBLOCK_34, clean=1)


GEMMA4_TINY = {"depth": 4, "embed_dim": 64, "num_heads": 2, "intermediate_size": 128}


def test_gemma4_vit_stages_in_classifier_and_backbone():
    # gemma4_vit_570m's architecture at a tiny size: feature_info names blocks.N, the blocks sit in encoder
    clf = timm_drop.plan(create("gemma4_vit_570m", **GEMMA4_TINY), TOKENS_34).entries
    assert [(e.module, e.stage) for e in clf] == [("encoder.blocks.2", 3), ("encoder.blocks.3", 4)]
    backbone = create("gemma4_vit_570m", features_only=True, **GEMMA4_TINY)
    entries = timm_drop.plan(backbone, TOKENS_34).entries
    assert [(e.module, e.stage) for e in entries] == [("model.encoder.blocks.2", 3), ("model.encoder.blocks.3", 4)]
    check_backbone("gemma4_vit_570m", TOKENS_34, size=(64, 64), clean=1, **GEMMA4_TINY)
