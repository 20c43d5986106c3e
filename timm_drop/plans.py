"""The plan: what :func:`timm_drop.apply_regularizer` puts where, made by :func:`timm_drop.plan`, applied as is.

A :class:`Plan` is pure data (sites, regularizers, parameters, insertion kinds) plus, for the model it was made
on, what planning built (:class:`Built`). :func:`check_fits` refuses a plan for a model with another module tree,
naming the first difference. :func:`applied_plans` is the public, stack-aware list of the plans a model carries,
oldest first; :func:`placements` pairs each plan entry with the regularizer module placed for it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from timm_drop.errors import RewriteError
from timm_drop.names import LEGACY_PLAN, PLANS
from timm_drop.record import record_of
from timm_drop.sites import Site

__all__ = ["Built", "Plan", "PlanEntry", "applied_plans", "check_fits", "model_tree", "placements"]


@dataclass(frozen=True)
class PlanEntry:
    """One regularizer at one site (pure data: the regularizer module is built at apply time)."""

    site: str
    kind: str
    stage: int | None
    module: str
    shape: tuple[int, ...] | None
    layout: str | None
    rule: int
    rule_label: str
    regularizer: str
    params: dict[str, Any]
    schedule: str | None
    insertion: str  # "slot", "rewrite", "hook" (forward hook on owner) or "pre_hook" (on the next layer)
    depth: int
    node: str | None = None
    norm_position: str | None = None
    owner: str | None = None  # module whose forward is rewritten / whose slot or hook is used
    token_grid: tuple[int, int] | None = None  # (H, W) patch grid of an NLC site, for methods that need a map
    num_prefix_tokens: int = 0
    branch: int | None = None  # element of a stage's list/tuple output (Site.branch)

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "kind": self.kind,
            "stage": self.stage,
            "module": self.module,
            "shape": list(self.shape) if self.shape is not None else None,
            "layout": self.layout,
            "rule": self.rule,
            "rule_label": self.rule_label,
            "regularizer": self.regularizer,
            "params": dict(self.params),
            "schedule": self.schedule,
            "insertion": self.insertion,
            "owner": self.owner,
            "depth": self.depth,
            "token_grid": list(self.token_grid) if self.token_grid is not None else None,
            "num_prefix_tokens": self.num_prefix_tokens,
            "branch": self.branch,
        }


@dataclass(frozen=True)
class Plan:
    """What :func:`~timm_drop.apply_regularizer` will do, and what it applies: ``entries`` in depth order;
    ``str(plan)`` is a table. It prints, compares and pickles as pure data; the plan :func:`~timm_drop.plan`
    returns also holds what planning built for its model (``built``: the regularizers, the rewrite graphs), so
    ``apply_regularizer(model, plan)`` analyses and builds nothing again. Planning never changes the model."""

    entries: list[PlanEntry]
    sites: list[Site]
    opaque: dict[str, str]
    matches: dict[int, int]  # rule index -> number of entries it produced
    input_shape: tuple[int, ...]
    source: str = ""
    stages_from: str = ""  # the timm model inside a wrapper whose feature_info numbers the stages ("" = the model)
    model_name: str = ""  # the model it was made for (timm architecture, else class name)
    # (qualified name, class name) of every module of the model it was made for: apply refuses another tree
    modules: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)
    spec: Any = field(default=None, compare=False, repr=False)  # the Spec it was made from (re-planning)
    # what planning built for its own model (regularizers, rewrite graphs): apply places these, once
    built: Built | None = field(default=None, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles are pure data: the modules and graphs planning built stay with the original
        state = {k: v for k, v in self.__dict__.items() if k != "built"}
        if hasattr(self.spec, "to_dict"):
            state["spec"] = self.spec.to_dict()  # a Spec holds read-only mappings; its dict loads back the same
        return state

    def rewrite_target(self, owner: str) -> Any:
        """The verified graphs planning found for rewriting module ``owner``."""
        return self.built.targets[owner]

    def __len__(self) -> int:
        return len(self.entries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "input_shape": list(self.input_shape),
            "entries": [e.to_dict() for e in self.entries],
            "matches": {str(k + 1): v for k, v in self.matches.items()},
            "opaque": dict(self.opaque),
            "stages_from": self.stages_from,
        }

    def __str__(self) -> str:
        head = ("site", "kind", "stage", "shape", "layout", "regularizer", "params", "rule", "insertion")
        rows = []
        for e in self.entries:
            params = ", ".join(f"{k}={_fmt(v)}" for k, v in e.params.items())
            if e.schedule:
                params += f", schedule={e.schedule}"
            rows.append(
                (
                    e.site.split(":", 1)[1],
                    e.kind + (f"({e.norm_position})" if e.kind == "norm" else ""),
                    "-" if e.stage is None else str(e.stage),
                    "x".join(str(s) for s in e.shape[1:]) if e.shape else "?",
                    e.layout or "?",
                    e.regularizer,
                    params,
                    str(e.rule + 1),
                    e.insertion,
                )
            )
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
        line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
        out = [line, "  ".join("-" * w for w in widths)]
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        shape = "x".join(str(s) for s in self.input_shape[1:]) if self.input_shape else "?"
        out.append(
            f"{len(self.entries)} regularizer(s) at {len({e.site for e in self.entries})} site(s); "
            f"shape pass input {shape}"
        )
        if self.stages_from:
            out.append(f"stages: feature_info of {self.stages_from}")
        if self.opaque:
            names = list(self.opaque)
            out.append(
                f"{len(names)} opaque module(s) (no skip sites inside): "
                + "; ".join(f"{n}: {self.opaque[n]}" for n in names[:3])
                + (" ..." if len(names) > 3 else "")
            )
        return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@dataclass
class Built:
    """What planning built for its own model: one regularizer per entry, the verified rewrite graphs by owner
    module, and the shape pass's call counts. Applied once, to that model only."""

    model: weakref.ref
    regs: list[nn.Module]
    targets: dict[str, Any]
    calls: dict[str, int]
    taken: bool = False

    def take(self, model: nn.Module) -> Built | None:
        """Itself, the first time it is applied to its own model; None otherwise (the plan is made again)."""
        if self.taken or self.model() is not model:
            return None
        self.taken = True
        return self


