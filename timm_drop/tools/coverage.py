"""Coverage check: does the rewriter keep its guarantees on a given timm model?

:func:`check_model` builds one timm model (``pretrained=False``, the smallest input it accepts), applies a spec
that touches every site kind (:data:`COVERAGE_SPEC`) through the public API (``timm_drop.plan``,
``apply_regularizer``, ``strip_regularizers``), and checks the guarantees the rewriter promises:

1. ``plan`` is a dry run (the module tree and hooks are unchanged after it) and finds at least one site;
2. ``apply_regularizer`` returns the same object with the same class;
3. ``state_dict`` keys are identical and checkpoints load strictly in both directions;
4. the eval output is bit-identical to a deep copy of the model taken before ``apply``;
5. a training forward + backward is finite, and every inserted regularizer actually runs;
6. with every regularizer's ``strength`` at 0 the training output equals the original's, bit for bit, and at
   full strength it differs (the regularizers do something);
7. ``copy.deepcopy`` (timm's EMA) gives a copy that runs its *own* regularizers, never the original's;
8. gradient checkpointing (models with ``set_grad_checkpointing``): with it on, every regularizer runs in the
   forward pass, the output and every gradient equal those without it at one seed (the backward pass's
   recomputation draws the same masks), and a recomputation counts no extra training forward;
9. FX re-trace: torchvision's ``NodePathTracer`` with timm's leaf modules and functions (the tracer of
   ``create_feature_extractor``, timm's ``FeatureGraphNet`` and its ``forward_fx`` test) traces the regularized
   model wherever it traces the original, the graph's eval output is the model's bit for bit, and ``torch.fx``
   still traces afterwards;
10. ``strip_regularizers`` restores the class, keys, hooks and eval output.

Checks 8 and 9 record ``"n/a: <why>"`` in :attr:`CoverageResult.passes` where they do not apply (no
``set_grad_checkpointing``; a model timm's tracer gives no working graph of before the rewrite either).

:func:`run_coverage` runs :func:`check_model` over many models in a worker subprocess with a per-model timeout
(a hang or a crash costs one model, not the run) and :func:`render_report` writes the Markdown report.
"""

from __future__ import annotations

import copy
import datetime
import fnmatch
import math
import multiprocessing as mp
import platform
import random
import re
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

import timm_drop
from timm_drop.regularizers import Regularizer, get_regularizer_class
from timm_drop.sites import SiteError
from timm_drop.spec import load_spec
from timm_drop.structure import token_grid

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

STAGES = (
    "create",
    "input",
    "plan",
    "apply",
    "state_dict",
    "eval",
    "train",
    "strength0",
    "deepcopy",
    "grad_checkpointing",
    "fx_retrace",
    "strip",
    "timeout",
    "crash",
    "skipped",
)


@dataclass
class CoverageResult:
    """Outcome of :func:`check_model` for one model.

    ``stage`` is the check that failed (one of :data:`STAGES`) or ``"ok"``; ``reason`` says why, ``where`` is
    the innermost traceback frame inside ``timm_drop`` (for grouping failures by cause), ``n_sites`` counts
    the planned sites by kind, ``n_regularizers`` the planned entries by regularizer, ``notes`` are non-fatal
    observations (e.g. a changed ``state_dict`` key order), ``passes`` the outcome of the gradient-checkpointing
    and FX re-trace checks (``"ok"`` or ``"n/a: <why>"``).
    """

    name: str
    ok: bool
    stage: str
    reason: str = ""
    n_sites: dict[str, int] = field(default_factory=dict)
    n_regularizers: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    input_size: tuple[int, ...] | None = None
    params: int | None = None
    where: str = ""
    notes: list[str] = field(default_factory=list)
    passes: dict[str, str] = field(default_factory=dict)  # optional checks (8, 9): "ok" or "n/a: <why>"

    @property
    def skipped(self) -> bool:
        return self.stage == "skipped"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CheckFailed(Exception):
    """A guarantee was violated (as opposed to an exception raised by the code under test)."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


class _Skip(Exception):
    pass


# -- small helpers -------------------------------------------------------------------------------------------
def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    return []


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return math.inf
    return max((float((x.float() - y.float()).abs().max()) if x.numel() else 0.0) for x, y in zip(a, b))


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def _regularizers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, Regularizer)]


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(getattr(m, "_backward_hooks", {}))
        for m in model.modules()
    )


def _module_signature(model: nn.Module) -> list[tuple[str, str]]:
    return [(n, type(m).__name__) for n, m in model.named_modules()]


def _exc_reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {msg[0] if msg else ''}"
    return text if len(text) <= 400 else text[:397] + "..."


def _exc_where(exc: BaseException) -> str:
    """Innermost traceback frame inside timm_drop (not this module), else the innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if "timm_drop" in f.filename and not f.filename.endswith("coverage.py")]
    frame = (own or frames or [None])[-1]
    if frame is None:
        return ""
    path = frame.filename
    short = path[path.rfind("timm_drop") :] if "timm_drop" in path else path.rsplit("/", 2)[-1]
    return f"{short}:{frame.lineno} ({frame.name})"


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


