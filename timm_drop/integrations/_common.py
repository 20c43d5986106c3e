"""What the trainer adapters share: a :class:`~timm_drop.drive.Driver` started from the trainer's own step count."""

from __future__ import annotations

from typing import Any

from torch import nn

from timm_drop.drive import Driver
from timm_drop.layerout import LayerOut


def start_driver(
    model: nn.Module,
    optimizer: Any,
    total_steps: int,
    global_step: int,
    *,
    layerout: LayerOut | None,
    steps_per_epoch: int | None,
) -> Driver:
    """A driver over ``total_steps`` already at ``global_step`` (a resumed trainer restores its own step).

    LayerOut epochs come from the step count (``steps_per_epoch``: the trainer's epoch length in optimizer steps,
    or the user's choice). ``layerout`` is bound to ``model`` here when it is not bound yet, so it can be
    passed unbound (and picklable, for spawned processes).
    """
    if layerout is not None:
        if not layerout._bound:
            layerout.bind(model)
    driver = Driver(
        model,
        optimizer,
        max(1, int(total_steps)),
        layerout=layerout,
        steps_per_epoch=max(1, int(steps_per_epoch or total_steps)) if layerout is not None else None,
    )
    if global_step:
        driver.load_state_dict({"step": int(global_step)})
    return driver


def optimizer_steps(batches: int | float, accumulation: int) -> int | None:
    """Optimizer steps in an epoch of ``batches`` micro-batches (None when the loader has no length)."""
    if not isinstance(batches, int) and not (isinstance(batches, float) and batches.is_integer()):
        return None
    return max(1, -(-int(batches) // max(1, int(accumulation))))
