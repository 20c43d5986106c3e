"""The block-local rewrite: regularizers inserted into one module's own FX graph, as a generated subclass.

:class:`RewriteInsertion` (module docstring of :mod:`timm_drop.insertions`): the module that executes a skip add
(or calls a norm) gets ``call_module`` nodes for its regularizers, which become its children, and the instance
gets a generated subclass of its own class whose ``forward`` picks the graph of each call's *variant*
(``training``, ``grad_checkpointing``, which optional inputs are None). A variant the shape pass did not verify
is checked bit for bit against the original forward on its first eager call. A rewritten instance pickles as
its original class plus a :class:`RewriteRecipe` (pure data) and is rebuilt by replaying the recipe on load.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import linecache
import re
import uuid
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import fx, nn

from timm_drop.names import CHILD_PREFIX
from timm_drop.record import Insertion, submodule, unique_attr
from timm_drop.tracing import checkpoint_functions, config_flags, outputs_equal, trace_local

__all__ = ["InsertStep", "Key", "RewriteInsertion", "RewriteRecipe", "insert_steps"]

_counter = itertools.count()


@dataclass(frozen=True)
class InsertStep:
    """One regularizer node in a rewritten graph (pure data).

    ``kind`` residual / shortcut: before the add ``node`` on its operand ``arg``; merge: after the add ``node``;
    norm: after every call of the child ``target`` (a name relative to the rewritten module).
    """

    kind: str
    child: str
    node: str | None = None
    arg: int | None = None
    target: str | None = None


#: A variant of a rewritten forward: ``(training, *flag values, *(arg is None for each none_arg))``.
Key = tuple[bool, ...]

#: At most this many flags + None-able inputs get a graph of every combination; past it only the recorded one.
MAX_TOGGLES = 4


@dataclass(frozen=True)
class RewriteRecipe:
    """How to rebuild a rewritten module's class from its original class (pure data, pickled by reference).

    The rewritten forward has a graph per variant (:data:`Key`) of the things its code branches on that a trace
    fixes: ``training`` (``dual``: only when the two graphs differ), the module's bool ``flags`` (timm's
    ``grad_checkpointing``) and which ``none_args`` are None. ``reference`` is the variant the steps were planned
    on (the shape pass's), ``verified`` the variants proven bit for bit on real inputs.
    """

    base: type
    steps: tuple[InsertStep, ...]
    none_args: tuple[str, ...] = ()
    constants: tuple[str, ...] = ()  # tensor constants the traces attached to the module
    dual: bool = False  # forward branches on self.training: a train graph too
    token: str = ""  # names the generated class within one process
    flags: tuple[str, ...] = ()
    reference: Key = ()
    verified: tuple[Key, ...] = ()

    def reference_key(self) -> Key:
        return self.reference or (False, *(False for _ in self.flags), *(True for _ in self.none_args))

    def variant_keys(self) -> list[Key]:
        """Every variant to build, the reference's first (eval, then train)."""
        ref = self.reference_key()[1:]
        toggles = len(self.flags) + len(self.none_args)
        rest = [c for c in itertools.product((False, True), repeat=toggles) if c != ref] if toggles <= MAX_TOGGLES else []
        return [(t, *c) for c in [ref, *rest] for t in ((False, True) if self.dual else (False,))]


def insert_steps(graph: fx.Graph, steps: tuple[InsertStep, ...]) -> None:
    """Add ``call_module`` nodes for ``steps`` to ``graph`` in place (stacked regularizers run in step order)."""
    nodes = {n.name: n for n in graph.nodes}
    for step in steps:
        if step.kind in ("residual", "shortcut"):
            node = nodes[step.node]
            with graph.inserting_before(node):
                new = graph.call_module(step.child, (node.args[step.arg],))
            node.update_arg(step.arg, new)
            continue
        if step.kind == "merge":
            targets = [nodes[step.node]]
        else:
            targets = _calls_of(graph, step.target)
        for node in targets:
            # after the node and any regularizer already chained after it
            last = node
            while len(last.users) == 1:
                user = next(iter(last.users))
                if user.op == "call_module" and user.meta.get("timm_drop_after") == node.name:
                    last = user
                else:
                    break
            with graph.inserting_after(last):
                new = graph.call_module(step.child, (last,))
            new.meta["timm_drop_after"] = node.name
            last.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)


