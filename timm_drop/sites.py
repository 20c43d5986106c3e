"""Site discovery: the places in a timm model where a regularizer can go (DESIGN §4).

:func:`find_sites` is read-only analysis. It combines two passes:

1. **Shape pass.** One forward of a small example input in ``eval()`` under ``no_grad`` (so BatchNorm
   statistics do not move), with temporary hooks on every module that record the order in which modules start
   and finish, each module's first output shape, and the first inputs of composite modules. The default input
   comes from ``pretrained_cfg['input_size']``; models that accept any size are first tried at a small
   *non-square* size (2x3 times the model's largest feature reduction), which makes channels-first and
   channels-last maps tell themselves apart (their spatial aspect is the input's). Models with a fixed input
   size fall back to their configured size (``patch_embed.img_size``, then ``pretrained_cfg``).
2. **Block-local FX traces.** Every executed composite module (except the model root, torch containers, timm's
   not-traceable leaf classes and timm_drop's regularizers) is traced on its own with a
   :class:`LocalTracer` whose leaves are *all* of that module's submodules. Each operation therefore appears
   in the graph of exactly the module whose ``forward`` executes it. The eval-mode graph is re-run on the
   recorded inputs (an :class:`torch.fx.Interpreter`) to get every node's shape and to prove that the graph
   reproduces the module bit for bit (modules with the same class, generated code and input/output shapes,
   like the blocks of a ViT, share one such run); a module that fails to trace or to reproduce is *opaque*,
   with a reason, and offers no residual sites and no rewrite. Inputs that are None in the recorded call are
   specialised to None (FX would otherwise take ``if mask is not None`` branches the wrong way).

Kinds (``Site.kind``):

* ``stage`` — output of a ``feature_info`` module. The stem entry is excluded from stage numbering; entry 0
  is the stem when its module name has a ``stem`` component, is the model root (TResNet), or has a shallower
  module tree than the next entry (ResNet's ``act1``, MobileNetV3's ``bn1``, DenseNet's ``features.norm0``
  against stages holding blocks). Stages are numbered from 1 (resnet50 stage 3 = ``layer3``).
* ``block`` — output of each block of a stage: the members of the stage's block container (a torch
  container itself, the container child holding composite modules, e.g. ConvNeXt's ``stages.N.blocks``,
  or repeated composite children like RegNet's ``b1..bN``); a stage that owns skip adds itself (ViT's
  ``blocks.N``) is its own single block. Modules that run between two stages without being under either
  (EfficientNet's ``blocks.3``) contribute their blocks to the following stage.
* ``residual`` / ``shortcut`` / ``merge`` — a skip add: ``operator.add``, ``operator.iadd``, ``torch.add``
  or ``Tensor.add`` of two tensors of equal shape that both descend from the owning module's first input, one
  (the *shortcut*: identity or projection) strictly closer to that input than the other (the *residual*
  branch), counted in graph operations along the longest path, and reached from the input only through
  submodules, layout ops (view, permute, pooling, ...) or earlier skip merges. This excludes positional
  embeddings and attention biases (get_attr / constants), masks (other inputs), shape arithmetic (not
  tensors), broadcast adds, parallel branches of equal depth (RepVGG's ``conv_kxk(x) + conv_1x1(x)``) and
  sums of computed terms (rotary embeddings' ``q * cos + rotate(q) * sin``). Skip adds in the model root's
  own ``forward`` are not sites (rewriting the root would replace the model's class).
* ``norm`` — output of a normalization module (torch norm base classes, or any class in the MRO named
  ``...Norm``, ``...Norm2d``, ``...NormAct2d``, ``EvoNorm...``).
* ``module`` — output of any executed module (the root excluded) that returns a single tensor.

Stage of a module: the ``feature_info`` module it is under (qualified-name prefix); otherwise, by execution
order, the stage during which it ran (between the end of the previous stage module and the end of this one —
ResNet's ``maxpool`` is in stage 1); modules that ran before the first stage (or within the stem entry) are
stem and modules after the last stage are head, both with ``stage=None``.

Layout of a site tensor: 2-D ``NC``, 3-D ``NLC`` (tokens), 4-D ``NCHW`` or ``NHWC`` decided by which pair of
dimensions has the input's spatial aspect (ties broken by the module type: ``nn.LayerNorm`` outputs are
channels-last, other norms channels-first, everything else ``NCHW``); other ranks are ``None`` (no
regularizer accepts them).
"""

