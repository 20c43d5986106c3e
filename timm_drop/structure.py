"""What timm_drop knows about the shape of a timm model, in one place.

Site discovery (:mod:`timm_drop.sites`), the rewriter (:mod:`timm_drop.rewrite`) and LayerOut
(:mod:`timm_drop.layerout`) all ask the same questions of a model; this module answers each once:

* **stages** — :func:`feature_stages`: the ``feature_info`` modules, numbered from 1 with the stem entry left out
  (a wrapper's: those of the one timm model it holds, :func:`stage_source`).
  Entry 0 is the stem when its module name has a ``stem`` component, is the model root (TResNet), or has a
  shallower module tree than the next entry (ResNet's ``act1``, MobileNetV3's ``bn1``, DenseNet's
  ``features.norm0`` against stages holding blocks). Numbers follow the ``feature_info`` position, so an entry
  naming no module leaves a gap instead of shifting the later stages; a module listed several times (CrossViT's
  ``blocks.N``, once per token branch; CoaT's ``parallel_blocks`` for stages 2-4) is one stage, numbered at its
  first entry, whose list output gives one site per branch (:mod:`timm_drop.sites`).
* **blocks** — :func:`stage_blocks`: the blocks of one stage module (see its docstring). A spec's ``block`` sites
  and ``LayerOut(unit="block")`` both come from it, so they are the same modules.
* **norms** — :func:`is_norm`; **containers** — :func:`is_container`, :func:`iterates_children`.
* **wrappers** — :func:`wrapper_kind` / :func:`unwrap`: DDP, DataParallel, FSDP and ``torch.compile``.
* **token grids** — :func:`token_grid`: the patch grid and prefix-token count of a ViT-style token sequence.
* **names** — :func:`match_pattern`: glob or ``re:`` regex, always a full match (``layer1`` never hits
  ``layer10``).
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = [
    "composite",
    "feature_info",
    "feature_module",
    "feature_stages",
    "is_container",
    "is_norm",
    "iterates_children",
    "match_pattern",
    "mro_names",
    "stage_blocks",
    "stage_source",
    "timm_models_inside",
    "token_grid",
    "torch_forward",
    "unwrap",
    "wrapper_kind",
]


#: prefix that makes a name pattern a full-match regular expression instead of a glob
REGEX_PREFIX = "re:"


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    if pattern.startswith(REGEX_PREFIX):
        return re.compile(pattern[len(REGEX_PREFIX) :])
    # fnmatch.translate anchors at both ends, so a glob is a full match: `layer1` never hits `layer10`.
    return re.compile(fnmatch.translate(pattern))


def match_pattern(pattern: str, qualname: str) -> bool:
    """Whether a module's qualified name matches ``pattern`` as a whole.

    ``"re:<regex>"`` is ``re.fullmatch``; anything else is a case-sensitive glob (``fnmatch``: ``*`` also
    crosses dots, so ``layer1.*`` matches ``layer1.0.conv1``). Neither is a prefix or substring match.
    """
    return _compiled(pattern).fullmatch(qualname) is not None

_NORM_NAME = re.compile(
    r"^(?!Conv)(?!.*(Block|Stage|Layer$))(.*Norm(\d[dD])?(Act(\d[dD])?)?(Fp32)?|EvoNorm.*)$"
)
_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


# ---------------------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------------------
def is_norm(module: nn.Module) -> bool:
    """A normalization layer: a torch norm base class, or any class in the MRO named ``...Norm``,
    ``...Norm2d``, ``...NormAct2d``, ``EvoNorm...`` (not ``ConvNorm...``, ``...NormBlock``)."""
    if isinstance(module, _TORCH_NORMS):
        return True
    return any(_NORM_NAME.search(c.__name__) for c in type(module).__mro__ if c not in (nn.Module, object))


def mro_names(module: nn.Module) -> tuple[str, ...]:
    return tuple(c.__name__ for c in type(module).__mro__ if c not in (nn.Module, object))


def is_container(module: nn.Module) -> bool:
    return isinstance(module, _CONTAINERS)


_ITERATION = re.compile(r"\b(children|named_children|modules|_modules|values|items)\(|\b_modules\b|\bfor \w+ in self\s*:")


def iterates_children(module: nn.Module) -> bool:
    """Whether the module's own forward may run every child it holds: a child added to it would be called.

    Torch containers (``nn.Sequential``; timm's ``features_only`` wrappers subclass ``nn.ModuleDict``), and any
    class whose ``forward`` source walks its children (RegNet's ``RegStage``: ``for block in self.children()``).
    A forward whose source cannot be read counts as iterating.
    """
    if is_container(module):
        return True
    if torch_forward(module):
        return False
    forward = getattr(type(module), "forward", None)
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return True
    return bool(_ITERATION.search(source))


def composite(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def torch_forward(module: nn.Module) -> bool:
    """Whether ``forward`` is torch's own (containers, torch layers): nothing of ours to trace inside."""
    fwd = getattr(type(module), "forward", None)
    return fwd is None or (getattr(fwd, "__module__", None) or "").startswith("torch.")


def _subtree_depth(module: nn.Module) -> int:
    children = list(module.children())
    return 0 if not children else 1 + max(_subtree_depth(c) for c in children)


# ---------------------------------------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------------------------------------
def _distributed_types() -> tuple[type, ...]:
    types: list[type] = [nn.parallel.DistributedDataParallel]
    try:  # torch builds without distributed support have no fsdp package
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
        from torch.distributed.fsdp import FSDPModule

        types.append(FSDPModule)
    except ImportError:
        pass
    return tuple(types)


def wrapper_kind(module: nn.Module) -> str | None:
    """``"distributed"`` (DDP, FSDP), ``"data_parallel"``, ``"compiled"`` (``torch.compile``) or None."""
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(module, _distributed_types()):
        return "distributed"
    if isinstance(module, nn.DataParallel):
        return "data_parallel"
    if isinstance(module, OptimizedModule):
        return "compiled"
    return None


def unwrap(model: nn.Module) -> tuple[nn.Module, bool, bool]:
    """The bare model inside DDP / DataParallel / FSDP / ``torch.compile`` wrappers, and whether a distributed
    and a compiled wrapper were seen. (``fully_shard`` shards in place: the model is its own bare model.)"""
    distributed = compiled = False
    for _ in range(8):
        kind = wrapper_kind(model)
        if kind == "compiled":
            compiled, model = True, model._orig_mod
            continue
        if kind == "distributed":
            distributed = True
        inner = getattr(model, "module", None) if kind else None
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model, distributed, compiled


# ---------------------------------------------------------------------------------------------------------
# stages and blocks
# ---------------------------------------------------------------------------------------------------------
def feature_info(model: nn.Module) -> list[dict[str, Any]]:
    """``model.feature_info`` as a list of dicts (a list on classifiers, a ``FeatureInfo`` on
    ``features_only`` models)."""
    fi = getattr(model, "feature_info", None)
    if fi is None:
        return []
    info = getattr(fi, "info", fi)
    try:
        return [dict(d) for d in info if isinstance(d, dict) and "module" in d]
    except TypeError:
        return []


#: ``feature_info`` names some timm models give to modules they hold under another name, by model class (any class
#: in the MRO, so timm's ``*Features`` subclasses share the entry). HRNet lists ``stem``, ``stage1`` ... ``stage4``
#: while its modules are ``layer1`` (the paper's single-branch stage 1), ``stage2``, ``stage3``, ``stage4`` (its
#: own comment: "module names aren't actually valid here"); its stem is several layers, left unnamed.
FEATURE_ALIASES: dict[str, dict[str, str]] = {
    "HighResolutionNet": {"stage1": "layer1"},
    # Twins lists its stages as block.N; they are blocks.N (ModuleLists its forward iterates)
    "Twins": {f"block.{i}": f"blocks.{i}" for i in range(4)},
}


def _feature_alias(model: nn.Module, name: str) -> str | None:
    for cls in type(model).__mro__:
        alias = FEATURE_ALIASES.get(cls.__name__, {}).get(name)
        if alias is not None:
            return alias
    for m in model.children():  # a features_only wrapper holding the model (FeatureListNet's body & co.)
        if not isinstance(m, nn.ModuleDict) and feature_info(m):
            alias = _feature_alias(m, name)
            if alias is not None:
                return alias
    return None


def feature_module(model: nn.Module, name: str, named: dict[str, nn.Module] | None = None) -> str | None:
    """The module a ``feature_info`` entry names, under its name in ``model`` (None if it has none).

    A ``features_only`` wrapper keeps the original model's ``feature_info`` but holds its modules under other
    names: ``FeatureListNet`` / ``FeatureDictNet`` flatten a first-level ``nn.Sequential`` (``stages.0`` becomes
    ``stages_0``), ``FeatureHookNet`` may keep the whole model as ``body``, ``FeatureGetterNet`` as ``model``
    (Gemma 4's ViT further down, ``model.encoder.blocks.N`` for ``blocks.N``). Models whose ``feature_info`` names
    a module they do not have get it from :data:`FEATURE_ALIASES`.
    """
    named = dict(model.named_modules()) if named is None else named
    if name in named:
        return name
    alias = _feature_alias(model, name)
    if alias is not None:
        found = feature_module(model, alias, named)
        if found is not None:
            return found
    head, dot, rest = name.partition(".")
    if dot and f"{head}_{rest}" in named:
        return f"{head}_{rest}"
    # held one or more levels down (FeatureGetterNet(model) of a model whose blocks sit in ``encoder``): the
    # shallowest module whose name ends with the entry, if that is unambiguous
    found = sorted((n.count("."), n) for n in named if n.endswith("." + name))
    if found and (len(found) == 1 or found[0][0] < found[1][0]):
        return found[0][1]
    return None


def _stem_named(name: str) -> bool:
    return any(part.startswith("stem") or part.endswith("stem") for part in name.split("."))


def _stem_stride(entry: dict[str, Any], following: dict[str, Any]) -> bool:
    """A stride-2 tap before a coarser one: a stem layer (no stage of a timm model stops at stride 2 unless it
    is a module of its own, which the module-based test decides)."""
    r0, r1 = entry.get("reduction"), following.get("reduction")
    return isinstance(r0, int) and isinstance(r1, int) and r0 <= 2 < r1


def _is_stem_entry(name: str, module: nn.Module, next_module: nn.Module | None) -> bool:
    if name == "" or _stem_named(name):
        return True
    # A stage holds blocks, a stem is a layer or two: a shallower module tree than the next entry's.
    return next_module is not None and _subtree_depth(module) < _subtree_depth(next_module)


def timm_models_inside(model: nn.Module) -> list[str]:
    """For a model without ``feature_info`` of its own (a wrapper: segmentation_models_pytorch's ``Unet`` holds a
    timm ``features_only`` model at ``encoder.model``), the outermost submodules that have one, in module order."""
    if feature_info(model):
        return []
    found: list[str] = []
    for name, m in model.named_modules():
        if name and not any(name.startswith(f + ".") for f in found) and feature_info(m):
            found.append(name)
    return found


def stage_source(model: nn.Module) -> str | None:
    """Whose ``feature_info`` numbers the stages: ``""`` (the model's own), the path of the one timm model a
    wrapper holds, or None (no ``feature_info`` at all, or several timm models inside: ambiguous)."""
    if feature_info(model):
        return ""
    inside = timm_models_inside(model)
    return inside[0] if len(inside) == 1 else None


def _kept(name: str | None, named: dict[str, nn.Module], keep: Callable[[str], bool]) -> str | None:
    """``name`` if ``keep`` accepts it; for a container it rejects, its last descendant that ``keep`` accepts (a
    container its owner iterates but never calls, CoaT's serial_blocksN: the stage output is that of its last
    block that ran). A module-level function: a recursive closure over ``named`` would be a reference cycle that
    keeps the model alive after ``del`` until the garbage collector runs."""
    if name is None or keep(name):
        return name
    if is_container(named[name]):
        for key in reversed([k for k, c in named[name]._modules.items() if c is not None]):
            found = _kept(f"{name}.{key}", named, keep)
            if found is not None:
                return found
    return None


def feature_stages(
    model: nn.Module, keep: Callable[[str], bool] = lambda name: True
) -> dict[str, int | None]:
    """``feature_info`` module name -> stage (1-based; None for the stem entry), in ``feature_info`` order.

    Stage ``k`` is ``feature_info`` entry ``k`` (entry ``k - 1`` when entry 0 is no stem): an entry whose module
    the model does not hold, or that ``keep`` rejects, leaves its number unused rather than renumbering the
    stages after it (HRNet keeps ``stage3`` as stage 3). A module named by several entries (CrossViT's
    ``blocks.N``, once per branch) is one stage, numbered at its first entry. ``keep`` filters entries (site
    discovery keeps only modules that ran); a container entry that ``keep`` rejects stands for its last kept
    descendant. A model without ``feature_info`` that holds exactly one timm model (:func:`stage_source`) has
    that model's stages, under their names in the wrapper.
    """
    source = stage_source(model)
    if source:
        inner = feature_stages(model.get_submodule(source), keep=lambda n: keep(f"{source}.{n}" if n else source))
        return {(f"{source}.{n}" if n else source): k for n, k in inner.items()}
    named = dict(model.named_modules())
    info = feature_info(model)
    names = [_kept(feature_module(model, d["module"], named), named, keep) for d in info]
    found = [n for n in names if n is not None]
    if names and names[0] is None:
        # a stem entry naming no module (HRNet's "stem", MobileNetV5's "bn1"): its name or its stride says so
        stem = len(names) > 1 and (_stem_named(info[0]["module"]) or _stem_stride(info[0], info[1]))
    else:
        stem = len(found) > 1 and _is_stem_entry(found[0], named[found[0]], named[found[1]])
    stages: dict[str, int | None] = {}
    for i, name in enumerate(names):
        if name is None or name in stages:
            continue
        stages[name] = None if i == 0 and stem else i + (0 if stem else 1)
    return stages


def _children(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    prefix = f"{name}." if name else ""
    return [(prefix + k, c) for k, c in module.named_children()]


def _flatten_container(name: str, module: nn.Module) -> list[str]:
    out = []
    for cn, c in _children(name, module):
        if is_container(c):
            out.extend(_flatten_container(cn, c))
        elif composite(c) and not is_norm(c):
            out.append(cn)
    return out


def stage_blocks(name: str, module: nn.Module, owns_skip: Callable[[str], bool]) -> list[str]:
    """Block modules of the stage module ``name``.

    The members of the stage's block container: the stage itself when it is a torch container, else the
    container child holding the most composite modules (ConvNeXt's ``stages.N.blocks``), else repeated
    composite children of one class that look like blocks (RegNet's ``b1..bN``: each owns a skip add or holds
    two or more composite layers). A stage that owns a skip add itself (ViT's ``blocks.N``), or has none of
    the above, is its own single block. ``owns_skip(name)`` says whether a module's own forward adds a skip.
    """
    if is_container(module):
        return _flatten_container(name, module)
    if owns_skip(name):
        return [name]
    holders = [
        (cn, c)
        for cn, c in _children(name, module)
        if is_container(c) and any(composite(g) and not is_norm(g) for g in c.children())
    ]
    if holders:
        cn, c = max(holders, key=lambda t: sum(1 for g in t[1].children() if composite(g)))
        return _flatten_container(cn, c)
    comps = [(cn, c) for cn, c in _children(name, module) if composite(c) and not is_norm(c)]

    def block_like(cn: str, c: nn.Module) -> bool:
        # a conv-norm-act branch (Inception's Mixed_* children) is not a block
        return owns_skip(cn) or sum(1 for g in c.children() if composite(g)) >= 2

    if comps and len({type(c) for _, c in comps}) == 1 and all(block_like(cn, c) for cn, c in comps):
        return [cn for cn, _ in comps]
    return [name]


def outermost(names: Iterable[str]) -> list[str]:
    """``names`` without those nested in another one of them (order kept)."""
    names = list(names)
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


# ---------------------------------------------------------------------------------------------------------
# token grids
# ---------------------------------------------------------------------------------------------------------
def _pair(value: Any) -> tuple[int, int] | None:
    """``(a, b)`` of two positive ints, or ``(a, a)`` of one (XCiT's ``patch_size: int``); else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    return None


def _embed_grid(module: nn.Module) -> tuple[int, int] | None:
    """The patch grid of a patch embed: timm's ``grid_size``, or ``img_size // patch_size`` where the module also
    records that many ``num_patches`` (CrossViT's per-branch ``PatchEmbed``, XCiT's ``ConvPatchEmbed``)."""
    grid = _pair(getattr(module, "grid_size", None))
    if grid is not None:
        return grid if hasattr(module, "patch_size") else None
    img, patch = _pair(getattr(module, "img_size", None)), _pair(getattr(module, "patch_size", None))
    if img is None or patch is None:
        return None
    grid = (img[0] // patch[0], img[1] // patch[1])
    return grid if getattr(module, "num_patches", None) == grid[0] * grid[1] else None


def _resolution_grid(module: nn.Module) -> tuple[int, int] | None:
    """The token grid an attention with a relative-position bias table attends over (LeViT's ``resolution``:
    its ``attention_bias_idxs`` index the biases by the (row, col) offsets of that grid, row-major)."""
    if not isinstance(getattr(module, "attention_bias_idxs", None), torch.Tensor):
        return None
    return _pair(getattr(module, "resolution", None))


#: prefix-token parameters of a model that records no ``num_prefix_tokens`` (PiT's ``cls_token``); a numbered one
#: belongs to the patch embed with that number (CrossViT's ``cls_token_1`` to ``patch_embed.1``, CoaT's
#: ``cls_token2`` to ``patch_embed2``)
_PREFIX_PARAM = re.compile(r"(?:cls|dist|reg)_tokens?(?:_?(\d+))?")
_EMBED_NUMBER = re.compile(r"(\d+)$")


def _prefix_tokens(named: dict[str, nn.Module], embed: str, holders: list[str]) -> int:
    for h in holders:
        count = getattr(named[h], "num_prefix_tokens", None)
        if isinstance(count, int):
            return count
    number = _EMBED_NUMBER.search(embed)
    index = number.group(1) if number else None
    for h in holders:
        count = 0
        for pname, p in named[h].named_parameters(recurse=False):
            found = _PREFIX_PARAM.fullmatch(pname)
            if found and found.group(1) in (None, index) and p.dim() == 3:
                count += int(p.shape[1])
        if count:
            return count
    return 0


def _embed_tokens(named: dict[str, nn.Module], model: nn.Module, embed: str) -> tuple[tuple[int, int], int] | str:
    """``(grid, num_prefix_tokens)`` of one patch embed's token sequences, or why they are no fixed grid."""
    parts = embed.split(".")
    holders = [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]
    for holder in [embed, *holders]:
        if getattr(named[holder], "dynamic_img_size", False) is True:
            return (
                f"{holder or type(model).__name__} has dynamic_img_size=True, so its patch grid changes with "
                f"each input size; create it with dynamic_img_size=False (a fixed img_size) for spatial methods"
            )
    for holder in holders:
        drop = getattr(named[holder], "patch_drop", None)
        if isinstance(getattr(drop, "prob", None), float) and drop.prob > 0:
            return (
                f"{(holder + '.') if holder else ''}patch_drop keeps a random {1 - drop.prob:.0%} of the patch "
                f"tokens in training, so they are no grid; create the model with patch_drop_rate=0"
            )
    return _embed_grid(named[embed]), _prefix_tokens(named, embed, holders)  # type: ignore[return-value]


def _fits(found: tuple[tuple[int, int], int], length: int) -> tuple[tuple[int, int], int] | None:
    """The grid ``found`` as a ``length``-token sequence holds it: behind its prefix tokens, or alone (the patch
    tokens before the class token joins: CaiT's and XCiT's self-attention blocks, ConViT's first blocks)."""
    (h, w), prefix = found
    if length == prefix + h * w:
        return found
    return ((h, w), 0) if length == h * w else None


def token_grid(model: nn.Module, length: int | None = None) -> tuple[tuple[int, int], int] | str:
    """``((H, W), num_prefix_tokens)`` of a ViT-style model whose token sequences are prefix tokens followed by
    its patch grid (row-major), or a sentence saying why it has none; with ``length`` (a site's sequence
    length), the grid that sequence holds, or also why it holds none (pooled or downsampled tokens).

    The grid is that of the model's patch embed (timm's ``PatchEmbed`` ``grid_size``: ``patch_embed`` on
    ViT, DeiT, BEiT, EVA; ``stem`` on MLP-Mixer; ``img_size // patch_size`` where it records that many
    ``num_patches``); the prefix count (class, distillation, register tokens) is ``num_prefix_tokens`` of the
    nearest module holding the patch embed, else the tokens of that module's ``cls_token`` / ``dist_token`` /
    ``reg_token`` parameters (PiT; numbered ones per embed: CrossViT, CoaT), else 0. A sequence of exactly the
    grid's tokens holds the grid without prefix tokens (CaiT, XCiT and ConViT run their first blocks on the patch
    tokens and add the class token later). Without a patch embed, the grids of the model's attentions with a
    relative-position bias table over a ``resolution`` (LeViT's stages). With several grids (CrossViT's two
    branches, CoaT's per-stage embeds, LeViT's stages) a site's ``length`` must pick exactly one. No grid, rather
    than one that would be a guess: none recorded, several without a length that tells them apart, a dynamic
    image size (the grid changes with each input), or patch dropout (training keeps a random subset of the patch
    tokens).
    """
    named = dict(model.named_modules())
    embeds = [n for n, m in named.items() if _embed_grid(m) is not None]
    found: list[tuple[tuple[int, int], int] | str] = [_embed_tokens(named, model, n) for n in embeds]
    what = f"patch embeds ({', '.join(embeds[:4])})"
    if not embeds:
        found = list(dict.fromkeys((g, 0) for m in named.values() if (g := _resolution_grid(m)) is not None))
        what = f"attention resolutions ({', '.join(f'{h}x{w}' for (h, w), _ in found[:4])})"
        if not found:
            return f"{type(model).__name__} records no patch grid (no patch embed with a grid_size)"
    if len(found) == 1 and isinstance(found[0], str):
        return found[0]
    if length is None:
        if len(found) == 1:
            return found[0]
        return f"{type(model).__name__} has several {what}: which grid a site holds is ambiguous"
    fits = {f for g in found if isinstance(g, tuple) and (f := _fits(g, length)) is not None}
    if len(fits) == 1:
        return fits.pop()
    if len(found) == 1:
        (h, w), prefix = found[0]  # type: ignore[misc]
        return (
            f"its {length} tokens are not the model's {prefix} prefix token(s) + {h}x{w} patch grid "
            f"({prefix + h * w} tokens; pooled or downsampled tokens have no grid we can know)"
        )
    return (
        f"{type(model).__name__} has several {what} and its {length} tokens do not single out one of their "
        f"grids: which grid a site holds is ambiguous"
    )
