"""Small inputs several tests share: a seconds-long recipe run config, an on-disk ImageFolder, a tiny Swin."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

#: ResNet-20 on 32 digits images at 8 px, 2 epochs, quiet: the smallest run that still goes through every stage
TINY_RUN: dict[str, Any] = {
    "model": {"name": "resnet20_cifar"},
    "data": {
        "dataset": "digits",
        "image_size": 8,
        "batch_size": 16,
        "train_subset": 32,
        "eval_subset": 16,
    },
    "optim": {"name": "sgd", "lr": 0.05},
    "train": {"epochs": 2},
    "log": {"progress_bar": False, "plot": False},
}


def tiny_run(**sections: Any) -> dict[str, Any]:
    """A fresh copy of :data:`TINY_RUN` with ``sections`` laid over it.

    A dict value is merged into the section of that name (one level deep: ``data={"augment": {...}}`` replaces
    ``data.augment`` as a whole); any other value (a name, ``None``) replaces the section.
    """
    raw = copy.deepcopy(TINY_RUN)
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(name), dict):
            raw[name] = raw[name] | copy.deepcopy(value)
        else:
            raw[name] = copy.deepcopy(value)
    return raw


def dropblock_stage_rule(
    drop_prob: float = 0.2, stages: list[int] | None = None, **extra: Any
) -> dict[str, Any]:
    """One spec rule: DropBlock (block 3, fits 8 px maps) after the given stages (all when None)."""
    rule: dict[str, Any] = {
        "regularizer": "dropblock",
        "params": {"drop_prob": drop_prob, "block_size": 3},
        "sites": ["stage"],
    }
    if stages is not None:
        rule["stages"] = list(stages)
    return rule | extra


#: a linear ramp of the regularizer's strength from 0 to its full value over the run
LINEAR_RAMP: dict[str, Any] = {"kind": "linear", "start": 0.0, "end": 1.0}


def write_image_folder(root: Path, n: int = 4, size: int = 12) -> Path:
    """``root/{train,val}/{a,b}/{i}.png``: ``n`` random RGB images of ``size`` px per class and split."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def tiny_swin(img_size: int | tuple[int, int] = 56, stages: int = 2, window_size: int = 7) -> Any:
    """timm's Swin-T layout at width 24 with one block of one head per stage (NHWC stage outputs, no token grid)."""
    import timm

    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=img_size,
        embed_dim=24,
        depths=(1,) * stages,
        num_heads=(1,) * stages,
        window_size=window_size,
    )