def _calls_of(graph: fx.Graph, target: str) -> list[fx.Node]:
    """The nodes whose output is the output of child ``target``: its ``call_module`` nodes, and the calls of an
    activation-checkpoint helper on it (``checkpoint(self.norm, x)`` in a forward whose checkpointing is on)."""
    helpers = checkpoint_functions()
    found = []
    for n in graph.nodes:
        if n.op == "call_module" and n.target == target:
            found.append(n)
        elif n.op == "call_function" and n.target in helpers and n.args:
            first = n.args[0]
            if isinstance(first, fx.Node) and first.op == "get_attr" and first.target == target:
                found.append(n)
    return found


def _operands(node: fx.Node) -> tuple[Any, ...]:
    """What an add node adds, by the ops that made its operands (to find the same add in another variant)."""
    return tuple((a.op, str(a.target)) if isinstance(a, fx.Node) else repr(a) for a in node.args[:2])


def _map_steps(ref: fx.Graph, graph: fx.Graph, steps: tuple[InsertStep, ...]) -> tuple[InsertStep, ...] | None:
    """``steps`` (planned on the graph ``ref``) for ``graph``, another variant of the same forward: each skip
    step on the add with the same operand ops (by name when that still fits), each norm step on the same child;
    None when one has no unique counterpart."""
    ref_nodes = {n.name: n for n in ref.nodes}
    nodes = {n.name: n for n in graph.nodes}
    out = []
    for step in steps:
        if step.node is None:
            if not _calls_of(graph, step.target):
                return None
            out.append(step)
            continue
        want = _operands(ref_nodes[step.node]) if step.node in ref_nodes else None
        same = nodes.get(step.node)
        if same is not None and same.op == ref_nodes[step.node].op and _operands(same) == want:
            out.append(step)
            continue
        found = [n for n in graph.nodes if n.op in ("call_function", "call_method") and _operands(n) == want
                 and n.target == ref_nodes[step.node].target]  # fmt: skip
        if want is None or len(found) != 1:
            return None
        out.append(replace(step, node=found[0].name))
    return tuple(out)


def _variant_graphs(
    module: nn.Module, recipe: RewriteRecipe, given: dict[Key, fx.Graph]
) -> tuple[dict[Key, fx.Graph | None], dict[str, Any]]:
    """The graph of every variant of ``module``'s original forward (``module`` has its original class) with the
    recipe's steps inserted, None where a variant does not trace or its steps have no counterpart; and the tensor
    constants the new traces attached to ``module``. ``given`` are clean graphs already traced (the analysis')."""
    ref_key = recipe.reference_key()
    nflags = len(recipe.flags)
    graphs: dict[Key, fx.Graph | None] = {}
    added: dict[str, Any] = {}
    ref_clean: fx.Graph | None = None
    for key in recipe.variant_keys():
        clean = given.get(key)
        if clean is not None:
            clean = copy.deepcopy(clean)
        else:
            nones = tuple(a for a, none in zip(recipe.none_args, key[1 + nflags :]) if none)
            try:
                clean, consts = trace_local(module, key[0], nones, dict(zip(recipe.flags, key[1 : 1 + nflags])))
            except Exception:
                if key == ref_key:
                    raise
                graphs[key] = None
                continue
            module.__dict__.update(consts)
            added.update(consts)
        if key == ref_key:
            ref_clean = copy.deepcopy(clean)
        steps = recipe.steps if key[1:] == ref_key[1:] else _map_steps(ref_clean, clean, recipe.steps)
        if steps is None:
            graphs[key] = None
            continue
        insert_steps(clean, steps)
        graphs[key] = clean
    return graphs, added


_WRAP_LINE = re.compile(r"^\S.*\bwrap\(\"[^\"]+\"\)\s*$")


