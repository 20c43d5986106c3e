"""Seeds derived from tuples of integers: one rule for every random stream timm_drop draws itself (the recipe's
data order and augmentation, LayerOut's freeze vectors), so ``(seed, epoch, rank, ...)`` alone fixes each stream."""

from __future__ import annotations

import torch

__all__ = ["mix_seed", "seeded_generator"]


def mix_seed(*keys: int) -> int:
    """One 63-bit seed from a tuple of integers: (seed=1, epoch=0) and (seed=0, epoch=1) give unrelated streams."""
    s = 0x9E3779B97F4A7C15
    for k in keys:
        s = (s ^ (int(k) + 0x632BE59BD9B4E019 + (s << 6) + (s >> 2))) & 0x7FFFFFFFFFFFFFFF
    return s


def seeded_generator(device: torch.device | str, *keys: int) -> torch.Generator:
    """A generator on ``device`` seeded by a tuple of integers (e.g. ``(seed, epoch, rank)``)."""
    g = torch.Generator(device=device)
    g.manual_seed(mix_seed(*keys))
    return g
