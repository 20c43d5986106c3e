"""The rewriter: puts regularizers at the sites a spec selects, shows the plan first, and undoes it all.

``plan(model, spec)`` is a dry run (it only reads the model); ``apply_regularizer`` mutates the model in place and
returns the same object, of the same class; ``strip_regularizers`` undoes every change.

Insertion, least invasive first (DESIGN §4, §6):

* ``norm`` sites with ``norm_position: after_norm`` on a fused norm+act layer that has timm's ``drop`` slot
  (``BatchNormAct2d`` and friends): the regularizer becomes that ``drop`` module, i.e. it acts between the
  normalization and the activation. A slot already holding a module keeps it and runs it first. This survives
  ``timm.layers.convert_sync_batchnorm`` (it copies ``drop``).
* ``residual`` / ``shortcut`` / ``merge`` sites, and ``norm`` sites whose calling module is traceable: a
  *block-local rewrite*. The module that executes the add (or calls the norm) is FX-traced on its own (see
  :mod:`timm_drop.sites`), ``call_module`` nodes for the regularizers are inserted (before the add on the chosen
  operand, or after the add / norm), the regularizers are registered as children of that module (param-free, so
  ``state_dict`` keys are unchanged), and the instance gets a generated subclass of its own class whose
  ``forward`` is the rewritten graph's code. ``isinstance``, the class name, methods and attributes all stay;
  a module whose forward branches on ``self.training`` gets both graphs and picks by mode. The graph calls its
  children by attribute name at run time, so a later SyncBN conversion of a child is honoured. Caveats: the
  rewritten forward no longer reads config flags the trace resolved (e.g. a block-level ``grad_checkpointing``
  switched on afterwards), and pickling the whole model object (``torch.save(model)``) is not supported while
  rewritten (``state_dict`` is; strip first otherwise).
* ``norm`` sites inside an ``nn.Sequential`` (e.g. ResNet's ``downsample``): a forward hook on the container when
  the norm is its last layer, else a forward pre-hook on the following layer (each run once in the shape pass),
  so that SyncBN conversion, which replaces norm modules together with their hooks, keeps the regularizer.
* ``stage`` / ``block`` / ``module`` sites, and ``norm`` sites whose caller cannot be rewritten (the model root,
  an opaque module): a forward hook on the module whose callable is a bound method of a
  small holder module registered in ``model._timm_drop_regularizers`` (an ``nn.ModuleDict`` on the root), so
  ``copy.deepcopy`` (timm's EMA) rebinds it to the copy's own regularizers. Hooks on plain BatchNorm modules are
  replaced away by SyncBN conversion; convert before applying in that rare case (stem / final norms).

Parameters of an entry: ``rule.params_for_stage(site.stage)``; with ``depth_scaling: linear`` the strength
parameters (``drop_prob``, ``q``) are multiplied by ``(i + 1) / n`` over the rule's ``n`` matched sites in depth
order (timm's drop-path rule). Each regularizer gets ``schedule = rule.schedule`` (left at full strength until the
first ``set_progress``, see :mod:`timm_drop.schedules`) and ``set_layout(site.layout)``; a layout it does not accept is an error naming the site, its layout and
the rule.

Conflicts: when a rule selects a site that an earlier rule already holds, the *later* rule's ``on_conflict``
decides: ``error`` (default) raises naming both rules and the site, ``stack`` runs both (earlier rule first),
``replace`` drops the earlier rules' regularizers at that site. Sites of different kinds never conflict, even
when they carry the same tensor (the last block's output is also its stage's output).

A second ``apply_regularizer`` on the same model is refused unless ``stack=True``. DDP / DataParallel / FSDP
wrapped and ``torch.compile``d models are refused: apply first, then SyncBN, optimizer, ``accelerator.prepare``,
compile.
"""

from __future__ import annotations

import difflib
import itertools
import linecache
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from timm_drop.regularizers.base import Regularizer
from timm_drop.regularizers.registry import create_regularizer
from timm_drop.sites import SKIP_KINDS, Analysis, Site, analyze_model
from timm_drop.spec import STRENGTH_PARAMS, Rule, Spec, load_spec

__all__ = ["Plan", "PlanEntry", "RewriteError", "apply_regularizer", "plan", "strip_regularizers"]

SIDE_DICT = "_timm_drop_regularizers"
_RECORD = "_timm_drop_record"
_counter = itertools.count()


class RewriteError(ValueError):
    """A spec cannot be applied to a model; the message names the rule, site or module involved."""


