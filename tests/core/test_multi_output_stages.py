"""Stage sites of stages that return several tensors (HRNet, CrossViT, PiT, EfficientViM).

A stage module returning a list or tuple gets one ``stage`` site per tensor branch that is a map or a patch-grid
token sequence; the regularizer replaces that branch in a container of the same type and passes the others
through (PiT's class tokens, EfficientViM's hidden state). Checked through the public API with default
arguments, on the classifier and on the ``features_only`` backbone of each architecture.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch

import timm_drop
from timm_drop.regularizers.base import Regularizer

pytestmark = pytest.mark.usefixtures("one_thread")

DROPBLOCK = {
    "rules": [{"regularizer": "dropblock", "params": {"drop_prob": 0.3, "block_size": 3}, "sites": ["stage"]}]
}
# stacked on top for the pickling check: block-local rewrites (RewriteRecipe) next to the branch hooks
DROPPATH = {"rules": [{"regularizer": "droppath", "params": {"drop_prob": 0.3}, "sites": ["residual"]}]}

HRNET = [("layer1", None)] + [(f"stage{s}", b) for s in (2, 3, 4) for b in range(s)]
# (model, constructor kwargs, input side, [(stage module, branch)], {stage module: passed-through branches})
CASES = [
    ("hrnet_w18_small", {}, 64, HRNET, {}),
    ("crossvit_tiny_240", {"img_size": 120}, 120, [(f"blocks.{i}", b) for i in range(3) for b in (0, 1)], {}),
    (
        "pit_ti_224",
        {"img_size": 64},
        64,
        [(f"transformers.{i}", 0) for i in range(3)],
        {"transformers.0": [1]},
    ),
    (
        "efficientvim_m1",
        {},
        64,
        [("stages.0", 0), ("stages.0", 1), ("stages.1", 0), ("stages.1", 1), ("stages.2", 0)],
        {"stages.0": [2]},
    ),
]
WRAPPED = {"pit_ti_224": "body.", "crossvit_tiny_240": "model.", "efficientvim_m1": "model."}


def _create(name: str, features_only: bool, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, features_only=features_only, **kwargs)


def _flat(out) -> list[torch.Tensor]:
    return (
        list(out.values())
        if isinstance(out, dict)
        else list(out)
        if isinstance(out, (list, tuple))
        else [out]
    )


def _regs(model: torch.nn.Module) -> list[Regularizer]:
    return [m for m in model.modules() if isinstance(m, Regularizer)]


def _stage_outputs(model: torch.nn.Module, modules: list[str], x: torch.Tensor) -> dict[str, object]:
    """One train-mode forward; the stage modules' outputs as the next layer receives them (hooks added last)."""
    seen: dict[str, object] = {}

    def keep(name: str, out: object) -> None:
        seen.setdefault(name, out)

    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: keep(n, o)) for n in modules]
    try:
        torch.manual_seed(1)
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _acting(model: torch.nn.Module, x: torch.Tensor) -> dict[str, bool]:
    """site -> whether its regularizer changed its input in one train-mode forward."""
    changed: dict[str, bool] = {}

    def keep(reg: Regularizer, x: torch.Tensor, out: torch.Tensor) -> None:
        changed.setdefault(reg.site_name, not torch.equal(x, out))

    handles = [r.register_forward_hook(lambda m, a, o: keep(m, a[0], o)) for r in _regs(model)]
    try:
        torch.manual_seed(2)
        model.train()(x)
    finally:
        for h in handles:
            h.remove()
    return changed


@pytest.mark.parametrize("features_only", [False, True], ids=["classifier", "features_only"])
@pytest.mark.parametrize("name,kwargs,side,branches,passed", CASES, ids=[c[0] for c in CASES])
def test_multi_output_stage_regularizes_each_branch(name, kwargs, side, branches, passed, features_only):
    prefix = WRAPPED.get(name, "") if features_only else ""
    ref = _create(name, features_only, **kwargs)
    model = _create(name, features_only, **kwargs)
    cls, keys = type(model), set(model.state_dict())
    modules = list(dict.fromkeys(prefix + m for m, _ in branches))
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        y_eval = _flat(ref.eval()(x))
        state = copy.deepcopy(ref.state_dict())  # train-mode forwards move BatchNorm statistics
        before = _stage_outputs(ref.train(), modules, x)

        entries = timm_drop.plan(model, DROPBLOCK).entries
        assert [(e.module, e.branch) for e in entries] == [(prefix + m, b) for m, b in branches]
        assert timm_drop.apply_regularizer(model, DROPBLOCK) is model
        assert type(model) is cls and set(model.state_dict()) == keys
        for a, b in zip(_flat(model.eval()(x)), y_eval):
            assert torch.equal(a, b), f"{name}: eval output differs from the unregularized model"

        acting = _acting(model, x)
        assert acting == {e.site: True for e in entries}, (
            f"{name}: a branch regularizer did not act: {acting}"
        )
        after = _stage_outputs(model.train(), modules, x)
        for m in modules:
            assert type(after[m]) is type(before[m]) and len(after[m]) == len(before[m])
        first = modules[0]  # the first stage sees the unregularized input: its passed branches are untouched
        for b in passed.get(first.removeprefix(prefix), []):
            assert torch.equal(after[first][b], before[first][b]), f"{name}: branch {b} of {first} changed"
        # EfficientViM's last stage returns its map twice: one regularized tensor in both places
        if name == "efficientvim_m1":
            last = after[prefix + "stages.2"]
            assert last[0] is last[1] and not torch.equal(last[0], before[prefix + "stages.2"][0])
        torch.manual_seed(3)
        y_train = _flat(model(x))
        torch.manual_seed(3)
        assert any(not torch.equal(a, b) for a, b in zip(y_train, _flat(ref.train()(x))))

        timm_drop.apply_regularizer(model, DROPPATH, stack=True)  # rewritten blocks next to the branch hooks
        n_regs = len(_regs(model))
        clone = pickle.loads(pickle.dumps(model))
        assert type(clone) is cls and len(_regs(clone)) == n_regs
        clone.load_state_dict(state), model.load_state_dict(state)
        for a, b in zip(_flat(clone.eval()(x)), y_eval):
            assert torch.equal(a, b), f"{name}: the unpickled model's eval output differs"
        acted = _acting(clone, x)
        assert all(acted.get(e.site) for e in entries), f"{name}: unpickled branch hooks do not act: {acted}"

        assert timm_drop.strip_regularizers(model) is model
        assert type(model) is cls and not _regs(model) and set(model.state_dict()) == keys
        model.load_state_dict(state)
        for a, b in zip(_flat(model.eval()(x)), y_eval):
            assert torch.equal(a, b), f"{name}: strip did not restore the eval output"
        torch.manual_seed(4)
        stripped = _flat(model.train()(x))
        ref.load_state_dict(state)
        torch.manual_seed(4)
        for a, b in zip(stripped, _flat(ref.train()(x))):
            assert torch.equal(a, b), f"{name}: strip did not restore the train-mode output"


