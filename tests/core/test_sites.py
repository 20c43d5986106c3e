"""Site discovery: skip adds only where they are, stage numbering, layouts, opaque blocks, read-only analysis."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from timm_drop.sites import analyze_model, find_sites, infer_layout, is_norm


def _by_kind(sites, kind):
    return [s for s in sites if s.kind == kind]


@pytest.fixture(scope="module")
def resnet18_sites():
    return find_sites(timm.create_model("resnet18", pretrained=False))


@pytest.fixture(scope="module")
def resnet50_analysis():
    model = timm.create_model("resnet50", pretrained=False)
    return model, analyze_model(model, torch.randn(1, 3, 64, 64))


@pytest.fixture(scope="module")
def vit_sites():
    return find_sites(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64))


def test_resnet18_has_one_skip_add_per_basic_block(resnet18_sites):
    merges = _by_kind(resnet18_sites, "merge")
    assert [s.module for s in merges] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert len(_by_kind(resnet18_sites, "residual")) == 8
    assert len(_by_kind(resnet18_sites, "shortcut")) == 8
    # the drop_path / drop_block shape arithmetic and the head are not skips
    assert all(s.name == f"merge:{s.module}.add" for s in merges)


def test_resnet18_block_sites_are_the_basic_blocks(resnet18_sites):
    blocks = _by_kind(resnet18_sites, "block")
    assert [s.module for s in blocks] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert all("BasicBlock" in s.classes for s in blocks)


def test_resnet50_stage_numbering_follows_feature_info_with_stem_excluded(resnet50_analysis):
    _, analysis = resnet50_analysis
    stages = {s.module: s.stage for s in _by_kind(analysis.sites, "stage")}
    assert stages == {"layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4}
    assert analysis.stages["act1"] is None  # the stem entry of feature_info
    norms = {s.module: s.stage for s in _by_kind(analysis.sites, "norm")}
    assert norms["bn1"] is None  # stem
    assert norms["layer3.2.bn2"] == 3
    assert norms["layer3.0.downsample.1"] == 3
    modules = {s.module: s.stage for s in _by_kind(analysis.sites, "module")}
    assert modules["maxpool"] == 1  # runs between the stem and layer1's end
    assert modules["fc"] is None  # head
    assert modules["global_pool"] is None


def test_resnet50_counts_identity_and_projection_shortcuts(resnet50_analysis):
    _, analysis = resnet50_analysis
    assert len(_by_kind(analysis.sites, "merge")) == 16
    assert len(_by_kind(analysis.sites, "block")) == 16


def test_sites_have_depth_order_and_unique_names(resnet50_analysis):
    _, analysis = resnet50_analysis
    names = [s.name for s in analysis.sites]
    assert len(names) == len(set(names))
    assert [s.depth for s in analysis.sites] == list(range(len(names)))
    order = [s.module for s in _by_kind(analysis.sites, "stage")]
    assert order == ["layer1", "layer2", "layer3", "layer4"]
    residual = next(s for s in analysis.sites if s.name == "residual:layer3.0.add")
    merge = next(s for s in analysis.sites if s.name == "merge:layer3.0.add")
    block = next(s for s in analysis.sites if s.name == "block:layer3.0")
    assert residual.depth < merge.depth < block.depth


def test_vit_has_two_skip_adds_per_block_and_none_at_pos_embed(vit_sites):
    merges = _by_kind(vit_sites, "merge")
    assert len(merges) == 24
    assert {s.module for s in merges} == {f"blocks.{i}" for i in range(12)}
    assert not any("pos" in s.name or s.module == "" for s in vit_sites if s.kind in ("merge", "residual"))
    assert all(s.layout == "NLC" and s.shape == (1, 17, 192) for s in merges)


def test_vit_stages_are_its_blocks_with_token_layout(vit_sites):
    stages = _by_kind(vit_sites, "stage")
    assert [(s.module, s.stage) for s in stages] == [(f"blocks.{i}", i + 1) for i in range(12)]
    assert {s.layout for s in stages} == {"NLC"}
    norms = {s.module: s for s in _by_kind(vit_sites, "norm")}
    assert norms["norm"].stage is None  # final norm is head
    assert norms["blocks.4.norm2"].stage == 5


def test_swin_stage_outputs_are_channels_last():
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=2)
    sites = find_sites(model)
    stages = _by_kind(sites, "stage")
    assert [s.layout for s in stages] == ["NHWC"] * 4
    assert stages[0].shape == (1, 16, 16, 96)
    assert (
        len(_by_kind(sites, "merge")) == 24
    )  # 2 per block; relative-position biases and masks are not skips


def test_convnext_has_channels_first_and_channels_last_norm_sites():
    sites = find_sites(timm.create_model("convnext_atto", pretrained=False, conv_mlp=False))
    norms = {s.module: s.layout for s in _by_kind(sites, "norm")}
    assert norms["stages.0.blocks.0.norm"] == "NHWC"  # LayerNorm after the permute (conv_mlp=False path)
    assert norms["stages.1.downsample.0"] == "NCHW"  # LayerNorm2d
    assert norms["stem.1"] == "NCHW"
    assert {s.layout for s in _by_kind(sites, "merge")} == {"NCHW"}


def test_efficientnet_blocks_between_feature_stages_belong_to_the_next_stage():
    sites = find_sites(timm.create_model("efficientnet_b0", pretrained=False))
    blocks = {s.module: s.stage for s in _by_kind(sites, "block")}
    assert len(blocks) == 16
    assert blocks["blocks.3.0"] == 4 and blocks["blocks.4.2"] == 4  # blocks.3 is not a feature_info module
    assert blocks["blocks.0.0"] == 1
    assert len(_by_kind(sites, "merge")) == 9  # only the stride-1, equal-width inverted residuals
    assert all(s.module.count(".") == 2 for s in _by_kind(sites, "merge"))


def test_helpers_a_stage_calls_are_not_blocks_of_their_own():
    # CoaT's serial blocks call the stage's shared conv position encodings (cpe3, crpe3), registered outside the stage
    # module: they run inside the stage's call, so they are not blocks (crpe's output is attention terms, not tokens)
    sites = find_sites(timm.create_model("coat_lite_tiny", pretrained=False, img_size=64))
    blocks = [s.module for s in _by_kind(sites, "block")]
    assert [b for b in blocks if b.startswith(("cpe", "crpe"))] == []
    # (stage 1's first block and embed run before its feature_info module starts the stage: the stem's time)
    assert {f"serial_blocks{i}.{j}" for i in (2, 3, 4) for j in (0, 1)} <= set(blocks)
    assert {f"patch_embed{i}" for i in (2, 3, 4)} <= set(blocks)  # run between stages, like EfficientNet's blocks.3


def test_normfree_blocks_are_opaque_with_a_reason():
    model = timm.create_model("nf_resnet26", pretrained=False)
    analysis = analyze_model(model)
    assert not [s for s in analysis.sites if s.kind in ("residual", "shortcut", "merge")]
    assert "NormFreeBlock" in analysis.opaque["stages.0.0"]
    assert len(_by_kind(analysis.sites, "block")) == 8


class _Adds(nn.Module):
    """One real skip among adds that are not skips."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.f = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.bias = nn.Parameter(torch.zeros(1, 4, 1, 1))

    def forward(self, x, mask=None):
        x = x + self.bias  # parameter add
        y = self.a(x) + self.b(x)  # parallel branches of equal depth
        y = y + torch.ones_like(y[:, :1])  # broadcast add
        if mask is not None:
            y = y + mask  # another input
        n = x.shape[0] + 1  # shape arithmetic
        out = y.add(self.f(y))  # the skip: y is the shortcut
        return (out * 0.5 + torch.flip(out, dims=[1]) * 0.5) * n  # rotary-style sum of two products