# -- the check ------------------------------------------------------------------------------------------------
def check_model(
    name: str,
    spec: Mapping[str, Any] | str | Any = COVERAGE_SPEC,
    *,
    input_size: Sequence[int] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 2,
    spatial_stage_rule: bool = True,
    adapt: bool = True,
    wake_zero_init: bool = True,
    max_params: int | None = None,
    seed: int = 0,
) -> CoverageResult:
    """Apply ``spec`` to timm model ``name`` and check every rewriter guarantee (see the module docstring).

    Never raises for a model-level problem: the first failing check is reported in the result. ``max_params``
    skips (``stage="skipped"``) models larger than that, counted on the meta device before building.
    ``adapt`` fits the spec to the model's sites with :func:`adapt_spec` (layout exclusions, and with
    ``spatial_stage_rule`` a ``dropblock`` rule on spatial stage sites); ``wake_zero_init`` runs
    :func:`wake_zero_params` first so that no zero-initialised branch hides a regularizer.
    """
    t0 = time.perf_counter()
    result = CoverageResult(name=name, ok=False, stage="create")
    try:
        _check(
            result,
            name,
            spec,
            input_size,
            model_kwargs,
            batch_size,
            spatial_stage_rule,
            adapt,
            wake_zero_init,
            max_params,
            seed,
        )
        result.ok, result.stage = True, "ok"
    except _Skip as exc:
        result.stage, result.reason = "skipped", str(exc)
    except CheckFailed as exc:
        result.stage, result.reason = exc.stage, exc.reason
        result.where = _exc_where(exc)
    except Exception as exc:  # a crash inside the code under test at result.stage
        result.reason = _exc_reason(exc)
        result.where = _exc_where(exc)
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


@dataclass
class _Original:
    """The model as it was before ``apply``: what every later check compares against."""

    model_class: type
    copy: nn.Module  # an untouched deep copy, run side by side with the rewritten model
    keys: list[str]
    state: dict[str, torch.Tensor]
    hooks: int
    signature: list[tuple[str, str]]
    eval_out: list[torch.Tensor] = field(default_factory=list)
    input: Any = None

    @classmethod
    def record(cls, model: nn.Module) -> _Original:
        return cls(
            model_class=type(model),
            copy=copy.deepcopy(model),
            keys=list(model.state_dict().keys()),
            state={k: v.detach().clone() for k, v in model.state_dict().items()},
            hooks=_hook_count(model),
            signature=_module_signature(model),
        )


