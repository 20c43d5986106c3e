"""The check itself: :func:`check_model` runs every guarantee of the package docstring in order on one model."""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import timm_drop
from timm_drop.sites import SiteError
from timm_drop.spec import load_spec
from timm_drop.tools.coverage.models import (
    COVERAGE_SPEC,
    DROPBLOCK_STAGE_PARAMS,
    adapt_spec,
    build_model,
    count_params_meta,
    disable_builtin_stochasticity,
    wake_zero_params,
)
from timm_drop.tools.coverage.result import (
    CheckFailed,
    CoverageResult,
    _exc_reason,
    _exc_where,
    _flatten,
    _hook_count,
    _max_diff,
    _module_signature,
    _regularizers,
    _same,
    _Skip,
)


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
