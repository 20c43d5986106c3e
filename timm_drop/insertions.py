"""Insertions: every way :func:`timm_drop.apply_regularizer` changes a model, each an object that undoes itself.

The rewriter decides *where* a regularizer goes (:mod:`timm_drop.rewrite`); an insertion knows *how* it gets
there and back. The model carries the list of insertions it received (``model._timm_drop_record``), and
:func:`timm_drop.strip_regularizers` undoes them in reverse. A new kind of insertion is a new class here with
``apply(model)`` and ``undo(model)``; nothing else has to change in step.

* :class:`SlotInsertion` — the regularizer becomes the ``drop`` slot of a fused norm+act layer
  (``BatchNormAct2d`` & co.: between normalization and activation). A slot already holding a module keeps it
  and runs it first. ``timm.layers.convert_sync_batchnorm`` copies ``drop``, so it survives SyncBN.
* :class:`RewriteInsertion` — a block-local graph rewrite: the module that executes a skip add (or calls a
  norm) gets ``call_module`` nodes for the regularizers in its own FX graph (before the add on one operand,
  after the add, after every call of the norm), the regularizers become its children (param-free: no new
  ``state_dict`` keys) and the instance gets a generated subclass of its own class whose ``forward`` is the
  rewritten graph. ``isinstance``, the class name, methods and attributes stay; a forward that branches on
  ``self.training`` gets both graphs, chosen by mode. Children are called by attribute at run time, so a later
  SyncBN conversion of a child is honoured. The rewritten forward no longer reads config flags the trace
  resolved (e.g. a block's ``grad_checkpointing`` switched on afterwards).
* :class:`HookInsertion` / :class:`PreHookInsertion` — a forward hook on the owner (or a forward pre-hook on
  the layer after a norm inside an ``nn.Sequential``). The hook is a bound method of a small holder module
  kept in an ``nn.ModuleDict`` named ``_timm_drop_regularizers``, so ``copy.deepcopy`` (timm's EMA) rebinds
  it to the copy's own regularizers. That dict lives on the outermost module around the owner whose forward
  does not run every child it holds (not an ``nn.Sequential`` or a ``features_only`` wrapper: they would call
  it), normally the model root. A hook with a ``branch`` (a stage returning a list or tuple: HRNet, PiT,
  CrossViT) regularizes that element only and returns a new container of the same type with the others as
  they were (where the element appears several times, each place gets the regularized tensor).

Pickling (``torch.save(model)``, ``pickle``, spawn): a generated subclass pickles by reference to the original
class plus a :class:`RewriteRecipe` (pure data: the insert steps); unpickling re-traces the original forward
and replays the steps (in the same process the class is reused). Hooks and slots pickle as plain modules.
"""

from __future__ import annotations

import copy
import itertools
import linecache
import uuid
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from torch import fx, nn

from timm_drop.structure import iterates_children

__all__ = [
    "HookInsertion",
    "InsertStep",
    "Insertion",
    "PreHookInsertion",
    "RewriteInsertion",
    "RewriteRecipe",
    "SlotInsertion",
    "record_of",
]

RECORD = "_timm_drop_record"
SIDE = "_timm_drop_regularizers"
CHILD_PREFIX = "timm_drop_"
_counter = itertools.count()


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def record_of(model: nn.Module) -> list[Insertion]:
    """The insertions ``model`` carries, oldest first (empty for an untouched model)."""
    return list(model.__dict__.get(RECORD) or [])


class Insertion:
    """One change to a model that knows how to undo itself. Holds names, not modules, for the places it
    changed (SyncBN conversion replaces modules), and the regularizer modules it put in."""

    kind: ClassVar[str] = ""

    def apply(self, model: nn.Module) -> None:
        raise NotImplementedError

    def undo(self, model: nn.Module) -> None:
        raise NotImplementedError


def _unique_attr(module: nn.Module, base: str) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in base)
    name, i = base, 2
    while hasattr(module, name) or name in module._modules:
        name, i = f"{base}_{i}", i + 1
    return name


# ---------------------------------------------------------------------------------------------------------
# drop slot
# ---------------------------------------------------------------------------------------------------------
class _SlotStack(nn.Sequential):
    """A ``drop`` slot that already held a module: that module first, then the regularizers."""

    _timm_drop_internal = True


@dataclass(eq=False)
class SlotInsertion(Insertion):
    kind: ClassVar[str] = "slot"
    norm: str
    regs: list[nn.Module]
    kept: bool = False  # the slot held a module (kept first); else it was nn.Identity

    def apply(self, model: nn.Module) -> None:
        norm = _get(model, self.norm)
        current = norm.drop
        self.kept = not isinstance(current, nn.Identity)
        if self.kept:
            norm.drop = _SlotStack(current, *self.regs)
        else:
            norm.drop = self.regs[0] if len(self.regs) == 1 else _SlotStack(*self.regs)

    def undo(self, model: nn.Module) -> None:
        norm = _get(model, self.norm)
        drop = norm.drop
        norm.drop = drop[0] if self.kept and isinstance(drop, _SlotStack) else nn.Identity()


