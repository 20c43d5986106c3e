"""Every error the library raises to users sits under one exported base, ``timm_drop.TimmDropError``, and keeps
its old built-in base, so ``except timm_drop.TimmDropError`` catches them all and no ``except ValueError`` breaks."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import timm_drop

# raised inside one tool and caught there; never reach a caller
_INTERNAL = {"timm_drop.tools.coverage.result.CheckFailed", "timm_drop.tools.coverage.result._Skip"}


def _library_exceptions() -> list[type[BaseException]]:
    found = {}
    for info in pkgutil.walk_packages(timm_drop.__path__, "timm_drop."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Exception) and obj.__module__.startswith("timm_drop."):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [cls for name, cls in sorted(found.items()) if name not in _INTERNAL]


def test_the_library_defines_errors_to_check():
    names = {cls.__name__ for cls in _library_exceptions()}
    assert {"SpecError", "RewriteError", "SiteError", "ParamError", "ConfigError", "CheckpointError"} <= names


@pytest.mark.parametrize("cls", _library_exceptions(), ids=lambda c: c.__name__)
def test_every_library_error_sits_under_timm_drop_error(cls):
    assert issubclass(cls, timm_drop.TimmDropError)


@pytest.mark.parametrize(
    ("name", "builtin"),
    [("SpecError", ValueError), ("RewriteError", ValueError), ("SiteError", ValueError), ("ParamError", ValueError)],
)
def test_errors_keep_their_builtin_base_and_are_exported(name, builtin):
    cls = getattr(timm_drop, name)
    assert name in timm_drop.__all__ and issubclass(cls, builtin) and issubclass(cls, timm_drop.TimmDropError)


def test_a_bad_spec_is_caught_by_the_common_base():
    with pytest.raises(timm_drop.TimmDropError, match="rule 1"):
        timm_drop.load_spec({"rules": [{"regularizer": "dropblock", "sites": ["nowhere"]}]})
