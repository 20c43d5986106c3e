"""Numbers in a spec that mean something only on a given model: stages counted from the end, block sizes
relative to a site's map.

* **Negative stage numbers** (``stages: [-2, -1]``, ``stage_params: {-2: ...}``) count from the last stage, as
  Python indexes do: on a model with ``n`` stages ``-k`` is stage ``n + 1 - k``, so ``[-2, -1]`` is "the last two"
  on 3-, 4- and 5-stage models alike. A spec may mix signs; :func:`resolve_stages` turns a rule's numbers into
  positive ones against the model's stage count when it is planned. ``0``, a number past either end, and one
  stage given twice in ``stage_params`` (``4`` and ``-1`` on a 4-stage model) are refused by name.
* **Relative block sizes** (``block_size: {fraction: f}``, ``0 < f <= 1``): the side of the block is
  ``round(f * min(H, W))`` (at least 1, halves up) of the map of the site's stage -- the stage output, the group
  resolution the papers quote sizes for (the first conv of a ResNet stage still runs at the previous stage's
  resolution); a site outside any stage, or whose stage output is no map, uses its own map. It is resolved per
  site and shown in the plan. The map
  is taken at the input the plan is made for: the ``example_input`` when one is given, else the model's configured
  input size (a fixed-size model's ``img_size``, else ``pretrained_cfg["input_size"]``, what timm's data config
  uses) -- the library's shape pass runs on a smaller input for speed, so its map sizes are scaled to that size.
  DropBlock's paper size, 7 on the 14x14 and 7x7 maps of a 224-px ResNet-50, is ``{fraction: 0.5}`` on the first
  and ``{fraction: 1.0}`` on the second: 1 and 1 at 32 px, 12 and 12 at 384 px.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from timm_drop.errors import TimmDropError

__all__ = [
    "RELATIVE_KEY",
    "RelativeError",
    "check_relative_size",
    "is_relative_size",
    "map_hw",
    "reference_hw",
    "resolve_relative_sizes",
    "resolve_stages",
    "stage_count",
    "stage_from_end",
]

#: the key of a relative size: ``block_size: {fraction: 0.5}``
RELATIVE_KEY = "fraction"


class RelativeError(TimmDropError, ValueError):
    """A stage number or relative size that does not fit the model the spec is planned for."""


# -- stages counted from the end --------------------------------------------------------------------------
def stage_count(stages: Mapping[str, int | None]) -> int:
    """The number of stages of an analysed model (``Analysis.stages``: feature module -> stage or None)."""
    return max((s for s in stages.values() if s is not None), default=0)


def stage_from_end(stage: int, n: int) -> int:
    """The stage number a negative ``stage`` counts from the end of an ``n``-stage model (``-1`` = ``n``); a positive
    one as it is. Not range-checked."""
    return n + 1 + stage if stage < 0 else stage


def _positive(stage: int, n: int, rule: Any, fld: str) -> int:
    resolved = stage_from_end(stage, n)
    if not 1 <= resolved <= n:
        raise RelativeError(
            f"{rule.describe()}: field {fld!r}: stage {stage} does not exist on this model, which has {n} stages "
            f"(valid: 1..{n} or -{n}..-1)"
        )
    return resolved


def resolve_stages(rule: Any, n: int) -> Any:
    """``rule`` with its negative ``stages`` / ``stage_params`` keys turned into stage numbers on an ``n``-stage
    model (the same rule when it has none); positive numbers pass through unchanged."""
    negative = [s for s in (rule.stages or ()) if s < 0] + [k for k in rule.stage_params if k < 0]
    if not negative:
        return rule
    stages = None
    if rule.stages is not None:
        stages = tuple(sorted({_positive(s, n, rule, "stages") for s in rule.stages}))
    stage_params: dict[int, Any] = {}
    for key, override in rule.stage_params.items():
        stage = _positive(key, n, rule, f"stage_params.{key}")
        if stage in stage_params:
            raise RelativeError(
                f"{rule.describe()}: field 'stage_params': stage {stage} of this {n}-stage model is given twice "
                f"(as {stage} and as {stage - n - 1})"
            )
        if stages is not None and stage not in stages:
            raise RelativeError(
                f"{rule.describe()}: field 'stage_params.{key}': stage {stage} of this {n}-stage model is not "
                f"among the rule's stages {list(stages)}, so it would never apply"
            )
        stage_params[stage] = override
    return dataclasses.replace(rule, stages=stages, stage_params=stage_params)


# -- sizes relative to the map ----------------------------------------------------------------------------
def is_relative_size(value: Any) -> bool:
    """Whether a parameter value is a relative size (a mapping such as ``{fraction: 0.5}``)."""
    return isinstance(value, Mapping)


def check_relative_size(value: Any) -> str | None:
    """Why ``value`` is not a valid relative size, or None when it is."""
    if set(value) != {RELATIVE_KEY}:
        return f"a relative size is {{{RELATIVE_KEY}: f}} with 0 < f <= 1 (the share of the map's shorter side), got {dict(value)!r}"
    f = value[RELATIVE_KEY]
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1 or math.isnan(f):
        return f"{RELATIVE_KEY} must be a number with 0 < {RELATIVE_KEY} <= 1, got {f!r}"
    return None


def reference_hw(model: nn.Module, used_hw: tuple[int, int], example_given: bool) -> tuple[int, int]:
    """The input size relative sizes resolve at: the example input's, else the model's configured size."""
    if example_given:
        return used_hw
    img = next((getattr(m, "img_size", None) for m in model.modules() if getattr(m, "img_size", None)), None)
    if isinstance(img, int):
        return img, img
    if isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(i, int) for i in img):
        return int(img[0]), int(img[1])
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size")
    if isinstance(size, (tuple, list)) and len(size) == 3:
        return int(size[1]), int(size[2])
    return used_hw


def map_hw(
    shape: tuple[int, ...] | None, layout: str | None, grid: tuple[int, int] | None
) -> tuple[int, int] | None:
    """(H, W) of a site's map from its shape and layout (an ``NLC`` site: its patch grid), else None."""
    if shape is None:
        return None
    if layout == "NCHW" and len(shape) == 4:
        return int(shape[2]), int(shape[3])
    if layout == "NHWC" and len(shape) == 4:
        return int(shape[1]), int(shape[2])
    if layout == "NLC" and grid is not None:
        return int(grid[0]), int(grid[1])
    return None


def resolve_relative_sizes(
    params: dict[str, Any],
    hw: tuple[int, int] | None,
    used_hw: tuple[int, int],
    ref_hw: tuple[int, int],
    where: str,
) -> dict[str, Any]:
    """``params`` with each relative size resolved on a site's map ``hw`` (seen at input ``used_hw``, scaled to
    the reference input ``ref_hw``); a relative size at a site without a 2-D map is an error naming ``where``."""
    relative = [k for k, v in params.items() if is_relative_size(v)]
    if not relative:
        return params
    if hw is None:
        raise RelativeError(f"{where}: {', '.join(relative)} is relative to the map, and this site has no 2-D map")
    scaled = [max(1, round(side * ref / used)) if used else side for side, ref, used in zip(hw, ref_hw, used_hw)]
    out = dict(params)
    for key in relative:
        out[key] = max(1, math.floor(float(params[key][RELATIVE_KEY]) * min(scaled) + 0.5))  # half rounds up
    return out
