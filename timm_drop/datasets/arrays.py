"""One split of an image dataset held as arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ArrayData"]


@dataclass
class ArrayData:
    """One split as uint8 channels-last images and int64 labels."""

    x: np.ndarray  # (N, H, W, C) uint8
    y: np.ndarray  # (N,) int64
    classes: list[str]
