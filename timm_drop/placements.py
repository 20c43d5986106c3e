"""The papers' placements by name: ``apply_regularizer(model, "dropblock")`` on any timm model.

A placement states its paper's rule in model-independent terms (which groups of the network, which sites, which
strength and schedule) and translates it for the model it is given into a concrete :class:`~timm_drop.spec.Spec`.
A name (or the mapping form below) works wherever a spec does: :func:`timm_drop.plan`,
:func:`timm_drop.apply_regularizer`, :func:`timm_drop.create_model` and ``timm_drop_regularized``'s ``spec=``
(timm's ``train.py``), the recipe's ``regularizer:`` and the CLI (``timm-drop plan convnext_tiny dropblock``).
:func:`placement_spec` returns the concrete spec (``timm-drop presets --model resnet50 dropblock`` prints it);
``timm-drop presets`` lists every placement's rule, translations and departures.

**Groups.** The papers number the resolution groups of a ResNet (conv2_x .. conv5_x = groups 1-4, maps of 1/4 ..
1/32 of the input). A placement names groups from the start (``early``: the first two) or from the end (``late``:
the last two, the 1/16 and 1/32 maps), which translates per family:

* ``cnn`` -- CNN stage groups (ResNet/ResNeXt/RegNet/ConvNeXt/EfficientNet/MobileNet/DenseNet/...): group = stage of
  timm's ``feature_info`` (stem excluded), counted from the same end as the paper (EfficientNet's five stages: the
  last two are its 1/16 and 1/32 stages, as ResNet-50's groups 3-4). "After every conv/BN" = the ``norm`` sites
  (a norm-free network falls back to its block outputs, then to its stage outputs; the label says so).
* ``transformer`` -- hierarchical transformers (Swin, PVT, ...; a stage block holding an attention module): group =
  stage as for CNNs; their blocks have no BN after a convolution, so "after every conv/BN" is the output of every
  block (channel methods) and, for the 2-D map methods, the block output where it is a map (Swin) else the stage
  output (PVT's blocks emit token sequences of a downsampled grid).
* ``vit`` -- plain ViT/DeiT (every stage emits the same token sequence: timm's ``feature_info`` lists its blocks):
  one resolution, so the paper's four groups become four quarters of the depth (12 blocks: 1-3, 4-6, 7-9, 10-12);
  a group's output is the output of its last block; map methods act on the patch grid (prefix tokens untouched).
  In every family a token site counts for the map methods where its tokens are a grid the model records
  (:func:`timm_drop.structure.token_grid`: CaiT, XCiT, ConViT, CrossViT, CoaT, TNT, LeViT, Twins), never a guessed one.
* ``cifar`` -- CIFAR networks (configured input of at most 64 px: ``timm_drop.models.cifar``): group = stage; where
  a paper ran its CIFAR experiments with another rule, that rule (e.g. SelectScale: every convolution).

**Overrides, in one line.** A mapping ``{"preset": NAME, **overrides}`` (also as YAML text:
``"{preset: dropblock, drop_prob: 0.2, stages: [-1]}"``) instead of the bare name. Keys: any parameter of the
placement's regularizer, ``stages`` (the model's stage numbers, negative counting from the end), ``stage_params``,
``schedule`` (``null`` removes it). Precedence, lowest first: the paper's values; the family's translation; the
mapping's parameters (a strength -- ``drop_prob`` / ``q`` -- sets the base value and the placement's per-group
factors, e.g. DropBlock's 1/4 in group 3, still apply to it; any other parameter, e.g. ``block_size``, replaces the
per-group values everywhere); the mapping's ``stage_params`` (per stage, last word). The result is validated as
any spec is (:func:`timm_drop.load_spec`).

**Relative sizes.** Block sizes are written relative to the map (``{fraction: f}``, :mod:`timm_drop.relative`),
so the paper's 7 at 224 px stays the same share of the map at 32 and 384 px.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import yaml
from torch import nn

from timm_drop import spec as _spec
from timm_drop.errors import TimmDropError
from timm_drop.regularizers.registry import strength_params
from timm_drop.relative import stage_count, stage_from_end
from timm_drop.spec import Spec, SpecError, load_spec
from timm_drop.structure import match_pattern
from timm_drop.suggest import did_you_mean

__all__ = [
    "FAMILIES",
    "PLACEMENTS",
    "Placement",
    "PlacementError",
    "PlacementRequest",
    "list_placements",
    "model_family",
    "placement_request",
    "placement_spec",
    "resolve_placement",
    "unknown_placement",
]

#: the families a placement is translated for (see the module docstring)
FAMILIES: dict[str, str] = {
    "cnn": "CNN stage groups (ResNet/ResNeXt/RegNet/ConvNeXt/EfficientNet/MobileNet/DenseNet/...)",
    "transformer": "hierarchical transformers (Swin, PVT, ...)",
    "vit": "plain ViT/DeiT (one token grid; groups = quarters of the depth)",
    "cifar": "CIFAR networks (input <= 64 px)",
}
#: keys of the mapping form besides the regularizer's parameters
OVERRIDE_KEYS: tuple[str, ...] = ("preset", "stages", "stage_params", "schedule")
_MAP_LAYOUTS = ("NCHW", "NHWC")
#: timm's stochastic-depth slot in a block's residual branch (``drop_path``, ``drop_path1`` ...): where timm applies
#: its own ``drop_path_rate``; DropPath's fallback where the analysis finds no residual add it can rewrite
_DROP_PATH_SLOT = "*.drop_path*"
_LINEAR = {"kind": "linear", "start": 0.0, "end": 1.0}


class PlacementError(TimmDropError, ValueError):
    """A placement that cannot be put on a model; the message names the placement, the family and the reason."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """One paper's placement: its rule in model-independent terms and the values it translates per family.

    ``groups``: ``early`` (the first two), ``late`` (the last two), ``last`` or ``every``. ``sites``: ``branch``
    (after every conv/BN of the residual branches, projection shortcuts excluded), ``branch+skip`` (the same plus
    every skip connection), ``norms`` (after every BN), ``output`` (each group's output), ``residual`` (each
    block's residual branch). ``group_factor``: strength factor per group counted from the end (-2: the
    next-to-last). ``fractions``: relative block size per group from the end (missing groups: the smallest key's).
    ``cifar``: a different rule the paper used on CIFAR (``sites``/``type``/``params``/``schedule``), if any.
    """

    name: str
    regularizer: str
    paper: str
    rule: str
    params: Mapping[str, Any]
    groups: str
    sites: str
    schedule: Mapping[str, Any] | None
    group_factor: Mapping[int, float] = dataclasses.field(default_factory=dict)
    fractions: Mapping[int, float] = dataclasses.field(default_factory=dict)
    vit_fraction: float | None = None
    cifar: Mapping[str, Any] | None = None
    departures: str = ""


_DROPBLOCK = "Ghiasi, Lin, Le 2018 (DropBlock), ../shared/papers/dropblock.md"
_SELECTSCALE = "Chen, Niu, Liu, Tang 2020 (SelectScale), ../shared/papers/selectscale.md"
_EVERY_CONV = {"sites": ["module"], "type": ["Conv2d"]}

_SELECTSCALE_PLACEMENT = Placement(
    "selectscale",
    "selectscale",
    _SELECTSCALE + " section 3.5, Table 4 (ImageNet); section 3.3, Table 2 (CIFAR)",
    "the last two groups, after every BN (projection shortcuts included); top rate 0.1, retaining rate 0.2 "
    "(q 0.8), the next-to-last group at half; curriculum drop. CIFAR: every convolution, t 0.1, q 0.9, "
    "constant",
    {"top_rate": 0.1, "q": 0.8},
    "late",
    "norms",
    {"kind": "curriculum", "gamma": 10.0},
    group_factor={-2: 0.5},
    cifar={**_EVERY_CONV, "params": {"top_rate": 0.1, "q": 0.9}, "schedule": None},
    departures="curriculum gamma 10 (the paper cites Morerio et al. without a value); transformers/ViT: "
    "block outputs of the last two groups / quarters",
)

PLACEMENTS: dict[str, Placement] = {
    p.name: p
    for p in (
        Placement(
            "dropblock",
            "dropblock",
            _DROPBLOCK + " section 4.1.1, Table 1",
            "the last two resolution groups (1/16 and 1/32 maps), after every conv/BN of the residual branches and "
            "on every skip connection; drop_prob 0.1 (keep_prob 0.9), the next-to-last group at 1/4 of it; block 7 "
            "at 224 px = half the 1/16 map, the whole 1/32 map; drop_prob ramped linearly from 0 over training",
            {"drop_prob": 0.1, "per_channel": True},
            "late",
            "branch+skip",
            _LINEAR,
            group_factor={-2: 0.25},
            fractions={-2: 0.5, -1: 1.0},
            vit_fraction=0.5,
            departures="transformers: block outputs instead of conv/BN outputs and skips (no BN after a conv); ViT: "
            "blocks of the last two depth quarters, block 7 on its 14x14 grid (0.5) in both, the factor 1/4 on the "
            "third quarter",
        ),
        Placement(
            "corrdrop",
            "corrdrop",
            "Zeng, Dai, Xia 2020 (CorrDrop), ../shared/papers/corrdrop.md section 4.2, Table 1",
            "after the output of each convolutional group; drop_prob 0.1 ramped linearly; block sizes 9, 7, 5 on "
            "the 32x32, 16x16, 8x8 maps of the last three groups (9/32, 7/16, 5/8 of the map; earlier groups 9/32)",
            {"drop_prob": 0.1},
            "every",
            "output",
            _LINEAR,
            fractions={-3: 9 / 32, -2: 7 / 16, -1: 5 / 8},
            vit_fraction=7 / 16,
            departures="the paper covers CIFAR ResNets only; ImageNet-size models keep its shares of the map; ViT: "
            "the last block of each depth quarter, 7/16 of the grid everywhere (one resolution)",
        ),
        _SELECTSCALE_PLACEMENT,
        # SelectScale's placement (groups, sites, schedule, group factors) with the paper's other two methods
        dataclasses.replace(
            _SELECTSCALE_PLACEMENT,
            name="selectout",
            regularizer="selectout",
            paper=_SELECTSCALE + " sections 2.1-2.2, 3.5",
            rule="the SelectScale placement (last two groups after every BN, next-to-last at half, curriculum) with "
            "Selectout: top rate 0.2, drop rate 0.02 (the paper's examples; it reports no tuned Selectout run). "
            "CIFAR: every convolution, constant",
            params={"drop_prob": 0.02, "top_rate": 0.2},
            cifar={**_EVERY_CONV, "schedule": None},
            departures="rates are the paper's worked examples (section 2.1 t=0.2, section 2.2 'e.g. 0.02'), not a "
            "tuned result",
        ),
        dataclasses.replace(
            _SELECTSCALE_PLACEMENT,
            name="spatial_scale",
            regularizer="spatial_scale",
            paper=_SELECTSCALE + " section 2.2, Tables 1-2",
            rule="the SelectScale placement (last two groups after every BN, next-to-last at half, curriculum) with "
            "SpatialScale at retaining rate 0.4 (q 0.6, Tables 1-2). CIFAR: every convolution, constant",
            params={"q": 0.6},
            cifar={**_EVERY_CONV, "schedule": None},
            departures="the retaining rate is the CIFAR tables' (the ImageNet run reports no SpatialScale row)",
        ),
        Placement(
            "attentiondrop",
            "attentiondrop",
            "Ouyang et al. 2019 (AttentionDrop), ../shared/papers/attentiondrop.md section 3.3, Table 1, "
            "Algorithm 1; placement from the official code",
            "after the outputs of the first two groups; alpha (drop_prob) 0.1 ramped linearly over the first half "
            "of training; beta 20 -> top_rate 0.2; mode ad (adaptive + soft mask)",
            {"drop_prob": 0.1, "top_rate": 0.2, "mode": "ad"},
            "early",
            "output",
            {"kind": "linear", "start": 0.0, "end": 0.5},
            departures="the paper does not name insertion points; the official code's (layer1, layer2) is used; "
            "ViT: the last block of the first two depth quarters",
        ),
        Placement(
            "spatial_dropout",
            "spatial_dropout",
            _DROPBLOCK + " section 4.1.1, Table 1, Figure 3 (baseline)",
            "the last two groups, after every conv/BN of the convolution branches only (no skips); keep_prob 0.9 "
            "-> drop_prob 0.1 ramped linearly. CIFAR (SelectScale Tables 1-2): every convolution, retaining 0.9",
            {"drop_prob": 0.1},
            "late",
            "branch",
            _LINEAR,
            cifar={**_EVERY_CONV, "params": {"drop_prob": 0.1}, "schedule": None},
        ),
        Placement(
            "dropout",
            "dropout",
            _DROPBLOCK + " section 4.1.1, Table 1, Figure 3 (baseline)",
            "the last two groups, after every conv/BN of the convolution branches; keep_prob 0.7 -> drop_prob 0.3 "
            "ramped linearly. CIFAR (SelectScale Tables 1-2): every convolution, retaining 0.9",
            {"drop_prob": 0.3},
            "late",
            "branch",
            _LINEAR,
            cifar={**_EVERY_CONV, "params": {"drop_prob": 0.1}, "schedule": None},
        ),
        Placement(
            "droppath",
            "droppath",
            _DROPBLOCK + " section 4.1.1 'Comparison with DropPath', Table 1 (baseline)",
            "every residual branch (never the skip) of the last group; keep_prob 0.9 -> drop_prob 0.1, scheduled "
            "linearly",
            {"drop_prob": 0.1},
            "last",
            "residual",
            _LINEAR,
            departures="ViT: the residual branches (attention and MLP) of the last depth quarter; where the analysis "
            "finds no residual add it can rewrite (NFNets), timm's own drop_path slot of each block",
        ),
    )
}


def list_placements() -> list[str]:
    """The placement names, in the order ``timm-drop presets`` lists them."""
    return list(PLACEMENTS)


# -- the request: a name or {"preset": name, **overrides} --------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PlacementRequest:
    """A placement by name with its overrides, checked; it becomes a spec once it meets a model."""

    name: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"placement {self.name!r}"

    def to_dict(self) -> dict[str, Any]:
        """The mapping form (plain data), which :func:`placement_request` reads back."""
        return {"preset": self.name, **self.overrides}


def _looks_like_existing_file(text: str) -> bool:
    import os

    return "\n" not in text and len(text) < 4096 and os.path.exists(os.path.expanduser(text))


#: one word (no path separator, no suffix): a placement name, never a spec file's path or YAML text
_BARE_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def unknown_placement(name: Any) -> str:
    """What an unknown placement name is told: the nearest name, and every name."""
    return f"unknown placement {name!r}{did_you_mean(str(name), list(PLACEMENTS))} (placements: {', '.join(PLACEMENTS)})"


def placement_request(src: Any) -> PlacementRequest | None:
    """``src`` as a placement request, or None when it is an ordinary spec (a path, YAML text with ``rules``,
    a mapping without ``preset``, a :class:`Spec`). A string naming an existing file stays a path. An unknown
    placement name or override key is a :class:`SpecError` naming it."""
    if isinstance(src, PlacementRequest):
        return src
    if isinstance(src, str):
        text = src.strip()
        if text in PLACEMENTS and not _looks_like_existing_file(src):
            return PlacementRequest(text)
        near = did_you_mean(text, list(PLACEMENTS))
        if _BARE_WORD.fullmatch(text) and near and not _looks_like_existing_file(src):
            # a mistyped name, not a spec: no spec is one word without a path separator or a .yaml suffix
            raise SpecError("<placement>", unknown_placement(text))
        if "preset" not in text or _looks_like_existing_file(src):
            return None
        try:
            src = yaml.safe_load(text)
        except yaml.YAMLError:
            return None
    if not isinstance(src, Mapping) or "preset" not in src:
        return None
    name = src["preset"]
    if not isinstance(name, str) or name not in PLACEMENTS:
        raise SpecError("<placement>", unknown_placement(name))
    from timm_drop.regularizers.registry import regularizer_params

    allowed = [*OVERRIDE_KEYS, *regularizer_params(PLACEMENTS[name].regularizer)]
    unknown = [k for k in src if k not in allowed]
    if unknown:
        key = str(unknown[0])
        raise SpecError(
            f"placement {name!r}",
            f"{key!r} is not an override of this placement{did_you_mean(key, allowed)} (overrides: "
            f"{', '.join(allowed[1:])}; for anything else write the spec: timm-drop presets --model MODEL {name})",
        )
    return PlacementRequest(name, {k: v for k, v in src.items() if k != "preset"})


# -- families ----------------------------------------------------------------------------------------------
def _is_attention(module: nn.Module) -> bool:
    """Token self-attention: torch's, a class named for it, or a module projecting tokens to queries, keys and values
    with Linear layers (Twins, CoaT, ConViT and EdgeNeXt name theirs ...Attn or MHSA). A CNN's channel or spatial
    "attention" (SE, CBAM, selective kernels) and conv-projected attention in CNN stages have no Linear ``qkv``/``kv``."""
    if isinstance(module, nn.MultiheadAttention) or "Attention" in type(module).__name__:
        return True
    return any(isinstance(getattr(module, name, None), nn.Linear) for name in ("qkv", "kv"))


def model_family(model: nn.Module, analysis: Any) -> str:
    """Which translation a model gets: ``cifar``, ``vit``, ``transformer`` or ``cnn`` (module docstring)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size")
    if isinstance(size, (tuple, list)) and len(size) == 3 and max(size[1:]) <= 64:
        return "cifar"
    outputs = [s for s in analysis.sites if s.kind == "stage" and s.branch is None]
    if len(outputs) > 1 and all(s.layout == "NLC" for s in outputs) and len({s.shape for s in outputs}) == 1:
        return "vit"
    stage_modules = [n for n, s in analysis.stages.items() if s is not None]
    for name in stage_modules:
        if any(_is_attention(m) for m in model.get_submodule(name).modules()):
            return "transformer"
    return "cnn"


def _groups(n: int, family: str) -> dict[int, list[int]]:
    """Paper group (1..4, or 1..n for stage families) -> the model's stages (1-based)."""
    if family != "vit":
        return {g: [g] for g in range(1, n + 1)}
    quarters = min(4, n)
    return {g: list(range((g - 1) * n // quarters + 1, g * n // quarters + 1)) for g in range(1, quarters + 1)}


def _chosen_groups(p: Placement, count: int) -> list[int]:
    wanted = {"early": range(1, 3), "late": range(count - 1, count + 1), "last": [count], "every": range(1, count + 1)}
    return [g for g in wanted[p.groups] if 1 <= g <= count]


# -- translation -------------------------------------------------------------------------------------------
class _Translation:
    """One placement on one analysed model: the rules it becomes (or the reason it cannot)."""

    def __init__(self, p: Placement, model: nn.Module, analysis: Any, model_name: str):
        self.p, self.model, self.analysis = p, model, analysis
        self.family = model_family(model, analysis)
        self.n = stage_count(analysis.stages)
        self.where = f"placement {p.name!r} on {model_name} ({self.family})"
        from timm_drop.regularizers.registry import get_regularizer_class

        self.needs_map = bool(getattr(get_regularizer_class(p.regularizer), "grid_layouts", ()))
        self.label = f"{p.name} ({FAMILIES[self.family].split(' (')[0]})"
        self._grids: dict[int, Any] = {}  # token_grid per sequence length: one model lookup each

    def refuse(self, reason: str) -> PlacementError:
        return PlacementError(f"{self.where}: {reason}")

    def selected(self, kind: str, stages: list[int], exclude: tuple[str, ...] = ()) -> list[Any]:
        """Sites a rule of ``kind`` (``conv``: ``module`` sites of a Conv2d) on ``stages`` would select."""
        site_kind = "module" if kind in ("conv", "drop_path") else kind
        out = []
        for s in self.analysis.sites:
            if s.kind != site_kind or s.stage not in stages or any(match_pattern(e, s.module) for e in exclude):
                continue
            if kind == "conv" and not isinstance(self.model.get_submodule(s.module), nn.Conv2d):
                continue
            if kind == "drop_path" and not match_pattern(_DROP_PATH_SLOT, s.module):
                continue
            out.append(s)
        return out

    def can_act(self, site: Any) -> bool:
        """Whether the regularizer can act on a site: a feature layout, and a 2-D map for the map methods (an
        ``NLC`` site only when its tokens are a grid the model records, behind its prefix tokens or alone:
        :func:`timm_drop.structure.token_grid`)."""
        if site.layout is None or site.layout == "NC":
            return False
        if not self.needs_map or site.layout in _MAP_LAYOUTS:
            return True
        if site.layout != "NLC" or site.shape is None or len(site.shape) != 3:
            return False
        from timm_drop.structure import token_grid

        length = site.shape[1]
        if length not in self._grids:
            self._grids[length] = token_grid(self.model, length)
        return isinstance(self._grids[length], tuple)

    def usable(self, kind: str, stages: list[int], exclude: tuple[str, ...] = ()) -> list[Any]:
        """Sites of ``kind`` in ``stages`` that the placement's regularizer can act on."""
        return [s for s in self.selected(kind, stages, exclude) if self.can_act(s)]

    def unusable_modules(self, kind: str, stages: list[int], exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Modules of the sites of ``kind`` in ``stages`` that the regularizer cannot act on (a token norm in a
        CNN's block), once each: a rule leaves them out by name."""
        return tuple(dict.fromkeys(s.module for s in self.selected(kind, stages, exclude) if not self.can_act(s)))

    def pick(self, kinds: list[str], stages: list[int], exclude: tuple[str, ...] = ()) -> tuple[str, list[int]]:
        """The first site kind with a usable site in ``stages`` (and the stages that have one)."""
        for kind in kinds if self.needs_map else [k for k in kinds if k != "conv"]:
            sites = self.usable(kind, stages, exclude if kind == "norm" else ())
            if sites:
                return kind, sorted({s.stage for s in sites})
        if kinds[0] == "residual":
            raise self.refuse(
                f"no residual branch in stages {stages} (of {self.n}): {self.p.regularizer} drops a block's residual "
                "branch, and no block there has a skip connection the analysis can rewrite (none, or its add is "
                "not traceable: timm-drop plan MODEL with sites: [residual] says why)"
            )
        what = "a 2-D feature map" if self.needs_map else "a feature map or token sequence"
        raise self.refuse(
            f"no {' / '.join(kinds)} site with {what} in stages {stages} (of {self.n}) for {self.p.regularizer}"
        )

    def rules(self, overrides: Mapping[str, Any]) -> list[dict[str, Any]]:
        p, family = self.p, self.family
        if self.n == 0:
            raise self.refuse("the model has no stages (no timm feature_info), so the paper's groups have no meaning")
        groups = _groups(self.n, family)
        chosen = _chosen_groups(p, len(groups))
        # the stage each group's output is at; every stage of the group for the other site kinds
        if p.sites == "output":
            stages = [groups[g][-1] for g in chosen]
        else:
            stages = [s for g in chosen for s in groups[g]]
        if "stages" in overrides:
            stages = self._user_stages(overrides["stages"])
        cifar = p.cifar if family == "cifar" and "stages" not in overrides else None
        exclude: tuple[str, ...] = ()
        if cifar is not None:
            selectors = {"sites": list(cifar["sites"]), "type": list(cifar["type"])}
            stages_field: list[int] | None = None
            base = dict(cifar.get("params", p.params))
            schedule = cifar.get("schedule", p.schedule)
            how = "every convolution (its CIFAR rule)"
        else:
            kind, stages = self._site_kind(stages)
            exclude = ("*.downsample*",) if kind == "norm" and p.sites in ("branch", "branch+skip") else ()
            exclude += self.unusable_modules(kind, stages, exclude)
            selectors = {"sites": [kind]}
            if kind == "conv":
                selectors = {"sites": ["module"], "type": ["Conv2d"]}
            elif kind == "drop_path":
                selectors = {"sites": ["module"], "name": [_DROP_PATH_SLOT]}
            if exclude:
                selectors["exclude"] = list(exclude)
            stages_field = stages
            base = dict(p.params)
            schedule = p.schedule
            how = "timm's drop_path slots (no rewritable residual add)" if kind == "drop_path" else f"{kind} sites"
        params = {**base, **{k: v for k, v in overrides.items() if k not in OVERRIDE_KEYS}}
        if "schedule" in overrides:
            schedule = overrides["schedule"]
        stage_params = self._stage_params(stages_field, groups, params, overrides)
        if self.needs_map and "block_size" not in overrides:
            params["block_size"] = {"fraction": self._fraction(-1)}
        rule: dict[str, Any] = {"regularizer": p.regularizer, "label": f"{self.label}: {how}", "params": params,
                                **selectors}  # fmt: skip
        if stages_field is not None:
            rule["stages"] = stages_field
        if stage_params:
            rule["stage_params"] = stage_params
        if schedule is not None:
            rule["schedule"] = dict(schedule)
        out = [rule]
        if p.sites == "branch+skip" and cifar is None and selectors["sites"] == ["norm"]:
            skips = sorted({s.stage for s in self.usable("shortcut", stages)})
            if skips:
                out.append({**rule, "label": f"{self.label}: skip connections", "sites": ["shortcut"],
                            "stages": skips, "allow_empty": True})  # fmt: skip
                out[-1].pop("exclude", None)
                unusable = self.unusable_modules("shortcut", skips)
                if unusable:
                    out[-1]["exclude"] = list(unusable)
                if stage_params:
                    out[-1]["stage_params"] = {k: v for k, v in stage_params.items() if k in skips}
                    if not out[-1]["stage_params"]:
                        del out[-1]["stage_params"]
        return out

    def _user_stages(self, raw: Any) -> list[int]:
        items = [raw] if isinstance(raw, int) else raw
        if not isinstance(items, list) or not items or not all(isinstance(i, int) and i != 0 for i in items):
            raise SpecError(self.where, f"override 'stages' must be a non-zero integer or a list of them, got {raw!r}")
        out = []
        for i in items:
            stage = stage_from_end(i, self.n)
            if not 1 <= stage <= self.n:
                raise self.refuse(f"override 'stages': stage {i} does not exist on this model ({self.n} stages)")
            out.append(stage)
        return sorted(set(out))

    def _site_kind(self, stages: list[int]) -> tuple[str, list[int]]:
        p, family = self.p, self.family
        if p.sites == "residual":
            kinds = ["residual", "drop_path"]  # no rewritable add: timm's own drop-path slot of the block
        elif p.sites == "output":
            kinds = ["stage"]
        elif family == "vit":
            kinds = ["stage", "conv"]  # a ViT block's output is its stage output
        elif family == "transformer":
            kinds = ["block", "stage", "conv"]
        else:
            kinds = ["norm", "block", "stage", "conv"]
        exclude = ("*.downsample*",) if p.sites in ("branch", "branch+skip") else ()
        return self.pick(kinds, stages, exclude)

    def _group_of(self, stage: int, groups: dict[int, list[int]]) -> int:
        """The group of a stage, counted from the end (-1 = the last group)."""
        for g, members in groups.items():
            if stage in members:
                return g - len(groups) - 1
        return -1

    def _fraction(self, group: int) -> float:
        p = self.p
        if self.family == "vit" and p.vit_fraction is not None:
            return p.vit_fraction
        if group in p.fractions:
            return p.fractions[group]
        return p.fractions[min(p.fractions)] if p.fractions else 1.0

    def _stage_params(
        self, stages: list[int] | None, groups: dict[int, list[int]], params: dict[str, Any], overrides: Mapping[str, Any]
    ) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for stage in stages or ():
            group = self._group_of(stage, groups)
            override: dict[str, Any] = {}
            factor = self.p.group_factor.get(group)
            if factor is not None:
                for k in strength_params(self.p.regularizer):  # what the method's class declares
                    if isinstance(params.get(k), (int, float)):
                        override[k] = round(params[k] * factor, 10)
            if self.needs_map and "block_size" not in overrides and self._fraction(group) != self._fraction(-1):
                override["block_size"] = {"fraction": self._fraction(group)}
            if override:
                out[stage] = override
        user = overrides.get("stage_params") or {}
        if not isinstance(user, Mapping):
            raise SpecError(self.where, f"override 'stage_params' must map stage numbers to parameters, got {user!r}")
        for key, value in user.items():
            stage = stage_from_end(int(key), self.n)
            out[stage] = {**out.get(stage, {}), **dict(value)}
        return out


def placement_spec(
    model: nn.Module, placement: str | Mapping[str, Any] | PlacementRequest, *, example_input: Any = None,
    analysis: Any = None,
) -> Spec:
    """The concrete spec a placement (a name, or ``{"preset": name, **overrides}``) becomes on ``model``.

    Raises :class:`PlacementError` (naming the placement, the model's family and the reason) where the paper's
    rule has no counterpart in the model, :class:`SpecError` for an unknown name or override.
    """
    request = placement_request(placement)
    if request is None:
        raise SpecError(
            "<placement>", f"{str(placement)[:80]!r} is not a placement name (placements: {', '.join(PLACEMENTS)})"
        )
    if analysis is None:
        from timm_drop.sites import analyze_model

        analysis = analyze_model(model, example_input)
    p = PLACEMENTS[request.name]
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    translation = _Translation(p, model, analysis, name)
    data = {
        "description": f"{p.name} on {name} ({translation.family}): {p.rule} [{p.paper}]",
        "rules": translation.rules(request.overrides),
    }
    spec = load_spec(data)
    object.__setattr__(spec, "source", request.source)
    return spec


def resolve_placement(spec: Any, model: nn.Module, analysis: Any) -> Any:
    """``spec`` itself, or, for a :class:`PlacementRequest`, the spec it becomes on this analysed model."""
    if isinstance(spec, PlacementRequest):
        return placement_spec(model, spec, analysis=analysis)
    return spec


def refuse_in_load_spec(src: Any, data: Any) -> None:
    """A placement by name (``"dropblock"``, ``{preset: dropblock, ...}``) becomes a spec only on a model: say how."""
    name = data.get("preset") if isinstance(data, Mapping) else data
    if isinstance(name, str) and (name in PLACEMENTS or isinstance(data, Mapping)):
        placement_request(data)  # an unknown name or override is named first
        raise SpecError(
            "<string>" if isinstance(src, str) else "<dict>",
            f"{name!r} is a placement by name: it becomes a spec on a given model. Pass it to plan / "
            f"apply_regularizer / create_model(spec=...) as it is, or get the concrete spec with "
            f"timm_drop.placement_spec(model, {name!r}) (CLI: timm-drop presets --model MODEL {name})",
        )


_spec.placement_check = refuse_in_load_spec  # load_spec names a placement by name instead of calling it bad YAML
