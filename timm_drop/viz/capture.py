"""Capture: what each regularizer received and did in one forward, and the images that forward runs on.

Hooks on every :class:`~timm_drop.regularizers.base.Regularizer` record its input; the call is then replayed on a
detached copy of that input from the RNG state it started with (inside ``torch.random.fork_rng``, so the model's
own random stream is untouched) and ``d out / d in`` is the realised mask *exactly*, also where the input is 0.
The hooks return nothing, so the forward computes exactly what it computes without them.

Also here: the site layouts as channels-first maps (:func:`to_maps`), and :func:`load_images`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from timm_drop.regularizers.base import Regularizer

__all__ = ["SiteCapture", "capture_masks", "load_images", "to_maps"]


# ---------------------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------------------
def to_maps(
    t: torch.Tensor, layout: str, grid: tuple[int, int] | None = None, num_prefix_tokens: int = 0
) -> tuple[torch.Tensor, str]:
    """A site tensor as channels-first maps ``(N, C, H, W)`` in picture orientation, and a note for the title.

    ``NHWC`` is permuted (row = height), ``NLC`` tokens drop their ``num_prefix_tokens`` and fold onto ``grid``
    (rows, cols) when the counts agree (else a square grid, else a 1 x L strip), ``NC`` becomes a 1 x C strip of
    one channel.
    """
    if layout == "NCHW" and t.dim() == 4:
        return t, ""
    if layout == "NHWC" and t.dim() == 4:
        return t.permute(0, 3, 1, 2), ""
    if layout == "NLC" and t.dim() == 3:
        n, length, c = t.shape
        tokens, note = t, ""
        if grid is not None and num_prefix_tokens and length - num_prefix_tokens == grid[0] * grid[1]:
            tokens = t[:, num_prefix_tokens:]
            note = f"{num_prefix_tokens} prefix token(s) not drawn"
        length = tokens.shape[1]
        if grid is not None and length == grid[0] * grid[1]:
            gh, gw = grid
        elif math.isqrt(length) ** 2 == length:
            gh = gw = math.isqrt(length)
        else:
            gh, gw = 1, length
            note = "tokens drawn as a strip"
        return tokens.transpose(1, 2).reshape(n, c, gh, gw), note
    if layout == "NC" and t.dim() == 2:
        return t[:, None, None, :], "channels drawn as a strip"
    raise ValueError(f"cannot draw a tensor of shape {tuple(t.shape)} as layout {layout!r}")


def _from_op_view(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :meth:`Regularizer.forward`'s adaptation: the op's ``(N, C, *spatial)`` view back to the site's
    layout (so scores computed where the op computes them are drawn like activations)."""
    if layout == "NHWC":
        return t.permute(0, 2, 3, 1)
    if layout == "NLC":
        return t.squeeze(-1).transpose(1, 2)
    if layout == "NC":
        return t.squeeze(-1)
    return t


