"""The behaviour every timm_drop regularizer shares (DESIGN §3).

A regularizer is a parameter-free ``nn.Module`` that

* is the identity in ``eval()``, bit for bit, and in training when its configured strength is 0;
* keeps its schedule strength in a non-persistent 0-dim float32 buffer named ``strength`` (a multiplier in
  [0, 1] on the configured drop probability or scale range), so that moving a schedule neither adds
  ``state_dict`` keys nor recompiles a ``torch.compile``d model, and DDP's buffer broadcast keeps ranks in step;
* knows the layout of the tensor it receives (``"NCHW"``, ``"NHWC"``, ``"NLC"`` tokens or ``"NC"`` pooled
  features) and adapts to it by viewing the input as channels-first ``(N, C, *spatial)`` (tokens become
  ``(N, C, L, 1)``, pooled features ``(N, C, 1)``); a layout it cannot serve is refused by name.

Subclasses implement :meth:`Regularizer.regularize` on a channels-first view ``(N, C, *spatial)`` and
declare the layouts they accept in ``layouts``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import fx, nn

from timm_drop import fx as _fx

#: Every layout a site can have: channels-first maps, channels-last maps, token sequences ``(B, L, C)`` and
#: pooled features ``(B, C)`` (seen as one spatial position per channel).
LAYOUTS: tuple[str, ...] = ("NCHW", "NHWC", "NLC", "NC")


def check_probability(name: str, value: float, *, allow_one: bool = False) -> float:
    """Validate a probability-like hyper-parameter and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (value >= 0.0 and upper_ok):
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def check_strength(
    name: str, value: float | torch.Tensor, *, allow_one: bool = False
) -> float | torch.Tensor:
    """Validate a strength given as a number; a 0-dim tensor (a scheduled value the module built from an already
    validated number) passes through untouched, so no device sync or recompile happens in forward."""
    if isinstance(value, torch.Tensor):
        return value
    return check_probability(name, value, allow_one=allow_one)


def is_static_zero(value: float | torch.Tensor) -> bool:
    """True for a plain-number strength of 0: the functional forms then return their input unchanged."""
    return not isinstance(value, torch.Tensor) and value == 0.0


def check_positive_int(name: str, value: int) -> int:
    """Validate an integer hyper-parameter that must be >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def restride_like(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` viewed with ``x``'s strides when both lay their elements out in the same memory order.

    Strides of size-1 dimensions are arbitrary: a LayerNorm2d output of shape (N, C, 1, 1) may carry
    (C, 1, C, C) while an elementwise result gets (C, 1, 1, 1). Kernels downstream pick code paths from strides
    and can then round differently (seen: 4.7e-10 in EfficientViM's mixer), so a regularizer at strength 0
    would not be the identity bit for bit. Re-viewing is free; a different real layout is left alone.
    """
    if out.shape != x.shape or out.stride() == x.stride():
        return out
    if any(so != sx for so, sx, n in zip(out.stride(), x.stride(), x.shape) if n > 1):
        return out
    return out.as_strided(x.shape, x.stride(), out.storage_offset())


class Regularizer(nn.Module):
    """Base class: eval identity, schedule strength buffer, layout adaptation.

    Attributes:
        strength: non-persistent 0-dim float32 buffer in [0, 1]; the schedule's multiplier on the configured
            strength. Starts at 1 so a regularizer without any ``set_progress`` call runs at full strength.
        schedule: optional :class:`timm_drop.schedules.Schedule`; ``set_progress`` evaluates it.
        layout: layout of the tensors this instance receives; set by the rewriter from its shape pass.
    """

    #: layouts this regularizer accepts; the rewriter refuses a site whose layout is not listed.
    layouts: ClassVar[tuple[str, ...]] = LAYOUTS
    #: registry name (filled by :func:`timm_drop.regularizers.registry.register_regularizer`).
    registry_name: ClassVar[str] = ""

    strength: torch.Tensor

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _fx.register_leaf(cls)  # an FX leaf for timm's tracers (timm_drop.fx)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("strength", torch.ones((), dtype=torch.float32), persistent=False)
        self.schedule: Any = None
        self.layout: str = "NCHW"

    # -- configuration -------------------------------------------------------------------------------
    def set_layout(self, layout: str) -> None:
        if layout not in self.layouts:
            raise ValueError(f"{type(self).__name__} accepts layouts {list(self.layouts)}, not {layout!r}")
        self.layout = layout

    def is_noop(self) -> bool:
        """True when the configured (static) strength is zero, so training forward is the identity too."""
        return False

    def set_progress(self, progress: float, epoch: int | None = None) -> None:
        """Move the schedule to ``progress`` in [0, 1]: writes ``strength`` in place (no recompile)."""
        value = 1.0 if self.schedule is None else float(self.schedule(progress))
        self.strength.fill_(value)

    def effective(self, value: float) -> torch.Tensor:
        """``value * strength`` as a float32 0-dim tensor (robust to ``model.half()`` casting buffers)."""
        return self.strength.float() * value

    # -- forward -------------------------------------------------------------------------------------
    def regularize(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the method to a channels-first tensor ``(N, C, *spatial)`` in training mode."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, fx.Proxy):  # traced through by an FX tracer: one call_module node (timm_drop.fx)
            return _fx.leaf_node(self, x)
        if not self.training or self.is_noop():
            return x
        if self.layout == "NHWC" and x.dim() == 4:
            out = self.regularize(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        elif self.layout == "NLC" and x.dim() == 3:
            out = self.regularize(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        elif self.layout == "NC" and x.dim() == 2:
            out = self.regularize(x.unsqueeze(-1)).squeeze(-1)
        else:
            out = self.regularize(x)
        return restride_like(out, x)

    def _settings(self) -> str:
        return ""

    def extra_repr(self) -> str:
        parts = [self._settings()]
        if self.layout != "NCHW":
            parts.append(f"layout={self.layout}")
        if self.schedule is not None:
            parts.append(f"schedule={self.schedule}")
        return ", ".join(p for p in parts if p)
