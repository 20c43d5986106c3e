"""The behaviour every registered activation regularizer shares, checked for each one.

Every activation regularizer in the registry must have an entry in ``CASES`` (representative parameters, the
parameters that make it a no-op, and, where ``drop_prob`` is the fraction of units zeroed, that fraction);
``test_every_registered_regularizer_has_a_contract_case`` fails otherwise, so a new method cannot land untested.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from timm_drop import create_regularizer, list_regularizers, set_progress
from timm_drop.regularizers import LAYOUTS, Regularizer
from timm_drop.schedules import make_schedule


@dataclass(frozen=True)
class Case:
    name: str
    params: dict[str, Any]
    zero: dict[str, Any]  # the same regularizer at strength 0 (drop_prob 0 / q 0)
    zero_fraction: float | None = None  # expected fraction of zeroed units of a positive input, if defined
    variant: str = field(default="")

    @property
    def id(self) -> str:
        return f"{self.name}-{self.variant}" if self.variant else self.name


CASES = [
    Case("dropout", {"drop_prob": 0.3}, {"drop_prob": 0.0}, zero_fraction=0.3),
    Case("spatial_dropout", {"drop_prob": 0.3}, {"drop_prob": 0.0}, zero_fraction=0.3),
    Case("droppath", {"drop_prob": 0.3}, {"drop_prob": 0.0}, zero_fraction=0.3),
    Case("dropblock", {"drop_prob": 0.3, "block_size": 3}, {"drop_prob": 0.0, "block_size": 3}, 0.3),
    Case(
        "dropblock",
        {"drop_prob": 0.3, "block_size": 4, "per_channel": False},
        {"drop_prob": 0.0, "block_size": 4, "per_channel": False},
        0.3,
        variant="shared",
    ),
    Case("corrdrop", {"drop_prob": 0.3, "block_size": 3}, {"drop_prob": 0.0, "block_size": 3}, 0.3),
    Case("spatial_scale", {"q": 0.5}, {"q": 0.0}),
    Case("selectscale", {"top_rate": 0.5, "q": 0.5}, {"top_rate": 0.5, "q": 0.0}),
    Case("selectout", {"drop_prob": 0.2, "top_rate": 0.5}, {"drop_prob": 0.0, "top_rate": 0.5}, 0.2),
    *[
        Case(
            "attentiondrop",
            {"drop_prob": 0.3, "top_rate": 0.3, "mode": mode},
            {"drop_prob": 0.0, "top_rate": 0.3, "mode": mode},
            variant=mode,
        )
        for mode in ("ad", "am", "sm")
    ],
]


def _registered() -> set[str]:
    return set(list_regularizers())


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request) -> Case:
    c: Case = request.param
    if c.name not in _registered():
        pytest.skip(f"{c.name!r} is not registered yet")
    return c


def build(params_case: Case, zero: bool = False) -> Regularizer:
    m = create_regularizer(params_case.name, **(params_case.zero if zero else params_case.params))
    assert isinstance(m, Regularizer)
    return m.train()


def positive(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.rand(*shape) + 0.5).to(dtype)


def deviation(y: torch.Tensor, x: torch.Tensor) -> float:
    """Mean relative change of the output: 0 for the identity, grows with the regularization strength."""
    return ((y.float() - x.float()).abs().mean() / x.float().abs().mean()).item()


def test_every_registered_regularizer_has_a_contract_case():
    covered = {c.name for c in CASES}
    # the registry holds activation regularizers only (LayerOut, a controller, is not in it)
    missing = [name for name in list_regularizers() if name not in covered]
    assert not missing, f"add contract cases for registered regularizer(s) {missing} to CASES"


# -- identity ----------------------------------------------------------------------------------------------
def test_eval_is_identity_bit_for_bit(case):
    m = build(case).eval()
    x = torch.randn(4, 8, 7, 7)
    assert torch.equal(m(x), x)


def test_zero_strength_is_identity_in_training(case):
    x = torch.randn(4, 8, 7, 7)
    assert build(case, zero=True).is_noop()
    assert torch.equal(build(case, zero=True)(x), x)


@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_output_keeps_the_input_strides_even_on_size_one_dims(case, strength):
    # A LayerNorm2d output of shape (N, C, 1, 1) carries strides (C, 1, C, C); an elementwise result would get
    # (C, 1, 1, 1), and downstream kernels then round differently, so strength 0 would not be an exact identity.
    m = build(case)
    m.strength.fill_(strength)
    x = torch.rand(4, 8, 1, 1) + 0.5
    x = x.as_strided(x.shape, (8, 1, 8, 8))
    y = m(x)
    assert y.stride() == x.stride()
    if strength == 0.0:
        assert torch.equal(y, x)


def test_schedule_at_zero_strength_is_identity_and_full_strength_is_not(case):
    m = build(case)
    m.schedule = make_schedule({"kind": "linear", "start": 0.0, "end": 1.0})
    x = positive(16, 8, 7, 7)
    set_progress(m, 0.0)
    assert m.strength.item() == 0.0
    assert torch.equal(m(x), x)
    set_progress(m, 1.0)
    assert not torch.equal(m(x), x)


# -- state ----------------------------------------------------------------------------------------------------
def test_no_parameters_and_no_state_dict_keys(case):
    m = build(case)
    assert list(m.parameters()) == []
    assert m.state_dict() == {}
    conv = nn.Conv2d(3, 8, 3)
    model = nn.Sequential(conv, m)
    assert list(model.state_dict()) == [f"0.{k}" for k in conv.state_dict()]
    assert isinstance(m.strength, torch.Tensor) and m.strength.dim() == 0


def test_deepcopy_is_independent_and_works(case):
    m = build(case)
    m.schedule = make_schedule("linear")
    m.strength.fill_(0.5)
    c = copy.deepcopy(m)
    assert type(c) is type(m) and c.extra_repr() == m.extra_repr()
    assert c.strength.item() == 0.5
    c.strength.fill_(1.0)
    assert m.strength.item() == 0.5
    assert c(positive(2, 4, 5, 5)).shape == (2, 4, 5, 5)


def test_extra_repr_shows_the_settings(case):
    text = build(case).extra_repr()
    for key, value in case.params.items():
        assert key in text, f"{key!r} missing from extra_repr {text!r}"
        assert str(value) in text or repr(value) in text, f"{key}={value!r} missing from {text!r}"


def test_set_layout_refuses_unsupported_layouts_naming_them(case):
    m = build(case)
    for layout in [*(lay for lay in LAYOUTS if lay not in type(m).layouts), "NCWH"]:
        with pytest.raises(ValueError, match=layout):
            m.set_layout(layout)


# -- numerics ---------------------------------------------------------------------------------------------------
def _hostile_inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # Inverted dropout scales kept units by up to 1 / (1 - p), so "huge" in fp16 leaves that headroom.
    huge = 1e4 if dtype == torch.float16 else 1e30
    shape = (4, 8, 7, 7)
    inputs = {
        "zeros": torch.zeros(shape),
        "constant": torch.full(shape, 3.0),
        "negative": -positive(*shape),
        "mixed": torch.randn(shape),
        "huge-constant": torch.full(shape, huge),
        "huge-random": torch.rand(shape) * huge,
    }
    return {k: v.to(dtype) for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_finite_for_hostile_inputs_in_every_dtype(case, dtype):
    torch.manual_seed(0)
    m = build(case)
    for kind, x in _hostile_inputs(dtype).items():
        y = m(x)
        assert y.dtype == dtype and y.shape == x.shape, kind
        assert torch.isfinite(y).all(), f"{case.id}: non-finite output for {kind} {dtype}"
        with torch.autocast("cpu", dtype=dtype if dtype != torch.float32 else torch.bfloat16):
            y = m(x)
        assert torch.isfinite(y).all(), f"{case.id}: non-finite output under autocast for {kind} {dtype}"


@pytest.mark.parametrize("shape", [(2, 4, 1, 1), (2, 4, 2, 3), (1, 3, 1, 5), (1, 8, 9, 9)], ids=str)
def test_tiny_maps_and_batch_of_one(case, shape):
    torch.manual_seed(0)
    x = positive(*shape)
    y = build(case)(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_gradient_flows_through_the_detached_mask(case):
    torch.manual_seed(0)
    x = positive(8, 8, 7, 7).requires_grad_()
    y = build(case)(x)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # Every method is x times a mask computed without gradient, so d(sum y)/dx is exactly that mask.
    torch.testing.assert_close(x.grad, (y / x).detach())


# -- layouts and memory formats ---------------------------------------------------------------------------------
def _same_seed(fn, seed: int = 1234) -> torch.Tensor:
    torch.manual_seed(seed)
    return fn()


def test_channels_last_and_non_contiguous_give_the_contiguous_result(case):
    m = build(case)
    x = torch.randn(4, 8, 6, 10)
    ref = _same_seed(lambda: m(x))
    out = _same_seed(lambda: m(x.to(memory_format=torch.channels_last)))
    torch.testing.assert_close(out, ref)
    view = torch.randn(4, 8, 6, 20)[..., ::2]
    ref = _same_seed(lambda: m(view.contiguous()))
    torch.testing.assert_close(_same_seed(lambda: m(view)), ref)


def test_nhwc_token_and_pooled_layouts_match_channels_first_under_the_same_seed(case):
    m = build(case)
    layouts = type(m).layouts
    x = torch.randn(4, 8, 6, 10)
    ref = _same_seed(lambda: m(x))
    if "NHWC" in layouts:
        m.set_layout("NHWC")
        out = _same_seed(lambda: m(x.permute(0, 2, 3, 1).contiguous()))
        torch.testing.assert_close(out, ref.permute(0, 2, 3, 1))
    if "NLC" in layouts:
        tokens = torch.randn(4, 12, 8)  # (B, L, C) is the (B, C, L, 1) map
        m.set_layout("NCHW")
        ref = _same_seed(lambda: m(tokens.transpose(1, 2).unsqueeze(-1)))
        m.set_layout("NLC")
        out = _same_seed(lambda: m(tokens))
        torch.testing.assert_close(out, ref.squeeze(-1).transpose(1, 2))
    if "NC" in layouts:
        pooled = positive(16, 8)  # (B, C) is the (B, C, 1, 1) map
        m.set_layout("NCHW")
        ref = _same_seed(lambda: m(pooled[:, :, None, None]))
        m.set_layout("NC")
        out = _same_seed(lambda: m(pooled))
        torch.testing.assert_close(out, ref.flatten(1))
        # accepting pooled features must mean acting on them, never a silent identity
        assert not torch.equal(out, pooled)


# -- randomness -------------------------------------------------------------------------------------------------
def test_masks_are_random_between_calls_and_seeds_and_reproducible_per_seed(case):
    m = build(case)
    x = positive(64, 8, 6, 6)
    torch.manual_seed(0)
    first, second = m(x), m(x)
    assert not torch.equal(first, second)
    assert torch.equal(_same_seed(lambda: m(x), 0), first)
    assert not torch.equal(_same_seed(lambda: m(x), 1), first)


# -- schedule strength ------------------------------------------------------------------------------------------
def test_drop_fraction_follows_the_strength_buffer(case):
    m = build(case)
    x = positive(1024, 4, 6, 6)
    seen = {}
    for s in (1.0, 0.5):
        m.strength.fill_(s)
        y = _same_seed(lambda: m(x), 7)
        seen[s] = deviation(y, x)
        if case.zero_fraction is not None:
            frac = (y == 0).float().mean().item()
            assert frac == pytest.approx(s * case.zero_fraction, rel=0.15), f"strength {s}"
    assert 0.3 < seen[0.5] / seen[1.0] < 0.7, seen


def test_compiles_once_and_schedule_changes_do_not_recompile(case):
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    m = build(case)
    m.schedule = make_schedule("linear")
    compiled = torch.compile(m, backend=counting_backend)
    x = positive(512, 4, 6, 6)
    results = {}
    for progress in (1.0, 0.5, 0.0, 0.25):
        set_progress(m, progress)
        y = _same_seed(lambda: compiled(x), 3)
        results[progress] = y
        assert len(graphs) == 1, f"{case.id} compiled {len(graphs)} graphs by strength {progress}"
    assert torch.equal(results[0.0], x)
    devs = {p: deviation(y, x) for p, y in results.items()}
    assert devs[0.25] < devs[0.5] < devs[1.0]
    assert 0.3 < devs[0.5] / devs[1.0] < 0.7, devs
    if case.zero_fraction is not None:
        frac = (results[0.5] == 0).float().mean().item()
        assert frac == pytest.approx(0.5 * case.zero_fraction, rel=0.15)
    torch._dynamo.reset()


class _ReadsStrengthOnTheHost(Regularizer):
    """A deliberately wrong regularizer: turning the strength into a Python float guards on its value."""

    def regularize(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 - 0.5 * float(self.strength))


def test_the_compile_counter_catches_a_regularizer_that_recompiles_per_strength():
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    m = _ReadsStrengthOnTheHost().train()
    compiled = torch.compile(m, backend=counting_backend)
    for s in (1.0, 0.5):
        m.strength.fill_(s)
        compiled(torch.ones(2, 3, 4, 4))
    assert len(graphs) > 1
    torch._dynamo.reset()


# -- edges: empty tensors, non-float inputs, NaN, the fp16 range ---------------------------------------------------
def _layout_inputs(m: Regularizer, nchw: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``nchw`` in every layout ``m`` accepts (tokens take its (N, C, H*W) as (N, L, C))."""
    out = [("NCHW", nchw)]
    if "NHWC" in type(m).layouts:
        out.append(("NHWC", nchw.permute(0, 2, 3, 1).contiguous()))
    if "NLC" in type(m).layouts:
        out.append(("NLC", nchw.flatten(2).transpose(1, 2).contiguous()))
    if "NC" in type(m).layouts:
        out.append(("NC", nchw.flatten(2)[:, :, :1].sum(-1)))
    return out


