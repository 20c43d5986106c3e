"""CorrDrop: correlation-based structured dropout (spatial variant).

Method card
-----------
Paper: Y. Zeng, T. Dai, S.-T. Xia, "CorrDrop: Correlation Based Dropout for Convolutional Neural Networks",
ICASSP 2020 (a journal version, Pattern Recognition 120, 2021, adds a channel-wise variant; this file is the
spatial one, "SCD").

Idea: units whose feature vectors are weakly correlated with the rest of the map are context, not the
discriminative object; drop those square regions more often, keep the highly correlated ones.

What :func:`corr_drop2d` computes for a map ``A`` of shape ``(C, H, W)`` with block size ``k`` and drop
probability ``p`` (per sample, every step batched over the whole mini-batch):

* Eq. (10): ``k x k`` average pooling with stride ``k`` and ceil mode, giving an ``H' x W'`` grid of cells,
  ``H' = ceil(H / k)``, ``W' = ceil(W / k)``; each cell's channel vector is a row of ``A'`` (``N' = H'W'`` rows).
* Eq. (1): every row is L2-normalised.
* Eq. (2)-(3): ``P = |A^ A^T - I|`` and the score ``F_i = sum_j P_ij / N'``, the mean absolute cosine
  similarity of cell ``i`` with the other cells.
* Eq. (4): ``gamma = 1 - (F - F_min) / (F_max - F_min)``; the least correlated cell gets ``gamma = 1``.
* Eq. (5): ``M ~ Bernoulli(1 - gamma)``; a cell with ``M = 0`` is a drop candidate.
* Eq. (6)-(7), (11): ``B ~ Bernoulli(1 - p^)`` with ``p^`` chosen so that the expected number of dropped
  *units* is ``p * H * W`` (see "choices" below).
* Eq. (8): ``S = 0`` only where ``M = 0`` and ``B = 0``.
* Fig. 2 step 3: ``S`` is upsampled by nearest neighbour (each cell becomes its ``k x k`` block) and cropped
  back to ``H x W``; Eq. (9) / Fig. 2 step 4: the one mask per sample multiplies every channel.

Choices where the paper is ambiguous or its formula does not hold
------------------------------------------------------------------
* **Unit-exact Eq. (11).** Eq. (11) as printed, ``p' = p * HW / (k^2 H'W')``, assumes every dropped cell
  removes ``k^2`` units. With ceil pooling the last row/column of cells is cropped; on the paper's own ResNet-20
  maps (16x16 with k=7: cells of 7, 7 and 2 rows) the printed formula drops only 0.58 p. We count units
  instead: ``p^ = p * H * W / sum(area(c) for c with M_c = 0)``. When ``k`` divides ``H`` and ``W`` this is
  exactly Eq. (6) with ``p'`` of Eq. (11) substituted for ``p``; in general it makes the expected dropped
  fraction of every sample equal ``p``.
* **p^ > 1.** The paper does not say what happens when the candidates (``M = 0``) cover less than a fraction
  ``p`` of the map, so that Eq. (6) exceeds 1 (the official code clips, and silently under-drops). This is
  common with cropped cells: a cell that averages few units is noisier, scores low and becomes the candidate.
  We drop every candidate and spill the missing units over the non-candidate cells with the one probability
  that makes the expected dropped fraction exactly ``p``; candidates are still dropped at least as often as
  any other cell, and below the clip Eq. (8) holds as written.
* **Per sample.** ``numel(M)`` and ``sum(M)`` in Eq. (6) are taken per feature map, i.e. per sample (the
  official code pools them over the batch).
* **Self term.** ``-I`` in Eq. (2) removes each cell's self-similarity. We exclude the diagonal directly:
  identical for every non-zero cell, and an all-zero cell (a dead ReLU region, whose normalisation in Eq. (1)
  is undefined) scores 0, i.e. uncorrelated, instead of ``1/N'``.
* **Flat scores.** If ``F_max - F_min`` is below ``1e-4`` (one cell, a constant or all-zero map, fp32 noise of
  a cosine sum is ~1e-7) Eq. (4) is 0/0; the range is clamped so every cell gets ``gamma = 1``: no correlation
  information means every cell is a candidate and CorrDrop becomes a grid-aligned block dropout at rate ``p``.
* **Rescale.** Eq. (9) has no rescale; like DropBlock's Algorithm 1 and the official code the kept units are
  multiplied by ``numel / count_ones`` of the mask, over the whole batch, in float32 (never divides by 0).
* **Block size larger than the map** is clipped per axis to the map (one cell spans that axis).
* **Grid alignment.** Cells start at the top-left corner (PyTorch ceil-mode pooling); the cropped partial
  cells are the last row/column. The official code pads symmetrically and centre-crops.

Differences from the official code (``Sandy-Zeng/CorrDrop``), whose
bugs are not inherited: it replaces Eq. (4) by a softmax over cells (which protects about one cell per sample,
so the correlation hardly matters) where we use Eq. (4); it ramps ``p`` with a per-forward counter (a silent
no-op under ``DataParallel``) where we use the ``strength`` buffer driven by ``set_progress``; it mutates
``block_size`` when the map is small, derives padding from ``H`` only (square maps), rescales per batch without an
epsilon and normalises with an epsilon that underflows in fp16.

Cost: scores are computed under ``no_grad`` on the pooled map only, in float32 with autocast disabled:
``O(N C H W)`` for the pooling plus ``O(N N'^2 C)`` for the cosine matrix, never the ``O(N (HW)^2 C)`` matrix of
Eq. (2) at full resolution. The pooling divisor of Eq. (10) cancels in Eq. (1), so partial cells need no
special care. The ``N'^2`` similarity rows are built in chunks when ``N * N'^2`` is large (block size 1 on
large maps), so memory stays bounded.

Placement and hyper-parameters in the paper: ResNet-20 on CIFAR-10/100, after each of the three convolution
groups (maps 32, 16, 8) with block sizes 9, 7, 5; ``p`` ramped linearly from 0 (as Scheduled DropBlock);
grid-searched ``p = 0.1`` (Table 1; ``p = 0.03`` combined with Cutout); VGG16-BN, ResNet-110, DenseNet and
WRN-28-10 (Table 2) with CorrDrop after the first group only, block size 9; Fig. 4(a) best at ``p = 0.15``
there. Training: SGD momentum 0.9, batch 128, 200 epochs, lr 0.1 divided by 10 at 40/60/80 % of training.
(The official code instead uses layer2-3 only, p = 0.2, block size 5, and a 200-iteration ramp.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from timm_drop.regularizers.base import (
    Regularizer,
    check_positive_int,
    check_probability,
    check_strength,
    passes_through,
)
from timm_drop.regularizers.card import MethodCard
from timm_drop.regularizers.figure import FigureTraits, compare_values
from timm_drop.regularizers.registry import register_regularizer

__all__ = ["CorrDrop2d", "corr_drop2d", "correlation_map"]

_RANGE_EPS = 1e-4  # below this spread of F (a mean |cosine| in [0, 1]) Eq. (4) carries no information
_NORM_EPS = 1e-12
_CHUNK_ELEMENTS = 1 << 24  # max elements of one block of similarity rows (64 MiB in float32)


def _check_input(x: torch.Tensor, block_size: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"corr_drop2d expects a (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    check_positive_int("block_size", block_size)


def _cell_scores(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Eqs. (10), (1)-(3): per-cell correlation score ``F`` of shape ``(N, H', W')`` in float32."""
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        pooled = F.avg_pool2d(x.detach(), (kh, kw), stride=(kh, kw), ceil_mode=True)
        n, _, hc, wc = pooled.shape
        v = pooled.flatten(2).float()  # (N, C, N'): one column per cell
        # Divide by the largest entry first so the squared norm cannot overflow for huge activations; every
        # column is then exactly unit-norm or exactly zero.
        v = v / v.abs().amax(dim=1, keepdim=True).clamp_min(_NORM_EPS)
        v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(_NORM_EPS)
        cells = hc * wc
        rows = max(1, _CHUNK_ELEMENTS // max(1, n * cells))
        vt = v.transpose(1, 2)
        parts = [torch.bmm(vt[:, s : s + rows], v).abs().sum(dim=-1) for s in range(0, cells, rows)]
        row_sums = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        # The "- I" of Eq. (2) removes the self term |cos(i, i)| = 1; an all-zero cell has row sum 0 and
        # clamps to the score 0.
        scores = (row_sums - 1.0).clamp_min(0.0) / cells
    return scores.view(n, hc, wc)


def correlation_map(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """The correlation score ``F`` of Eqs. (1)-(3) on the ``k x k`` pooled grid (Eq. (10)).

    Args:
        x: feature map ``(N, C, H, W)``.
        block_size: ``k``; clipped per axis to the map.

    Returns:
        float32 tensor ``(N, ceil(H / k), ceil(W / k))``: the mean absolute cosine similarity of each cell with
        the other cells of its sample (higher = more correlated = kept more often by CorrDrop).
    """
    _check_input(x, block_size)
    return _cell_scores(x, min(block_size, x.shape[2]), min(block_size, x.shape[3]))


def _cell_areas(size: int, k: int, cells: int, device: torch.device) -> torch.Tensor:
    starts = torch.arange(cells, device=device, dtype=torch.float32) * k
    return (size - starts).clamp(max=float(k))


def corr_drop2d(
    x: torch.Tensor,
    drop_prob: float | torch.Tensor,
    block_size: int,
    training: bool = True,
) -> torch.Tensor:
    """Spatial CorrDrop (Zeng et al., ICASSP 2020, Eqs. (1)-(11)); see the module docstring.

    Args:
        x: feature map ``(N, C, H, W)``, any float dtype and memory format.
        drop_prob: expected fraction of units dropped per sample, in [0, 1); a float or a 0-dim tensor (a
            tensor keeps a compiled graph valid when a schedule changes it).
        block_size: side ``k`` of the pooling cells and of the dropped squares.
        training: identity when False.

    Returns:
        ``x`` times one ``{0, scale}`` mask per sample shared by all channels, same dtype and shape as ``x``.
    """
    _check_input(x, block_size)
    drop_prob = check_strength("drop_prob", drop_prob)
    if passes_through("corrdrop", x, training, drop_prob):
        return x
    n, _, h, w = x.shape
    kh, kw = min(block_size, h), min(block_size, w)
    with torch.no_grad():
        scores = _cell_scores(x, kh, kw).flatten(1)  # (N, N')
        hc, wc = math.ceil(h / kh), math.ceil(w / kw)
        p = torch.as_tensor(drop_prob, dtype=torch.float32, device=x.device)

        # Eq. (4): min-max normalisation per sample; a flat score map makes every cell a candidate.
        f_min = scores.amin(dim=1, keepdim=True)
        f_range = (scores.amax(dim=1, keepdim=True) - f_min).clamp_min(_RANGE_EPS)
        gamma = 1.0 - (scores - f_min) / f_range
        # Eq. (5): M = 1 with probability 1 - gamma (float32 noise: unbiased at small probabilities).
        candidate = torch.rand(n, hc * wc, device=x.device) < gamma  # M == 0
        # Eqs. (6), (11), counted in units: expected dropped units = p * H * W per sample. When the candidates
        # cover less than that, the paper's p^ exceeds 1; the remainder spills over the other cells.
        budget = p * float(h * w)
        if h % kh == 0 and w % kw == 0:
            area: torch.Tensor | float = float(kh * kw)
        else:
            area = torch.outer(_cell_areas(h, kh, hc, x.device), _cell_areas(w, kw, wc, x.device)).flatten()
        candidate_area = (candidate * area).sum(dim=1, keepdim=True)
        p_hat = (budget / candidate_area.clamp_min(1.0)).clamp(max=1.0)
        rest_area = (float(h * w) - candidate_area).clamp_min(1.0)
        p_rest = ((budget - candidate_area).clamp_min(0.0) / rest_area).clamp(max=1.0)
        # Eqs. (7)-(8): a candidate cell is dropped when B == 0 too.
        keep = torch.rand(n, hc * wc, device=x.device) >= torch.where(candidate, p_hat, p_rest)

        # Per-batch rescale from the kept area (no full-resolution reduction), float32, never / 0.
        kept_units = (keep * area).sum()
        scale = float(n * h * w) / kept_units.clamp_min(1.0)
        cell_mask = (keep * scale).to(x.dtype).view(n, hc, 1, wc, 1)
        # Nearest-neighbour upsampling by the block size, then crop to H x W. The mask is small (one channel);
        # making it contiguous keeps the broadcast multiply on the fast path (a cropped view is ~5x slower).
        mask = cell_mask.expand(n, hc, kh, wc, kw).reshape(n, 1, hc * kh, wc * kw)[:, :, :h, :w].contiguous()
    return x * mask


@register_regularizer("corrdrop")
class CorrDrop2d(Regularizer):
    """Spatial CorrDrop as a module: drops ``k x k`` blocks of weakly correlated regions.

    Args:
        drop_prob: expected fraction of units dropped per sample at full schedule strength, in [0, 1).
        block_size: side of the pooled cells / dropped squares (paper: 9, 7, 5 on 32, 16, 8 maps).

    On ViT-family token sites (``NLC``) it acts on the patch grid the rewriter reads from the model
    (:func:`timm_drop.structure.token_grid`), prefix tokens untouched; a ``dynamic_img_size=True`` ViT, whose grid
    changes with each input, and tokens with no known grid are refused by site name rather than guessed.
    """

    layouts = ("NCHW", "NHWC")
    # ViT tokens are served as the map they come from once the site's patch grid is known (set_token_grid).
    grid_layouts = ("NLC",)
    strength_params = ("drop_prob",)
    compare_defaults = compare_values("drop_prob", "block_size")
    figure = FigureTraits(outline_blocks=True, cell_grid=True)
    card = MethodCard(
        title="CorrDrop: Correlation Based Dropout for Convolutional Neural Networks",
        authors="Zeng et al.",
        year=2020,
        venue="ICASSP",
        url="https://doi.org/10.1109/ICASSP40776.2020.9053605",
        summary="drops k x k regions whose features correlate least with the rest of the map",
        reported="ResNet-20 on CIFAR-10: 91.79% -> 92.57% top-1 (+0.78); on CIFAR-100: 67.31% -> 68.88% (Table 1)",
        draws=(
            "Two float32 uniforms per cell of the pooled grid (`torch.rand`), compared with the Eq. "
            "(5) and the Eq. (6)-(7)/(11) probabilities: one mask per sample, shared by every "
            "channel."
        ),
    )

    def __init__(self, drop_prob: float = 0.1, block_size: int = 7) -> None:
        super().__init__()
        self.drop_prob = check_probability("drop_prob", drop_prob)
        self.block_size = check_positive_int("block_size", block_size)

    def is_noop(self) -> bool:
        return self.drop_prob == 0.0

    def regularize(self, x: torch.Tensor) -> torch.Tensor:
        return corr_drop2d(x, self.effective(self.drop_prob), self.block_size, training=True)

    @classmethod
    def score_map(cls, x: torch.Tensor, params: Mapping[str, Any]) -> tuple[torch.Tensor, str] | None:
        """The correlation score ``F`` (Eq. (3)) of each ``k x k`` cell, spread over the cell's units:
        ``(N, 1, H, W)``."""
        k = cls.param(params, "block_size")
        h, w = x.shape[-2:]
        kh, kw = min(k, h), min(k, w)
        cells = correlation_map(x, k)
        full = cells.repeat_interleave(kh, 1).repeat_interleave(kw, 2)[:, :h, :w]
        return full[:, None], "correlation score F (Eq. 3)"

    def _settings(self) -> str:
        return f"drop_prob={self.drop_prob}, block_size={self.block_size}"
