"""AttentionDrop (Ouyang et al., ICME 2019, Eqs. (4)-(9), Algorithm 1): modes am / sm / ad."""

from __future__ import annotations

import pytest
import torch

from timm_drop import create_regularizer, list_regularizers
from timm_drop.regularizers.attentiondrop import AttentionDrop, attention_drop, attention_weights
from timm_drop.regularizers.registry import regularizer_params


def ranked_maps(
    n: int = 4, c: int = 3, h: int = 4, w: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps whose units are a random permutation of distinct values; returns ``x`` and each unit's rank
    within its map (0 = smallest), shape ``(N, C, H*W)``. Values are shifted per map, some negative."""
    g = torch.Generator().manual_seed(seed)
    hw = h * w
    rank = torch.stack([torch.randperm(hw, generator=g) for _ in range(n * c)]).view(n, c, hw)
    shift = torch.randn(n, c, 1, generator=g) * 3
    x = rank.float() * 0.5 + shift
    return x.view(n, c, h, w), rank


def factor(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (y.float() / x.float()).flatten(2)


# -- which units each mode touches --------------------------------------------------------------------------


def test_am_touches_only_the_top_units_and_zeroes_or_rescales_them():
    torch.manual_seed(0)
    x, rank = ranked_maps(n=200, c=2, h=4, w=5)  # 20 units, top_rate 0.2 -> the 4 largest
    y = attention_drop(x, drop_prob=0.3, top_rate=0.2, mode="am")
    top = rank >= 16
    yf, xf = y.flatten(2), x.flatten(2)
    assert torch.equal(yf[~top], xf[~top])
    f = factor(y, x)[top]
    dropped = f == 0
    assert torch.allclose(f[~dropped], torch.full_like(f[~dropped], 1 / 0.7))
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.03)


def test_sm_soft_mask_attenuates_in_proportion_to_normalised_activation():
    torch.manual_seed(1)
    x, rank = ranked_maps(n=300, c=2, h=3, w=3)
    alpha = 0.4
    y = attention_drop(x, drop_prob=alpha, top_rate=0.2, mode="sm")
    w = rank.float() / 8  # min-max normalised activation F^ of a permutation of 0..8
    f = factor(y, x)
    gated = (1 - w) / (1 - alpha * w)
    kept = 1 / (1 - alpha * w)
    is_gated = torch.isclose(f, gated, rtol=1e-5, atol=1e-6)
    assert (is_gated | torch.isclose(f, kept, rtol=1e-5)).all()
    assert torch.equal(y.flatten(2)[rank == 0], x.flatten(2)[rank == 0])  # the map minimum never moves
    assert (f[rank == 8] == 0).float().mean().item() == pytest.approx(
        alpha, abs=0.04
    )  # the maximum is dropped
    # the reduction of a gated unit grows with its activation: high activations are dropped harder
    attenuation = (1 - f).clamp_min(0)
    by_rank = torch.stack([attenuation[rank == r].mean() for r in range(9)])
    assert (by_rank.diff() > 0).all()
    assert is_gated[rank > 0].float().mean().item() == pytest.approx(alpha, abs=0.03)


def test_ad_soft_mask_only_on_the_top_units():
    torch.manual_seed(2)
    x, rank = ranked_maps(n=300, c=2, h=4, w=4)  # 16 units, top_rate 0.25 -> 4 largest
    alpha = 0.5
    y = attention_drop(x, drop_prob=alpha, top_rate=0.25, mode="ad")
    top = rank >= 12
    assert torch.equal(y.flatten(2)[~top], x.flatten(2)[~top])
    w = rank.float() / 15
    f = factor(y, x)
    gated = torch.isclose(f, (1 - w) / (1 - alpha * w), rtol=1e-5, atol=1e-6)
    kept = torch.isclose(f, 1 / (1 - alpha * w), rtol=1e-5)
    assert (gated | kept)[top].all()
    assert (f[top & (rank < 15)] > 0).all()  # soft: only the map maximum can reach zero
    assert gated[top].float().mean().item() == pytest.approx(alpha, abs=0.03)


def test_modes_differ_as_specified():
    x, rank = ranked_maps(n=2, c=3, h=4, w=4)
    w_am, w_sm, w_ad = (attention_weights(x, 0.25, m) for m in ("am", "sm", "ad"))
    top = rank >= 12
    assert torch.equal(w_am, top.float())
    torch.testing.assert_close(w_sm, rank.float() / 15)
    torch.testing.assert_close(w_ad, w_sm * top)
    for mode, w in (("am", w_am), ("sm", w_sm), ("ad", w_ad)):
        torch.manual_seed(3)
        y = attention_drop(x, 0.5, 0.25, mode)
        assert torch.equal(y.flatten(2) != x.flatten(2), w > 0), mode  # the changed units are exactly w > 0


@pytest.mark.parametrize("mode", ["am", "sm", "ad"])
def test_expected_activation_is_preserved_per_unit(mode):
    torch.manual_seed(4)
    x, _ = ranked_maps(n=1, c=2, h=3, w=4)
    xs = x.expand(6000, -1, -1, -1)  # 6000 independent draws of the same sample
    y = attention_drop(xs, drop_prob=0.3, top_rate=0.25, mode=mode)
    mean = y.mean(0)
    err = (mean - x[0]).abs() / x[0].abs().clamp_min(0.5)
    assert err.max().item() < 0.06  # no rescale would be off by up to 30%, Eq. (9)'s numel/sum by ~15%


def test_top_units_with_ties_and_constant_maps_select_nothing():
    x = torch.tensor([[[[1.0, 5.0, 5.0, 2.0]], [[3.0, 3.0, 3.0, 3.0]]]])  # k = 1 of 4; tie at the top
    assert torch.equal(attention_weights(x, 0.25, "am"), torch.zeros(1, 2, 4))
    assert torch.equal(attention_weights(x, 0.5, "am")[0, 0], torch.tensor([0.0, 1.0, 1.0, 0.0]))
    torch.manual_seed(5)
    assert torch.equal(attention_drop(x, 0.9, 0.25, "ad"), x)
    assert torch.equal(attention_weights(x, 1.0, "am"), torch.ones(1, 2, 4))  # top_rate 1: all units


# -- module behaviour ----------------------------------------------------------------------------------------


def test_registry_name_parameters_and_repr():
    assert "attentiondrop" in list_regularizers()
    assert regularizer_params("attentiondrop")["mode"] == "ad"
    assert list(regularizer_params("attentiondrop")) == ["drop_prob", "top_rate", "mode"]
    m = create_regularizer("attentiondrop", drop_prob=0.1, top_rate=0.2, mode="sm")
    assert isinstance(m, AttentionDrop) and "drop_prob=0.1, top_rate=0.2, mode='sm'" in repr(m)
    assert m.state_dict() == {} and list(m.parameters()) == []


@pytest.mark.parametrize("mode", ["am", "sm", "ad"])
def test_eval_zero_prob_and_zero_strength_are_bit_identical(mode):
    x, _ = ranked_maps()
    m = AttentionDrop(0.5, 0.25, mode)
    assert torch.equal(m.eval()(x), x)
    assert not torch.equal(m.train()(x), x)
    m.strength.fill_(0.0)
    assert torch.equal(m(x), x)
    assert torch.equal(AttentionDrop(0.0, 0.25, mode).train()(x), x)


def test_strength_scales_the_gate_probability():
    torch.manual_seed(6)
    x, rank = ranked_maps(n=2000, c=1, h=2, w=2)
    m = AttentionDrop(0.4, 0.25, "am").train()
    m.strength.fill_(0.25)
    f = factor(m(x), x)[rank == 3]
    assert (f == 0).float().mean().item() == pytest.approx(0.1, abs=0.02)
    assert torch.allclose(f[f != 0], torch.full_like(f[f != 0], 1 / 0.9))


@pytest.mark.parametrize("mode", ["am", "sm", "ad"])
def test_gradient_is_the_detached_factor(mode):
    torch.manual_seed(7)
    x, _ = ranked_maps(n=3, c=2)
    x.requires_grad_(True)
    y = attention_drop(x, 0.5, 0.25, mode)
    g = torch.randn_like(y)
    y.backward(g)
    # scores are detached: no gradient flows through the normalisation or the threshold
    torch.testing.assert_close(x.grad, g * (y / x).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["am", "sm", "ad"])
def test_low_precision_pure_and_autocast_are_finite_and_unbiased(dtype, mode):
    torch.manual_seed(8)
    x, rank = ranked_maps(n=2000, c=2, h=2, w=5)
    y = attention_drop(x.to(dtype), 0.02, 0.1, mode)  # top_rate 0.1 of 10 -> the largest unit
    assert y.dtype == dtype and torch.isfinite(y).all()
    # gate drawn in float32: a bf16 rand would drop ~6x too often at small probabilities
    assert (y.flatten(2)[rank == 9] == 0).float().mean().item() == pytest.approx(0.02, abs=0.008)
    conv = torch.nn.Conv2d(2, 2, 3, padding=1)
    with torch.autocast("cpu", dtype=dtype):
        z = AttentionDrop(0.3, 0.2, mode).train()(conv(x))
    assert z.dtype == dtype and torch.isfinite(z).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_gate_probability_is_unbiased_in_low_precision(dtype):
    # top_rate 1 in "am" is plain dropout; a bf16 uniform would give ~2x the zeros at 0.2%
    torch.manual_seed(13)
    x = (torch.rand(100, 10, 20, 20) + 1).to(dtype)
    y = attention_drop(x, 0.002, 1.0, "am")
    assert (y == 0).float().mean().item() == pytest.approx(0.002, rel=0.2)


@pytest.mark.parametrize("mode", ["am", "sm", "ad"])
@pytest.mark.parametrize("kind", ["zeros", "constant", "negative", "huge", "huge_fp16"])
def test_degenerate_inputs_give_finite_outputs(mode, kind):
    torch.manual_seed(9)
    x = {
        "zeros": torch.zeros(2, 3, 4, 4),
        "constant": torch.full((2, 3, 4, 4), -7.0),
        "negative": -torch.rand(2, 3, 4, 4) - 1,
        "huge": torch.randn(2, 3, 4, 4) * 1e30,
        "huge_fp16": (torch.randn(2, 3, 4, 4) * 2e4).clamp(-3e4, 3e4).half(),  # x 1/(1 - 0.5) still fits
    }[kind]
    y = attention_drop(x, 0.5, 0.25, mode)
    assert torch.isfinite(y).all()
    if kind in ("zeros", "constant"):
        assert torch.equal(y, x)  # nothing stands out in a constant map: no top units, F^ = 0


@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (2, 3, 2, 3), (1, 1, 5, 1), (2, 4), (2, 3, 2, 3, 2)])
@pytest.mark.parametrize("mode", ["am", "sm", "ad"])
def test_tiny_maps_single_sample_and_any_spatial_rank(shape, mode):
    torch.manual_seed(10)
    x = torch.randn(shape)
    y = AttentionDrop(0.5, 0.3, mode).train()(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    if x[0, 0].numel() == 1 and mode != "am":
        assert torch.equal(y, x)  # a one-unit map is constant: F^ = 0


@pytest.mark.parametrize("mode", ["am", "sm", "ad"])
def test_channels_last_and_non_contiguous_match_contiguous(mode):
    x, _ = ranked_maps(n=2, c=3, h=5, w=6)
    torch.manual_seed(11)
    ref = attention_drop(x, 0.5, 0.2, mode)
    for v in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        torch.manual_seed(11)
        torch.testing.assert_close(attention_drop(v, 0.5, 0.2, mode), ref, rtol=0, atol=0)
    big = torch.zeros(2, 6, 5, 12)
    big[:, ::2, :, ::2] = x
    torch.manual_seed(11)
    torch.testing.assert_close(attention_drop(big[:, ::2, :, ::2], 0.5, 0.2, mode), ref, rtol=0, atol=0)


def test_nhwc_and_token_layouts():
    x, _ = ranked_maps(n=2, c=3, h=4, w=4)
    m = AttentionDrop(0.5, 0.25, "ad").train()
    torch.manual_seed(12)
    ref = m(x)
    m.set_layout("NHWC")
    torch.manual_seed(12)
    assert torch.equal(m(x.permute(0, 2, 3, 1)), ref.permute(0, 2, 3, 1))
    tokens = x.flatten(2).transpose(1, 2)  # (B, L, C): each channel is a map over the tokens
    m.set_layout("NLC")
    torch.manual_seed(12)
    assert torch.equal(m(tokens), ref.flatten(2).transpose(1, 2))


@pytest.mark.parametrize(
    "params, exc, match",
    [
        ({"drop_prob": 0.1, "top_rate": 0.2, "mode": "hard"}, ValueError, "mode"),
        ({"drop_prob": 0.1, "top_rate": 1.2}, ValueError, "top_rate"),
        ({"drop_prob": 0.1, "top_rate": 0.0}, ValueError, "top_rate"),
        ({"drop_prob": -0.1, "top_rate": 0.2}, ValueError, "drop_prob"),
        ({"drop_prob": 1.0, "top_rate": 0.2}, ValueError, "drop_prob"),
        ({"drop_prob": "0.1", "top_rate": 0.2}, TypeError, "drop_prob"),
    ],
)
def test_bad_parameters_are_rejected_by_name(params, exc, match):
    with pytest.raises(exc, match=match):
        create_regularizer("attentiondrop", **params)
    with pytest.raises(exc, match=match):
        attention_drop(
            torch.randn(1, 2, 3, 3), params["drop_prob"], params["top_rate"], params.get("mode", "ad")
        )


def test_compiles_in_one_graph_and_strength_changes_do_not_recompile():
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    m = AttentionDrop(0.3, 0.25, "ad").train()
    compiled = torch.compile(m, fullgraph=True, backend=counter)
    x, _ = ranked_maps()
    compiled(x)
    m.strength.fill_(0.5)
    compiled(x)
    m.strength.fill_(0.0)
    assert torch.equal(compiled(x), x)
    assert counter.frame_count == 1


@pytest.mark.parametrize("mode", ["ad", "am", "sm"])
def test_a_nan_unit_changes_no_other_units_weight(mode):
    # The NaN replaces a unit that is neither the map's min, max nor among its top units, so every other unit's
    # drop weight must be exactly the clean input's, and the output is NaN at that unit only.
    x = torch.randn(4, 8, 7, 7)
    flat = x.view(4, 8, -1)
    pos = flat[1, 2].argsort()[flat.shape[-1] // 3].item()
    dirty = x.clone()
    dirty.view(4, 8, -1)[1, 2, pos] = float("nan")
    nan = torch.isnan(dirty.view(4, 8, -1))
    ref, w = attention_weights(x, 0.3, mode), attention_weights(dirty, 0.3, mode)
    assert torch.equal(w[~nan], ref[~nan])
    out = attention_drop(dirty, 0.5, 0.3, mode)
    assert torch.equal(torch.isnan(out), torch.isnan(dirty))


# -- the CPU fast path: order keys for the top-k, gates drawn sparsely ----------------------------------------


def _tricky_maps(kind: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(21)
    x = torch.randn(3, 5, 9, 7, generator=g)
    if kind == "relu_ties":  # most of each map is 0: the threshold sits on a tie
        x = (x - 1.0).relu()
    elif kind == "quantised":  # few distinct values, ties everywhere
        x = (x * 2).round()
    elif kind == "signed_zeros":  # -0.0 and +0.0 are equal scores
        x = torch.where(x.abs() < 0.8, torch.where(x > 0, 0.0, -0.0), x)
    elif kind == "relu_signed_zeros":  # no negative score: the keys are the raw bits, -0.0 among them
        x = torch.where(x < 0.5, torch.where(x > 0, 0.0, -0.0), x)
    elif kind == "relu_signed_zeros_nan":  # a NaN ranks lowest, below -0.0: not the raw-bits path
        x = torch.where(x < 0.5, torch.where(x > 0, 0.0, -0.0), x)
        x[0, 1, 2, :4] = float("nan")
    elif kind == "infinities":
        x[0, 0, 0, :3] = float("inf")
        x[1, 2, 4, :5] = float("-inf")
    elif kind == "huge":
        x = x * 3e4 if dtype == torch.float16 else x * 1e30
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "kind",
    ["normal", "relu_ties", "quantised", "signed_zeros", "relu_signed_zeros", "relu_signed_zeros_nan", "infinities",
     "huge"],
)  # fmt: skip
@pytest.mark.parametrize("top_rate", [0.05, 0.2, 0.5, 0.9])
def test_top_units_from_order_keys_are_the_float_reference_units(dtype, kind, top_rate):
    from timm_drop.regularizers.attentiondrop import _ranking, _scores, _top_units, _top_units_fast
    from timm_drop.regularizers.selectscale import num_selected

    x = _tricky_maps(kind, dtype)
    k = num_selected(top_rate, x[0, 0].numel())
    ref_idx, ref_vals, ref_sel = _top_units(_scores(x)[0], k)
    scores, _, non_negative = _ranking(x)
    assert non_negative == (kind in ("relu_ties", "relu_signed_zeros"))
    idx, vals, sel = _top_units_fast(scores, k, non_negative)
    as_set = lambda i, s: torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, i, s)  # noqa: E731
    assert torch.equal(as_set(idx, sel), as_set(ref_idx, ref_sel))
    # the gathered values are the float32 scores (signed zeros compare equal)
    assert torch.equal(vals.float().sort(-1).values, ref_vals.sort(-1).values)


def test_signed_zeros_tie_at_the_threshold_and_are_not_selected():
    # sorted: 2, 1, +0, +0, -0, -0, -1, -2; top_rate 0.5 -> k = 4, the 5th largest is 0: only 2 and 1 are above it
    x = torch.tensor([0.0, -0.0, 2.0, 0.0, -1.0, -0.0, 1.0, -2.0]).view(1, 1, 2, 4)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xd = x.to(dtype).clone().requires_grad_(True)
        attention_drop(xd, 0.2, 0.5, "am").backward(torch.ones_like(xd))
        touched = (xd.grad != 1).flatten()  # the gradient is the factor: 1 exactly on untouched units
        assert touched.tolist() == [False, False, True, False, False, False, True, False], dtype


@pytest.mark.parametrize("mode", ["am", "sm"])
def test_sparse_gate_hits_every_position_at_the_gate_probability(mode):
    # p = 0.1 takes the CPU path that draws only the gated units; each unit must be gated with p independently of
    # its position (top_rate 1: every unit is a top unit, so am is dropout on all of them)
    torch.manual_seed(22)
    x = torch.rand(4000, 2, 3, 5) + 1.0  # sm: the largest unit of each map has w = 1, the gate zeroes it
    y = attention_drop(x, 0.1, 1.0, mode)
    dropped = (y == 0).flatten(1).float()
    if mode == "sm":
        is_max = x.flatten(2) == x.flatten(2).amax(-1, keepdim=True)
        per_map = dropped.view(4000, 2, 15)[is_max].view(4000, 2)
        assert per_map.mean().item() == pytest.approx(0.1, abs=0.01)
        assert (dropped.sum() == per_map.sum()).item()  # only a w = 1 unit can reach 0
    else:
        per_position = dropped.mean(0)
        assert per_position.mean().item() == pytest.approx(0.1, abs=0.004)
        # binomial(4000, 0.1) per position: sd 0.0047; 30 positions all within 4.5 sd
        assert (per_position - 0.1).abs().max().item() < 0.022
        torch.testing.assert_close(y[y != 0], (x / 0.9)[y != 0])


@pytest.mark.parametrize("mode", ["ad", "am", "sm"])
def test_compiled_on_cpu_runs_the_eager_fast_path_bit_for_bit(mode):
    # Under torch.compile on CPU the factor is an opaque op running the eager code, so the same seed gives the same
    # output and gradient as eager mode (sparse gates and all), in one graph.
    import torch._dynamo.testing

    torch._dynamo.reset()
    x = torch.randn(2, 8, 7, 7, dtype=torch.bfloat16).requires_grad_(True)
    m = AttentionDrop(0.1, 0.2, mode).train()
    torch.manual_seed(23)
    ref = m(x)
    ref.backward(torch.ones_like(ref))
    ref_grad, x.grad = x.grad, None
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(m, fullgraph=True, backend=counter)
    torch.manual_seed(23)
    out = compiled(x)
    out.backward(torch.ones_like(out))
    assert counter.frame_count == 1
    assert torch.equal(out, ref) and torch.equal(x.grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_post_relu_maps_touch_exactly_the_reference_top_units(dtype):
    # No negative score (the usual input after a ReLU): the top-k ranks the raw bits; ties at 0 must stay out.
    torch.manual_seed(25)
    x = (torch.randn(4, 6, 8, 8) - 0.5).relu().to(dtype).requires_grad_(True)
    attention_drop(x, 0.2, 0.3, "am").backward(torch.ones_like(x))
    touched = x.grad != 1
    assert torch.equal(touched.flatten(2), attention_weights(x, 0.3, "am") > 0)
