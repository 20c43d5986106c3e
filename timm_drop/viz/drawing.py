"""Drawing: the panels of one figure row (image, activation, per method its mask and score map) and the figure
layout that places them and records every panel's pixel box.

matplotlib is imported inside the drawing functions only, so ``import timm_drop`` never needs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from timm_drop.regularizers.base import Regularizer
from timm_drop.viz.capture import SiteCapture
from timm_drop.viz.swaps import _Slot
from timm_drop.viz.traits import _cell_size, _method_class, _score_maps

__all__ = ["DROP_RGB", "SCALE_RGB", "MaskFigure", "Panel", "format_params"]

#: RGB of a dropped unit in a mask panel (never a gray, so a test can count it in the PNG).
DROP_RGB = (0.86, 0.08, 0.08)
#: RGB that scaled units are tinted towards, in proportion to ``|1 - r|`` (r = factor / kept scale).
SCALE_RGB = (0.10, 0.35, 0.95)
_ROW_IN = 2.3  # inches per row: a square panel plus a four-line title


@dataclass
class Panel:
    """One drawn panel; ``bbox`` is the image's pixel box in the PNG, (left, top, right, bottom)."""

    row: int
    col: int
    kind: str  # "image", "activation", "mask", "score", "text"
    site: str
    method: str = ""
    title: str = ""
    bbox: tuple[int, int, int, int] | None = None
    map_shape: tuple[int, int] | None = None  # (H, W) of the drawn map
    channel: int | None = None
    dropped: float | None = None  # realised dropped fraction of the sample at this site (drawn units)
    map_dropped: float | None = None  # dropped fraction of the drawn feature map (channel ``channel``)
    scaled: float | None = None  # fraction of units scaled (factor neither 0 nor the kept scale)
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # a text panel's message (why a method could not be drawn here)


@dataclass
class MaskFigure:
    """What :func:`render_masks` drew: the PNG path, its size in pixels (width, height) and every panel."""

    path: Path | None
    size: tuple[int, int]
    panels: list[Panel]

    def find(self, kind: str, *, site: str | None = None, method: str | None = None) -> list[Panel]:
        return [
            p
            for p in self.panels
            if p.kind == kind and (site is None or p.site == site) and (method is None or p.method == method)
        ]


def _kept_scale(mask: torch.Tensor) -> float:
    """The factor most kept units got (DropBlock's count/count_ones, dropout's 1/(1-p), 1 for soft masks)."""
    nz = mask[(mask != 0) & torch.isfinite(mask)]
    if nz.numel() == 0:
        return 1.0
    vals, counts = torch.unique(nz, return_counts=True)
    return float(vals[counts.argmax()])