from __future__ import annotations

import inspect
import itertools
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

__all__ = ["LocalTracer", "Site", "SiteError", "find_sites", "analyze_model"]

SKIP_KINDS: tuple[str, ...] = ("residual", "shortcut", "merge")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_NORM_NAME = re.compile(
    r"^(?!Conv)(?!.*(Block|Stage|Layer$))(.*Norm(\d[dD])?(Act(\d[dD])?)?(Fp32)?|EvoNorm.*)$"
)
_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


class SiteError(ValueError):
    """Site discovery failed for a model (e.g. no example input could be run)."""


@dataclass(frozen=True)
class Site:
    """A place where a regularizer can act.

    Attributes:
        name: unique ``"<kind>:<path>"``; ``path`` is the module's qualified name, or for skip sites the
            owning module's name plus the add node (``"merge:layer3.0.add"``).
        kind: one of :data:`timm_drop.spec.SITE_KINDS`.
        stage: 1-based stage (stem excluded), None for stem / head.
        module: qualified name of the owning module (the module whose output it is, or that executes the add).
        classes: class names of that module's MRO, most derived first.
        shape: shape of the site's tensor in the shape pass (batch included).
        layout: ``"NCHW"``, ``"NHWC"``, ``"NLC"``, ``"NC"`` or None.
        depth: position in execution order over all sites (0 = earliest).
        node: FX node name of the add for skip sites, else None.
    """

    name: str
    kind: str
    stage: int | None
    module: str
    classes: tuple[str, ...]
    shape: tuple[int, ...] | None
    layout: str | None
    depth: int
    node: str | None = None

    @property
    def path(self) -> str:
        return self.name.split(":", 1)[1]


# ---------------------------------------------------------------------------------------------------------
# FX helpers
# ---------------------------------------------------------------------------------------------------------
def _notrace_modules() -> tuple[type, ...]:
    try:
        from timm.layers._fx import get_notrace_modules

        return tuple(get_notrace_modules())
    except Exception:  # older timm
        return ()


def _notrace_functions() -> tuple[Any, ...]:
    try:
        from timm.layers._fx import get_notrace_functions

        return tuple(get_notrace_functions())
    except Exception:
        return ()


class LocalTracer(fx.Tracer):
    """Traces one module's own ``forward``: every submodule is a leaf (``call_module`` node).

    This keeps timm's not-traceable layers, DropPath/DropBlock and timm_drop regularizers out of the graph
    (a regularizer traced through would bake its train-mode branch in), and makes each op appear in the graph
    of the module that executes it. timm's not-traceable functions stay ``call_function`` nodes.
    """

    def __init__(self, owner: nn.Module):
        # No math autowrapping: patching ~60 math functions into every traced module's globals dominated the
        # trace time, and math on traced tensors is rare in forward code (it then makes the module opaque).
        super().__init__(autowrap_modules=(), autowrap_functions=_notrace_functions())
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
    module: nn.Module, training: bool, none_args: tuple[str, ...] = ()
) -> tuple[fx.Graph, dict[str, torch.Tensor]]:
    """Trace ``module.forward`` with only ``module.training`` set to ``training``.

    ``none_args`` are specialised to None (as recorded in the shape pass): FX would otherwise take every
    ``if arg is None`` branch the wrong way. The generated code asserts they are still None at run time, and
    keeps the original parameter names so keyword callers work. Returns the graph and the tensor constants the
    tracer had to attach to the module (removed again, so that analysis leaves no trace; the rewriter
    re-attaches them).
    """
    before = set(module.__dict__)
    was = module.training
    module.training = training
    try:
        graph = LocalTracer(module).trace(module, concrete_args=dict.fromkeys(none_args) or None)
    finally:
        module.training = was
        consts = {k: module.__dict__.pop(k) for k in list(module.__dict__) if k not in before}
    if none_args:
        # FX renames specialised placeholders (``mask`` -> ``mask_1``); restore the signature's names.
        params = [p for p in inspect.signature(module.forward).parameters.values()]
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(params) == len(placeholders):
            for p, n in zip(params, placeholders):
                star = "*" if p.kind == p.VAR_POSITIONAL else "**" if p.kind == p.VAR_KEYWORD else ""
                n.target = star + p.name
    return graph, consts


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target == "add"