def _check(
    result: CoverageResult,
    name: str,
    spec: Any,
    input_size: Sequence[int] | None,
    model_kwargs: Mapping[str, Any] | None,
    batch_size: int,
    spatial_stage_rule: bool,
    adapt: bool,
    wake_zero_init: bool,
    max_params: int | None,
    seed: int,
) -> None:
    """Every guarantee in order; ``result.stage`` names the check running when something raises."""
    if max_params is not None:
        n = count_params_meta(name, **dict(model_kwargs or {}))
        result.params = n
        if n is not None and n > max_params:
            raise _Skip(f"{n / 1e6:.0f}M parameters > max_params {max_params / 1e6:.0f}M")

    result.stage = "create"
    features_only = bool(dict(model_kwargs or {}).get("features_only"))
    try:
        model, x = build_model(name, input_size=input_size, model_kwargs=model_kwargs, batch_size=batch_size)
    except Exception as exc:
        # timm names the architectures it builds no feature extractor for; that is timm's limit, not ours
        if features_only and "features_only" in str(exc):
            raise _Skip(f"timm: {_exc_reason(exc)}") from exc
        raise
    result.input_size = tuple(x.shape[1:])
    result.params = sum(p.numel() for p in model.parameters())
    disable_builtin_stochasticity(model)
    if wake_zero_init:
        wake_zero_params(model, seed=seed)
    model.eval()
    orig = _Original.record(model)
    result.stage = "input"
    with torch.no_grad():
        orig.eval_out = _flatten(orig.copy(x))
    orig.input = x
    if not orig.eval_out:
        raise CheckFailed("input", "model output has no tensors")

    result.stage = "plan"
    example, sites = _example_input(model, x, input_size)
    spec_obj = _fit_spec(spec, sites, adapt, spatial_stage_rule, model)
    n_entries = _check_plan(result, model, orig, spec_obj, example, features_only)
    result.stage = "apply"
    regs = _check_apply(model, orig, spec_obj, example, n_entries)
    result.stage = "state_dict"
    _check_state_dict(result, model, orig)
    result.stage = "eval"
    _expect_eval_output(model, x, orig.eval_out, "eval", "eval output differs from the original")
    result.stage = "train"
    out_full = _check_train(model, x, regs, seed)
    result.stage = "strength0"
    _check_strength0(model, orig, x, regs, out_full, seed)
    result.stage = "deepcopy"
    _check_deepcopy(model, orig, x, regs)
    result.stage = "grad_checkpointing"
    result.passes["grad_checkpointing"] = _check_grad_checkpointing(model, orig, x, regs, seed)
    result.stage = "fx_retrace"
    result.passes["fx_retrace"] = _check_fx_retrace(model, orig)
    result.stage = "strip"
    _check_strip(model, orig, x)


def _example_input(
    model: nn.Module, x: torch.Tensor, input_size: Sequence[int] | None
) -> tuple[torch.Tensor | None, list[timm_drop.Site]]:
    """The ``example_input`` to pass on, and the sites it finds: ``None`` (the default shape pass users get)
    unless the size is one timm does not record (an explicit ``input_size``, or a fixed-size model built at a
    smaller ``img_size`` than its config says)."""
    if input_size is not None:
        return x[:1], timm_drop.find_sites(model, x[:1])
    try:
        return None, timm_drop.find_sites(model)
    except SiteError:
        configured = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", ()))
        if tuple(x.shape[1:]) == configured:
            raise
        return x[:1], timm_drop.find_sites(model, x[:1])


def _fit_spec(
    spec: Any, sites: list[timm_drop.Site], adapt: bool, spatial_stage_rule: bool, model: nn.Module
) -> Any:
    spec_obj = spec if isinstance(spec, Mapping) else load_spec(spec).to_dict()
    if adapt:
        dropblock = DROPBLOCK_STAGE_PARAMS if spatial_stage_rule else None
        spec_obj = adapt_spec(spec_obj, sites, dropblock_params=dropblock, model=model)
    return spec_obj


def _check_plan(
    result: CoverageResult,
    model: nn.Module,
    orig: _Original,
    spec: Any,
    example: torch.Tensor | None,
    features_only: bool,
) -> int:
    """``plan`` finds at least one site (a backbone: a stage site) and is a dry run; returns the number of
    entries."""
    entries = timm_drop.plan(model, spec, example_input=example).entries
    result.n_sites = dict(Counter(e.kind for e in entries))
    # the checker is itself tested against stand-in rewriters whose entries name only their kind
    result.n_regularizers = dict(Counter(e.regularizer for e in entries if hasattr(e, "regularizer")))
    if not entries:
        raise CheckFailed("plan", "no site matched any rule (every model must get at least one)")
    if features_only and not result.n_sites.get("stage"):
        named = len(getattr(getattr(model, "feature_info", None), "info", []) or [])
        raise CheckFailed(
            "plan", f"{type(model).__name__}: no stage site although its feature_info names {named} module(s)"
        )
    if _module_signature(model) != orig.signature or _hook_count(model) != orig.hooks:
        raise CheckFailed("plan", "plan() changed the model (modules or hooks); it must be a dry run")
    return len(entries)


