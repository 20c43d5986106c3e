"""See what a regularizer does: the papers' mask figures for any timm model and spec (``timm-drop viz``).

:func:`render_masks` runs one train-mode forward of a few images through a regularized *copy* of a model and
draws, for each selected site and image, a row of panels: the image, the channel-mean of the activation the
regularizer received, and per regularizer the realised mask over one feature map (dropped units solid red,
scaled units tinted blue by how much), with DropBlock / CorrDrop block outlines and, where the method has one,
its score map (CorrDrop's correlation score, Eqs. (1)-(3); AttentionDrop's drop weight ``w``).
``compare=["dropblock", "corrdrop", ...]`` puts several methods side by side at the same site, image and seed
(DropBlock's Figure 1, CorrDrop's Figure 2, AttentionDrop's Figure 2 layout).

How the mask is captured (:func:`capture_masks`): hooks on every :class:`~timm_drop.regularizers.base.Regularizer`
record its input; the call is then replayed on a detached copy of that input from the RNG state it started with
(inside ``torch.random.fork_rng``, so the model's own random stream is untouched) and ``d out / d in`` is the
realised mask *exactly*, also where the input is 0 (a ratio ``out / in`` is undefined there, and post-ReLU maps
are half zeros). This holds for every built-in method because each one multiplies its input by a factor computed
without gradient (every built-in regularizer is one); for a custom regularizer that is not such a product the ratio ``out / in`` is used
where the input is non-zero, and the figure says so. The hooks return nothing, so the forward computes exactly what
it computes without them (pinned by a test).

Layouts: ``NCHW`` maps are drawn as they are, ``NHWC`` (Swin) are permuted first (never transposed pictures),
``NLC`` token sites (ViT) are drawn on the patch grid (``patch_embed`` grid, prefix tokens left out and counted in
the title), ``NC`` pooled features as a one-row strip of channels.

The recipe's ``log.mask_every: N`` calls :func:`log_epoch_masks` at the end of every N-th epoch: a grid for a fixed
batch (the first eval images) at the run's current schedule strength, written to ``<run>/masks/epoch_NNN.png``.

matplotlib is imported inside the drawing functions only, so ``import timm_drop`` never needs it.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from timm_drop.regularizers.base import Regularizer

__all__ = [
    "MaskFigure",
    "Panel",
    "SiteCapture",
    "capture_masks",
    "load_images",
    "log_epoch_masks",
    "render_masks",
    "to_maps",
]

#: RGB of a dropped unit in a mask panel (never a gray, so a test can count it in the PNG).
DROP_RGB = (0.86, 0.08, 0.08)
#: RGB that scaled units are tinted towards, in proportion to ``|1 - r|`` (r = factor / kept scale).
SCALE_RGB = (0.10, 0.35, 0.95)
#: Parameters a compared method borrows when neither the spec nor ``strength`` gives them.
COMPARE_DEFAULTS: dict[str, Any] = {"drop_prob": 0.1, "block_size": 5, "top_rate": 0.2, "q": 0.5}
#: Methods whose dropped regions get block outlines, and the methods with a score map.
_OUTLINED = ("dropblock", "corrdrop")
_CELLS = ("corrdrop",)
_ROW_IN = 2.3  # inches per row: a square panel plus a four-line title


# ---------------------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------------------
def to_maps(
    t: torch.Tensor, layout: str, grid: tuple[int, int] | None = None, num_prefix_tokens: int = 0
) -> tuple[torch.Tensor, str]:
    """A site tensor as channels-first maps ``(N, C, H, W)`` in picture orientation, and a note for the title.

    ``NHWC`` is permuted (row = height), ``NLC`` tokens drop their ``num_prefix_tokens`` and fold onto ``grid``
    (rows, cols) when the counts agree (else a square grid, else a 1 x L strip), ``NC`` becomes a 1 x C strip of
    one channel.
    """
    if layout == "NCHW" and t.dim() == 4:
        return t, ""
    if layout == "NHWC" and t.dim() == 4:
        return t.permute(0, 3, 1, 2), ""
    if layout == "NLC" and t.dim() == 3:
        n, length, c = t.shape
        tokens, note = t, ""
        if grid is not None and num_prefix_tokens and length - num_prefix_tokens == grid[0] * grid[1]:
            tokens = t[:, num_prefix_tokens:]
            note = f"{num_prefix_tokens} prefix token(s) not drawn"
        length = tokens.shape[1]
        if grid is not None and length == grid[0] * grid[1]:
            gh, gw = grid
        elif math.isqrt(length) ** 2 == length:
            gh = gw = math.isqrt(length)
        else:
            gh, gw = 1, length
            note = "tokens drawn as a strip"
        return tokens.transpose(1, 2).reshape(n, c, gh, gw), note
    if layout == "NC" and t.dim() == 2:
        return t[:, None, None, :], "channels drawn as a strip"
    raise ValueError(f"cannot draw a tensor of shape {tuple(t.shape)} as layout {layout!r}")


def _from_op_view(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :meth:`Regularizer.forward`'s adaptation: the op's ``(N, C, *spatial)`` view back to the site's
    layout (so scores computed where the op computes them are drawn like activations)."""
    if layout == "NHWC":
        return t.permute(0, 2, 3, 1)
    if layout == "NLC":
        return t.squeeze(-1).transpose(1, 2)
    if layout == "NC":
        return t.squeeze(-1)
    return t