class _ShapeInterpreter(fx.Interpreter):
    """Runs a local graph on recorded inputs and keeps each node's tensor shape."""

    def __init__(self, module: nn.Module, graph: fx.Graph):
        super().__init__(module, garbage_collect_values=True, graph=graph)
        self.shapes: dict[str, tuple[int, ...] | None] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.shapes[n.name] = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        return result


def _outputs_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(
                torch.equal(a, b)
                or (
                    a.is_floating_point()
                    and torch.equal(a.isnan(), b.isnan())
                    and torch.equal(a.nan_to_num(), b.nan_to_num())
                )
            )
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_outputs_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_outputs_equal(a[k], b[k]) for k in a)
    return type(a) is type(b)


def skip_adds(graph: fx.Graph, shapes: dict[str, tuple[int, ...] | None]) -> list[tuple[fx.Node, int, int]]:
    """The skip adds of a local graph as ``(node, residual_arg_index, shortcut_arg_index)`` (module docstring)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return []
    source = placeholders[0]
    depth: dict[fx.Node, int] = {}
    for n in graph.nodes:
        if n is source:
            depth[n] = 0
            continue
        parents = [depth[p] for p in n.all_input_nodes if p in depth]
        if parents:
            depth[n] = max(parents) + (0 if n.op in ("get_attr", "placeholder") else 1)
    found = []
    for n in graph.nodes:
        if not _is_add(n) or len(n.args) < 2:
            continue
        a, b = n.args[0], n.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
            continue
        if a not in depth or b not in depth:
            continue
        sa, sb, so = shapes.get(a.name), shapes.get(b.name), shapes.get(n.name)
        if sa is None or sb is None or sa != sb or so != sa:
            continue
        if depth[a] == depth[b]:
            continue
        shortcut = b if depth[a] > depth[b] else a
        if not _stream_path(shortcut, source, depth, {}):
            continue
        found.append((n, 0, 1) if depth[a] > depth[b] else (n, 1, 0))
    return found


_LAYOUT_METHODS = frozenset(
    {
        "view",
        "reshape",
        "permute",
        "transpose",
        "flatten",
        "contiguous",
        "unsqueeze",
        "squeeze",
        "to",
        "float",
        "type",
        "type_as",
        "clone",
        "__getitem__",
        "unflatten",
        "expand_as",
        "view_as",
        "reshape_as",
    }
)
_LAYOUT_FUNCTIONS = frozenset(
    {
        operator.getitem,
        torch.flatten,
        torch.reshape,
        torch.permute,
        torch.transpose,
        torch.squeeze,
        torch.unsqueeze,
        torch.nn.functional.avg_pool2d,
        torch.nn.functional.max_pool2d,
        torch.nn.functional.adaptive_avg_pool2d,
        torch.nn.functional.interpolate,
        torch.nn.functional.pad,
    }
)


def _stream_path(
    node: fx.Node, source: fx.Node, depth: dict[fx.Node, int], memo: dict[fx.Node, bool]
) -> bool:
    """Whether ``node`` carries the block's input stream: reached from it only through submodules (identity,
    projection, pooling, scaling modules), layout ops, or earlier skip merges. This rejects the sum of two
    computed terms, e.g. rotary embeddings' ``q * cos + rotate(q) * sin``, whose shorter term is a product."""
    if node is source:
        return True
    if node in memo:
        return memo[node]
    memo[node] = False
    inputs = [p for p in node.all_input_nodes if p in depth]
    ok = False
    if (
        node.op == "call_module"
        or (node.op == "call_method" and node.target in _LAYOUT_METHODS)
        or (node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS)
    ):
        ok = bool(inputs) and _stream_path(inputs[0], source, depth, memo)
    elif _is_add(node):
        ok = any(_stream_path(p, source, depth, memo) for p in inputs)
    memo[node] = ok
    return ok


