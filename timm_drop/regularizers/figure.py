"""How a method's masks are drawn (``timm-drop viz``): traits a regularizer class declares in ``figure``.

The figure code reads these instead of a list of method names, so a new method states here, on itself, whether its
dropped regions are blocks worth outlining and whether it works on a grid of pooling cells worth drawing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Values ``viz --compare`` gives every method that takes them, so methods drawn side by side share one block size,
#: one drop probability and one top rate. A class names the ones it takes in ``compare_defaults``
#: (:func:`compare_values`); a method with a parameter of its own lists that value itself.
SHARED_COMPARE_VALUES: dict[str, Any] = {"drop_prob": 0.1, "block_size": 5, "top_rate": 0.2, "q": 0.5}


def compare_values(*names: str) -> dict[str, Any]:
    """The shared side-by-side values of ``names`` (:data:`SHARED_COMPARE_VALUES`), as a new dict."""
    return {name: SHARED_COMPARE_VALUES[name] for name in names}


@dataclass(frozen=True)
class FigureTraits:
    """How a method's mask panels are drawn.

    Attributes:
        outline_blocks: outline the dropped regions of the mask panel (methods that drop contiguous blocks).
        cell_grid: draw the ``block_size`` pooling cells the method scores (CorrDrop's Eq. (10) grid) over its
            mask and score panels.
    """

    outline_blocks: bool = False
    cell_grid: bool = False
