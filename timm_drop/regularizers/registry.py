"""Name -> regularizer factory registry.

Specs name regularizers by these names; a spec never imports code. Custom regularizers register from Python::

    @register_regularizer("my_drop")
    class MyDrop(Regularizer): ...

A class declares what the rest of the library needs to know about its method (``strength_params``,
``compare_defaults``, ``figure``, ``card``: :class:`~timm_drop.regularizers.base.Regularizer`); registering
checks that the parameters it names are parameters of the class.

Only activation regularizers live here: modules a rule places at sites. Training controllers such as LayerOut
(which freezes layers through the optimizer) are configured beside the spec, and a lookup of such a name says
where it belongs (:data:`NOT_REGULARIZERS`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from timm_drop.suggest import did_you_mean

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

#: Names people reach for in a spec that are not regularizers, and what to use instead.
NOT_REGULARIZERS: dict[str, str] = {
    "layerout": (
        "a training controller, not a regularizer a rule can place at sites; configure it in the recipe "
        "config's 'layerout:' section, or in Python with timm_drop.LayerOut(...).bind(model)"
    ),
}


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
        _check_declarations(name, obj)
        _REGISTRY[name] = obj
        if isinstance(obj, type) and not getattr(obj, "registry_name", ""):
            obj.registry_name = name  # errors name the regularizer as specs do (Regularizer.display_name)
        return obj

    return _register if factory is None else _register(factory)


def _check_declarations(name: str, obj: Callable[..., nn.Module]) -> None:
    """A class's ``strength_params`` and ``compare_defaults`` must name parameters it accepts (else depth scaling
    or ``viz --compare`` would skip them silently)."""
    accepted = _accepted(obj)
    named = [*getattr(obj, "strength_params", ()), *getattr(obj, "compare_defaults", {})]
    unknown = [p for p in named if p not in accepted]
    if unknown:
        raise ValueError(
            f"regularizer {name!r}: strength_params / compare_defaults name {unknown}, which "
            f"{getattr(obj, '__name__', obj)!r} does not accept (it accepts {list(accepted)})"
        )


def _accepted(factory: Callable[..., nn.Module]) -> dict[str, Any]:
    sig = inspect.signature(factory)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
    }


def not_a_regularizer(name: str) -> str | None:
    """What ``name`` is instead, when it is a known non-regularizer (:data:`NOT_REGULARIZERS`) nobody registered."""
    return NOT_REGULARIZERS.get(name) if name not in _REGISTRY else None


def _unknown(name: str) -> KeyError:
    elsewhere = not_a_regularizer(name)
    if elsewhere is not None:
        return KeyError(f"{name!r} is {elsewhere}")
    names = list_regularizers()
    return KeyError(
        f"unknown regularizer {name!r}{did_you_mean(name, names)} (registered: {', '.join(names)})"
    )


def get_regularizer_class(name: str) -> Callable[..., nn.Module]:
    """The factory registered as ``name``; an unknown name is a ``KeyError`` with the nearest names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise _unknown(name) from None


def regularizer_params(name: str) -> dict[str, Any]:
    """Parameter names of a registered regularizer and their defaults (``inspect.Parameter.empty`` if required)."""
    return _accepted(get_regularizer_class(name))


def strength_params(name: str) -> tuple[str, ...]:
    """The parameters carrying the strength of the regularizer registered as ``name`` (its class's
    ``strength_params``; none for a plain factory function)."""
    return tuple(getattr(get_regularizer_class(name), "strength_params", ()))


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
    return sorted(_REGISTRY)