# ---------------------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------------------
@dataclass
class PlanEntry:
    """One regularizer at one site."""

    site: str
    kind: str
    stage: int | None
    module: str
    shape: tuple[int, ...] | None
    layout: str | None
    rule: int
    rule_label: str
    regularizer: str
    params: dict[str, Any]
    schedule: str | None
    insertion: str  # "slot", "rewrite", "hook" (forward hook on owner) or "pre_hook" (on the next layer)
    depth: int
    node: str | None = None
    norm_position: str | None = None
    owner: str | None = None  # module whose forward is rewritten / whose slot or hook is used
    reg: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "kind": self.kind,
            "stage": self.stage,
            "module": self.module,
            "shape": list(self.shape) if self.shape is not None else None,
            "layout": self.layout,
            "rule": self.rule,
            "rule_label": self.rule_label,
            "regularizer": self.regularizer,
            "params": dict(self.params),
            "schedule": self.schedule,
            "insertion": self.insertion,
            "owner": self.owner,
            "depth": self.depth,
        }


@dataclass
class Plan:
    """What :func:`apply_regularizer` will do: ``entries`` in depth order; ``str(plan)`` is a table."""

    entries: list[PlanEntry]
    sites: list[Site]
    opaque: dict[str, str]
    matches: dict[int, int]  # rule index -> number of entries it produced
    input_shape: tuple[int, ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.entries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "input_shape": list(self.input_shape),
            "entries": [e.to_dict() for e in self.entries],
            "matches": {str(k + 1): v for k, v in self.matches.items()},
            "opaque": dict(self.opaque),
        }

    def __str__(self) -> str:
        head = ("site", "kind", "stage", "shape", "layout", "regularizer", "params", "rule", "insertion")
        rows = []
        for e in self.entries:
            params = ", ".join(f"{k}={_fmt(v)}" for k, v in e.params.items())
            if e.schedule:
                params += f", schedule={e.schedule}"
            rows.append(
                (
                    e.site.split(":", 1)[1],
                    e.kind + (f"({e.norm_position})" if e.kind == "norm" else ""),
                    "-" if e.stage is None else str(e.stage),
                    "x".join(str(s) for s in e.shape[1:]) if e.shape else "?",
                    e.layout or "?",
                    e.regularizer,
                    params,
                    str(e.rule + 1),
                    e.insertion,
                )
            )
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
        line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
        out = [line, "  ".join("-" * w for w in widths)]
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        shape = "x".join(str(s) for s in self.input_shape[1:]) if self.input_shape else "?"
        out.append(
            f"{len(self.entries)} regularizer(s) at {len({e.site for e in self.entries})} site(s); "
            f"shape pass input {shape}"
        )
        if self.opaque:
            names = list(self.opaque)
            out.append(
                f"{len(names)} opaque module(s) (no skip sites inside): "
                + "; ".join(f"{n}: {self.opaque[n]}" for n in names[:3])
                + (" ..." if len(names) > 3 else "")
            )
        return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _rule_selects(rule: Rule, site: Site, module: nn.Module) -> bool:
    if site.kind not in rule.sites or not rule.matches_stage(site.stage):
        return False
    names = (site.module, site.path) if site.kind in SKIP_KINDS else (site.module,)
    if not any(rule.matches_name(n) for n in names):
        return False
    if any(rule.is_excluded(n) for n in names):
        return False
    return rule.matches_type(module)


def _no_match_error(rule: Rule, model: nn.Module, analysis: Analysis, spec: Spec) -> RewriteError:
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
            for n, r in analysis.opaque.items()
            if rule.matches_name(n)
            and rule.matches_type(named[n])
            and rule.matches_stage(analysis.module_stage.get(n))
        ]
        if reasons:
            more = f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else ""
            parts.append("; ".join(reasons[:3]) + more)
    if rule.name is not None:
        candidates = [n for n in named if n]
        near: list[str] = []
        for pattern in rule.name:
            near += difflib.get_close_matches(pattern.removeprefix("re:"), candidates, n=3, cutoff=0.5)
        if near:
            parts.append(f"nearest module names: {', '.join(dict.fromkeys(near))}")
    kinds_found = sorted({s.kind for s in analysis.sites})
    parts.append(
        f"site kinds in this model: {', '.join(kinds_found)}; set allow_empty: true to accept no match"
    )
    return RewriteError(". ".join(parts))


