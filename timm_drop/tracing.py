"""The block-local FX toolkit: trace one module's own ``forward``, re-run a graph on recorded values, compare.

Site discovery (:mod:`timm_drop.sites`) and the block-local rewrite (:mod:`timm_drop.block_rewrite`) both work on
the graph of *one* module with every submodule a leaf (:class:`LocalTracer`), so each operation appears in the
graph of the module whose ``forward`` executes it. This module holds what they share: the tracer and
:func:`trace_local` (None-specialised inputs, Python flags such as ``grad_checkpointing`` fixed for the trace),
the functions a trace keeps as calls (timm's not-traceable functions, activation-checkpoint helpers), the graph
a rewritten module compiled (:func:`local_graph`), running a graph on recorded inputs (:class:`ShapeInterpreter`,
:func:`run_kw`) and bit-identity of outputs (:func:`outputs_equal`).
"""

from __future__ import annotations

import copy
import inspect
import operator
from typing import Any

import torch
from timm.layers._fx import get_notrace_functions, get_notrace_modules
from torch import fx, nn

from timm_drop.names import CHILD_PREFIX

__all__ = [
    "CONFIG_FLAGS",
    "LocalTracer",
    "ShapeInterpreter",
    "checkpoint_functions",
    "config_flags",
    "first_line",
    "is_add",
    "is_ours",
    "local_graph",
    "none_inputs",
    "notrace_modules",
    "outputs_equal",
    "run_kw",
    "trace_local",
]

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def notrace_modules() -> tuple[type, ...]:
    return tuple(get_notrace_modules())


def notrace_functions() -> tuple[Any, ...]:
    return tuple(get_notrace_functions()) + checkpoint_functions()


def checkpoint_functions() -> tuple[Any, ...]:
    """Activation-checkpoint helpers a forward may call (timm's ``checkpoint_seq`` / ``checkpoint`` when its
    ``grad_checkpointing`` is on; torch's): they stay ``call_function`` nodes, so a rewritten forward still
    checkpoints what the original did."""
    import torch.utils.checkpoint as torch_checkpoint
    from timm.models import _manipulate

    found = [torch_checkpoint.checkpoint, torch_checkpoint.checkpoint_sequential]
    found += [getattr(_manipulate, n) for n in ("checkpoint", "checkpoint_seq") if hasattr(_manipulate, n)]
    return tuple(found)


#: Python flags of a module whose value selects the code its forward runs, besides ``training``: a rewritten
#: module has a graph per value (timm's ``set_grad_checkpointing`` sets ``grad_checkpointing`` on stages).
CONFIG_FLAGS: tuple[str, ...] = ("grad_checkpointing",)


def config_flags(module: nn.Module) -> tuple[str, ...]:
    """The :data:`CONFIG_FLAGS` this module holds as a bool."""
    return tuple(f for f in CONFIG_FLAGS if isinstance(module.__dict__.get(f), bool))


class LocalTracer(fx.Tracer):
    """Traces one module's own ``forward``: every submodule is a leaf (``call_module`` node).

    This keeps timm's not-traceable layers, DropPath/DropBlock and timm_drop regularizers out of the graph
    (a regularizer traced through would bake its train-mode branch in), and makes each op appear in the graph
    of the module that executes it. timm's not-traceable functions and the activation-checkpoint helpers stay
    ``call_function`` nodes.
    """

    def __init__(self, owner: nn.Module):
        # No math autowrapping: patching ~60 math functions into every traced module's globals dominated the
        # trace time, and math on traced tensors is rare in forward code (it then makes the module opaque).
        super().__init__(autowrap_modules=(), autowrap_functions=notrace_functions())
        self._owner = owner

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self._owner


def none_inputs(module: nn.Module, inputs: Any) -> tuple[str, ...]:
    """Names of ``forward`` parameters that were None (passed or by default) in the recorded call."""
    if inputs is None:
        return ()
    args, kwargs = inputs
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return ()
    bound.apply_defaults()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(module.forward).parameters
    return tuple(k for k, v in bound.arguments.items() if v is None and params[k].kind in kinds)