def _compile_forward(graph: fx.Graph, tag: str, namespace: dict[str, Any]) -> Any:
    """The graph's code as a function, compiled into ``namespace`` (shared by the variants and the dispatcher of
    one class: a tracer that re-traces the rewritten module patches the functions it keeps as leaves, timm's
    not-traceable ones, in the globals of the module's ``forward``, so the variants must read the same dict)."""
    graph.lint()
    code = graph.python_code(root_module="self")
    clash = any(k in namespace and namespace[k] is not v for k, v in code.globals.items())
    target = dict(code.globals) if clash else namespace
    target.update(code.globals)
    # FX's code registers the functions it wrapped in torch.fx's process-wide patch table; that is global state
    # every later trace in the process reads (a name missing from the table's dict made every torch.fx trace fail),
    # and the shared namespace serves re-tracing tracers without it
    src = "\n".join(line for line in code.src.splitlines() if not _WRAP_LINE.match(line))
    filename = f"<timm_drop rewrite {tag} #{next(_counter)}>"
    # linecache makes tracebacks and inspect.getsource work for the generated code (as torch.fx does)
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    exec(compile(src, filename, "exec"), target)
    return target.pop("forward")


def _dispatcher(base: type, recipe: RewriteRecipe, fast: dict[Key, Any], ns: dict[str, Any]) -> Any:
    """The rewritten class's ``forward``: the original signature, picking the graph of the call's variant.

    Generated source (so TorchDynamo and FX re-traces see plain Python): ``fast`` maps the variants that are
    verified to their compiled graph; any other variant goes through :func:`_first_call` once.
    """
    params = list(inspect.signature(base.forward).parameters.values())[1:]
    P = inspect.Parameter
    ns.update(_timm_drop_fast=fast, _timm_drop_first_call=_first_call)
    sig, call, args, kwargs = [], [], [], []
    star = False
    for i, p in enumerate(params):
        default = ""
        if p.default is not P.empty:
            ns[f"_timm_drop_d{i}"] = p.default
            default = f"=_timm_drop_d{i}"
        if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD):
            sig.append(p.name + default)
            call.append(p.name)
            args.append(p.name)
            if p.kind is P.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1].kind is not P.POSITIONAL_ONLY):
                sig.append("/")
        elif p.kind is P.VAR_POSITIONAL:
            sig.append("*" + p.name)
            call.append("*" + p.name)
            args.append("*" + p.name)
            star = True
        elif p.kind is P.KEYWORD_ONLY:
            if not star:
                sig.append("*")
                star = True
            sig.append(p.name + default)
            call.append(f"{p.name}={p.name}")
            kwargs.append(f"{p.name!r}: {p.name}")
        else:
            sig.append("**" + p.name)
            call.append("**" + p.name)
            kwargs.append("**" + p.name)
    key = ", ".join(["self.training", *(f"bool(self.{f})" for f in recipe.flags),
                     *(f"{a} is None" for a in recipe.none_args)])  # fmt: skip
    src = (
        f"def forward(self, {', '.join(sig)}):\n"
        f"    _timm_drop_key = ({key},)\n"
        f"    _timm_drop_fn = _timm_drop_fast.get(_timm_drop_key)\n"
        f"    if _timm_drop_fn is None:\n"
        f"        return _timm_drop_first_call(self, _timm_drop_key, ({', '.join(args)}{',' if args else ''}), "
        f"{{{', '.join(kwargs)}}})\n"
        f"    return _timm_drop_fn(self, {', '.join(call)})\n"
    )
    filename = f"<timm_drop rewrite {base.__name__} dispatch #{next(_counter)}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    exec(compile(src, filename, "exec"), ns)
    return ns.pop("forward")


