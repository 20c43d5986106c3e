"""Models built on the meta device take a spec, then materialise and regularize (issue 18, item 6).

``with torch.device("meta"): timm.create_model(...)`` is how transformers 5 builds every model inside
``from_pretrained`` and how FSDP users build big ones. The shape pass propagates shapes on meta tensors; the
bit-for-bit check of each rewritten block waits for its first forward with real weights. After ``to_empty`` +
``load_state_dict`` the model must compute exactly what the same spec applied to the materialised model computes.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import timm_drop
from timm_drop.regularizers import Regularizer

pytestmark = pytest.mark.usefixtures("one_thread")

# every insertion kind: stage hooks, skip-site rewrites (ViT blocks with their optional attn_mask), norm slots
SPEC = {
    "rules": [
        {"regularizer": "dropblock", "params": {"drop_prob": 0.2, "block_size": 3}, "sites": ["stage"],
         "allow_empty": True},
        {"regularizer": "droppath", "params": {"drop_prob": 0.2}, "sites": ["residual"], "allow_empty": True,
         "schedule": {"kind": "linear", "start": 0.0, "end": 1.0, "steps": 4}},
        {"regularizer": "dropout", "params": {"drop_prob": 0.2}, "sites": ["norm"], "stages": [2],
         "on_conflict": "stack", "allow_empty": True},
    ]
}  # fmt: skip


@pytest.mark.parametrize(
    "name,kwargs", [("resnet18", {}), ("efficientnet_b0", {}), ("vit_tiny_patch16_224", {"img_size": 64})]
)
def test_a_meta_device_model_takes_a_spec_then_materialises_and_regularizes(name, kwargs):
    torch.manual_seed(0)
    weights = timm.create_model(name, **kwargs).state_dict()
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    print(timm_drop.plan(model, SPEC))  # planning works there too
    timm_drop.apply_regularizer(model, SPEC)
    model.to_empty(device="cpu")
    model.load_state_dict(weights)
    regs = [m for m in model.modules() if isinstance(m, Regularizer)]
    assert regs and {float(r.strength) for r in regs} == {1.0} and {int(r.schedule_count) for r in regs} == {0}

    reference = timm.create_model(name, **kwargs)
    reference.load_state_dict(weights)
    plain = copy.deepcopy(reference).eval()
    timm_drop.apply_regularizer(reference, SPEC)
    assert [type(m).__name__ for m in model.modules()] == [type(m).__name__ for m in reference.modules()]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain(x))
        model.train(), reference.train()
        for step in range(2):
            torch.manual_seed(step)
            a = model(x)
            torch.manual_seed(step)
            assert torch.equal(a, reference(x)), f"step {step}"
    rewritten = [m for m in model.modules() if hasattr(type(m), "_timm_drop_recipe")]
    assert all(type(m)._timm_drop_fast for m in rewritten), "a rewritten block was not checked on real weights"
