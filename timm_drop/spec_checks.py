"""Validation of a spec's data: every problem in every rule found and reported at once, each located.

:func:`validate_spec` checks plain data (from YAML or a dict) field by field against the rule fields' definitions
(:data:`timm_drop.spec_model.RULE_FIELDS`) and the regularizer registry, and builds the :class:`Spec`. Problems
go to one :class:`~timm_drop.problems.Report` that names the rule (``rule 2 (dropblock)``, 1-based), the field
(``stage_params.3.drop_prob``) and, for YAML input, its line; they are raised together as one :class:`SpecError`.
The format and the choices where it could be read more than one way are described in :mod:`timm_drop.spec`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from timm_drop.problems import Problem, Report, YamlLocator
from timm_drop.schedules import Schedule, make_schedule
from timm_drop.spec_model import (
    RULE_FIELD,
    RULE_KEYS,
    SPEC_VERSIONS,
    TOP_LEVEL_KEYS,
    Rule,
    Spec,
    SpecError,
)
from timm_drop.structure import REGEX_PREFIX
from timm_drop.suggest import did_you_mean

__all__ = ["MAX_RULES", "validate_spec"]

#: rules in one spec: each one builds regularizers to check its parameters, so a runaway list would cost minutes
MAX_RULES: int = 1_000
_QUALIFIED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _fmt_list(items: Iterable[Any]) -> str:
    return ", ".join(repr(i) for i in items)


class _SpecReport(Report):
    """The spec's problems with their location: rule, field and, for YAML input, the field's line."""

    def __init__(self, source: str, root: yaml.Node | None):
        super().__init__(functools.partial(SpecError, source))
        self.source = source
        self.yaml = YamlLocator(root)

    def add(
        self, message: str, path: tuple[Any, ...] = (), rule: str | None = None, fld: str | None = None
    ) -> None:
        line = self.yaml.line(path)
        problem = Problem(message, field=fld, section=rule, source=self.source, line=line)
        self.record(problem, self._order(line, path))

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
            problem = Problem(message, field=fld, section=rule, source=self.source, line=line)
            self.record(problem, (line, 0, 0))


def validate_spec(data: Any, source: str, root: yaml.Node | None = None) -> Spec:
    """The :class:`Spec` that ``data`` describes, or a :class:`SpecError` listing every problem in it.

    ``source`` names the spec in messages; ``root`` is the composed YAML node tree when ``data`` came from YAML
    text (for line numbers and repeated keys).
    """
    report = _SpecReport(source, root)
    report.check_duplicate_keys()
    _check_top_level(data, report)
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
    rules = _check_rules(data, report)
    report.raise_if_any()
    return Spec(rules=tuple(rules), source=source, description=description, version=int(version))


def _check_top_level(data: Any, report: _SpecReport) -> None:
    """A mapping of top-level keys; anything else stops here (nothing below could be read)."""
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


def _check_rules(data: Mapping[str, Any], report: _SpecReport) -> list[Rule]:
    """The ``rules`` list (or a single rule mapping), each rule checked field by field."""
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
    return rules


# ---------------------------------------------------------------------------------------------------------
# One rule
# ---------------------------------------------------------------------------------------------------------
class _RuleChecker:
    """One rule's raw mapping, its registered parameters (None when the regularizer is unknown) and the
    problems found in it, each reported with the rule's name and the field."""

    def __init__(self, index: int, raw: Mapping[str, Any], report: _SpecReport, path: tuple[Any, ...]):
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


def _parse_rule(index: int, raw: Any, report: _SpecReport, path: tuple[Any, ...]) -> Rule | None:
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
    on_conflict = _check_one_of(c, "on_conflict")
    allow_empty = _check_plain(c, "allow_empty")
    label = _check_plain(c, "label")

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
    kinds = RULE_FIELD["sites"].choices
    if "sites" not in c.raw:
        c.fail("sites", f"is required: one or more of {_fmt_list(kinds)}", ())
        return ()
    return _check_choices(c, c.raw["sites"], "sites", kinds, "site kind")


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
    from timm_drop.regularizers.registry import strength_params  # imported lazily, like the other checks

    depth_scaling = c.raw.get("depth_scaling")
    if depth_scaling is None:
        return None
    scalings = RULE_FIELD["depth_scaling"].choices
    if depth_scaling not in scalings:
        c.fail(
            "depth_scaling",
            f"must be one of {_fmt_list(scalings)} or left out, got {depth_scaling!r}"
            f"{did_you_mean(str(depth_scaling), scalings)}",
        )
    elif c.reg_params is not None and not strength_params(c.regularizer):
        c.fail(
            "depth_scaling",
            f"{c.regularizer} has no strength parameter to scale with depth (its class declares strength_params = ())",
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


def _check_one_of(c: _RuleChecker, fld: str) -> Any:
    """A field with a fixed set of values (its definition's ``choices``; left out, its ``default``)."""
    choices = RULE_FIELD[fld].choices
    value = c.raw.get(fld, RULE_FIELD[fld].default)
    if value not in choices:
        c.fail(fld, f"must be one of {_fmt_list(choices)}, got {value!r}{did_you_mean(str(value), choices)}")
    return value


#: the plain YAML types of rule fields (their definitions' ``type``): the Python type and the words for it
_PLAIN_TYPES: dict[str, tuple[type, str]] = {"bool": (bool, "true or false"), "str": (str, "a string")}


def _check_plain(c: _RuleChecker, fld: str) -> Any:
    """A bool or string field, typed by its definition; left out, its default (null only where that is null)."""
    doc = RULE_FIELD[fld]
    value = c.raw.get(fld, doc.default)
    tp, words = _PLAIN_TYPES[doc.type]
    if not isinstance(value, tp) and not (value is None and doc.default is None):
        c.fail(fld, f"must be {words}, got {type(value).__name__} {value!r}")
    return value


def _check_norm_position(c: _RuleChecker, sites: tuple[str, ...]) -> Any:
    norm_position = _check_one_of(c, "norm_position")
    if norm_position in RULE_FIELD["norm_position"].choices[1:] and sites and "norm" not in sites:
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
            f"must be a non-zero integer or a non-empty list of them (1-based, stem excluded; -1 = the last), "
            f"got {raw!r}; "
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