@pytest.mark.parametrize("shape", [(2, 0, 5, 5), (0, 4, 5, 5), (0, 0, 3, 3), (2, 4, 0, 5)], ids=str)
def test_empty_batch_zero_channels_and_empty_maps_give_the_empty_input_back(case, shape):
    m = build(case)
    for layout, x in _layout_inputs(m, torch.randn(shape)):
        m.set_layout(layout)
        y = m(x)
        assert y.shape == x.shape and y.dtype == x.dtype, (layout, y.shape)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool], ids=str)
def test_integer_and_bool_inputs_are_refused_naming_the_regularizer_and_dtype(case, dtype):
    m = build(case)
    x = torch.ones(2, 4, 5, 5, dtype=dtype)
    with pytest.raises(TypeError, match=rf"{case.name}.*{str(dtype).removeprefix('torch.')}"):
        m(x)
    with pytest.raises(TypeError, match=rf"{case.name}.*{str(dtype).removeprefix('torch.')}"):
        build(case, zero=True)(x)
    assert m.eval()(x) is x  # eval stays the identity for any input


def test_one_nan_stays_where_it_was(case):
    m = build(case)
    for layout, clean in _layout_inputs(m, torch.randn(4, 8, 7, 7)):
        m.set_layout(layout)
        x = clean.clone()
        x.view(-1)[x.numel() // 3] = float("nan")
        y = _same_seed(lambda x=x: m(x))
        assert torch.equal(torch.isnan(y), torch.isnan(x)), f"{case.id} {layout}: NaN spread or vanished"


def test_fp16_overflows_only_where_the_exact_result_exceeds_the_fp16_range(case):
    # Near the fp16 maximum an inverted-dropout rescale (or a scale factor > 1) has no representable result, as
    # with torch's own F.dropout; everywhere else the output must stay finite. The exact result is x times the
    # per-unit factor, which is the gradient of sum(y) (every method is x times a detached factor).
    fmax = torch.finfo(torch.float16).max
    torch.manual_seed(0)
    for x in (torch.rand(8, 8, 7, 7) * 0.3 + 0.7, torch.ones(8, 8, 7, 7)):
        x = (x * fmax).half().requires_grad_()
        y = build(case)(x)
        y.float().sum().backward()
        exact = x.detach().float() * x.grad.float()
        overflow = torch.isinf(y)
        assert not (overflow & (exact.abs() < fmax * 0.999)).any(), f"{case.id}: avoidable fp16 overflow"
        assert overflow[exact.abs() > fmax * 1.001].all(), f"{case.id}: an unrepresentable result was clipped"
