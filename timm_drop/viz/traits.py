"""What viz asks of a method, read from the regularizer class: its strength parameters, compare defaults, figure
traits (block outlines, pooling cells) and score map. A new method declares these on its class
(:class:`~timm_drop.regularizers.Regularizer`); nothing here names a method, except Selectout's parameter
constraint in :func:`_adjust_params`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from timm_drop.regularizers.base import Regularizer
from timm_drop.viz.capture import _from_op_view, _op_view


def _method_class(name: str) -> type:
    """The class registered as ``name`` (a factory function answers with the base class's defaults)."""
    from timm_drop.regularizers.registry import get_regularizer_class

    method = get_regularizer_class(name)
    return method if isinstance(method, type) and issubclass(method, Regularizer) else Regularizer


def _adjust_params(name: str, chosen: dict[str, Any]) -> None:
    """Keep a combination the method accepts: Selectout needs ``top_rate >= drop_prob``."""
    if name == "selectout" and "top_rate" in chosen and "drop_prob" in chosen:
        chosen["top_rate"] = max(chosen["top_rate"], chosen["drop_prob"])


def _cell_size(name: str, params: dict[str, Any], h: int, w: int) -> tuple[int, int] | None:
    """The pooling cell ``(kh, kw)`` drawn over a ``h x w`` map, or None for a method without cells."""
    cls = _method_class(name)
    if not cls.figure.cell_grid:
        return None
    k = int(cls.param(params, "block_size"))
    return min(k, h), min(k, w)


def _score_maps(
    name: str, params: dict[str, Any], x: torch.Tensor, layout: str, conv: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, str] | None:
    """The method's own score (``Regularizer.score_map``) on the captured input as its op sees it, as
    (N, C or 1, H, W) maps, and its title."""
    cls = _method_class(name)
    if layout in cls.grid_layouts:  # the op sees a token site's patch grid: the map as drawn
        return cls.score_map(conv(x), params)
    score = cls.score_map(_op_view(x, layout), params)
    return None if score is None else (conv(_from_op_view(score[0], layout)), score[1])