# ---------------------------------------------------------------------------------------------------------
# layouts, norms, stages
# ---------------------------------------------------------------------------------------------------------
def is_norm(module: nn.Module) -> bool:
    if isinstance(module, _TORCH_NORMS):
        return True
    return any(_NORM_NAME.search(c.__name__) for c in type(module).__mro__ if c not in (nn.Module, object))


def _mro(module: nn.Module) -> tuple[str, ...]:
    return tuple(c.__name__ for c in type(module).__mro__ if c not in (nn.Module, object))


def _aspect_ok(h: int, w: int, in_hw: tuple[int, int]) -> bool:
    ih, iw = in_hw
    if ih == iw:
        return h == w
    if h <= 0 or w <= 0:
        return False
    return abs(h / w - ih / iw) <= 0.2 * (ih / iw)


def infer_layout(
    shape: tuple[int, ...] | None, in_hw: tuple[int, int], module: nn.Module | None = None
) -> str | None:
    if shape is None:
        return None
    if len(shape) == 2:
        return "NC"
    if len(shape) == 3:
        return "NLC"
    if len(shape) != 4:
        return None
    _, a, b, c = shape
    nchw, nhwc = _aspect_ok(b, c, in_hw), _aspect_ok(a, b, in_hw)
    if nchw != nhwc:
        return "NCHW" if nchw else "NHWC"
    # Ambiguous (e.g. a square input with as many channels as pixels per side): nn.LayerNorm normalizes the
    # last dim, so its output is channels-last; LayerNorm2d & co. (a "2d" class in the MRO) are channels-first.
    if isinstance(module, nn.LayerNorm) and not any(n.endswith("2d") for n in _mro(module)):
        return "NHWC"
    return "NCHW"


def _subtree_depth(module: nn.Module) -> int:
    children = list(module.children())
    return 0 if not children else 1 + max(_subtree_depth(c) for c in children)


def _is_stem_entry(name: str, module: nn.Module, next_module: nn.Module | None) -> bool:
    if name == "":
        return True
    if any(part.startswith("stem") or part.endswith("stem") for part in name.split(".")):
        return True
    # A stage holds blocks, a stem is a layer or two: a shallower module tree than the next entry's.
    return next_module is not None and _subtree_depth(module) < _subtree_depth(next_module)


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def _composite(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def _torch_forward(module: nn.Module) -> bool:
    fwd = getattr(type(module), "forward", None)
    return fwd is None or getattr(fwd, "__module__", "").startswith("torch.")


# ---------------------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------------------
@dataclass
class LocalGraph:
    """A traced module: its eval graph (and train graph if its forward branches on ``self.training``)."""

    eval_graph: fx.Graph
    train_graph: fx.Graph | None
    constants: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...] | None]
    adds: list[tuple[str, int, int]]
    verified: bool = False
    train_checked: bool = False
    none_args: tuple[str, ...] = ()


@dataclass
class Analysis:
    """Everything :func:`find_sites` learned; the rewriter reuses the traced graphs."""

    sites: list[Site]
    stages: dict[str, int | None]  # feature module -> stage (None for the stem entry)
    module_stage: dict[str, int | None]
    graphs: dict[str, LocalGraph]
    opaque: dict[str, str]  # module qualname -> reason skip sites are unavailable there
    calls: dict[str, int]
    input_shape: tuple[int, ...]
    inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict, repr=False)
    outputs: dict[str, Any] = field(default_factory=dict, repr=False)
    twins: dict[Any, Any] = field(default_factory=dict, repr=False)

    def rewritable(self, model: nn.Module, name: str) -> tuple[LocalGraph | None, str | None]:
        """The verified local graph of ``name`` (train graph traced too), or None and the reason it is opaque."""
        if name in self.opaque:
            return None, self.opaque[name]
        lg = self.graphs.get(name)
        if lg is None:
            return None, f"module {name!r} was not traced"
        m = model.get_submodule(name)
        if not lg.verified:
            reason = _verify(model, m, lg, self.inputs.get(name), self.outputs.get(name), self.twins)
            if reason:
                self.opaque[name] = reason
                return None, reason
        if not lg.train_checked:
            try:
                g_train, consts = trace_local(m, True, lg.none_args)
            except Exception as exc:
                self.opaque[name] = (
                    f"{type(m).__name__} is not FX-traceable in training mode ({_first_line(exc)})"
                )
                return None, self.opaque[name]
            if g_train.python_code("self").src != lg.eval_graph.python_code("self").src:
                tnodes = {n.name: n for n in g_train.nodes}
                if any(a not in tnodes or not _is_add(tnodes[a]) for a, _, _ in lg.adds):
                    self.opaque[name] = f"{type(m).__name__} has a training-mode graph whose skip adds differ"
                    return None, self.opaque[name]
                lg.train_graph = g_train
                lg.constants.update(consts)
            lg.train_checked = True
        return lg, None


