"""The rewriter: puts regularizers at the sites a spec selects, shows the plan first, and undoes it all.

``plan(model, spec)`` is a dry run (it only reads the model) that returns a pure-data :class:`Plan`;
``apply_regularizer`` builds the regularizers, turns the plan into insertions (:mod:`timm_drop.insertions`) and
applies them, mutating the model in place and returning the same object, of the same class;
``strip_regularizers`` undoes the insertions in reverse.

Where each site's regularizer goes, least invasive first: a ``norm`` site with ``norm_position: after_norm`` on a
fused norm+act layer uses its ``drop`` slot; ``residual`` / ``shortcut`` / ``merge`` sites, and ``norm`` sites
whose calling module is traceable, rewrite the module that executes the add (or calls the norm); a ``norm`` inside
an ``nn.Sequential`` gets a hook on the container (norm last) or a pre-hook on the following layer, which SyncBN
conversion keeps; everything else (``stage`` / ``block`` / ``module``, norms called by the root or an opaque
module) gets a forward hook. A hook meant for an ``nn.Sequential`` goes on its last layer (:func:`_hook_owner`):
timm's gradient checkpointing calls a Sequential stage's blocks, never the stage. Every apply also puts in the
unused-rule check (:mod:`timm_drop.unused`), and gives the model a ``__prepare_scriptable__`` for
``torch.jit.script`` (:mod:`timm_drop.scripting`).

Parameters of an entry: ``rule.params_for_stage(site.stage)``; with ``depth_scaling: linear`` the strength
parameters (``drop_prob``, ``q``) are multiplied by ``(i + 1) / n`` over the rule's ``n`` matched sites in depth
order (timm's drop-path rule; the branch sites of one stage output count as one). Each regularizer gets
``schedule = rule.schedule`` (left at full strength until the first ``set_progress``, see
:mod:`timm_drop.schedules`) and ``set_layout(site.layout)``; a layout it does not accept
is an error naming the site, its layout and the rule. A method that needs a 2-D map (``grid_layouts``: DropBlock,
CorrDrop) at an ``NLC`` token site first gets the model's patch grid (:func:`timm_drop.structure.token_grid`) through
``set_token_grid`` when the site's sequence is exactly the prefix tokens plus that grid; otherwise (no patch embed,
a dynamic image size, patch dropout, pooled or downsampled tokens) the site is refused with the reason.

Conflicts: when a rule selects a site that an earlier rule already holds, the *later* rule's ``on_conflict``
decides: ``error`` (default) raises naming both rules and the site, ``stack`` runs both (earlier rule first),
``replace`` drops the earlier rules' regularizers at that site. Sites of different kinds never conflict, even
when they carry the same tensor (the last block's output is also its stage's output).

A second ``apply_regularizer`` on the same model is refused unless ``stack=True``. DDP / DataParallel / FSDP
wrapped and ``torch.compile``d models (the wrapper, or ``module.compile()`` in place) are refused: apply first, then
SyncBN, optimizer, ``accelerator.prepare``, compile. A model on the meta device is planned and applied on shapes.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
from torch import fx, nn

from timm_drop.errors import RewriteError
from timm_drop.insertions import WatchInsertion
from timm_drop.names import LEGACY_PLAN, PLANS, RECORD
from timm_drop.placements import placement_request, resolve_placement
from timm_drop.plans import Built, Plan, PlanEntry, applied_plans, check_fits, model_name, model_tree
from timm_drop.record import Insertion, insertion_kind, record_of, strip_regularizers
from timm_drop.regularizers.base import Regularizer
from timm_drop.regularizers.registry import create_regularizer, get_regularizer_class, strength_params
from timm_drop.relative import (
    is_relative_size,
    map_hw,
    reference_hw,
    resolve_relative_sizes,
    resolve_stages,
    stage_count,
)
from timm_drop.scripting import ScriptableCopy
from timm_drop.sites import SKIP_KINDS, Analysis, RewriteTarget, Site, analyze_model, rewrite_target
from timm_drop.spec import REGEX_PREFIX, Rule, Spec, load_spec
from timm_drop.structure import (
    feature_info,
    feature_module,
    is_norm,
    stage_source,
    timm_models_inside,
    token_grid,
    wrapper_kind,
)
from timm_drop.suggest import nearest
from timm_drop.unused import heartbeat_of

# Plan, PlanEntry (timm_drop.plans), RewriteError (timm_drop.errors), strip_regularizers (timm_drop.record):
# re-exported under their old home
__all__ = ["Plan", "PlanEntry", "RewriteError", "apply_regularizer", "applied_plans", "plan", "strip_regularizers"]


# ---------------------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------------------
def _rule_selects(rule: Rule, site: Site, module: nn.Module) -> bool:
    if site.kind not in rule.sites or not rule.matches_stage(site.stage):
        return False
    names = (site.module, site.path) if site.kind in SKIP_KINDS else (site.module,)
    if not any(rule.matches_name(n) for n in names):
        return False
    if any(rule.is_excluded(n) for n in names):
        return False
    return rule.matches_type(module)


def _no_match_error(
    rule: Rule, model: nn.Module, analysis: Analysis, opaque: dict[str, str], spec: Spec
) -> RewriteError:
    named = dict(model.named_modules())
    kinds = ", ".join(rule.sites)
    parts = [f"{spec.source}: {rule.describe()} matched no site (sites: [{kinds}]"]
    if rule.stages is not None:
        parts[0] += f", stages: {list(rule.stages)}"
    if rule.name is not None:
        parts[0] += f", name: {list(rule.name)}"
    if rule.type is not None:
        parts[0] += f", type: {list(rule.type)}"
    parts[0] += ")"
    if set(rule.sites) & set(SKIP_KINDS):
        reasons = [
            f"residual sites unavailable in {n}: {r}"
            for n, r in opaque.items()
            if rule.matches_name(n)
            and rule.matches_type(named[n])
            and rule.matches_stage(analysis.module_stage.get(n))
        ]
        if reasons:
            more = f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else ""
            parts.append("; ".join(reasons[:3]) + more)
    if "stage" in rule.sites:
        parts += _stage_gaps(model, analysis)
    if rule.name is not None:
        candidates = [n for n in named if n]
        near: list[str] = []
        for pattern in rule.name:
            near += nearest(pattern.removeprefix(REGEX_PREFIX), candidates)
        if near:
            parts.append(f"nearest module names: {', '.join(dict.fromkeys(near))}")
    kinds_found = sorted({s.kind for s in analysis.sites})
    parts.append(
        f"site kinds in this model: {', '.join(kinds_found)}; set allow_empty: true to accept no match"
    )
    return RewriteError(". ".join(parts))


def _stage_gaps(model: nn.Module, analysis: Analysis) -> list[str]:
    """Why ``feature_info`` entries gave no stage site: a stage whose output is neither one tensor nor a list /
    tuple holding a tensor with a layout (a list of tensors gets a site per branch, see :mod:`timm_drop.sites`),
    or a module this model does not hold or run (a features_only wrapper that rebuilt the outputs)."""
    with_site = {s.module for s in analysis.sites if s.kind == "stage"}
    multi = [f"{n} (stage {k})" for n, k in analysis.stages.items() if k is not None and n not in with_site]
    missing = [d["module"] for d in feature_info(model) if feature_module(model, d["module"]) is None]
    parts = []
    inside = timm_models_inside(model)
    if len(inside) > 1:
        parts.append(
            f"{type(model).__name__} has no feature_info and holds several timm models ({', '.join(inside)}), so "
            f"its stage numbers are ambiguous; select one model's modules by name instead (e.g. sites: [block], "
            f"name: ['{inside[0]}.*'])"
        )
    elif not analysis.stages and stage_source(model) is None:
        parts.append(f"{type(model).__name__} has no feature_info and holds no timm model that has one")
    if multi:
        parts.append(
            f"stage modules whose output is not a tensor or a list/tuple of tensors with a layout: "
            f"{', '.join(multi)}; select the tensors inside them with block, norm or module sites instead"
        )
    if missing:
        parts.append(f"feature_info names modules this {type(model).__name__} does not hold: {', '.join(missing)}")
    return parts


class _Targets:
    """The rewrite targets one planning run looked at (verified graphs, or why a module is opaque); a cache
    local to that run, so planning never writes into the shared :class:`Analysis`."""

    def __init__(self, model: nn.Module, analysis: Analysis):
        self.model, self.analysis = model, analysis
        self.found: dict[str, tuple[RewriteTarget | None, str | None]] = {}
        self._twins: dict[Any, Any] = {}

    def get(self, name: str) -> tuple[RewriteTarget | None, str | None]:
        if name not in self.found:
            self.found[name] = rewrite_target(self.model, self.analysis, name, self._twins)
        return self.found[name]

    @property
    def opaque(self) -> dict[str, str]:
        more = {n: reason for n, (t, reason) in self.found.items() if t is None and reason}
        return {**self.analysis.opaque, **more}


def _norm_insertion(model: nn.Module, site: Site, rule: Rule, targets: _Targets) -> tuple[str, str]:
    """(insertion, owner) for a norm site: the ``drop`` slot, a rewrite of its caller, or a hook."""
    norm = model.get_submodule(site.module)
    if (
        rule.norm_position == "after_norm"
        and isinstance(getattr(norm, "drop", None), nn.Module)
        and hasattr(norm, "act")
    ):
        return "slot", site.module
    analysis = targets.analysis
    parts = site.module.split(".")
    for i in range(len(parts) - 1, 0, -1):
        caller = ".".join(parts[:i])
        lg = analysis.graphs.get(caller)
        if lg is None:
            if caller in analysis.opaque:
                break
            continue
        rel = ".".join(parts[i:])
        if any(n.op == "call_module" and n.target == rel for n in lg.eval_graph.nodes):
            if targets.get(caller)[0] is not None:
                return "rewrite", caller
            break
    # Inside an nn.Sequential: hook the container (norm last) or pre-hook the next layer, which SyncBN
    # conversion keeps, instead of the norm itself.
    parent_name, _, local = site.module.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if parent_name and type(parent).forward is nn.Sequential.forward and analysis.calls.get(site.module) == 1:
        keys = [k for k, v in parent._modules.items() if v is not None]
        i = keys.index(local)
        if i == len(keys) - 1:
            return "hook", parent_name
        following = f"{parent_name}.{keys[i + 1]}"
        if analysis.calls.get(following) == 1:
            return "pre_hook", following
    return "hook", site.module


def _site_params(rule: Rule, site: Site, i: int, n: int) -> dict[str, Any]:
    """The rule's parameters at its ``i``-th of ``n`` sites: per-stage overrides, then depth scaling."""
    params = rule.params_for_stage(site.stage)
    if rule.depth_scaling == "linear":
        try:
            scaled = strength_params(rule.regularizer)  # what the method's class declares
        except KeyError:  # an unknown name is reported by _make_regularizer
            scaled = ()
        for k in scaled:
            if isinstance(params.get(k), (int, float)) and not isinstance(params.get(k), bool):
                params[k] = float(params[k]) * (i + 1) / n
    return params