def _check_apply(
    model: nn.Module, orig: _Original, spec: Any, example: torch.Tensor | None, n_entries: int
) -> list[nn.Module]:
    """``apply_regularizer`` rewrites in place, keeps the class and inserts one module per plan entry."""
    returned = timm_drop.apply_regularizer(model, spec, example_input=example)
    if returned is not model:
        raise CheckFailed("apply", "apply_regularizer returned a different object")
    cls = orig.model_class
    if type(model) is not cls:
        raise CheckFailed("apply", f"model class changed from {cls.__name__} to {type(model).__name__}")
    regs = _regularizers(model)
    if len(regs) != n_entries:
        raise CheckFailed(
            "apply", f"plan has {n_entries} entries but the model holds {len(regs)} regularizer modules"
        )
    return regs


def _check_state_dict(result: CoverageResult, model: nn.Module, orig: _Original) -> None:
    """Same keys, and checkpoints load strictly in both directions."""
    keys = list(model.state_dict().keys())
    if set(keys) != set(orig.keys):
        added, removed = sorted(set(keys) - set(orig.keys)), sorted(set(orig.keys) - set(keys))
        raise CheckFailed("state_dict", f"state_dict keys changed: added {added[:5]}, removed {removed[:5]}")
    if keys != orig.keys:
        result.notes.append("state_dict key order changed")
    model.load_state_dict(orig.copy.state_dict(), strict=True)
    orig.copy.load_state_dict(model.state_dict(), strict=True)


def _count_calls(regs: list[nn.Module]) -> tuple[Counter[int], list[Any]]:
    """A counter of forward calls per regularizer (by id) and the hook handles to remove afterwards."""
    calls: Counter[int] = Counter()
    handles = [r.register_forward_pre_hook(lambda m, a: calls.update([id(m)])) for r in regs]
    return calls, handles


def _check_train(model: nn.Module, x: torch.Tensor, regs: list[nn.Module], seed: int) -> list[torch.Tensor]:
    """A training forward + backward at full strength is finite and runs every regularizer; returns the output."""
    calls, handles = _count_calls(regs)
    try:
        timm_drop.set_progress(model, 1.0)
        model.train()
        torch.manual_seed(seed)
        out_full = _flatten(model(x))
        loss = sum(o.float().square().mean() for o in out_full if o.is_floating_point())
        if not torch.isfinite(loss):
            raise CheckFailed("train", "training forward is not finite")
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            raise CheckFailed("train", "no parameter received a gradient")
        if not all(torch.isfinite(g).all() for g in grads):
            raise CheckFailed("train", "non-finite gradients")
        missed = [r for r in regs if calls[id(r)] == 0]
        if missed:
            raise CheckFailed(
                "train", f"{len(missed)} of {len(regs)} inserted regularizers never ran in the forward pass"
            )
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return out_full


def _check_strength0(
    model: nn.Module,
    orig: _Original,
    x: torch.Tensor,
    regs: list[nn.Module],
    out_full: list[torch.Tensor],
    seed: int,
) -> None:
    """At strength 0 the training output is the original's bit for bit; at full strength it is not."""
    ref = orig.copy
    for r in regs:
        r.strength.fill_(0.0)
    ref.train()
    with torch.no_grad():
        torch.manual_seed(seed)
        out_ref_train = _flatten(ref(x))
        torch.manual_seed(seed)
        out_zero = _flatten(model(x))
    if not _same(out_zero, out_ref_train):
        raise CheckFailed(
            "strength0",
            f"train output at strength 0 differs from the original (max abs diff "
            f"{_max_diff(out_zero, out_ref_train):.3g})",
        )
    if _same([o.detach() for o in out_full], out_ref_train):
        raise CheckFailed(
            "strength0", "train output at full strength equals the original: no regularizer had an effect"
        )
    for r in regs:
        r.strength.fill_(1.0)
    model.eval()
    ref.eval()
    model.load_state_dict(orig.state, strict=True)  # undo the BN statistics the train passes updated
    ref.load_state_dict(orig.state, strict=True)


