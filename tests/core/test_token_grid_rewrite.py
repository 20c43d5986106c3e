"""apply_regularizer puts spatial methods (DropBlock) on ViT token sites: the grid comes from the model."""

from __future__ import annotations

import pytest
import timm
import torch
from tiny import tiny_swin

import timm_drop
from timm_drop import RewriteError
from timm_drop.regularizers import Regularizer


def _spec(kind: str) -> dict:
    return {
        "version": 1,
        "rules": [{"regularizer": "dropblock", "params": {"drop_prob": 0.3, "block_size": 2}, "sites": [kind]}],
    }


def _vit(**kwargs):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, **kwargs)


TOKEN_MODELS = {
    "vit": (lambda: _vit(), 1, (4, 4), 64),
    "deit-distilled": (
        lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64, depth=2),
        2,
        (4, 4),
        64,
    ),
    "vit-registers": (
        lambda: timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, depth=2),
        5,
        (4, 4),
        56,
    ),
}


def _regs(model):
    return [m for m in model.modules() if isinstance(m, Regularizer)]


@pytest.mark.parametrize("kind", ["block", "stage"])
@pytest.mark.parametrize("name", sorted(TOKEN_MODELS))
def test_dropblock_acts_on_the_patch_grid_of_vit_token_sites(name, kind):
    make, prefix, grid, size = TOKEN_MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        before = model(x)
    modules_before = [n for n, _ in model.named_modules()]

    assert timm_drop.apply_regularizer(model, _spec(kind)) is model
    regs = _regs(model)
    assert regs and all(r.token_grid == grid and r.num_prefix_tokens == prefix for r in regs)
    assert all(r.layout == "NLC" for r in regs)

    with torch.no_grad():
        assert torch.equal(model(x), before)  # eval: bit-identical
        seen = []
        handles = [r.register_forward_hook(lambda m, a, o: seen.append((a[0], o))) for r in regs]
        model.train()
        torch.manual_seed(1)
        y1 = model(x)
        torch.manual_seed(2)
        y2 = model(x)
        for h in handles:
            h.remove()
    assert not torch.equal(y1, y2)
    assert seen
    for inp, out in seen:
        assert inp.shape == out.shape == (2, prefix + grid[0] * grid[1], inp.shape[-1])
        assert torch.equal(out[:, :prefix], inp[:, :prefix])  # class / distillation / register tokens untouched
    assert any(not torch.equal(out[:, prefix:], inp[:, prefix:]) for inp, out in seen)

    timm_drop.strip_regularizers(model)
    model.eval()
    assert not _regs(model) and [n for n, _ in model.named_modules()] == modules_before
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_the_plan_carries_the_grid_of_each_token_site():
    entries = timm_drop.plan(_vit(), _spec("block")).entries
    assert [(e.layout, e.token_grid, e.num_prefix_tokens) for e in entries] == [("NLC", (4, 4), 1)] * 2


def test_a_dynamic_image_size_vit_is_refused_naming_the_site():
    # The grid of a dynamic-size ViT changes with every input size; a grid fixed at apply time would be a guess.
    with pytest.raises(RewriteError, match=r"block:blocks\.0.*dynamic_img_size"):
        timm_drop.apply_regularizer(_vit(dynamic_img_size=True), _spec("block"))


def test_patch_dropout_is_refused_naming_the_site():
    # PatchDropout keeps a random subset of the patch tokens in training: they are no longer a grid.
    with pytest.raises(RewriteError, match=r"block:blocks\.0.*patch_drop"):
        timm_drop.apply_regularizer(_vit(patch_drop_rate=0.5), _spec("block"))


def test_token_sites_of_a_model_without_a_patch_grid_keep_the_named_refusal():
    # Hiera's stages are token sequences in its unrolled mask-unit order: the model records no patch grid.
    model = timm.create_model("hiera_tiny_224", pretrained=False)
    with pytest.raises(RewriteError, match=r"dropblock cannot act at site stage:blocks\.0 \(layout NLC.*Hiera records no patch grid"):
        timm_drop.apply_regularizer(model, _spec("stage"))


def test_swin_nhwc_stage_sites_keep_working_without_a_grid():
    model = tiny_swin().eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        before = model(x)
        timm_drop.apply_regularizer(model, _spec("stage"))
        regs = _regs(model)
        assert regs and all(r.layout == "NHWC" and r.token_grid is None for r in regs)
        assert torch.equal(model(x), before)
        model.train()
        torch.manual_seed(1)
        y1 = model(x)
        torch.manual_seed(2)
        assert not torch.equal(y1, model(x))
        timm_drop.strip_regularizers(model.eval())
        assert torch.equal(model(x), before)


def test_a_token_site_after_pooling_is_refused_naming_site_and_lengths():
    # CaiT's class-attention blocks return the class token alone: a (B, 1, C) sequence with no grid in it.
    model = timm.create_model("cait_xxs24_224", pretrained=False, img_size=64, depth=2)
    spec = _spec("module")
    spec["rules"][0]["name"] = ["blocks_token_only.0"]
    with pytest.raises(RewriteError, match=r"site module:blocks_token_only\.0 .*its 1 tokens.*1 prefix.*4x4"):
        timm_drop.apply_regularizer(model, spec)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_name, kwargs, expected",
    [
        ("vit_tiny_patch16_224", {"img_size": 64, "depth": 2}, 2),  # feature_info: one stage per block
        ("deit_tiny_distilled_patch16_224", {"img_size": 64, "depth": 2}, 2),
        ("levit_128s", {"img_size": 64}, 3),  # its attentions' resolution grids (4x4, 2x2, 1x1)
    ],
)
def test_coverage_puts_dropblock_on_vit_family_token_stages_with_a_grid(model_name, kwargs, expected):
    from timm_drop.tools.coverage import check_model

    torch.manual_seed(0)
    res = check_model(model_name, model_kwargs=kwargs)
    assert res.ok, (res.stage, res.reason)
    assert res.n_regularizers.get("dropblock", 0) == expected


def test_a_features_only_vit_gets_the_grid_of_the_model_it_wraps():
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, features_only=True, img_size=64, depth=3, out_indices=(1, 2)
    )
    timm_drop.apply_regularizer(model, _spec("stage"))
    regs = _regs(model)
    assert regs and all(r.token_grid == (4, 4) and r.num_prefix_tokens == 1 for r in regs)
    model.train()
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    y1 = model(x)
    torch.manual_seed(2)
    assert any(not torch.equal(a, b) for a, b in zip(y1, model(x)))
