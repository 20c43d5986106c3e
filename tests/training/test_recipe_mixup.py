"""``data.augment.mixup / cutmix / randaugment``: timm's batch-level ``Mixup`` on the device with
``SoftTargetCrossEntropy``, timm's ``rand_augment_transform`` in the image-folder workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import tiny_run, write_image_folder

import timm_drop  # noqa: F401
from timm_drop.training import ConfigError, Trainer, load_config


def _raw(tmp_path, **augment):
    return tiny_run(
        output_dir=str(tmp_path / "run"),
        data={"augment": {"crop_padding": 0, "hflip": False} | augment},
        train={"epochs": 1, "label_smoothing": 0.1},
    )


def _targets_seen(trainer: Trainer) -> list[torch.Tensor]:
    seen = []
    criterion = trainer.criterion

    def spy(out, target):
        seen.append(target.detach().clone())
        return criterion(out, target)

    trainer.criterion = spy
    return seen


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixing_trains_on_soft_targets_with_soft_target_cross_entropy(tmp_path, kind):
    from timm.loss import SoftTargetCrossEntropy

    trainer = Trainer(load_config(_raw(tmp_path, **{kind: 1.0}))).setup()
    assert isinstance(trainer.criterion, SoftTargetCrossEntropy)
    seen = _targets_seen(trainer)
    row = trainer.train_one_epoch(0)
    assert seen and all(t.shape == (16, 10) for t in seen)
    t = torch.cat(seen)
    assert torch.allclose(t.sum(-1), torch.ones(len(t)))
    # mixed (two labels share the mass) and smoothed (train.label_smoothing): no row is one-hot
    assert (t.max(-1).values < 1.0).all()
    assert ((t > 0.1).sum(-1) >= 2).any()
    assert np.isfinite(row["train_loss"])


def test_without_mixing_the_hard_label_loss_stays(tmp_path):
    trainer = Trainer(load_config(_raw(tmp_path))).setup()
    assert isinstance(trainer.criterion, torch.nn.CrossEntropyLoss)
    assert trainer.mixup is None


def test_mixing_validation_names_the_fields():
    with pytest.raises(ConfigError, match=r"data\.augment\.mixup"):
        load_config({"data": {"augment": {"mixup": -0.2}}})
    with pytest.raises(ConfigError, match=r"data\.augment\.mix_prob"):
        load_config({"data": {"augment": {"cutmix": 1.0, "mix_prob": 1.5}}})
    # timm's batch mode pairs each image with its mirror in the batch
    with pytest.raises(ConfigError, match=r"data\.batch_size: .*even"):
        load_config({"data": {"batch_size": 15, "augment": {"mixup": 0.2}}})


def test_randaugment_on_a_tensor_dataset_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"data\.augment\.randaugment: .*imagefolder"):
        load_config({"data": {"dataset": "digits", "augment": {"randaugment": "rand-m9-mstd0.5"}}})
    with pytest.raises(ConfigError, match=r"data\.augment\.randaugment"):
        load_config({"data": {"dataset": "imagefolder", "root": ".", "augment": {"randaugment": "m9"}}})


def test_randaugment_runs_in_the_image_folder_workers(tmp_path):
    from timm.data.auto_augment import RandAugment

    write_image_folder(tmp_path / "imgs")
    raw = _raw(tmp_path, randaugment="rand-m9-n2-mstd0.5")
    raw["data"] |= {
        "dataset": "imagefolder",
        "root": str(tmp_path / "imgs"),
        "batch_size": 4,
        "num_workers": 0,
    }
    raw["data"].pop("train_subset")
    raw["data"].pop("eval_subset")
    trainer = Trainer(load_config(raw)).setup()
    tfs = trainer.train_loader.dataset.transform.transforms
    assert any(isinstance(t, RandAugment) for t in tfs)
    assert not any(isinstance(t, RandAugment) for t in trainer.eval_loader.dataset.transform.transforms)
    x, y = next(iter(trainer.train_loader))
    assert x.shape == (4, 3, 8, 8) and torch.isfinite(x).all()