def _norm_insertion(model: nn.Module, site: Site, rule: Rule, analysis: Analysis) -> tuple[str, str]:
    """(insertion, owner) for a norm site: the ``drop`` slot, a rewrite of its caller, or a hook."""
    norm = model.get_submodule(site.module)
    if (
        rule.norm_position == "after_norm"
        and isinstance(getattr(norm, "drop", None), nn.Module)
        and hasattr(norm, "act")
    ):
        return "slot", site.module
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
            ok, _ = analysis.rewritable(model, caller)
            if ok is not None:
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


def _build(model: nn.Module, spec: Spec, analysis: Analysis) -> Plan:
    named = dict(model.named_modules())
    held: dict[str, list[PlanEntry]] = {}
    matches: dict[int, int] = {}
    for rule in spec.rules:
        selected = [s for s in analysis.sites if _rule_selects(rule, s, named[s.module])]
        if not selected and not rule.allow_empty:
            raise _no_match_error(rule, model, analysis, spec)
        matches[rule.index] = len(selected)
        n = len(selected)
        for i, site in enumerate(selected):
            params = rule.params_for_stage(site.stage)
            if rule.depth_scaling == "linear":
                for k in STRENGTH_PARAMS:
                    if isinstance(params.get(k), (int, float)) and not isinstance(params.get(k), bool):
                        params[k] = float(params[k]) * (i + 1) / n
            try:
                reg = create_regularizer(rule.regularizer, **params)
            except (TypeError, ValueError) as exc:
                raise RewriteError(f"{rule.describe()} at site {site.name}: {exc}") from exc
            if site.layout is None:
                raise RewriteError(
                    f"{rule.describe()} selects site {site.name} whose tensor {site.shape} has no supported layout "
                    f"(NCHW, NHWC, NLC, NC); narrow the rule with name/type/exclude"
                )
            if isinstance(reg, Regularizer):
                try:
                    reg.set_layout(site.layout)
                except ValueError as exc:
                    raise RewriteError(
                        f"{rule.describe()}: {rule.regularizer} cannot act at site {site.name} (layout {site.layout}, "
                        f"shape {site.shape}): {exc}; exclude it or pick a layout-agnostic regularizer"
                    ) from exc
                reg.schedule = rule.schedule
                reg.rule_label = rule.describe()
            insertion, owner = "hook", site.module
            if site.kind in SKIP_KINDS:
                lg, reason = analysis.rewritable(model, site.module)
                if lg is None:
                    raise RewriteError(f"{rule.describe()}: site {site.name} cannot be rewritten: {reason}")
                insertion = "rewrite"
            elif site.kind == "norm":
                insertion, owner = _norm_insertion(model, site, rule, analysis)
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
                reg=reg,
            )
            earlier = held.setdefault(site.name, [])
            if earlier:
                if rule.on_conflict == "error":
                    raise RewriteError(
                        f"{rule.describe()} and {earlier[-1].rule_label} both select site {site.name}; set "
                        f"on_conflict: stack or replace on {rule}"
                    )
                if rule.on_conflict == "replace":
                    earlier.clear()
            earlier.append(entry)
    entries = sorted((e for es in held.values() for e in es), key=lambda e: (e.depth, e.rule))
    matches = {k: sum(1 for e in entries if e.rule == k) for k in matches}
    return Plan(entries, analysis.sites, dict(analysis.opaque), matches, analysis.input_shape, spec.source)


def _refuse(model: nn.Module, stack: bool) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_regularizer needs an nn.Module, got {type(model).__name__}")
    wrappers: list[type] = [nn.parallel.DistributedDataParallel, nn.DataParallel]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrappers.append(FullyShardedDataParallel)
    except Exception:
        pass
    try:
        from torch.distributed.fsdp import FSDPModule

        wrappers.append(FSDPModule)
    except Exception:
        pass
    compiled: tuple[type, ...] = ()
    try:
        from torch._dynamo.eval_frame import OptimizedModule

        compiled = (OptimizedModule,)
    except Exception:
        pass
    for name, m in model.named_modules():
        where = "the model" if not name else f"submodule {name!r}"
        if isinstance(m, tuple(wrappers)):
            raise RewriteError(
                f"{where} is wrapped in {type(m).__name__}: apply regularizers to the bare model before wrapping "
                f"(order: apply_regularizer -> SyncBN -> optimizer -> accelerator.prepare / DDP -> compile)"
            )
        if compiled and isinstance(m, compiled):
            raise RewriteError(
                f"{where} is a torch.compile'd module: apply regularizers before torch.compile "
                f"(to the original module, e.g. compiled._orig_mod)"
            )
    if getattr(model, _RECORD, None) and not stack:
        raise RewriteError(
            f"{type(model).__name__} already carries regularizers from an earlier apply_regularizer; pass "
            f"stack=True to add more, or call strip_regularizers first"
        )


