"""Name -> regularizer factory registry (DESIGN §2).

Specs name regularizers by these names; a spec never imports code. Custom regularizers register from Python::

    @register_regularizer("my_drop")
    class MyDrop(Regularizer): ...
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_regularizer(
    name: str, factory: Callable[..., nn.Module] | None = None, *, overwrite: bool = False
):
    """Register ``factory`` (a class or function returning an ``nn.Module``) under ``name``.

    Usable as ``register_regularizer("name", Cls)`` or as a decorator ``@register_regularizer("name")``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"regularizer name must be an identifier-like string, got {name!r}")

    def _register(obj: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not obj and not overwrite:
            raise ValueError(
                f"regularizer {name!r} is already registered ({_REGISTRY[name]!r}); pass overwrite=True"
            )
        _REGISTRY[name] = obj
        if isinstance(obj, type) and not getattr(obj, "registry_name", ""):
            obj.registry_name = name
        return obj

    return _register if factory is None else _register(factory)


def nearest_names(name: str, candidates: list[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)


def _unknown(name: str) -> KeyError:
    names = list_regularizers()
    near = nearest_names(name, names)
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return KeyError(f"unknown regularizer {name!r}{hint} (registered: {', '.join(names)})")


def get_regularizer_class(name: str) -> Callable[..., nn.Module]:
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise _unknown(name) from None


def regularizer_params(name: str) -> dict[str, Any]:
    """Parameter names of a registered regularizer and their defaults (``inspect.Parameter.empty`` if required)."""
    factory = get_regularizer_class(name)
    sig = inspect.signature(factory)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
    }


def create_regularizer(name: str, **params: Any) -> nn.Module:
    """Build the regularizer registered as ``name``; unknown names and parameters raise errors naming them."""
    factory = get_regularizer_class(name)
    accepted = regularizer_params(name)
    unknown = [k for k in params if k not in accepted]
    if unknown:
        raise TypeError(
            f"regularizer {name!r} got unknown parameter(s) {unknown}; it accepts {list(accepted)}"
        )
    return factory(**params)


def list_regularizers() -> list[str]:
    _ensure_builtins()
    return sorted(_REGISTRY)


def _ensure_builtins() -> None:
    # Importing the package registers the built-in methods; this guards direct imports of this module.
    import timm_drop.regularizers  # noqa: F401
