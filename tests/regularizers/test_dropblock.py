"""DropBlock (Ghiasi et al. 2018): drop fractions, block geometry, rescale, numerics, parameters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import timm_drop
from timm_drop.regularizers.dropblock import DropBlock2d, drop_block2d, dropblock_gamma

MAPS = [(7, 7), (8, 8), (14, 14), (56, 56), (7, 11), (11, 7), (1, 1), (2, 3)]
BLOCKS = [1, 2, 3, 5, 7, 8, 10, 64]  # 10: the separable-pool path


def _brute_force_drop_fraction(gamma: float, h: int, w: int, block_size: int) -> float:
    """Expected dropped fraction by enumerating every seed position, with the documented anchoring."""
    kh, kw = min(block_size, h), min(block_size, w)
    covered = [[0] * w for _ in range(h)]
    for i in range(h):
        for j in range(w):
            top, left = i - (kh - 1) // 2, j - (kw - 1) // 2
            if top < 0 or left < 0 or top + kh > h or left + kw > w:
                continue  # a seed here would put its block outside the map: not a valid seed
            for r in range(top, top + kh):
                for c in range(left, left + kw):
                    covered[r][c] += 1
    return sum(1.0 - (1.0 - gamma) ** n for row in covered for n in row) / (h * w)


def _maps_needed(h: int, w: int, block_size: int, p: float, blocks: int = 1200) -> int:
    """Maps for ~``blocks`` dropped blocks: relative std of the fraction ~3 %, so a 10 % band is ~3 sigma."""
    kh, kw = min(block_size, h), min(block_size, w)
    return max(16, math.ceil(blocks * kh * kw / (p * h * w)))


def _dropped_fraction(y: torch.Tensor) -> float:
    return (y == 0).float().mean().item()


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.6])
def test_gamma_gives_the_requested_expected_fraction_exactly(p):
    # Independent check of the overlap-aware gamma: brute-force coverage counts, float64.
    for h, w in [(7, 7), (8, 8), (14, 14), (7, 11), (2, 3), (20, 9)]:
        for bs in [1, 2, 3, 5, 7, 8, 30]:
            gamma = dropblock_gamma(p, bs, h, w).item()
            frac = _brute_force_drop_fraction(gamma, h, w, bs)
            assert frac == pytest.approx(p, rel=0.01), (h, w, bs)


def test_paper_eq1_gamma_underdrops_where_blocks_overlap():
    # The motivation for solving gamma: Eq. (1) ignores overlaps (14x14, bs 7, p 0.3 -> ~0.24).
    h = w = 14
    bs, p = 7, 0.3
    eq1 = p / bs**2 * h * w / (h - bs + 1) ** 2
    assert _brute_force_drop_fraction(eq1, h, w, bs) < 0.85 * p
    assert _brute_force_drop_fraction(dropblock_gamma(p, bs, h, w).item(), h, w, bs) == pytest.approx(
        p, rel=1e-3
    )


@pytest.mark.parametrize("hw", MAPS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("block_size", BLOCKS)
def test_realised_drop_fraction_matches_drop_prob(hw, block_size):
    h, w = hw
    p = 0.2
    torch.manual_seed(1000 * h + 10 * w + block_size)
    maps = _maps_needed(h, w, block_size, p)
    x = torch.ones(maps // 8 + 1, 8, h, w)
    y = drop_block2d(x, p, block_size)
    assert _dropped_fraction(y) == pytest.approx(p, rel=0.10)


def test_timm_dropblock_overdrops_on_small_maps_where_ours_does_not():
    timm_layers = pytest.importorskip("timm.layers")
    p = 0.1
    for h, bs in [(8, 7), (7, 5), (8, 5)]:
        torch.manual_seed(h * bs)
        x = torch.ones(128, 16, h, h)
        theirs = timm_layers.DropBlock2d(p, bs).train()(x)
        ours = DropBlock2d(p, bs).train()(x)
        assert _dropped_fraction(theirs) > 1.8 * p, (h, bs)
        assert _dropped_fraction(ours) == pytest.approx(p, rel=0.10), (h, bs)


def _is_union_of_blocks(dropped: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Per map: True where the dropped set equals the union of the kh x kw squares it fully contains."""
    d = dropped.float().flatten(0, 1).unsqueeze(1)
    full = (F.avg_pool2d(d, (kh, kw), stride=1) > 1 - 1e-6).float()  # top-left corners of inside squares
    rebuilt = F.max_pool2d(F.pad(full, (kw - 1, kw - 1, kh - 1, kh - 1)), (kh, kw), stride=1)
    return (rebuilt == d).flatten(1).all(1)


