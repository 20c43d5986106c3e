"""The spec language: YAML / dict -> a validated :class:`Spec` of placement :class:`Rule` s.

A spec is data. It is parsed with ``yaml.safe_load`` semantics (a spec never imports or executes code) and
validated completely before anything touches a model: every problem in every rule is collected into one
:class:`SpecError` whose message names the source, the line (for YAML text and files), the rule
(``rule 2 (dropblock)``, 1-based) and the field (``stage_params.3.drop_prob``).

Format (a file, a YAML string and a dict are the same thing)::

    version: 1                          # optional; only 1 exists
    description: "free text"            # optional
    rules:
      - regularizer: dropblock          # a name from list_regularizers()
        params: {drop_prob: 0.1, block_size: 7}
        sites: [norm, shortcut]         # one of SITE_KINDS or a list of them
        stages: [3, 4]                  # 1-based, stem excluded; -1 = the last; omitted = everywhere
        name: "layer*"                  # glob (fnmatch, full name) or "re:<regex>" (re.fullmatch); str or list
        type: BatchNorm2d               # class name, matched through the module's MRO; str or list
        exclude: ["*.downsample*"]      # same syntax as name
        stage_params: {3: {drop_prob: 0.025}}
        schedule: {kind: linear, start: 0.0, end: 1.0}
        depth_scaling: linear
        norm_position: after_norm
        on_conflict: error
        allow_empty: false
        label: "DropBlock groups 3-4"

Choices where the format could be read more than one way:

* ``rules`` given as a single mapping that has a ``regularizer`` key is accepted as a one-rule list (the
  intent is unambiguous); any other mapping is an error (a dict of named rules is not a format).
* A top level that is a list is an error with a hint to put it under ``rules:``; an empty document is an error.
* ``stage_params`` keys may be ints or digit strings (``"3"``), since JSON and command lines stringify keys.
  Negative stage numbers count from the end (``-1`` = the last stage) and are resolved against the model when
  it is planned (:mod:`timm_drop.relative`), as are relative sizes (``block_size: {fraction: 0.5}``).
  ``stages`` must be ints.
* With ``stages`` set, ``params`` need only be complete for the listed stages that have no override, so
  CorrDrop's per-stage block sizes can live entirely in ``stage_params``. Without ``stages`` the base
  ``params`` must build on their own (they serve stages without an override and sites outside any stage).
  A ``stage_params`` key outside ``stages`` is an error: it could never apply.
* The ``module`` site kind needs a ``name`` or ``type`` selector (otherwise it would mean "after every
  module"). ``norm_position: after_act`` needs a ``norm`` site. ``depth_scaling`` needs a strength parameter
  (``drop_prob`` or ``q``) in the regularizer.
* Parameter values are checked by building the regularizer once per distinct merged parameter set, so the
  regularizer's own checks are the single source of truth; their errors are re-worded to name the field.
  PyYAML reads ``1e-3`` (no dot) as a string; such a value gets a hint to write ``1.0e-3``.
* A YAML mapping with the same key twice is an error (PyYAML would silently keep the last one).
* ``regularizer: layerout`` is an error that says where LayerOut belongs (the recipe config's ``layerout:``
  section or ``timm_drop.LayerOut``): it is a training controller, not a module placed at sites.
* A spec over :data:`MAX_SPEC_BYTES`, :data:`MAX_YAML_NODES` (aliases expanded), :data:`MAX_YAML_DEPTH` or
  :data:`MAX_RULES` is refused before it costs time or memory, with an error naming the limit.

The spec lives in three modules that depend one way: :mod:`timm_drop.spec_model` (the rule fields as data,
:class:`Rule`, :class:`Spec`, :class:`SpecError`), :mod:`timm_drop.spec_checks` (validation) and this one
(loading files and text within limits); every public name is importable from here.

Precedence between rules (``on_conflict``) is decided by the rewriter in spec order: a later rule that
lands on a site an earlier rule already took raises (``error``), adds a second regularizer after the first
(``stack``) or takes the site over (``replace``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from timm_drop.fields import markdown_table
from timm_drop.problems import Problem
from timm_drop.spec_checks import MAX_RULES, validate_spec
from timm_drop.spec_model import (
    DEPTH_SCALINGS,
    NORM_POSITIONS,
    ON_CONFLICT,
    RULE_FIELDS,
    RULE_KEYS,
    SITE_KIND_HELP,
    SITE_KINDS,
    TOP_LEVEL_KEYS,
    Rule,
    Spec,
    SpecError,
    SpecProblem,
)
from timm_drop.structure import REGEX_PREFIX, match_pattern
from timm_drop.yaml_io import YAMLInputError, load_yaml_bounded

__all__ = [
    "DEPTH_SCALINGS",
    "MAX_RULES",
    "MAX_SPEC_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "NORM_POSITIONS",
    "ON_CONFLICT",
    "REGEX_PREFIX",
    "RULE_FIELDS",
    "RULE_KEYS",
    "SITE_KINDS",
    "SITE_KIND_HELP",
    "TOP_LEVEL_KEYS",
    "Rule",
    "Spec",
    "SpecError",
    "SpecProblem",
    "load_spec",
    "match_pattern",
    "spec_field_table",
]

#: Limits that keep a hostile or runaway spec from costing minutes and gigabytes: the size of a spec file or
#: text (PyYAML composes a few ten thousand nodes a second, so this bounds the parse) and its YAML nodes counted
#: with aliases expanded (an "alias bomb" of a few hundred bytes describes 10^8 values); the number of rules is
#: bounded by :data:`MAX_RULES`. Real specs are a few KiB with a handful of rules.
MAX_SPEC_BYTES: int = 256 * 1024
MAX_YAML_NODES: int = 50_000
#: Flow-collection nesting (``[`` / ``{``): a deeper text costs PyYAML's recursive composer seconds before it gives
#: up with a RecursionError; counting brackets first refuses it at once and names the line.
MAX_YAML_DEPTH: int = 100
_YAML_SUFFIXES = (".yaml", ".yml")
_BRACKET = re.compile(r"[\[\]{}]")


def spec_field_table() -> str:
    """The rule fields (:data:`RULE_FIELDS`) as a Markdown table: field, type, default, allowed values, help."""
    return markdown_table(RULE_FIELDS)


def load_spec(src: str | os.PathLike | Mapping[str, Any] | Spec) -> Spec:
    """Parse and validate a spec from a file path, YAML text, a mapping or a :class:`Spec`.

    A string is a path when it names an existing file or ends in ``.yaml``/``.yml`` (a missing file is then
    an error naming the path); otherwise it is YAML text. Raises :class:`SpecError` listing every problem.
    """
    if isinstance(src, Spec):
        # Re-validate: a Spec may have been assembled by hand (or before a registry change).
        checked = validate_spec(src.to_dict(), src.source, None)
        return src if checked == src else checked
    if isinstance(src, os.PathLike):
        return _load_file(os.fspath(src))
    if isinstance(src, str):
        if _looks_like_path(src):
            return _load_file(src)
        data, root = _parse_yaml(src, "<string>")
        _refuse_placement(src, data)
        if isinstance(data, str) and not any(c.isspace() for c in data.strip()):
            raise SpecError(
                "<string>",
                f"{src!r} is neither an existing file nor YAML text with a 'rules' list "
                "(paths must exist or end in .yaml/.yml)",
            )
        return validate_spec(data, "<string>", root)
    if isinstance(src, Mapping):
        _refuse_placement(src, src)
        return validate_spec(src, "<dict>", None)
    raise SpecError(
        "<unknown>",
        f"load_spec takes a path, YAML text, a mapping or a Spec, not {type(src).__name__}",
    )


#: Raises for a placement by name (``"dropblock"``, ``{preset: ...}``), which becomes a spec only on a model, saying
#: how to use it. Set by :mod:`timm_drop.placements`, which builds on this module (so this one never imports it).
placement_check: Callable[[Any, Any], None] | None = None


def _refuse_placement(src: Any, data: Any) -> None:
    if placement_check is not None:
        placement_check(src, data)


def _looks_like_path(text: str) -> bool:
    if "\n" in text or len(text) > 4096:  # no file name is that long; a huge string is YAML text
        return False
    return os.path.exists(os.path.expanduser(text)) or text.strip().lower().endswith(_YAML_SUFFIXES)


def _load_file(given: str) -> Spec:
    path = os.path.expanduser(given)
    if not os.path.exists(path):
        raise SpecError(path, f"spec file {path!r} does not exist")
    if os.path.isdir(path):
        raise SpecError(path, f"spec path {path!r} is a directory, not a YAML file")
    try:
        with open(path, "rb") as fh:
            # at most one byte past the limit: a huge file (or /dev/zero) is refused without being read
            raw = fh.read(MAX_SPEC_BYTES + 1)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(path, f"cannot read spec file {path!r}: {exc}") from exc
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(path, f"spec file {path!r} is over the limit of {MAX_SPEC_BYTES} bytes")
    data, root = _parse_yaml(text, path)
    return validate_spec(data, path, root)


def _parse_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """``yaml.safe_load`` within the size and alias-expansion limits, keeping the node tree for line numbers
    and duplicate-key checks."""
    # (a text over the size limit is left to load_yaml_bounded, which refuses it without looking inside)
    deep_at = _flow_depth_exceeded(text, MAX_YAML_DEPTH) if len(text) <= MAX_SPEC_BYTES else None
    if deep_at is not None:
        message = f"YAML nested too deeply: more than {MAX_YAML_DEPTH} levels of [ ] or {{ }}"
        raise SpecError(source, Problem(message, source=source, line=deep_at))
    try:
        return load_yaml_bounded(text, source, max_bytes=MAX_SPEC_BYTES, max_nodes=MAX_YAML_NODES)
    except YAMLInputError as exc:
        raise SpecError(
            source, Problem(exc.problem, source=source, line=exc.line, column=exc.column)
        ) from None


def _flow_depth_exceeded(text: str, limit: int) -> int | None:
    """1-based line where brackets first nest deeper than ``limit``, else None; linear in the text.

    Brackets inside strings and comments count too: a real spec never comes near the limit either way, and
    not parsing quotes keeps a crafted quote from hiding brackets from this check.
    """
    depth = 0
    for match in _BRACKET.finditer(text):
        depth = depth + 1 if match.group() in "[{" else max(depth - 1, 0)
        if depth > limit:
            return text.count("\n", 0, match.start()) + 1
    return None


def __getattr__(name: str) -> Any:
    # STRENGTH_PARAMS was the one list of strength names; each regularizer class now declares its own.
    if name == "STRENGTH_PARAMS":
        import warnings

        from timm_drop.regularizers.registry import list_regularizers, strength_params

        warnings.warn(
            "timm_drop.spec.STRENGTH_PARAMS is deprecated: read strength_params on the regularizer class "
            "(timm_drop.regularizers.strength_params(name))",
            DeprecationWarning,
            stacklevel=2,
        )
        return tuple(dict.fromkeys(p for n in list_regularizers() for p in strength_params(n)))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
