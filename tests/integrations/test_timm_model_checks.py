"""timm's own model checks on regularized models (issue 18, items 4 and 5).

timm's ``tests/test_models.py`` traces every model with torchvision's feature extraction and timm's tracer settings
(forward and backward through the ``GraphModule``), scripts it (``torch.jit.script`` under
``timm.layers.set_scriptable(True)``) and scripts its FX graph. These tests run the same public calls on models
built the way a timm script builds them (``timm.create_model("timm_drop_regularized", model=..., spec=...)``),
with rules that use every insertion kind: forward hooks (``stage``), block rewrites (``residual``, ``norm`` in a
block) and ``drop`` slots (``norm`` of a fused norm+act layer).
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules, set_scriptable
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import timm_drop
from timm_drop.create import REGISTERED_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = {
    "rules": [
        {"regularizer": "dropblock", "params": {"drop_prob": 0.2, "block_size": 3}, "sites": ["stage"],
         "allow_empty": True},
        {"regularizer": "droppath", "params": {"drop_prob": 0.2}, "sites": ["residual"], "allow_empty": True},
        {"regularizer": "dropout", "params": {"drop_prob": 0.2}, "sites": ["norm"], "stages": [2],
         "on_conflict": "stack", "allow_empty": True},
    ]
}  # fmt: skip

# (model, constructor kwargs, input size): a plain CNN, an EfficientNet (drop slots, Sequential stages) and a ViT
MODELS = [
    ("resnet18", {}, (3, 64, 64)),
    ("efficientnet_b0", {}, (3, 64, 64)),
    ("vit_tiny_patch16_224", {"img_size": 64}, (3, 64, 64)),
]
IDS = [m for m, *_ in MODELS]


def _create(name: str, kwargs: dict, **more) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(REGISTERED_NAME, model=name, spec=SPEC, pretrained=False, **kwargs, **more)
    assert any(isinstance(m, timm_drop.Regularizer) for m in model.modules())
    return model


def _tracer_kwargs() -> dict:
    # the settings timm's tests trace with
    return {
        "leaf_modules": get_notrace_modules(),
        "autowrap_functions": get_notrace_functions(),
        "param_shapes_constant": True,
    }


def _fx_model(model: torch.nn.Module) -> torch.nn.Module:
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=_tracer_kwargs())
    return create_feature_extractor(
        model,
        train_return_nodes=[train_nodes[-1]],
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=_tracer_kwargs(),
    )


@pytest.mark.parametrize("name,kwargs,size", MODELS, ids=IDS)
def test_forward_fx(name, kwargs, size):
    model = _create(name, kwargs).eval()
    x = torch.randn(1, *size)
    with torch.inference_mode():
        out = model(x)
        fx_out = torch.cat(tuple(_fx_model(model)(x).values()))
    assert torch.equal(fx_out, out)
    torch.fx.symbolic_trace(torch.nn.Linear(2, 2))  # tracing leaves torch.fx usable


@pytest.mark.parametrize("name,kwargs,size", MODELS, ids=IDS)
def test_backward_fx(name, kwargs, size):
    model = _create(name, kwargs, num_classes=42).train()
    n_params = sum(p.numel() for p in model.parameters())
    fx_model = _fx_model(model)
    out = torch.cat(tuple(fx_model(torch.randn(2, *size)).values()))
    out.mean().backward()
    missing = [n for n, p in fx_model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert out.shape[-1] == 42 and not torch.isnan(out).any()
    assert sum(p.grad.numel() for p in fx_model.parameters()) == n_params
    regs = [m for m in fx_model.modules() if isinstance(m, timm_drop.Regularizer)]
    assert regs and all(r.train_calls > 0 for r in regs), "the traced graph does not run its regularizers"


@pytest.mark.parametrize("name,kwargs,size", MODELS, ids=IDS)
def test_torchscript(name, kwargs, size):
    with set_scriptable(True):
        model = _create(name, kwargs)
    model.eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, *size)
    with torch.no_grad():
        out = scripted(x)
        assert torch.equal(out, model(x))
    assert out.shape[0] == 1 and not torch.isnan(out).any()
    # the model itself keeps its regularizers and still trains with them
    regs = [m for m in model.modules() if isinstance(m, timm_drop.Regularizer)]
    assert regs and all(r.training is False for r in regs)
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        assert not torch.equal(a, model(x))
    # the scripted copy has no regularizers: it refuses training rather than train without them
    scripted.train()
    with pytest.raises(Exception, match="without its regularizers"):
        scripted(x)


@pytest.mark.parametrize("name,kwargs,size", MODELS, ids=IDS)
def test_torchscript_of_the_fx_model(name, kwargs, size):
    with set_scriptable(True):
        model = _create(name, kwargs)
    model.eval()
    scripted = torch.jit.script(_fx_model(model))
    x = torch.randn(1, *size)
    with torch.inference_mode():
        out = torch.cat(tuple(scripted(x).values()))
        assert torch.equal(out, model(x))
    scripted.train()
    with pytest.raises(Exception, match="cannot train under TorchScript"):
        scripted(x)


def test_scripting_part_of_a_regularized_model_or_a_module_holding_it_says_what_to_do():
    model = _create("resnet18", {}).eval()
    with pytest.raises(RuntimeError, match="rewritten BasicBlock.*strip_regularizers"):
        torch.jit.script(model.layer2[0])
    holder = torch.nn.Sequential(model)
    with pytest.raises(RuntimeError, match="holds a regularized ResNet.*Script the regularized model itself"):
        torch.jit.script(holder)
    assert holder[0] is model and any(isinstance(m, timm_drop.Regularizer) for m in model.modules())


@pytest.mark.parametrize("name,kwargs,size", [MODELS[0], MODELS[2]], ids=[IDS[0], IDS[2]])
def test_export_and_jit_trace_of_the_regularized_model_in_eval(name, kwargs, size):
    model = _create(name, kwargs).eval()
    x = torch.randn(1, *size)
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,))
        assert torch.equal(exported.module()(x), expected)
        traced = torch.jit.trace(model, (x,))
        assert torch.equal(traced(x), expected)
