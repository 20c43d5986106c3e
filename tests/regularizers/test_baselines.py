"""Baselines: elementwise dropout, SpatialDropout (Tompson et al. 2015) and DropPath (stochastic depth)."""

from __future__ import annotations

import pytest
import torch

import timm_drop
from timm_drop.regularizers.baselines import (
    Dropout,
    DropPath,
    SpatialDropout,
    drop_path,
    dropout,
    spatial_dropout,
)

NAMES = ["dropout", "spatial_dropout", "droppath"]
FUNCTIONS = {"dropout": dropout, "spatial_dropout": spatial_dropout, "droppath": drop_path}


def _zero_fraction(y: torch.Tensor) -> float:
    return (y == 0).float().mean().item()


def test_dropout_drops_units_independently_at_the_requested_rate_and_rescales():
    torch.manual_seed(0)
    y = dropout(torch.ones(64, 32, 16, 16), 0.3)
    assert _zero_fraction(y) == pytest.approx(0.3, rel=0.03)
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7))
    # Independent units: a channel is almost never all-dropped at 256 units per map.
    assert not (y.flatten(2) == 0).all(-1).any()


def test_spatial_dropout_drops_whole_channels_per_sample():
    torch.manual_seed(0)
    y = spatial_dropout(torch.ones(256, 64, 7, 5), 0.25).flatten(2)
    per_channel = (y == 0).float().mean(-1)
    assert set(per_channel.unique().tolist()) == {0.0, 1.0}
    assert per_channel.mean().item() == pytest.approx(0.25, rel=0.05)
    assert not (per_channel == per_channel[:1]).all()  # masks differ across samples
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))


@pytest.mark.parametrize("shape", [(4096,), (4096, 3, 5), (4096, 2, 3, 3, 2)])
def test_drop_path_drops_whole_samples_of_any_shape(shape):
    torch.manual_seed(0)
    y = drop_path(torch.ones(shape), 0.2)
    per_sample = (y == 0).flatten(1).float().mean(-1) if y.dim() > 1 else (y == 0).float()
    assert set(per_sample.unique().tolist()) == {0.0, 1.0}
    assert per_sample.mean().item() == pytest.approx(0.2, rel=0.1)
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1.25))


@pytest.mark.parametrize("name", NAMES)
def test_expected_value_is_preserved(name):
    torch.manual_seed(1)
    x = torch.rand(1024, 32, 8, 8) + 0.5
    y = FUNCTIONS[name](x, 0.2)
    assert y.mean().item() == pytest.approx(x.mean().item(), rel=0.02)


@pytest.mark.parametrize("name", NAMES)
def test_eval_and_zero_probability_are_bitwise_identity(name):
    x = torch.randn(8, 16, 5, 5)
    module = timm_drop.create_regularizer(name, drop_prob=0.4).eval()
    assert module(x) is x
    assert FUNCTIONS[name](x, 0.4, training=False) is x
    assert timm_drop.create_regularizer(name, drop_prob=0.0).train()(x) is x
    scheduled = timm_drop.create_regularizer(name, drop_prob=0.4).train()
    scheduled.strength.fill_(0.0)
    assert torch.equal(scheduled(x), x)


@pytest.mark.parametrize("name", NAMES)
def test_schedule_strength_scales_the_drop_rate(name):
    torch.manual_seed(2)
    module = timm_drop.create_regularizer(name, drop_prob=0.4).train()
    module.strength.fill_(0.5)
    y = module(torch.ones(4096, 16, 4, 4))
    assert _zero_fraction(y) == pytest.approx(0.2, rel=0.1)
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1.25))


@pytest.mark.parametrize("name", NAMES)
def test_gradient_flows_only_through_kept_units(name):
    torch.manual_seed(3)
    x = torch.ones(256, 8, 4, 4, requires_grad=True)
    y = FUNCTIONS[name](x, 0.3)
    y.sum().backward()
    kept = y.detach() != 0
    assert torch.all(x.grad[~kept] == 0)
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.7))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_masks_are_unbiased_at_small_rates(name, dtype):
    # bf16 `rand < p` would drop ~6x too often at p = 4e-3; bernoulli_ thresholds in float32.
    torch.manual_seed(4)
    p = 4e-3
    shape = {"dropout": (64, 64, 16, 16), "spatial_dropout": (2048, 256, 2, 2), "droppath": (2**19, 2)}[name]
    y = FUNCTIONS[name](torch.ones(shape, dtype=dtype), p)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert _zero_fraction(y) == pytest.approx(p, rel=0.15)