def plan(model: nn.Module, spec: Any, *, example_input: Any = None) -> Plan:
    """Dry run: the table of sites, regularizers and parameters ``apply_regularizer`` would use.

    ``spec`` is a path, YAML string, dict or :class:`~timm_drop.spec.Spec`. The model is not changed.
    """
    spec = load_spec(spec)
    _refuse(model, stack=True)
    return _build(model, spec, analyze_model(model, example_input))


# ---------------------------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------------------------
class _SiteHook(nn.Module):
    """Holds the regularizers of one hooked site; its bound methods are the hooks (deepcopy-safe)."""

    _timm_drop_internal = True

    def __init__(self, regs: list[nn.Module]):
        super().__init__()
        self.regs = nn.ModuleList(regs)

    def forward_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        for reg in self.regs:
            output = reg(output)
        return output

    def forward_pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        for reg in self.regs:
            x = reg(x)
        return (x, *args[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for reg in self.regs:
            x = reg(x)
        return x


class _SlotStack(nn.Sequential):
    """A ``drop`` slot that already held a module: that module first, then the regularizers."""

    _timm_drop_internal = True


def _compile_forward(graph: fx.Graph, tag: str) -> Any:
    graph.lint()
    code = graph.python_code(root_module="self")
    filename = f"<timm_drop rewrite {tag} #{next(_counter)}>"
    # linecache makes tracebacks and inspect.getsource work for the generated code (as torch.fx does)
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)
    return namespace["forward"]


def _dual_forward(eval_fwd: Any, train_fwd: Any) -> Any:
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (train_fwd if self.training else eval_fwd)(self, *args, **kwargs)

    return forward


def _unique_attr(module: nn.Module, base: str) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in base)
    name, i = base, 2
    while hasattr(module, name) or name in module._modules:
        name, i = f"{base}_{i}", i + 1
    return name


def _insert(graph: fx.Graph, entries: list[tuple[PlanEntry, str, tuple[str, int, int] | None]]) -> None:
    nodes = {n.name: n for n in graph.nodes}
    for entry, child, add in entries:
        if entry.kind in ("residual", "shortcut"):
            node = nodes[entry.node]
            idx = add[1] if entry.kind == "residual" else add[2]
            with graph.inserting_before(node):
                new = graph.call_module(child, (node.args[idx],))
            node.update_arg(idx, new)
        else:
            if entry.kind == "merge":
                targets = [nodes[entry.node]]
            else:  # norm: every call of that norm in the caller's graph
                rel = entry.module[len(entry.owner) + 1 :]
                targets = [n for n in graph.nodes if n.op == "call_module" and n.target == rel]
            for node in targets:
                # insert after the node and any regularizer already chained after it (stacking keeps order)
                last = node
                while len(last.users) == 1:
                    user = next(iter(last.users))
                    if (
                        user.op == "call_module"
                        and str(user.target).startswith("timm_drop_")
                        and user.meta.get("timm_drop_after") is node
                    ):
                        last = user
                    else:
                        break
                with graph.inserting_after(last):
                    new = graph.call_module(child, (last,))
                new.meta["timm_drop_after"] = node
                last.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)


