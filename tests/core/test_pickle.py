"""A regularized model pickles: torch.save(model), pickle, spawn (issue 9 item 5), for every insertion kind."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from torch import nn

import timm_drop
from timm_drop.regularizers.base import Regularizer


def _rule(reg, sites, **kw):
    return {"regularizer": reg, "params": {"drop_prob": 0.3}, "sites": sites, **kw}


# every site kind, and every insertion: slot (regnet's BatchNormAct2d), rewrite, hook, pre-hook (test_resnet's
# deep stem is an nn.Sequential of conv/bn/act)
CASES = {
    "stage": ("test_resnet", [_rule("dropout", ["stage"])], {"hook"}),
    "block": ("test_resnet", [_rule("dropout", ["block"])], {"hook"}),
    "residual": ("test_resnet", [_rule("droppath", ["residual"])], {"rewrite"}),
    "shortcut": ("test_resnet", [_rule("dropout", ["shortcut"])], {"rewrite"}),
    "merge": ("test_resnet", [_rule("dropout", ["merge"])], {"rewrite"}),
    "norm": ("test_resnet", [_rule("dropout", ["norm"])], {"rewrite", "hook", "pre_hook"}),
    "norm-slot": ("regnetx_002", [_rule("dropout", ["norm"], stages=[1])], {"slot"}),
    "module": ("test_resnet", [_rule("dropout", ["module"], type="Conv2d", stages=[1, 2])], {"hook"}),
}


def _model(name):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, zero_init_last=False).eval()


def _regs(model):
    return [m for m in model.modules() if isinstance(m, Regularizer)]


def _torch_roundtrip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _check_copy(loaded, original_repr, expected, x, n_regs):
    """Same eval output bit for bit, regularizes in training, strips back to the original structure."""
    assert len(_regs(loaded)) == n_regs
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), expected)
        state = {k: v.clone() for k, v in loaded.state_dict().items()}
        torch.manual_seed(0)
        a = loaded.train()(x)
        torch.manual_seed(1)
        assert not torch.equal(a, loaded(x))
    loaded.load_state_dict(state)
    timm_drop.strip_regularizers(loaded)
    assert repr(loaded) == original_repr and not _regs(loaded)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.modules()) == 0
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), expected)


@pytest.mark.parametrize("case", list(CASES))
def test_pickle_and_torch_save_round_trip_every_site_kind(case):
    name, rules, insertions = CASES[case]
    model = _model(name)
    x = torch.randn(2, 3, 32, 32)
    text = repr(model)
    with torch.no_grad():
        expected = model(x)
    timm_drop.apply_regularizer(model, {"rules": rules})
    assert {e.insertion for e in timm_drop.applied_plans(model)[-1].entries} == insertions
    n = len(_regs(model))
    for loaded in (
        pickle.loads(pickle.dumps(model)),
        _torch_roundtrip(model),
        _torch_roundtrip(copy.deepcopy(model)),
    ):
        assert type(loaded) is type(model) and loaded is not model
        _check_copy(loaded, text, expected, x, n)
    _check_copy(model, text, expected, x, n)  # the original is untouched by its copies


def test_pickle_after_sync_batchnorm_conversion():
    model = _model("test_resnet")
    x = torch.randn(2, 3, 32, 32)
    rules = [
        _rule("droppath", ["residual"]),
        _rule("dropout", ["norm"], on_conflict="stack"),
        _rule("dropout", ["stage"]),
    ]
    timm_drop.apply_regularizer(model, {"rules": rules})
    model = timm.layers.convert_sync_batchnorm(model).eval()
    with torch.no_grad():
        expected = model(x)
    loaded = _torch_roundtrip(model)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    timm_drop.strip_regularizers(loaded)
    assert not _regs(loaded)


@pytest.mark.slow
def test_a_fresh_process_rebuilds_the_rewritten_classes(tmp_path):
    # spawn / another machine: no generated class exists yet, it is rebuilt from the original class + recipe
    model = _model("test_resnet")
    x = torch.randn(2, 3, 32, 32)
    text = repr(model)
    rules = [
        _rule("droppath", ["residual"]),
        _rule("dropout", ["shortcut", "merge", "stage", "block"]),
        _rule("dropout", ["norm"]),
    ]
    timm_drop.apply_regularizer(model, {"rules": rules})
    timm_drop.apply_regularizer(model, {"rules": [_rule("dropout", ["merge"], stages=[2])]}, stack=True)
    with torch.no_grad():
        expected = model(x)
    torch.save(
        {"model": model, "x": x, "expected": expected, "repr": text, "n": len(_regs(model))},
        tmp_path / "m.pt",
    )
    script = textwrap.dedent(
        f"""
        import torch, timm_drop
        from timm_drop.regularizers.base import Regularizer
        d = torch.load({str(tmp_path / "m.pt")!r}, weights_only=False)
        m, x = d["model"], d["x"]
        assert sum(isinstance(r, Regularizer) for r in m.modules()) == d["n"]
        with torch.no_grad():
            assert torch.equal(m.eval()(x), d["expected"])
            torch.manual_seed(0)
            a = m.train()(x)
            torch.manual_seed(1)
            assert not torch.equal(a, m(x))
        timm_drop.strip_regularizers(m)
        assert repr(m) == d["repr"], "strip did not restore the structure"
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
