"""CIFAR models: the papers' architectures and parameter counts, behind timm's model API."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import DropPath
from torch import nn

import timm_drop  # noqa: F401  (registers the models)
from timm_drop.models import PadShortcut

CIFAR_RESNETS = ["resnet20_cifar", "resnet32_cifar", "resnet44_cifar", "resnet56_cifar", "resnet110_cifar"]
SMALL = ["resnet20_cifar", "resnet18_cifar", "wrn20_4_cifar", "vgg16_bn_cifar"]


pytestmark = pytest.mark.usefixtures("one_thread")


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize(
    "name, millions, tol",
    [
        ("resnet20_cifar", 0.27, 0.005),  # He et al. 2016 Table 6
        ("resnet32_cifar", 0.46, 0.005),
        ("resnet44_cifar", 0.66, 0.005),
        ("resnet56_cifar", 0.85, 0.005),
        ("resnet110_cifar", 1.7, 0.03),
        ("wrn28_10_cifar", 36.5, 0.05),  # Zagoruyko & Komodakis 2016 Table 4
        ("vgg16_bn_cifar", 33.64, 0.01),  # LayerOut paper section 6.2
        ("resnet18_cifar", 11.17, 0.01),
    ],
)
def test_parameter_counts_match_the_papers(name, millions, tol):
    assert count(meta_model(name)) / 1e6 == pytest.approx(millions, abs=tol)


def test_wrn20_is_resnet20_widened_and_wrn20_8_has_four_times_the_parameters():
    n4, n8 = count(meta_model("wrn20_4_cifar")), count(meta_model("wrn20_8_cifar"))
    assert n8 / n4 == pytest.approx(4.0, abs=0.05)  # SelectScale: "about four times more parameters"
    model = meta_model("wrn20_4_cifar")
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    assert model.layer3[0].conv1.out_channels == 256


@pytest.mark.parametrize("name", CIFAR_RESNETS)
def test_cifar_resnets_have_6n_plus_2_weight_layers_and_option_a_shortcuts(name):
    model = meta_model(name)
    depth = int(name[len("resnet") :].split("_")[0])
    weight_layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weight_layers) == depth
    assert sum(isinstance(m, PadShortcut) for m in model.modules()) == 2
    assert model.layer3[-1].conv2.out_channels == 64


def test_option_a_shortcut_subsamples_and_appends_zero_channels():
    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and not y[:, 16:].any()
    model_b = meta_model("resnet20_cifar", shortcut="B")
    assert count(model_b) - count(meta_model("resnet20_cifar")) == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


@pytest.mark.parametrize("name", SMALL)
def test_forward_shapes_and_timm_head_api(name):
    model = timm.create_model(name, num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert model(x).shape == (2, 100)
        last = model.feature_info[-1]
        assert feats.shape == (2, last["num_chs"], 32 // last["reduction"], 32 // last["reduction"])
        assert feats.shape[1] == model.num_features
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
        assert torch.equal(model.forward_head(feats), model(x))
        assert model.get_classifier().out_features == 100 and model.num_classes == 100
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.num_classes == 7
        model.reset_classifier(0)
        assert model(x).shape == (2, model.head_hidden_size)


@pytest.mark.parametrize("name", SMALL + ["resnet110_cifar", "wrn28_10_cifar"])
def test_feature_info_lists_stem_then_stages_with_reductions(name):
    model = meta_model(name)
    info = model.feature_info
    modules = dict(model.named_modules())
    assert all(d["module"] in modules for d in info)
    reductions = [d["reduction"] for d in info]
    if name.startswith("vgg"):
        assert [d["module"] for d in info] == [f"layer{i}" for i in range(1, 6)]
        assert reductions == [1, 2, 4, 8, 16]
    else:
        stages = [d["module"] for d in info[1:]]
        assert info[0]["module"] in ("act1", "conv1") and info[0]["reduction"] == 1
        assert stages == [f"layer{i}" for i in range(1, len(stages) + 1)]
        assert reductions == [1, 1, 2, 4] + ([8] if name == "resnet18_cifar" else [])


def test_features_only_returns_every_feature_info_level():
    model = timm.create_model("resnet20_cifar", features_only=True)
    outs = model(torch.randn(1, 3, 32, 32))
    assert [tuple(o.shape[1:]) for o in outs] == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]


@pytest.mark.parametrize("name", ["resnet20_cifar", "wrn28_10_cifar", "vgg16_bn_cifar", "resnet18_cifar"])
def test_pretrained_cfg_is_for_32px_inputs_and_pretrained_weights_are_refused(name):
    model = meta_model(name)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert model.default_cfg["input_size"] == (3, 32, 32)
    assert model.pretrained_cfg["architecture"] == name
    assert dict(model.named_modules())[model.pretrained_cfg["classifier"]] is model.get_classifier()
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(name, pretrained=True)


def test_drop_path_rate_grows_linearly_with_block_index_and_is_identity_in_eval():
    model = timm.create_model("resnet20_cifar", drop_path_rate=0.2)
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in model.modules()
             if hasattr(b, "drop_path")]  # fmt: skip
    assert len(rates) == 9
    assert rates == pytest.approx([0.2 * i / 8 for i in range(9)])
    plain = timm.create_model("resnet20_cifar")
    plain.load_state_dict(model.state_dict())  # DropPath adds no parameters or buffers
    x = torch.randn(4, 3, 32, 32)
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    model.train(), plain.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.allclose(model(x), plain(x))
    wrn = meta_model("wrn20_4_cifar", drop_path_rate=0.1)
    assert wrn.layer3[-1].drop_path.drop_prob == pytest.approx(0.1)


def test_drop_rate_and_wrn_block_dropout():
    model = meta_model("resnet20_cifar", drop_rate=0.3)
    assert model.drop_rate == 0.3
    wrn = meta_model("wrn20_4_cifar", block_drop_rate=0.3)
    assert isinstance(wrn.layer1[0].drop, nn.Dropout) and wrn.layer1[0].drop.p == 0.3
    vgg = meta_model("vgg16_bn_cifar", drop_rate=0.2)
    assert [m.p for m in vgg.pre_logits if isinstance(m, nn.Dropout)] == [0.2, 0.2]
    with pytest.raises(ValueError, match="drop_path_rate"):
        timm.create_model("vgg16_bn_cifar", drop_path_rate=0.1)


def test_in_chans_and_invalid_architectures():
    model = timm.create_model("resnet20_cifar", in_chans=1, num_classes=10)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="WRN depth"):
        timm.create_model("wrn28_10_cifar", depth=27)
    with pytest.raises(ValueError, match="shortcut"):
        timm.create_model("resnet20_cifar", shortcut="C")


def test_wrn_blocks_are_pre_activation_with_projection_on_the_activated_input():
    block = meta_model("wrn28_10_cifar").layer2[0]
    names = [n for n, _ in block.named_children()]
    assert names.index("bn1") < names.index("conv1") < names.index("bn2") < names.index("conv2")
    assert isinstance(block.downsample, nn.Conv2d) and block.downsample.stride == (2, 2)
    small = timm.create_model("wrn20_4_cifar").layer2[0].eval()
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        expected = small.downsample(small.act1(small.bn1(x.clone())))
        branch = small.conv2(small.act2(small.bn2(small.conv1(small.act1(small.bn1(x.clone()))))))
        assert torch.allclose(small(x), branch + expected, atol=1e-6)