def _resolve_sizes(
    model: nn.Module, rule: Rule, site: Site, params: dict[str, Any], grid: Any, analysis: Analysis
) -> dict[str, Any]:
    """Relative sizes (``block_size: {fraction: 0.5}``) resolved on this site's map (:mod:`timm_drop.relative`)."""
    if not any(is_relative_size(v) for v in params.values()):
        return params  # the usual case: no walk over the model's modules and sites for every site
    used = tuple(analysis.input_shape[-2:]) if len(analysis.input_shape) == 4 else (0, 0)
    ref = reference_hw(model, used, analysis.example_given)
    # the group's resolution, as the papers quote sizes: the site's stage output (a block's first conv still runs
    # at the previous stage's resolution); a site outside any stage, or whose stage output is no map: its own map
    out = next((s for s in analysis.sites if s.kind == "stage" and s.stage == site.stage and s.branch is None), None)
    hw = map_hw(out.shape, out.layout, None) if out is not None and site.stage is not None else None
    hw = hw or map_hw(site.shape, site.layout, grid)
    return resolve_relative_sizes(params, hw, used, ref, f"{rule.describe()} at site {site.name}")


def _site_grid(
    model: nn.Module, rule: Rule, site: Site, grids: dict[int, tuple[tuple[int, int], int] | str]
) -> tuple[tuple[int, int] | None, int]:
    """``(grid, num_prefix_tokens)`` for a site whose regularizer needs a 2-D map of ``NLC`` tokens (else
    ``(None, 0)``); refuses, naming the site, where its tokens are not the model's prefix tokens + patch grid."""
    try:
        needs = getattr(get_regularizer_class(rule.regularizer), "grid_layouts", ())
    except KeyError:  # an unknown name is reported by _make_regularizer
        return None, 0
    if site.layout != "NLC" or "NLC" not in needs:
        return None, 0
    length = site.shape[1] if site.shape is not None and len(site.shape) == 3 else -1
    if length not in grids:  # one model lookup per rule and sequence length
        grids[length] = token_grid(model, length)
    reason = grids[length]
    if isinstance(reason, tuple):
        return reason
    raise RewriteError(
        f"{rule.describe()}: {rule.regularizer} cannot act at site {site.name} (layout NLC, shape {site.shape}): "
        f"it needs a 2-D map, so the tokens must be a patch grid, and {reason}; exclude it or pick a "
        f"layout-agnostic regularizer"
    )