# ---------------------------------------------------------------------------------------------------------
# the first call of a variant: verify it bit for bit, or fall back to the original forward (with a warning)
# ---------------------------------------------------------------------------------------------------------
def _can_verify(module: nn.Module, values: Any) -> bool:
    """Whether this call runs on real values in eager mode (not under torch.compile / export, an FX or JIT
    trace, or on the meta device), so that the original forward can be run beside the graph."""
    if torch.compiler.is_compiling() or _fx_tracing() or torch.jit.is_tracing():
        return False
    tensors = [t for t in _leaves(values) if isinstance(t, (torch.Tensor, fx.Proxy))]
    if any(isinstance(t, fx.Proxy) or t.is_meta for t in tensors):
        return False
    return not any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def _fx_tracing() -> bool:
    from torch.fx import _symbolic_trace

    check = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None) or _symbolic_trace.is_fx_tracing
    return check()


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in _leaves(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    return [value]


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _reproduces(module: nn.Module, eval_fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """None if ``eval_fn`` (a variant's eval graph) gives the original forward's output bit for bit on this call's
    inputs, in eval mode and without gradients; else why not."""
    if eval_fn is None:
        return "its graph for this case could not be built"
    modes = {m: m.training for m in module.modules()}
    try:
        for m in modes:
            m.training = False
        with torch.no_grad():
            expected = type(module)._timm_drop_base.forward(module, *_clone(args), **_clone(kwargs))
            got = eval_fn(module, *_clone(args), **_clone(kwargs))
    except Exception as exc:
        return f"its graph raises {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    finally:
        for m, t in modes.items():
            m.training = t
    return None if outputs_equal(got, expected) else "its graph does not reproduce the original forward"


def _describe(recipe: RewriteRecipe, key: Key) -> str:
    parts = [f"{f}={v}" for f, v in zip(recipe.flags, key[1:])]
    parts += [f"{a}={'None' if none else 'given'}" for a, none in zip(recipe.none_args, key[1 + len(recipe.flags) :])]
    return ", ".join(parts) or "these inputs"


def _first_call(module: nn.Module, key: Key, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A variant not yet verified: on real values, check its graph against the original forward once (the
    shape pass did that for its own variant; a meta-device build had no values), then use it; a variant that
    did not trace, or fails the check, runs the original forward from then on, with a warning naming the sites
    that do not act in such calls. Under a trace or torch.compile the graph is used unchecked."""
    cls = type(module)
    fns = cls._timm_drop_variants
    fn = fns.get(key)
    if fn is not None and not _can_verify(module, (args, kwargs)):
        return fn(module, *args, **kwargs)
    if fn is not None and _meta_constants(module):
        # traced on the meta device: constants the trace captured have no values; trace again on the real ones
        _set_recipe(module, replace(cls._timm_drop_recipe, token=uuid.uuid4().hex), rebuild=True)
        return module.forward(*args, **kwargs)
    eval_key = (False, *key[1:])
    reason = _reproduces(module, fns.get(eval_key), args, kwargs) if fn is not None else None
    both = [(t, *key[1:]) for t in (False, True)]
    if fn is not None and reason is None:
        cls._timm_drop_fast.update({k: fns[k] for k in both if fns.get(k) is not None})
        return fn(module, *args, **kwargs)
    if reason is None:
        reason = "its graph for this case could not be built"
    recipe: RewriteRecipe = cls._timm_drop_recipe
    sites = [getattr(module, s.child, None) for s in recipe.steps]
    names = ", ".join(str(getattr(r, "site_name", None) or s.child) for r, s in zip(sites, recipe.steps))
    warnings.warn(
        f"timm_drop: a rewritten {recipe.base.__name__} was called with {_describe(recipe, key)} and "
        f"{reason}; in such calls it runs its original forward, so the regularizers at {names} do not act there",
        UserWarning,
        stacklevel=3,
    )
    original = recipe.base.forward
    cls._timm_drop_fast.update(dict.fromkeys(both, original))
    return original(module, *args, **kwargs)


def _meta_constants(module: nn.Module) -> bool:
    recipe = type(module)._timm_drop_recipe
    return any(isinstance(t := module.__dict__.get(k), torch.Tensor) and t.is_meta for k in recipe.constants)


def _refuse_script(self: nn.Module) -> nn.Module:
    raise RuntimeError(
        f"timm_drop: torch.jit.script cannot compile a rewritten {type(self).__name__} (its forward is generated "
        f"Python that calls Python regularizers). Script the whole regularized model (timm_drop then gives "
        f"TorchScript a copy without its regularizers, which equals the model in eval()), or call "
        f"timm_drop.strip_regularizers on it first"
    )


_CLASSES: weakref.WeakValueDictionary[str, type] = weakref.WeakValueDictionary()


def _reduce_ex(self: nn.Module, protocol: int) -> Any:
    # pickle (and deepcopy) the instance as "the original class + the recipe" instead of the generated class
    rv = object.__reduce_ex__(self, protocol)
    return (_restore, (type(self)._timm_drop_recipe,), *rv[2:])


def _make_class(recipe: RewriteRecipe, graphs: dict[Key, fx.Graph | None]) -> type:
    base = recipe.base
    ns: dict[str, Any] = {}
    fns: dict[Key, Any] = {}
    for key, graph in graphs.items():
        fns[key] = _compile_forward(graph, f"{base.__name__} {key}", ns) if graph is not None else None
        if not recipe.dual:  # one graph for both modes
            fns[(True, *key[1:])] = fns[key]
    ref = recipe.reference_key()
    if fns.get(ref) is None:
        raise RuntimeError(f"timm_drop: the rewrite of {base.__name__} has no graph for its recorded inputs")
    fast = {k: fn for k, fn in fns.items() if fn is not None and (False, *k[1:]) in recipe.verified}
    cls = type(
        base.__name__,
        (base,),
        {
            "forward": _dispatcher(base, recipe, fast, ns),
            "__reduce_ex__": _reduce_ex,
            "__prepare_scriptable__": _refuse_script,
            "_timm_drop_base": base,
            "_timm_drop_recipe": recipe,
            "_timm_drop_graphs": (graphs[ref], graphs.get((True, *ref[1:])) if recipe.dual else None),
            "_timm_drop_variants": fns,
            "_timm_drop_fast": fast,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
        },
    )
    _CLASSES[recipe.token] = cls
    return cls


def _trace_graphs(module: nn.Module, recipe: RewriteRecipe) -> tuple[RewriteRecipe, dict[Key, fx.Graph | None]]:
    """Re-trace every variant of the original forward of ``module`` (its class is ``recipe.base`` or a plain
    subclass of it) and replay the recipe's steps; the recipe comes back with the constants now attached."""
    for k in recipe.constants:
        module.__dict__.pop(k, None)
    graphs, added = _variant_graphs(module, recipe, {})
    return replace(recipe, constants=tuple(added)), graphs


def _set_recipe(module: nn.Module, recipe: RewriteRecipe, rebuild: bool = False) -> None:
    """Give ``module`` the class ``recipe`` describes (its original class when there are no steps)."""
    if not recipe.steps:
        for k in recipe.constants:
            module.__dict__.pop(k, None)
        module.__class__ = recipe.base
        return
    cls = None if rebuild else _CLASSES.get(recipe.token)
    if cls is None:
        module.__class__ = recipe.base
        cls = _make_class(*_trace_graphs(module, recipe))
    module.__class__ = cls


_PENDING: dict[type, type] = {}


def _finish_setstate(self: nn.Module, state: Any) -> None:
    recipe = self.__dict__.pop("_timm_drop_pending")
    recipe.base.__setstate__(self, state)
    _set_recipe(self, recipe)


def _restore(recipe: RewriteRecipe) -> nn.Module:
    """Unpickling entry point: an instance of the original class that becomes the rewritten class once its
    state (children, buffers) is back."""
    pending = _PENDING.get(recipe.base)
    if pending is None:
        pending = type(recipe.base.__name__, (recipe.base,), {"__setstate__": _finish_setstate})
        _PENDING[recipe.base] = pending
    obj = pending.__new__(pending)
    obj.__dict__["_timm_drop_pending"] = recipe
    return obj


@dataclass(eq=False)
class RewriteInsertion(Insertion):
    """Regularizers inserted into one module's graph. ``graphs`` (the analysed eval and train graphs) are only
    needed to apply and are dropped afterwards, so the record stays pure data plus the regularizers."""

    kind: ClassVar[str] = "rewrite"

    @classmethod
    def group(cls, entry: Any) -> str:
        return entry.owner  # one rewrite per module, holding every regularizer its graph gets

    @classmethod
    def from_entries(cls, model: nn.Module, entries: Sequence[Any], regs: list[nn.Module], plan: Any) -> Insertion:
        owner = entries[0].owner
        target = plan.rewrite_target(owner)
        module = model.get_submodule(owner)
        adds = {a[0]: a for a in target.adds}
        steps, taken = [], set()
        for e in entries:
            suffix = e.node if e.node is not None else e.module[len(owner) + 1 :]
            child = unique_attr(module, f"{CHILD_PREFIX}{e.kind}_{suffix}", taken)
            taken.add(child)
            if e.kind in ("residual", "shortcut"):
                arg = adds[e.node][1] if e.kind == "residual" else adds[e.node][2]
                steps.append(InsertStep(e.kind, child, node=e.node, arg=arg))
            elif e.kind == "merge":
                steps.append(InsertStep(e.kind, child, node=e.node))
            else:
                steps.append(InsertStep(e.kind, child, target=e.module[len(owner) + 1 :]))
        graphs = (target.eval_graph, target.train_graph)
        return cls(owner, regs, tuple(steps), target.none_args, dict(target.constants), graphs, exact=target.exact)

    def intact(self, module: nn.Module) -> bool:
        return hasattr(type(module), "_timm_drop_recipe") and all(s.child in module._modules for s in self.steps)
    owner: str
    regs: list[nn.Module]
    steps: tuple[InsertStep, ...]
    none_args: tuple[str, ...] = ()
    constants: dict[str, Any] = field(default_factory=dict, repr=False)
    graphs: tuple[fx.Graph, fx.Graph | None] | None = field(default=None, repr=False)
    added_constants: tuple[str, ...] = ()
    exact: bool = True  # the analysed graph was verified on values (not on the meta device)

    def apply(self, model: nn.Module) -> None:
        module = submodule(model, self.owner)
        for step, reg in zip(self.steps, self.regs):
            module.add_module(step.child, reg)
        earlier: RewriteRecipe | None = getattr(type(module), "_timm_drop_recipe", None)
        base = earlier.base if earlier else type(module)
        module.__class__ = base
        given: dict[Key, fx.Graph] = {}
        if earlier:
            # the analysed graphs are the earlier rewrite's, with its regularizers in: trace afresh
            for k in earlier.constants:
                module.__dict__.pop(k, None)
            flags, reference, verified = earlier.flags, earlier.reference_key(), earlier.verified
        else:
            attached = tuple(k for k in self.constants if not hasattr(module, k))
            module.__dict__.update({k: self.constants[k] for k in attached})
            flags = config_flags(module)
            reference = (False, *(bool(getattr(module, f)) for f in flags), *(True for _ in self.none_args))
            verified = ()
            given = {reference: self.graphs[0]}
            if self.graphs[1] is not None:
                given[(True, *reference[1:])] = self.graphs[1]
        recipe = RewriteRecipe(
            base=base,
            steps=(earlier.steps if earlier else ()) + self.steps,
            none_args=self.none_args,
            dual=self.graphs[1] is not None,
            token=uuid.uuid4().hex,
            flags=flags,
            reference=reference,
            verified=tuple(dict.fromkeys(verified + ((reference,) if self.exact else ()))),
        )
        graphs, added = _variant_graphs(module, recipe, given)
        constants = tuple(added) if earlier else attached + tuple(added)
        recipe = replace(recipe, constants=constants)
        self.added_constants = constants
        module.__class__ = _make_class(recipe, graphs)
        self.graphs, self.constants = None, {}

    def undo(self, model: nn.Module) -> None:
        module = submodule(model, self.owner)
        recipe: RewriteRecipe = type(module)._timm_drop_recipe
        mine = {s.child for s in self.steps}
        for child in mine:
            module._modules.pop(child, None)
        rest = tuple(s for s in recipe.steps if s.child not in mine)
        _set_recipe(module, replace(recipe, steps=rest, token=uuid.uuid4().hex))
