"""Which regularizer sits where in the working copy, and the swaps viz makes there: a regularizer rebuilt at
another strength, or another method alone at the same site (``compare``).

Every insertion calls its regularizers by attribute at run time, so putting a new module where the old one is
registered (:func:`_replace_module`) takes effect without re-applying the spec.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from timm_drop.regularizers.base import Regularizer
from timm_drop.viz.traits import _adjust_params, _method_class


@dataclass
class _Slot:
    """One regularizer at one site of the working copy."""

    site: str
    layout: str
    shape: tuple[int, ...] | None
    stage: int | None
    name: str  # registry name
    params: dict[str, Any]
    reg: nn.Module | None
    note: str = ""  # why nothing could be placed (compare mode)


def _site_regularizers(model: nn.Module) -> list[tuple[Any, nn.Module]]:
    """(plan entry, regularizer module) for every regularizer the applied plans put in (every stacked apply,
    oldest first), in depth order: each insertion knows the entries it placed (timm_drop.plans.placements)."""
    from timm_drop.plans import applied_plans, placements

    if not applied_plans(model):
        raise ValueError(
            "the model carries no regularizers: pass a spec (path, YAML text or dict), or apply_regularizer first"
        )
    return placements(model)


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered (hook holder list, norm ``drop`` slot, rewritten block child):
    every insertion calls its regularizers by attribute at run time, so the swap takes effect."""
    found = False
    for parent in model.modules():
        for key, child in list(parent._modules.items()):
            if child is old:
                parent._modules[key] = new
                found = True
    if not found:
        raise ValueError(f"regularizer {old!r} is not in the model")


def _build_method(
    name: str,
    params: dict[str, Any],
    layout: str,
    strength: float | None,
    *,
    like: nn.Module | None = None,
    fill: bool = False,
) -> tuple[nn.Module | None, dict[str, Any], str]:
    """``create_regularizer(name, ...)`` with the ``params`` it accepts and ``strength`` applied to the method's
    ``strength_params``; ``fill`` adds its ``compare_defaults``; ``like`` (the site's own regularizer) lends its token grid, if it has one."""
    from timm_drop.regularizers.registry import create_regularizer, regularizer_params

    accepted = regularizer_params(name)
    method = _method_class(name)
    chosen = {k: v for k, v in params.items() if k in accepted}
    if fill:  # shared values even where a method has its own default: one block size and rate side by side
        chosen.update({k: v for k, v in method.compare_defaults.items() if k in accepted and k not in chosen})
    if strength is not None:
        chosen.update({k: strength for k in method.strength_params if k in accepted})
    _adjust_params(name, chosen)
    try:
        reg = create_regularizer(name, **chosen)
        if isinstance(reg, Regularizer):
            grid = getattr(like, "token_grid", None)
            if grid is not None and hasattr(reg, "set_token_grid"):
                reg.set_token_grid(grid, getattr(like, "num_prefix_tokens", 0))
            reg.set_layout(layout)
    except (TypeError, ValueError) as exc:
        return None, chosen, f"{name} not applicable here: {exc}"
    return reg, chosen, ""


def _select(entries: list[Any], sites: str | Sequence[str] | None, max_sites: int) -> list[str]:
    names: list[str] = []
    for e in entries:
        if e.site not in names:
            names.append(e.site)
    if sites is not None:
        globs = [sites] if isinstance(sites, str) else list(sites)
        chosen = [
            n
            for n in names
            if any(fnmatch.fnmatchcase(n, g) or fnmatch.fnmatchcase(n.split(":", 1)[1], g) for g in globs)
        ]
        if not chosen:
            raise ValueError(f"--sites {globs}: no site of the plan matches; sites: {', '.join(names[:12])}")
        return chosen
    if len(names) <= max_sites:
        return names
    # Evenly spread over depth, first and last included: shallow and deep maps look different.
    idx = sorted({round(i * (len(names) - 1) / (max_sites - 1)) for i in range(max_sites)})
    return [names[i] for i in idx]



def _compare_methods(compare: str | Sequence[str]) -> list[str]:
    """Registry names from ``"a,b"`` or a list; an unknown one is a KeyError naming the nearest ones."""
    from timm_drop.regularizers.registry import get_regularizer_class

    methods = [m.strip() for m in compare.split(",")] if isinstance(compare, str) else list(compare)
    if not methods or any(not m for m in methods):
        raise ValueError(f"compare {compare!r}: give registry names separated by commas")
    for m in methods:
        get_regularizer_class(m)
    return methods


def _spec_rules(spec: Any) -> tuple[Any, ...]:
    if spec is None:
        return ()
    from timm_drop.spec import load_spec

    return load_spec(spec).rules


def _train_mode(model: nn.Module) -> None:
    """Train mode for the copy, except SyncBatchNorm: in train mode it all-reduces across ranks, and only the main
    process draws, so it would wait for ranks that never come; it uses its running statistics instead."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.SyncBatchNorm):
            m.eval()