def model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def model_tree(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """(qualified name, class name) of every module: what a plan must find again to fit a model."""
    return tuple((name, type(m).__name__) for name, m in model.named_modules())


def check_fits(the_plan: Plan, model: nn.Module) -> None:
    """Refuse ``model`` when it is not the module tree ``the_plan`` was made on, naming the first difference."""
    if not the_plan.modules:
        return  # a plan pickled before plans recorded their model: its entries are checked when planned again
    tree = model_tree(model)
    if tree == the_plan.modules:
        return
    planned, here = dict(the_plan.modules), dict(tree)
    missing = [n for n in planned if n not in here]
    extra = [n for n in here if n not in planned]
    changed = [n for n in planned if n in here and planned[n] != here[n]]
    if changed:
        diff = f"module {changed[0]!r} is {planned[changed[0]]} in the plan and {here[changed[0]]} here"
    elif missing:
        diff = f"module {missing[0]!r} of the planned model is not in this one" + (
            f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        )
    elif extra:
        diff = f"module {extra[0]!r} is not in the planned model" + (
            f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
        )
    else:
        diff = "its modules are in another order"
    raise RewriteError(
        f"this plan was made for {the_plan.model_name} ({len(planned)} modules) and does not fit this "
        f"{model_name(model)} ({len(here)} modules): {diff}; make the plan on this model "
        f"(timm_drop.plan(model, spec)) or apply the spec"
    )


def applied_plans(model: nn.Module) -> list[Plan]:
    """The plans applied to ``model``, oldest first (every ``stack=True`` apply kept; empty after
    :func:`~timm_drop.strip_regularizers`). A new list: changing it does not change the model."""
    plans = model.__dict__.get(PLANS)
    if plans is None:
        legacy = model.__dict__.get(LEGACY_PLAN)  # a model pickled when it kept only its last plan
        return [legacy] if legacy is not None else []
    return list(plans)


def placements(model: nn.Module) -> list[tuple[PlanEntry, nn.Module]]:
    """``(plan entry, regularizer module)`` for every regularizer the applied plans put in, oldest apply first and
    in each plan's depth order (read from the insertions themselves: nothing is matched by name)."""
    order = {id(e): (i, j) for i, p in enumerate(applied_plans(model)) for j, e in enumerate(p.entries)}
    pairs = [pair for ins in record_of(model) for pair in ins.placed()]
    return sorted(pairs, key=lambda p: order.get(id(p[0]), (1 << 30, 0)))
