"""Everything viz knows about particular methods, in one place: strength parameters, compare defaults, which
masks get block outlines or CorrDrop's pooling cells, and each method's score map.

Kept together so that moving this knowledge onto the regularizer classes (their ``strength_params``,
``compare_defaults``, ``figure`` traits and ``score_map``) changes this module only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from timm_drop.viz.capture import _from_op_view, _op_view

#: Parameters a compared method borrows when neither the spec nor ``strength`` gives them.
COMPARE_DEFAULTS: dict[str, Any] = {"drop_prob": 0.1, "block_size": 5, "top_rate": 0.2, "q": 0.5}
#: Methods whose dropped regions get block outlines, and the methods with a score map.
_OUTLINED = ("dropblock", "corrdrop")
_CELLS = ("corrdrop",)


@dataclass(frozen=True)
class MethodTraits:
    """How viz treats one method (by registry name)."""

    strength_params: tuple[str, ...]  # replaced by ``strength``
    compare_defaults: dict[str, Any]  # borrowed in compare mode where the spec gives nothing
    outline_blocks: bool  # outline the dropped region's blocks
    cell_grid: bool  # draw the pooling cells (``block_size``) over mask and score


def _method_traits(name: str) -> MethodTraits:
    from timm_drop.spec import STRENGTH_PARAMS

    return MethodTraits(STRENGTH_PARAMS, COMPARE_DEFAULTS, name in _OUTLINED, name in _CELLS)


def _adjust_params(name: str, chosen: dict[str, Any]) -> None:
    """Keep a combination the method accepts: Selectout needs ``top_rate >= drop_prob``."""
    if name == "selectout" and "top_rate" in chosen and "drop_prob" in chosen:
        chosen["top_rate"] = max(chosen["top_rate"], chosen["drop_prob"])


def _cell_size(name: str, params: dict[str, Any], h: int, w: int) -> tuple[int, int] | None:
    """The pooling cell ``(kh, kw)`` drawn over a ``h x w`` map, or None for a method without cells."""
    if not _method_traits(name).cell_grid:
        return None
    k = int(params.get("block_size", 7))
    return min(k, h), min(k, w)


def _score_maps(
    name: str, params: dict[str, Any], x: torch.Tensor, layout: str, conv: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, str] | None:
    """The method's own score on the captured input, as (N, C or 1, H, W) maps, and its title."""
    if name == "corrdrop":
        from timm_drop.regularizers.corrdrop import correlation_map

        # CorrDrop acts on the map as drawn (a token site only through its patch grid)
        maps = conv(x)
        k = params.get("block_size", 7)
        h, w = maps.shape[-2:]
        kh, kw = min(k, h), min(k, w)
        cells = correlation_map(maps, k)
        full = cells.repeat_interleave(kh, 1).repeat_interleave(kw, 2)[:, :h, :w]
        return full[:, None], "correlation score F (Eq. 3)"
    if name == "attentiondrop":
        from timm_drop.regularizers.attentiondrop import attention_weights

        # AttentionDrop normalises over every position the op sees (prefix tokens included)
        view = _op_view(x, layout)
        w = attention_weights(view, params.get("top_rate", 1.0), params.get("mode", "ad"))
        return conv(_from_op_view(w.view(view.shape), layout)), f"drop weight w ({params.get('mode', 'ad')})"
    return None