# ---------------------------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------------------------
class _SiteHook(nn.Module):
    """Holds the regularizers of one hooked site; its bound methods are the hooks (deepcopy-safe). With
    ``branch``, the forward hook acts on that element of a list/tuple output only."""

    _timm_drop_internal = True
    branch: int | None = None  # also for holders pickled before branches existed

    def __init__(self, regs: list[nn.Module], branch: int | None = None):
        super().__init__()
        self.regs = nn.ModuleList(regs)
        self.branch = branch

    def extra_repr(self) -> str:
        return "" if self.branch is None else f"branch={self.branch}"

    def _follow(self, module: nn.Module) -> None:
        # The regularizers act for the hooked module, so they take its mode: a features_only wrapper built
        # around a rewritten model (FeatureListNet(model)) holds the hooked modules but not this holder, and
        # its train()/eval() would otherwise never reach them.
        for reg in self.regs:
            if reg.training != module.training:
                reg.train(module.training)

    @staticmethod
    def _run(reg: nn.Module, x: Any) -> Any:
        # Under an FX tracer, call forward directly: the regularizer's node (timm_drop.fx) is then recorded in
        # the hooked module's scope, so torchvision's node "layer3" (FeatureGraphNet's stage 3) is its output.
        return reg.forward(x) if isinstance(x, fx.Proxy) else reg(x)

    def forward_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        self._follow(module)
        if self.branch is not None:
            return _replace_branch(output, self.branch, self._chain)
        return self._chain(output)

    def _chain(self, x: Any) -> Any:
        for reg in self.regs:
            x = self._run(reg, x)
        return x

    def forward_pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        self._follow(module)
        x = args[0]
        for reg in self.regs:
            x = self._run(reg, x)
        return (x, *args[1:])


def _replace_branch(output: Any, branch: int, fn: Any) -> Any:
    """``output`` (a list or tuple) with element ``branch`` replaced by ``fn`` of it, in a new container of the
    same type (a named tuple stays one); every element that is the same object gets the same new value."""
    old = output[branch]
    new = fn(old)
    items = [new if x is old else x for x in output]
    if isinstance(output, list):
        return items
    return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)


def _ours_first(hooks: Any) -> None:
    """Run timm_drop's hooks before anyone else's (in the order they were added): observers such as
    ``FeatureHookNet``'s feature hooks then see the regularized stage output the next stage receives."""
    ours = [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), _SiteHook)]
    for k in reversed(ours):
        hooks.move_to_end(k, last=False)


def holder_home(model: nn.Module, owner: str) -> str:
    """Where the holder of a hook on ``owner`` lives: the outermost module on the path to ``owner`` whose
    forward does not run every child (the root for a classifier), else the first such module inside it."""
    parts = owner.split(".") if owner else []
    for i in range(len(parts) + 1):
        name = ".".join(parts[:i])
        if not iterates_children(_get(model, name)):
            return name
    for rel, m in _get(model, owner).named_modules():
        if rel and not iterates_children(m):
            return f"{owner}.{rel}" if owner else rel
    from timm_drop.rewrite import RewriteError

    raise RewriteError(f"no module around or inside {owner or 'the model'} can hold a hook's regularizers")


@dataclass(eq=False)
class HookInsertion(Insertion):
    kind: ClassVar[str] = "hook"
    owner: str
    regs: list[nn.Module]
    site: str
    home: str = ""
    key: str = ""
    handle: Any = field(default=None, repr=False)
    branch: int | None = None  # the element of a list/tuple output the regularizers act on

    def _register(self, owner: nn.Module, holder: _SiteHook) -> Any:
        handle = owner.register_forward_hook(holder.forward_hook)
        _ours_first(owner._forward_hooks)
        return handle

    def apply(self, model: nn.Module) -> None:
        self.home = holder_home(model, self.owner)
        home = _get(model, self.home)
        side = home._modules.get(SIDE)
        if side is None:
            side = nn.ModuleDict()
            home.add_module(SIDE, side)
        self.key = _unique_attr(side, self.site.replace(":", "_").replace(".", "_"))
        holder = _SiteHook(self.regs, self.branch)
        side[self.key] = holder
        self.handle = self._register(_get(model, self.owner), holder)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        # a module replaced since (SyncBN conversion of a hooked norm) took the hook with it: nothing to remove
        handle = self.handle
        refs = (handle.hooks_dict_ref, *handle.extra_dict_ref) if handle is not None else ()
        if any(ref() is None for ref in refs):
            state["handle"] = None
        return state

    def undo(self, model: nn.Module) -> None:
        if self.handle is not None:
            self.handle.remove()
        home = _get(model, self.home)
        side = home._modules.get(SIDE)
        if side is not None:
            side._modules.pop(self.key, None)
            if not len(side._modules):
                del home._modules[SIDE]


@dataclass(eq=False)
class PreHookInsertion(HookInsertion):
    kind: ClassVar[str] = "pre_hook"

    def _register(self, owner: nn.Module, holder: _SiteHook) -> Any:
        handle = owner.register_forward_pre_hook(holder.forward_pre_hook)
        _ours_first(owner._forward_pre_hooks)
        return handle