@pytest.mark.parametrize(
    "hw,block_size", [((14, 14), 3), ((14, 14), 4), ((7, 11), 5), ((8, 8), 2), ((9, 6), 7), ((30, 24), 10)]
)
def test_dropped_regions_are_unions_of_whole_blocks_inside_the_map(hw, block_size):
    h, w = hw
    torch.manual_seed(3)
    y = drop_block2d(torch.ones(64, 8, h, w), 0.15, block_size)
    dropped = y == 0
    assert dropped.any()
    assert _is_union_of_blocks(dropped, min(block_size, h), min(block_size, w)).all()
    # A single unit dropped alone would mean a seed outside the valid region or a partial block.
    assert not _is_union_of_blocks(dropped, min(block_size, h) + 1, min(block_size, w)).all()


def test_block_size_at_least_the_map_drops_whole_channels():
    torch.manual_seed(0)
    y = drop_block2d(torch.ones(128, 16, 7, 11), 0.2, 64).flatten(2)
    per_map = (y == 0).float().mean(-1)
    assert set(per_map.unique().tolist()) <= {0.0, 1.0}
    assert per_map.mean().item() == pytest.approx(0.2, rel=0.1)


def test_per_channel_masks_are_independent_and_shared_masks_are_per_sample():
    torch.manual_seed(0)
    x = torch.ones(16, 32, 14, 14)
    own = drop_block2d(x, 0.2, 3, per_channel=True) == 0
    assert not (own == own[:, :1]).all(dim=(1, 2, 3)).any()  # no sample has identical masks over channels
    shared = drop_block2d(x, 0.2, 3, per_channel=False) == 0
    assert (shared == shared[:, :1]).all()
    assert not (shared[0] == shared[1]).all()
    assert _dropped_fraction(shared.logical_not().float()) == pytest.approx(0.2, rel=0.15)


def test_output_is_rescaled_by_count_over_count_ones_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.rand(32, 16, 14, 14) + 0.5
    y = drop_block2d(x, 0.2, 5)
    kept = y != 0
    scale = kept.numel() / kept.sum().item()
    torch.testing.assert_close(y[kept], x[kept] * scale)
    assert y.mean().item() == pytest.approx(x.mean().item(), rel=0.01)


def test_eval_and_zero_probability_are_bitwise_identity():
    x = torch.randn(4, 8, 14, 14)
    module = DropBlock2d(0.3, 5).eval()
    assert module(x) is x
    assert drop_block2d(x, 0.3, 5, training=False) is x
    assert DropBlock2d(0.0, 5).train()(x) is x
    assert DropBlock2d(0.0, 5).is_noop() and not module.is_noop()
    # A schedule at strength 0 (a tensor probability of 0) leaves every bit unchanged too.
    scheduled = DropBlock2d(0.3, 5).train()
    scheduled.strength.fill_(0.0)
    assert torch.equal(scheduled(x), x)


@pytest.mark.parametrize("shape", [(2, 61, 8, 8), (1, 13, 7, 11), (3, 5, 9, 9)])
def test_zero_strength_is_bitwise_identity_whatever_the_mask_size(shape):
    # count / count_ones must be exactly 1 when nothing is dropped: a float numerator over a tensor is computed
    # as count * reciprocal(count_ones), which is 0.99999994 for e.g. 7808 units.
    module = DropBlock2d(0.1, 3).train()
    module.strength.fill_(0.0)
    x = torch.randn(shape)
    assert torch.equal(module(x), x)