def test_autocast_region_keeps_output_finite_and_rate_right():
    torch.manual_seed(5)
    conv = torch.nn.Conv2d(3, 64, 1)
    module = SpatialDropout(0.3).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(conv(torch.rand(256, 3, 4, 4)))
    assert torch.isfinite(y).all()
    assert (y.flatten(2) == 0).all(-1).float().mean().item() == pytest.approx(0.3, rel=0.1)


def test_spatial_dropout_on_tokens_drops_a_channel_for_every_token():
    torch.manual_seed(6)
    module = timm_drop.create_regularizer("spatial_dropout", drop_prob=0.3).train()
    module.set_layout("NLC")
    y = module(torch.ones(128, 197, 64))
    per_channel = (y == 0).float().mean(1)  # (B, C): fraction of tokens dropped in that channel
    assert set(per_channel.unique().tolist()) == {0.0, 1.0}
    assert per_channel.mean().item() == pytest.approx(0.3, rel=0.1)


def test_spatial_dropout_on_channels_last_maps_drops_channels():
    torch.manual_seed(7)
    module = SpatialDropout(0.3).train()
    module.set_layout("NHWC")
    y = module(torch.ones(128, 6, 6, 32))
    per_channel = (y == 0).float().mean((1, 2))
    assert set(per_channel.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize(
    "layout,shape", [("NCHW", (512, 8, 4, 4)), ("NHWC", (512, 4, 4, 8)), ("NLC", (512, 5, 8))]
)
def test_drop_path_is_per_sample_in_every_layout(layout, shape):
    torch.manual_seed(8)
    module = DropPath(0.3).train()
    module.set_layout(layout)
    y = module(torch.ones(shape))
    per_sample = (y == 0).flatten(1).float().mean(-1)
    assert set(per_sample.unique().tolist()) == {0.0, 1.0}
    assert per_sample.mean().item() == pytest.approx(0.3, rel=0.15)


def test_non_contiguous_and_channels_last_inputs_keep_shape_and_rate():
    torch.manual_seed(9)
    base = torch.ones(256, 32, 8, 8)
    for x in (base.to(memory_format=torch.channels_last), base[:, ::2], base.transpose(2, 3)):
        y = dropout(x, 0.25)
        assert y.shape == x.shape
        assert _zero_fraction(y) == pytest.approx(0.25, rel=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_probability_one_as_a_tensor_gives_zeros_not_nan(name):
    y = FUNCTIONS[name](torch.randn(4, 3, 2, 2), torch.tensor(1.0))
    assert torch.isfinite(y).all() and (y == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_strength_change_does_not_recompile(name):
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    module = timm_drop.create_regularizer(name, drop_prob=0.4).train()
    compiled = torch.compile(module, backend=counting_backend, fullgraph=True)
    x = torch.ones(512, 8, 4, 4)
    compiled(x)
    module.strength.fill_(0.5)
    torch.manual_seed(10)
    y = compiled(x)
    assert len(compiles) == 1
    assert _zero_fraction(y) == pytest.approx(0.2, rel=0.2)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "value,exc",
    [(-0.1, ValueError), (1.0, ValueError), (1.5, ValueError), ("0.1", TypeError), (None, TypeError)],
)
def test_bad_drop_prob_is_rejected_naming_the_parameter(name, value, exc):
    with pytest.raises(exc, match="drop_prob"):
        timm_drop.create_regularizer(name, drop_prob=value)
    with pytest.raises(exc, match="drop_prob"):
        FUNCTIONS[name](torch.ones(2, 2, 2), value)


def test_registry_entries_and_repr():
    for name, cls in [("dropout", Dropout), ("spatial_dropout", SpatialDropout), ("droppath", DropPath)]:
        assert name in timm_drop.list_regularizers()
        module = timm_drop.create_regularizer(name, drop_prob=0.1)
        assert isinstance(module, cls)
        assert "drop_prob=0.1" in repr(module)
        assert dict(module.state_dict()) == {}