def _op_view(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "NHWC":
        return t.permute(0, 3, 1, 2)
    if layout == "NLC":
        return t.transpose(1, 2).unsqueeze(-1)
    if layout == "NC":
        return t.unsqueeze(-1)
    return t


# ---------------------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SiteCapture:
    """What one regularizer received and did in one forward (its first call), for the first ``keep`` samples.

    Attributes:
        input: the regularizer's input as received (site layout), float32 on CPU.
        mask: same shape: the realised multiplicative factor (0 = dropped); NaN where it is unknown.
        exact: True when ``mask`` is ``d out / d in`` and reproduces the output; False when it is ``out / in``.
        batch_size: leading size of the tensor the regularizer saw (not the images' count for windowed tokens).
    """

    input: torch.Tensor
    mask: torch.Tensor
    exact: bool
    batch_size: int


def _rng_devices(x: torch.Tensor) -> list[int]:
    return (
        [x.device.index if x.device.index is not None else torch.cuda.current_device()] if x.is_cuda else []
    )


class _Recorder:
    """Forward pre-hook + hook pair; bound to one forward, removed afterwards."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.states: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.captures: dict[nn.Module, SiteCapture] = {}

    def pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module in self.captures or not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]
        cuda = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        self.states[id(module)] = (torch.get_rng_state(), cuda)

    def post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        state = self.states.pop(id(module), None)
        if state is None or not isinstance(output, torch.Tensor) or output.shape != args[0].shape:
            return
        x = args[0]
        mask, exact = self._replay(module, x, output, state)
        k = self.keep
        self.captures[module] = SiteCapture(
            x[:k].detach().float().cpu(), mask[:k].float().cpu(), exact, x.shape[0]
        )

    @staticmethod
    def _replay(module, x, output, state) -> tuple[torch.Tensor, bool]:
        # The same call from the same RNG state draws the same mask; every built-in method multiplies its input
        # by a factor computed without gradient, so the gradient of the sum is that factor, unit by unit.
        with torch.random.fork_rng(devices=_rng_devices(x)):
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], x.device)
            xr = x.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                yr = module.forward(xr)  # not module(...): that would run these hooks again
                grad = None
                if yr.requires_grad:
                    (grad,) = torch.autograd.grad(yr, xr, torch.ones_like(yr), allow_unused=True)
        out = output.detach().float()
        if grad is not None:
            tol = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-5
            same = torch.allclose(yr.detach().float(), out, rtol=tol, atol=tol)
            if same and torch.allclose(x.detach().float() * grad.float(), out, rtol=tol, atol=tol):
                return grad.detach(), True
        xf = x.detach().float()
        return torch.where(xf != 0, out / xf.where(xf != 0, torch.ones_like(xf)), torch.nan), False


def capture_masks(
    model: nn.Module,
    x: torch.Tensor,
    *,
    seed: int | None = 0,
    modules: Sequence[nn.Module] | None = None,
    keep: int | None = None,
) -> tuple[Any, dict[nn.Module, SiteCapture]]:
    """One forward of ``model`` on ``x`` (in the mode the model is in) recording every regularizer's input and mask.

    Args:
        model: a model carrying regularizers (``apply_regularizer``); not copied, not changed.
        x: the input batch.
        seed: ``torch.manual_seed(seed)`` first (None: use the current RNG state).
        modules: the regularizer modules to record (default: every :class:`Regularizer` in ``model``).
        keep: how many samples to keep per capture (default: all).

    Returns:
        ``(output, {regularizer module: SiteCapture})``; the output is the one the model computes without the
        hooks (same seed, same result).
    """
    if modules is None:
        modules = [m for m in model.modules() if isinstance(m, Regularizer)]
    rec = _Recorder(keep if keep is not None else x.shape[0])
    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(rec.pre))
            handles.append(m.register_forward_hook(rec.post))
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, rec.captures


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------
def _model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model takes: a fixed ``patch_embed.img_size`` wins over the pretrained config's size."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    size = tuple(cfg["input_size"])
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:
        img = (img, img) if isinstance(img, int) else tuple(img)
        size = (size[0], int(img[0]), int(img[1]))
    return size  # type: ignore[return-value]


def _data_config(model: nn.Module, input_size: Sequence[int] | None) -> dict[str, Any]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    cfg["input_size"] = tuple(input_size) if input_size is not None else _model_input_size(model)
    return cfg


def load_images(
    model: nn.Module,
    images: Any = None,
    *,
    num_images: int = 2,
    input_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """The model-ready batch ``(N, C, H, W)`` for :func:`render_masks`.

    ``images`` is None (the first ``num_images`` test images of the embedded digits data, resized to the model's
    input size and normalised with its data config), a tensor (used as given: already a model input), or a
    sequence of image files / PIL images (timm's eval transform from ``resolve_data_config`` + ``create_transform``).
    """
    cfg = _data_config(model, input_size)
    if images is None:
        d = _default_digits(num_images)  # (N, 8, 8, 3) uint8, the raw 8x8 digits
        t = torch.from_numpy(d).permute(0, 3, 1, 2).float() / 255.0
        t = F.interpolate(t, size=tuple(cfg["input_size"][1:]), mode="bilinear", align_corners=False)
        mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
        return (t.clamp(0, 1) - mean) / std
    if isinstance(images, torch.Tensor):
        return images.unsqueeze(0) if images.dim() == 3 else images
    from PIL import Image
    from timm.data import create_transform

    transform = create_transform(**cfg, is_training=False)
    batch = []
    for item in images:
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if not path.is_file():
                raise FileNotFoundError(f"image file not found: {path}")
            try:
                with Image.open(path) as im:
                    img = im.convert("RGB")
            except Exception as exc:  # PIL raises several types for unreadable files
                raise ValueError(f"cannot read image file {path}: {exc}") from exc
        else:
            img = item.convert("RGB")
        batch.append(transform(img))
    if not batch:
        raise ValueError("images: an empty list; give at least one image file or None for the digits")
    return torch.stack(batch)


def _token_grid(model: nn.Module, hw: tuple[int, int]) -> tuple[tuple[int, int] | None, int]:
    pe = getattr(model, "patch_embed", None)
    grid = None
    if pe is not None:
        if getattr(pe, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
            grid = tuple(pe.dynamic_feat_size(hw))
        elif getattr(pe, "grid_size", None) is not None:
            grid = tuple(pe.grid_size)
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    return grid, prefix  # type: ignore[return-value]


def _default_digits(n: int) -> Any:  # a numpy array (numpy comes with the recipe extras)
    """The first ``n`` raw 8x8 test digits, ``(N, 8, 8, 3)`` uint8: the default images (the embedded digits data).

    The one place that names where the digits data lives."""
    from timm_drop.datasets.digits import digits_split

    return digits_split(False, 8).x[:n]
