"""The 2-D map placements (DropBlock, CorrDrop) on token models whose patch grid comes from the model itself.

For each family the grid the library recovers at every token stage site is checked against a spatial tensor the
model computes (its patch embedding's conv output, the (Hp, Wp) XCiT's embedding returns, the maps of LeViT's conv
twin), and a placement applied through the public path drops whole blocks of that grid, prefix tokens untouched.
Where the tokens are no grid (Hiera's unrolled mask-unit order) the refusal stays, with its reason.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_drop
from timm_drop.placements import PlacementError
from timm_drop.regularizers import Regularizer
from timm_drop.sites import analyze_model
from timm_drop.structure import token_grid

pytestmark = pytest.mark.usefixtures("one_thread")


def _cait():
    return timm.create_model("cait_xxs24_224", pretrained=False, img_size=64, depth=2)


def _xcit():
    return timm.create_model("xcit_nano_12_p16_224", pretrained=False, img_size=64, depth=2)


def _convit():
    return timm.create_model("convit_tiny", pretrained=False, img_size=64, depth=4, local_up_to_layer=2)


def _crossvit():
    return timm.create_model("crossvit_tiny_240", pretrained=False)


def _coat():
    return timm.create_model("coat_lite_tiny", pretrained=False, img_size=64)


def _levit():
    return timm.create_model("levit_128s", pretrained=False)


def _stage_tokens(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[str, int, tuple]]:
    """``(site, length, token_grid(model, length))`` of every NLC stage site at input ``x``."""
    analysis = analyze_model(model, x)
    return [(s.name, s.shape[1], token_grid(model, s.shape[1])) for s in analysis.sites
            if s.kind == "stage" and s.layout == "NLC"]  # fmt: skip


def _conv_outputs(model: torch.nn.Module, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the named (convolution) modules in one forward of ``x``."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
               for n in names]  # fmt: skip
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return [seen[n] for n in names]


# -- the grid the library recovers is the model's -----------------------------------------------------------------
def test_cait_patch_tokens_are_the_patch_embed_grid_without_the_class_token():
    # CaiT's self-attention blocks see the patch tokens alone; the class token joins in blocks_token_only.
    model = _cait().eval()
    x = torch.randn(1, 3, 64, 64)
    (proj,) = _conv_outputs(model, ["patch_embed.proj"], x)
    sites = _stage_tokens(model, x)
    assert sites and all(g == (tuple(proj.shape[-2:]), 0) for _, _, g in sites), sites


def test_xcit_blocks_hold_the_grid_its_patch_embed_returns():
    model = _xcit().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, (hp, wp) = model.patch_embed(x)
    sites = _stage_tokens(model, x)
    assert sites and all(g == ((hp, wp), 0) for _, _, g in sites), sites
    # after the class token joins (the class-attention blocks): the same grid behind one prefix token
    assert token_grid(model, 1 + hp * wp) == ((hp, wp), 1)


def test_convit_grid_before_and_after_the_class_token_joins():
    model = _convit().eval()
    x = torch.randn(1, 3, 64, 64)
    (proj,) = _conv_outputs(model, ["patch_embed.proj"], x)
    hw = tuple(proj.shape[-2:])
    got = [(length, g) for _, length, g in _stage_tokens(model, x)]
    n = hw[0] * hw[1]
    assert got == [(n, (hw, 0))] * 2 + [(n + 1, (hw, 1))] * 2


def test_crossvit_each_branch_gets_its_own_patch_grid():
    model = _crossvit().eval()
    x = torch.randn(1, 3, 240, 240)
    projs = _conv_outputs(model, ["patch_embed.0.proj", "patch_embed.1.proj"], x)
    want = {1 + p.shape[-2] * p.shape[-1]: ((p.shape[-2], p.shape[-1]), 1) for p in projs}
    sites = _stage_tokens(model, x)
    assert len(sites) == 6 and all(g == want[length] for _, length, g in sites), sites


def test_coat_stage_tokens_are_the_class_token_and_that_stages_patch_grid():
    model = _coat().eval()
    x = torch.randn(1, 3, 64, 64)
    projs = _conv_outputs(model, [f"patch_embed{i}.proj" for i in range(1, 5)], x)
    want = [((p.shape[-2], p.shape[-1]), 1) for p in projs]
    assert [g for _, _, g in _stage_tokens(model, x)] == want


def test_tnt_outer_tokens_are_the_class_token_and_the_unfolded_patch_grid():
    # TNT unfolds the image into patches (nn.Unfold: row-major) and prepends the class token to their outer
    # tokens; the inner (pixel) tokens of each patch are no grid of the image and pass untouched
    model = timm.create_model("tnt_s_patch16_224", pretrained=False, depth=2).eval()
    x = torch.randn(1, 3, 224, 224)
    ph, pw = model.pixel_embed.patch_size
    count = model.pixel_embed.unfold(x).shape[-1]
    want = ((x.shape[-2] // ph, x.shape[-1] // pw), 1)
    assert want[0][0] * want[0][1] == count
    sites = _stage_tokens(model, x)
    assert [(length, g) for _, length, g in sites if isinstance(g, tuple)] == [(1 + count, want)] * 2, sites


def test_levit_stage_grids_are_the_maps_of_its_conv_twin():
    # LeViT's tokens are its attention's resolution grid (row-major, as its Downsample's view says); the
    # use_conv twin of the same configuration computes the same stages as NCHW maps.
    model = _levit().eval()
    twin = timm.create_model("levit_conv_128s", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    maps = [s.shape[-2:] for s in analyze_model(twin, x).sites if s.kind == "stage"]
    got = [g for _, _, g in _stage_tokens(model, x)]
    assert len(maps) == 3 and got == [(tuple(hw), 0) for hw in maps]


def test_hiera_unrolled_tokens_stay_without_a_grid():
    model = timm.create_model("hiera_tiny_224", pretrained=False).eval()
    with pytest.raises(PlacementError, match="placement 'dropblock' on hiera_tiny_224.*2-D feature map"):
        timm_drop.placement_spec(model, "dropblock")


# -- DropBlock drops whole blocks of that grid, prefix tokens untouched ---------------------------------------------
def _in_whole_blocks(dropped: torch.Tensor, zero: torch.Tensor, kh: int, kw: int) -> bool:
    """Whether every dropped cell of ``(B, C, H, W)`` lies in a ``kh x kw`` window that is zero in the output
    (the input may be zero already where an earlier block's drop passed through: LeViT's zero-initialised branches)."""
    full = F.avg_pool2d(zero.float(), (kh, kw), stride=1).eq(1).float()
    covered = F.max_pool2d(F.pad(full, (kw - 1, kw - 1, kh - 1, kh - 1)), (kh, kw), stride=1).bool()
    return bool((covered | ~dropped).all())


def _tnt():
    return timm.create_model("tnt_s_patch16_224", pretrained=False, depth=4)


@pytest.mark.parametrize("make", [_cait, _xcit, _convit, _crossvit, _coat, _levit, _tnt],
                         ids=["cait", "xcit", "convit", "crossvit", "coat", "levit", "tnt"])  # fmt: skip
def test_dropblock_placement_drops_grid_blocks_and_keeps_prefix_tokens(make):
    model = make()
    timm_drop.apply_regularizer(model, {"preset": "dropblock", "drop_prob": 0.4})
    regs = [m for m in model.modules() if isinstance(m, Regularizer) and m.layout == "NLC"]
    assert regs and all(r.token_grid is not None for r in regs)
    seen = []
    for r in regs:
        r.register_forward_hook(lambda m, a, o: seen.append((m, a[0], o)))
    size = timm_drop.plan(make(), "dropblock").input_shape[-2:]
    model.train()
    torch.manual_seed(0)
    model(torch.randn(2, 3, *size))
    assert len(seen) == len(regs)
    acted = False
    for reg, inp, out in seen:
        (h, w), p = reg.token_grid, reg.num_prefix_tokens
        assert inp.shape[1] == p + h * w
        assert torch.equal(out[:, :p], inp[:, :p])  # class tokens pass untouched
        zero = (out[:, p:] == 0).unflatten(1, (h, w)).permute(0, 3, 1, 2)
        dropped = zero & (inp[:, p:] != 0).unflatten(1, (h, w)).permute(0, 3, 1, 2)
        kh, kw = min(reg.block_size, h), min(reg.block_size, w)
        assert _in_whole_blocks(dropped, zero, kh, kw), (reg.site_name, reg.block_size, (h, w))
        acted |= bool(dropped.any())
    assert acted


@pytest.mark.parametrize("make", [_cait, _xcit, _convit, _crossvit, _coat, _levit],
                         ids=["cait", "xcit", "convit", "crossvit", "coat", "levit"])  # fmt: skip
def test_corrdrop_placement_applies_on_the_grid(make):
    model = make()
    entries = timm_drop.plan(model, "corrdrop").entries
    assert entries and all(e.token_grid is not None for e in entries if e.layout == "NLC")
