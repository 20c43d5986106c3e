"""The embedded default dataset: scikit-learn's bundled ``load_digits`` (1,797 real 8x8 handwritten digits shipped
inside the sklearn wheel; no network, no download), upsampled bilinearly to ``image_size`` and repeated to 3
channels, with a fixed stratified split (20% test, ``random_state=0``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from timm_drop.datasets.arrays import ArrayData

__all__ = ["digits_split"]


def digits_split(train: bool, image_size: int) -> ArrayData:
    """The training (1,437 images) or test (360) split of the digits at ``image_size`` x ``image_size``, RGB uint8."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0  # pixel values are 0..16
    idx_tr, idx_te = train_test_split(np.arange(len(x)), test_size=0.2, random_state=0, stratify=d.target)
    idx = idx_tr if train else idx_te
    t = torch.from_numpy(x[idx])[:, None]
    t = F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False)
    t = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).repeat(1, 1, 1, 3)
    return ArrayData(t.numpy(), d.target[idx].astype(np.int64), [str(c) for c in d.target_names])
