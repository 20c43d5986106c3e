"""Drive every schedule (and LayerOut's epochs) from any training loop with one call.

``drive(model, optimizer, total_steps)`` registers an optimizer *step post-hook*: after each real optimizer step
it calls :func:`timm_drop.set_progress` with ``step / total_steps``. Counting optimizer steps, not forwards, means
gradient-accumulation micro-batches and eval forwards cannot advance a schedule, and a step skipped by a
GradScaler (inf/NaN gradients) is not counted either, because the inner ``step`` never runs.

The hook sits on the underlying ``torch.optim.Optimizer``: Accelerate's ``AcceleratedOptimizer`` (and other
wrappers exposing ``.optimizer``) call it from their own ``step``, so the driver works whether it is created before
or after ``accelerator.prepare``. ``Driver.state_dict`` holds the step count; ``accelerator.register_for_checkpointing
(driver)`` or saving it next to the model makes a resumed run continue the same curve.

LayerOut is an epoch-level controller; a loop without an epoch hook (an HF ``Trainer`` driven by ``max_steps``, a
plain ``for step in range(n)`` loop) passes ``layerout`` and ``steps_per_epoch``: epoch ``e`` covers steps
``[e * steps_per_epoch, (e + 1) * steps_per_epoch)``, so its frozen set, a pure function of ``(seed, epoch)``, is
the same after a resume.

A model with a copy that keeps its own regularizers (an EMA: timm's ``ModelEmaV3`` deep-copies the model) passes the
copy's module in ``also``, e.g. ``drive(model, optimizer, total_steps, also=[ema.module])``, so evaluating the EMA
uses the same strengths as the model it averages.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from timm_drop.layerout import LayerOut, _unwrap_optimizer
from timm_drop.schedules import set_progress

__all__ = ["Driver", "drive"]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"drive: {name} must be an integer >= 1, got {value!r}")
    return value


class Driver:
    """Advances schedules once per optimizer step; see :func:`drive`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        total_steps: int,
        *,
        layerout: LayerOut | None = None,
        steps_per_epoch: int | None = None,
        also: Iterable[nn.Module] = (),
    ) -> None:
        self.model = model
        self.also = list(also)
        for i, m in enumerate(self.also):
            if not isinstance(m, nn.Module):
                raise TypeError(
                    f"drive: also[{i}] must be an nn.Module (such as an EMA copy), got {type(m).__name__}"
                )
        self.total_steps = _positive_int("total_steps", total_steps)
        self.steps_per_epoch = None if steps_per_epoch is None else _positive_int("steps_per_epoch", steps_per_epoch)
        if layerout is not None and self.steps_per_epoch is None:
            raise ValueError(
                "drive: layerout needs steps_per_epoch (how many optimizer steps make one LayerOut epoch); or leave "
                "layerout out and call layerout.start_epoch(epoch) / end_epoch() from your epoch hook"
            )
        self.layerout = layerout
        self.step = 0
        self._optimizer = _unwrap_optimizer(optimizer)
        self._handles = [self._optimizer.register_step_post_hook(self._after_step)]
        self._attached_layerout = False
        if layerout is not None and not layerout._hooks:
            layerout.attach(self._optimizer)
            self._attached_layerout = True
        self._sync()

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps)

    @property
    def epoch(self) -> int | None:
        return None if self.steps_per_epoch is None else self.step // self.steps_per_epoch

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.step += 1
        self._sync()

    def _sync(self) -> None:
        for m in (self.model, *self.also):
            set_progress(m, self.progress)
        lo = self.layerout
        if lo is not None and lo.epoch != self.epoch:
            lo.start_epoch(self.epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved :meth:`state_dict` (the schedules and LayerOut's epoch move there at once)."""
        if "step" not in state:
            raise KeyError("Driver.load_state_dict: state has no 'step'")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"Driver.load_state_dict: step must be an integer >= 0, got {step!r}")
        for key in ("total_steps", "steps_per_epoch"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ValueError(
                    f"Driver.load_state_dict: the checkpoint's {key}={state[key]} differs from this driver's "
                    f"{getattr(self, key)}; the schedule would not continue the same curve"
                )
        self.step = step
        self._sync()

    def remove(self) -> None:
        """Remove the step hook (and the LayerOut hook this driver attached); schedules stay where they are."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._attached_layerout and self.layerout is not None:
            self.layerout.detach()
            self._attached_layerout = False

    def __repr__(self) -> str:
        lo = f", layerout epoch={self.epoch}" if self.layerout is not None else ""
        also = f", also={len(self.also)}" if self.also else ""
        return f"Driver(step={self.step}/{self.total_steps}, progress={self.progress:.4g}{lo}{also})"


def drive(
    model: nn.Module,
    optimizer: Any,
    total_steps: int,
    *,
    layerout: LayerOut | None = None,
    steps_per_epoch: int | None = None,
    also: Iterable[nn.Module] = (),
) -> Driver:
    """Advance every schedule in ``model`` once per step of ``optimizer`` over ``total_steps`` steps.

    Moves the schedules to progress 0 at once. ``optimizer`` may be a ``torch.optim.Optimizer`` or a wrapper of
    one (Accelerate's). With ``layerout`` (a bound :class:`~timm_drop.LayerOut`) and ``steps_per_epoch`` it also
    runs LayerOut's epochs from the step count, and attaches LayerOut to the optimizer if it is not yet attached.
    Modules in ``also`` (an EMA copy's ``.module``) follow the same progress.
    """
    return Driver(model, optimizer, total_steps, layerout=layerout, steps_per_epoch=steps_per_epoch, also=also)
