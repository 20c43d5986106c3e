"""Drop-strength schedules: stateless functions of training progress in [0, 1].

A schedule returns a multiplier in [0, 1] on a regularizer's configured strength (``drop_prob`` or ``q``).
Being a pure function of progress, it needs no state of its own: a resumed run that calls
:func:`set_progress` with the restored step continues the same curve, and gradient-accumulation
micro-batches or eval forwards cannot advance it.

* ``constant``: 1 everywhere (the default when a rule has no schedule).
* ``linear``: Scheduled DropBlock (Ghiasi et al. 2018, section 3, "Scheduled DropBlock"; the TF reference
  ``keep = 1 - (step / train_steps) * (1 - keep_prob)``) and the papers' "linear scheduler": the drop
  probability ramps from ``initial`` times the target at progress ``start`` to the full target at ``end``,
  then stays there.
* ``curriculum``: Curriculum Dropout (Morerio et al., ICCV 2017): keep probability
  ``theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar``, so the drop probability is
  ``p_bar * (1 - exp(-gamma * t))``. Here ``t`` is training progress, so ``gamma`` is expressed per whole run
  (the paper's per-iteration 1e-3 over 10k iterations is ``gamma = 10``).

Who moves progress: a loop calls :func:`set_progress` (or lets :func:`timm_drop.drive` do it from an optimizer
step hook). Until the first call a regularizer runs at its full configured strength, and a scheduled one warns
once on its first eager training forward (inside a ``torch.compile`` graph the check is skipped, so that it adds
neither a graph break nor a guard: a model that only ever runs compiled does not warn). A schedule with ``steps: N`` needs no caller at all: each regularizer counts
its own training forwards in a non-persistent int64 buffer (in place on the device, so ``torch.compile`` does not
recompile, there is no host sync, and DDP ranks, which run the same number of forwards, stay in step) and is at
progress ``min(count / N, 1)``. That is for scripts nobody can edit (timm's ``train.py``); with gradient
accumulation a forward is a micro-batch, so state ``N`` in micro-batches there. The backward pass's recomputation
of an activation checkpoint (``set_grad_checkpointing``) is no forward of its own and does not count (in eager
mode). The count is not saved in a checkpoint (use :func:`timm_drop.drive` where that matters).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

SCHEDULE_KINDS = ("constant", "linear", "curriculum")


def constant(progress: float) -> float:
    return 1.0


def linear(progress: float, start: float = 0.0, end: float = 1.0, initial: float = 0.0) -> float:
    """Ramp from ``initial`` at ``progress <= start`` to 1 at ``progress >= end``."""
    if progress <= start:
        return initial
    if progress >= end:
        return 1.0
    return initial + (1.0 - initial) * (progress - start) / (end - start)


def curriculum(progress: float, gamma: float = 10.0) -> float:
    """``1 - exp(-gamma * progress)``: Curriculum Dropout's drop-probability ramp, normalised to the target."""
    return 1.0 - math.exp(-gamma * progress)


@dataclass(frozen=True)
class Schedule:
    """A named schedule with its settings; calling it maps progress in [0, 1] to a multiplier in [0, 1]."""

    kind: str = "constant"
    start: float = 0.0
    end: float = 1.0
    initial: float = 0.0
    gamma: float = 10.0
    #: self-driven: progress is ``training forwards / steps`` (see the module docstring); None = driven by calls
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind must be one of {list(SCHEDULE_KINDS)}, got {self.kind!r}")
        for field in ("start", "end", "initial"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"schedule field {field!r} must be a number in [0, 1], got {value!r}")
        if self.kind == "linear" and not self.start < self.end:
            raise ValueError(f"linear schedule needs start < end, got start={self.start}, end={self.end}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not self.gamma > 0:
            raise ValueError(f"schedule field 'gamma' must be a positive number, got {self.gamma!r}")
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise ValueError(f"schedule field 'steps' must be an integer >= 1 or absent, got {self.steps!r}")

    def __call__(self, progress: float) -> float:
        if self.kind == "linear":
            return linear(progress, self.start, self.end, self.initial)
        if self.kind == "curriculum":
            return curriculum(progress, self.gamma)
        return constant(progress)

    def at(self, progress: torch.Tensor) -> torch.Tensor:
        """The same curve on a tensor ``progress`` (no host sync; for self-counting schedules)."""
        if self.kind == "linear":
            ramp = ((progress - self.start) / (self.end - self.start)).clamp(0.0, 1.0)
            return self.initial + (1.0 - self.initial) * ramp
        if self.kind == "curriculum":
            return 1.0 - torch.exp(-self.gamma * progress)
        return torch.ones_like(progress)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        keep = {
            "constant": ("kind",),
            "linear": ("kind", "start", "end", "initial"),
            "curriculum": ("kind", "gamma"),
        }
        out = {k: d[k] for k in keep[self.kind]}
        if self.steps is not None:
            out["steps"] = self.steps
        return out

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.to_dict().items())


