""":func:`render_masks`: regularize a copy of the model, capture each drawn site's masks (the spec's own
regularizers, or each compared method alone at the site), and lay the rows out as one figure."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from timm_drop.regularizers.base import Regularizer
from timm_drop.viz.capture import SiteCapture, _rng_devices, _token_grid, capture_masks, load_images, to_maps
from timm_drop.viz.drawing import MaskFigure, _draw, _row_panels
from timm_drop.viz.swaps import (
    _build_method,
    _compare_methods,
    _replace_module,
    _select,
    _site_regularizers,
    _Slot,
    _spec_rules,
    _train_mode,
)

__all__ = ["render_masks"]

#: What was captured at each drawn site: (slot, capture or None when nothing could be placed or reached).
_PerSite = dict[str, list[tuple[_Slot, SiteCapture | None]]]


def render_masks(
    model: nn.Module | str,
    spec: Any = None,
    images: Any = None,
    *,
    sites: str | Sequence[str] | None = None,
    strength: float | None = None,
    seed: int = 0,
    compare: str | Sequence[str] | None = None,
    progress: float | None = 1.0,
    out: str | os.PathLike | None = None,
    label: str = "",
    num_images: int = 2,
    max_sites: int = 4,
    input_size: Sequence[int] | None = None,
    dpi: int = 80,
) -> MaskFigure:
    """Draw what the regularizers of ``spec`` do to ``images`` at each selected site (the papers' mask figures).

    Args:
        model: a timm model (or a timm model name, built with ``pretrained=False``). It is not changed: a deep copy
            is regularized and run (BatchNorm statistics and the caller's RNG stream stay as they were).
        spec: a spec (path, YAML text, dict or Spec) applied to the copy; None when ``model`` already carries
            regularizers (the recipe's case).
        images: None (a few embedded digits), a model-ready tensor, or image files / PIL images.
        sites: glob(s) over site names (``"stage:*"``, ``"*layer3*"``); default: up to ``max_sites`` sites of the
            plan spread over depth.
        strength: replaces the strength parameters (each method's ``strength_params``) at the drawn sites.
        seed: ``torch.manual_seed`` before each forward, so methods compared side by side share it.
        compare: registry names (or ``"a,b,c"``): each method alone at each drawn site of a fresh copy, at the spec's
            parameters when the spec uses that method, else the site's shared ones (``block_size``, ``top_rate``)
            and the method's ``compare_defaults``.
        progress: schedule progress for the copy (1.0: full strength); None keeps the model's current strengths.
        out: PNG path to write (parent folders are created); None draws without saving.
        label: appended to the figure's title (the recipe puts the epoch there).
        num_images: how many digits when ``images`` is None.
        max_sites: cap on the number of sites when ``sites`` is None.
        input_size: (C, H, W) for image files / digits (default: the model's).
        dpi: figure resolution.

    Returns:
        :class:`MaskFigure` with every panel's pixel box and the realised fractions shown in its titles.
    """
    if isinstance(model, str):
        import timm

        model = timm.create_model(model, pretrained=False)
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: draw its original module
    if compare is not None:
        _compare_methods(compare)  # an unknown name fails before any work
    x = load_images(model, images, num_images=num_images, input_size=input_size)
    device = next(iter(model.parameters()), torch.empty(0)).device
    dtype = next(iter(model.parameters()), torch.empty(0)).dtype
    x = x.to(device=device, dtype=dtype if dtype.is_floating_point else torch.float32)
    # The caller's random stream goes on as if nothing ran: the seeds below are set inside a fork.
    with torch.random.fork_rng(devices=_rng_devices(x)):
        return _render_batch(
            model, spec, x, sites, strength, seed, compare, progress, out, label, max_sites, dpi
        )



@dataclass
class _Sites:
    """Per site of the plan: its stage, layout, shape and its first regularizer (the one compare mode replaces)."""

    stages: dict[str, int | None]
    layouts: dict[str, str]
    shapes: dict[str, tuple[int, ...] | None]
    own: dict[str, nn.Module]

    @classmethod
    def of(cls, pairs: list[tuple[Any, nn.Module]]) -> _Sites:
        own: dict[str, nn.Module] = {}
        for e, r in pairs:
            own.setdefault(e.site, r)
        return cls(
            {e.site: e.stage for e, _ in pairs},
            {e.site: (r.layout if isinstance(r, Regularizer) else e.layout) or "NCHW" for e, r in pairs},
            {e.site: e.shape for e, _ in pairs},
            own,
        )


def _render_batch(
    model: nn.Module,
    spec: Any,
    x: torch.Tensor,
    sites: str | Sequence[str] | None,
    strength: float | None,
    seed: int,
    compare: str | Sequence[str] | None,
    progress: float | None,
    out: str | os.PathLike | None,
    label: str,
    max_sites: int,
    dpi: int,
) -> MaskFigure:
    work = copy.deepcopy(model)
    if spec is not None:
        from timm_drop.plans import applied_plans
        from timm_drop.rewrite import apply_regularizer

        apply_regularizer(work, spec, example_input=x[:1])
        spec = applied_plans(work)[-1].spec  # the concrete spec (what a placement by name became on this model)
    pairs = _site_regularizers(work)
    chosen = _select([e for e, _ in pairs], sites, max_sites)
    at = _Sites.of(pairs)
    _train_mode(work)
    if progress is not None:
        from timm_drop.schedules import set_progress

        set_progress(work, progress)
    if compare is None:
        per_site = _own_captures(work, pairs, chosen, at, x, strength, seed)
    else:
        per_site = _compare_captures(work, pairs, chosen, at, x, spec, strength, seed, compare)
    rows = _rows(work, per_site, chosen, at, x)
    if not rows:
        raise ValueError(f"nothing to draw at sites {chosen}: no regularizer there saw the images")
    arch = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
    title = (
        f"{arch}: seed {seed}"
        + (f", strength {strength}" if strength is not None else "")
        + (f", progress {progress}" if progress is not None else "")
        + (f", {label}" if label else "")
    )
    return _draw(rows, out, dpi, title)


def _own_captures(
    work: nn.Module,
    pairs: list[tuple[Any, nn.Module]],
    chosen: list[str],
    at: _Sites,
    x: torch.Tensor,
    strength: float | None,
    seed: int,
) -> _PerSite:
    """The spec's own regularizers at the chosen sites (rebuilt at ``strength`` if given), one forward for all."""
    per_site: _PerSite = {s: [] for s in chosen}
    slots: list[_Slot] = []
    for e, reg in pairs:
        if e.site not in per_site:
            continue
        params = dict(e.params)
        if strength is not None:
            new, params, note = _build_method(e.regularizer, params, at.layouts[e.site], strength, like=reg)
            if new is None:
                raise ValueError(f"--strength {strength} at site {e.site}: {note}")
            new.to(x.device)
            _replace_module(work, reg, new)
            reg = new
        slots.append(_Slot(e.site, at.layouts[e.site], e.shape, e.stage, e.regularizer, params, reg))
    _, caps = capture_masks(work, x, seed=seed, modules=[s.reg for s in slots])
    for s in slots:
        per_site[s.site].append((s, caps.get(s.reg)))
    return per_site


def _compare_captures(
    work: nn.Module,
    pairs: list[tuple[Any, nn.Module]],
    chosen: list[str],
    at: _Sites,
    x: torch.Tensor,
    spec: Any,
    strength: float | None,
    seed: int,
    compare: str | Sequence[str],
) -> _PerSite:
    """Each compared method alone at each chosen site: at the spec's parameters when the spec uses that method,
    else the site's shared ones; one forward per (site, method), all from the same seed."""
    methods = _compare_methods(compare)
    rules = list(_spec_rules(spec))
    paths = {id(m): name for name, m in work.named_modules(remove_duplicate=False)}
    per_site: _PerSite = {s: [] for s in chosen}
    for site in chosen:
        site_params: dict[str, Any] = {}
        for e, _ in pairs:
            if e.site == site:
                site_params.update(e.params)
        for name in methods:
            own = [e.params for e, _ in pairs if e.site == site and e.regularizer == name]
            rule = next((r for r in rules if r.regularizer == name), None)
            if own:  # the method's own regularizer here: its parameters as planned (relative sizes resolved)
                params = {**site_params, **own[-1]}
            elif rule is not None:
                # relative sizes ({fraction: f}) resolve on the sites of the rule: the site's resolved ones stay
                stage = rule.params_for_stage(at.stages[site])
                params = {**site_params, **{k: v for k, v in stage.items() if not isinstance(v, Mapping)}}
            else:
                params = dict(site_params)
            reg, params, note = _build_method(name, params, at.layouts[site], strength, like=at.own[site], fill=True)
            slot = _Slot(site, at.layouts[site], at.shapes[site], at.stages[site], name, params, reg, note)
            if reg is None:
                per_site[site].append((slot, None))
                continue
            # This method alone in the model: the site's first regularizer replaced, every other one an identity.
            alone = copy.deepcopy(work)
            for _, other in pairs:
                if other is not at.own[site]:
                    _replace_module(alone, alone.get_submodule(paths[id(other)]), nn.Identity())
            reg.to(x.device)
            _replace_module(alone, alone.get_submodule(paths[id(at.own[site])]), reg)
            reg.train()
            _, caps = capture_masks(alone, x, seed=seed, modules=[reg])
            per_site[site].append((slot, caps.get(reg)))
    return per_site


def _rows(work: nn.Module, per_site: _PerSite, chosen: list[str], at: _Sites, x: torch.Tensor) -> list[dict]:
    """One row per (drawn site, image); a site whose regularizers saw another batch axis (windowed tokens) is left
    out."""
    model_grid = _token_grid(work, tuple(x.shape[-2:]))
    rows = []
    for site in chosen:
        captured = per_site[site]
        first = next((c for _, c in captured if c is not None), None)
        if first is None:
            continue
        layout = at.layouts[site]
        if first.batch_size != x.shape[0]:
            continue  # windowed / regrouped tokens: the batch axis is not the images'
        slots, caps = [s for s, _ in captured], [c for _, c in captured]

        # the grid the site's own regularizer acts on (a branch's, or the patch tokens before the class token
        # joins), else the model's patch grid
        own = getattr(at.own[site], "token_grid", None)
        grid, prefix = (own, at.own[site].num_prefix_tokens) if own is not None else model_grid

        def conv(t: torch.Tensor, layout: str = layout, grid: Any = grid, prefix: int = prefix) -> tuple[torch.Tensor, str]:
            return to_maps(t, layout, grid, prefix)

        for i in range(x.shape[0]):
            panels = _row_panels(site, slots, caps, x[i], i, conv, first, layout, at.shapes[site])
            rows.append({"panels": panels})
    return rows