def _default_inputs(model: nn.Module, example_input: Any) -> list[Any]:
    if example_input is not None:
        return [example_input]
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans, h, w = tuple(cfg.get("input_size", (3, 224, 224)))
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and first_conv.in_channels != chans:
        chans = first_conv.in_channels
    sizes: list[tuple[int, int]] = []
    fixed = bool(cfg.get("fixed_input_size", False))
    reductions = [d.get("reduction", 1) for d in _feature_info(model)] or [32]
    r = max(int(x) for x in reductions if isinstance(x, (int, float))) if reductions else 32
    r = max(r, 8)
    if not fixed:
        sizes.append((2 * r, 3 * r))
    img = getattr(getattr(model, "patch_embed", None), "img_size", None) or getattr(model, "img_size", None)
    if isinstance(img, int):
        img = (img, img)
    if isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(i, int) for i in img):
        sizes.append((int(img[0]), int(img[1])))
    sizes.append((int(h), int(w)))
    out = []
    for s in dict.fromkeys(sizes):
        out.append(torch.randn(1, chans, *s, device=device, dtype=dtype, generator=None))
    return out


def _feature_info(model: nn.Module) -> list[dict[str, Any]]:
    fi = getattr(model, "feature_info", None)
    if fi is None:
        return []
    info = getattr(fi, "info", fi)
    try:
        return [dict(d) for d in info if isinstance(d, dict) and "module" in d]
    except TypeError:
        return []


def _input_hw(x: Any) -> tuple[int, int]:
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return int(x.shape[-2]), int(x.shape[-1])
    return (0, 0)


def _clone(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (tuple, list)):
        return type(v)(_clone(x) for x in v) if isinstance(v, tuple) else [_clone(x) for x in v]
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    return v


class _Recorder:
    """Temporary hooks of the shape pass."""

    def __init__(self, model: nn.Module, capture: set[str]):
        self.clock = 0
        self.start: dict[str, int] = {}
        self.end: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.out: dict[str, Any] = {}
        self.inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.handles: list[Any] = []
        for name, m in model.named_modules():
            self.handles.append(
                m.register_forward_pre_hook(self._pre(name, name in capture), with_kwargs=True)
            )
            self.handles.append(m.register_forward_hook(self._post(name, name in capture)))

    def _pre(self, name: str, capture: bool):
        def hook(module, args, kwargs):
            self.clock += 1
            self.calls[name] = self.calls.get(name, 0) + 1
            if name not in self.start:
                self.start[name] = self.clock
                if capture:
                    self.inputs[name] = (_clone(args), _clone(kwargs))
            return None

        return hook

    def _post(self, name: str, capture: bool):
        def hook(module, args, output):
            self.clock += 1
            if name not in self.end:
                self.end[name] = self.clock
                self.out[name] = (
                    tuple(output.shape)
                    if isinstance(output, torch.Tensor)
                    else ("tuple" if output is not None else None)
                )
                if capture:
                    self.out["\0" + name] = _clone(output)
            return None

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _shape_pass(model: nn.Module, inputs: list[Any], capture: set[str]) -> tuple[_Recorder, Any]:
    modes = {m: m.training for m in model.modules()}
    errors = []
    try:
        model.eval()
        for x in inputs:
            rec = _Recorder(model, capture)
            try:
                with torch.no_grad():
                    if isinstance(x, dict):
                        model(**x)
                    elif isinstance(x, (tuple, list)):
                        model(*x)
                    else:
                        model(x)
                return rec, x
            except Exception as exc:  # try the next candidate size
                errors.append(
                    f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                )
            finally:
                rec.remove()
    finally:
        for m, t in modes.items():
            m.training = t
    raise SiteError(
        f"could not run {type(model).__name__} on any example input for the shape pass "
        f"({'; '.join(errors)}); pass example_input="
    )


