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

Precedence between rules (``on_conflict``) is decided by the rewriter in spec order: a later rule that
lands on a site an earlier rule already took raises (``error``), adds a second regularizer after the first
(``stack``) or takes the site over (``replace``).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import yaml

from timm_drop.errors import TimmDropError
from timm_drop.problems import ProblemCollector, YamlLocator
from timm_drop.schedules import Schedule, make_schedule
from timm_drop.structure import REGEX_PREFIX, match_pattern
from timm_drop.suggest import did_you_mean
from timm_drop.yaml_io import YAMLInputError, load_yaml_bounded

__all__ = [
    "DEPTH_SCALINGS",
    "MAX_RULES",
    "MAX_SPEC_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "NORM_POSITIONS",
    "ON_CONFLICT",
    "RULE_KEYS",
    "SITE_KINDS",
    "STRENGTH_PARAMS",
    "TOP_LEVEL_KEYS",
    "Rule",
    "Spec",
    "SpecError",
    "SpecProblem",
    "load_spec",
    "match_pattern",
]

SITE_KINDS: tuple[str, ...] = ("stage", "block", "residual", "shortcut", "merge", "norm", "module")
DEPTH_SCALINGS: tuple[str, ...] = ("linear",)
NORM_POSITIONS: tuple[str, ...] = ("after_norm", "after_act")
ON_CONFLICT: tuple[str, ...] = ("error", "stack", "replace")
#: parameters that carry a regularizer's strength: scaled by ``depth_scaling`` and by the schedule.
STRENGTH_PARAMS: tuple[str, ...] = ("drop_prob", "q")
TOP_LEVEL_KEYS: tuple[str, ...] = ("rules", "version", "description")
RULE_KEYS: tuple[str, ...] = (
    "regularizer",
    "params",
    "sites",
    "stages",
    "name",
    "type",
    "exclude",
    "stage_params",
    "depth_scaling",
    "schedule",
    "norm_position",
    "on_conflict",
    "allow_empty",
    "label",
)
SPEC_VERSIONS: tuple[int, ...] = (1,)
#: Limits that keep a hostile or runaway spec from costing minutes and gigabytes: the size of a spec file or
#: text (PyYAML composes a few ten thousand nodes a second, so this bounds the parse), its YAML nodes counted
#: with aliases expanded (an "alias bomb" of a few hundred bytes describes 10^8 values) and its rules (each
#: one builds regularizers to check its parameters). Real specs are a few KiB with a handful of rules.
MAX_SPEC_BYTES: int = 256 * 1024
MAX_YAML_NODES: int = 50_000
#: Flow-collection nesting (``[`` / ``{``): a deeper text costs PyYAML's recursive composer seconds before it gives
#: up with a RecursionError; counting brackets first refuses it at once and names the line.
MAX_YAML_DEPTH: int = 100
MAX_RULES: int = 1_000
_YAML_SUFFIXES = (".yaml", ".yml")
_BRACKET = re.compile(r"[\[\]{}]")
_QUALIFIED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _fmt_list(items: Iterable[Any]) -> str:
    return ", ".join(repr(i) for i in items)


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpecProblem:
    """One thing wrong with a spec: where (rule, field, line) and what."""

    message: str
    rule: str | None = None  # "rule 2 (dropblock)"
    field: str | None = None  # "stage_params.3.drop_prob"
    line: int | None = None  # 1-based line in the YAML text, when the spec came from YAML
    column: int | None = None

    def __str__(self) -> str:
        where = []
        if self.rule:
            where.append(self.rule)
        if self.field:
            where.append(f"field {self.field!r}")
        head = ", ".join(where)
        return f"{head}: {self.message}" if head else self.message


