"""Best/last weights are also written as ``.safetensors`` (no pickle), loadable by timm's own pretrained path and by
``safetensors.torch.load_file`` + a strict ``load_state_dict``."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from tiny import tiny_run

import timm_drop  # noqa: F401
from timm_drop.training import Trainer, load_config
from timm_drop.training.checkpoint import load_weights


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "run"
    raw = tiny_run(output_dir=str(out), model={"name": "resnet10t"}, train={"epochs": 1})
    trainer = Trainer(load_config(raw))
    trainer.fit()
    return out, trainer


@pytest.mark.parametrize("which", ["best", "last"])
def test_safetensors_hold_exactly_the_pth_weights(run, which):
    out, _ = run
    st = load_file(out / f"{which}_model.safetensors")
    pth = load_weights(out / f"{which}_model.pth")
    assert st.keys() == pth.keys()
    assert all(torch.equal(st[k], pth[k]) for k in pth)


def test_safetensors_round_trip_into_timm(run):
    out, trainer = run
    trained = {k: v.cpu() for k, v in trainer.unwrapped.state_dict().items()}
    model = timm.create_model("resnet10t", num_classes=10)
    model.load_state_dict(load_file(out / "last_model.safetensors"), strict=True)
    via_timm = timm.create_model(
        "resnet10t",
        pretrained=True,
        num_classes=10,
        # the file's own class count: timm then keeps its classifier instead of re-initialising it
        pretrained_cfg_overlay={"file": str(out / "last_model.safetensors"), "num_classes": 10},
    )
    for m in (model, via_timm):
        sd = m.state_dict()
        assert all(torch.equal(sd[k], trained[k]) for k in trained)


def test_safetensors_files_are_part_of_the_run(run):
    out, _ = run
    entries = json.loads((out / ".timm_drop_run.json").read_text())["entries"]
    assert {"best_model.safetensors", "last_model.safetensors"} <= set(entries)


def test_the_recipes_cifar_model_weights_reload_through_timms_pretrained_path(tmp_path):
    """recipes/README.md's reload line, for the project's own CIFAR models (they once refused pretrained=True even
    with a file), and the same file as a recipe's model.checkpoint_path."""
    out = tmp_path / "run"
    trainer = Trainer(load_config(tiny_run(output_dir=str(out), train={"epochs": 1})))
    trainer.fit()
    assert trainer.cfg.model.name == "resnet20_cifar"
    trained = {k: v.cpu() for k, v in trainer.unwrapped.state_dict().items()}
    for name in ("last_model.safetensors", "last_model.pth"):
        path = str(out / name)
        model = timm.create_model(
            "resnet20_cifar", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=path, num_classes=10)
        )
        assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained), name
    # fine-tuning from it with 4 classes: the body is the file's, the classifier is new
    raw = tiny_run(output_dir=str(tmp_path / "ft"), model={"name": "resnet20_cifar", "pretrained": True,
                   "checkpoint_path": str(out / "last_model.safetensors")}, data={"num_classes": 4})  # fmt: skip
    tuned = Trainer(load_config(raw)).setup()
    try:
        sd = tuned.unwrapped.state_dict()
        assert all(torch.equal(sd[k].cpu(), trained[k]) for k in trained if not k.startswith("fc."))
        assert sd["fc.weight"].shape == (4, 64)
    finally:
        tuned.run_dir.release()