def analyze_model(model: nn.Module, example_input: Any = None) -> Analysis:
    """Run both passes (module docstring) and return the sites plus what the rewriter needs."""
    from timm_drop.regularizers.base import Regularizer

    named = dict(model.named_modules())
    leaf_classes = _notrace_modules()
    traceable: set[str] = set()
    opaque: dict[str, str] = {}
    for name, m in named.items():
        if name == "" or not _composite(m) or isinstance(m, Regularizer):
            continue
        if _torch_forward(m):
            continue
        if leaf_classes and isinstance(m, leaf_classes):
            if not is_norm(m):
                opaque[name] = f"{type(m).__name__} is a timm not-traceable (FX leaf) module"
            continue
        traceable.add(name)

    rec, used_input = _shape_pass(model, _default_inputs(model, example_input), traceable)
    in_hw = _input_hw(used_input if not isinstance(used_input, (tuple, list)) else used_input[0])
    input_shape = tuple(used_input.shape) if isinstance(used_input, torch.Tensor) else ()

    # -- stages -------------------------------------------------------------------------------------------
    finfo = [d for d in _feature_info(model) if d["module"] in named and d["module"] in rec.end]
    stages: dict[str, int | None] = {}
    if finfo:
        first = finfo[0]["module"]
        nxt = named[finfo[1]["module"]] if len(finfo) > 1 else None
        stem = len(finfo) > 1 and _is_stem_entry(first, named[first], nxt)
        k = 0
        for i, d in enumerate(finfo):
            if i == 0 and stem:
                stages[d["module"]] = None
            else:
                k += 1
                stages[d["module"]] = k
    ordered = sorted(stages, key=lambda n: rec.end[n])
    stage_mods = [n for n in ordered if stages[n] is not None]
    stem_mods = [n for n in ordered if stages[n] is None]

    def stage_of(name: str) -> int | None:
        best = None
        for s in stages:
            if s == "" and name != "":
                continue
            if (name == s or name.startswith(s + ".") or s == "") and (best is None or len(s) > len(best)):
                best = s
        if best is not None:
            return stages[best]
        if name not in rec.end or not stage_mods:
            return None
        s0, e0 = rec.start[name], rec.end[name]
        stem_end = rec.end[stem_mods[0]] if stem_mods else None
        if stem_end is not None and e0 <= stem_end:
            return None
        if stem_end is None and s0 < rec.start[stage_mods[0]]:
            return None
        prev_end = stem_end if stem_end is not None else -1
        for s in stage_mods:
            if s0 > prev_end and e0 <= rec.end[s]:
                return stages[s]
            prev_end = rec.end[s]
        return None

    module_stage = {n: stage_of(n) for n in named}

    # -- local graphs -------------------------------------------------------------------------------------
    graphs: dict[str, LocalGraph] = {}
    twins: dict[Any, Any] = {}
    for name in sorted(traceable, key=lambda n: rec.start.get(n, 1 << 60)):
        if name not in rec.inputs:
            continue  # never ran
        m = named[name]
        try:
            g_eval, consts = trace_local(m, False, none_inputs(m, rec.inputs[name]))
        except Exception as exc:
            opaque[name] = (
                f"{type(m).__name__} is not FX-traceable ({type(exc).__name__}: {_first_line(exc)})"
            )
            rec.inputs.pop(name, None)
            continue
        lg = LocalGraph(g_eval, None, consts, {}, [], none_args=none_inputs(m, rec.inputs[name]))
        graphs[name] = lg
        if _candidate_adds(g_eval):
            reason = _verify(model, m, lg, rec.inputs[name], rec.out.get("\0" + name), twins)
            if reason:
                opaque[name] = reason
                del graphs[name]
                continue
            lg.adds = [(n.name, r, s) for n, r, s in skip_adds(g_eval, lg.shapes)]

    # -- sites ----------------------------------------------------------------------------------------------
    raw: list[tuple[tuple[int, int], Site]] = []

    def add_site(
        kind: str,
        path: str,
        module: str,
        shape: Any,
        key: tuple[int, int],
        node: str | None = None,
        layout_module: nn.Module | None = None,
    ) -> None:
        shape = shape if isinstance(shape, tuple) and all(isinstance(s, int) for s in shape) else None
        if shape is None:
            return
        site = Site(
            name=f"{kind}:{path}",
            kind=kind,
            stage=module_stage.get(module),
            module=module,
            classes=_mro(named[module]),
            shape=shape,
            layout=infer_layout(shape, in_hw, layout_module),
            depth=0,
            node=node,
        )
        raw.append((key, site))

    for s in stages:
        if stages[s] is not None:
            add_site("stage", s, s, rec.out.get(s), (rec.end[s], 2))
    for b in _blocks(model, named, stages, stage_mods, module_stage, graphs, rec):
        add_site("block", b, b, rec.out.get(b), (rec.end[b], 1))
    for name, lg in graphs.items():
        order = {n.name: i for i, n in enumerate(lg.eval_graph.nodes)}
        total = len(order)
        for node, _r, _s in lg.adds:
            key = (rec.end[name], -(total - order[node]) - 10)
            path = f"{name}.{node}"
            mod = named[name]
            add_site("residual", path, name, lg.shapes.get(node), (key[0], key[1] - 2), node, mod)
            add_site("shortcut", path, name, lg.shapes.get(node), (key[0], key[1] - 1), node, mod)
            add_site("merge", path, name, lg.shapes.get(node), key, node, mod)
    for name, m in named.items():
        if (
            name == ""
            or name not in rec.end
            or isinstance(m, Regularizer)
            or getattr(m, "_timm_drop_internal", False)
        ):
            continue
        if is_norm(m):
            add_site("norm", name, name, rec.out.get(name), (rec.end[name], 0), layout_module=m)
        add_site("module", name, name, rec.out.get(name), (rec.end[name], 0), layout_module=m)
    raw.sort(key=lambda t: t[0])
    sites = [
        Site(s.name, s.kind, s.stage, s.module, s.classes, s.shape, s.layout, i, s.node)
        for i, (_, s) in enumerate(raw)
    ]
    outputs = {k[1:]: v for k, v in rec.out.items() if k.startswith("\0")}
    return Analysis(
        sites, stages, module_stage, graphs, opaque, dict(rec.calls), input_shape, rec.inputs, outputs, twins
    )


