"""Site discovery: the places in a timm model where a regularizer can go.

:func:`find_sites` is read-only analysis. It combines two passes:

1. **Shape pass.** One forward of a small example input in ``eval()`` under ``no_grad`` (so BatchNorm
   statistics do not move), with temporary hooks on every module that record the order in which modules start
   and finish, each module's first output shape, and the first inputs of composite modules. The default input
   comes from ``pretrained_cfg['input_size']`` (channels: the config's, then the first convolution's, for
   ``in_chans`` models); models that accept any size are first tried at a small
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
   specialised to None (FX would otherwise take ``if mask is not None`` branches the wrong way). A module an
   earlier :func:`~timm_drop.apply_regularizer` rewrote is not re-traced: its compiled graph is reused, so a
   rewritten model can be planned and stacked on again.

Kinds (``Site.kind``):

* ``stage`` — output of a ``feature_info`` module, numbered from 1 without the stem entry
  (:func:`timm_drop.structure.feature_stages`; resnet50 stage 3 = ``layer3``). A stage module that returns a
  list or tuple of tensors gives one site per tensor *branch*, named ``stage:<module>[i]`` (``Site.branch = i``,
  shape and layout of that branch): every branch that is a map (``NCHW`` / ``NHWC``) or a token sequence with a
  patch grid (:func:`timm_drop.structure.token_grid`), or, when none is, every tensor branch with a layout (so
  a method that needs a map keeps its named refusal). Other branches pass through untouched (PiT's class
  tokens, EfficientViM's hidden state) and a branch that is the same tensor as an earlier one (EfficientViM's
  last stage returns its map twice) is that one's site. The regularizer replaces its branch in a container of
  the same type. HRNet: stage ``i`` is the paper's stage ``i`` — ``layer1`` (one branch), ``stage2`` ..
  ``stage4`` (2, 3, 4 resolution branches, each regularized), as the module names in its ``feature_info``
  say; the features a ``features_only`` HRNet returns all come out of ``stage4`` (through its ``incre_modules``),
  so a stage rule regularizes every output resolution downstream of that stage. CrossViT: stage ``i`` is
  ``blocks.{i-1}``, both token branches (each on its own patch grid).
* ``block`` — output of each block of a stage (:func:`timm_drop.structure.stage_blocks`). Modules that run
  between two stages without being under either (EfficientNet's ``blocks.3``) contribute their blocks to the
  following stage. :func:`find_blocks` lists them; ``LayerOut(unit="block")`` uses the same list.
* ``residual`` / ``shortcut`` / ``merge`` — a skip add: ``operator.add``, ``operator.iadd``, ``torch.add``
  or ``Tensor.add`` of two tensors of equal shape that both descend from the owning module's first input, one
  (the *shortcut*: identity or projection) strictly closer to that input than the other (the *residual*
  branch), counted in graph operations along the longest path, and reached from the input only through
  submodules, layout ops (view, permute, pooling, ...) or earlier skip merges. This excludes positional
  embeddings and attention biases (get_attr / constants), masks (other inputs), shape arithmetic (not
  tensors), broadcast adds, parallel branches of equal depth (RepVGG's ``conv_kxk(x) + conv_1x1(x)``) and
  sums of computed terms (rotary embeddings' ``q * cos + rotate(q) * sin``). Skip adds in the model root's
  own ``forward`` are not sites (rewriting the root would replace the model's class).
* ``norm`` — output of a normalization module (:func:`timm_drop.structure.is_norm`).
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

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from timm_drop.errors import SiteError
from timm_drop.shape_pass import Recorder, default_inputs, input_hw, shape_pass
from timm_drop.structure import (
    composite,
    feature_stages,
    is_container,
    is_norm,
    mro_names,
    stage_blocks,
    token_grid,
    torch_forward,
)
from timm_drop.tracing import (
    CONFIG_FLAGS,
    LocalTracer,
    ShapeInterpreter,
    config_flags,
    first_line,
    is_add,
    is_ours,
    local_graph,
    none_inputs,
    notrace_modules,
    outputs_equal,
    run_kw,
    trace_local,
)

# CONFIG_FLAGS, LocalTracer, config_flags, none_inputs, trace_local: re-exported from timm_drop.tracing
__all__ = [
    "CONFIG_FLAGS",
    "Analysis",
    "LocalTracer",
    "Site",
    "SiteError",
    "analyze_model",
    "find_blocks",
    "find_sites",
    "config_flags",
    "is_norm",
    "none_inputs",
    "trace_local",
]

SKIP_KINDS: tuple[str, ...] = ("residual", "shortcut", "merge")


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
        branch: for a stage module returning a list or tuple, the index of the tensor this site is; else None.
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
    branch: int | None = None

    @property
    def path(self) -> str:
        return self.name.split(":", 1)[1]


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
            depth[n] = max(parents) + (0 if n.op in ("get_attr", "placeholder") or is_ours(n) else 1)
    found = []
    for n in graph.nodes:
        if not is_add(n) or len(n.args) < 2:
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
    elif is_add(node):
        ok = any(_stream_path(p, source, depth, memo) for p in inputs)
    memo[node] = ok
    return ok


# ---------------------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------------------
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
    if isinstance(module, nn.LayerNorm) and not any(n.endswith("2d") for n in mro_names(module)):
        return "NHWC"
    return "NCHW"


# ---------------------------------------------------------------------------------------------------------
# analysis results (read-only once built)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalGraph:
    """A traced module's eval graph, verified (shapes filled) when it has candidate skip adds."""

    eval_graph: fx.Graph
    constants: dict[str, torch.Tensor]
    none_args: tuple[str, ...] = ()
    shapes: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    adds: tuple[tuple[str, int, int], ...] = ()
    verified: bool = False


