"""What a rewritten model carries, and how it is undone.

A model :func:`timm_drop.apply_regularizer` changed holds, in its ``__dict__`` (:mod:`timm_drop.names`), the list of
:class:`Insertion` objects it received (its *record*, oldest first) and the plans that were applied
(:func:`timm_drop.plans.applied_plans`). :func:`strip_regularizers` undoes the record in reverse.

Each kind of insertion is one subclass of :class:`Insertion`, registered by its ``kind`` in
:data:`INSERTION_KINDS` when the class is created; a plan entry names its kind (``PlanEntry.insertion``) and
:func:`insertion_kind` gives the class, which groups entries into insertions (:meth:`Insertion.group`) and makes
one from its entries (:meth:`Insertion.from_entries`). A new kind is one class: nothing else changes.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import nn

from timm_drop.errors import RewriteError
from timm_drop.names import LEGACY_PLAN, PLANS, RECORD

__all__ = ["INSERTION_KINDS", "Insertion", "ModelRef", "insertion_kind", "record_of", "strip_regularizers"]

#: every insertion class by its ``kind`` (filled as the classes are created)
INSERTION_KINDS: dict[str, type[Insertion]] = {}


class ModelRef:
    """How something held inside a model refers to that model without a reference cycle (a cycle would keep the
    model, and whatever holds it, alive after ``del`` until the garbage collector runs): a weak reference that
    ``copy.deepcopy`` points at the copy and pickling rebuilds on load."""

    def __init__(self, model: nn.Module) -> None:
        self._ref = weakref.ref(model)

    def __call__(self) -> nn.Module:
        model = self._ref()
        if model is None:
            raise RuntimeError("timm_drop: the model this belongs to no longer exists")
        return model

    def __deepcopy__(self, memo: dict[int, Any]) -> ModelRef:
        model = self._ref()
        return ModelRef(memo.get(id(model), model))

    def __reduce__(self) -> tuple[Any, ...]:
        return ModelRef, (self(),)


def submodule(model: nn.Module, name: str) -> nn.Module:
    """``model`` itself for the empty name, else its submodule ``name``."""
    return model.get_submodule(name) if name else model


def record_of(model: nn.Module) -> list[Insertion]:
    """The insertions ``model`` carries, oldest first (empty for an untouched model)."""
    return list(model.__dict__.get(RECORD) or [])


class Insertion:
    """One change to a model that knows how to undo itself. Holds names, not modules, for the places it
    changed (SyncBN conversion replaces modules), the regularizer modules it put in (``regs``) and the plan
    entries they are (``entries``, in the same order)."""

    kind: ClassVar[str] = ""
    #: the plan entries this insertion places, one per regularizer (empty in a record pickled before they were kept)
    entries: tuple[Any, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            INSERTION_KINDS[cls.kind] = cls

    @classmethod
    def group(cls, entry: Any) -> str:
        """Entries with the same group share one insertion (by default: one insertion per site)."""
        return entry.site

    @classmethod
    def from_entries(cls, model: nn.Module, entries: Sequence[Any], regs: list[nn.Module], plan: Any) -> Insertion:
        """The insertion that places ``regs`` for ``entries`` (one group of ``plan``'s entries)."""
        raise NotImplementedError

    def apply(self, model: nn.Module) -> None:
        raise NotImplementedError

    def undo(self, model: nn.Module) -> None:
        raise NotImplementedError

    def intact(self, module: nn.Module) -> bool:
        """Whether ``module`` (the place this insertion changed) still carries it."""
        return True

    def placed(self) -> list[tuple[Any, nn.Module]]:
        """``(plan entry, regularizer)`` for every regularizer this insertion put in."""
        return list(zip(self.entries, getattr(self, "regs", ())))


def insertion_kind(name: str) -> type[Insertion]:
    """The insertion class registered as ``name``."""
    try:
        return INSERTION_KINDS[name]
    except KeyError:
        raise RewriteError(f"unknown insertion kind {name!r}; known: {', '.join(sorted(INSERTION_KINDS))}") from None


def unique_attr(module: nn.Module, base: str, taken: set[str] = frozenset()) -> str:
    """``base`` made a valid attribute name that ``module`` (and ``taken``) does not use yet."""
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in base)
    name, i = base, 2
    while hasattr(module, name) or name in module._modules or name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def strip_regularizers(model: nn.Module) -> nn.Module:
    """Undo every :func:`~timm_drop.apply_regularizer` on ``model`` (same object back, original structure)."""
    for insertion in reversed(record_of(model)):
        insertion.undo(model)
    for key in (RECORD, PLANS, LEGACY_PLAN, "__prepare_scriptable__"):
        model.__dict__.pop(key, None)
    return model
