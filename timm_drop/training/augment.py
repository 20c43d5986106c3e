"""Batched, vectorised image augmentation on the accelerator (no Python loop over images).

All functions take a generator so that the data stream is reproducible from ``(seed, epoch, rank)`` alone, and
work on a batch at once:

* :func:`random_crop` — zero-pad by ``padding`` and crop back at a random offset per image (the CIFAR standard of
  He et al. 2016: "4 pixels are padded on each side, and a 32x32 crop is randomly sampled"). Works on channels-last
  ``(N, H, W, C)`` so the gather is one advanced-indexing op.
* :func:`random_hflip` — mirror each image with probability 1/2.
* :func:`cutout` — DeVries & Taylor 2017: one ``size x size`` square per image, its centre uniform over the image
  and the square clipped at the border (so the erased area is smaller near edges, as in their code), set to 0
  *after* normalisation (= the dataset mean).
* :func:`random_erasing` — Zhong et al. 2020 (Alg. 1): with probability ``p`` erase a rectangle of area
  ``s_l..s_h`` of the image and aspect ``r_1..1/r_1`` filled with random values. Alg. 1 retries until the rectangle
  fits; vectorised, we draw once and clip the sides to the image instead (a documented deviation: very
  elongated draws get clipped rather than redrawn). Fill: per-pixel N(0, 1) in normalised units (timm's "pixel"
  mode), i.e. random values with the data's spread.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cutout", "random_crop", "random_erasing", "random_hflip"]


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad channels-last images ``(N, H, W, C)`` by ``padding`` and crop ``H x W`` at random offsets."""
    if padding <= 0:
        return x
    n, h, w, _ = x.shape
    xp = F.pad(x, (0, 0, padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
    return xp[torch.arange(n, device=x.device)[:, None, None], rows, cols]


def random_hflip(
    x: torch.Tensor, generator: torch.Generator | None = None, *, width_dim: int = 2
) -> torch.Tensor:
    """Mirror each image along ``width_dim`` with probability 1/2 (default: channels-last ``(N, H, W, C)``)."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    return torch.where(flip.view(shape), x.flip(width_dim), x)


def _box_mask(
    y0: torch.Tensor, y1: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """``(N, 1, H, W)`` bool mask, True inside ``[y0, y1) x [x0, x1)`` per image."""
    r = torch.arange(h, device=y0.device)[None, :, None]
    c = torch.arange(w, device=y0.device)[None, None, :]
    m = (
        (r >= y0[:, None, None])
        & (r < y1[:, None, None])
        & (c >= x0[:, None, None])
        & (c < x1[:, None, None])
    )
    return m[:, None]


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cutout on a normalised channels-first batch ``(N, C, H, W)``: zero one clipped square per image."""
    if size <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), device=x.device, generator=generator)
    cx = torch.randint(0, w, (n,), device=x.device, generator=generator)
    half = size // 2
    m = _box_mask(
        (cy - half).clamp(min=0),
        (cy - half + size).clamp(max=h),
        (cx - half).clamp(min=0),
        (cx - half + size).clamp(max=w),
        h,
        w,
    )
    return x.masked_fill(m, 0.0)


def random_erasing(
    x: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
    *,
    area: tuple[float, float] = (0.02, 0.4),
    min_aspect: float = 0.3,
) -> torch.Tensor:
    """Random Erasing on a normalised channels-first batch ``(N, C, H, W)``."""
    if p <= 0:
        return x
    n, _, h, w = x.shape
    dev = x.device
    apply = torch.rand(n, device=dev, generator=generator) < p
    s = torch.empty(n, device=dev).uniform_(area[0], area[1], generator=generator) * (h * w)
    log_r = torch.empty(n, device=dev).uniform_(
        torch.log(torch.tensor(min_aspect)).item(),
        -torch.log(torch.tensor(min_aspect)).item(),
        generator=generator,
    )
    r = torch.exp(log_r)
    eh = torch.sqrt(s * r).round().long().clamp(1, h)
    ew = torch.sqrt(s / r).round().long().clamp(1, w)
    y0 = (torch.rand(n, device=dev, generator=generator) * (h - eh + 1)).long()
    x0 = (torch.rand(n, device=dev, generator=generator) * (w - ew + 1)).long()
    m = _box_mask(y0, y0 + eh, x0, x0 + ew, h, w) & apply[:, None, None, None]
    noise = torch.randn(x.shape, device=dev, generator=generator, dtype=torch.float32).to(x.dtype)
    return torch.where(m, noise, x)
