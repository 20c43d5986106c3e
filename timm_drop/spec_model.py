"""The spec's data model: the rule fields as data, a placement :class:`Rule`, a :class:`Spec`, :class:`SpecError`.

:func:`timm_drop.spec.load_spec` builds these from YAML or dicts (after :mod:`timm_drop.spec_checks` validated
every field); the rewriter and planner read them. Each rule field is declared once, on :class:`Rule`, with its
type, default, allowed values and help (:data:`RULE_FIELDS`): validation, the error messages and the docs' field
table read it from there.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import yaml

from timm_drop.fields import FieldDoc, documented, field_docs
from timm_drop.problems import Problem, ProblemsError
from timm_drop.schedules import Schedule
from timm_drop.structure import match_pattern

__all__ = [
    "DEPTH_SCALINGS",
    "NORM_POSITIONS",
    "ON_CONFLICT",
    "RULE_FIELDS",
    "RULE_KEYS",
    "SITE_KINDS",
    "SITE_KIND_HELP",
    "TOP_LEVEL_KEYS",
    "Rule",
    "Spec",
    "SpecError",
    "SpecProblem",
]

#: Where a regularizer goes for each site kind (the docs' site table is generated from this).
SITE_KIND_HELP: dict[str, str] = {
    "stage": "on a `feature_info` stage output",
    "block": "after each block of a stage",
    "residual": "on the branch operand of a skip add, before the add (where DropPath goes)",
    "shortcut": "on the identity / projection operand of a skip add",
    "merge": "on the add's output",
    "norm": "after a normalization layer",
    "module": "after modules chosen by `name` / `type`",
}
SITE_KINDS: tuple[str, ...] = tuple(SITE_KIND_HELP)
DEPTH_SCALINGS: tuple[str, ...] = ("linear",)
NORM_POSITIONS: tuple[str, ...] = ("after_norm", "after_act")
ON_CONFLICT: tuple[str, ...] = ("error", "stack", "replace")
TOP_LEVEL_KEYS: tuple[str, ...] = ("rules", "version", "description")
SPEC_VERSIONS: tuple[int, ...] = (1,)


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------
class SpecError(ProblemsError):
    """A spec that cannot be used. ``problems`` lists everything found, each naming rule, field and line.

    The message reads ``spec x.yaml, line 7: rule 1 (dropblock), field 'params.drop_prob': ...``.
    """

    def __init__(self, source: str, problems: Sequence[Problem] | Problem | str | None = None):
        if problems is None:
            # SpecError("whole message"): raised by code that has no structured problem to report
            self.source, self.problems = "", (Problem(source),)
            ValueError.__init__(self, source)
            return
        if isinstance(problems, str):
            problems = [Problem(problems, source=source)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.source = source
        super().__init__(problems)

    @staticmethod
    def _what(p: Problem) -> str:
        where = [p.section] if p.section else []
        if p.field:
            where.append(f"field {p.field!r}")
        head = ", ".join(where)
        return f"{head}: {p.message}" if head else p.message

    def _one(self, problem: Problem) -> str:
        place = problem.place()
        return f"spec {self.source}{', ' + place if place else ''}: {self._what(problem)}"

    def _heading(self) -> str:
        return f"spec {self.source} has {len(self.problems)} problems:"

    def _item(self, problem: Problem) -> str:
        place = problem.place()
        return f"{place + ': ' if place else ''}{self._what(problem)}"


def SpecProblem(  # noqa: N802 - the old class name, kept for callers that build problems by hand
    message: str,
    rule: str | None = None,
    field: str | None = None,
    line: int | None = None,
    column: int | None = None,
) -> Problem:
    """A spec :class:`~timm_drop.problems.Problem` (the name and arguments of the old spec-only class)."""
    return Problem(message, field=field, section=rule, line=line, column=column)


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

    index: int  # 0-based place in the spec; not a field of the document
    regularizer: str = documented(
        help="registry name of the regularizer to place (timm_drop.list_regularizers())", type="str"
    )
    params: Mapping[str, Any] = documented(
        help="the regularizer's parameters, checked by building it once per distinct parameter set",
        type="mapping",
        shown_default={},
    )
    sites: tuple[str, ...] = documented(
        help="where regularizers go: after a stage, each block, a skip add's branch or identity operand, its "
        "output, a norm layer, or modules chosen by name/type",
        type="str or list of str",
        choices=SITE_KINDS,
    )
    stages: tuple[int, ...] | None = documented(
        None,
        help="1-based stage numbers (stem excluded, from model.feature_info), negative ones counted from the end (-1 = the last); null = every stage",
        type="int or list of int",
    )
    name: tuple[str, ...] | None = documented(
        None,
        help="globs over qualified module names, full match ('layer1' never hits 'layer10'); 're:' prefix = regex",
        type="str or list of str",
    )
    type: tuple[str, ...] | None = documented(
        None,
        help="class names matched through the class hierarchy ('BatchNorm2d' also selects BatchNormAct2d)",
        type="str or list of str",
    )
    exclude: tuple[str, ...] = documented(
        (), help="module names to leave out, in the syntax of 'name'", type="str or list of str"
    )
    stage_params: Mapping[int, Mapping[str, Any]] = documented(
        factory=dict,
        help="per-stage parameter overrides keyed by stage number ({3: {drop_prob: 0.025}})",
        type="mapping",
    )
    depth_scaling: str | None = documented(
        None,
        help="scale the strength by (i+1)/n over the rule's sites in depth order, like timm's drop-path rates",
        type="str",
        choices=DEPTH_SCALINGS,
    )
    schedule: Schedule | None = documented(
        None,
        help="strength over training: {kind: linear, start, end, initial}, {kind: curriculum, gamma} or constant; "
        "steps: N makes it count its own training forwards",
        type="mapping or str",
    )
    norm_position: str = documented(
        "after_norm",
        help="for 'norm' sites: after the norm (between norm and act in timm's fused BatchNormAct2d) or after the act",
        type="str",
        choices=NORM_POSITIONS,
    )
    on_conflict: str = documented(
        "error",
        help="when an earlier rule holds the same site: refuse, add a second regularizer after it, or take it over",
        type="str",
        choices=ON_CONFLICT,
    )
    allow_empty: bool = documented(
        False, help="accept a rule that matches no site (otherwise an error naming the nearest names)", type="bool"
    )
    label: str | None = documented(None, help="a name for the rule in plans, summaries and errors", type="str")

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

    def __iter__(self) -> Iterator[Rule]:
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


#: every rule field with its YAML type, default, allowed values and help, in the documented order
RULE_FIELDS: tuple[FieldDoc, ...] = field_docs(Rule)
RULE_KEYS: tuple[str, ...] = tuple(f.name for f in RULE_FIELDS)
#: the same, by name
RULE_FIELD: Mapping[str, FieldDoc] = MappingProxyType({f.name: f for f in RULE_FIELDS})
