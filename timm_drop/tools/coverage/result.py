"""What one model's check produced (:class:`CoverageResult`), how a check fails, and the comparisons every check
shares (bit-identical outputs, hook counts, the module tree, a failure's place in the code under test)."""

from __future__ import annotations

import math
import os
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from timm_drop.regularizers import Regularizer

#: this package's folder: its frames are the checker's, never the place a failure is reported at
_HERE = os.path.dirname(os.path.abspath(__file__))

STAGES = (
    "create",
    "input",
    "plan",
    "apply",
    "state_dict",
    "eval",
    "train",
    "strength0",
    "deepcopy",
    "grad_checkpointing",
    "fx_retrace",
    "strip",
    "timeout",
    "crash",
    "skipped",
)


@dataclass
class CoverageResult:
    """Outcome of :func:`check_model` for one model.

    ``stage`` is the check that failed (one of :data:`STAGES`) or ``"ok"``; ``reason`` says why, ``where`` is
    the innermost traceback frame inside ``timm_drop`` (for grouping failures by cause), ``n_sites`` counts
    the planned sites by kind, ``n_regularizers`` the planned entries by regularizer, ``notes`` are non-fatal
    observations (e.g. a changed ``state_dict`` key order), ``passes`` the outcome of the gradient-checkpointing
    and FX re-trace checks (``"ok"`` or ``"n/a: <why>"``).
    """

    name: str
    ok: bool
    stage: str
    reason: str = ""
    n_sites: dict[str, int] = field(default_factory=dict)
    n_regularizers: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    input_size: tuple[int, ...] | None = None
    params: int | None = None
    where: str = ""
    notes: list[str] = field(default_factory=list)
    passes: dict[str, str] = field(default_factory=dict)  # optional checks (8, 9): "ok" or "n/a: <why>"

    @property
    def skipped(self) -> bool:
        return self.stage == "skipped"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CheckFailed(Exception):
    """A guarantee was violated (as opposed to an exception raised by the code under test)."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


class _Skip(Exception):
    pass


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    return []


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return math.inf
    return max((float((x.float() - y.float()).abs().max()) if x.numel() else 0.0) for x, y in zip(a, b))


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def _regularizers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, Regularizer)]


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(getattr(m, "_backward_hooks", {}))
        for m in model.modules()
    )


def _module_signature(model: nn.Module) -> list[tuple[str, str]]:
    return [(n, type(m).__name__) for n, m in model.named_modules()]


def _exc_reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {msg[0] if msg else ''}"
    return text if len(text) <= 400 else text[:397] + "..."


def _exc_where(exc: BaseException) -> str:
    """Innermost traceback frame inside timm_drop (not the checker's own code), else the innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if "timm_drop" in f.filename and not os.path.abspath(f.filename).startswith(_HERE)]
    frame = (own or frames or [None])[-1]
    if frame is None:
        return ""
    path = frame.filename
    short = path[path.rfind("timm_drop") :] if "timm_drop" in path else path.rsplit("/", 2)[-1]
    return f"{short}:{frame.lineno} ({frame.name})"
