"""Dataset facts live in one place (``timm_drop.training.datasets``) and the dry run computes steps per epoch with the
function the real loaders use: for every config the dry run's count equals the real run's, and where the size
cannot be read cheaply (a folder that is not there) it says so instead of guessing."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import write_image_folder

import timm_drop  # noqa: F401
from timm_drop.training import ConfigError, Trainer, load_config
from timm_drop.training.data import DATASET_FACTS, load_arrays


def _raw(tmp_path, data: dict, **train) -> dict:
    return {
        "output_dir": str(tmp_path / "run"),
        "model": {"name": "resnet20_cifar"},
        "data": {"image_size": 8, **data},
        "train": {"epochs": 1, **train},
        "log": {"progress_bar": False, "plot": False},
    }


def _both(raw: dict) -> tuple[Trainer, Trainer]:
    dry = Trainer(load_config(raw, check_paths=False), dry_run=True).setup()
    real = Trainer(load_config(raw)).setup()
    return dry, real


@pytest.mark.parametrize(
    "data, train",
    [
        ({"dataset": "digits", "batch_size": 64}, {}),
        ({"dataset": "digits", "batch_size": 32, "train_subset": 300}, {"grad_accum_steps": 2}),
        # a subset larger than the data is the whole data, not the subset's size
        ({"dataset": "digits", "batch_size": 100, "train_subset": 5000}, {"grad_accum_steps": 3}),
    ],
    ids=["digits", "digits-subset-accum", "digits-oversized-subset"],
)
def test_dry_run_steps_per_epoch_equal_the_real_runs(tmp_path, data, train):
    dry, real = _both(_raw(tmp_path, data, **train))
    assert (
        dry.steps_per_epoch
        == real.steps_per_epoch
        == len(real.train_loader) // real.cfg.train.grad_accum_steps
    )
    assert dry.num_classes == real.num_classes == 10


def test_dry_run_counts_an_image_folder_by_listing_it(tmp_path):
    write_image_folder(tmp_path / "imgs", n=7, size=8)  # 2 classes x 7 training images
    raw = _raw(
        tmp_path,
        {"dataset": "imagefolder", "root": str(tmp_path / "imgs"), "batch_size": 4, "num_workers": 0},
    )
    dry, real = _both(raw)
    assert dry.steps_per_epoch == real.steps_per_epoch == 14 // 4
    assert dry.num_classes == real.num_classes == 2


def test_dry_run_counts_an_npz_by_its_labels(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz",
        x_train=rng.integers(0, 255, (50, 8, 8, 3), dtype=np.uint8),
        y_train=np.arange(50) % 5,
        x_test=rng.integers(0, 255, (10, 8, 8, 3), dtype=np.uint8),
        y_test=np.arange(10) % 5,
    )
    dry, real = _both(_raw(tmp_path, {"dataset": "npz", "root": str(tmp_path / "d.npz"), "batch_size": 8}))
    assert dry.steps_per_epoch == real.steps_per_epoch == 50 // 8
    assert dry.num_classes == real.num_classes == 5


def test_dry_run_refuses_a_batch_the_real_run_refuses(tmp_path):
    raw = _raw(tmp_path, {"dataset": "digits", "batch_size": 64, "train_subset": 50})
    with pytest.raises(ConfigError, match="data.batch_size") as dry:
        Trainer(load_config(raw, check_paths=False), dry_run=True).setup()
    with pytest.raises(ConfigError, match="data.batch_size") as real:
        Trainer(load_config(raw)).setup()
    assert str(dry.value) == str(real.value)


def test_dry_run_without_the_data_says_steps_per_epoch_are_unknown(tmp_path, capsys):
    raw = _raw(tmp_path, {"dataset": "imagefolder", "root": str(tmp_path / "absent"), "num_classes": 7})
    info = Trainer(load_config(raw, check_paths=False), dry_run=True).fit()
    assert info["steps_per_epoch"] is None and info["num_classes"] == 7
    assert "steps_per_epoch=unknown" in capsys.readouterr().out


def test_digits_facts_match_the_data():
    from timm_drop.training.config import DataConfig

    facts = DATASET_FACTS["digits"]
    tr, te = load_arrays(DataConfig(image_size=8), True), load_arrays(DataConfig(image_size=8), False)
    assert (facts.train_size, facts.eval_size, facts.num_classes) == (len(tr.y), len(te.y), len(tr.classes))


def test_cifar_statistics_are_the_cifar_models_own():
    import timm

    cfg = timm.create_model("resnet20_cifar", pretrained=False).pretrained_cfg
    assert DATASET_FACTS["cifar10"].mean == tuple(cfg["mean"]) and DATASET_FACTS["cifar10"].std == tuple(
        cfg["std"]
    )