def _make_regularizer(
    rule: Rule,
    site_name: str,
    layout: str | None,
    shape: Any,
    params: dict[str, Any],
    grid: tuple[tuple[int, int] | None, int] = (None, 0),
) -> nn.Module:
    """Build one regularizer for a site; every refusal names the rule and the site."""
    try:
        reg = create_regularizer(rule.regularizer, **params)
    except (TypeError, ValueError) as exc:
        raise RewriteError(f"{rule.describe()} at site {site_name}: {exc}") from exc
    if layout is None:
        raise RewriteError(
            f"{rule.describe()} selects site {site_name} whose tensor {shape} has no supported layout "
            f"(NCHW, NHWC, NLC, NC); narrow the rule with name/type/exclude"
        )
    if isinstance(reg, Regularizer):
        try:
            if grid[0] is not None:
                reg.set_token_grid(*grid)
            reg.set_layout(layout)
        except ValueError as exc:
            raise RewriteError(
                f"{rule.describe()}: {rule.regularizer} cannot act at site {site_name} (layout {layout}, "
                f"shape {shape}): {exc}; exclude it or pick a layout-agnostic regularizer"
            ) from exc
        reg.schedule = rule.schedule
        reg.rule_label = rule.describe()  # named by warnings and timm_drop.summary
        reg.site_name = site_name
    return reg


