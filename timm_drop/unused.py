"""Nothing configured may go silently unused: a rule none of whose sites ran in training says so, once.

A host can bypass a regularizer in ways the rewriter cannot foresee: it calls a stage's blocks directly (as timm's
``checkpoint_seq`` does with a Sequential stage), calls ``forward_features`` only (head sites never run), wraps the
model in a feature extractor that stops early, or replaces a hooked module after the apply (SyncBN conversion of a
norm). Every regularizer counts its eager training forwards (:attr:`Regularizer.train_calls`, recomputations of
activation checkpoints excluded); :class:`UsageWatch`, which :func:`timm_drop.apply_regularizer` puts into the
model, looks at those counts once after the first training forward and warns, per rule, for each rule whose
regularizers all stayed at 0, naming the rule, its sites and the likely cause.

"After the first training forward" is seen from two places, so that hosts that never call the model itself still
get the check: a forward hook on the model (``model(x)``), and a forward pre-hook on an early block the shape pass
ran once (the *heartbeat*: any forward of the model runs it, ``forward_features`` too), whose second training call
means a first forward has finished. Eval forwards, ``torch.compile``d forwards and traces do not count.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from timm_drop.record import ModelRef, record_of
from timm_drop.regularizers.base import _is_compiling, recomputing
from timm_drop.structure import is_container, is_norm

__all__ = ["UsageWatch", "heartbeat_of", "unused_rule_causes"]


class UsageWatch(nn.Module):
    """Holds the regularizers of one ``apply_regularizer`` by rule (plain references, not submodules) and checks,
    from its hooks, that each rule ran in the first training forward (module docstring)."""

    _timm_drop_internal = True

    def __init__(self, model: nn.Module, rules: dict[str, list[nn.Module]]) -> None:
        super().__init__()
        # plain attributes: neither the model nor the regularizers are children of this holder
        self.__dict__["model"] = ModelRef(model)
        self.__dict__["rules"] = rules
        self.forwards = 0
        self.done = False

    def extra_repr(self) -> str:
        return f"rules={len(self.rules)}, checked={self.done}"

    @staticmethod
    def _counts(module: nn.Module) -> bool:
        # is_compiling() first: under torch.compile nothing else here is evaluated (no guard, no graph break)
        return module.training and not _is_compiling() and not recomputing()

    def after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._counts(module) and not self.done and self.forwards:
            self.check()

    def before_forward(self, module: nn.Module, args: Any) -> None:
        if not self._counts(module) or self.done:
            return
        self.forwards += 1
        if self.forwards >= 2:  # the heartbeat runs once per forward: a first forward has finished
            self.check()

    def check(self) -> None:
        self.done = True
        for label, regs in self.rules.items():
            if any(getattr(r, "train_calls", 0) for r in regs):
                continue
            sites = [str(getattr(r, "site_name", None) or type(r).__name__) for r in regs]
            shown = ", ".join(sites[:3]) + (f" and {len(sites) - 3} more" if len(sites) > 3 else "")
            warnings.warn(
                f"timm_drop: {label} ran at none of its {len(sites)} site(s) ({shown}) in the first training "
                f"forward, so it has no effect; {'; '.join(unused_rule_causes(self.model(), regs))}",
                UserWarning,
                stacklevel=4,
            )


def unused_rule_causes(model: nn.Module, regs: list[nn.Module]) -> list[str]:
    """Likely reasons why ``regs`` (one rule's regularizers in ``model``) never ran, most specific first."""
    mine = {id(r) for r in regs}
    lost, owners = [], []
    for ins in record_of(model):
        if not any(id(r) in mine for r in getattr(ins, "regs", ())):
            continue
        name = getattr(ins, "owner", None) or getattr(ins, "norm", "")
        owners.append(name or type(model).__name__)
        try:
            module = model.get_submodule(name) if name else model
        except AttributeError:
            lost.append(name)
            continue
        if not ins.intact(module):
            lost.append(name)
    if lost:
        return [
            f"{', '.join(dict.fromkeys(lost))} no longer carr{'ies' if len(lost) == 1 else 'y'} the insertion: "
            f"replaced after apply_regularizer (SyncBN conversion, your code)? Convert or replace modules first"
        ]
    causes = []
    if any(getattr(m, "grad_checkpointing", False) is True for m in model.modules()):
        causes.append(
            "gradient checkpointing is on, and a checkpoint helper that calls forward methods directly (not the "
            "modules) bypasses forward hooks"
        )
    where = ", ".join(list(dict.fromkeys(owners))[:3])
    causes.append(
        f"the host did not call {where} as a module in that forward: it may run only part of the model "
        f"(forward_features without the head, a feature extractor that stops earlier) or call forward methods "
        f"directly"
    )
    return causes


def heartbeat_of(model: nn.Module, sites: list[Any], calls: dict[str, int]) -> str | None:
    """The first module with submodules of its own to finish in the shape pass (a block or an embedding, not a
    container, a norm or ours) that ran once. Not a layer without children: an FX graph of the model calls those
    same layer objects, and TorchScript, scripting that graph, would try to compile the check's hook."""
    for site in sites:
        if site.kind != "module" or calls.get(site.module) != 1:
            continue
        module = model.get_submodule(site.module)
        if next(module.children(), None) is not None and not is_container(module) and not is_norm(module):
            return site.module
    return None
