"""Regularizers stay FX leaves for the tracers users run on a rewritten model (timm_drop.fx, issue 10).

timm's ``timm.models._features_fx`` and torchvision's ``torchvision.models.feature_extraction`` trace the whole
model; a regularizer traced through used to fail on its rank/layout checks (``TraceError: symbolically traced
variables cannot be used as inputs to control flow``). Each one must become a single ``call_module`` node, in
train and eval mode, and the extracted model must keep regularizing in train mode and be exact in eval.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import is_notrace_module
from timm.models import _features_fx as timm_fx
from torch import fx
from torchvision.models import feature_extraction as tv_fx

import timm_drop
from timm_drop.regularizers.dropblock import DropBlock2d
from timm_drop.regularizers.registry import get_regularizer_class

pytestmark = pytest.mark.usefixtures("one_thread")

# one rule per insertion mechanism of a plain ResNet: forward hooks (stage) and block-local rewrites (residual, and
# the norm site, whose caller layer2.0 is rewritten)
SPEC = {
    "rules": [
        {"regularizer": "dropblock", "params": {"drop_prob": 0.3, "block_size": 3}, "sites": ["stage"], "stages": [3, 4]},
        {"regularizer": "dropblock", "params": {"drop_prob": 0.3, "block_size": 3}, "sites": ["residual"], "stages": [3]},
        {"regularizer": "spatial_dropout", "params": {"drop_prob": 0.3}, "sites": ["norm"], "stages": [2],
         "name": "layer2.0.bn1"},
    ]
}
TRACERS = {
    "timm": (timm_fx.get_graph_node_names, timm_fx.create_feature_extractor),
    "torchvision": (tv_fx.get_graph_node_names, tv_fx.create_feature_extractor),
}


def _resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    # zero_init_last=False: timm zero-initialises each residual branch's last BN, which would hide any
    # regularizer inside the branch
    return timm.create_model("resnet18", pretrained=False, zero_init_last=False)


@pytest.fixture(scope="module")
def rewritten():
    return timm_drop.apply_regularizer(_resnet(), SPEC)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("tracer", sorted(TRACERS))
def test_graph_node_names_work_and_show_each_regularizer_as_one_node(rewritten, tracer, mode):
    rewritten.train(mode == "train")
    get_names, _ = TRACERS[tracer]
    train_names, eval_names = get_names(rewritten)
    assert train_names == eval_names  # the same graph in both modes: nothing mode-dependent was traced in
    regs = [n for n, m in rewritten.named_modules() if isinstance(m, timm_drop.Regularizer)]
    assert len(regs) == len(timm_drop.plan(_resnet(), SPEC))
    # block-local regularizers are nodes named by their path; a stage hook's regularizer is the node named by
    # the stage's last block, which it is hooked on (gradient checkpointing calls a Sequential stage's blocks, not
    # the stage), and the last node of the stage: the one the tracers return for "layer3"
    hooked = [n for n in regs if n.startswith("_timm_drop_regularizers.")]
    assert len(hooked) == 2
    for stage in ("layer3", "layer4"):
        assert [n for n in train_names if n.split(".")[0] == stage][-1] == f"{stage}.1"
    for name in set(regs) - set(hooked):
        assert name in train_names, f"{name} is not one call_module node in the {tracer} graph"
    # and nothing inside a regularizer's forward leaked into the graph
    assert not any(n.startswith(tuple(r + "." for r in regs)) for n in train_names)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("tracer", sorted(TRACERS))
def test_extracted_model_regularizes_in_train_and_is_exact_in_eval(tracer, mode):
    _, extract = TRACERS[tracer]
    rewritten = timm_drop.apply_regularizer(_resnet(), SPEC)  # its own: train forwards move BN statistics
    rewritten.train(mode == "train")
    feats = extract(rewritten, {"layer2": "c3", "layer3": "c4", "layer4": "c5"})
    x = torch.randn(2, 3, 64, 64)
    reference = _resnet().eval()
    feats.eval()
    with torch.no_grad():
        out = feats(x)
        assert torch.equal(out["c5"], reference.forward_features(x))
        feats.train()
        torch.manual_seed(1)
        a = feats(x)
        torch.manual_seed(2)
        b = feats(x)
        reference.train()
        c = reference.forward_intermediates(x, indices=[2, 3, 4], intermediates_only=True)
    # c3: the norm site inside layer2; c4: the residual sites of layer3 and its stage hook; c5: all of them
    for key in ("c3", "c4", "c5"):
        assert not torch.equal(a[key], b[key]), f"{key} is not regularized by the {tracer}-extracted model"
    assert not torch.equal(a["c4"], c[1])
    assert isinstance(feats, fx.GraphModule)
    # the node the tracers call "layer3" is the stage hook's regularizer: the returned stage is regularized
    out_node = next(n for n in feats.graph.nodes if n.op == "output")
    c4 = out_node.args[0]["c4"]
    assert c4.op == "call_module" and isinstance(feats.get_submodule(c4.target), DropBlock2d)
    assert c4.target.startswith("_timm_drop_regularizers.")
    assert any(isinstance(m, DropBlock2d) for m in feats.modules())


def test_every_regularizer_class_is_a_timm_notrace_module_including_user_subclasses():
    classes = [get_regularizer_class(name) for name in timm_drop.list_regularizers()]
    classes = [c for c in classes if isinstance(c, type) and issubclass(c, timm_drop.Regularizer)]
    assert len(classes) >= 9
    for cls in classes:
        assert is_notrace_module(cls), cls.__name__

    class UserDrop(timm_drop.Regularizer):
        def regularize(self, x):
            return x * 0.5

    assert is_notrace_module(UserDrop)


def test_a_tracer_that_enters_a_regularizer_gets_one_call_module_node_not_its_branches():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.drop = DropBlock2d(drop_prob=0.5, block_size=3)

        def forward(self, x):
            return self.drop(self.conv(x)) + 1

    net = Net()
    gm = fx.symbolic_trace(net)  # torch's default tracer: only torch.nn classes are leaves
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["conv", "drop"]
    x = torch.randn(2, 3, 12, 12)
    gm.eval()
    assert torch.equal(gm(x), net.eval()(x))
    gm.train()
    torch.manual_seed(0)
    y = gm(x)
    torch.manual_seed(0)
    assert torch.equal(y, net.train()(x)) and not torch.equal(y, net.eval()(x))
