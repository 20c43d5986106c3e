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
  rewritten graph. ``isinstance``, the class name, methods and attributes stay. Children are called by attribute
  at run time, so a later SyncBN conversion of a child is honoured. A trace fixes what the forward branches on in
  Python, so the rewritten forward has a graph per *variant*: ``self.training`` (where the two graphs differ),
  the module's ``grad_checkpointing`` flag (timm's checkpoint helpers stay calls in the graph, so the block still
  checkpoints) and which optional inputs are None (a ViT block's ``attn_mask``). Its ``forward`` is generated
  with the original signature and picks the variant of each call; a variant the shape pass did not verify is
  checked bit for bit against the original forward on its first eager call (the meta-device case too), and one
  that does not trace or fails that check runs the original forward, with a warning naming the sites that do
  not act in such calls.
* :class:`HookInsertion` / :class:`PreHookInsertion` — a forward hook on the owner (or a forward pre-hook on
  the layer after a norm inside an ``nn.Sequential``). The hook is a bound method of a small holder module
  kept in an ``nn.ModuleDict`` named ``_timm_drop_regularizers``, so ``copy.deepcopy`` (timm's EMA) rebinds
  it to the copy's own regularizers. That dict lives on the outermost module around the owner whose forward
  does not run every child it holds (not an ``nn.Sequential`` or a ``features_only`` wrapper: they would call
  it), normally the model root. A hook with a ``branch`` (a stage returning a list or tuple: HRNet, PiT,
  CrossViT) regularizes that element only and returns a new container of the same type with the others as
  they were (where the element appears several times, each place gets the regularized tensor).
* :class:`WatchInsertion` — no regularizer of its own: the check that every rule of the apply ran in the first
  training forward (:mod:`timm_drop.unused`), its holder kept with the hook holders.

Pickling (``torch.save(model)``, ``pickle``, spawn): a generated subclass pickles by reference to the original
class plus a :class:`RewriteRecipe` (pure data: the insert steps and variants); unpickling re-traces the original
forward and replays the steps (in the same process the class is reused). Hooks and slots pickle as plain modules.
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
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import fx, nn

from timm_drop.structure import iterates_children

__all__ = [
    "HookInsertion",
    "InsertStep",
    "Insertion",
    "ModelRef",
    "PreHookInsertion",
    "RewriteInsertion",
    "RewriteRecipe",
    "SlotInsertion",
    "WatchInsertion",
    "record_of",
]

RECORD = "_timm_drop_record"
SIDE = "_timm_drop_regularizers"
CHILD_PREFIX = "timm_drop_"
_counter = itertools.count()


class ModelRef:
    """How something held inside a model refers to that model without a reference cycle (a cycle would keep the
    model, and whatever holds it, alive after ``del`` until the garbage collector runs): a weak reference that
    ``copy.deepcopy`` points at the copy and pickling rebuilds on load."""

    def __init__(self, model: nn.Module) -> None:
        self._ref = weakref.ref(model)

    def __call__(self) -> nn.Module:
        model = self._ref()
        if model is None:
            raise RuntimeError("timm_drop: the model this belongs to no longer exists")
        return model

    def __deepcopy__(self, memo: dict[int, Any]) -> ModelRef:
        model = self._ref()
        return ModelRef(memo.get(id(model), model))

    def __reduce__(self) -> tuple[Any, ...]:
        return ModelRef, (self(),)


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


def _side_add(model: nn.Module, home: str, base: str, holder: nn.Module) -> str:
    """Put ``holder`` into the side ``ModuleDict`` of module ``home`` (created if needed); returns its key."""
    module = _get(model, home)
    side = module._modules.get(SIDE)
    if side is None:
        side = nn.ModuleDict()
        module.add_module(SIDE, side)
    key = _unique_attr(side, base)
    side[key] = holder
    return key


def _side_remove(model: nn.Module, home: str, key: str) -> None:
    module = _get(model, home)
    side = module._modules.get(SIDE)
    if side is not None:
        side._modules.pop(key, None)
        if not len(side._modules):
            del module._modules[SIDE]


def _alive(handle: Any) -> bool:
    """Whether a hook handle still points at the hooks of a live module (a module replaced since, e.g. by SyncBN
    conversion, took its hooks with it: nothing to remove)."""
    refs = (handle.hooks_dict_ref, *handle.extra_dict_ref) if handle is not None else ()
    return handle is not None and all(ref() is not None for ref in refs)


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
        holder = _SiteHook(self.regs, self.branch)
        self.key = _side_add(model, self.home, self.site.replace(":", "_").replace(".", "_"), holder)
        self.handle = self._register(_get(model, self.owner), holder)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if not _alive(self.handle):
            state["handle"] = None
        return state

    def undo(self, model: nn.Module) -> None:
        if self.handle is not None:
            self.handle.remove()
        _side_remove(model, self.home, self.key)


@dataclass(eq=False)
class PreHookInsertion(HookInsertion):
    kind: ClassVar[str] = "pre_hook"

    def _register(self, owner: nn.Module, holder: _SiteHook) -> Any:
        handle = owner.register_forward_pre_hook(holder.forward_pre_hook)
        _ours_first(owner._forward_pre_hooks)
        return handle


@dataclass(eq=False)
class WatchInsertion(Insertion):
    """The unused-rule check (:mod:`timm_drop.unused`): a :class:`~timm_drop.unused.UsageWatch` holding one
    apply's regularizers by rule, with a forward hook on the model and a forward pre-hook on its ``heartbeat``."""

    kind: ClassVar[str] = "watch"
    regs: ClassVar[tuple[nn.Module, ...]] = ()  # it puts in no regularizer of its own
    site: ClassVar[str] = ""
    rules: dict[str, list[nn.Module]]
    heartbeat: str | None = None
    home: str = ""
    key: str = ""
    handles: list[Any] = field(default_factory=list, repr=False)

    def apply(self, model: nn.Module) -> None:
        from timm_drop.unused import UsageWatch

        self.home = holder_home(model, "")
        watch = UsageWatch(model, self.rules)
        self.key = _side_add(model, self.home, "unused_rule_check", watch)
        self.handles = [model.register_forward_hook(watch.after_forward)]
        if self.heartbeat is not None:
            self.handles.append(_get(model, self.heartbeat).register_forward_pre_hook(watch.before_forward))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["handles"] = [h for h in self.handles if _alive(h)]
        return state

    def undo(self, model: nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        _side_remove(model, self.home, self.key)


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
    from timm_drop.sites import _checkpoint_functions

    helpers = _checkpoint_functions()
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
    from timm_drop.sites import trace_local

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
    from timm_drop.sites import _outputs_equal

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
    return None if _outputs_equal(got, expected) else "its graph does not reproduce the original forward"


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
    owner: str
    regs: list[nn.Module]
    steps: tuple[InsertStep, ...]
    none_args: tuple[str, ...] = ()
    constants: dict[str, Any] = field(default_factory=dict, repr=False)
    graphs: tuple[fx.Graph, fx.Graph | None] | None = field(default=None, repr=False)
    added_constants: tuple[str, ...] = ()
    exact: bool = True  # the analysed graph was verified on values (not on the meta device)

    def apply(self, model: nn.Module) -> None:
        from timm_drop.sites import config_flags

        module = _get(model, self.owner)
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
        module = _get(model, self.owner)
        recipe: RewriteRecipe = type(module)._timm_drop_recipe
        mine = {s.child for s in self.steps}
        for child in mine:
            module._modules.pop(child, None)
        rest = tuple(s for s in recipe.steps if s.child not in mine)
        _set_recipe(module, replace(recipe, steps=rest, token=uuid.uuid4().hex))