def test_schedule_strength_scales_the_drop_fraction():
    torch.manual_seed(0)
    module = DropBlock2d(0.2, 3).train()
    module.strength.fill_(0.5)
    assert _dropped_fraction(module(torch.ones(64, 16, 14, 14))) == pytest.approx(0.1, rel=0.1)


def test_strength_moving_back_and_forth_follows_the_schedule_on_every_call():
    # On CPU the seed rate is remembered per (drop_prob, shape): a schedule revisiting values, and maps of several
    # sizes in one model, must each get their own rate.
    torch.manual_seed(0)
    module = DropBlock2d(0.2, 3).train()
    for strength, (h, w) in [(1.0, (14, 14)), (0.25, (14, 14)), (1.0, (7, 9)), (0.25, (7, 9)), (1.0, (14, 14))]:
        module.strength.fill_(strength)
        expected = 0.2 * strength
        fraction = _dropped_fraction(module(torch.ones(_maps_needed(h, w, 3, expected) // 16 + 1, 16, h, w)))
        assert fraction == pytest.approx(expected, rel=0.1), (strength, h, w)
        assert dropblock_gamma(expected, 3, h, w).item() == pytest.approx(
            dropblock_gamma(torch.tensor(expected), 3, h, w).item(), rel=1e-6
        )


def test_gradient_flows_only_through_kept_units():
    torch.manual_seed(0)
    x = torch.ones(8, 8, 14, 14, requires_grad=True)
    y = drop_block2d(x, 0.2, 3)
    y.sum().backward()
    kept = y.detach() != 0
    scale = kept.numel() / kept.sum().item()
    assert torch.all(x.grad[~kept] == 0)
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], scale))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_finite_output_and_right_fraction(dtype):
    torch.manual_seed(0)
    x = torch.ones(128, 32, 14, 14, dtype=dtype)  # an fp16 sum of this mask (8e5 > 65504) overflows
    y = drop_block2d(x, 0.05, 7)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert _dropped_fraction(y) == pytest.approx(0.05, rel=0.1)
    assert y.float().mean().item() == pytest.approx(1.0, rel=0.01)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_region_gives_finite_output_and_right_fraction(dtype):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 32, 1)
    module = DropBlock2d(0.1, 5).train()
    with torch.autocast("cpu", dtype=dtype):
        h = conv(torch.rand(128, 4, 14, 14) + 1.0)
        y = module(h)
    assert h.dtype == dtype and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert _dropped_fraction(y) == pytest.approx(0.1, rel=0.1)


def test_all_dropped_gives_zeros_not_nan():
    y = drop_block2d(torch.randn(2, 3, 5, 5), torch.tensor(1.0), 3)
    assert torch.isfinite(y).all() and (y == 0).all()


def test_tiny_maps_and_batch_of_one():
    torch.manual_seed(0)
    for shape, bs in [((1, 4, 1, 1), 3), ((1, 4, 2, 3), 2), ((1, 1, 14, 14), 7)]:
        x = torch.randn(shape)
        y = drop_block2d(x, 0.5, bs)
        assert y.shape == x.shape and torch.isfinite(y).all()
    y = drop_block2d(torch.ones(4096, 1, 1, 1), 0.3, 3)
    assert _dropped_fraction(y) == pytest.approx(0.3, rel=0.1)


def test_channels_last_and_non_contiguous_inputs():
    torch.manual_seed(0)
    base = torch.rand(32, 16, 14, 14) + 0.5
    for x in (base.to(memory_format=torch.channels_last), base[:, ::2], base.transpose(2, 3)):
        y = drop_block2d(x, 0.2, 3)
        assert y.shape == x.shape
        kept = y != 0
        ratio = y[kept] / x[kept]
        torch.testing.assert_close(ratio, torch.full_like(ratio, kept.numel() / kept.sum().item()))
        assert _dropped_fraction(y) == pytest.approx(0.2, rel=0.1)
        assert _is_union_of_blocks(~kept, 3, 3).all()