class SpecError(TimmDropError, ValueError):
    """A spec that cannot be used. ``problems`` lists everything found, each naming rule, field and line."""

    def __init__(self, source: str, problems: Sequence[SpecProblem] | SpecProblem | str | None = None):
        if problems is None:
            # SpecError("whole message"): raised by code that has no structured problem to report
            self.source, self.problems = "", (SpecProblem(source),)
            ValueError.__init__(self, source)
            return
        if isinstance(problems, str):
            problems = [SpecProblem(problems)]
        elif isinstance(problems, SpecProblem):
            problems = [problems]
        self.source = source
        self.problems: tuple[SpecProblem, ...] = tuple(problems)
        super().__init__(self._format())

    @staticmethod
    def _locate(p: SpecProblem) -> str:
        if p.line is None:
            return ""
        return f"line {p.line}" + (f", column {p.column}" if p.column is not None else "")

    def _format(self) -> str:
        if len(self.problems) == 1:
            p = self.problems[0]
            loc = self._locate(p)
            return f"spec {self.source}{', ' + loc if loc else ''}: {p}"
        lines = [f"spec {self.source} has {len(self.problems)} problems:"]
        for p in self.problems:
            loc = self._locate(p)
            lines.append(f"  - {loc + ': ' if loc else ''}{p}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Rule and Spec
# ---------------------------------------------------------------------------------------------------------
def _freeze(mapping: Mapping[Any, Any] | None) -> Mapping[Any, Any]:
    return MappingProxyType(dict(mapping or {}))


def _tuple_or_none(value: Any) -> tuple[Any, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, (str, int)) else tuple(value)


@dataclass(frozen=True)
class Rule:
    """One placement rule: which regularizer, with which parameters, at which sites.

    Selectors (``sites``, ``stages``, ``name``, ``type``, ``exclude``) are AND-ed. Build rules with
    :func:`load_spec`, which validates them; the constructor only normalises containers.
    """

    index: int
    regularizer: str
    params: Mapping[str, Any]
    sites: tuple[str, ...]
    stages: tuple[int, ...] | None = None
    name: tuple[str, ...] | None = None
    type: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    stage_params: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    depth_scaling: str | None = None
    schedule: Schedule | None = None
    norm_position: str = "after_norm"
    on_conflict: str = "error"
    allow_empty: bool = False
    label: str | None = None

    def __post_init__(self) -> None:
        # Frozen containers: a Rule is shared by the plan and every site it produced.
        set_ = functools.partial(object.__setattr__, self)
        set_("params", _freeze(self.params))
        set_("sites", tuple(self.sites) if not isinstance(self.sites, str) else (self.sites,))
        set_("stages", _tuple_or_none(self.stages))
        set_("name", _tuple_or_none(self.name))
        set_("type", _tuple_or_none(self.type))
        set_("exclude", _tuple_or_none(self.exclude) or ())
        set_(
            "stage_params", MappingProxyType({int(k): _freeze(v) for k, v in dict(self.stage_params).items()})
        )

    def __str__(self) -> str:
        return f"rule {self.index + 1} ({self.regularizer})"

    def __hash__(self) -> int:
        return hash((self.index, self.regularizer, self.sites, self.stages, self.name, self.type, self.label))

    def describe(self) -> str:
        """``str(rule)`` plus its label, for tables and logs."""
        return f"{self}" + (f" {self.label!r}" if self.label else "")

    # -- selectors ---------------------------------------------------------------------------------
    def matches_name(self, qualname: str) -> bool:
        """Whether the ``name`` selector accepts this qualified module name (True when there is none)."""
        return self.name is None or any(match_pattern(p, qualname) for p in self.name)

    def is_excluded(self, qualname: str) -> bool:
        return any(match_pattern(p, qualname) for p in self.exclude)

    def matches_type(self, module: Any) -> bool:
        """Whether the ``type`` selector accepts ``module`` (True when there is none).

        A selector entry is a class name (``BatchNorm2d``) or a dotted ``module.ClassName`` path, compared
        with every class of the module's MRO, so ``BatchNorm2d`` also selects timm's ``BatchNormAct2d``.
        """
        if self.type is None:
            return True
        for cls in type(module).__mro__:
            full = f"{cls.__module__}.{cls.__qualname__}"
            if any(t == cls.__name__ or t == full for t in self.type):
                return True
        return False

    def matches_stage(self, stage: int | None) -> bool:
        """Whether a site in ``stage`` (None = outside any stage, e.g. the stem or head) is selected."""
        return self.stages is None or (stage is not None and stage in self.stages)

    def params_for_stage(self, stage: int | None) -> dict[str, Any]:
        """``params`` merged with ``stage_params[stage]`` (the override wins); a fresh dict."""
        merged = dict(self.params)
        if stage is not None:
            merged.update(self.stage_params.get(stage, {}))
        return merged

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form accepted by :func:`load_spec`; fields at their default are left out."""
        out: dict[str, Any] = {
            "regularizer": self.regularizer,
            "params": dict(self.params),
            "sites": list(self.sites),
        }
        if self.stages is not None:
            out["stages"] = list(self.stages)
        for key in ("name", "type"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value)
        if self.exclude:
            out["exclude"] = list(self.exclude)
        if self.stage_params:
            out["stage_params"] = {k: dict(v) for k, v in self.stage_params.items()}
        if self.depth_scaling is not None:
            out["depth_scaling"] = self.depth_scaling
        if self.schedule is not None:
            out["schedule"] = self.schedule.to_dict()
        if self.norm_position != "after_norm":
            out["norm_position"] = self.norm_position
        if self.on_conflict != "error":
            out["on_conflict"] = self.on_conflict
        if self.allow_empty:
            out["allow_empty"] = True
        if self.label is not None:
            out["label"] = self.label
        return out


@dataclass(frozen=True)
class Spec:
    """A validated spec: rules in order (order is the precedence for ``on_conflict``) and where it came from."""

    rules: tuple[Rule, ...]
    source: str = "<dict>"
    description: str | None = None
    version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self):
        return iter(self.rules)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, scalars) that :func:`load_spec` turns back into an equal spec."""
        out: dict[str, Any] = {"version": self.version}
        if self.description is not None:
            out["description"] = self.description
        out["rules"] = [r.to_dict() for r in self.rules]
        return out

    def to_yaml(self) -> str:
        """The spec as YAML text (same content as :meth:`to_dict`)."""
        return yaml.safe_dump(_yaml_safe(self.to_dict()), sort_keys=False)


def _yaml_safe(value: Any) -> Any:
    # safe_dump has no representer for tuples (a hand-built param value may be one)
    if isinstance(value, Mapping):
        return {k: _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def load_spec(src: str | os.PathLike | Mapping[str, Any] | Spec) -> Spec:
    """Parse and validate a spec from a file path, YAML text, a mapping or a :class:`Spec`.

    A string is a path when it names an existing file or ends in ``.yaml``/``.yml`` (a missing file is then
    an error naming the path); otherwise it is YAML text. Raises :class:`SpecError` listing every problem.
    """
    if isinstance(src, Spec):
        # Re-validate: a Spec may have been assembled by hand (or before a registry change).
        checked = _validate(src.to_dict(), src.source, None)
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
        return _validate(data, "<string>", root)
    if isinstance(src, Mapping):
        _refuse_placement(src, src)
        return _validate(src, "<dict>", None)
    raise SpecError(
        "<unknown>",
        f"load_spec takes a path, YAML text, a mapping or a Spec, not {type(src).__name__}",
    )


def _refuse_placement(src: Any, data: Any) -> None:
    """A placement by name (``"dropblock"``, ``{preset: dropblock, ...}``) becomes a spec only on a model: say how."""
    from timm_drop.placements import PLACEMENTS, placement_request

    name = data.get("preset") if isinstance(data, Mapping) else data
    if isinstance(name, str) and (name in PLACEMENTS or isinstance(data, Mapping)):
        placement_request(data)  # an unknown name or override is named first
        raise SpecError(
            "<string>" if isinstance(src, str) else "<dict>",
            f"{name!r} is a placement by name: it becomes a spec on a given model. Pass it to plan / "
            f"apply_regularizer / create_model(spec=...) as it is, or get the concrete spec with "
            f"timm_drop.placement_spec(model, {name!r}) (CLI: timm-drop presets --model MODEL {name})",
        )


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
    return _validate(data, path, root)


def _parse_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """``yaml.safe_load`` within the size and alias-expansion limits, keeping the node tree for line numbers
    and duplicate-key checks."""
    # (a text over the size limit is left to load_yaml_bounded, which refuses it without looking inside)
    deep_at = _flow_depth_exceeded(text, MAX_YAML_DEPTH) if len(text) <= MAX_SPEC_BYTES else None
    if deep_at is not None:
        message = f"YAML nested too deeply: more than {MAX_YAML_DEPTH} levels of [ ] or {{ }}"
        raise SpecError(source, SpecProblem(message, line=deep_at))
    try:
        return load_yaml_bounded(text, source, max_bytes=MAX_SPEC_BYTES, max_nodes=MAX_YAML_NODES)
    except YAMLInputError as exc:
        raise SpecError(source, SpecProblem(exc.problem, line=exc.line, column=exc.column)) from None


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


class _Report:
    """The spec's problems with their location: rule, field and, for YAML input, the field's line."""

    def __init__(self, source: str, root: yaml.Node | None):
        self.source = source
        self.yaml = YamlLocator(root)
        self.problems: ProblemCollector[SpecProblem] = ProblemCollector()

    def add(
        self, message: str, path: tuple[Any, ...] = (), rule: str | None = None, fld: str | None = None
    ) -> None:
        line = self.yaml.line(path)
        self.problems.add(SpecProblem(message, rule=rule, field=fld, line=line), self._order(line, path))

    @staticmethod
    def _order(line: int | None, path: tuple[Any, ...]) -> tuple[int, int, int]:
        # YAML: file order. Dicts: top level first, then rule by rule, fields in the documented order.
        if line is not None:
            return (line, 0, 0)
        if len(path) >= 2 and path[0] == "rules" and isinstance(path[1], int):
            rule, rest = path[1], path[2:]
        elif path[:1] == ("rules",):
            rule, rest = 0, path[1:]
        else:
            return (0, -1, 0)
        first = rest[0] if rest else None
        return (0, rule, RULE_KEYS.index(first) if first in RULE_KEYS else -1)

    def check_duplicate_keys(self) -> None:
        for path, key, line in self.yaml.duplicate_keys():
            rule = None
            inner = list(path)
            if len(path) >= 2 and path[0] == "rules" and isinstance(path[1], int):
                reg = self.yaml.node(path[:2] + ("regularizer",))
                rule = f"rule {path[1] + 1} ({reg.value if isinstance(reg, yaml.ScalarNode) else '?'})"
                inner = inner[2:]
            fld = ".".join([str(p) for p in inner] + [key])
            message = f"key {key!r} appears twice; YAML would silently keep only the last one"
            self.problems.add(SpecProblem(message, rule=rule, field=fld, line=line), (line, 0, 0))

    def raise_if_any(self) -> None:
        if self.problems:
            raise SpecError(self.source, self.problems.sorted())


def _validate(data: Any, source: str, root: yaml.Node | None) -> Spec:
    report = _Report(source, root)
    report.check_duplicate_keys()
    if data is None:
        report.add("the spec is empty; it needs a 'rules' list")
        report.raise_if_any()
    if isinstance(data, list):
        report.add(
            "the top level is a list; put the rules under a 'rules:' key (rules: [...])",
        )
        report.raise_if_any()
    if not isinstance(data, Mapping):
        report.add(f"the top level must be a mapping with a 'rules' list, got {type(data).__name__} {data!r}")
        report.raise_if_any()

    for key in data:
        if key not in TOP_LEVEL_KEYS:
            hint = did_you_mean(str(key), TOP_LEVEL_KEYS)
            if hint == "" and str(key) in RULE_KEYS:
                hint = "; rule fields go inside an entry of the 'rules' list"
            report.add(
                f"is not a top-level key{hint} (top-level keys: {_fmt_list(TOP_LEVEL_KEYS)})",
                (key,),
                fld=str(key),
            )

    version = data.get("version", 1)
    if isinstance(version, bool) or version not in SPEC_VERSIONS:
        report.add(
            f"unsupported spec version {version!r}; supported: {_fmt_list(SPEC_VERSIONS)}",
            ("version",),
            fld="version",
        )
    description = data.get("description")
    if description is not None and not isinstance(description, str):
        report.add(f"must be a string, got {type(description).__name__}", ("description",), fld="description")

    rules: list[Rule] = []
    raw_rules = data.get("rules")
    if "rules" not in data:
        report.add("is required: the spec has no 'rules' list", (), fld="rules")
    elif isinstance(raw_rules, Mapping) and "regularizer" in raw_rules:
        rule = _parse_rule(0, raw_rules, report, ("rules",))
        rules = [rule] if rule is not None else []
    elif not isinstance(raw_rules, list):
        got = "a mapping without a 'regularizer' key" if isinstance(raw_rules, Mapping) else repr(raw_rules)
        report.add(f"must be a list of rules (or a single rule mapping), got {got}", ("rules",), fld="rules")
    elif not raw_rules:
        report.add("is empty; a spec needs at least one rule", ("rules",), fld="rules")
    elif len(raw_rules) > MAX_RULES:
        # checked before any rule: each rule builds regularizers, so a huge list would cost minutes
        report.add(
            f"has {len(raw_rules):,} rules, more than the limit of {MAX_RULES:,}; split the spec "
            "or select more sites per rule",
            ("rules",),
            fld="rules",
        )
    else:
        for i, raw in enumerate(raw_rules):
            rule = _parse_rule(i, raw, report, ("rules", i))
            if rule is not None:
                rules.append(rule)

    report.raise_if_any()
    return Spec(
        rules=tuple(rules),
        source=source,
        description=description,
        version=int(version),
    )


# ---------------------------------------------------------------------------------------------------------
# One rule
# ---------------------------------------------------------------------------------------------------------
class _RuleChecker:
    """One rule's raw mapping, its registered parameters (None when the regularizer is unknown) and the
    problems found in it, each reported with the rule's name and the field."""

    def __init__(self, index: int, raw: Mapping[str, Any], report: _Report, path: tuple[Any, ...]):
        self.index = index
        self.raw = raw
        self.report = report
        self.path = path
        self.regularizer = raw.get("regularizer")
        self.reg_params = _known_params(self.regularizer)
        reg = self.regularizer
        self.where = f"rule {index + 1} ({reg if isinstance(reg, str) and reg else '?'})"
        self.ok = True

    def fail(self, fld: str | None, message: str, path: tuple[Any, ...] | None = None) -> None:
        self.ok = False
        if path is None:
            path = () if fld is None else tuple(_path_steps(fld))
        self.report.add(message, self.path + path, rule=self.where, fld=fld)


def _path_steps(fld: str) -> list[Any]:
    steps: list[Any] = []
    for part in re.split(r"\.|\[", fld):
        part = part.rstrip("]")
        steps.append(int(part) if part.isdigit() else part)
    return steps


def _parse_rule(index: int, raw: Any, report: _Report, path: tuple[Any, ...]) -> Rule | None:
    """Check every field of one rule (all problems are reported) and build the :class:`Rule`."""
    if not isinstance(raw, Mapping):
        report.add(
            f"each rule must be a mapping with at least 'regularizer' and 'sites', got {type(raw).__name__} {raw!r}",
            path,
            rule=f"rule {index + 1}",
        )
        return None
    c = _RuleChecker(index, raw, report, path)
    _check_rule_fields(c)
    _check_regularizer(c)
    params = _check_params(c, raw.get("params", {}), "params")
    sites = _check_sites(c)
    stages = _check_stages(c, raw.get("stages"))
    name, type_, exclude = _check_selectors(c, sites)
    stage_params = _check_stage_params(c, stages)
    if c.reg_params is not None and params is not None:
        _check_buildable(c, params, stage_params, stages)
    depth_scaling = _check_depth_scaling(c)
    schedule = _check_schedule(c)
    norm_position = _check_norm_position(c, sites)
    on_conflict = _check_one_of(c, "on_conflict", ON_CONFLICT, "error")
    allow_empty = raw.get("allow_empty", False)
    if not isinstance(allow_empty, bool):
        c.fail("allow_empty", f"must be true or false, got {allow_empty!r}")
    label = raw.get("label")
    if label is not None and not isinstance(label, str):
        c.fail("label", f"must be a string, got {type(label).__name__} {label!r}")

    if not c.ok:
        return None
    return Rule(
        index=index,
        regularizer=c.regularizer,
        params=params,
        sites=sites,
        stages=stages,
        name=name,
        type=type_,
        exclude=exclude,
        stage_params=stage_params,
        depth_scaling=depth_scaling,
        schedule=schedule,
        norm_position=norm_position,
        on_conflict=on_conflict,
        allow_empty=allow_empty,
        label=label,
    )


def _check_rule_fields(c: _RuleChecker) -> None:
    """Keys that are not rule fields; a parameter of the regularizer written beside ``params`` gets told so."""
    for key in c.raw:
        if key in RULE_KEYS:
            continue
        if c.reg_params is not None and key in c.reg_params:
            hint = f"; {key!r} is a parameter of {c.regularizer}, put it under 'params'"
        else:
            hint = did_you_mean(str(key), RULE_KEYS)
        c.fail(str(key), f"is not a rule field{hint} (rule fields: {_fmt_list(RULE_KEYS)})", (key,))


def _check_regularizer(c: _RuleChecker) -> None:
    regularizer = c.regularizer
    if "regularizer" not in c.raw:
        c.fail("regularizer", "is required: the registry name of the regularizer to place", ())
    elif not isinstance(regularizer, str) or not regularizer:
        c.fail("regularizer", f"must be a registry name (a string), got {regularizer!r}")
    elif c.reg_params is None:
        from timm_drop.regularizers.registry import list_regularizers, not_a_regularizer

        elsewhere = not_a_regularizer(regularizer)
        if elsewhere is not None:
            c.fail("regularizer", f"{regularizer!r} is {elsewhere}")
            return
        names = list_regularizers()
        c.fail(
            "regularizer",
            f"unknown regularizer {regularizer!r}{did_you_mean(regularizer, names)} "
            f"(registered: {', '.join(names) or 'none'})",
        )


def _check_sites(c: _RuleChecker) -> tuple[str, ...]:
    if "sites" not in c.raw:
        c.fail("sites", f"is required: one or more of {_fmt_list(SITE_KINDS)}", ())
        return ()
    return _check_choices(c, c.raw["sites"], "sites", SITE_KINDS, "site kind")


def _check_selectors(
    c: _RuleChecker, sites: tuple[str, ...]
) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None, tuple[str, ...]]:
    """``(name, type, exclude)``; the ``module`` site kind needs a name or type selector."""
    raw = c.raw
    name = _check_patterns(c, raw.get("name"), "name") if raw.get("name") is not None else None
    exclude = _check_patterns(c, raw.get("exclude"), "exclude") if raw.get("exclude") is not None else ()
    type_ = _check_types(c, raw.get("type")) if raw.get("type") is not None else None
    if "module" in sites and name is None and type_ is None:
        c.fail("sites", "site kind 'module' needs a 'name' or 'type' selector saying which modules")
    return name, type_, exclude


def _check_stage_params(c: _RuleChecker, stages: tuple[int, ...] | None) -> dict[int, dict[str, Any]]:
    """Per-stage overrides keyed by int stage; keys must be stages the rule can reach."""
    stage_params: dict[int, dict[str, Any]] = {}
    raw_sp = c.raw.get("stage_params")
    if raw_sp is None:
        return stage_params
    if not isinstance(raw_sp, Mapping):
        c.fail("stage_params", f"must map stage numbers to parameter overrides, got {type(raw_sp).__name__}")
        return stage_params
    for key, override in raw_sp.items():
        stage = _stage_key(key)
        if stage is None:
            c.fail(
                f"stage_params.{key}",
                f"stage keys must be non-zero integers (1-based, stem excluded; -1 = the last), got {key!r}",
                ("stage_params", key),
            )
            continue
        if stage in stage_params:
            c.fail(f"stage_params.{stage}", f"stage {stage} is given twice (as {key!r} and as an int)")
            continue
        # a key counted from the other end than the stages is checked against the model (timm_drop.relative)
        if stages is not None and stage not in stages and all((s < 0) == (stage < 0) for s in stages):
            c.fail(
                f"stage_params.{stage}",
                f"stage {stage} is not among the rule's stages {list(stages)}, so it would never apply",
                ("stage_params", key),
            )
        checked = _check_params(c, override, f"stage_params.{stage}", path=("stage_params", key))
        if checked is not None:
            stage_params[stage] = checked
    return stage_params


def _check_depth_scaling(c: _RuleChecker) -> str | None:
    depth_scaling = c.raw.get("depth_scaling")
    if depth_scaling is None:
        return None
    if depth_scaling not in DEPTH_SCALINGS:
        c.fail(
            "depth_scaling",
            f"must be one of {_fmt_list(DEPTH_SCALINGS)} or left out, got {depth_scaling!r}"
            f"{did_you_mean(str(depth_scaling), DEPTH_SCALINGS)}",
        )
    elif c.reg_params is not None and not any(p in c.reg_params for p in STRENGTH_PARAMS):
        c.fail(
            "depth_scaling",
            f"{c.regularizer} has no strength parameter ({_fmt_list(STRENGTH_PARAMS)}) to scale with depth",
        )
    return depth_scaling


def _check_schedule(c: _RuleChecker) -> Schedule | None:
    raw = c.raw.get("schedule")
    if raw is None:
        return None
    try:
        return make_schedule(_plain(raw))
    except (TypeError, ValueError) as exc:
        c.fail("schedule", _sentence(str(exc)) + _numeric_string_hint(raw))
        return None


def _check_one_of(c: _RuleChecker, fld: str, choices: tuple[str, ...], default: str) -> Any:
    value = c.raw.get(fld, default)
    if value not in choices:
        c.fail(fld, f"must be one of {_fmt_list(choices)}, got {value!r}{did_you_mean(str(value), choices)}")
    return value


def _check_norm_position(c: _RuleChecker, sites: tuple[str, ...]) -> Any:
    norm_position = _check_one_of(c, "norm_position", NORM_POSITIONS, "after_norm")
    if norm_position in NORM_POSITIONS[1:] and sites and "norm" not in sites:
        c.fail("norm_position", f"{norm_position!r} only applies to 'norm' sites, and this rule has none")
    return norm_position


def _known_params(regularizer: Any) -> dict[str, Any] | None:
    """The registered regularizer's parameters and defaults, or None if the name is not registered."""
    if not isinstance(regularizer, str) or not regularizer:
        return None
    from timm_drop.regularizers.registry import list_regularizers, regularizer_params

    if regularizer not in list_regularizers():
        return None
    return regularizer_params(regularizer)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _sentence(message: str) -> str:
    return message.strip().rstrip(".")


def _numeric_string_hint(value: Any) -> str:
    values = value.values() if isinstance(value, Mapping) else [value]
    for v in values:
        if isinstance(v, str):
            try:
                float(v)
            except ValueError:
                continue
            return (
                f" (the value {v!r} is a string: PyYAML reads exponent numbers without a dot, like 1e-3, as "
                "strings; write 1.0e-3)"
            )
    return ""


def _check_params(
    c: _RuleChecker, raw: Any, fld: str, path: tuple[Any, ...] | None = None
) -> dict[str, Any] | None:
    """``params`` or one ``stage_params`` override: a mapping of the regularizer's parameter names."""
    path = tuple(_path_steps(fld)) if path is None else path
    reg_params = c.reg_params
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        c.fail(fld, f"must be a mapping of parameter names to values, got {type(raw).__name__} {raw!r}", path)
        return None
    out: dict[str, Any] = {}
    good = True
    for key, value in raw.items():
        if not isinstance(key, str):
            c.fail(fld, f"parameter names must be strings, got {key!r}", path)
            good = False
            continue
        if reg_params is not None and key not in reg_params:
            hint = did_you_mean(key, reg_params)
            c.fail(
                f"{fld}.{key}",
                f"{c.regularizer} has no parameter {key!r}{hint} (it accepts {_fmt_list(reg_params) or 'none'})",
                path + (key,),
            )
            good = False
            continue
        out[key] = value
    return out if good else None


def _check_choices(
    c: _RuleChecker, raw: Any, fld: str, choices: tuple[str, ...], what: str
) -> tuple[str, ...]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        c.fail(fld, f"must be a {what} or a non-empty list of them ({_fmt_list(choices)}), got {raw!r}")
        return ()
    out: list[str] = []
    for i, item in enumerate(items):
        sub = fld if isinstance(raw, str) else f"{fld}[{i}]"
        if not isinstance(item, str) or item not in choices:
            hint = did_you_mean(item, choices) if isinstance(item, str) else ""
            c.fail(sub, f"unknown {what} {item!r}{hint} (choose from {_fmt_list(choices)})")
        elif item not in out:
            out.append(item)
    return tuple(out)


def _check_stages(c: _RuleChecker, raw: Any) -> tuple[int, ...] | None:
    if raw is None:
        return None
    items = [raw] if isinstance(raw, int) and not isinstance(raw, bool) else raw
    if not isinstance(items, list) or not items:
        c.fail(
            "stages",
            f"must be a non-zero integer or a non-empty list of them (1-based, stem excluded; -1 = the last), got {raw!r}; "
            "leave it out to select every stage",
        )
        return None
    good = True
    for i, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, int) or item == 0:
            sub = "stages" if items is not raw else f"stages[{i}]"
            c.fail(sub, f"stages are non-zero integers (1-based, stem excluded; -1 = the last), got {item!r}")
            good = False
    return tuple(sorted(set(items))) if good else None


