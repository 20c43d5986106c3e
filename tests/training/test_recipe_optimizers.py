"""Recipe optimizers come from ``timm.optim.create_optimizer_v2``: every timm name, the model's
``no_weight_decay()``, layer-wise LR decay, and LayerOut's step hook on timm's optimizers."""

from __future__ import annotations

import copy

import pytest
import timm.optim
import torch
from tiny import tiny_run

import timm_drop  # noqa: F401  (registers the CIFAR models)
from timm_drop.training import ConfigError, Trainer, load_config

VIT = {
    "model": {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}},
    "data": {"dataset": "digits", "image_size": 32},
    "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
    "train": {"epochs": 1},
    "log": {"progress_bar": False},
}


def _dry(raw: dict, tmp_path, **over) -> Trainer:
    raw = copy.deepcopy(raw)
    raw["output_dir"] = str(tmp_path / "run")
    for section, values in over.items():
        raw.setdefault(section, {}).update(values)
    return Trainer(load_config(raw, check_paths=False), dry_run=True).setup()


def _group_of(trainer: Trainer, name: str) -> dict:
    param = dict(trainer.unwrapped.named_parameters())[name]
    (group,) = [g for g in trainer.optimizer.param_groups if any(p is param for p in g["params"])]
    return group


def test_vit_pos_embed_and_cls_token_get_no_weight_decay(tmp_path):
    trainer = _dry(VIT, tmp_path)
    assert {"pos_embed", "cls_token"} <= set(trainer.unwrapped.no_weight_decay())
    assert _group_of(trainer, "pos_embed")["weight_decay"] == 0.0
    assert _group_of(trainer, "cls_token")["weight_decay"] == 0.0
    assert _group_of(trainer, "blocks.0.attn.qkv.weight")["weight_decay"] == pytest.approx(0.05)
    assert isinstance(trainer.optimizer.optimizer, torch.optim.AdamW)


def test_no_decay_norm_bias_also_exempts_norms_and_biases(tmp_path):
    kept = _dry(VIT, tmp_path)
    assert _group_of(kept, "blocks.0.norm1.weight")["weight_decay"] == pytest.approx(0.05)
    filtered = _dry(VIT, tmp_path, optim={"no_decay_norm_bias": True})
    assert _group_of(filtered, "blocks.0.norm1.weight")["weight_decay"] == 0.0
    assert _group_of(filtered, "blocks.0.attn.qkv.bias")["weight_decay"] == 0.0
    assert _group_of(filtered, "blocks.0.attn.qkv.weight")["weight_decay"] == pytest.approx(0.05)


def test_layer_decay_scales_the_lr_of_early_layers(tmp_path):
    trainer = _dry(VIT, tmp_path, optim={"layer_decay": 0.5})
    head, first = _group_of(trainer, "head.weight"), _group_of(trainer, "patch_embed.proj.weight")
    assert head["lr_scale"] == pytest.approx(1.0)
    assert first["lr_scale"] < head["lr_scale"]
    # the recipe's LR schedule multiplies each group's lr_scale, as timm's schedulers do
    trainer.lr_schedule.apply(trainer.optimizer, 0)
    assert first["lr"] == pytest.approx(1e-3 * first["lr_scale"])
    assert head["lr"] == pytest.approx(1e-3)


def test_every_timm_optimizer_name_is_accepted(tmp_path):
    assert "lamb" in timm.optim.list_optimizers()
    trainer = _dry(VIT, tmp_path, optim={"name": "lamb"})
    assert type(trainer.optimizer.optimizer).__name__ == "Lamb"


def test_sgd_keeps_the_configs_nesterov_choice(tmp_path):
    # timm's "sgd" defaults to Nesterov; the recipe's optim.nesterov (default false) decides
    plain = _dry(VIT, tmp_path, optim={"name": "sgd", "lr": 0.1})
    assert plain.optimizer.optimizer.defaults["nesterov"] is False
    nest = _dry(VIT, tmp_path, optim={"name": "sgd", "lr": 0.1, "nesterov": True})
    assert nest.optimizer.optimizer.defaults["nesterov"] is True
    assert nest.optimizer.optimizer.defaults["momentum"] == pytest.approx(0.9)


def test_unknown_optimizer_name_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"optim\.name: 'adamww'.*did you mean 'adamw'"):
        load_config({"optim": {"name": "adamww"}})


def test_bad_layer_decay_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"optim\.layer_decay"):
        load_config({"optim": {"layer_decay": 1.5}})


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_layerout_frozen_params_do_not_move_under_timm_optimizers(tmp_path, name):
    raw = tiny_run(
        output_dir=str(tmp_path / name),
        optim={"name": name, "lr": 0.05, "weight_decay": 0.01},
        layerout={"freeze_probs": "random", "seed": 1, "skip_backward": False},
        train={"epochs": 1},
    )
    trainer = Trainer(load_config(raw)).setup()
    # one real step first, so momentum / Adam moments exist for every parameter
    trainer.train_one_epoch(0)
    trainer.layerout.start_epoch(1)
    frozen = {id(p) for p in trainer.layerout._frozen_params}
    assert frozen
    before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}
    trainer.train_one_epoch(1)
    trainer.layerout.end_epoch()
    moved = {n for n, p in trainer.unwrapped.named_parameters() if not torch.equal(p, before[n])}
    for n, p in trainer.unwrapped.named_parameters():
        if id(p) in frozen:
            assert n not in moved, n
    assert moved, "the trainable parameters must still train"
