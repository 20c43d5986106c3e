"""Spatial regularizers on ViT token sites: prefix tokens + an H x W patch grid in (B, L, C) layout."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from tiny import tiny_swin

from timm_drop import create_regularizer

SPATIAL = {"dropblock": {"drop_prob": 0.3, "block_size": 2}, "corrdrop": {"drop_prob": 0.3, "block_size": 2}}


def _grid_module(name: str, grid: tuple[int, int], prefix: int):
    m = create_regularizer(name, **SPATIAL[name]).train()
    m.set_token_grid(grid, prefix)
    m.set_layout("NLC")
    return m


def _seeded(fn, seed: int = 11):
    torch.manual_seed(seed)
    return fn()


@pytest.mark.parametrize("name", sorted(SPATIAL))
@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
def test_the_grid_is_regularized_as_a_map_and_prefix_tokens_are_untouched(name, prefix):
    h, w, b, c = 4, 5, 3, 6
    x = torch.rand(b, prefix + h * w, c) + 0.5
    m = _grid_module(name, (h, w), prefix)
    y = _seeded(lambda: m(x))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y[:, :prefix], x[:, :prefix])
    plain = create_regularizer(name, **SPATIAL[name]).train()
    grid = x[:, prefix:].reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
    ref = _seeded(lambda: plain(grid))
    torch.testing.assert_close(y[:, prefix:], ref.permute(0, 2, 3, 1).reshape(b, h * w, c))
    assert not torch.equal(y, x)


@pytest.mark.parametrize("name", sorted(SPATIAL))
def test_tokens_without_a_grid_are_still_refused_naming_the_layout(name):
    m = create_regularizer(name, **SPATIAL[name])
    with pytest.raises(ValueError, match="NLC.*token grid"):
        m.set_layout("NLC")


@pytest.mark.parametrize("name", sorted(SPATIAL))
def test_a_token_count_that_does_not_match_the_grid_names_regularizer_and_both_lengths(name):
    m = _grid_module(name, (4, 4), 1)
    with pytest.raises(ValueError, match=rf"{name}.*L = 17.*L = 26"):
        m(torch.rand(2, 26, 8))


def test_grid_attributes_repr_state_and_eval_identity():
    m = _grid_module("dropblock", (4, 4), 2)
    assert m.token_grid == (4, 4) and m.num_prefix_tokens == 2
    assert "token_grid=(4, 4), num_prefix_tokens=2" in m.extra_repr()
    assert "token_grid" not in create_regularizer("dropblock", **SPATIAL["dropblock"]).extra_repr()
    assert m.state_dict() == {}
    c = copy.deepcopy(m)
    assert c.token_grid == (4, 4) and c.num_prefix_tokens == 2
    x = torch.randn(2, 18, 8)
    assert m.eval()(x) is x


@pytest.mark.parametrize(
    "grid, prefix", [((4,), 0), ((0, 4), 0), ((4, 4.0), 0), ((4, 4), -1), ((4, 4), True)]
)
def test_bad_grids_are_rejected_by_name(grid, prefix):
    m = create_regularizer("dropblock", **SPATIAL["dropblock"])
    with pytest.raises(ValueError, match="token_grid|num_prefix_tokens"):
        m.set_token_grid(grid, prefix)


def _vit(**kwargs):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, **kwargs).train()


@pytest.mark.parametrize(
    "make, prefix",
    [
        (lambda: _vit(), 1),
        (
            lambda: timm.create_model(
                "deit_tiny_distilled_patch16_224", pretrained=False, img_size=64, depth=2
            ),
            2,
        ),
        (lambda: _vit(reg_tokens=4, no_embed_class=True), 5),
    ],
    ids=["vit", "deit-distilled", "vit-registers"],
)
def test_dropblock_on_a_timm_vit_block_output_drops_grid_blocks_only(make, prefix):
    model = make().train()
    assert model.num_prefix_tokens == prefix
    reg = create_regularizer("dropblock", drop_prob=0.5, block_size=2)
    reg.set_token_grid(tuple(model.patch_embed.grid_size), model.num_prefix_tokens)
    reg.set_layout("NLC")
    seen = {}

    def hook(module, args, out):
        seen["in"], seen["out"] = out, reg(out)
        return seen["out"]

    model.blocks[0].register_forward_hook(hook)
    torch.manual_seed(0)
    model(torch.randn(2, 3, 64, 64))
    before, after = seen["in"], seen["out"]
    assert torch.equal(after[:, :prefix], before[:, :prefix])
    dropped = (after[:, prefix:] == 0) & (before[:, prefix:] != 0)
    assert dropped.any()
    # A dropped unit lies in a 2x2 block of dropped units of its channel on the 4x4 grid.
    grid = dropped.reshape(2, 4, 4, -1).permute(0, 3, 1, 2).float()
    covered = torch.nn.functional.max_pool2d(
        torch.nn.functional.avg_pool2d(grid, 2, stride=1).eq(1).float(), 2, stride=1, padding=1
    )[..., :4, :4]
    assert torch.equal(covered.bool() | ~grid.bool(), torch.ones_like(grid, dtype=torch.bool))


def test_dynamic_image_size_vit_needs_the_new_grid():
    model = _vit(dynamic_img_size=True)
    reg = create_regularizer("dropblock", drop_prob=0.3, block_size=2)
    reg.set_token_grid(tuple(model.patch_embed.grid_size), model.num_prefix_tokens)
    reg.set_layout("NLC")
    model.blocks[0].register_forward_hook(lambda mod, args, out: reg(out))
    model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"dropblock.*L = 17.*L = 21"):
        model(torch.randn(1, 3, 64, 80))
    reg.set_token_grid((4, 5), model.num_prefix_tokens)
    assert model(torch.randn(1, 3, 64, 80)).shape == (1, model.num_classes)


def test_swin_stage_outputs_are_nhwc_maps_without_a_grid():
    model = tiny_swin().train()
    reg = create_regularizer("dropblock", drop_prob=0.3, block_size=3)
    reg.set_layout("NHWC")
    out = model.layers[0](model.patch_embed(torch.randn(2, 3, 56, 56)))
    assert out.shape == (2, 14, 14, 24)
    y = reg(out)
    assert y.shape == out.shape and (y == 0).any() and reg.token_grid is None