def _op_view(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "NHWC":
        return t.permute(0, 3, 1, 2)
    if layout == "NLC":
        return t.transpose(1, 2).unsqueeze(-1)
    if layout == "NC":
        return t.unsqueeze(-1)
    return t


# ---------------------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SiteCapture:
    """What one regularizer received and did in one forward (its first call), for the first ``keep`` samples.

    Attributes:
        input: the regularizer's input as received (site layout), float32 on CPU.
        mask: same shape: the realised multiplicative factor (0 = dropped); NaN where it is unknown.
        exact: True when ``mask`` is ``d out / d in`` and reproduces the output; False when it is ``out / in``.
        batch_size: leading size of the tensor the regularizer saw (not the images' count for windowed tokens).
    """

    input: torch.Tensor
    mask: torch.Tensor
    exact: bool
    batch_size: int


def _rng_devices(x: torch.Tensor) -> list[int]:
    return (
        [x.device.index if x.device.index is not None else torch.cuda.current_device()] if x.is_cuda else []
    )


class _Recorder:
    """Forward pre-hook + hook pair; bound to one forward, removed afterwards."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.states: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.captures: dict[nn.Module, SiteCapture] = {}

    def pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module in self.captures or not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]
        cuda = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        self.states[id(module)] = (torch.get_rng_state(), cuda)

    def post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        state = self.states.pop(id(module), None)
        if state is None or not isinstance(output, torch.Tensor) or output.shape != args[0].shape:
            return
        x = args[0]
        mask, exact = self._replay(module, x, output, state)
        k = self.keep
        self.captures[module] = SiteCapture(
            x[:k].detach().float().cpu(), mask[:k].float().cpu(), exact, x.shape[0]
        )

    @staticmethod
    def _replay(module, x, output, state) -> tuple[torch.Tensor, bool]:
        # The same call from the same RNG state draws the same mask; every built-in method multiplies its input
        # by a factor computed without gradient, so the gradient of the sum is that factor, unit by unit.
        with torch.random.fork_rng(devices=_rng_devices(x)):
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], x.device)
            xr = x.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                yr = module.forward(xr)  # not module(...): that would run these hooks again
                grad = None
                if yr.requires_grad:
                    (grad,) = torch.autograd.grad(yr, xr, torch.ones_like(yr), allow_unused=True)
        out = output.detach().float()
        if grad is not None:
            tol = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-5
            same = torch.allclose(yr.detach().float(), out, rtol=tol, atol=tol)
            if same and torch.allclose(x.detach().float() * grad.float(), out, rtol=tol, atol=tol):
                return grad.detach(), True
        xf = x.detach().float()
        return torch.where(xf != 0, out / xf.where(xf != 0, torch.ones_like(xf)), torch.nan), False


def capture_masks(
    model: nn.Module,
    x: torch.Tensor,
    *,
    seed: int | None = 0,
    modules: Sequence[nn.Module] | None = None,
    keep: int | None = None,
) -> tuple[Any, dict[nn.Module, SiteCapture]]:
    """One forward of ``model`` on ``x`` (in the mode the model is in) recording every regularizer's input and mask.

    Args:
        model: a model carrying regularizers (``apply_regularizer``); not copied, not changed.
        x: the input batch.
        seed: ``torch.manual_seed(seed)`` first (None: use the current RNG state).
        modules: the regularizer modules to record (default: every :class:`Regularizer` in ``model``).
        keep: how many samples to keep per capture (default: all).

    Returns:
        ``(output, {regularizer module: SiteCapture})``; the output is the one the model computes without the
        hooks (same seed, same result).
    """
    if modules is None:
        modules = [m for m in model.modules() if isinstance(m, Regularizer)]
    rec = _Recorder(keep if keep is not None else x.shape[0])
    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(rec.pre))
            handles.append(m.register_forward_hook(rec.post))
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, rec.captures


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------
def _model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model takes: a fixed ``patch_embed.img_size`` wins over the pretrained config's size."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    size = tuple(cfg["input_size"])
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:
        img = (img, img) if isinstance(img, int) else tuple(img)
        size = (size[0], int(img[0]), int(img[1]))
    return size  # type: ignore[return-value]


def _data_config(model: nn.Module, input_size: Sequence[int] | None) -> dict[str, Any]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    cfg["input_size"] = tuple(input_size) if input_size is not None else _model_input_size(model)
    return cfg


def load_images(
    model: nn.Module,
    images: Any = None,
    *,
    num_images: int = 2,
    input_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """The model-ready batch ``(N, C, H, W)`` for :func:`render_masks`.

    ``images`` is None (the first ``num_images`` test images of the embedded digits data, resized to the model's
    input size and normalised with its data config), a tensor (used as given: already a model input), or a
    sequence of image files / PIL images (timm's eval transform from ``resolve_data_config`` + ``create_transform``).
    """
    cfg = _data_config(model, input_size)
    if images is None:
        from timm_drop.datasets.digits import digits_split as _digits

        d = _digits(False, 8).x[:num_images]  # (N, 8, 8, 3) uint8, the raw 8x8 digits
        t = torch.from_numpy(d).permute(0, 3, 1, 2).float() / 255.0
        t = F.interpolate(t, size=tuple(cfg["input_size"][1:]), mode="bilinear", align_corners=False)
        mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
        return (t.clamp(0, 1) - mean) / std
    if isinstance(images, torch.Tensor):
        return images.unsqueeze(0) if images.dim() == 3 else images
    from PIL import Image
    from timm.data import create_transform

    transform = create_transform(**cfg, is_training=False)
    batch = []
    for item in images:
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if not path.is_file():
                raise FileNotFoundError(f"image file not found: {path}")
            try:
                with Image.open(path) as im:
                    img = im.convert("RGB")
            except Exception as exc:  # PIL raises several types for unreadable files
                raise ValueError(f"cannot read image file {path}: {exc}") from exc
        else:
            img = item.convert("RGB")
        batch.append(transform(img))
    if not batch:
        raise ValueError("images: an empty list; give at least one image file or None for the digits")
    return torch.stack(batch)


def _token_grid(model: nn.Module, hw: tuple[int, int]) -> tuple[tuple[int, int] | None, int]:
    pe = getattr(model, "patch_embed", None)
    grid = None
    if pe is not None:
        if getattr(pe, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
            grid = tuple(pe.dynamic_feat_size(hw))
        elif getattr(pe, "grid_size", None) is not None:
            grid = tuple(pe.grid_size)
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    return grid, prefix  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# which regularizer sits where
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Slot:
    """One regularizer at one site of the working copy."""

    site: str
    layout: str
    shape: tuple[int, ...] | None
    stage: int | None
    name: str  # registry name
    params: dict[str, Any]
    reg: nn.Module | None
    note: str = ""  # why nothing could be placed (compare mode)


def _site_regularizers(model: nn.Module) -> list[tuple[Any, nn.Module]]:
    """(plan entry, regularizer module) for every regularizer the last ``apply_regularizer`` put in, in depth order.

    The plan names sites, the model's insertion record holds the modules (one insertion per hooked / slotted site,
    one per rewritten module, its regularizers in plan order); the latest insertions are matched first, so an
    earlier stacked application cannot take this plan's entries.
    """
    from timm_drop.insertions import record_of

    the_plan = getattr(model, "_timm_drop_plan", None)
    if the_plan is None:
        raise ValueError(
            "the model carries no regularizers: pass a spec (path, YAML text or dict), or apply_regularizer first"
        )
    pool = list(the_plan.entries)
    pairs = []
    for ins in reversed(record_of(model)):
        if ins.kind == "rewrite":
            cands = [e for e in pool if e.insertion == "rewrite" and e.owner == ins.owner]
        elif ins.kind == "slot":
            cands = [e for e in pool if e.insertion == "slot" and e.module == ins.norm]
        else:
            cands = [e for e in pool if e.insertion == ins.kind and e.site == ins.site]
        for e, reg in zip(cands, ins.regs):
            if (getattr(reg, "registry_name", "") or e.regularizer) != e.regularizer:
                break
            pairs.append((e, reg))
            pool.remove(e)
    order = {id(e): i for i, e in enumerate(the_plan.entries)}
    return sorted(pairs, key=lambda p: order[id(p[0])])


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered (hook holder list, norm ``drop`` slot, rewritten block child):
    every insertion calls its regularizers by attribute at run time, so the swap takes effect."""
    found = False
    for parent in model.modules():
        for key, child in list(parent._modules.items()):
            if child is old:
                parent._modules[key] = new
                found = True
    if not found:
        raise ValueError(f"regularizer {old!r} is not in the model")


def _build_method(
    name: str,
    params: dict[str, Any],
    layout: str,
    strength: float | None,
    *,
    like: nn.Module | None = None,
    fill: bool = False,
) -> tuple[nn.Module | None, dict[str, Any], str]:
    """``create_regularizer(name, ...)`` with the ``params`` it accepts and ``strength`` applied; ``fill`` adds
    :data:`COMPARE_DEFAULTS`; ``like`` (the site's own regularizer) lends its token grid, if it has one."""
    from timm_drop.regularizers.registry import create_regularizer, regularizer_params
    from timm_drop.spec import STRENGTH_PARAMS

    accepted = regularizer_params(name)
    chosen = {k: v for k, v in params.items() if k in accepted}
    if fill:  # shared values even where a method has its own default: one block size and rate side by side
        chosen.update({k: v for k, v in COMPARE_DEFAULTS.items() if k in accepted and k not in chosen})
    if strength is not None:
        chosen.update({k: strength for k in STRENGTH_PARAMS if k in accepted})
    if name == "selectout" and "top_rate" in chosen and "drop_prob" in chosen:
        chosen["top_rate"] = max(chosen["top_rate"], chosen["drop_prob"])
    try:
        reg = create_regularizer(name, **chosen)
        if isinstance(reg, Regularizer):
            grid = getattr(like, "token_grid", None)
            if grid is not None and hasattr(reg, "set_token_grid"):
                reg.set_token_grid(grid, getattr(like, "num_prefix_tokens", 0))
            reg.set_layout(layout)
    except (TypeError, ValueError) as exc:
        return None, chosen, f"{name} not applicable here: {exc}"
    return reg, chosen, ""


def _select(entries: list[Any], sites: str | Sequence[str] | None, max_sites: int) -> list[str]:
    names: list[str] = []
    for e in entries:
        if e.site not in names:
            names.append(e.site)
    if sites is not None:
        globs = [sites] if isinstance(sites, str) else list(sites)
        chosen = [
            n
            for n in names
            if any(fnmatch.fnmatchcase(n, g) or fnmatch.fnmatchcase(n.split(":", 1)[1], g) for g in globs)
        ]
        if not chosen:
            raise ValueError(f"--sites {globs}: no site of the plan matches; sites: {', '.join(names[:12])}")
        return chosen
    if len(names) <= max_sites:
        return names
    # Evenly spread over depth, first and last included: shallow and deep maps look different.
    idx = sorted({round(i * (len(names) - 1) / (max_sites - 1)) for i in range(max_sites)})
    return [names[i] for i in idx]


# ---------------------------------------------------------------------------------------------------------
# figure
# ---------------------------------------------------------------------------------------------------------
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


def _fmt_params(params: dict[str, Any]) -> str:
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


def _score_maps(
    name: str, params: dict[str, Any], cap: SiteCapture, layout: str, conv
) -> tuple[torch.Tensor, str] | None:
    """The method's own score on the captured input, as (N, C or 1, H, W) maps, and its title."""
    if name == "corrdrop":
        from timm_drop.regularizers.corrdrop import correlation_map

        # CorrDrop acts on the map as drawn (a token site only through its patch grid)
        maps = conv(cap.input)
        k = params.get("block_size", 7)
        h, w = maps.shape[-2:]
        kh, kw = min(k, h), min(k, w)
        cells = correlation_map(maps, k)
        full = cells.repeat_interleave(kh, 1).repeat_interleave(kw, 2)[:, :h, :w]
        return full[:, None], "correlation score F (Eq. 3)"
    if name == "attentiondrop":
        from timm_drop.regularizers.attentiondrop import attention_weights

        # AttentionDrop normalises over every position the op sees (prefix tokens included)
        view = _op_view(cap.input, layout)
        w = attention_weights(view, params.get("top_rate", 1.0), params.get("mode", "ad"))
        return conv(_from_op_view(w.view(view.shape), layout)), f"drop weight w ({params.get('mode', 'ad')})"
    return None


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
    conv,
    first: SiteCapture,
    layout: str,
    shape: tuple[int, ...] | None,
) -> list[dict[str, Any]]:
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
        ptxt = _fmt_params(slot.params)
        mult = float(slot.reg.strength) if isinstance(slot.reg, Regularizer) else 1.0
        if mult != 1.0:  # a schedule part-way: the configured strength times this
            ptxt += f" x{mult:.2f}"
        if cap is None or slot.reg is None:
            why = slot.note or f"{slot.name}: nothing captured (site not reached)"
            out.append(
                {
                    "panel": Panel(
                        0, 0, "text", site, slot.name, title=slot.name, params=slot.params, note=why
                    ),
                    "text": why,
                }
            )
            continue
        mask_maps, _ = conv(cap.mask)
        m = mask_maps[i]  # (C, H, W)
        scale = _kept_scale(cap.mask)
        rel = m / scale
        finite = torch.isfinite(rel)
        dropped_all = float(((rel == 0) & finite).sum()) / max(1, int(finite.sum()))
        scaled_all = float((((rel - 1).abs() > 1e-3) & (rel != 0) & finite).sum()) / max(1, int(finite.sum()))
        rel_c = rel[channel]
        fin_c = torch.isfinite(rel_c)
        map_dropped = float(((rel_c == 0) & fin_c).sum()) / max(1, int(fin_c.sum()))
        score = _score_maps(slot.name, slot.params, cap, slot.layout, lambda t: conv(t)[0])
        kh = kw = None
        if slot.name in _CELLS:
            k = int(slot.params.get("block_size", 7))
            kh, kw = min(k, h), min(k, w)
        dropped_c = (rel_c == 0).numpy() & fin_c.numpy()
        if score is not None:
            smap, stitle = score
            s = smap[i, channel if smap.shape[1] > 1 else 0].numpy()
            overlays = []
            if kh is not None:
                overlays.append(lambda ax, kh=kh, kw=kw: _cell_grid(ax, h, w, kh, kw))
            overlays.append(lambda ax, d=dropped_c: _outline(ax, d, color="cyan"))
            out.append(
                {
                    "panel": Panel(
                        0,
                        0,
                        "score",
                        site,
                        slot.name,
                        title=f"{slot.name}: {stitle}\nch {channel}",
                        map_shape=(h, w),
                        channel=channel,
                        params=slot.params,
                    ),
                    "array": s,
                    "cmap": "magma",
                    "overlays": overlays,
                }
            )
        overlays = []
        if kh is not None:
            overlays.append(lambda ax, kh=kh, kw=kw: _cell_grid(ax, h, w, kh, kw))
        if slot.name in _OUTLINED:
            overlays.append(lambda ax, d=dropped_c: _outline(ax, d))
        stats = f"dropped {dropped_all:.1%} (ch {channel}: {map_dropped:.1%})"
        if scaled_all > 0:
            stats += f"\nscaled {scaled_all:.1%}"
        if not cap.exact:
            stats += "\nratio out/in (not a product)"
        out.append(
            {
                "panel": Panel(
                    0,
                    0,
                    "mask",
                    site,
                    slot.name,
                    title=f"{slot.name}\n{ptxt}\n{stats}",
                    map_shape=(h, w),
                    channel=channel,
                    dropped=dropped_all,
                    map_dropped=map_dropped,
                    scaled=scaled_all,
                    params=slot.params,
                ),
                "array": _mask_rgb(act[channel], rel_c),
                "overlays": overlays,
            }
        )
    return out


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
        strength: replaces every strength parameter (``drop_prob``, ``q``) at the drawn sites.
        seed: ``torch.manual_seed`` before each forward, so methods compared side by side share it.
        compare: registry names (or ``"a,b,c"``): each method alone at each drawn site of a fresh copy, at the spec's
            parameters when the spec uses that method, else the site's shared ones (``block_size``, ``top_rate``)
            and :data:`COMPARE_DEFAULTS`.
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
    device = x.device
    work = copy.deepcopy(model)
    if spec is not None:
        from timm_drop.rewrite import apply_regularizer

        apply_regularizer(work, spec, example_input=x[:1])
    pairs = _site_regularizers(work)
    entries = [e for e, _ in pairs]
    chosen = _select(entries, sites, max_sites)
    stages = {e.site: e.stage for e in entries}
    layouts = {e.site: (r.layout if isinstance(r, Regularizer) else e.layout) or "NCHW" for e, r in pairs}
    shapes = {e.site: e.shape for e in entries}
    own: dict[str, nn.Module] = {}
    for e, r in pairs:
        own.setdefault(e.site, r)
    _train_mode(work)
    if progress is not None:
        from timm_drop.schedules import set_progress

        set_progress(work, progress)
    grid, prefix = _token_grid(work, tuple(x.shape[-2:]))

    def conv_for(layout: str):
        return lambda t: to_maps(t, layout, grid, prefix)

    # (site -> [(slot, capture)])
    per_site: dict[str, list[tuple[_Slot, SiteCapture | None]]] = {s: [] for s in chosen}
    if compare is None:
        slots: list[_Slot] = []
        for e, reg in pairs:
            if e.site not in per_site:
                continue
            params = dict(e.params)
            if strength is not None:
                new, params, note = _build_method(e.regularizer, params, layouts[e.site], strength, like=reg)
                if new is None:
                    raise ValueError(f"--strength {strength} at site {e.site}: {note}")
                new.to(device)
                _replace_module(work, reg, new)
                reg = new
            slots.append(_Slot(e.site, layouts[e.site], e.shape, e.stage, e.regularizer, params, reg))
        _, caps = capture_masks(work, x, seed=seed, modules=[s.reg for s in slots])
        for s in slots:
            per_site[s.site].append((s, caps.get(s.reg)))
    else:
        methods = _compare_methods(compare)
        rules = list(_spec_rules(spec))
        paths = {id(m): name for name, m in work.named_modules(remove_duplicate=False)}
        for site in chosen:
            site_params: dict[str, Any] = {}
            for e in entries:
                if e.site == site:
                    site_params.update(e.params)
            for name in methods:
                params = dict(site_params)
                for rule in rules:
                    if rule.regularizer == name:
                        params = {**site_params, **rule.params_for_stage(stages[site])}
                        break
                reg, params, note = _build_method(
                    name, params, layouts[site], strength, like=own[site], fill=True
                )
                slot = _Slot(site, layouts[site], shapes[site], stages[site], name, params, reg, note)
                if reg is None:
                    per_site[site].append((slot, None))
                    continue
                # This method alone in the model: the site's first regularizer replaced, every other one an identity.
                alone = copy.deepcopy(work)
                for _, other in pairs:
                    if other is not own[site]:
                        _replace_module(alone, alone.get_submodule(paths[id(other)]), nn.Identity())
                reg.to(device)
                _replace_module(alone, alone.get_submodule(paths[id(own[site])]), reg)
                reg.train()
                _, caps = capture_masks(alone, x, seed=seed, modules=[reg])
                per_site[site].append((slot, caps.get(reg)))

    rows = []
    for site in chosen:
        pairs = per_site[site]
        first = next((c for _, c in pairs if c is not None), None)
        if first is None:
            continue
        layout = layouts[site]
        if first.batch_size != x.shape[0]:
            continue  # windowed / regrouped tokens: the batch axis is not the images'
        for i in range(x.shape[0]):
            rows.append(
                {
                    "panels": _row_panels(
                        site,
                        [s for s, _ in pairs],
                        [c for _, c in pairs],
                        x[i],
                        i,
                        conv_for(layout),
                        first,
                        layout,
                        shapes[site],
                    )
                }
            )
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