def _check_deepcopy(model: nn.Module, orig: _Original, x: torch.Tensor, regs: list[nn.Module]) -> None:
    """A deep copy (timm's EMA) owns and runs its own regularizers, never the original's."""
    clone = copy.deepcopy(model)
    clone_regs = _regularizers(clone)
    if len(clone_regs) != len(regs) or {id(r) for r in clone_regs} & {id(r) for r in regs}:
        raise CheckFailed("deepcopy", "the deep copy does not own a fresh set of regularizers")
    calls, handles = _count_calls(regs + clone_regs)
    try:
        with torch.no_grad():
            out_copy_eval = _flatten(clone.eval()(x))
            clone.train()
            clone(x)
    finally:
        for h in handles:
            h.remove()
    if any(calls[id(r)] for r in regs):
        raise CheckFailed(
            "deepcopy", "the deep copy calls the ORIGINAL model's regularizers (closure hooks?)"
        )
    if not all(calls[id(r)] for r in clone_regs):
        raise CheckFailed("deepcopy", "some regularizers of the deep copy never ran")
    if not _same(out_copy_eval, orig.eval_out):
        raise CheckFailed("deepcopy", "eval output of the deep copy differs from the original")


def _train_step(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[list[torch.Tensor], list[Any]]:
    """One training forward + backward at ``seed``: the outputs and every parameter's gradient (None if none)."""
    torch.manual_seed(seed)
    out = _flatten(model(x))
    sum(o.float().square().mean() for o in out if o.is_floating_point()).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return [o.detach() for o in out], grads


def _check_grad_checkpointing(
    model: nn.Module, orig: _Original, x: torch.Tensor, regs: list[nn.Module], seed: int
) -> str:
    """With ``set_grad_checkpointing(True)``: every regularizer runs in the forward pass, outputs and gradients
    are those of the same step without it (bit for bit), and the recomputation counts no training forward."""
    switch = getattr(model, "set_grad_checkpointing", None)
    if switch is None:
        return "n/a: no set_grad_checkpointing"
    try:
        switch(True)
    except Exception as exc:  # timm asserts "gradient checkpointing not supported" on some families
        return f"n/a: {_exc_reason(exc)}"
    try:
        model.train()
        timm_drop.set_progress(model, 1.0)
        model.load_state_dict(orig.state, strict=True)
        calls, handles = _count_calls(regs)
        try:
            with torch.no_grad():
                torch.manual_seed(seed)
                model(x)
        finally:
            for h in handles:
                h.remove()
        missed = [getattr(r, "site_name", type(r).__name__) for r in regs if calls[id(r)] == 0]
        if missed:
            raise CheckFailed(
                "grad_checkpointing",
                f"{len(missed)} of {len(regs)} regularizers never ran with gradient checkpointing on "
                f"(e.g. {', '.join(missed[:3])})",
            )
        model.load_state_dict(orig.state, strict=True)
        before = [r.train_calls for r in regs]
        out, grads = _train_step(model, x, seed)
        if any(r.train_calls != b + 1 for r, b in zip(regs, before)):
            raise CheckFailed("grad_checkpointing", "a recomputation counted as a training forward")
        switch(False)
        model.load_state_dict(orig.state, strict=True)
        ref_out, ref_grads = _train_step(model, x, seed)
    finally:
        switch(False)
        model.eval()
        model.load_state_dict(orig.state, strict=True)
    if not _same(out, ref_out):
        raise CheckFailed(
            "grad_checkpointing",
            f"output with gradient checkpointing differs from without (max abs diff {_max_diff(out, ref_out):.3g})",
        )
    differ = [
        n for (n, _), a, b in zip(model.named_parameters(), grads, ref_grads)
        if (a is None) != (b is None) or (a is not None and not torch.equal(a, b))
    ]  # fmt: skip
    if differ:
        raise CheckFailed(
            "grad_checkpointing",
            f"gradients with gradient checkpointing differ from without ({len(differ)} tensors, e.g. {differ[0]}): "
            f"the recomputation drew other masks",
        )
    return "ok"


def _fx_graph(model: nn.Module) -> nn.Module:
    """The model traced in its current mode as timm's FX feature extraction traces it: torchvision's
    ``NodePathTracer`` (what ``create_feature_extractor`` and timm's ``FeatureGraphNet`` use) with timm's leaf
    modules and functions; one trace (torchvision's node naming is quadratic in the graph size)."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import NodePathTracer

    tracer = NodePathTracer(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    return torch.fx.GraphModule(model, tracer.trace(model))


def _check_fx_retrace(model: nn.Module, orig: _Original) -> str:
    """timm's tracer traces the regularized model wherever it traces the original; the graph's eval output is the
    model's bit for bit; ``torch.fx`` keeps working for everyone else afterwards."""
    try:
        import torchvision  # noqa: F401 - timm's FX feature extraction is torchvision's
    except ImportError:
        return "n/a: torchvision is not installed"
    model.eval()
    try:
        with torch.no_grad():
            traced = _flatten(_fx_graph(model)(orig.input))
    except Exception as exc:
        try:
            with torch.no_grad():
                _fx_graph(copy.deepcopy(orig.copy).eval())(orig.input)
        except Exception as plain_exc:
            return f"n/a: timm's tracer gives no working graph of the original ({_exc_reason(plain_exc)})"
        raise CheckFailed(
            "fx_retrace", f"timm's tracer gives no working graph of the regularized model: {_exc_reason(exc)}"
        ) from exc
    if not _same(traced, orig.eval_out):
        raise CheckFailed("fx_retrace", "the traced graph's eval output differs from the model's")
    try:
        torch.fx.symbolic_trace(nn.Linear(2, 2))
    except Exception as exc:
        raise CheckFailed("fx_retrace", f"torch.fx fails after tracing the model: {_exc_reason(exc)}") from exc
    return "ok"


def _check_strip(model: nn.Module, orig: _Original, x: torch.Tensor) -> None:
    """``strip_regularizers`` restores the class, keys, hooks, module tree and eval output."""
    returned = timm_drop.strip_regularizers(model)
    if returned is not model or type(model) is not orig.model_class:
        raise CheckFailed("strip", "strip_regularizers changed the object or its class")
    if _regularizers(model):
        raise CheckFailed("strip", f"{len(_regularizers(model))} regularizers remain after strip")
    keys = list(model.state_dict().keys())
    if keys != orig.keys and set(keys) != set(orig.keys):
        raise CheckFailed("strip", "state_dict keys differ after strip")
    if _hook_count(model) != orig.hooks:
        raise CheckFailed("strip", f"hooks after strip: {_hook_count(model)}, before apply: {orig.hooks}")
    if _module_signature(model) != orig.signature:
        raise CheckFailed("strip", "module tree after strip differs from the original")
    _expect_eval_output(model, x, orig.eval_out, "strip", "eval output after strip differs")


def _expect_eval_output(model: nn.Module, x: torch.Tensor, expected: Any, stage: str, message: str) -> None:
    """Run ``model`` in eval on ``x`` and fail ``stage`` unless the output is bit-identical to ``expected``."""
    model.eval()
    with torch.no_grad():
        out = _flatten(model(x))
    if not _same(out, expected):
        raise CheckFailed(stage, f"{message} (max abs diff {_max_diff(out, expected):.3g})")


# -- many models ----------------------------------------------------------------------------------------------
def select_models(
    *,
    filter: str | None = None,
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> list[str]:
    """``timm.list_models()`` narrowed by a glob ``filter``, then a seeded random ``sample``, then ``limit``."""
    import timm

    names = timm.list_models()
    if filter:
        names = [n for n in names if fnmatch.fnmatchcase(n, filter)]
    if sample is not None and sample < len(names):
        # kept in the sampled (random) order, so a run cut short still covers an unbiased subset
        names = random.Random(seed).sample(names, sample)
    if limit is not None:
        names = names[:limit]
    return names


def _worker(conn: Any, kwargs: dict[str, Any], threads: int) -> None:
    torch.set_num_threads(threads)
    import warnings

    warnings.filterwarnings("ignore")
    while True:
        name = conn.recv()
        if name is None:
            return
        conn.send(check_model(name, **kwargs).to_dict())


def run_coverage(
    names: Iterable[str],
    *,
    spec: Mapping[str, Any] = COVERAGE_SPEC,
    timeout: float = 120.0,
    max_params: int | None = 250_000_000,
    threads: int = 1,
    progress: Callable[[CoverageResult], None] | None = None,
    features_only: bool = False,
) -> Iterator[CoverageResult]:
    """Run :func:`check_model` on each model in a worker subprocess; a model past ``timeout`` seconds (or one
    that kills the worker, e.g. out of memory) is recorded as a failure and the worker is restarted.

    ``features_only``: check timm's backbone form of each model (``features_only=True``) instead; those must
    also get stage sites, and architectures timm builds no feature extractor for are skipped with its reason."""
    ctx = mp.get_context("spawn")
    kwargs: dict[str, Any] = {"spec": dict(spec), "max_params": max_params}
    if features_only:
        kwargs["model_kwargs"] = {"features_only": True}
    proc = conn = None

    def start() -> tuple[Any, Any]:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, kwargs, threads), daemon=True)
        p.start()
        child.close()
        return p, parent

    try:
        for name in names:
            if proc is None or not proc.is_alive():
                proc, conn = start()
            t0 = time.perf_counter()
            conn.send(name)
            try:
                ready = conn.poll(timeout)
                res = CoverageResult(**conn.recv()) if ready else None
            except (EOFError, ConnectionError, OSError):
                res = CoverageResult(name, False, "crash", f"worker died (exit code {proc.exitcode})")
                proc.join(1)
                proc = None
            if res is None:
                res = CoverageResult(name, False, "timeout", f"no result within {timeout:.0f} s")
                proc.kill()
                proc.join(5)
                proc = None
            if res.input_size is not None:
                res.input_size = tuple(res.input_size)
            if res.stage in ("timeout", "crash"):
                res.seconds = round(time.perf_counter() - t0, 3)
            if progress is not None:
                progress(res)
            yield res
    finally:
        if proc is not None and proc.is_alive():
            try:
                conn.send(None)
                proc.join(5)
            except Exception:
                pass
            if proc.is_alive():
                proc.kill()


