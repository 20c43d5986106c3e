"""SpatialScale / Selectout / SelectScale (Chen et al., IJCAI 2020, Eqs. (4)-(6), section 2.3)."""

from __future__ import annotations

import pytest
import torch

from timm_drop import create_regularizer, list_regularizers
from timm_drop.regularizers.registry import regularizer_params
from timm_drop.regularizers.selectscale import (
    Selectout,
    SelectScale,
    SpatialScale,
    channel_scores,
    num_selected,
    select_scale,
    selectout,
    spatial_scale,
)


def ranked_input(n: int = 6, c: int = 10, h: int = 5, w: int = 4, seed: int = 0):
    """Feature maps whose max |x| ranking is known: each map has one peak of size rank + 1 (random sign,
    random place) over a background below 0.5. Returns ``x`` and the per-sample rank ``(N, C)`` (0 = weakest)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, c, h * w, generator=g) - 0.5) * 0.9
    rank = torch.stack([torch.randperm(c, generator=g) for _ in range(n)])
    sign = torch.where(torch.rand(n, c, generator=g) < 0.5, -1.0, 1.0)
    pos = torch.randint(0, h * w, (n, c, 1), generator=g)
    x.scatter_(-1, pos, ((rank + 1).float() * sign).unsqueeze(-1))
    return x.view(n, c, h, w), rank


def channel_ratio(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-(sample, channel) factor y / x, checked to be constant over each map (x must be nonzero)."""
    r = (y.float() / x.float()).flatten(2)
    assert torch.allclose(r, r[..., :1].expand_as(r), rtol=1e-5, atol=1e-6), "factor is not per channel"
    return r[..., 0]


def changed_channels(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (y != x).flatten(2).any(-1)


# -- selection -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "top_rate, c, k", [(0.1, 30, 3), (0.2, 64, 13), (0.05, 10, 1), (1e-6, 100, 1), (1.0, 7, 7), (0.5, 3, 2)]
)
def test_num_selected_is_ceil_of_top_rate_times_channels_clamped(top_rate, c, k):
    assert num_selected(top_rate, c) == k


def test_channel_score_is_max_abs_over_space_in_float32():
    x = torch.tensor([[[[1.0, -3.0], [2.0, 0.5]], [[-0.1, 0.2], [0.0, 0.05]]]], dtype=torch.bfloat16)
    s = channel_scores(x)
    assert s.dtype == torch.float32
    assert s.tolist() == [[3.0, pytest.approx(0.2, rel=1e-2)]]


def test_select_scale_touches_exactly_the_top_channels_of_each_sample():
    x, rank = ranked_input(n=8, c=10)
    y = select_scale(x, top_rate=0.3, q=0.5)
    top = rank >= 7  # the 3 highest max|x| of each sample (peak signs are random: |x| decides)
    assert torch.equal(changed_channels(y, x), top)
    assert torch.equal(y[~top], x[~top])  # untouched maps are bit-identical
    r = channel_ratio(y, x)[top]
    assert ((r >= 0.5) & (r <= 1.5)).all()


def test_selectout_drops_only_top_channels_and_rescales_every_map_by_one_over_keep():
    x, rank = ranked_input(n=64, c=10, seed=1)
    y = selectout(x, drop_prob=0.1, top_rate=0.3)
    r = channel_ratio(y, x)
    dropped = r == 0
    assert dropped.any()
    assert not dropped[rank < 7].any()
    assert torch.allclose(r[~dropped], torch.full_like(r[~dropped], 1 / 0.9))


def test_selectout_realised_drop_fraction_overall_and_among_candidates():
    # drop_prob is the fraction of ALL maps (paper: t=0.2, p=0.9 drops 10% of the maps, from the top 20%).
    torch.manual_seed(0)
    x, rank = ranked_input(n=2000, c=20, h=2, w=2, seed=2)
    y = selectout(x, drop_prob=0.1, top_rate=0.25)  # k = 5 candidates, each dropped w.p. 0.1 * 20 / 5 = 0.4
    dropped = channel_ratio(y, x) == 0
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.006)
    assert dropped[rank >= 15].float().mean().item() == pytest.approx(0.4, abs=0.02)
    assert not dropped[rank < 15].any()


def test_selectout_with_top_rate_one_is_spatial_dropout():
    torch.manual_seed(1)
    x, _ = ranked_input(n=1000, c=8, h=1, w=2, seed=3)
    r = channel_ratio(selectout(x, drop_prob=0.25, top_rate=1.0), x)
    assert (r == 0).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert torch.allclose(r[r != 0], torch.full_like(r[r != 0], 1 / 0.75))


def test_select_scale_factors_are_uniform_on_one_plus_minus_q():
    torch.manual_seed(2)
    x, rank = ranked_input(n=3000, c=10, h=2, w=2, seed=4)
    q = 0.6
    r = channel_ratio(select_scale(x, top_rate=0.2, q=q), x)[rank >= 8]
    assert r.numel() == 6000
    assert r.min().item() >= 1 - q - 1e-6 and r.max().item() <= 1 + q + 1e-6
    assert r.min().item() < 1 - 0.95 * q and r.max().item() > 1 + 0.95 * q
    assert r.mean().item() == pytest.approx(1.0, abs=0.015)
    assert r.var().item() == pytest.approx(q * q / 3, rel=0.06)


