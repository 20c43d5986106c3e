"""Is my regularizer even on? ``summary(model)`` answers per rule, during training.

``summary(model)`` lists, for every rule of the spec(s) applied to ``model``: its sites and how many of them ran in
a training forward (eager forwards; 0 of n after training means the host bypassed them, see
:mod:`timm_drop.unused`), the configured strength times the schedule's current multiplier, where the schedule stands (``set_progress`` position, a self-counting
schedule's ``count/steps``, or "not driven: full strength"), and, when tracking is on, the realised drop fraction
of the last training forward.

``track_drops(model)`` (opt-in) adds a forward hook to each regularizer that writes, on the device and in place,
the share of its non-zero inputs that the training forward zeroed into a non-persistent 0-dim buffer
``drop_fraction``: no host sync per step, no recompile per step (one when tracking is switched). Only
:func:`summary` (or a logger calling it, e.g. once per epoch) reads it back. Regularizers that rescale instead of
zeroing (``spatial_scale``, ``selectscale``) realise a drop fraction of 0 by this measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from timm_drop.plans import applied_plans, placements
from timm_drop.regularizers.base import Regularizer

__all__ = ["RuleSummary", "Summary", "summary", "track_drops"]

_TRACK_KEY = "_timm_drop_track_hook"


def _record_drop(reg: nn.Module, args: Any, out: Any) -> None:
    if not reg.training or not isinstance(out, torch.Tensor):
        return
    x = args[0]
    kept_in = x != 0
    zeroed = (out == 0) & kept_in
    reg.drop_fraction.copy_(zeroed.sum() / kept_in.sum().clamp(min=1))


def track_drops(model: nn.Module, enabled: bool = True) -> int:
    """Switch realised-drop tracking on (or off) for every regularizer in ``model``; returns how many."""
    count = 0
    for reg in model.modules():
        if not isinstance(reg, Regularizer):
            continue
        count += 1
        handle_id = reg.__dict__.get(_TRACK_KEY)
        if enabled and handle_id is None:
            if "drop_fraction" not in reg._buffers:
                reg.register_buffer(
                    "drop_fraction", torch.full((), float("nan"), device=reg.strength.device), persistent=False
                )
            reg.__dict__[_TRACK_KEY] = reg.register_forward_hook(_record_drop).id
        elif not enabled and handle_id is not None:
            reg._forward_hooks.pop(handle_id, None)
            del reg.__dict__[_TRACK_KEY]
    return count


@dataclass
class RuleSummary:
    """One rule as it stands now."""

    rule: str
    regularizer: str
    sites: list[str]
    strength: dict[str, tuple[float, float]]  # param -> (min, max) over the rule's sites, schedule applied
    multiplier: float | None  # the schedule's current multiplier (None when sites disagree)
    schedule: str | None
    position: str
    drop_fraction: float | None = None  # mean over sites of the last training forward's realised fraction
    regs: list[nn.Module] = field(default_factory=list, repr=False, compare=False)
    sites_run: int = 0  # sites whose regularizer ran in at least one (eager) training forward

    @property
    def ran(self) -> str:
        """``"<sites that ran>/<sites>"``: 0 of n after training means a host bypassed the rule."""
        return f"{self.sites_run}/{len(self.sites)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "regularizer": self.regularizer,
            "sites": list(self.sites),
            "strength": {k: list(v) for k, v in self.strength.items()},
            "multiplier": self.multiplier,
            "schedule": self.schedule,
            "position": self.position,
            "drop_fraction": self.drop_fraction,
            "sites_run": self.sites_run,
        }


class Summary(str):
    """The per-rule table as text, so it prints, splits into lines and writes like any ``str``, with the rules as
    data in :attr:`rules` (:meth:`to_dict`); a snapshot of the moment :func:`summary` was called."""

    rules: list[RuleSummary]

    def __new__(cls, rules: list[RuleSummary]) -> Summary:
        text = super().__new__(cls, _table(rules))
        text.rules = list(rules)
        return text

    def __getnewargs__(self) -> tuple[list[RuleSummary]]:  # pickle/copy rebuild it from its rules
        return (self.rules,)

    def __repr__(self) -> str:  # the table, also as a REPL's echo
        return str.__str__(self)

    def to_dict(self) -> dict[str, Any]:
        return {"rules": [r.to_dict() for r in self.rules]}


def _table(rules: list[RuleSummary]) -> str:
    head = ("rule", "sites", "ran", "strength", "schedule", "position", "realised drop")
    rows = []
    for r in rules:
        strength = ", ".join(
            f"{k}={lo:.4g}" if lo == hi else f"{k}={lo:.4g}..{hi:.4g}" for k, (lo, hi) in r.strength.items()
        ) or (f"x{r.multiplier:.4g}" if r.multiplier is not None else "?")
        realised = "-" if r.drop_fraction is None else f"{r.drop_fraction:.4f}"
        rows.append((r.rule, str(len(r.sites)), r.ran, strength, r.schedule or "constant", r.position, realised))
    if not rows:
        return "no timm_drop regularizers in this model"
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(out)


def _position(regs: list[Regularizer]) -> str:
    schedule = regs[0].schedule
    if schedule is None:
        return "constant: full strength"
    if schedule.steps is not None:
        counts = sorted({int(r.schedule_count) for r in regs})
        shown = str(counts[0]) if len(counts) == 1 else f"{counts[0]}..{counts[-1]}"
        return f"forward {shown}/{schedule.steps}"
    if not any(r.progress_set for r in regs):
        return "not driven: full strength"
    progress = sorted({r.__dict__.get("schedule_progress", float("nan")) for r in regs})
    return "progress " + ("/".join(f"{p:.4g}" for p in progress))


def _rule_groups(model: nn.Module) -> dict[tuple[int, str], list[tuple[str, Regularizer, Any]]]:
    """The regularizers in ``model`` by (apply, rule label), oldest apply first, each with its site name and plan
    entry (None for one no applied plan placed); two stacked applies of the same rule stay two groups."""
    apply_of = {id(e): i for i, p in enumerate(applied_plans(model)) for e in p.entries}
    placed = {id(reg): (apply_of.get(id(e), 1 << 30), e) for e, reg in placements(model)}
    groups: dict[tuple[int, str], list[tuple[str, Regularizer, Any]]] = {}
    for name, reg in model.named_modules():
        if isinstance(reg, Regularizer):
            label = reg.rule_label or f"{reg.registry_name or type(reg).__name__} (no rule)"
            apply, entry = placed.get(id(reg), (1 << 30, None))
            groups.setdefault((apply, label), []).append((reg.__dict__.get("site_name") or name, reg, entry))
    rank = {key: min((m[2].rule if m[2] is not None else 1 << 30) for m in ms) for key, ms in groups.items()}
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], rank[kv[0]])))


def summary(model: nn.Module) -> Summary:
    """Per-rule state of the regularizers in ``model`` (one host read per regularizer: call it per epoch, not
    per step); the rules of every applied plan (``stack=True``), oldest apply first."""
    groups = _rule_groups(model)
    several = len({apply for apply, _ in groups}) > 1
    rules = []
    for (apply, label), members in groups.items():
        regs = [r for _, r, _ in members]
        entry = members[0][2]
        multipliers = sorted({float(r.strength) for r in regs})
        strength: dict[str, tuple[float, float]] = {}
        for key in dict.fromkeys(k for r in regs for k in type(r).strength_params):  # what each class declares
            values = [
                float(getattr(r, key)) * float(r.strength)
                for r in regs
                if isinstance(getattr(r, key, None), (int, float))
            ]
            if values:
                strength[key] = (min(values), max(values))
        fractions = [float(r.drop_fraction) for r in regs if "drop_fraction" in r._buffers]
        fractions = [f for f in fractions if f == f]  # NaN: tracked but no training forward yet
        rules.append(
            RuleSummary(
                rule=f"{label} (apply {apply + 1})" if several and entry is not None else label,
                regularizer=(entry.regularizer if entry else None) or regs[0].registry_name or type(regs[0]).__name__,
                sites=[s for s, _, _ in members],
                strength=strength,
                multiplier=multipliers[0] if len(multipliers) == 1 else None,
                schedule=None if regs[0].schedule is None else str(regs[0].schedule),
                position=_position(regs),
                drop_fraction=sum(fractions) / len(fractions) if fractions else None,
                regs=regs,
                sites_run=sum(1 for r in regs if getattr(r, "train_calls", 0)),
            )
        )
    return Summary(rules)
