"""apply_regularizer / plan / strip_regularizers: the guarantees of issue 3 on a matrix of timm families."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import timm_drop
from timm_drop.regularizers.base import Regularizer
from timm_drop.rewrite import RewriteError, apply_regularizer, plan, strip_regularizers


def _regs(model: nn.Module) -> list[Regularizer]:
    return [m for m in model.modules() if isinstance(m, Regularizer)]


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _rule(reg, params, sites, **kw):
    return {"regularizer": reg, "params": params, "sites": sites, **kw}


DROP = {"drop_prob": 0.3}
FAMILIES = {
    "resnet18": (
        dict(zero_init_last=False),
        [
            _rule("dropblock", {"drop_prob": 0.2, "block_size": 3}, ["stage", "norm"], stages=[3]),
            _rule("droppath", DROP, ["residual"], depth_scaling="linear"),
            _rule("dropout", DROP, ["shortcut"], stages=[4]),
            _rule("spatial_dropout", DROP, ["merge"], stages=[2]),
            _rule("dropout", DROP, ["block"], stages=[1]),
        ],
    ),
    "convnext_atto": (
        dict(conv_mlp=False, depths=(1, 1, 2, 1)),  # blocks run their norm + MLP channels-last
        [
            _rule("dropblock", {"drop_prob": 0.2, "block_size": 3}, ["norm"], stages=[1, 2]),
            _rule("droppath", DROP, ["residual"]),
            _rule("dropout", DROP, ["stage"]),
        ],
    ),
    "vit_tiny_patch16_224": (
        dict(img_size=64, depth=4),
        [
            _rule("droppath", DROP, ["residual"]),
            _rule("dropout", DROP, ["merge", "norm"], stages=[2, 3]),
            _rule("spatial_dropout", DROP, ["block"], stages=[4]),
        ],
    ),
    "swin_tiny_patch4_window7_224": (
        dict(img_size=64, window_size=4, depths=(1, 1, 2, 1), drop_path_rate=0.0),
        [
            _rule("dropblock", {"drop_prob": 0.2, "block_size": 3}, ["stage"], stages=[1, 2]),
            _rule("droppath", DROP, ["residual"]),
            _rule("dropout", DROP, ["norm"], stages=[3]),
        ],
    ),
    "tinynet_e": (  # the EfficientNet class (BatchNormAct2d layers), small
        {},
        [
            _rule("dropblock", {"drop_prob": 0.2, "block_size": 3}, ["norm"], stages=[3, 4]),
            _rule("droppath", DROP, ["residual"]),
            _rule("dropout", DROP, ["merge"], stages=[4, 5]),
        ],
    ),
    "regnetx_002": (
        {},
        [
            _rule("spatial_dropout", DROP, ["norm"], stages=[2], norm_position="after_act"),
            _rule("droppath", DROP, ["residual"]),
        ],
    ),
    "test_nfnet": (  # NormFreeBlock: opaque blocks
        {},
        [
            _rule("dropblock", {"drop_prob": 0.2, "block_size": 3}, ["stage"], stages=[2, 3]),
            _rule("spatial_dropout", DROP, ["block"]),
        ],
    ),
}


@pytest.mark.slow  # one model per family: the edit-loop subset (-m "not slow") leaves it to the full run
@pytest.mark.parametrize("name", list(FAMILIES))
def test_apply_keeps_the_model_and_its_guarantees(name):
    kwargs, rules = FAMILIES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    ref = copy.deepcopy(model)
    cls, keys, text = type(model), list(model.state_dict()), repr(model)
    # token / window models need their configured 64x64; convnets run smaller and faster
    x = torch.randn(2, 3, 64, 64) if name.startswith(("vit", "swin")) else torch.randn(2, 3, 32, 32)

    assert apply_regularizer(model, {"rules": rules}) is model
    assert type(model) is cls and model.pretrained_cfg == ref.pretrained_cfg
    assert model.feature_info == ref.feature_info
    regs = _regs(model)
    assert len(regs) == len(timm_drop.applied_plans(model)[-1].entries) > 0

    # checkpoints load strictly both ways
    assert list(model.state_dict()) == keys
    model.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(model.state_dict(), strict=True)

    # eval: bit-identical
    model.eval(), ref.eval()
    with torch.no_grad():
        out_ref = ref(x)
        assert torch.equal(model(x), out_ref)

    # train at strength 0: identical (BN statistics move the same way in both)
    model.train(), ref.train()
    for r in regs:
        r.strength.fill_(0.0)
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(1)
        b = ref(x)
    assert torch.equal(a, b)

    # train at full strength: regularizers act, also through forward_features; backward works
    for r in regs:
        r.strength.fill_(1.0)
    calls = []
    handles = [r.register_forward_pre_hook(lambda m, a: calls.append(id(m))) for r in regs]
    torch.manual_seed(2)
    out = model(x)
    assert set(calls) == {id(r) for r in regs}
    for h in handles:
        h.remove()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        torch.manual_seed(3)
        f = model.forward_features(x)
        torch.manual_seed(3)
        f_ref = ref.forward_features(x)
    assert not torch.equal(f, f_ref)
    assert model.forward_head(f).shape == out.shape

    # deepcopy (timm EMA): the copy runs its own regularizers
    clone = copy.deepcopy(model)
    own = _regs(clone)
    assert len(own) == len(regs) and not {id(r) for r in own} & {id(r) for r in regs}
    with torch.no_grad():
        e1, e2 = clone.eval()(x), clone(x)
        assert torch.equal(e1, e2) and torch.equal(e1, model.eval()(x))
    calls.clear()
    handles = [r.register_forward_pre_hook(lambda m, a: calls.append(id(m))) for r in regs]
    with torch.no_grad():
        clone.train()(x)
    for h in handles:
        h.remove()
    assert not calls  # the original's regularizers were not touched by the copy

    # strip: the original structure back
    assert strip_regularizers(model) is model
    assert type(model) is cls and repr(model) == text and not _regs(model)
    assert _hooks(model) == 0 and list(model.state_dict()) == keys
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref.eval()(x))


def test_block_rewrite_keeps_class_methods_and_isinstance():
    model = timm.create_model("resnet18", pretrained=False)
    block = model.layer2[0]
    base = type(block)
    apply_regularizer(model, {"rules": [_rule("droppath", DROP, ["residual"], name="layer2.0")]})
    assert isinstance(block, base) and type(block) is not base and type(block).__name__ == base.__name__
    assert list(block.state_dict()) == list(base.state_dict(block))
    block.zero_init_last()  # a method of the original class still works
    assert isinstance(block.timm_drop_residual_add, Regularizer)
    strip_regularizers(model)
    assert type(block) is base and not hasattr(block, "timm_drop_residual_add")


def test_hooks_are_bound_methods_of_modules_inside_the_model():
    model = timm.create_model("resnet18", pretrained=False)
    apply_regularizer(model, {"rules": [_rule("dropout", DROP, ["stage", "block"])]})
    owned = {id(m) for m in model.modules()}
    hooks = [h for m in model.modules() for h in m._forward_hooks.values()]
    assert len(hooks) == 4 + 8 + 1  # stages, blocks, and the unused-rule check on the model (timm_drop.unused)
    assert all(id(h.__self__) in owned for h in hooks)
    assert model.state_dict().keys() == timm.create_model("resnet18").state_dict().keys()


@pytest.mark.slow
def test_compile_does_not_recompile_when_the_schedule_moves():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = timm.create_model("test_resnet", pretrained=False)
    schedule = {"kind": "linear", "start": 0.0, "end": 1.0}
    spec = {
        "rules": [
            _rule("dropout", DROP, ["stage"], schedule=schedule),
            _rule("droppath", DROP, ["residual"], schedule=schedule),
            _rule("dropblock", {"drop_prob": 0.1, "block_size": 3}, ["norm"], stages=[2], schedule=schedule),
        ]
    }
    apply_regularizer(model, spec)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    for i in range(4):
        timm_drop.set_progress(model, i / 3)
        compiled(x).sum().backward()
    assert counter.frame_count == 1
    assert all(float(r.strength) == 1.0 for r in _regs(model))
    torch._dynamo.reset()
    out = torch.compile(model, backend="aot_eager")(x)
    out.sum().backward()
    torch._dynamo.reset()


def test_sync_batchnorm_conversion_after_apply_keeps_the_regularizers():
    model = timm.create_model("regnetx_002", pretrained=False)
    spec = {
        "rules": [
            _rule("dropout", DROP, ["norm"], stages=[1]),  # BatchNormAct2d drop slots
            _rule("dropout", DROP, ["norm"], stages=[2], norm_position="after_act"),  # ConvNormAct rewrites
            _rule("droppath", DROP, ["residual"]),
            _rule("dropout", DROP, ["stage"]),  # hooks on stage containers
        ]
    }
    apply_regularizer(model, spec)
    regs = _regs(model)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        before = model(x)
    model = timm.layers.convert_sync_batchnorm(model)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert {id(r) for r in _regs(model)} == {id(r) for r in regs}
    calls = []
    for r in regs:
        r.register_forward_pre_hook(lambda m, a: calls.append(id(m)))
    model.train()
    for m in model.modules():  # SyncBN cannot train without a process group; its statistics are not the point
        if isinstance(m, nn.SyncBatchNorm):
            m.eval()
    with torch.no_grad():
        model(x)
    assert set(calls) == {id(r) for r in regs}
    with torch.no_grad():
        assert torch.equal(model.eval()(x), before)


def test_refuses_wrapped_compiled_and_twice_applied_models(tmp_path):
    import torch.distributed as dist

    spec = {"rules": [_rule("dropout", DROP, ["stage"])]}
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(RewriteError, match="DataParallel.*before wrapping"):
        apply_regularizer(nn.DataParallel(model), spec)
    with pytest.raises(RewriteError, match="torch.compile.*before torch.compile"):
        apply_regularizer(torch.compile(model, backend="eager"), spec)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        with pytest.raises(RewriteError, match="DistributedDataParallel"):
            apply_regularizer(nn.parallel.DistributedDataParallel(model), spec)
    finally:
        dist.destroy_process_group()
    assert not _regs(model) and _hooks(model) == 0
    apply_regularizer(model, spec)
    with pytest.raises(RewriteError, match="already carries regularizers.*stack=True"):
        apply_regularizer(model, spec)
    assert len(_regs(model)) == 4
    apply_regularizer(model, {"rules": [_rule("droppath", DROP, ["residual"])]}, stack=True)
    assert len(_regs(model)) == 12
    strip_regularizers(model)
    assert not _regs(model) and _hooks(model) == 0


@pytest.mark.parametrize("where", ["model", "block"])
def test_refuses_a_model_compiled_in_place(where):
    # nn.Module.compile() keeps the module and compiles its call; the graph it compiled before the apply would
    # keep running without the regularizers (issue 18, item 3)
    spec = {"rules": [_rule("dropout", DROP, ["stage"])]}
    model = timm.create_model("resnet18", pretrained=False).train()
    (model if where == "model" else model.layer1).compile(backend="eager")
    model(torch.randn(2, 3, 64, 64))
    name = "the model" if where == "model" else "submodule 'layer1'"
    with pytest.raises(RewriteError, match=rf"{name} was compiled in place.*apply regularizers before"):
        apply_regularizer(model, spec)
    assert not _regs(model) and _hooks(model) == 0


def test_strip_restores_the_structure_so_export_works():
    model = timm.create_model("test_resnet", pretrained=False).eval()
    text = repr(model)
    rules = [_rule("droppath", DROP, ["residual"]), _rule("dropout", DROP, ["merge", "norm", "stage"])]
    apply_regularizer(model, {"rules": rules})
    strip_regularizers(model)
    assert repr(model) == text
    x = torch.randn(1, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), model(x))


@pytest.fixture(scope="module")
def resnet18():
    return timm.create_model("resnet18", pretrained=False)


def test_plan_is_a_dry_run_with_a_table(resnet18):
    text, hooks = repr(resnet18), _hooks(resnet18)
    spec = {
        "rules": [
            _rule(
                "dropblock", {"drop_prob": 0.1, "block_size": 5}, ["norm"], stages=[3], label="DropBlock g3"
            ),
            _rule("droppath", {"drop_prob": 0.1}, ["residual"], stages=[4]),
        ]
    }
    p = plan(resnet18, spec)
    assert repr(resnet18) == text and _hooks(resnet18) == hooks and not _regs(resnet18)
    table = str(p).splitlines()
    assert table[0].split() == [
        "site",
        "kind",
        "stage",
        "shape",
        "layout",
        "regularizer",
        "params",
        "rule",
        "insertion",
    ]
    rows = {line.split()[0]: line.split() for line in table[2:] if line.startswith("layer")}
    assert len(rows) == len(p.entries) == 5 + 2  # layer3: 2 blocks x 2 BN + downsample BN; layer4: 2 adds
    assert rows["layer3.0.bn1"] == [
        "layer3.0.bn1",
        "norm(after_norm)",
        "3",
        "256x4x6",
        "NCHW",
        "dropblock",
        "drop_prob=0.1,",
        "block_size=5",
        "1",
        "rewrite",
    ]
    assert rows["layer4.1.add"][1:] == [
        "residual",
        "4",
        "512x2x3",
        "NCHW",
        "droppath",
        "drop_prob=0.1",
        "2",
        "rewrite",
    ]
    e = p.entries[0]
    assert (e.site, e.kind, e.stage, e.module, e.layout, e.rule, e.insertion) == (
        "norm:layer3.0.bn1",
        "norm",
        3,
        "layer3.0.bn1",
        "NCHW",
        0,
        "rewrite",
    )
    assert e.owner == "layer3.0" and e.rule_label == "rule 1 (dropblock) 'DropBlock g3'"
    # the last layer of an nn.Sequential: hooked on the container, which SyncBN conversion keeps
    assert (p.entries[2].module, p.entries[2].insertion, p.entries[2].owner) == (
        "layer3.0.downsample.1",
        "hook",
        "layer3.0.downsample",
    )
    d = p.to_dict()
    assert d["entries"][-1]["site"] == "residual:layer4.1.add" and d["matches"] == {"1": 5, "2": 2}


def test_depth_scaling_and_stage_params_resolve_per_site(resnet18):
    rule = _rule(
        "droppath",
        {"drop_prob": 0.4},
        ["residual"],
        depth_scaling="linear",
        stage_params={4: {"drop_prob": 0.8}},
    )
    p = plan(resnet18, {"rules": [rule]})
    probs = [e.params["drop_prob"] for e in p.entries]
    assert probs == pytest.approx([0.4 * i / 8 for i in range(1, 7)] + [0.8 * 7 / 8, 0.8])


def test_schedule_is_attached_at_full_strength_until_the_first_set_progress():
    # the documented contract: until the first set_progress call a regularizer runs at full strength (a scheduled one warns)
    model = timm.create_model("resnet18", pretrained=False)
    schedule = {"kind": "linear", "start": 0.0, "end": 0.5}
    apply_regularizer(model, {"rules": [_rule("dropout", DROP, ["stage"], schedule=schedule)]})
    regs = _regs(model)
    assert all(r.schedule.kind == "linear" and float(r.strength) == 1.0 for r in regs)
    timm_drop.set_progress(model, 0.0)
    assert all(float(r.strength) == 0.0 for r in regs)
    timm_drop.set_progress(model, 0.25)
    assert all(float(r.strength) == pytest.approx(0.5) for r in regs)


def test_norm_insertion_uses_the_slot_then_a_block_rewrite_then_a_hook():
    regnet = timm.create_model("regnetx_002", pretrained=False)
    rules = [
        _rule("dropout", DROP, ["norm"], stages=[1]),
        _rule("dropout", DROP, ["norm"], stages=[2], norm_position="after_act"),
    ]
    entries = plan(regnet, {"rules": rules}).entries
    assert {e.insertion for e in entries if e.rule == 0} == {"slot"}
    assert {e.insertion for e in entries if e.rule == 1} == {"rewrite"}
    assert ("s2.b1.conv1.bn", "s2.b1.conv1") in {(e.module, e.owner) for e in entries if e.rule == 1}
    apply_regularizer(regnet, {"rules": [_rule("dropout", DROP, ["norm"], name="s1.b1.conv1.bn")]})
    assert isinstance(regnet.s1.b1.conv1.bn.drop, Regularizer)
    strip_regularizers(regnet)
    assert isinstance(regnet.s1.b1.conv1.bn.drop, nn.Identity)
    resnet = timm.create_model("resnet18", pretrained=False)
    p = plan(resnet, {"rules": [_rule("dropout", DROP, ["norm"], name=["bn1", "layer1.0.bn1"])]})
    assert [(e.module, e.insertion, e.owner) for e in p.entries] == [
        ("bn1", "hook", "bn1"),  # called by the model root, which is never rewritten
        ("layer1.0.bn1", "rewrite", "layer1.0"),
    ]


def test_rule_matching_nothing_names_the_rule_and_nearest_modules(resnet18):
    spec = {"rules": [_rule("dropout", DROP, ["stage"]), _rule("dropout", DROP, ["block"], name="layer5.*")]}
    with pytest.raises(
        RewriteError, match=r"rule 2 \(dropout\) matched no site .*nearest module names: layer"
    ):
        plan(resnet18, spec)
    spec["rules"][1]["allow_empty"] = True
    assert plan(resnet18, spec).matches == {0: 4, 1: 0}


def test_layout_refusal_names_the_site_its_layout_and_the_rule():
    # A dynamic image size leaves the tokens without a fixed patch grid, so DropBlock still refuses them.
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, dynamic_img_size=True)
    spec = {"rules": [_rule("dropblock", {"drop_prob": 0.1, "block_size": 3}, ["block"])]}
    with pytest.raises(RewriteError, match=r"rule 1 \(dropblock\).*site block:blocks.0 \(layout NLC"):
        apply_regularizer(vit, spec)
    assert not _regs(vit) and _hooks(vit) == 0


def test_residual_rule_on_opaque_blocks_reports_why():
    model = timm.create_model("nf_resnet26", pretrained=False)
    with pytest.raises(
        RewriteError,
        match=r"rule 1 \(droppath\) matched no site.*residual sites unavailable in "
        r"stages.0.0: NormFreeBlock is a timm not-traceable",
    ):
        plan(model, {"rules": [_rule("droppath", DROP, ["residual"])]})


def test_two_rules_on_one_site_follow_the_later_rules_on_conflict(resnet18):
    first = _rule("dropout", DROP, ["stage"], stages=[3])
    second = _rule("spatial_dropout", DROP, ["stage"], stages=[3])
    with pytest.raises(
        RewriteError,
        match=r"rule 2 \(spatial_dropout\) and rule 1 \(dropout\) both select "
        r"site stage:layer3",
    ):
        plan(resnet18, {"rules": [first, second]})
    stacked = plan(resnet18, {"rules": [first, dict(second, on_conflict="stack")]})
    assert [e.regularizer for e in stacked.entries] == ["dropout", "spatial_dropout"]
    replaced = plan(resnet18, {"rules": [first, dict(second, on_conflict="replace")]})
    assert [e.regularizer for e in replaced.entries] == ["spatial_dropout"]
    # different kinds on the same tensor are different sites
    assert len(plan(resnet18, {"rules": [first, _rule("dropout", DROP, ["block"], name="layer3.1")]})) == 2


def test_stacked_regularizers_run_in_rule_order():
    model = timm.create_model("resnet18", pretrained=False)
    spec = {
        "rules": [
            _rule("dropout", DROP, ["merge"], name="layer1.0"),
            _rule("spatial_dropout", DROP, ["merge"], name="layer1.0", on_conflict="stack"),
        ]
    }
    apply_regularizer(model, spec)
    order = []
    for r in _regs(model):
        r.register_forward_pre_hook(lambda m, a: order.append(type(m).__name__))
    model.train()(torch.randn(2, 3, 32, 32))
    assert order == ["Dropout", "SpatialDropout"]


class _Branchy(nn.Module):
    """A block whose own forward branches on self.training."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            y = y * 0.5
        return x + y


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Branchy()

    def forward(self, x):
        return self.block(x)