def test_spatial_scale_scales_every_map_by_its_own_uniform_factor():
    torch.manual_seed(3)
    x, _ = ranked_input(n=500, c=12, h=3, w=2, seed=5)
    r = channel_ratio(spatial_scale(x, q=0.4), x)
    assert (r != 1).all()
    assert r.mean().item() == pytest.approx(1.0, abs=0.01)
    assert r.var().item() == pytest.approx(0.4**2 / 3, rel=0.08)
    assert len(torch.unique(r)) > 0.99 * r.numel()  # one draw per (sample, channel)


# -- the module: eval, strength, registry ------------------------------------------------------------------


def test_registry_names_and_parameters_match_the_contract():
    for name in ("spatial_scale", "selectout", "selectscale"):
        assert name in list_regularizers()
    assert list(regularizer_params("spatial_scale")) == ["q"]
    assert list(regularizer_params("selectout")) == ["drop_prob", "top_rate"]
    assert list(regularizer_params("selectscale")) == ["top_rate", "q"]
    m = create_regularizer("selectscale", top_rate=0.1, q=0.8)
    assert isinstance(m, SelectScale) and "top_rate=0.1, q=0.8" in repr(m)
    assert m.state_dict() == {} and list(m.parameters()) == []


@pytest.mark.parametrize(
    "module",
    [SpatialScale(q=0.5), SelectScale(top_rate=0.3, q=1.0), Selectout(drop_prob=0.2, top_rate=0.3)],
    ids=["spatial_scale", "selectscale", "selectout"],
)
def test_eval_and_zero_strength_are_bit_identical(module):
    x, _ = ranked_input()
    module.eval()
    assert torch.equal(module(x), x)
    module.train()
    assert not torch.equal(module(x), x)
    module.strength.fill_(0.0)
    assert torch.equal(module(x), x)


def test_zero_q_and_zero_drop_prob_are_identity_in_training():
    x, _ = ranked_input()
    for m in (SpatialScale(0.0), SelectScale(0.2, 0.0), Selectout(0.0, 0.2)):
        assert m.train().is_noop() and torch.equal(m(x), x)


def test_strength_scales_q_of_select_scale():
    torch.manual_seed(4)
    x, rank = ranked_input(n=2000, c=10, h=1, w=2, seed=6)
    m = SelectScale(top_rate=0.2, q=0.8).train()
    m.strength.fill_(0.5)
    r = channel_ratio(m(x), x)[rank >= 8]
    assert r.min().item() >= 0.6 - 1e-6 and r.max().item() <= 1.4 + 1e-6
    assert r.var().item() == pytest.approx(0.4**2 / 3, rel=0.08)


# -- gradients, dtypes, odd inputs, layouts ---------------------------------------------------------------


@pytest.mark.parametrize("fn", ["select_scale", "selectout", "spatial_scale"])
def test_gradient_is_the_channel_factor(fn):
    x, _ = ranked_input(n=4, c=10)
    x.requires_grad_(True)
    call = {
        "select_scale": lambda t: select_scale(t, 0.3, 0.5),
        "selectout": lambda t: selectout(t, 0.2, 0.3),
        "spatial_scale": lambda t: spatial_scale(t, 0.5),
    }[fn]
    y = call(x)
    g = torch.randn_like(y)
    y.backward(g)
    factor = (y / x).detach()
    torch.testing.assert_close(x.grad, g * factor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["spatial_scale", "selectscale", "selectout"])
def test_low_precision_pure_and_autocast_stay_finite_and_select_the_same_maps(dtype, name):
    params = {"spatial_scale": {"q": 1.0}, "selectscale": {"top_rate": 0.3, "q": 1.0}}.get(
        name, {"drop_prob": 0.3, "top_rate": 0.3}
    )
    m = create_regularizer(name, **params).train()
    x, rank = ranked_input(n=16, c=10)
    y = m(x.to(dtype) * 1000)  # fp16 values near 1e4 times up to 2 stay finite
    assert y.dtype == dtype and torch.isfinite(y).all()
    if name == "selectscale":
        assert not changed_channels(y, x.to(dtype) * 1000)[rank < 7].any()
    if name == "selectout":
        assert (y.flatten(2) != 0).all(-1)[rank < 7].all()
    conv = torch.nn.Conv2d(10, 10, 3, padding=1)
    with torch.autocast("cpu", dtype=dtype):
        z = m(conv(x))
    assert z.dtype == dtype and torch.isfinite(z).all()