# ---------------------------------------------------------------------------------------------------------
# block-local rewrite
# ---------------------------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class RewriteRecipe:
    """How to rebuild a rewritten module's class from its original class (pure data, pickled by reference)."""

    base: type
    steps: tuple[InsertStep, ...]
    none_args: tuple[str, ...] = ()
    constants: tuple[str, ...] = ()  # tensor constants the trace attached to the module
    dual: bool = False  # forward branches on self.training: a train graph too
    token: str = ""  # names the generated class within one process


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
            targets = [n for n in graph.nodes if n.op == "call_module" and n.target == step.target]
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


_CLASSES: weakref.WeakValueDictionary[str, type] = weakref.WeakValueDictionary()


def _reduce_ex(self: nn.Module, protocol: int) -> Any:
    # pickle (and deepcopy) the instance as "the original class + the recipe" instead of the generated class
    rv = object.__reduce_ex__(self, protocol)
    return (_restore, (type(self)._timm_drop_recipe,), *rv[2:])


def _make_class(recipe: RewriteRecipe, eval_graph: fx.Graph, train_graph: fx.Graph | None) -> type:
    base = recipe.base
    fwd = _compile_forward(eval_graph, base.__name__)
    if train_graph is not None:
        fwd = _dual_forward(fwd, _compile_forward(train_graph, base.__name__ + " train"))
    cls = type(
        base.__name__,
        (base,),
        {
            "forward": fwd,
            "__reduce_ex__": _reduce_ex,
            "_timm_drop_base": base,
            "_timm_drop_recipe": recipe,
            "_timm_drop_graphs": (eval_graph, train_graph),
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
        },
    )
    _CLASSES[recipe.token] = cls
    return cls


def _trace_graphs(module: nn.Module, recipe: RewriteRecipe) -> tuple[fx.Graph, fx.Graph | None]:
    """Re-trace the original forward of ``module`` (its class is ``recipe.base`` or a plain subclass of it)
    and replay the recipe's steps; re-attaches the tensor constants the trace needs under the same names."""
    from timm_drop.sites import trace_local

    for k in recipe.constants:
        module.__dict__.pop(k, None)
    graphs = []
    for training in (False, True) if recipe.dual else (False,):
        graph, consts = trace_local(module, training, recipe.none_args)
        module.__dict__.update(consts)
        insert_steps(graph, recipe.steps)
        graphs.append(graph)
    return graphs[0], graphs[1] if recipe.dual else None


def _set_recipe(module: nn.Module, recipe: RewriteRecipe) -> None:
    """Give ``module`` the class ``recipe`` describes (its original class when there are no steps)."""
    if not recipe.steps:
        module.__class__ = recipe.base
        return
    cls = _CLASSES.get(recipe.token)
    if cls is None:
        module.__class__ = recipe.base
        cls = _make_class(recipe, *_trace_graphs(module, recipe))
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
    owner: str
    regs: list[nn.Module]
    steps: tuple[InsertStep, ...]
    none_args: tuple[str, ...] = ()
    constants: dict[str, Any] = field(default_factory=dict, repr=False)
    graphs: tuple[fx.Graph, fx.Graph | None] | None = field(default=None, repr=False)
    added_constants: tuple[str, ...] = ()

    def apply(self, model: nn.Module) -> None:
        module = _get(model, self.owner)
        for step, reg in zip(self.steps, self.regs):
            module.add_module(step.child, reg)
        self.added_constants = tuple(k for k in self.constants if not hasattr(module, k))
        for k in self.added_constants:
            setattr(module, k, self.constants[k])
        earlier: RewriteRecipe | None = getattr(type(module), "_timm_drop_recipe", None)
        eval_graph, train_graph = (copy.deepcopy(g) if g is not None else None for g in self.graphs)
        insert_steps(eval_graph, self.steps)
        if train_graph is not None:
            insert_steps(train_graph, self.steps)
        recipe = RewriteRecipe(
            base=earlier.base if earlier else type(module),
            steps=(earlier.steps if earlier else ()) + self.steps,
            none_args=self.none_args,
            constants=(earlier.constants if earlier else ()) + self.added_constants,
            dual=train_graph is not None,
            token=uuid.uuid4().hex,
        )
        module.__class__ = _make_class(recipe, eval_graph, train_graph)
        self.graphs, self.constants = None, {}

    def undo(self, model: nn.Module) -> None:
        module = _get(model, self.owner)
        recipe: RewriteRecipe = type(module)._timm_drop_recipe
        mine = {s.child for s in self.steps}
        for child in mine:
            module._modules.pop(child, None)
        for k in self.added_constants:
            module.__dict__.pop(k, None)
        rest = tuple(s for s in recipe.steps if s.child not in mine)
        constants = tuple(k for k in recipe.constants if k not in self.added_constants)
        _set_recipe(module, replace(recipe, steps=rest, constants=constants, token=uuid.uuid4().hex))