def format_params(params: dict[str, Any]) -> str:
    """``k=v, ...`` with floats to 3 significant digits, as the panel titles show a method's parameters."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _unit(values: torch.Tensor) -> Any:
    """Min-max to [0, 1] as a numpy array (any normalisation the model's data config used is undone for show)."""
    v = values.float()
    lo, hi = float(v.min()), float(v.max())
    return ((v - lo) / (hi - lo) if hi > lo else torch.zeros_like(v)).numpy()


def _unit_rgb(values: torch.Tensor) -> Any:
    import numpy as np

    return np.repeat(_unit(values)[..., None], 3, axis=-1)


def _mask_rgb(act: torch.Tensor, rel: torch.Tensor) -> Any:
    """The feature map in gray, dropped units solid red, scaled units tinted blue by ``|1 - r|``."""
    import numpy as np

    rgb = _unit_rgb(act)
    r = rel.numpy()
    known = np.isfinite(r)
    dropped = known & (r == 0)
    dev = np.where(known & ~dropped, np.abs(r - 1.0), 0.0)
    alpha = np.where(dev > 1e-3, 0.25 + 0.75 * np.clip(dev, 0, 1), 0.0)[..., None]
    rgb = rgb * (1 - alpha) + np.array(SCALE_RGB) * alpha
    rgb[dropped] = DROP_RGB
    rgb[~known] = 0.5 * rgb[~known] + 0.25  # unknown factor (custom op, zero input): faded
    return rgb


def _outline(ax: Any, dropped: Any, color: str = "yellow") -> None:
    """Exact pixel-edge outlines of the dropped region (block outlines, not marching-squares cuts)."""
    import numpy as np
    from matplotlib.collections import LineCollection

    d = np.pad(dropped.astype(bool), 1)
    segs = []
    rows, cols = np.nonzero(d[1:, 1:-1] != d[:-1, 1:-1])  # horizontal edges, above unit row i
    segs += [((j - 0.5, i - 0.5), (j + 0.5, i - 0.5)) for i, j in zip(rows, cols)]
    rows, cols = np.nonzero(d[1:-1, 1:] != d[1:-1, :-1])  # vertical edges, left of unit column j
    segs += [((j - 0.5, i - 0.5), (j - 0.5, i + 0.5)) for i, j in zip(rows, cols)]
    if segs:
        ax.add_collection(LineCollection(segs, colors=color, linewidths=0.9))


def _cell_grid(ax: Any, h: int, w: int, kh: int, kw: int) -> None:
    """CorrDrop's pooling cells (Eq. (10)): one line collection, not one artist per line (drawing cost)."""
    from matplotlib.collections import LineCollection

    segs = [((-0.5, r - 0.5), (w - 0.5, r - 0.5)) for r in range(kh, h, kh)]
    segs += [((c - 0.5, -0.5), (c - 0.5, h - 0.5)) for c in range(kw, w, kw)]
    if segs:
        ax.add_collection(LineCollection(segs, colors="white", linewidths=0.5, alpha=0.6))


def _draw(
    rows: list[dict[str, Any]],
    out: str | os.PathLike | None,
    dpi: int,
    title: str,
) -> MaskFigure:
    # The Agg canvas directly, not pyplot: no global backend switch, no figure registry to leak into.
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(len(r["panels"]) for r in rows)
    # Constrained layout reserves room for every (multi-line) title above its image, aspect-locked panels included.
    fig = Figure(figsize=(2.0 * ncols, _ROW_IN * len(rows) + 0.35), dpi=dpi, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    panels: list[Panel] = []
    drawn: list[tuple[Any, Panel]] = []
    for i, row in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(row["panels"]):
                ax.axis("off")
                continue
            spec = row["panels"][j]
            p: Panel = spec["panel"]
            p.row, p.col = i, j
            ax.set_title(p.title, fontsize=6.5)
            if p.kind == "text":
                ax.axis("off")
                ax.text(0.5, 0.5, spec["text"], ha="center", va="center", wrap=True, fontsize=6.5)
            else:
                ax.imshow(spec["array"], interpolation="nearest", cmap=spec.get("cmap"), aspect="equal")
                for overlay in spec.get("overlays", ()):
                    overlay(ax)
                ax.set_xlim(-0.5, spec["array"].shape[1] - 0.5)
                ax.set_ylim(spec["array"].shape[0] - 0.5, -0.5)
                drawn.append((ax, p))
            panels.append(p)
    fig.suptitle(title, fontsize=8)
    canvas.draw()
    width, height = canvas.get_width_height()
    renderer = canvas.get_renderer()
    for ax, p in drawn:
        bb = ax.images[0].get_window_extent(renderer)
        p.bbox = (round(bb.x0), round(height - bb.y1), round(bb.x1), round(height - bb.y0))
    path = None
    if out is not None:
        from matplotlib.image import imsave

        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The pixels just drawn (savefig would lay out and render everything a second time), so the recorded
        # panel boxes are exact for the file by construction.
        imsave(path, np.asarray(canvas.buffer_rgba()), format="png")
    return MaskFigure(path, (width, height), panels)




def _row_panels(
    site: str,
    slots: list[_Slot],
    caps: list[SiteCapture | None],
    image: torch.Tensor,
    i: int,
    conv: Callable[[torch.Tensor], tuple[torch.Tensor, str]],
    first: SiteCapture,
    layout: str,
    shape: tuple[int, ...] | None,
) -> list[dict[str, Any]]:
    """One figure row for sample ``i`` at ``site``: the image, the activation's channel mean, and per method its
    score map (if it has one) and mask, or a text panel saying why there is none."""
    act_maps, note = conv(first.input)
    act = act_maps[i]  # (C, H, W)
    h, w = act.shape[-2:]
    shape_txt = "x".join(str(s) for s in (shape[1:] if shape else first.input.shape[1:]))
    img = image.detach().float().cpu()
    out = [
        {
            "panel": Panel(0, 0, "image", site, title=f"image {i}"),
            "array": _unit(img.permute(1, 2, 0)) if img.shape[0] == 3 else _unit_rgb(img[0]),
        },
        {
            "panel": Panel(
                0,
                0,
                "activation",
                site,
                map_shape=(h, w),
                title=f"{site}\n{layout} {shape_txt}: {act.shape[0]} ch, {h}x{w}\nchannel mean"
                + (f"; {note}" if note else ""),
            ),
            "array": act.mean(0).numpy(),
            "cmap": "viridis",
        },
    ]
    channel = int(act.abs().flatten(1).mean(1).argmax())
    for slot, cap in zip(slots, caps):
        if cap is None or slot.reg is None:
            why = slot.note or f"{slot.name}: nothing captured (site not reached)"
            panel = Panel(0, 0, "text", site, slot.name, title=slot.name, params=slot.params, note=why)
            out.append({"panel": panel, "text": why})
            continue
        out += _method_panels(site, slot, cap, i, lambda t: conv(t)[0], act, channel)
    return out


@dataclass
class _MaskStats:
    """Realised fractions of one sample's mask: over every drawn unit, and over the drawn channel."""

    rel: torch.Tensor  # (C, H, W) factor / kept scale; NaN where unknown
    dropped: float
    scaled: float
    map_dropped: float

    @classmethod
    def of(cls, mask: torch.Tensor, all_masks: torch.Tensor, channel: int) -> _MaskStats:
        rel = mask / _kept_scale(all_masks)
        finite = torch.isfinite(rel)
        dropped_all = float(((rel == 0) & finite).sum()) / max(1, int(finite.sum()))
        scaled_all = float((((rel - 1).abs() > 1e-3) & (rel != 0) & finite).sum()) / max(1, int(finite.sum()))
        rel_c = rel[channel]
        fin_c = torch.isfinite(rel_c)
        map_dropped = float(((rel_c == 0) & fin_c).sum()) / max(1, int(fin_c.sum()))
        return cls(rel, dropped_all, scaled_all, map_dropped)


def _method_panels(
    site: str,
    slot: _Slot,
    cap: SiteCapture,
    i: int,
    maps: Callable[[torch.Tensor], torch.Tensor],
    act: torch.Tensor,
    channel: int,
) -> list[dict[str, Any]]:
    """The score panel (methods with a score map) and the mask panel of one method on sample ``i``."""
    h, w = act.shape[-2:]
    stats = _MaskStats.of(maps(cap.mask)[i], cap.mask, channel)
    rel_c = stats.rel[channel]
    dropped_c = (rel_c == 0).numpy() & torch.isfinite(rel_c).numpy()
    cells = _cell_size(slot.name, slot.params, h, w)

    def cell_grid(ax: Any) -> None:
        _cell_grid(ax, h, w, *cells)

    out = []
    score = _score_maps(slot.name, slot.params, cap.input, slot.layout, maps)
    if score is not None:
        smap, stitle = score
        overlays = [cell_grid] if cells is not None else []
        overlays.append(lambda ax: _outline(ax, dropped_c, color="cyan"))
        panel = Panel(
            0, 0, "score", site, slot.name, title=f"{slot.name}: {stitle}\nch {channel}", map_shape=(h, w),
            channel=channel, params=slot.params,
        )  # fmt: skip
        array = smap[i, channel if smap.shape[1] > 1 else 0].numpy()
        out.append({"panel": panel, "array": array, "cmap": "magma", "overlays": overlays})
    overlays = [cell_grid] if cells is not None else []
    if _method_class(slot.name).figure.outline_blocks:
        overlays.append(lambda ax: _outline(ax, dropped_c))
    panel = Panel(
        0, 0, "mask", site, slot.name, title=f"{slot.name}\n{_params_text(slot)}\n{_stats_text(stats, channel, cap)}",
        map_shape=(h, w), channel=channel, dropped=stats.dropped, map_dropped=stats.map_dropped,
        scaled=stats.scaled, params=slot.params,
    )  # fmt: skip
    out.append({"panel": panel, "array": _mask_rgb(act[channel], rel_c), "overlays": overlays})
    return out


def _params_text(slot: _Slot) -> str:
    text = format_params(slot.params)
    mult = float(slot.reg.strength) if isinstance(slot.reg, Regularizer) else 1.0
    if mult != 1.0:  # a schedule part-way: the configured strength times this
        text += f" x{mult:.2f}"
    return text


def _stats_text(stats: _MaskStats, channel: int, cap: SiteCapture) -> str:
    text = f"dropped {stats.dropped:.1%} (ch {channel}: {stats.map_dropped:.1%})"
    if stats.scaled > 0:
        text += f"\nscaled {stats.scaled:.1%}"
    if not cap.exact:
        text += "\nratio out/in (not a product)"
    return text