def test_block_that_branches_on_training_keeps_both_behaviours():
    net = _Net()
    x = torch.randn(2, 4, 8, 8)
    apply_regularizer(net, {"rules": [_rule("dropout", {"drop_prob": 0.0}, ["residual"])]})
    with torch.no_grad():
        assert torch.equal(net.eval()(x), x + net.block.conv(x))
        assert torch.equal(net.train()(x), x + net.block.conv(x) * 0.5)


def test_plan_is_pure_data_built_without_touching_the_model(resnet18):
    import dataclasses
    import pickle

    spec = {
        "rules": [
            _rule("droppath", DROP, ["residual"]),
            _rule("dropout", DROP, ["norm", "stage"], stages=[2]),
        ]
    }
    p = plan(resnet18, spec)
    for e in p.entries:
        assert not any(isinstance(getattr(e, f.name), nn.Module) for f in dataclasses.fields(e))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.entries[0].params = {}
    assert pickle.loads(pickle.dumps(p)) == p == plan(resnet18, spec)


def test_a_regularized_model_is_freed_by_del_without_waiting_for_the_garbage_collector():
    # no reference cycle through the model: a big model (and a Trainer holding it, with its run lock) goes at `del`
    import gc
    import weakref

    spec = {"rules": [_rule("dropout", DROP, ["stage", "residual", "norm"], on_conflict="stack")]}
    gc.collect()
    gc.disable()
    try:
        model = apply_regularizer(timm.create_model("resnet18", pretrained=False), spec)
        model.train()(torch.randn(2, 3, 32, 32))
        ref = weakref.ref(model)
        del model
        assert ref() is None
    finally:
        gc.enable()
