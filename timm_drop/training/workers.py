"""The seeds of loader workers: a pure function of ``(seed, epoch, rank)`` and the worker (or sample), so
augmentation never depends on which worker loads an image. Used by the loaders and by the streams."""

from __future__ import annotations

import numpy as np
import torch

from timm_drop.seeding import mix_seed

__all__ = ["seed_worker_rngs", "worker_seed"]


def seed_worker_rngs(s: int) -> None:
    """The global RNGs a worker's PIL/torchvision transforms draw from."""
    import random

    # the CPU generator only (a worker's transforms run on the CPU): torch.manual_seed also visits every
    # accelerator backend, which costs more than the decode of a small image
    torch.default_generator.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def worker_seed(key: int, worker_id: int) -> int:
    """One loader worker's seed for an epoch key (a pure function of ``(seed, epoch, rank)``)."""
    return mix_seed(key, worker_id)