# -- report ---------------------------------------------------------------------------------------------------
def _cause(res: CoverageResult) -> str:
    """A failure's cause with numbers, shapes and names folded, for grouping."""
    text = re.sub(r"'[^']*'", "'…'", res.reason)
    text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)
    where = re.sub(r":\d+", "", res.where)
    return f"{res.stage}: {text[:160]}" + (f" @ {where}" if where else "")


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


#: the checks that do not apply to every model (:attr:`CoverageResult.passes`), as the report titles them
OPTIONAL_PASSES: dict[str, str] = {"grad_checkpointing": "gradient-checkpointing pass", "fx_retrace": "FX re-trace pass"}


def _pass_line(checked: Sequence[CoverageResult], key: str, title: str) -> str:
    """``- <title>: N ok, M not applicable (reasons), F failed`` over the checked models."""
    ok = sum(1 for r in checked if r.passes.get(key) == "ok")
    na = Counter(re.sub(r"\(.*", "", r.passes[key][4:]).strip() for r in checked if r.passes.get(key, "").startswith("n/a"))
    failed = sum(1 for r in checked if r.stage == key)
    reasons = "; ".join(f"{n} {why}" for why, n in na.most_common(3))
    return (
        f"- {title}: {ok} ok, {sum(na.values())} not applicable" + (f" ({reasons})" if reasons else "")
        + f", {failed} failed"
    )