@pytest.mark.parametrize("name", ["spatial_scale", "selectscale", "selectout"])
@pytest.mark.parametrize("kind", ["zeros", "constant", "negative", "huge"])
def test_degenerate_inputs_give_finite_outputs(name, kind):
    params = {"spatial_scale": {"q": 0.5}, "selectscale": {"top_rate": 0.2, "q": 0.5}}.get(
        name, {"drop_prob": 0.2, "top_rate": 0.2}
    )
    m = create_regularizer(name, **params).train()
    x = {
        "zeros": torch.zeros(3, 8, 4, 4),
        "constant": torch.full((3, 8, 4, 4), 2.5),
        "negative": -torch.rand(3, 8, 4, 4) - 1,
        "huge": torch.randn(3, 8, 4, 4) * 1e30,
    }[kind]
    y = m(x)
    assert torch.isfinite(y).all()
    if kind == "zeros":
        assert torch.equal(y, x)


@pytest.mark.parametrize("shape", [(1, 6, 1, 1), (2, 6, 2, 3), (1, 1, 3, 3), (3, 5), (2, 6, 2, 3, 2)])
def test_tiny_maps_single_sample_single_channel_and_any_spatial_rank(shape):
    torch.manual_seed(5)
    x = torch.randn(shape)
    for m in (SelectScale(0.5, 0.5), Selectout(0.3, 0.5), SpatialScale(0.5)):
        y = m.train()(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
    k = num_selected(0.5, shape[1])
    assert (
        int(
            changed_channels(
                select_scale(x, 0.5, 0.5).view(shape[0], shape[1], -1), x.view(shape[0], shape[1], -1)
            )
            .sum(1)
            .max()
        )
        == k
    )


@pytest.mark.parametrize("fn", [lambda t: select_scale(t, 0.3, 0.7), lambda t: selectout(t, 0.2, 0.3)])
def test_channels_last_and_non_contiguous_inputs_match_contiguous(fn):
    x, _ = ranked_input(n=4, c=10, h=6, w=6)
    variants = [
        x.to(memory_format=torch.channels_last),
        x.transpose(2, 3).contiguous().transpose(2, 3),
    ]
    torch.manual_seed(6)
    ref = fn(x)
    for v in variants:
        torch.manual_seed(6)
        assert torch.equal(fn(v), ref)
    torch.manual_seed(6)
    out = fn(x.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_strided_view_input_matches_contiguous():
    x, _ = ranked_input(n=4, c=10, h=6, w=6)
    big = torch.zeros(4, 20, 6, 12)
    big[:, ::2, :, ::2] = x
    view = big[:, ::2, :, ::2]
    assert not view.is_contiguous()
    torch.manual_seed(7)
    ref = select_scale(x, 0.3, 0.7)
    torch.manual_seed(7)
    assert torch.equal(select_scale(view, 0.3, 0.7), ref)


def test_nhwc_and_token_layouts_select_per_sample_channels():
    x, rank = ranked_input(n=4, c=10, h=3, w=3)
    m = SelectScale(top_rate=0.3, q=0.9).train()
    torch.manual_seed(8)
    ref = m(x)
    m.set_layout("NHWC")
    torch.manual_seed(8)
    assert torch.equal(m(x.permute(0, 2, 3, 1)), ref.permute(0, 2, 3, 1))
    tokens = x.flatten(2).transpose(1, 2)  # (B, L, C): a channel's score is its max |x| over the tokens
    m.set_layout("NLC")
    y = m(tokens)
    assert y.shape == tokens.shape
    changed = (y != tokens).any(1)
    assert torch.equal(changed, rank >= 7)


# -- parameter validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("selectscale", {"top_rate": 1.5, "q": 0.5}, "top_rate"),
        ("selectscale", {"top_rate": 0.0, "q": 0.5}, "top_rate"),
        ("selectscale", {"top_rate": -0.1, "q": 0.5}, "top_rate"),
        ("selectscale", {"top_rate": 0.2, "q": 1.5}, "q"),
        ("spatial_scale", {"q": -0.1}, "q"),
        ("selectout", {"drop_prob": -0.1, "top_rate": 0.2}, "drop_prob"),
        ("selectout", {"drop_prob": 1.0, "top_rate": 1.0}, "drop_prob"),
        ("selectout", {"drop_prob": 0.3, "top_rate": 0.2}, "drop_prob .* top_rate"),
    ],
)
def test_bad_parameters_are_rejected_by_name(name, params, match):
    with pytest.raises(ValueError, match=match):
        create_regularizer(name, **params)


def test_functional_forms_validate_too():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="top_rate"):
        select_scale(x, 2.0, 0.5)
    with pytest.raises(ValueError, match="q"):
        spatial_scale(x, 1.2)
    with pytest.raises(ValueError, match="drop_prob"):
        selectout(x, 0.5, 0.25)
    with pytest.raises(TypeError, match="top_rate"):
        create_regularizer("selectscale", top_rate="0.2", q=0.5)
    with pytest.raises(ValueError, match="channels-first"):
        select_scale(torch.randn(5), 0.5, 0.5)


def test_compiles_in_one_graph_and_strength_changes_do_not_recompile():
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    m = Selectout(drop_prob=0.2, top_rate=0.3).train()
    compiled = torch.compile(m, fullgraph=True, backend=counter)
    x, _ = ranked_input()
    compiled(x)
    m.strength.fill_(0.5)
    compiled(x)
    m.strength.fill_(0.0)
    assert torch.equal(compiled(x), x)
    assert counter.frame_count == 1