@dataclass(frozen=True)
class RewriteTarget:
    """What a block-local rewrite of one module needs: its verified graphs (``train_graph`` when its forward
    branches on ``self.training``), skip adds, tensor constants and None-specialised inputs."""

    eval_graph: fx.Graph
    train_graph: fx.Graph | None
    adds: tuple[tuple[str, int, int], ...]
    constants: dict[str, torch.Tensor]
    none_args: tuple[str, ...]
    exact: bool = True  # verified bit for bit (False on the meta device: shapes and dtypes only)


@dataclass(frozen=True)
class Analysis:
    """Everything :func:`analyze_model` learned; nothing mutates it afterwards."""

    sites: list[Site]
    stages: dict[str, int | None]  # feature module -> stage (None for the stem entry)
    module_stage: dict[str, int | None]
    graphs: dict[str, LocalGraph]
    opaque: dict[str, str]  # module qualname -> reason skip sites are unavailable there
    calls: dict[str, int]
    input_shape: tuple[int, ...]
    inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict, repr=False)
    outputs: dict[str, Any] = field(default_factory=dict, repr=False)
    example_given: bool = False  # the shape pass ran on the caller's example_input (relative sizes resolve there)


def rewrite_target(
    model: nn.Module, analysis: Analysis, name: str, twins: dict[Any, Any]
) -> tuple[RewriteTarget | None, str | None]:
    """The verified graphs of module ``name`` for a rewrite (train graph traced too), or None and the reason it
    cannot be rewritten. ``twins`` caches verification runs across calls; ``analysis`` is not changed."""
    if name in analysis.opaque:
        return None, analysis.opaque[name]
    lg = analysis.graphs.get(name)
    if lg is None:
        return None, f"module {name!r} was not traced"
    m = model.get_submodule(name)
    if is_container(m):
        # a features_only wrapper nested in a model (a hybrid ViT's backbone, segmentation_models_pytorch's
        # encoder): its original forward, which a rewrite falls back to, would run regularizer children as layers
        return None, f"{type(m).__name__} is a container whose forward runs every module it holds"
    if not lg.verified:
        reason, _ = _verify(model, m, lg, analysis.inputs.get(name), analysis.outputs.get(name), twins)
        if reason:
            return None, reason
    constants = dict(lg.constants)
    try:
        g_train, consts = local_graph(m, True, lg.none_args)
    except Exception as exc:
        return None, f"{type(m).__name__} is not FX-traceable in training mode ({first_line(exc)})"
    if g_train is not None and g_train.python_code("self").src == lg.eval_graph.python_code("self").src:
        g_train = None
    if g_train is not None:
        tnodes = {n.name: n for n in g_train.nodes}
        if any(a not in tnodes or not is_add(tnodes[a]) for a, _, _ in lg.adds):
            return None, f"{type(m).__name__} has a training-mode graph whose skip adds differ"
        constants.update(consts)
    exact = not _any_meta(analysis.inputs.get(name))
    return RewriteTarget(lg.eval_graph, g_train, lg.adds, constants, lg.none_args, exact), None