@pytest.mark.parametrize("features_only", [False, True], ids=["classifier", "features_only"])
def test_hrnet_stages_are_its_paper_stages_and_rule_parameters_follow_them(features_only):
    model = _create("hrnet_w18_small", features_only)
    spec = {
        "rules": [
            {
                "regularizer": "dropblock",
                "params": {"drop_prob": 0.2, "block_size": 3},
                "stage_params": {4: {"drop_prob": 0.1}},
                "sites": ["stage"],
                "stages": [3, 4],
                "depth_scaling": "linear",
            }
        ]
    }
    entries = timm_drop.plan(model, spec).entries
    # stage 3 is the module stage3 (its three branches), stage 4 is stage4 (four); depth scaling counts each
    # stage once, so all branches of a stage get the same strength
    assert [(e.site, e.stage, e.params["drop_prob"]) for e in entries] == [
        *[(f"stage:stage3[{b}]", 3, 0.2 * 1 / 2) for b in range(3)],
        *[(f"stage:stage4[{b}]", 4, 0.1 * 2 / 2) for b in range(4)],
    ]
    assert {e.layout for e in entries} == {"NCHW"}
    block_rule = {**spec["rules"][0], "sites": ["block"], "stages": [1], "stage_params": {}}
    blocks = timm_drop.plan(model, {"rules": [block_rule]}).entries
    assert blocks and all(e.module.startswith("layer1.") and e.stage == 1 for e in blocks)


def test_a_stage_rule_that_matches_nothing_on_hrnet_names_no_misnumbered_stage():
    # HRNet has stages 1-4 (layer1, stage2 .. stage4), all with sites: no stage is reported missing or renumbered
    model = _create("hrnet_w18_small", False)
    spec = {"rules": [{**DROPBLOCK["rules"][0], "stages": [5]}]}
    with pytest.raises(
        timm_drop.RewriteError, match=r"matched no site \(sites: \[stage\], stages: \[5\]\)"
    ) as err:
        timm_drop.plan(model, spec)
    assert "stage modules whose output" not in str(err.value) and "(stage 2)" not in str(err.value)


def test_crossvit_token_branches_get_their_own_patch_grid():
    model = _create("crossvit_tiny_240", True, img_size=120)
    entries = timm_drop.plan(model, DROPBLOCK).entries
    assert {(e.branch, e.token_grid, e.num_prefix_tokens, e.layout) for e in entries} == {
        (0, (10, 10), 1, "NLC"),
        (1, (7, 7), 1, "NLC"),
    }


def test_pit_class_token_is_a_prefix_token_of_its_first_stage_grid():
    # PiT records no num_prefix_tokens: its cls_token parameter says one class token precedes the patch grid
    model = _create("pit_ti_224", False, img_size=64)
    rule = {**DROPBLOCK["rules"][0], "sites": ["block"], "stages": [1]}
    entries = timm_drop.plan(model, {"rules": [rule]}).entries
    assert entries and {(e.layout, e.token_grid, e.num_prefix_tokens) for e in entries} == {
        ("NLC", (7, 7), 1)
    }
    # stage 2's tokens are pooled to another grid the model records nowhere: refused, naming the lengths
    with pytest.raises(timm_drop.RewriteError, match=r"its 17 tokens are not the model's 1 prefix token"):
        timm_drop.plan(model, {"rules": [{**rule, "stages": [2]}]})


@pytest.mark.parametrize(
    "name,stages",
    [
        # feature_info: stem, stage1 .. stage4, of which stem and stage1 name no module (stage1 is layer1)
        ("hrnet_w18_small", {"layer1": 1, "stage2": 2, "stage3": 3, "stage4": 4}),
        # feature_info: bn1 (no such module: the stride-2 stem tap), blocks.0 .. blocks.3
        ("mobilenetv5_300m", {"blocks.0": 1, "blocks.1": 2, "blocks.2": 3, "blocks.3": 4}),
        # feature_info lists blocks.0 .. blocks.2 once per token branch
        ("crossvit_tiny_240", {"blocks.0": 1, "blocks.1": 2, "blocks.2": 3}),
    ],
)
def test_stages_are_numbered_by_feature_info_position(name, stages):
    from timm_drop.structure import feature_stages

    with torch.device("meta"):  # numbering reads the module tree and feature_info only
        model = timm.create_model(name, pretrained=False)
    assert feature_stages(model) == stages
