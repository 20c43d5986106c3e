"""``model.pretrained``: the input pipeline (mean/std/interpolation/crop) follows the model's ``pretrained_cfg``
unless the config overrides it; the run and ``--dry-run`` print what they used. Offline: the "pretrained" weights
are a local file (``model.checkpoint_path``), loaded through timm's own pretrained path."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import timm_drop  # noqa: F401
from timm_drop.training import ConfigError, Trainer, load_config
from timm_drop.training.data_config import model_data_config

VIT_KW = {"img_size": 32, "patch_size": 8, "depth": 2}


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    """A vit_tiny checkpoint as downloaded weights would be (1000-class head)."""
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_KW)
    path = tmp_path_factory.mktemp("w") / "vit_tiny.pth"
    torch.save(m.state_dict(), path)
    return path, m.state_dict()


def _raw(tmp_path, ckpt, **data):
    return {
        "output_dir": str(tmp_path / "run"),
        "model": {
            "name": "vit_tiny_patch16_224",
            "kwargs": dict(VIT_KW),
            "pretrained": True,
            "checkpoint_path": str(ckpt),
        },
        "data": {
            "dataset": "digits",
            "image_size": 32,
            "batch_size": 16,
            "train_subset": 32,
            "eval_subset": 16,
        }
        | data,
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
        "train": {"epochs": 1},
        "log": {"progress_bar": False, "plot": False},
    }


def test_vit_base_pretrained_cfg_resolves_to_half_mean_std_and_bicubic():
    cfg = load_config({"model": {"name": "vit_base_patch16_224"}})
    dc = model_data_config(cfg.model)  # reads the pretrained_cfg; builds no weights, downloads nothing
    assert dc["mean"] == pytest.approx((0.5, 0.5, 0.5)) and dc["std"] == pytest.approx((0.5, 0.5, 0.5))
    assert dc["interpolation"] == "bicubic" and dc["crop_pct"] == pytest.approx(0.9)
    resnet = model_data_config(load_config({"model": {"name": "resnet50"}}).model)
    assert resnet["mean"] == pytest.approx((0.485, 0.456, 0.406))


def test_pretrained_run_normalises_with_the_models_statistics(tmp_path, vit_file, capsys):
    ckpt, sd = vit_file
    trainer = Trainer(load_config(_raw(tmp_path, ckpt))).setup()
    assert trainer.data_config["mean"] == pytest.approx((0.5, 0.5, 0.5))
    assert trainer.data_config["interpolation"] == "bicubic"
    assert trainer.train_loader.mean == pytest.approx((0.5, 0.5, 0.5))
    assert trainer.eval_loader.std == pytest.approx((0.5, 0.5, 0.5))
    # the weights came from the file (head replaced for the data's 10 classes)
    w = trainer.unwrapped.state_dict()["blocks.1.mlp.fc1.weight"]
    assert torch.equal(w.cpu(), sd["blocks.1.mlp.fc1.weight"])
    assert trainer.unwrapped.head.out_features == 10
    assert "data config: mean=(0.5, 0.5, 0.5)" in capsys.readouterr().out


def test_config_mean_std_override_the_model(tmp_path, vit_file):
    ckpt, _ = vit_file
    raw = _raw(tmp_path, ckpt, mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6], interpolation="bilinear")
    trainer = Trainer(load_config(raw)).setup()
    assert trainer.train_loader.mean == pytest.approx((0.1, 0.2, 0.3))
    assert trainer.data_config["interpolation"] == "bilinear"
    assert trainer.data_config["crop_pct"] == pytest.approx(0.9)  # not overridden: the model's


def test_without_pretrained_the_dataset_statistics_stay(tmp_path, vit_file):
    ckpt, _ = vit_file
    raw = _raw(tmp_path, ckpt)
    raw["model"]["pretrained"] = False
    raw["model"].pop("checkpoint_path")
    trainer = Trainer(load_config(raw)).setup()
    assert trainer.train_loader.mean != pytest.approx((0.5, 0.5, 0.5))


def test_dry_run_prints_data_config_and_optimizer_groups(tmp_path, vit_file, capsys):
    ckpt, _ = vit_file
    info = Trainer(load_config(_raw(tmp_path, ckpt), check_paths=False), dry_run=True).fit()
    out = capsys.readouterr().out
    assert "data config: mean=(0.5, 0.5, 0.5)" in out and "interpolation=bicubic" in out
    assert "optimizer group" in out and "pos_embed" in out
    assert info["data_config"]["mean"] == pytest.approx((0.5, 0.5, 0.5))
    assert any(g["weight_decay"] == 0.0 for g in info["optimizer_groups"])


def test_checkpoint_path_needs_pretrained_and_an_existing_file(tmp_path, vit_file):
    ckpt, _ = vit_file
    raw = _raw(tmp_path, ckpt)
    raw["model"]["pretrained"] = False
    with pytest.raises(ConfigError, match=r"model\.checkpoint_path"):
        load_config(copy.deepcopy(raw))
    raw = _raw(tmp_path, tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match=r"model\.checkpoint_path: .*does not exist"):
        load_config(raw)
    with pytest.raises(ConfigError, match=r"data\.interpolation"):
        load_config({"data": {"interpolation": "bicubicc"}})
    with pytest.raises(ConfigError, match=r"data\.crop_pct"):
        load_config({"data": {"crop_pct": 1.5}})
