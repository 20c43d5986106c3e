"""The model and spec each check runs on: :data:`COVERAGE_SPEC` fitted to the model's sites (:func:`adapt_spec`),
the model built at the smallest input it accepts (:func:`build_model`), its own randomness switched off and its
zero-initialised parameters woken."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from timm_drop.regularizers import Regularizer, get_regularizer_class
from timm_drop.structure import token_grid
from timm_drop.tools.coverage.result import _flatten

#: A spec that uses every site kind (``timm_drop.spec.SITE_KINDS``) with layout-agnostic regularizers, so NCHW, NHWC and token
#: sites are all exercised. ``allow_empty`` everywhere: a family may lack a kind (VGG has no skip adds), but
#: :func:`check_model` requires at least one site per model. Later rules ``stack`` because different kinds
#: can name the same tensor (the last block's output is also the stage output). :func:`check_model` fits it
#: to each model with :func:`adapt_spec`: sites whose layout a rule's regularizer refuses are excluded, and
#: the stage sites with a spatial layout get ``dropblock``.
COVERAGE_SPEC: dict[str, Any] = {
    "version": 1,
    "description": "timm_drop coverage: every site kind, layout-agnostic regularizers",
    "rules": [
        {
            "regularizer": "spatial_dropout",
            "params": {"drop_prob": 0.1},
            "sites": ["stage"],
            "allow_empty": True,
            "label": "stage outputs",
        },
        {
            "regularizer": "spatial_scale",
            "params": {"q": 0.3},
            "sites": ["block"],
            "schedule": {"kind": "linear", "start": 0.0, "end": 0.5},
            "on_conflict": "stack",
            "allow_empty": True,
            "label": "block outputs",
        },
        {
            "regularizer": "droppath",
            "params": {"drop_prob": 0.1},
            "sites": ["residual"],
            "depth_scaling": "linear",
            "on_conflict": "stack",
            "allow_empty": True,
            "label": "residual branches",
        },
        {
            "regularizer": "dropout",
            "params": {"drop_prob": 0.1},
            "sites": ["shortcut"],
            "on_conflict": "stack",
            "allow_empty": True,
            "label": "shortcuts",
        },
        {
            "regularizer": "selectscale",
            "params": {"top_rate": 0.2, "q": 0.5},
            "sites": ["merge"],
            "on_conflict": "stack",
            "allow_empty": True,
            "label": "skip merges",
        },
        {
            "regularizer": "selectout",
            "params": {"drop_prob": 0.05, "top_rate": 0.2},
            "sites": ["norm"],
            "on_conflict": "stack",
            "allow_empty": True,
            "label": "norm outputs",
        },
        {
            "regularizer": "dropout",
            "params": {"drop_prob": 0.1},
            "sites": ["module"],
            "type": ["Conv2d", "Linear"],
            "stages": [1],
            "on_conflict": "stack",
            "allow_empty": True,
            "label": "conv/linear modules of stage 1",
        },
    ],
}

#: Parameters of the dropblock rule added on spatial stage sites (block 3 so it fits small maps too).
DROPBLOCK_STAGE_PARAMS: dict[str, Any] = {"drop_prob": 0.1, "block_size": 3}

#: Candidate input sizes tried in ascending order for models that accept any size.
SMALL_SIZES: tuple[int, ...] = (64, 96, 128, 160, 192, 224, 256)


def disable_builtin_stochasticity(model: nn.Module) -> int:
    """Zero the model's own dropout / drop-path / drop-block rates so that train outputs are comparable.

    The strength-0 check compares training outputs of the rewritten model and an untouched copy; stochastic
    layers timm ships (``drop_rate``, ``drop_path_rate``, Swin's default drop path) would make them differ
    for reasons unrelated to the rewrite. Returns how many modules were changed.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p:
            module.p = 0.0
            changed += 1
        for attr in ("drop_prob", "drop_rate", "drop_path_rate", "drop_block_rate", "attn_drop_rate"):
            value = getattr(module, attr, None)
            if isinstance(value, float) and value > 0.0 and not isinstance(module, Regularizer):
                setattr(module, attr, 0.0)
                changed += 1
    return changed


def count_params_meta(name: str, **model_kwargs: Any) -> int | None:
    """Parameter count of a timm model built on the meta device (no memory, no init cost), or None."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **model_kwargs)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def _forward_ok(model: nn.Module, x: torch.Tensor) -> bool:
    try:
        with torch.no_grad():
            outs = _flatten(model(x))
        return bool(outs) and all(torch.isfinite(o).all() for o in outs if o.is_floating_point())
    except Exception:
        return False


def build_model(
    name: str,
    *,
    input_size: Sequence[int] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 2,
) -> tuple[nn.Module, torch.Tensor]:
    """Create ``name`` (``pretrained=False``) and an input of the smallest size it accepts.

    With ``input_size`` given it is used as is; with an ``img_size`` in ``model_kwargs`` the input has that size.
    Otherwise the size comes from ``pretrained_cfg['input_size']``;
    models that accept any size (``fixed_input_size`` false) are tried at :data:`SMALL_SIZES` below it,
    smallest first, and fixed-size models (ViT-like, with position embeddings) are rebuilt with ``img_size``
    at those sizes where their constructor accepts it, else kept at their configured size.
    """
    import timm

    kwargs = dict(model_kwargs or {})
    model = timm.create_model(name, pretrained=False, **kwargs)
    model.eval()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans, height, width = tuple(cfg.get("input_size", (3, 224, 224)))
    if input_size is None and "img_size" in kwargs:
        img = kwargs["img_size"]
        input_size = (chans, *((img, img) if isinstance(img, int) else tuple(img)))
    if input_size is not None:
        size = tuple(int(s) for s in input_size)
        return model, torch.randn(batch_size, *size)
    min_size = tuple(cfg.get("min_input_size", (chans, 32, 32)))
    fixed = bool(cfg.get("fixed_input_size", False))
    candidates = [s for s in SMALL_SIZES if s < max(height, width) and s >= max(min_size[1:])]
    if not fixed:
        for s in candidates:
            if _forward_ok(model, torch.randn(1, chans, s, s)):
                return model, torch.randn(batch_size, chans, s, s)
    elif "img_size" not in kwargs:
        for s in candidates[:3]:
            try:
                small = timm.create_model(name, pretrained=False, img_size=s, **kwargs).eval()
            except Exception:
                continue
            if _forward_ok(small, torch.randn(1, chans, s, s)):
                return small, torch.randn(batch_size, chans, s, s)
    return model, torch.randn(batch_size, chans, height, width)


def _exact(name: str) -> str:
    """A glob matching exactly ``name`` (module names may not contain glob metacharacters, but be safe)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _rule_kinds(rule: Mapping[str, Any]) -> list[str]:
    sites = rule.get("sites", [])
    return [sites] if isinstance(sites, str) else list(sites)


def _accepts(cls: Any, site: Any, model: nn.Module | None) -> bool:
    """Whether regularizer class ``cls`` acts at ``site``: a layout it lists, or (``grid_layouts``: DropBlock,
    CorrDrop on ViT tokens) one it takes where ``model`` gives the site's tokens a patch grid."""
    if site.layout in (getattr(cls, "layouts", ()) or ()):
        return True
    if model is None or site.layout not in getattr(cls, "grid_layouts", ()):
        return False
    return isinstance(token_grid(model, site.shape[1] if site.shape and len(site.shape) == 3 else -1), tuple)


def adapt_spec(
    spec: Mapping[str, Any],
    sites: Iterable[Any],
    *,
    dropblock_params: Mapping[str, Any] | None = DROPBLOCK_STAGE_PARAMS,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """Fit a generic spec to one model's sites (from ``find_sites``) the way a user would, by ``exclude``.

    * Each rule excludes the modules of its kinds' sites whose layout its regularizer does not accept (e.g.
      2-D ``NC`` head norms after pooling), since the rewriter rightly refuses to place it there.
    * With ``dropblock_params``, the stage sites with a layout ``dropblock`` accepts get a ``dropblock`` rule
      inserted before the first stage-only rule, which then excludes them.

    With ``model``, a regularizer's ``grid_layouts`` count where the model gives the tokens a patch grid
    (:func:`timm_drop.structure.token_grid`), so DropBlock acts on ViT-family token stage sites.
    """
    sites = list(sites)
    spec = copy.deepcopy(dict(spec))
    rules: list[dict[str, Any]] = []
    for raw in spec["rules"]:
        rule = dict(raw)
        kinds = _rule_kinds(rule)
        cls = get_regularizer_class(rule["regularizer"])
        layouts = tuple(getattr(cls, "layouts", ()) or ())
        bad = sorted({s.module for s in sites if s.kind in kinds and layouts and not _accepts(cls, s, model)})
        if bad:
            rule["exclude"] = list(rule.get("exclude", [])) + [_exact(n) for n in bad]
        if (
            dropblock_params is not None
            and kinds == ["stage"]
            and not any(r["regularizer"] == "dropblock" for r in rules)
        ):
            db = get_regularizer_class("dropblock")
            spatial = sorted({s.module for s in sites if s.kind == "stage" and _accepts(db, s, model)})
            if spatial:
                names = [_exact(n) for n in spatial]
                rules.append(
                    {
                        "regularizer": "dropblock",
                        "params": dict(dropblock_params),
                        "sites": ["stage"],
                        "name": names,
                        "allow_empty": True,
                        "label": "dropblock on spatial stage outputs",
                    }
                )
                rule["exclude"] = list(rule.get("exclude", [])) + names
                rule["on_conflict"] = "stack"
        rules.append(rule)
    spec["rules"] = rules
    return spec


def wake_zero_params(model: nn.Module, std: float = 0.02, seed: int = 0) -> int:
    """Give every all-zero floating-point parameter small random values; returns how many were changed.

    timm zero-initialises the last BN of residual branches, NF-nets' skip gains and some classifier heads
    (MLP-Mixer, ResMLP). A zero branch or head hides everything behind it: a regularizer there cannot change
    the output, so neither a wrong rewrite nor a missing effect would show. The weights are random anyway
    (``pretrained=False``).
    """
    gen = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and not p.any():
                p.copy_((torch.randn(p.shape, generator=gen) * std).to(p.dtype))
                changed += 1
    return changed