def render_report(
    results: Sequence[CoverageResult],
    *,
    command: str = "",
    elapsed: float | None = None,
    features_only: bool = False,
    partial: str | None = None,
) -> str:
    """Markdown: date, versions, pass rate, failures grouped by cause, then one row per failing model."""
    import timm

    checked = [r for r in results if not r.skipped]
    passed = [r for r in checked if r.ok]
    failed = [r for r in checked if not r.ok]
    skipped = [r for r in results if r.skipped]
    rate = 100.0 * len(passed) / len(checked) if checked else 0.0
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = "features_only models (backbones) of the timm registry" if features_only else "the timm registry"
    lines = [f"# timm_drop coverage over {title}", ""]
    if partial:
        lines += [f"**PARTIAL RUN**: {partial}", ""]
    lines += [
        f"- date: {now}",
        f"- versions: timm_drop {timm_drop.__version__}, timm {timm.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()} CPU",
    ]
    if command:
        lines.append(f"- command: `{command}`")
    if elapsed is not None:
        lines.append(f"- wall time: {elapsed / 60:.1f} min")
    lines += [
        f"- models: {len(results)} ({len(checked)} checked, {len(skipped)} skipped: too large for a CPU check"
        + (", or no features_only form in timm)" if features_only else ")"),
        f"- **pass rate: {len(passed)}/{len(checked)} = {rate:.1f} %**",
        *(_pass_line(checked, key, title) for key, title in OPTIONAL_PASSES.items()),
        "",
        "Each model: `pretrained=False`, smallest accepted input, batch 2, `COVERAGE_SPEC` (every site kind; "
        "dropblock on spatial stage outputs). Checks: plan is a dry run with >= 1 site; same object and class; "
        "identical state_dict keys and strict loads both ways; bit-identical eval output; finite train "
        "forward/backward with every regularizer running; strength-0 train output bit-identical to the "
        "original and full strength different; deepcopy runs its own regularizers; with gradient checkpointing "
        "on, every regularizer runs and outputs and gradients equal those without it at one seed; timm's FX "
        "tracer traces the regularized model, its graph gives the eval output bit for bit and torch.fx still "
        "traces afterwards; strip restores class, keys, hooks, modules and eval output."
        + (
            " Backbones: `timm.create_model(name, features_only=True)` (timm's feature wrapper or the model's "
            "own `*Features` class), which must also get at least one `stage` site."
            if features_only
            else ""
        ),
        "",
    ]
    if failed:
        lines += ["## Failures by cause", "", "| # | cause | example models |", "|---:|---|---|"]
        groups: dict[str, list[CoverageResult]] = {}
        for r in failed:
            groups.setdefault(_cause(r), []).append(r)
        for cause, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            example = ", ".join(r.name for r in rs[:6]) + (" …" if len(rs) > 6 else "")
            lines.append(f"| {len(rs)} | {_md(cause)} | {_md(example)} |")
        lines += [
            "",
            "## Failing models",
            "",
            "| model | stage | reason | where | input |",
            "|---|---|---|---|---|",
        ]
        for r in sorted(failed, key=lambda r: (r.stage, r.name)):
            size = "x".join(map(str, r.input_size)) if r.input_size else ""
            lines.append(f"| {r.name} | {r.stage} | {_md(r.reason)} | {_md(r.where)} | {size} |")
        lines.append("")
    if skipped:
        lines += ["## Skipped", "", ", ".join(f"{r.name} ({r.reason})" for r in skipped), ""]
    notes = [r for r in checked if r.notes]
    if notes:
        lines += ["## Notes (non-fatal)", ""]
        lines += [f"- {r.name}: {'; '.join(r.notes)}" for r in notes]
        lines.append("")
    if passed:
        kinds = Counter()
        for r in passed:
            kinds.update({k: 1 for k, v in r.n_sites.items() if v})
        secs = sorted(r.seconds for r in checked)
        lines += [
            "## Passing models",
            "",
            "Models with at least one site of each kind: "
            + ", ".join(
                f"{k} {kinds[k]}"
                for k in ("stage", "block", "residual", "shortcut", "merge", "norm", "module")
            ),
            "",
            f"Seconds per model: median {secs[len(secs) // 2]:.1f}, max {secs[-1]:.1f}.",
            "",
            ", ".join(r.name for r in sorted(passed, key=lambda r: r.name)),
            "",
        ]
    return "\n".join(lines)
