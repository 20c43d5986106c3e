"""Insertions: every way :func:`timm_drop.apply_regularizer` changes a model, each an object that undoes itself.

The rewriter decides *where* a regularizer goes (:mod:`timm_drop.rewrite`); an insertion knows *how* it gets
there and back. The model carries the list of insertions it received (its record, :mod:`timm_drop.record`), and
:func:`timm_drop.strip_regularizers` undoes them in reverse. A new kind of insertion is a new subclass of
:class:`~timm_drop.record.Insertion` with ``kind``, ``from_entries``, ``apply`` and ``undo``; it registers itself
by its ``kind``, and nothing else has to change in step.

* :class:`SlotInsertion` — the regularizer becomes the ``drop`` slot of a fused norm+act layer
  (``BatchNormAct2d`` & co.: between normalization and activation). A slot already holding a module keeps it
  and runs it first. ``timm.layers.convert_sync_batchnorm`` copies ``drop``, so it survives SyncBN.
* :class:`~timm_drop.block_rewrite.RewriteInsertion` (in :mod:`timm_drop.block_rewrite`) — a block-local graph rewrite: the module that executes a skip add (or calls a
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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import fx, nn

# the block-local rewrite lives in its own module; its names stay importable from here (and pickles made when they
# lived here still load)
from timm_drop.block_rewrite import (
    InsertStep,
    RewriteInsertion,
    RewriteRecipe,
    _restore,  # noqa: F401  (pickles of rewritten modules name it here)
)
from timm_drop.errors import RewriteError
from timm_drop.names import CHILD_PREFIX, RECORD, SIDE
from timm_drop.record import Insertion, ModelRef, record_of, submodule, unique_attr
from timm_drop.structure import iterates_children
from timm_drop.unused import UsageWatch

__all__ = [
    "CHILD_PREFIX",
    "RECORD",
    "SIDE",
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

    @classmethod
    def from_entries(cls, model: nn.Module, entries: Sequence[Any], regs: list[nn.Module], plan: Any) -> Insertion:
        return cls(entries[0].module, regs)

    def intact(self, module: nn.Module) -> bool:
        return any(m is r for m in getattr(module, "drop", nn.Identity()).modules() for r in self.regs)

    def apply(self, model: nn.Module) -> None:
        norm = submodule(model, self.norm)
        current = norm.drop
        self.kept = not isinstance(current, nn.Identity)
        if self.kept:
            norm.drop = _SlotStack(current, *self.regs)
        else:
            norm.drop = self.regs[0] if len(self.regs) == 1 else _SlotStack(*self.regs)

    def undo(self, model: nn.Module) -> None:
        norm = submodule(model, self.norm)
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
        if not iterates_children(submodule(model, name)):
            return name
    for rel, m in submodule(model, owner).named_modules():
        if rel and not iterates_children(m):
            return f"{owner}.{rel}" if owner else rel
    raise RewriteError(f"no module around or inside {owner or 'the model'} can hold a hook's regularizers")


def _side_add(model: nn.Module, home: str, base: str, holder: nn.Module) -> str:
    """Put ``holder`` into the side ``ModuleDict`` of module ``home`` (created if needed); returns its key."""
    module = submodule(model, home)
    side = module._modules.get(SIDE)
    if side is None:
        side = nn.ModuleDict()
        module.add_module(SIDE, side)
    key = unique_attr(side, base)
    side[key] = holder
    return key


def _side_remove(model: nn.Module, home: str, key: str) -> None:
    module = submodule(model, home)
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

    @classmethod
    def from_entries(cls, model: nn.Module, entries: Sequence[Any], regs: list[nn.Module], plan: Any) -> Insertion:
        first = entries[0]
        return cls(first.owner, regs, first.site, branch=first.branch)

    @staticmethod
    def _hooks(module: nn.Module) -> dict[int, Any]:
        return module._forward_hooks

    def intact(self, module: nn.Module) -> bool:
        return self.handle is not None and self.handle.id in self._hooks(module)

    def _register(self, owner: nn.Module, holder: _SiteHook) -> Any:
        handle = owner.register_forward_hook(holder.forward_hook)
        _ours_first(owner._forward_hooks)
        return handle

    def apply(self, model: nn.Module) -> None:
        self.home = holder_home(model, self.owner)
        holder = _SiteHook(self.regs, self.branch)
        self.key = _side_add(model, self.home, self.site.replace(":", "_").replace(".", "_"), holder)
        self.handle = self._register(submodule(model, self.owner), holder)

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

    @staticmethod
    def _hooks(module: nn.Module) -> dict[int, Any]:
        return module._forward_pre_hooks

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
        self.home = holder_home(model, "")
        watch = UsageWatch(model, self.rules)
        self.key = _side_add(model, self.home, "unused_rule_check", watch)
        self.handles = [model.register_forward_hook(watch.after_forward)]
        if self.heartbeat is not None:
            self.handles.append(submodule(model, self.heartbeat).register_forward_pre_hook(watch.before_forward))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["handles"] = [h for h in self.handles if _alive(h)]
        return state

    def undo(self, model: nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        _side_remove(model, self.home, self.key)