def _any_meta(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_meta
    if isinstance(value, (tuple, list)):
        return any(_any_meta(v) for v in value)
    if isinstance(value, dict):
        return any(_any_meta(v) for v in value.values())
    return False


# ---------------------------------------------------------------------------------------------------------
# the analysis, step by step
# ---------------------------------------------------------------------------------------------------------
def analyze_model(model: nn.Module, example_input: Any = None) -> Analysis:
    """Run both passes (module docstring) and return the sites plus what the rewriter needs."""
    named = dict(model.named_modules())
    traceable, opaque = _traceable_modules(named)
    rec, used_input = shape_pass(model, default_inputs(model, example_input), traceable)
    stages = feature_stages(model, keep=lambda name: name in rec.end)
    module_stage = _module_stages(named, stages, rec)
    graphs = _local_graphs(model, named, traceable, rec, opaque)
    sites = _emit_sites(model, named, stages, module_stage, graphs, rec, used_input)
    input_shape = tuple(used_input.shape) if isinstance(used_input, torch.Tensor) else ()
    outputs = {k[1:]: v for k, v in rec.out.items() if k.startswith("\0")}
    return Analysis(
        sites, stages, module_stage, graphs, opaque, dict(rec.calls), input_shape, rec.inputs, outputs,
        example_given=example_input is not None,
    )


def _traceable_modules(named: dict[str, nn.Module]) -> tuple[set[str], dict[str, str]]:
    """Composite modules with a forward of their own worth tracing, and the timm leaf classes (opaque)."""
    from timm_drop.regularizers.base import Regularizer

    leaf_classes = notrace_modules()
    traceable: set[str] = set()
    opaque: dict[str, str] = {}
    for name, m in named.items():
        if name == "" or not composite(m) or isinstance(m, Regularizer) or torch_forward(m):
            continue
        if leaf_classes and isinstance(m, leaf_classes):
            if not is_norm(m):
                opaque[name] = f"{type(m).__name__} is a timm not-traceable (FX leaf) module"
            continue
        traceable.add(name)
    return traceable, opaque


def _module_stages(
    named: dict[str, nn.Module], stages: dict[str, int | None], rec: Recorder
) -> dict[str, int | None]:
    """Stage of every module: the ``feature_info`` module it is under, else the stage during which it ran."""
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

    return {n: stage_of(n) for n in named}


def _local_graphs(
    model: nn.Module, named: dict[str, nn.Module], traceable: set[str], rec: Recorder, opaque: dict[str, str]
) -> dict[str, LocalGraph]:
    """Trace every executed traceable module; verify those with candidate skip adds (failures go to
    ``opaque`` with the reason)."""
    graphs: dict[str, LocalGraph] = {}
    twins: dict[Any, Any] = {}
    for name in sorted(traceable, key=lambda n: rec.start.get(n, 1 << 60)):
        if name not in rec.inputs:
            continue  # never ran
        m = named[name]
        recipe = getattr(type(m), "_timm_drop_recipe", None)
        none_args = recipe.none_args if recipe is not None else none_inputs(m, rec.inputs[name])
        try:
            g_eval, consts = local_graph(m, False, none_args)
        except Exception as exc:
            opaque[name] = (
                f"{type(m).__name__} is not FX-traceable ({type(exc).__name__}: {first_line(exc)})"
            )
            rec.inputs.pop(name, None)
            continue
        lg = LocalGraph(g_eval, consts, none_args)
        if _candidate_adds(g_eval):
            reason, shapes = _verify(model, m, lg, rec.inputs[name], rec.out.get("\0" + name), twins)
            if reason:
                opaque[name] = reason
                continue
            adds = tuple((n.name, r, s) for n, r, s in skip_adds(g_eval, shapes))
            lg = LocalGraph(g_eval, consts, none_args, shapes, adds, verified=True)
        graphs[name] = lg
    return graphs


def _emit_sites(
    model: nn.Module,
    named: dict[str, nn.Module],
    stages: dict[str, int | None],
    module_stage: dict[str, int | None],
    graphs: dict[str, LocalGraph],
    rec: Recorder,
    used_input: Any,
) -> list[Site]:
    """Every site, in execution order (stage after block after its skip sites after modules ending there)."""
    from timm_drop.regularizers.base import Regularizer

    in_hw = input_hw(used_input if not isinstance(used_input, (tuple, list)) else used_input[0])
    raw: list[tuple[tuple[int, int], Site]] = []

    def add_site(kind, path, module, shape, key, node=None, layout_module=None, branch=None, layout=None) -> None:
        if not (isinstance(shape, tuple) and all(isinstance(s, int) for s in shape)):
            return
        layout = layout or infer_layout(shape, in_hw, layout_module)
        site = Site(f"{kind}:{path}", kind, module_stage.get(module), module, mro_names(named[module]), shape,
                    layout, 0, node, branch)  # fmt: skip
        raw.append((key, site))

    stage_mods = [s for s in sorted(stages, key=lambda n: rec.end[n]) if stages[s] is not None]
    for s in stage_mods:
        if s not in rec.branches:
            add_site("stage", s, s, rec.out.get(s), (rec.end[s], 2))
            continue
        for i, shape, layout in _stage_branches(model, rec.branches[s], in_hw):
            add_site("stage", f"{s}[{i}]", s, shape, (rec.end[s], 2, i), branch=i, layout=layout)
    for b in _blocks(named, stage_mods, module_stage, graphs, rec):
        add_site("block", b, b, rec.out.get(b), (rec.end[b], 1))
    for name, lg in graphs.items():
        order = {n.name: i for i, n in enumerate(lg.eval_graph.nodes)}
        for node, _r, _s in lg.adds:
            key = (rec.end[name], -(len(order) - order[node]) - 10)
            path, mod = f"{name}.{node}", named[name]
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
    return [dataclasses.replace(s, depth=i) for i, (_, s) in enumerate(raw)]


def _stage_branches(
    model: nn.Module,
    branches: tuple[tuple[tuple[int, ...] | None, int | None], ...],
    in_hw: tuple[int, int],
) -> list[tuple[int, tuple[int, ...], str]]:
    """``(index, shape, layout)`` of the branches of a list/tuple stage output that get a site (module
    docstring): the maps and patch-grid token sequences, else every tensor with a layout."""
    grids: dict[int, bool] = {}

    def spatial(shape: tuple[int, ...], layout: str) -> bool:
        if layout in ("NCHW", "NHWC"):
            return True
        if layout != "NLC":
            return False
        if shape[1] not in grids:
            grids[shape[1]] = isinstance(token_grid(model, shape[1]), tuple)
        return grids[shape[1]]

    found = []
    for i, (shape, alias) in enumerate(branches):
        layout = infer_layout(shape, in_hw) if shape is not None and alias is None else None
        if layout is not None:
            found.append((i, shape, layout))
    maps = [b for b in found if spatial(b[1], b[2])]
    return maps or found


def _candidate_adds(graph: fx.Graph) -> bool:
    """Cheap structural pre-filter: an add of two nodes that both descend from the first input."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return False
    reach = {placeholders[0]}
    for n in graph.nodes:
        if n not in reach and any(p in reach for p in n.all_input_nodes):
            reach.add(n)
        if is_add(n) and len(n.args) >= 2 and all(isinstance(a, fx.Node) and a in reach for a in n.args[:2]):
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
) -> tuple[str | None, dict[str, tuple[int, ...] | None]]:
    """Run the eval graph on the recorded inputs in eval mode: (None, node shapes) if it reproduces ``m``,
    else (the reason, {}).

    Twins (same class, same generated code, same input and output shapes; e.g. the 24 blocks of a ViT-L)
    share one verification: their graphs are the same program on same-shaped tensors.
    """
    if inputs is None:
        return f"{type(m).__name__} did not run in the shape pass", {}
    key = (type(m), lg.eval_graph.python_code("self").src, _signature(inputs), _signature(expected))
    if key not in twins:
        twins[key] = _verify_run(model, m, lg, inputs, expected)
    result = twins[key]
    return (result, {}) if isinstance(result, str) else (None, dict(result))


def _verify_run(
    model: nn.Module, m: nn.Module, lg: LocalGraph, inputs: Any, expected: Any
) -> str | dict[str, tuple[int, ...] | None]:
    args, kwargs = inputs
    modes = {mod: mod.training for mod in model.modules()}
    added = [k for k in lg.constants if k not in m.__dict__]
    m.__dict__.update({k: lg.constants[k] for k in added})
    interp = ShapeInterpreter(m, lg.eval_graph)
    try:
        model.eval()
        with torch.no_grad():
            result = run_kw(interp, lg.eval_graph, args, kwargs)
    except Exception as exc:
        return f"the FX graph of {type(m).__name__} does not run ({type(exc).__name__}: {first_line(exc)})"
    finally:
        for mod, t in modes.items():
            mod.training = t
        for k in added:
            m.__dict__.pop(k, None)
    if not outputs_equal(result, expected):
        return f"the FX graph of {type(m).__name__} does not reproduce its output"
    return dict(interp.shapes)


def _blocks(
    named: dict[str, nn.Module],
    stage_mods: list[str],
    module_stage: dict[str, int | None],
    graphs: dict[str, LocalGraph],
    rec: Recorder,
) -> list[str]:
    """Block modules of every stage (:func:`timm_drop.structure.stage_blocks`), plus those of modules that ran
    inside a stage's time window without being under a stage module (EfficientNet's ``blocks.3``), but not helpers
    that another module's call runs (CoaT's blocks call the shared ``cpe3`` / ``crpe3`` registered beside them)."""
    roots: list[str] = list(stage_mods)
    under_stage = {n for n in named if any(n == s or n.startswith(s + ".") for s in stage_mods)}

    def called_by_another_module(n: str) -> bool:
        # its first call runs inside the call of a module that does not contain it: a shared helper, not a block
        start, end = rec.start.get(n), rec.end.get(n)
        return start is not None and end is not None and any(
            rec.start[k] < start and end < rec.end.get(k, -1) and k != "" and not n.startswith(k + ".")
            for k in rec.start
        )

    for n, m in named.items():
        if n == "" or n in under_stage or module_stage.get(n) is None or not composite(m):
            continue
        if called_by_another_module(n):
            continue
        parent = n.rpartition(".")[0]
        if parent and module_stage.get(parent) is not None and parent not in under_stage:
            continue
        roots.append(n)
    blocks: list[str] = []
    for r in roots:
        for b in stage_blocks(r, named[r], lambda n: n in graphs and bool(graphs[n].adds)):
            if b in rec.end and b not in blocks:
                blocks.append(b)
    return blocks


def find_sites(model: nn.Module, example_input: Any = None) -> list[Site]:
    """All sites of ``model`` in execution order (see the module docstring). Leaves the model unchanged."""
    return analyze_model(model, example_input).sites


def find_blocks(model: nn.Module, example_input: Any = None) -> list[str]:
    """The modules a spec's ``block`` sites are (and ``LayerOut(unit="block")``'s units), in execution order."""
    return [s.module for s in find_sites(model, example_input) if s.kind == "block"]