def _hook_owner(model: nn.Module, name: str, calls: dict[str, int]) -> str:
    """The module whose forward hook sees ``name``'s output on every path a host takes.

    An ``nn.Sequential`` hands up the output of its last layer, and timm's ``checkpoint_seq`` (gradient
    checkpointing: ``set_grad_checkpointing``) calls the layers of a Sequential stage one by one, never the stage
    itself. So a hook meant for a Sequential goes on its last layer (recursively), where that layer ran as often as
    the Sequential in the shape pass; not on a norm layer (SyncBN conversion replaces norms with their hooks).
    """
    owner = name
    while owner:
        module = model.get_submodule(owner)
        if type(module).forward is not nn.Sequential.forward:
            break
        keys = [k for k, v in module._modules.items() if v is not None]
        if not keys:
            break
        last = f"{owner}.{keys[-1]}"
        if is_norm(module._modules[keys[-1]]) or calls.get(last) != calls.get(owner):
            break
        owner = last
    return owner


def _insertion_for(model: nn.Module, site: Site, rule: Rule, targets: _Targets) -> tuple[str, str]:
    """(insertion kind, owner module) for one site."""
    if site.kind in SKIP_KINDS:
        target, reason = targets.get(site.module)
        if target is None:
            raise RewriteError(f"{rule.describe()}: site {site.name} cannot be rewritten: {reason}")
        return "rewrite", site.module
    if site.kind == "norm":
        kind, owner = _norm_insertion(model, site, rule, targets)
    else:
        kind, owner = "hook", site.module
    return kind, _hook_owner(model, owner, targets.analysis.calls) if kind == "hook" else owner


