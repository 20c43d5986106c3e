"""A rewritten block takes every argument its original forward takes, and re-tracing it is clean (issue 18, item 4).

The shape pass runs a ViT block with ``attn_mask=None``. The rewritten block must still accept a mask (through the
host's own ``forward_features(x, attn_mask=...)``) and behave as the original with it, and tracing the rewritten
model again (timm's ``FeatureGraphNet``, torchvision's ``create_feature_extractor`` with timm's tracer settings) must
work and leave ``torch.fx`` usable for everyone else in the process.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import nn
from torchvision.models import feature_extraction as tv_fx

import timm_drop
from timm_drop.regularizers import Regularizer

pytestmark = pytest.mark.usefixtures("one_thread")

RESIDUAL_SPEC = {
    "rules": [{"regularizer": "droppath", "params": {"drop_prob": 0.3}, "sites": ["residual"], "label": "dp"}]
}


def _vit() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10)
    return plain, timm_drop.apply_regularizer(copy.deepcopy(plain), RESIDUAL_SPEC)


def _mask(tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(tokens, tokens, generator=g) > 0.3) | torch.eye(tokens, dtype=torch.bool)


def test_a_rewritten_vit_block_accepts_an_attention_mask_like_the_original():
    plain, model = _vit()
    assert any(hasattr(type(b), "_timm_drop_recipe") for b in model.blocks), "the blocks were expected to be rewritten"
    x = torch.randn(2, 3, 64, 64)
    mask = _mask(17)
    plain.eval(), model.eval()
    with torch.no_grad():
        expected = plain.forward_features(x, attn_mask=mask)
        assert not torch.equal(expected, plain.forward_features(x)), "the mask was expected to matter"
        assert torch.equal(model.forward_features(x, attn_mask=mask), expected)
        tokens = plain._pos_embed(plain.patch_embed(x))
        assert torch.equal(model.blocks[0](tokens, mask), plain.blocks[0](tokens, mask))  # positionally too
    # training with a mask: at strength 0 exactly the original, at full strength regularized
    plain.train(), model.train()
    for reg in model.modules():
        if isinstance(reg, Regularizer):
            reg.strength.fill_(0.0)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x, attn_mask=mask), plain.forward_features(x, attn_mask=mask))
        timm_drop.set_progress(model, 1.0)
        torch.manual_seed(1)
        a = model.forward_features(x, attn_mask=mask)
        torch.manual_seed(2)
        b = model.forward_features(x, attn_mask=mask)
    assert not torch.equal(a, b), "the regularizers do not act in calls with a mask"


def _timm_tracer_kwargs() -> dict:
    return {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}


def test_retracing_a_rewritten_vit_works_and_leaves_torch_fx_usable():
    from torch.fx import _symbolic_trace

    table = dict(_symbolic_trace._wrapped_fns_to_patch)  # torch.fx's process-wide table of functions to patch
    plain, model = _vit()
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    graph_net = timm.models.FeatureGraphNet(model, out_indices=(-1,))
    with torch.no_grad():
        (last,) = graph_net(x)
        (expected,) = timm.models.FeatureGraphNet(copy.deepcopy(plain).eval(), out_indices=(-1,))(x)
        assert torch.equal(last, expected)
    nodes = tv_fx.get_graph_node_names(model, tracer_kwargs=_timm_tracer_kwargs())[0]
    extractor = tv_fx.create_feature_extractor(model, [nodes[-1]], tracer_kwargs=_timm_tracer_kwargs())
    with torch.no_grad():
        assert torch.equal(extractor(x)[nodes[-1]], plain.eval()(x))
    # neither the rewrite nor the re-traces registered anything in torch.fx's global patch table
    assert _symbolic_trace._wrapped_fns_to_patch.keys() == table.keys()
    torch.fx.symbolic_trace(nn.Linear(2, 2))
    torch.fx.symbolic_trace(plain)


class _MaskedBlock(nn.Module):
    """A residual block whose forward branches on an optional mask in a way FX cannot trace with a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            return x + self.fc(x) * float(mask.float().mean())  # a Python number from a tensor: not traceable
        return x + self.fc(x)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.block = _MaskedBlock()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.block(self.stem(x), mask)


def test_a_case_the_rewrite_cannot_trace_runs_the_original_forward_and_says_so():
    torch.manual_seed(0)
    plain = _Net()
    model = timm_drop.apply_regularizer(copy.deepcopy(plain), RESIDUAL_SPEC, example_input=torch.randn(2, 8))
    assert hasattr(type(model.block), "_timm_drop_recipe")
    x, mask = torch.randn(2, 8), torch.ones(2, 8)
    model.train(), plain.train()
    with pytest.warns(UserWarning, match=r"mask=given.*original forward.*residual:block\.add"):
        out = model(x, mask)
    assert torch.equal(out, plain(x, mask))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        model(x, mask)
    # without a mask the rewrite acts
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.equal(a, model(x))