def _candidate_adds(graph: fx.Graph) -> bool:
    """Cheap structural pre-filter: an add of two nodes that both descend from the first input."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return False
    reach = {placeholders[0]}
    for n in graph.nodes:
        if n not in reach and any(p in reach for p in n.all_input_nodes):
            reach.add(n)
        if _is_add(n) and len(n.args) >= 2 and all(isinstance(a, fx.Node) and a in reach for a in n.args[:2]):
            return True
    return False


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in value.items())
    return value if isinstance(value, (int, float, bool, str, type(None))) else type(value)


def _verify(
    model: nn.Module, m: nn.Module, lg: LocalGraph, inputs: Any, expected: Any, twins: dict[Any, Any]
) -> str | None:
    """Run the eval graph on the recorded inputs in eval mode; fill shapes; None if it reproduces ``m``.

    Twins (same class, same generated code, same input and output shapes; e.g. the 24 blocks of a ViT-L)
    share one verification: their graphs are the same program on same-shaped tensors.
    """
    if inputs is None:
        return f"{type(m).__name__} did not run in the shape pass"
    key = (type(m), lg.eval_graph.python_code("self").src, _signature(inputs), _signature(expected))
    if key in twins:
        if isinstance(twins[key], str):
            return twins[key]
        lg.shapes, lg.verified = dict(twins[key]), True
        return None
    reason = _verify_run(model, m, lg, inputs, expected)
    twins[key] = reason if reason else lg.shapes
    return reason


def _verify_run(model: nn.Module, m: nn.Module, lg: LocalGraph, inputs: Any, expected: Any) -> str | None:
    args, kwargs = inputs
    modes = {mod: mod.training for mod in model.modules()}
    added = [k for k in lg.constants if k not in m.__dict__]
    m.__dict__.update({k: lg.constants[k] for k in added})
    interp = _ShapeInterpreter(m, lg.eval_graph)
    try:
        model.eval()
        with torch.no_grad():
            result = _run_kw(interp, lg.eval_graph, args, kwargs)
    except Exception as exc:
        return f"the FX graph of {type(m).__name__} does not run ({type(exc).__name__}: {_first_line(exc)})"
    finally:
        for mod, t in modes.items():
            mod.training = t
        for k in added:
            m.__dict__.pop(k, None)
    if not _outputs_equal(result, expected):
        return f"the FX graph of {type(m).__name__} does not reproduce its output"
    lg.shapes = dict(interp.shapes)
    lg.verified = True
    return None


def _run_kw(interp: fx.Interpreter, graph: fx.Graph, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= 160 else line[:157] + "..."


def _blocks(
    model: nn.Module,
    named: dict[str, nn.Module],
    stages: dict[str, int | None],
    stage_mods: list[str],
    module_stage: dict[str, int | None],
    graphs: dict[str, LocalGraph],
    rec: _Recorder,
) -> list[str]:
    """Block modules of every stage (module docstring)."""
    roots: list[str] = list(stage_mods)
    # maximal modules that ran inside a stage's time window without being under a stage module
    under_stage = {n for n in named if any(n == s or n.startswith(s + ".") for s in stage_mods)}
    for n, m in named.items():
        if n == "" or n in under_stage or module_stage.get(n) is None or not _composite(m):
            continue
        parent = n.rpartition(".")[0]
        if parent and module_stage.get(parent) is not None and parent not in under_stage:
            continue
        roots.append(n)
    blocks: list[str] = []
    for r in roots:
        for b in _stage_blocks(r, named, graphs):
            if b in rec.end and b not in blocks:
                blocks.append(b)
    return blocks


def _children(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    prefix = f"{name}." if name else ""
    return [(prefix + k, c) for k, c in module.named_children()]


def _flatten_container(name: str, module: nn.Module) -> list[str]:
    out = []
    for cn, c in _children(name, module):
        if _is_container(c):
            out.extend(_flatten_container(cn, c))
        elif _composite(c) and not is_norm(c):
            out.append(cn)
    return out


def _stage_blocks(name: str, named: dict[str, nn.Module], graphs: dict[str, LocalGraph]) -> list[str]:
    m = named[name]
    if _is_container(m):
        return _flatten_container(name, m)
    if name in graphs and graphs[name].adds:
        return [name]
    holders = [
        (cn, c)
        for cn, c in _children(name, m)
        if _is_container(c) and any(_composite(g) and not is_norm(g) for g in c.children())
    ]
    if holders:
        cn, c = max(holders, key=lambda t: sum(1 for g in t[1].children() if _composite(g)))
        return _flatten_container(cn, c)
    comps = [(cn, c) for cn, c in _children(name, m) if _composite(c) and not is_norm(c)]
    classes = {type(c) for _, c in comps}

    def block_like(cn: str, c: nn.Module) -> bool:
        # a block owns a skip add or several composite layers (RegNet's b1..bN); a conv-norm-act branch
        # (Inception's Mixed_* children) does not
        return bool(cn in graphs and graphs[cn].adds) or sum(1 for g in c.children() if _composite(g)) >= 2

    if comps and len(classes) == 1 and all(block_like(cn, c) for cn, c in comps):
        return [cn for cn, _ in comps]
    return [name]


def find_sites(model: nn.Module, example_input: Any = None) -> list[Site]:
    """All sites of ``model`` in execution order (see the module docstring). Leaves the model unchanged."""
    return analyze_model(model, example_input).sites