def make_schedule(spec: Schedule | str | dict[str, Any] | None) -> Schedule | None:
    """Build a :class:`Schedule` from a kind name, a dict (``{kind: linear, start: 0, end: 1}``) or None."""
    if spec is None or isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str):
        return Schedule(kind=spec)
    if isinstance(spec, dict):
        allowed = {"kind", "start", "end", "initial", "gamma", "steps"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ValueError(f"unknown schedule field(s) {unknown}; allowed: {sorted(allowed)}")
        if "kind" not in spec:
            raise ValueError(f"schedule needs a 'kind' (one of {list(SCHEDULE_KINDS)})")
        return Schedule(**spec)
    raise TypeError(f"schedule must be a kind name, a mapping or None, got {type(spec).__name__}")


class ScheduledModule(nn.Module):
    """A module whose strength follows a :class:`Schedule`: :func:`set_progress` moves every one in a model.

    :class:`~timm_drop.regularizers.Regularizer` is one. The protocol lives here, beside the schedules, so that
    this module needs nothing from the regularizers (they import it, never the other way round). An instance has
    ``schedule`` (a :class:`Schedule` or None) and a ``schedule_count`` buffer (no annotations here: TorchScript
    reads a scripted subclass's annotations as attribute types).
    """

    def set_progress(self, progress: float) -> None:
        """Move the schedule to ``progress`` in [0, 1]."""
        raise NotImplementedError


def set_progress(model: nn.Module, progress: float) -> int:
    """Move every regularizer in ``model`` to training ``progress`` in [0, 1]; returns how many were set.

    Call once per optimizer step (not per micro-batch, never from eval). Writes 0-dim buffers in place, so a
    compiled model does not recompile.
    """
    if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be a number in [0, 1], got {progress!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, ScheduledModule):
            module.set_progress(float(progress))
            module.schedule_progress = float(progress)  # read by timm_drop.summary only
            schedule = module.schedule
            if schedule is not None and schedule.steps is not None:
                # a caller overrides a self-counting schedule's position; it keeps counting from there
                module.schedule_count.fill_(round(progress * schedule.steps))
            count += 1
    return count


def on_train_forward(reg: nn.Module, args: Any = None) -> None:
    """Run by every :class:`~timm_drop.regularizers.Regularizer` at the start of a training forward (not of the
    recomputation of an activation checkpoint): advances a self-counting schedule, and warns once when a
    call-driven schedule was never given a progress (so it runs at full strength instead of following its
    curve)."""
    schedule = reg.schedule
    if schedule is None or not reg.training:
        return
    if schedule.steps is not None:
        count = reg.schedule_count
        reg.strength.copy_(schedule.at((count.float() / schedule.steps).clamp(max=1.0)))
        count.add_(1)
        return
    # is_compiling() first: under torch.compile the Python-side flags below are never read (no guard, no break)
    if torch.compiler.is_compiling() or reg.progress_set or reg.__dict__.get("_warned_unset"):
        return
    reg._warned_unset = True
    label = getattr(reg, "rule_label", None) or f"{type(reg).__name__} ({reg.registry_name or 'regularizer'})"
    warnings.warn(
        f"{label}: schedule {schedule} is never driven, so it runs at full strength; call "
        "timm_drop.set_progress(model, step / total_steps) once per optimizer step, or "
        "timm_drop.drive(model, optimizer, total_steps) once before training, or give the schedule "
        "'steps: N' to count its own training forwards",
        UserWarning,
        stacklevel=2,
    )
