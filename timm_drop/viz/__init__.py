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

matplotlib is imported inside the drawing functions only, so ``import timm_drop`` never needs it.

Modules (each imports only those after it; none imports the command line):
``render`` (:func:`render_masks`) → ``drawing`` (panels, figure layout) → ``swaps`` (which regularizer sits
where; strength and compare swaps) → ``traits`` (what viz knows about particular methods) → ``capture`` (hooks,
layouts, images). ``timm-drop viz`` lives in :mod:`timm_drop.cli`; the recipe's ``log.mask_every`` figures in the
training package.
"""

from timm_drop.viz.capture import SiteCapture, capture_masks, load_images, to_maps
from timm_drop.viz.drawing import DROP_RGB, SCALE_RGB, MaskFigure, Panel, format_params
from timm_drop.viz.render import render_masks

__all__ = [
    "DROP_RGB",
    "SCALE_RGB",
    "MaskFigure",
    "Panel",
    "SiteCapture",
    "capture_masks",
    "format_params",
    "load_images",
    "render_masks",
    "to_maps",
]
