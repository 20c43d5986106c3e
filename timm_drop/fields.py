"""A document's fields as data: name, type, default, allowed values and one line of help, in one place.

The spec's rule fields (:data:`timm_drop.spec.RULE_FIELDS`) and the recipe config's fields
(:data:`timm_drop.training.config.CONFIG_FIELDS`) are declared as dataclass fields whose ``metadata`` carries the
help (PEFT's way): :func:`documented` makes such a field, :func:`field_docs` reads a dataclass's fields back as
:class:`FieldDoc` rows, and :func:`markdown_table` renders them for the docs. Validation reads the same
definitions (field names for "unknown field, did you mean", allowed values and defaults), so a field is described
once.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml

__all__ = ["REQUIRED", "FieldDoc", "documented", "field_docs", "markdown_table"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: the default of a field that a document must give
REQUIRED: Any = _Required()


@dataclass(frozen=True)
class FieldDoc:
    """One field of a document as its users see it (YAML types: ``int``, ``str or list of str``, ``mapping``)."""

    name: str
    type: str
    help: str
    default: Any = REQUIRED
    choices: tuple[Any, ...] | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def documented(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    factory: Callable[[], Any] | None = None,
    type: str | None = None,
    choices: Sequence[Any] | None = None,
    shown_default: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that carries its help (and, where the annotation says less than the document, its
    YAML ``type``, allowed ``choices`` and the ``shown_default`` a document gets when it leaves the field out)."""
    meta: dict[str, Any] = {"help": help}
    if type is not None:
        meta["type"] = type
    if choices is not None:
        meta["choices"] = tuple(choices)
    if shown_default is not dataclasses.MISSING:
        meta["default"] = shown_default
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_docs(cls: type, prefix: str = "") -> tuple[FieldDoc, ...]:
    """The documented fields of dataclass ``cls``; a field holding a dataclass (a config section) is walked into,
    its fields named with dots (``data.augment.cutout``). Fields without help are not part of the document."""
    hints = typing.get_type_hints(cls)
    out: list[FieldDoc] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += field_docs(tp, f"{prefix}{f.name}.")
        elif "help" in f.metadata:
            out.append(_doc(f, tp, prefix + f.name))
    return tuple(out)


def _doc(f: dataclasses.Field, tp: Any, name: str) -> FieldDoc:
    meta = f.metadata
    if "default" in meta:
        default = meta["default"]
    elif f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = REQUIRED
    choices = meta.get("choices", _literal_choices(tp))
    return FieldDoc(name, meta.get("type") or type_name(tp), meta["help"], default, choices)


def _literal_choices(tp: Any) -> tuple[Any, ...] | None:
    for arg in typing.get_args(tp) if _is_union(tp) else (tp,):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def type_name(tp: Any) -> str:
    """An annotation in a YAML writer's words: ``int``, ``list of float``, ``mapping``, ``str or null``."""
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if _is_union(tp):
        return " or ".join(dict.fromkeys(type_name(a) for a in typing.get_args(tp)))
    if origin is Literal:
        return " or ".join(dict.fromkeys(type(c).__name__ for c in typing.get_args(tp)))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"list of {type_name(item)}"
    if tp is dict or origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _value(value: Any) -> str:
    """A value as it is written in YAML (``null``, ``true``, ``'no'``, ``[]``)."""
    if value is REQUIRED:
        return "required"
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(fields: Sequence[FieldDoc]) -> str:
    """The fields as a Markdown table: field, type, default, allowed values, help."""
    lines = ["| field | type | default | allowed | help |", "|---|---|---|---|---|"]
    for f in fields:
        default = "required" if f.required else f"`{_cell(_value(f.default))}`"
        allowed = ", ".join(f"`{_cell(_value(c))}`" for c in f.choices) if f.choices else ""
        lines.append(f"| `{f.name}` | {_cell(f.type)} | {default} | {allowed} | {_cell(f.help)} |")
    return "\n".join(lines) + "\n"