def _entries_of(
    rule: Rule, model: nn.Module, targets: _Targets, named: dict[str, nn.Module]
) -> list[tuple[PlanEntry, nn.Module]]:
    """The plan entries of one rule, in depth order, each with its regularizer (built once, here)."""
    selected = [s for s in targets.analysis.sites if _rule_selects(rule, s, named[s.module])]
    # the branches of one stage output share one depth position (depth scaling counts the stage once)
    units = list(dict.fromkeys(s.name if s.branch is None else (s.kind, s.module) for s in selected))
    position = {u: i for i, u in enumerate(units)}
    entries: list[tuple[PlanEntry, nn.Module]] = []
    grids: dict[int, tuple[tuple[int, int], int] | str] = {}
    for site in selected:
        unit = site.name if site.branch is None else (site.kind, site.module)
        params = _site_params(rule, site, position[unit], len(units))
        grid = _site_grid(model, rule, site, grids)
        params = _resolve_sizes(model, rule, site, params, grid[0], targets.analysis)
        reg = _make_regularizer(rule, site.name, site.layout, site.shape, params, grid)
        insertion, owner = _insertion_for(model, site, rule, targets)
        entry = PlanEntry(
                site=site.name,
                kind=site.kind,
                stage=site.stage,
                module=site.module,
                shape=site.shape,
                layout=site.layout,
                rule=rule.index,
                rule_label=rule.describe(),
                regularizer=rule.regularizer,
                params=params,
                schedule=str(rule.schedule) if rule.schedule is not None else None,
                insertion=insertion,
                depth=site.depth,
                node=site.node,
                norm_position=rule.norm_position if site.kind == "norm" else None,
                owner=owner,
                token_grid=grid[0],
                num_prefix_tokens=grid[1],
                branch=site.branch,
            )
        entries.append((entry, reg))
    return entries


def _resolve_conflict(rule: Rule, held: list[tuple[PlanEntry, nn.Module]], site: str) -> None:
    """A site already held by earlier rules: the later rule's ``on_conflict`` decides."""
    if not held:
        return
    if rule.on_conflict == "error":
        raise RewriteError(
            f"{rule.describe()} and {held[-1][0].rule_label} both select site {site}; set "
            f"on_conflict: stack or replace on {rule}"
        )
    if rule.on_conflict == "replace":
        held.clear()


