"""DropBlock: drop contiguous square regions of a feature map.

Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks", NeurIPS 2018.

What is implemented (Algorithm 1 of the paper):

* lines 2-4: identity at inference (``training=False`` / ``module.eval()``), and whenever ``drop_prob == 0``;
* line 5: seeds ``M_ij ~ Bernoulli(gamma)``, drawn **only where a whole block fits inside the map**
  (Figure 2a, the "valid seed region" of Eq. (1)), independently per (sample, channel) by default
  ("Algorithm 1 corresponds to the latter [each channel has its own mask], which tends to work better");
  ``per_channel=False`` draws one mask per sample, shared by all channels (the paper's other variant);
* line 6: every seed is expanded to a ``block_size x block_size`` zero block: a stride-1 max-pool of the
  seed map on accelerators; on CPU (gamma is ~0.3 % for the usual settings) the seeds are drawn sparsely, as
  geometric gaps between successes (the same distribution as one Bernoulli draw per valid position), and each
  seed's block is written into the keep mask directly, so the cost follows the seeds, not the map;
* lines 7-8: ``A * M * count(M) / count_ones(M)``, counts over the whole batch mask, in float32.

Choices where the paper is silent or only approximate:

* **block_size larger than the map** is clipped per axis (``kh = min(block_size, H)``,
  ``kw = min(block_size, W)``), so non-square maps get a ``kh x kw`` block and a block that covers the whole
  map degenerates to SpatialDropout, as the paper says it should.
* **Even block sizes** have no centre unit. A seed at ``(i, j)`` drops rows ``i - (kh - 1) // 2 ..
  i + kh // 2`` (and likewise for columns): the seed is the upper-left unit of the central 2x2 for even
  sizes and the exact centre for odd ones. Valid seeds are therefore rows
  ``(kh - 1) // 2 .. H - 1 - kh // 2``; there are always ``H - kh + 1`` of them, as in Eq. (1).
* **gamma.** Eq. (1), ``gamma = p / bs^2 * feat^2 / (feat - bs + 1)^2``, counts every seed's block as if
  blocks never overlapped; the paper itself calls it "only an approximation". It under-drops for large
  blocks (0.93 p at p = 0.1 and 0.71 p at p = 0.5 for bs = 20 on 56x56; 0.81 p at p = 0.3, bs = 7 on 14x14).
  Here gamma is solved so that the *expected* dropped fraction equals ``p`` exactly, overlaps included:

  A unit at row ``r`` is covered by ``a(r) = min(r, H - kh) - max(0, r - kh + 1) + 1`` valid seed rows, and
  likewise ``b(c)`` columns, so it lies in ``n(r, c) = a(r) b(c)`` candidate blocks and is kept only if none
  of their seeds fires: ``P(drop | r, c) = 1 - (1 - gamma)^n(r, c)``. With ``lambda = -log(1 - gamma)`` the
  expected dropped fraction is ``F(lambda) = 1 - mean_{r,c} exp(-lambda n(r, c))``, and we solve
  ``F(lambda) = p``. ``F`` is increasing and concave in ``lambda``. The start
  ``lambda_0 = -log(1 - p) / mean(n)`` (the overlap-aware analogue of Eq. (1): every unit treated as covered
  by the *average* number of blocks) satisfies ``F(lambda_0) <= p`` by Jensen's inequality, and Newton's
  method on a concave increasing function started below the root climbs monotonically to it without
  overshooting. Two Newton steps give ``|F/p - 1| < 0.3 %`` for ``p <= 0.7`` on every map from 1x1 to 56x56
  and every block size (2 % at ``p = 0.9``). When every unit is covered by the same number of blocks
  (``block_size == 1``, or the block spans the map on each axis where it is larger than 1) the solution is
  the closed form ``gamma = p`` and no iteration runs. Everything is computed from ``drop_prob`` as a tensor,
  so a schedule that moves ``drop_prob`` neither syncs the device nor recompiles ``torch.compile``; in eager
  CPU mode, where reading it is free, the solution is remembered per probability and shape.
* **Numerics.** Seeds come from ``bernoulli_`` (its uniform draw and threshold are float32, only the 0/1
  outcome is stored in the input dtype, so bf16/fp16 are not biased the way ``torch.rand(dtype=bf16) < p``
  is) or, on CPU, from float64 geometric gaps; no float32 noise tensor is allocated at all. The mask counts are summed in float32 (an fp16 sum of a
  large mask overflows), the rescale is a float32 0-dim tensor, and the kept count is clamped below by
  ``eps`` so an all-dropped batch gives zeros, not inf/NaN.

Where the paper used it (section 4.1): ResNet-50 on ImageNet, groups 3 and 4, after every convolution branch
and on the skip connections, ``block_size = 7``, ``keep_prob = 0.9`` (``drop_prob = 0.1``) reached linearly
over training (Scheduled DropBlock), with the rate for group 3 divided by 4; 78.13 % top-1 vs 76.51 %.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from timm_drop.regularizers.base import (
    SPARSE_MAX_PROB,
    ParamTypeError,
    Regularizer,
    _is_compiling,
    bernoulli_positions,
    check_positive_int,
    check_probability,
    check_strength,
    ones,
    passes_through,
)
from timm_drop.regularizers.card import MethodCard
from timm_drop.regularizers.figure import FigureTraits, compare_values
from timm_drop.regularizers.registry import register_regularizer

__all__ = ["DropBlock2d", "drop_block2d", "dropblock_gamma"]

#: Newton steps on the overlap-aware drop fraction (see the module docstring for the accuracy they buy).
_NEWTON_STEPS = 2
#: Per-shape tables built once per (H, W, kh, kw, device) in eager mode; bounded so odd shapes cannot leak.
_TABLES: dict[tuple, tuple[torch.Tensor, ...]] = {}
_TABLES_MAX = 256
_GAMMAS: dict[tuple, torch.Tensor] = {}


def _axis_tables(length: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per index along one axis: how many valid seed positions cover it, and whether it may hold a seed."""
    idx = torch.arange(length, device=device, dtype=torch.float32)
    cover = idx.clamp_max(length - k) - (idx - (k - 1)).clamp_min(0) + 1
    valid = (idx >= (k - 1) // 2) & (idx <= length - 1 - k // 2)
    return cover, valid.float()


def _tables(h: int, w: int, kh: int, kw: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Float32 tables on ``device``: ``-n(r, c)`` flattened; the (2, HW) matrix ``[1, n]``, whose product
    with ``exp(-lambda n)`` gives ``HW (1 - F, F')`` in one kernel; the (h, w) valid-seed map."""
    key = (h, w, kh, kw, device)
    compiling = _is_compiling()
    if not compiling and key in _TABLES:
        return _TABLES[key]
    cover_h, valid_h = _axis_tables(h, kh, device)
    cover_w, valid_w = _axis_tables(w, kw, device)
    cover = torch.outer(cover_h, cover_w).reshape(-1)
    # Unnormalised sums: at lambda = 0 the first is exactly HW, so p = 0 gives gamma = 0 bit for bit.
    moments = torch.stack([torch.ones_like(cover), cover])
    out = (-cover, moments, torch.outer(valid_h, valid_w))
    if not compiling:
        if len(_TABLES) >= _TABLES_MAX:
            _TABLES.clear()
        _TABLES[key] = out
    return out


def _clip_block(block_size: int, h: int, w: int) -> tuple[int, int]:
    return min(block_size, h), min(block_size, w)


def dropblock_gamma(
    drop_prob: float | torch.Tensor,
    block_size: int,
    height: int,
    width: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Seed probability whose expected dropped fraction is ``drop_prob`` on a ``height x width`` map.

    Replaces Eq. (1) by the exact overlap-aware solution (module docstring). Returns a float32 0-dim tensor.
    """
    kh, kw = _clip_block(block_size, height, width)
    dev = torch.device(device) if device is not None else None
    p = _as_prob_tensor(drop_prob, dev)
    return _gamma(p, height, width, kh, kw, _tables(height, width, kh, kw, p.device))


def _as_prob_tensor(drop_prob: float | torch.Tensor, device: torch.device | None) -> torch.Tensor:
    if isinstance(drop_prob, torch.Tensor):
        p = drop_prob.to(device=device if device is not None else drop_prob.device, dtype=torch.float32)
    else:
        # torch.full launches a fill, not a host-to-device copy, so a Python float costs no sync on CUDA.
        p = torch.full((), float(drop_prob), dtype=torch.float32, device=device)
    # Keeps log1p finite for a (scheduled) probability of exactly 1; floats were validated to be < 1.
    return p.clamp(0.0, 1.0 - 1e-6)


def _gamma(
    p: torch.Tensor, h: int, w: int, kh: int, kw: int, tables: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    uniform = (kh == 1 or kh == h) and (kw == 1 or kw == w)
    if uniform:  # every unit lies in exactly one candidate block: gamma = p exactly
        return p
    neg_cover, moments = tables[0], tables[1]
    # lambda_0 = -log(1 - p) / mean(n); mean(n) in closed form: each valid seed covers kh*kw units.
    lam = torch.log1p(-p) * (-h * w / ((h - kh + 1) * (w - kw + 1) * kh * kw))
    target = (p - 1.0) * (h * w)
    # Few, fused kernels: this runs on every forward, and in eager mode on a GPU each op is a launch.
    for _ in range(_NEWTON_STEPS):
        kept_slope = torch.mv(moments, torch.exp(neg_cover * lam))  # HW (1 - F(lambda), F'(lambda))
        lam = torch.addcdiv(lam, kept_slope[0] + target, kept_slope[1])  # lam + (p - F) / F'
    return -torch.expm1(-lam.clamp_min(0.0))


def _seed_rate(
    p: torch.Tensor, h: int, w: int, kh: int, kw: int, tables: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """:func:`_gamma`, remembered per probability and shape in eager CPU mode, where reading ``p`` costs no sync:
    a fixed (or piecewise-constant) probability then solves its Newton iteration once, not on every forward."""
    if p.device.type != "cpu" or _is_compiling():
        return _gamma(p, h, w, kh, kw, tables)
    key = (p.item(), h, w, kh, kw)
    gamma = _GAMMAS.get(key)
    if gamma is None:
        if len(_GAMMAS) >= _TABLES_MAX:
            _GAMMAS.clear()
        gamma = _GAMMAS[key] = _gamma(p, h, w, kh, kw, tables)
    return gamma


def _expand_seeds(seeds: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Algorithm 1 line 6: a ``kh x kw`` block around every seed, as a stride-1 max-pool.

    Output row ``o`` pools seed rows ``o - kh // 2 .. o + (kh - 1) // 2``, so a seed at row ``i`` drops rows
    ``i - (kh - 1) // 2 .. i + kh // 2``; for even ``kh`` the pooled map has one extra, always empty, last row
    that the caller crops. Large windows pool rows then columns (a max is separable): O(kh + kw) per unit
    instead of O(kh * kw), which matters on CPU for block sizes near the map size.
    """
    if kh == 1 and kw == 1:
        return seeds
    if kh * kw <= 4 * (kh + kw):
        return F.max_pool2d(seeds, (kh, kw), stride=1, padding=(kh // 2, kw // 2))
    rows = F.max_pool2d(seeds, (kh, 1), stride=1, padding=(kh // 2, 0))
    return F.max_pool2d(rows, (1, kw), stride=1, padding=(0, kw // 2))


def drop_block2d(
    x: torch.Tensor,
    drop_prob: float | torch.Tensor,
    block_size: int,
    per_channel: bool = True,
    training: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """DropBlock (Algorithm 1) on a ``(N, C, H, W)`` tensor; see the module docstring for the choices made.

    Args:
        x: input feature map, any memory format.
        drop_prob: probability that a unit is dropped (``1 - keep_prob``), a float in [0, 1) or a 0-dim tensor
            (a tensor is not validated, so a scheduled value never forces a device sync).
        block_size: side of the square block, clipped to the map per axis; odd or even.
        per_channel: independent masks per (sample, channel) as in Algorithm 1; False shares one mask across
            the channels of a sample.
        training: identity when False.
        eps: lower bound of the kept count in the ``count / count_ones`` rescale.
    """
    drop_prob = check_strength("drop_prob", drop_prob)
    block_size = check_positive_int("block_size", block_size)
    if passes_through("dropblock", x, training, drop_prob):
        return x
    if x.dim() != 4:
        raise ValueError(f"drop_block2d expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    kh, kw = _clip_block(block_size, x.shape[2], x.shape[3])
    p = _as_prob_tensor(drop_prob, x.device)
    if _keep_mask_op is not None and _is_compiling():
        # Inductor's code for the mask is slower than the eager kernels (max-pool ~5x on CPU; 1.7-1.9x for the
        # whole op on an H200, benchmarks/results/ops_compiled_cuda.md): as an opaque op the mask costs what it
        # costs in eager mode and the multiply still fuses into the surrounding graph (no graph break).
        keep, scale = _keep_mask_op(x.detach(), p, kh, kw, per_channel, eps)
    else:
        keep, scale = _keep_mask(x.detach(), p, kh, kw, per_channel, eps)
        if x.device.type == "cpu":  # reading the scale costs no sync here
            return _MaskedScale.apply(x, keep, float(scale))
    # keep is 0/1, exact in every float dtype, and the only tensor autograd keeps for backward. The float32 rescale
    # is applied in place in the multiply's float32 compute type and rounded once to x.dtype (folding it into a
    # bf16 mask would bias the expectation by up to 0.4 %).
    return torch.mul(x, keep).mul_(scale)


class _MaskedScale(torch.autograd.Function):
    """``x * keep * scale`` as one kernel each way (CPU eager): ``addcmul`` onto a 0-dim zero computes the product in
    float32 and rounds once to ``x.dtype``, the same values as the two multiplies above at a third less time."""

    generate_vmap_rule = True  # torch.func transforms work through it

    @staticmethod
    def forward(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.addcmul(x.new_zeros(()), x, keep, value=scale)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        _, keep, ctx.scale = inputs
        ctx.save_for_backward(keep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, keep, value=ctx.scale), None, None


def _mask_channels_last(x: torch.Tensor, per_channel: bool) -> bool:
    """Lay a per-channel mask out like a channels-last input (ViT token grids included), so the multiply reads
    both with the same strides."""
    return per_channel and x.shape[1] > 1 and x.stride(1) == 1


def _keep_mask(
    x: torch.Tensor, p: torch.Tensor, kh: int, kw: int, per_channel: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 0/1 keep mask in ``x.dtype`` (``(N, C or 1, H, W)``, or ``(N, C or 1, 1, 1)`` when the block spans the
    map) and the float32 0-dim rescale ``count / count_ones``."""
    n, c, h, w = x.shape
    mask_channels = c if per_channel else 1
    tables = _tables(h, w, kh, kw, x.device)
    gamma = _seed_rate(p, h, w, kh, kw, tables)
    if kh == h and kw == w:
        # One valid seed per map and its block is the whole map: SpatialDropout, no pooling needed.
        keep = x.new_empty((n, mask_channels, 1, 1)).bernoulli_(1.0 - gamma)
    elif x.device.type == "cpu" and (g := float(gamma)) <= SPARSE_MAX_PROB:  # a CPU .item() costs no sync
        keep = _sparse_keep(x, g, kh, kw, mask_channels)
    else:
        keep = _dense_keep(x, gamma, tables[2], kh, kw, per_channel, mask_channels)
    count = float(keep.numel())
    count_ones = keep.sum(dtype=torch.float32)
    # tensor / tensor, not float / tensor: the latter is computed as count * reciprocal(count_ones), which is
    # not exactly 1 when nothing is dropped (strength 0 must be the identity bit for bit).
    return keep, count_ones.new_tensor(count) / count_ones.clamp_min(eps)


def _block_offsets(h: int, w: int, kh: int, kw: int, stride: int) -> torch.Tensor:
    """Flat offsets of a ``kh x kw`` block's units from its top-left unit, for an ``h x w`` map whose columns are
    ``stride`` elements apart; cached with the per-shape tables."""
    key = ("offsets", h, w, kh, kw, stride)
    offsets = _TABLES.get(key)
    if offsets is None:
        offsets = ((torch.arange(kh).unsqueeze(1) * w + torch.arange(kw)) * stride).flatten()
        if len(_TABLES) >= _TABLES_MAX:
            _TABLES.clear()
        _TABLES[key] = offsets
    return offsets


def _sparse_keep(x: torch.Tensor, gamma: float, kh: int, kw: int, mask_channels: int) -> torch.Tensor:
    """Keep mask with every seed's ``kh x kw`` block written directly: seeds ~ Bernoulli(gamma) at each valid
    position of each map, a valid position being the block's top-left corner (Figure 2a)."""
    n, _, h, w = x.shape
    hs, ws = h - kh + 1, w - kw + 1
    seeds = bernoulli_positions(n * mask_channels * hs * ws, gamma)
    if _mask_channels_last(x, mask_channels > 1):
        maps, cell = seeds.div(hs * ws, rounding_mode="floor"), seeds.remainder(hs * ws)
        row, col = cell.div(ws, rounding_mode="floor"), cell.remainder(ws)
        sample, channel = maps.div(mask_channels, rounding_mode="floor"), maps.remainder(mask_channels)
        corner = sample * (h * w * mask_channels) + (row * w + col) * mask_channels + channel
        offsets = _block_offsets(h, w, kh, kw, mask_channels)
        keep = ones((n, h, w, mask_channels), x.dtype, x.device).permute(0, 3, 1, 2)
    else:
        # seed (map m, row r, col c) = m hs ws + r ws + c sits at m h w + r w + c: skip kw - 1 columns per seed row
        # and (kh - 1) w units per map (fewer small ops than splitting the index: they cost more than the math).
        corner = seeds.div(ws, rounding_mode="floor").mul_(kw - 1).add_(seeds)
        corner.add_(seeds.div(hs * ws, rounding_mode="floor").mul_((kh - 1) * w))
        offsets = _block_offsets(h, w, kh, kw, 1)
        keep = ones((n, mask_channels, h, w), x.dtype, x.device)
    # The permuted view shares storage with a contiguous buffer, so flat indices address it in memory order.
    flat = keep.as_strided((keep.numel(),), (1,))
    flat.index_fill_(0, (corner.unsqueeze(1) + offsets).flatten(), 0)
    return keep


def _dense_keep(
    x: torch.Tensor,
    gamma: torch.Tensor,
    valid: torch.Tensor,
    kh: int,
    kw: int,
    per_channel: bool,
    mask_channels: int,
) -> torch.Tensor:
    """Keep mask from one Bernoulli draw per position (seeds only where a block fits) and a max-pool; no host
    sync, so this is the path on accelerators and for large seed rates."""
    n, _, h, w = x.shape
    # CPU's channels-last max-pool vectorises over channels (~3-5x faster than NCHW there, even counting
    # the mixed-layout multiply); on accelerators the mask follows the input's layout.
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    channels_last = per_channel and (channels_last or x.device.type == "cpu")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    mask = torch.empty((n, mask_channels, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
    mask.bernoulli_(valid * gamma)  # seeds, only where a block fits (Figure 2a)
    return 1 - _expand_seeds(mask, kh, kw)[..., :h, :w]


def _keep_mask_fake(
    x: torch.Tensor, p: torch.Tensor, kh: int, kw: int, per_channel: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    shape = (n, c if per_channel else 1) + ((1, 1) if (kh, kw) == (h, w) else (h, w))
    fmt = torch.channels_last if _mask_channels_last(x, per_channel) and shape[2:] != (1, 1) else None
    keep = x.new_empty(shape) if fmt is None else x.new_empty(shape).contiguous(memory_format=fmt)
    return keep, p.new_empty((), dtype=torch.float32)


def _keep_mask_eager(
    x: torch.Tensor, p: torch.Tensor, kh: int, kw: int, per_channel: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    keep, scale = _keep_mask(x, p, kh, kw, per_channel, eps)
    # The compiled graph trusts the strides the fake kernel promised.
    like = _keep_mask_fake(x, p, kh, kw, per_channel, eps)[0]
    return keep if keep.stride() == like.stride() else torch.empty_like(like).copy_(keep), scale


# torch.library.custom_op is torch >= 2.4; older versions trace the eager code (slower compiled, same result).
_keep_mask_op = None
if hasattr(torch.library, "custom_op"):
    _keep_mask_op = torch.library.custom_op("timm_drop::dropblock_keep_mask", mutates_args=())(
        _keep_mask_eager
    )
    _keep_mask_op.register_fake(_keep_mask_fake)


@register_regularizer("dropblock")
class DropBlock2d(Regularizer):
    """DropBlock (Ghiasi et al. 2018) as a timm_drop regularizer; the math is :func:`drop_block2d`.

    Args:
        drop_prob: probability that a unit is dropped, in [0, 1); multiplied by the schedule strength.
        block_size: side of the dropped square, >= 1 (clipped to the map per axis).
        per_channel: one mask per (sample, channel) (paper's Algorithm 1, default) or one per sample.

    On ViT-family token sites (``NLC``) it acts on the patch grid the rewriter reads from the model
    (:func:`timm_drop.structure.token_grid`), prefix tokens untouched; a ``dynamic_img_size=True`` ViT, whose grid
    changes with each input, and tokens with no known grid are refused by site name rather than guessed.
    """

    layouts = ("NCHW", "NHWC")
    # ViT tokens are served as the map they come from once the site's patch grid is known (set_token_grid).
    grid_layouts = ("NLC",)
    strength_params = ("drop_prob",)
    compare_defaults = compare_values("drop_prob", "block_size")
    figure = FigureTraits(outline_blocks=True)
    card = MethodCard(
        title="DropBlock: A regularization method for convolutional networks",
        authors="Ghiasi et al.",
        year=2018,
        venue="NeurIPS",
        url="https://arxiv.org/abs/1810.12890",
        summary="drops contiguous block_size x block_size regions of each feature map",
        reported="ResNet-50 on ImageNet: 76.51% -> 78.13% top-1 (+1.62); RetinaNet on COCO: 36.8 -> 38.4 AP",
        draws=(
            "Block seeds, only where a whole block fits. On accelerators: `bernoulli_` on the seed "
            "map (float32 uniform and threshold; the 0/1 result stored in the input dtype). On CPU: "
            "the same distribution drawn sparsely as float64 geometric gaps between seeds "
            "(`bernoulli_positions`), so no noise tensor is allocated."
        ),
    )

    def __init__(self, drop_prob: float, block_size: int, per_channel: bool = True) -> None:
        super().__init__()
        self.drop_prob = check_probability("drop_prob", drop_prob)
        self.block_size = check_positive_int("block_size", block_size)
        if not isinstance(per_channel, bool):
            raise ParamTypeError(
                f"per_channel must be a bool, got {type(per_channel).__name__} ({per_channel!r})", "per_channel"
            )
        self.per_channel = per_channel

    def is_noop(self) -> bool:
        return self.drop_prob == 0.0

    def regularize(self, x: torch.Tensor) -> torch.Tensor:
        return drop_block2d(x, self.effective(self.drop_prob), self.block_size, self.per_channel)

    def _settings(self) -> str:
        return f"drop_prob={self.drop_prob}, block_size={self.block_size}, per_channel={self.per_channel}"