def test_nhwc_layout_drops_spatial_blocks_and_tokens_are_refused():
    torch.manual_seed(0)
    module = timm_drop.create_regularizer("dropblock", drop_prob=0.2, block_size=3).train()
    module.set_layout("NHWC")
    y = module(torch.ones(32, 14, 14, 16))
    dropped = (y == 0).permute(0, 3, 1, 2)
    assert _is_union_of_blocks(dropped, 3, 3).all()
    assert _dropped_fraction(y) == pytest.approx(0.2, rel=0.1)
    with pytest.raises(ValueError, match="NLC"):
        module.set_layout("NLC")
    with pytest.raises(ValueError, match="4-D"):
        drop_block2d(torch.ones(2, 3, 4), 0.1, 3)


def test_strength_change_does_not_recompile():
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    module = DropBlock2d(0.2, 3).train()
    compiled = torch.compile(module, backend=counting_backend, fullgraph=True)
    x = torch.ones(64, 16, 14, 14)
    compiled(x)
    module.strength.fill_(0.25)
    torch.manual_seed(0)
    y = compiled(x)
    assert len(compiles) == 1
    assert _dropped_fraction(y) == pytest.approx(0.05, rel=0.15)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "params,name,exc",
    [
        ({"drop_prob": -0.1, "block_size": 3}, "drop_prob", ValueError),
        ({"drop_prob": 1.0, "block_size": 3}, "drop_prob", ValueError),
        ({"drop_prob": "0.1", "block_size": 3}, "drop_prob", TypeError),
        ({"drop_prob": 0.1, "block_size": 0}, "block_size", ValueError),
        ({"drop_prob": 0.1, "block_size": 2.5}, "block_size", TypeError),
        ({"drop_prob": 0.1, "block_size": True}, "block_size", TypeError),
        ({"drop_prob": 0.1, "block_size": 3, "per_channel": 1}, "per_channel", TypeError),
    ],
)
def test_bad_parameters_are_rejected_naming_the_parameter(params, name, exc):
    with pytest.raises(exc, match=name):
        timm_drop.create_regularizer("dropblock", **params)
    functional = {k: v for k, v in params.items() if k != "per_channel"}
    if name != "per_channel":
        with pytest.raises(exc, match=name):
            drop_block2d(torch.ones(1, 1, 8, 8), **functional)


def test_registry_entry_and_repr():
    assert "dropblock" in timm_drop.list_regularizers()
    module = timm_drop.create_regularizer("dropblock", drop_prob=0.1, block_size=7, per_channel=False)
    assert isinstance(module, DropBlock2d)
    assert "drop_prob=0.1, block_size=7, per_channel=False" in repr(module)
    assert dict(module.state_dict()) == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_one_kernel_rescale_equals_mask_then_float32_scale(dtype, channels_last):
    # the CPU path folds keep and the float32 rescale into one addcmul each way; it must give the values (and
    # gradients) of multiplying by the 0/1 mask and then by the scale, rounded once to the input dtype
    from timm_drop.regularizers import dropblock as D

    x = torch.randn(2, 8, 14, 14, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(0)
    keep, scale = D._keep_mask(x, D._as_prob_tensor(0.1, x.device), 5, 5, True, 1e-6)
    ref = torch.mul(a, keep).mul_(scale)
    ref.backward(g)
    torch.manual_seed(0)
    out = drop_block2d(b, 0.1, 5)
    out.backward(g)
    assert out.dtype == dtype and torch.equal(out, ref) and torch.equal(b.grad, a.grad)
    assert (keep == 0).any()  # something was dropped, so the comparison means something