class _Wrapper(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


def test_only_the_real_skip_add_is_found():
    sites = find_sites(_Wrapper(_Adds()), example_input=torch.randn(2, 4, 6, 9))
    merges = _by_kind(sites, "merge")
    assert [s.name for s in merges] == ["merge:block.add_4"]
    assert merges[0].stage is None  # no feature_info: no stages


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow is not traceable
            return x + self.conv(x)
        return x


def test_untraceable_block_is_opaque_with_the_trace_error():
    analysis = analyze_model(_Wrapper(_DataDependent()), torch.randn(1, 4, 8, 8))
    assert "not FX-traceable" in analysis.opaque["block"]
    assert not [s for s in analysis.sites if s.kind == "merge"]


def test_find_sites_leaves_the_model_unchanged():
    model = timm.create_model("resnet18", pretrained=False)
    model.train()
    model.layer2.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    find_sites(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics untouched
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    assert model.training and not model.layer2.training and not model.layer2[0].bn1.training
    assert model.layer1[0].bn1.training
    assert not [k for m in model.modules() for k in m.__dict__ if k.startswith("_tensor_constant")]


def test_example_input_sets_the_shape_pass_size():
    sites = find_sites(
        timm.create_model("resnet18", pretrained=False), example_input=torch.randn(1, 3, 32, 32)
    )
    stage4 = next(s for s in sites if s.name == "stage:layer4")
    assert stage4.shape == (1, 512, 1, 1) and stage4.layout == "NCHW"


def test_default_input_is_small_and_non_square_for_flexible_models(resnet18_sites):
    stage1 = next(s for s in resnet18_sites if s.name == "stage:layer1")
    assert stage1.shape == (1, 64, 16, 24)


@pytest.mark.parametrize(
    "shape, hw, layout",
    [
        ((2, 64, 8, 12), (64, 96), "NCHW"),
        ((2, 8, 12, 64), (64, 96), "NHWC"),
        ((2, 96, 7, 7), (224, 224), "NCHW"),
        ((2, 7, 7, 96), (224, 224), "NHWC"),
        ((2, 197, 192), (224, 224), "NLC"),
        ((2, 1000), (224, 224), "NC"),
        ((2, 3, 4, 5, 6), (224, 224), None),
    ],
)
def test_layout_is_inferred_from_the_input_aspect(shape, hw, layout):
    assert infer_layout(shape, hw) == layout


def test_ambiguous_square_maps_use_the_norm_type():
    assert infer_layout((1, 8, 8, 8), (64, 64), nn.LayerNorm(8)) == "NHWC"
    assert infer_layout((1, 8, 8, 8), (64, 64), timm.layers.LayerNorm2d(8)) == "NCHW"
    assert infer_layout((1, 8, 8, 8), (64, 64), nn.BatchNorm2d(8)) == "NCHW"


def test_norm_detection_by_class_hierarchy_and_name():
    assert is_norm(nn.BatchNorm2d(4)) and is_norm(nn.GroupNorm(2, 4)) and is_norm(nn.LayerNorm(4))
    assert is_norm(timm.layers.BatchNormAct2d(4)) and is_norm(timm.layers.LayerNorm2d(4))
    assert is_norm(timm.layers.RmsNorm(4))
    assert not is_norm(timm.layers.ConvNormAct(4, 4, 3))
    assert not is_norm(nn.Conv2d(4, 4, 1)) and not is_norm(nn.Identity())