def _stage_key(key: Any) -> int | None:
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key if key != 0 else None
    if isinstance(key, str) and key.strip().lstrip("-").isdigit() and int(key) != 0:  # "-2": counted from the end
        return int(key)
    return None


def _as_str_list(c: _RuleChecker, raw: Any, fld: str, what: str) -> list[tuple[str, str]] | None:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        c.fail(fld, f"must be {what} or a non-empty list of them, got {raw!r}")
        return None
    out = []
    for i, item in enumerate(items):
        sub = fld if isinstance(raw, str) else f"{fld}[{i}]"
        if not isinstance(item, str) or not item.strip():
            c.fail(sub, f"must be a non-empty string, got {item!r}")
            continue
        out.append((sub, item))
    return out


def _check_patterns(c: _RuleChecker, raw: Any, fld: str) -> tuple[str, ...]:
    items = _as_str_list(c, raw, fld, "a glob or 're:<regex>' pattern")
    if items is None:
        return ()
    for sub, pattern in items:
        if pattern.startswith(REGEX_PREFIX):
            body = pattern[len(REGEX_PREFIX) :]
            if not body:
                c.fail(sub, "'re:' must be followed by a regular expression")
                continue
            try:
                re.compile(body)
            except re.error as exc:
                c.fail(sub, f"invalid regular expression {body!r}: {exc}")
    return tuple(p for _, p in items)