def _compare_methods(compare: str | Sequence[str]) -> list[str]:
    """Registry names from ``"a,b"`` or a list; an unknown one is a KeyError naming the nearest ones."""
    from timm_drop.regularizers.registry import get_regularizer_class

    methods = [m.strip() for m in compare.split(",")] if isinstance(compare, str) else list(compare)
    if not methods or any(not m for m in methods):
        raise ValueError(f"compare {compare!r}: give registry names separated by commas")
    for m in methods:
        get_regularizer_class(m)
    return methods


def _spec_rules(spec: Any) -> tuple[Any, ...]:
    if spec is None:
        return ()
    from timm_drop.spec import load_spec

    return load_spec(spec).rules


def _train_mode(model: nn.Module) -> None:
    """Train mode for the copy, except SyncBatchNorm: in train mode it all-reduces across ranks, and only the main
    process draws, so it would wait for ranks that never come; it uses its running statistics instead."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.SyncBatchNorm):
            m.eval()


# ---------------------------------------------------------------------------------------------------------
# recipe hook
# ---------------------------------------------------------------------------------------------------------
def log_epoch_masks(trainer: Any, epoch: int, num_images: int = 2) -> Path | None:
    """Every ``log.mask_every`` epochs: the mask grid of a fixed batch (the first eval images) at the run's current
    schedule strength, written to ``<output_dir>/masks/epoch_NNN.png`` by the main process.

    Runs on a copy of the unwrapped model inside ``fork_rng`` (see :func:`render_masks`), so training (weights, BatchNorm statistics, the random
    stream that draws the next masks) is exactly what it is without it.
    """
    every = getattr(trainer.cfg.log, "mask_every", 0) or 0
    if every <= 0 or (epoch + 1) % every or not trainer.is_main or trainer.cfg.regularizer is None:
        return None
    batch = getattr(trainer, "_viz_batch", None)
    if batch is None:
        x = next(iter(trainer.eval_loader))[0]
        batch = x[:num_images].detach().float().contiguous().clone()
        trainer._viz_batch = batch
    path = Path(trainer.out) / "masks" / f"epoch_{epoch + 1:03d}.png"
    render_masks(
        trainer.unwrapped,
        None,
        batch,
        seed=trainer.cfg.seed,
        progress=None,
        out=path,
        label=f"epoch {epoch + 1}",
    )
    return path


# ---------------------------------------------------------------------------------------------------------
# command line (the parser block lives in timm_drop.cli)
# ---------------------------------------------------------------------------------------------------------
def cmd_viz(args: Any) -> int:
    """``timm-drop viz MODEL SPEC ...``: errors in inputs are ``UsageError`` (exit 2) naming the flag."""
    import yaml

    from timm_drop.cli import UsageError, check_model_name, load_spec_or_exit

    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out!r} exists; pass --overwrite to replace it")
    if not str(args.out).lower().endswith(".png"):
        raise UsageError(f"--out {args.out!r}: the figure is a PNG; name the file *.png")
    if args.strength is not None and not 0.0 <= args.strength < 1.0:
        raise UsageError(f"--strength must be in [0, 1), got {args.strength}")
    kwargs: dict[str, Any] = {}
    if args.model_kwargs:
        kwargs = yaml.safe_load(args.model_kwargs)
        if not isinstance(kwargs, dict):
            raise UsageError(
                f"--model-kwargs must be a YAML mapping like '{{img_size: 64}}', got {args.model_kwargs!r}"
            )
    for f in args.image or ():
        if not os.path.isfile(f):
            raise UsageError(f"--image {f!r}: no such file")
    check_model_name(args.model)
    spec = load_spec_or_exit(args.spec)
    import timm

    torch.manual_seed(args.seed)  # the random initialisation too: the same command draws the same figure
    try:
        model = timm.create_model(args.model, pretrained=False, **kwargs)
    except TypeError as exc:
        raise UsageError(f"--model-kwargs: {args.model} rejected them: {exc}") from None
    try:
        fig = render_masks(
            model,
            spec,
            args.image or None,
            sites=args.sites,
            strength=args.strength,
            seed=args.seed,
            compare=args.compare,
            out=args.out,
        )
    except (ValueError, KeyError, FileNotFoundError) as exc:
        # a KeyError's str() is the repr of its message; every other message is shown as it is, quotes and all
        raise UsageError(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)) from None
    masks = fig.find("mask")
    print(f"wrote {args.out} ({fig.size[0]}x{fig.size[1]} px, {len(masks)} mask panel(s))")
    for p in masks:
        print(f"  {p.site}  {p.method}({_fmt_params(p.params)}): dropped {p.dropped:.1%}")
    return 0