def _build(model: nn.Module, spec: Spec, analysis: Analysis) -> Plan:
    named = dict(model.named_modules())
    targets = _Targets(model, analysis)
    held: dict[str, list[tuple[PlanEntry, nn.Module]]] = {}
    for rule in spec.rules:
        rule = resolve_stages(rule, stage_count(analysis.stages))  # stages counted from the end
        pairs = _entries_of(rule, model, targets, named)
        if not pairs and not rule.allow_empty:
            raise _no_match_error(rule, model, analysis, targets.opaque, spec)
        for pair in pairs:
            _resolve_conflict(rule, held.setdefault(pair[0].site, []), pair[0].site)
            held[pair[0].site].append(pair)
    pairs = sorted((p for ps in held.values() for p in ps), key=lambda p: (p[0].depth, p[0].rule))
    entries = [e for e, _ in pairs]
    matches = {r.index: sum(1 for e in entries if e.rule == r.index) for r in spec.rules}
    source = stage_source(model)
    stages_from = f"{source} ({type(model.get_submodule(source)).__name__})" if source else ""
    owners = {e.owner for e in entries if e.insertion == "rewrite"}
    built = Built(weakref.ref(model), [r for _, r in pairs], {o: targets.get(o)[0] for o in owners},
                  dict(analysis.calls))  # fmt: skip
    return Plan(
        entries, list(analysis.sites), targets.opaque, matches, analysis.input_shape, spec.source, stages_from,
        model_name(model), model_tree(model), spec, built,
    )  # fmt: skip


def _refuse(model: nn.Module, stack: bool) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_regularizer needs an nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        where = "the model" if not name else f"submodule {name!r}"
        kind = wrapper_kind(m)
        if kind in ("distributed", "data_parallel"):
            raise RewriteError(
                f"{where} is wrapped in {type(m).__name__}: apply regularizers to the bare model before wrapping "
                f"(order: apply_regularizer -> SyncBN -> optimizer -> accelerator.prepare / DDP -> compile)"
            )
        if kind == "compiled":
            raise RewriteError(
                f"{where} is a torch.compile'd module: apply regularizers before torch.compile "
                f"(to the original module, e.g. compiled._orig_mod)"
            )
        if m.__dict__.get("_compiled_call_impl") is not None:
            # nn.Module.compile(): the module stays, its call is compiled, and the graph compiled before the apply
            # would keep running without the regularizers
            raise RewriteError(
                f"{where} was compiled in place ({type(m).__name__}.compile()): its compiled graph predates the "
                f"regularizers and would keep running without them; apply regularizers before compiling "
                f"(order: apply_regularizer -> SyncBN -> optimizer -> accelerator.prepare / DDP -> compile)"
            )
        if isinstance(m, fx.GraphModule):
            # Its forward is generated code calling only the traced leaves: the stage and block modules it
            # still holds never run, so their sites (hooks, block rewrites) would be silent no-ops.
            raise RewriteError(
                f"{where} is an FX GraphModule ({type(m).__name__}, e.g. features_only=True with "
                f"feature_cls='fx' or create_feature_extractor): apply regularizers to the model first, then build "
                f"the graph from it (FeatureGraphNet(model, out_indices) or create_feature_extractor(model, ...)); "
                f"regularizers stay nodes of that graph"
            )
    if record_of(model) and not stack:
        raise RewriteError(
            f"{type(model).__name__} already carries regularizers from an earlier apply_regularizer; pass "
            f"stack=True to add more, or call strip_regularizers first"
        )


def plan(model: nn.Module, spec: Any, *, example_input: Any = None) -> Plan:
    """Dry run: the table of sites, regularizers and parameters ``apply_regularizer`` would use.

    ``spec`` is a path, YAML string, dict or :class:`~timm_drop.spec.Spec`, or a placement by name
    (:mod:`timm_drop.placements`). The model is not changed. The plan can be applied as it is
    (``apply_regularizer(model, plan)``), without analysing the model again.
    """
    spec = placement_request(spec) or load_spec(spec)  # a placement by name needs the model: resolved below
    _refuse(model, stack=True)
    return _plan_on(model, spec, example_input)