def _check_types(c: _RuleChecker, raw: Any) -> tuple[str, ...]:
    items = _as_str_list(c, raw, "type", "a class name")
    if items is None:
        return ()
    for sub, name in items:
        if not _QUALIFIED_NAME.fullmatch(name):
            c.fail(
                sub, f"must be a class name like 'BatchNorm2d' or 'timm.layers.BatchNormAct2d', got {name!r}"
            )
    return tuple(n for _, n in items)


def _check_buildable(
    c: _RuleChecker,
    params: dict[str, Any],
    stage_params: dict[int, dict[str, Any]],
    stages: tuple[int, ...] | None,
) -> None:
    """Build the regularizer for each distinct merged parameter set the rule can produce."""
    import inspect

    from timm_drop.regularizers.registry import create_regularizer

    regularizer, reg_params = c.regularizer, c.reg_params or {}
    # Which stages use the base params alone (None) and which an override.
    if stages is None:
        contexts: list[int | None] = [None, *sorted(stage_params)]
    else:
        contexts = sorted(
            {s if s in stage_params else None for s in stages}, key=lambda s: -1 if s is None else s
        )
    required = [p for p, default in reg_params.items() if default is inspect.Parameter.empty]
    for stage in contexts:
        override = stage_params.get(stage, {}) if stage is not None else {}
        merged = _relative_placeholders(c, {**params, **override}, override, stage)
        missing = [p for p in required if p not in merged]
        if missing:
            if stage is None:
                why = ""
                if stages is None and stage_params:
                    why = "; with no 'stages', the base params serve every stage without an override"
                c.fail("params", f"{regularizer} needs {_fmt_list(missing)} (no default){why}", ("params",))
            else:
                c.fail(
                    f"stage_params.{stage}",
                    f"{regularizer} needs {_fmt_list(missing)} (no default); set it in 'params' or in this override",
                    ("stage_params", _raw_stage_key(c.raw, stage)),
                )
            continue
        try:
            create_regularizer(regularizer, **merged)
        except Exception as exc:  # the regularizer's own validation is the source of truth
            _report_build_error(c, exc, merged, override, stage)


