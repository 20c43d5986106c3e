"""Regularizers act under gradient checkpointing exactly as without it (issue 18, item 1).

``model.set_grad_checkpointing(True)`` is what timm's ``train.py --grad-checkpointing`` and Hugging Face's
``gradient_checkpointing=True`` call. timm's ``checkpoint_seq`` then calls a stage's blocks directly (a stage that
is an ``nn.Sequential`` is never called itself), and ``torch.utils.checkpoint`` runs every checkpointed segment
twice: once in the forward pass and again in the backward pass. Every site must act in the forward pass as it does
without checkpointing, the recomputation must draw the same masks (so gradients are those of the forward that was
run) and must not advance a self-counting (``steps:``) schedule.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import timm_drop
from timm_drop.regularizers import Regularizer

pytestmark = pytest.mark.usefixtures("one_thread")

STAGE_SPEC = {
    "rules": [
        {
            "regularizer": "dropblock",
            "params": {"drop_prob": 0.5, "block_size": 1},
            "sites": ["stage"],
            "stages": [2, 3],
        }
    ]
}


def _forward_backward(model: torch.nn.Module, x: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)
    out = model(x)
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _same_grads(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenetv3_small_100"])
def test_stage_sites_act_under_set_grad_checkpointing(name):
    torch.manual_seed(0)
    model = timm_drop.create_model(name, spec=STAGE_SPEC, num_classes=10).train()
    x = torch.randn(2, 3, 64, 64)
    calls = []
    for reg in model.modules():
        if isinstance(reg, Regularizer):
            reg.register_forward_pre_hook(lambda m, a: calls.append(m))
    plain_out, plain_grads = _forward_backward(model, x)
    assert calls, "no regularizer ran without checkpointing"
    calls.clear()

    model.set_grad_checkpointing(True)
    with torch.no_grad():  # the forward alone: no recomputation
        torch.manual_seed(0)
        model(x)
    assert len(calls) == len(plain_calls := [r for r in model.modules() if isinstance(r, Regularizer)]), (
        f"{len(calls)} of {len(plain_calls)} regularizers ran under gradient checkpointing"
    )
    ckpt_out, ckpt_grads = _forward_backward(model, x)
    assert torch.equal(ckpt_out, plain_out)
    assert _same_grads(ckpt_grads, plain_grads)
    # and the regularizers did something: another seed gives another output
    other, _ = _forward_backward(model, x, seed=1)
    assert not torch.equal(other, ckpt_out)


def test_recomputation_draws_the_same_mask_and_does_not_advance_a_steps_schedule():
    spec = {
        "rules": [
            {
                "regularizer": "dropblock",
                "params": {"drop_prob": 0.3, "block_size": 3},
                "sites": ["stage", "residual"],
                "stages": [3, 4],
                "on_conflict": "stack",
                "schedule": {"kind": "linear", "start": 0.0, "end": 1.0, "steps": 4},
            }
        ]
    }
    torch.manual_seed(0)
    base = timm.create_model("resnet18", num_classes=10, zero_init_last=False)
    model = timm_drop.apply_regularizer(copy.deepcopy(base), spec).train()
    reference = timm_drop.apply_regularizer(copy.deepcopy(base), spec).train()
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    regs = [m for m in model.modules() if isinstance(m, Regularizer)]
    for step in range(3):  # step 0 runs at strength 0 (progress 0/4); later steps drop
        out, grads = _forward_backward(model, x, seed=step)
        ref_out, ref_grads = _forward_backward(reference, x, seed=step)
        assert torch.equal(out, ref_out)
        assert _same_grads(grads, ref_grads), f"step {step}: gradients differ from the un-checkpointed run"
        assert {int(r.schedule_count) for r in regs} == {step + 1}


def test_a_rewritten_stage_keeps_honouring_set_grad_checkpointing():
    # PVT-v2's stage calls its own norm (a rewrite of the stage) and checkpoints its blocks itself when
    # grad_checkpointing is on: the rewritten stage must still checkpoint them (each block then runs twice)
    spec = {"rules": [{"regularizer": "dropout", "params": {"drop_prob": 0.2}, "sites": ["norm"],
                       "name": "stages.*.norm"}]}  # fmt: skip
    torch.manual_seed(0)
    model = timm_drop.create_model("pvt_v2_b0", spec=spec, num_classes=10)
    stage = model.stages[1]
    assert hasattr(type(stage), "_timm_drop_recipe"), "the stage was expected to be rewritten"
    runs = []
    stage.blocks[0].register_forward_pre_hook(lambda m, a: runs.append(1))
    model.train().set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    _forward_backward(model, x)  # the first call of a variant also checks it against the original forward
    runs.clear()
    out, grads = _forward_backward(model, x)
    assert len(runs) == 2, "the rewritten stage no longer checkpoints its blocks"
    model.set_grad_checkpointing(False)
    ref_out, ref_grads = _forward_backward(model, x)
    assert torch.equal(out, ref_out) and _same_grads(grads, ref_grads)


def test_sites_inside_a_nested_features_only_backbone_act_under_checkpointing():
    # a hybrid ViT holds a timm features_only ResNet as patch_embed.backbone; under gradient checkpointing that
    # FeatureListNet checkpoints each of its layers (found by the coverage tool's gradient-checkpointing pass)
    spec = {
        "rules": [
            {"regularizer": "dropout", "params": {"drop_prob": 0.3}, "sites": ["norm"],
             "name": ["patch_embed.backbone.bn1", "patch_embed.backbone.layer1.*"]},
            {"regularizer": "droppath", "params": {"drop_prob": 0.3}, "sites": ["residual"], "stages": [2, 3],
             "on_conflict": "stack"},
        ]
    }  # fmt: skip
    torch.manual_seed(0)
    model = timm_drop.create_model("vit_small_resnet26d_224", spec=spec, num_classes=10, img_size=64).train()
    x = torch.randn(2, 3, 64, 64)
    plain_out, plain_grads = _forward_backward(model, x)
    model.set_grad_checkpointing(True)
    ckpt_out, ckpt_grads = _forward_backward(model, x)
    assert torch.equal(ckpt_out, plain_out)
    assert _same_grads(ckpt_grads, plain_grads)