def apply_regularizer(
    model: nn.Module, spec: Any, *, example_input: Any = None, stack: bool = False
) -> nn.Module:
    """Put the regularizers ``spec`` asks for into ``model`` in place and return the same object.

    See the module docstring for the insertion mechanisms and guarantees. ``example_input`` overrides the
    shape-pass input; ``stack=True`` allows a second application on top of an earlier one.
    """
    spec = load_spec(spec)
    _refuse(model, stack)
    analysis = analyze_model(model, example_input)
    the_plan = _build(model, spec, analysis)
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    named = dict(model.named_modules())
    records: list[tuple[Any, ...]] = list(getattr(model, _RECORD, None) or [])

    for e in the_plan.entries:
        e.reg.to(device)
        e.reg.train(named[e.module].training)

    by_site: dict[tuple[str, str], list[PlanEntry]] = {}
    for e in the_plan.entries:
        by_site.setdefault((e.insertion, e.site), []).append(e)

    # hooks -----------------------------------------------------------------------------------------------
    side = getattr(model, SIDE_DICT, None)
    for (insertion, site), entries in by_site.items():
        if insertion not in ("hook", "pre_hook"):
            continue
        if side is None:
            side = nn.ModuleDict()
            model.add_module(SIDE_DICT, side)
        key = _unique_attr(side, site.replace(":", "_").replace(".", "_"))
        holder = _SiteHook([e.reg for e in entries])
        side[key] = holder
        owner = entries[0].owner
        if insertion == "hook":
            handle = named[owner].register_forward_hook(holder.forward_hook)
        else:
            handle = named[owner].register_forward_pre_hook(holder.forward_pre_hook)
        records.append((insertion, owner, handle.id, key))

    # slots -------------------------------------------------------------------------------------------------
    for (insertion, _site), entries in by_site.items():
        if insertion != "slot":
            continue
        norm = named[entries[0].module]
        regs = [e.reg for e in entries]
        current = norm.drop
        if isinstance(current, nn.Identity):
            norm.drop = regs[0] if len(regs) == 1 else _SlotStack(*regs)
            records.append(("slot", entries[0].module, "identity"))
        else:
            norm.drop = _SlotStack(current, *regs)
            records.append(("slot", entries[0].module, "kept"))

    # block-local rewrites --------------------------------------------------------------------------------------
    by_owner: dict[str, list[PlanEntry]] = {}
    for e in the_plan.entries:
        if e.insertion == "rewrite":
            by_owner.setdefault(e.owner, []).append(e)
    for owner, entries in by_owner.items():
        module = named[owner]
        lg, reason = analysis.rewritable(model, owner)
        if lg is None:  # checked while planning; kept as a guard
            raise RewriteError(f"cannot rewrite {owner}: {reason}")
        adds = {a[0]: a for a in lg.adds}
        inserts = []
        children = []
        for e in entries:
            suffix = e.node if e.kind in SKIP_KINDS else e.module[len(owner) + 1 :]
            child = _unique_attr(module, f"timm_drop_{e.kind}_{suffix}")
            module.add_module(child, e.reg)
            children.append(child)
            inserts.append((e, child, adds.get(e.node) if e.node else None))
        _insert(lg.eval_graph, inserts)
        fwd = _compile_forward(lg.eval_graph, owner)
        if lg.train_graph is not None:
            _insert(lg.train_graph, inserts)
            fwd = _dual_forward(fwd, _compile_forward(lg.train_graph, owner + " train"))
        consts = []
        for k, v in lg.constants.items():
            if not hasattr(module, k):
                setattr(module, k, v)
                consts.append(k)
        cls = type(module)
        base = getattr(cls, "_timm_drop_base", cls)
        module.__class__ = type(
            base.__name__,
            (cls,),
            {
                "forward": fwd,
                "_timm_drop_base": base,
                "__module__": base.__module__,
                "__qualname__": base.__qualname__,
            },
        )
        records.append(("rewrite", owner, base, tuple(children), tuple(consts)))

    object.__setattr__(model, _RECORD, records)
    object.__setattr__(model, "_timm_drop_plan", the_plan)
    return model


def strip_regularizers(model: nn.Module) -> nn.Module:
    """Undo every :func:`apply_regularizer` on ``model`` (same object back, original structure)."""
    records = getattr(model, _RECORD, None) or []
    for rec in reversed(records):
        kind, name = rec[0], rec[1]
        module = model.get_submodule(name) if name else model
        if kind == "hook":
            for hooks in (
                module._forward_hooks,
                module._forward_hooks_with_kwargs,
                module._forward_hooks_always_called,
            ):
                hooks.pop(rec[2], None)
        elif kind == "pre_hook":
            module._forward_pre_hooks.pop(rec[2], None)
            module._forward_pre_hooks_with_kwargs.pop(rec[2], None)
        elif kind == "slot":
            drop = module.drop
            module.drop = drop[0] if rec[2] == "kept" and isinstance(drop, _SlotStack) else nn.Identity()
        elif kind == "rewrite":
            module.__class__ = rec[2]
            for child in rec[3]:
                if child in module._modules:
                    del module._modules[child]
            for const in rec[4]:
                module.__dict__.pop(const, None)
    if SIDE_DICT in model._modules:
        del model._modules[SIDE_DICT]
    model.__dict__.pop(_RECORD, None)
    model.__dict__.pop("_timm_drop_plan", None)
    return model
