"""The detection-backbone example (recipes/examples/backbone_fpn.py) runs and trains its regularized backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scripts import load_script

import timm_drop

pytest.importorskip("sklearn")  # the embedded digits data
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


def _example():
    return load_script("recipes/examples/backbone_fpn.py", "backbone_fpn")


def test_retinanet_backbone_spec_places_dropblock_like_the_classifier_spec():
    # section 4.3 reuses the ImageNet placement: the same sites as specs/dropblock_resnet50.yaml, block_size 5
    import timm

    backbone = timm.create_model("resnet50", features_only=True, out_indices=(2, 3, 4))
    det = timm_drop.plan(backbone, ROOT / "specs" / "dropblock_retinanet_backbone.yaml")
    clf = timm_drop.plan(timm.create_model("resnet50"), ROOT / "specs" / "dropblock_resnet50.yaml")
    assert [(e.site, e.stage) for e in det.entries] == [(e.site, e.stage) for e in clf.entries]
    assert len(det) == 36 and {e.params["block_size"] for e in det.entries} == {5}


def test_backbone_fpn_example_trains_a_few_steps():
    r = _example().main(["--steps", "4", "--batch-size", "16", "--image-size", "32"])
    # resnet18 groups 3-4: 4 BasicBlocks x (bn1, bn2) + 4 shortcuts
    assert r.regularizers == 12
    assert torch.isfinite(torch.tensor([r.first_loss, r.last_loss])).all()
    assert 0.0 <= r.accuracy <= 1.0
    regs = [m for m in r.backbone.modules() if isinstance(m, timm_drop.Regularizer)]
    assert all(float(m.strength) == 1.0 for m in regs)  # the schedule reached its end at the last step