def trace_local(
    module: nn.Module,
    training: bool,
    none_args: tuple[str, ...] = (),
    flags: dict[str, bool] | None = None,
) -> tuple[fx.Graph, dict[str, torch.Tensor]]:
    """Trace ``module.forward`` with ``module.training`` set to ``training`` (and ``flags``, e.g.
    ``{"grad_checkpointing": True}``, set on the module for the trace only).

    ``none_args`` are specialised to None: FX would otherwise take every ``if arg is None`` branch the wrong
    way. The graph has no check that they are None (a rewritten module picks the graph traced for the Nones of
    each call, :mod:`timm_drop.insertions`), and keeps the original parameter names so keyword callers work.
    Returns the graph and the tensor constants the tracer had to attach to the module (removed again, so that
    analysis leaves no trace; the rewriter re-attaches them).
    """
    before = set(module.__dict__)
    was = module.training
    saved = {k: module.__dict__[k] for k in flags or {}}
    module.training = training
    module.__dict__.update(flags or {})
    try:
        graph = LocalTracer(module).trace(module, concrete_args=dict.fromkeys(none_args) or None)
    finally:
        module.training = was
        module.__dict__.update(saved)
        consts = {k: module.__dict__.pop(k) for k in list(module.__dict__) if k not in before}
    if none_args:
        # FX renames specialised placeholders (``mask`` -> ``mask_1``); restore the signature's names.
        params = [p for p in inspect.signature(module.forward).parameters.values()]
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(params) == len(placeholders):
            for p, n in zip(params, placeholders):
                star = "*" if p.kind == p.VAR_POSITIONAL else "**" if p.kind == p.VAR_KEYWORD else ""
                n.target = star + p.name
        # FX guards each specialised input with a call of its private ``_assert_is_none``; generated code holding
        # that call registers it for patching in every later trace of the process (torch.fx then fails on any
        # module). The rewritten module checks the Nones itself before it runs this graph.
        for n in list(graph.nodes):
            if n.op == "call_function" and getattr(n.target, "__name__", "") == "_assert_is_none":
                graph.erase_node(n)
    return graph, consts


def is_ours(node: fx.Node) -> bool:
    """A regularizer an earlier rewrite put in: it does not lengthen the path it sits on."""
    return node.op == "call_module" and str(node.target).startswith(CHILD_PREFIX)


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target == "add"


class ShapeInterpreter(fx.Interpreter):
    """Runs a local graph on recorded inputs and keeps each node's tensor shape."""

    def __init__(self, module: nn.Module, graph: fx.Graph):
        super().__init__(module, garbage_collect_values=True, graph=graph)
        self.shapes: dict[str, tuple[int, ...] | None] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.shapes[n.name] = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        return result


def outputs_equal(a: Any, b: Any) -> bool:
    """Bit-identical (NaNs in the same places); on the meta device only shapes and dtypes can be compared (a
    rewrite of a meta-device model is checked bit for bit on its first forward with real weights instead)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and (
                a.is_meta
                or b.is_meta
                or bool(
                    torch.equal(a, b)
                    or (
                        a.is_floating_point()
                        and torch.equal(a.isnan(), b.isnan())
                        and torch.equal(a.nan_to_num(), b.nan_to_num())
                    )
                )
            )
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(outputs_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(outputs_equal(a[k], b[k]) for k in a)
    return type(a) is type(b)


def local_graph(
    module: nn.Module, training: bool, none_args: tuple[str, ...]
) -> tuple[fx.Graph | None, dict[str, torch.Tensor]]:
    """The module's own graph in ``training`` mode: a copy of the graph an earlier rewrite compiled (None for
    the train graph of a rewrite with a single graph), else a fresh :func:`trace_local`."""
    graphs = getattr(type(module), "_timm_drop_graphs", None)
    if graphs is None:
        return trace_local(module, training, none_args)
    graph = graphs[1] if training else graphs[0]
    return (copy.deepcopy(graph) if graph is not None else None), {}


def run_kw(interp: fx.Interpreter, graph: fx.Graph, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # fx.Interpreter.run is positional: map keyword inputs onto the remaining placeholders in order.
    ph = [n for n in graph.nodes if n.op == "placeholder"]
    full = list(args)
    for n in ph[len(args) :]:
        key = n.target.lstrip("*")
        if key in kwargs:
            full.append(kwargs[key])
        elif n.args:
            full.append(n.args[0])
        else:
            raise TypeError(f"missing input {key!r}")
    return interp.run(*full)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= 160 else line[:157] + "..."