def _plan_on(model: nn.Module, spec: Any, example_input: Any) -> Plan:
    """Analyse ``model`` once and plan ``spec`` (a loaded spec or a placement request) on it."""
    analysis = analyze_model(model, example_input)
    return _build(model, resolve_placement(spec, model, analysis), analysis)


# ---------------------------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------------------------
def _fitting(model: nn.Module, the_plan: Plan, example_input: Any) -> Plan:
    """``the_plan`` with what planning built for ``model``: its own, the first time it is applied to the model it
    was made on; else (a copy, an unpickled plan, another instance of the same model) the plan made again on
    ``model``, which must have the same entries."""
    check_fits(the_plan, model)
    if the_plan.built is not None and the_plan.built.take(model) is not None:
        return the_plan
    if the_plan.spec is None:
        raise RewriteError("this plan carries no spec to be made again from; apply the spec instead")
    fresh = _build(model, load_spec(the_plan.spec), analyze_model(model, example_input))
    if fresh.entries != the_plan.entries:
        diff = next((f"{a.site} ({a.regularizer})" for a, b in zip(the_plan.entries, fresh.entries) if a != b),
                    f"{len(the_plan.entries)} entries planned, {len(fresh.entries)} here")  # fmt: skip
        raise RewriteError(f"this plan does not fit {model_name(model)}: planned again on it, it differs at {diff}")
    fresh.built.take(model)
    return fresh


def _insertions(model: nn.Module, the_plan: Plan, regs: list[nn.Module]) -> list[Insertion]:
    """The plan's entries grouped into insertions, by their kind's class (one per site, or per rewritten module)."""
    groups: dict[tuple[type[Insertion], str], list[tuple[PlanEntry, nn.Module]]] = {}
    for e, reg in zip(the_plan.entries, regs):
        cls = insertion_kind(e.insertion)
        groups.setdefault((cls, cls.group(e)), []).append((e, reg))
    out: list[Insertion] = []
    for (cls, _), pairs in groups.items():
        entries = [p[0] for p in pairs]
        insertion = cls.from_entries(model, entries, [p[1] for p in pairs], the_plan)
        insertion.entries = tuple(entries)
        out.append(insertion)
    return out


def apply_regularizer(
    model: nn.Module, spec: Any, *, example_input: Any = None, stack: bool = False
) -> nn.Module:
    """Put the regularizers a plan or spec asks for into ``model`` in place and return the same object.

    ``spec`` is a :class:`Plan` from :func:`plan` (applied as it is; refused, naming the difference, for a model
    with another module tree) or anything :func:`plan` takes (planned first). See the module docstring for the
    insertion mechanisms and guarantees. ``example_input`` overrides the shape-pass input; ``stack=True`` allows
    a second application on top of an earlier one.
    """
    _refuse(model, stack)
    if isinstance(spec, Plan):
        the_plan = _fitting(model, spec, example_input)
    else:
        the_plan = _plan_on(model, placement_request(spec) or load_spec(spec), example_input)
        the_plan.built.take(model)
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    regs = the_plan.built.regs
    for e, reg in zip(the_plan.entries, regs):
        reg.to(device)
        reg.train(model.get_submodule(e.module).training)
    record = record_of(model)
    rules: dict[str, list[nn.Module]] = {}
    for e, reg in zip(the_plan.entries, regs):
        rules.setdefault(e.rule_label, []).append(reg)
    watch = WatchInsertion(rules, heartbeat_of(model, the_plan.sites, the_plan.built.calls))
    for insertion in [*_insertions(model, the_plan, regs), watch]:
        insertion.apply(model)
        record.append(insertion)
    object.__setattr__(model, RECORD, record)
    object.__setattr__(model, PLANS, [*applied_plans(model), the_plan])
    model.__dict__.pop(LEGACY_PLAN, None)
    object.__setattr__(model, "__prepare_scriptable__", ScriptableCopy(model))  # torch.jit.script: timm_drop.scripting
    return model