def _relative_placeholders(
    c: _RuleChecker, merged: dict[str, Any], override: dict[str, Any], stage: int | None
) -> dict[str, Any]:
    """``merged`` with each relative size (``block_size: {fraction: 0.5}``, resolved per site when planned) checked
    and replaced by 1 for the build check."""
    from timm_drop.relative import check_relative_size, is_relative_size

    for key, value in merged.items():
        if is_relative_size(value):
            problem = check_relative_size(value)
            if problem is not None:
                fld = f"stage_params.{stage}.{key}" if key in override else f"params.{key}"
                c.fail(fld, problem)
            merged[key] = 1
    return merged


def _raw_stage_key(raw: Mapping[str, Any], stage: int) -> Any:
    for key in raw.get("stage_params") or {}:
        if _stage_key(key) == stage:
            return key
    return stage


def _report_build_error(
    c: _RuleChecker,
    exc: Exception,
    merged: dict[str, Any],
    override: dict[str, Any],
    stage: int | None,
) -> None:
    """Put a regularizer's refusal on the field it concerns: a :class:`ParamError` names its parameter, which
    is found in this stage's override or else in ``params``; any other error goes on the container."""
    from timm_drop.regularizers.base import ParamError

    message = _sentence(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))
    culprit = exc.param if isinstance(exc, ParamError) and exc.param in merged else None
    if culprit is not None:
        message = message.removeprefix(culprit + " ")  # the field already names it
    if culprit is None:
        fld = "params" if stage is None else f"stage_params.{stage}"
        path: tuple[Any, ...] = (
            ("params",) if stage is None else ("stage_params", _raw_stage_key(c.raw, stage))
        )
        hint = _numeric_string_hint(merged)
    elif culprit in override:
        fld = f"stage_params.{stage}.{culprit}"
        path = ("stage_params", _raw_stage_key(c.raw, stage), culprit)
        hint = _numeric_string_hint(merged[culprit])
    else:
        fld = f"params.{culprit}"
        path = ("params", culprit)
        hint = _numeric_string_hint(merged[culprit])
    if not message:
        message = f"{c.regularizer} refused these parameters ({type(exc).__name__})"
    c.fail(fld, message + hint, path)
