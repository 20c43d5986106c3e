"""AttentionDrop: drop the strongly activated units of each feature map, with a hard or a soft mask.

Paper: Ouyang, Feng, He, Hao, Dai, Xia, "AttentionDrop for Convolutional Neural Networks", ICME 2019
(pp. 1342-1347). Official code: ``Kira0096/smart-drop`` (it differs from the paper
in several places, noted below). This module follows the paper.

Implemented equations, on a channels-first tensor ``F`` of shape ``(N, C, *spatial)``; a "feature map" is
``F[n, c]`` and ``i, j`` index its spatial positions:

* Eq. (6) / Algorithm 1 step 3, min-max normalisation of each feature map over its spatial positions:
  ``F^ = (F - min F) / (max F - min F)``, in float32, without gradient. A constant map has ``F^ = 0``.
* Eq. (4) / Algorithm 1 step 4, the adaptive shape: the top ``top_rate`` fraction of the units of each map
  (the paper's top-beta percentile, beta = 100 * top_rate).
* ``mode="am"`` (adaptive mask, Eqs. (4)-(5)): gated top units are set to 0 (hard mask).
* ``mode="sm"`` (soft mask, Eqs. (6)-(8)): every gated unit is multiplied by ``S = 1 - F^``, so a map's maximum
  is removed, its minimum kept, and the attenuation grows with the activation.
* ``mode="ad"`` (AttentionDrop, Algorithm 1, the paper's method and the default): the soft mask restricted to
  the top units, ``S = 1 - [F > tau] * F^``; every other unit is kept.
* The gate: Algorithm 1 step 6, "for each element in feature map F, get an initial dropout possibility gamma =
  Bernoulli(alpha)"; ``M = S`` where gamma = 1, ``M = 1`` elsewhere; ``alpha = drop_prob``.

All three modes are one formula: with a per-unit drop weight ``w`` in [0, 1] (``[F > tau]``, ``F^`` or
``[F > tau] F^``) and a per-unit gate ``g ~ Bernoulli(drop_prob)``, the mask is ``M = 1 - g w``.

Choices where the paper is ambiguous (they change results, so they are stated here):

* **Rescale (Eq. (9))**. As printed, Eq. (9) divides ``F * M`` by ``sum(M)``, which would shrink activations
  by about the number of units; the official code multiplies by ``numel / sum(M)`` over the whole batch (like
  DropBlock). That normalises the mean of the mask, not of the activations: the mask removes the largest
  activations, so the output's expectation still falls, and a batch-wide random sum couples samples (and DDP
  ranks differ). We divide each unit by its own expected mask, ``E[M] = 1 - drop_prob * w``:
  ``out = F * (1 - g w) / (1 - drop_prob * w)``. Then ``E[out] = F`` exactly for every unit, for every mode,
  any batch size and any input; units with ``w = 0`` are returned bit for bit; the scale is a deterministic
  function of the (detached) input, at most ``1 / (1 - drop_prob)``. For ``am`` this is inverted dropout on the
  top units only.
* **Normalisation axis**: the paper normalises "the current feature map" with spatial indices ``i, j``; the
  official code normalises each position's vector over the channels instead. We follow the paper (per map,
  over space).
* **Gate granularity**: per element (Algorithm 1 step 6). Section 3.1 says the adaptive mask "drops / keeps the
  units in the region altogether", and the official code draws one gate per (sample, channel); we follow the
  algorithm, which is the paper's final statement of the method.
* **Top units and ties**: ``k = ceil(top_rate * n)`` of the ``n`` spatial positions (clamped to [1, n], same
  rule as SelectScale); a unit is "top" when strictly greater than ``tau``, the (k+1)-th largest value of its
  map (one unsorted ``topk(k + 1)``), so at most ``k`` units are selected and ties at the boundary are left out: a
  constant map has no top units (nothing stands out). ``top_rate = 1`` selects every unit. Scores
  use the signed activation ("activation values"), not its magnitude. ``top_rate`` is unused by ``sm``.
* Layouts: tokens ``(B, L, C)`` arrive from the base class as ``(B, C, L, 1)``: each embedding channel is a
  map over the tokens (prefix tokens included). Any spatial rank works; a map with one unit has ``F^ = 0``.

Numerics: scores, normalisation, gate and scale are float32 (the threshold compares the exact float32 copy of
the input; the ``topk`` ranks integer keys ordered exactly like those floats, 16-bit ones for bf16/fp16 inputs, and
on CPU the gated units are drawn as geometric gaps instead of one uniform per unit: same distributions, less work). Scores are NaN-safe: a NaN unit ranks below every number and is left out of its map's min and max,
so one NaN stays in its own unit instead of turning the whole map's ``max - min`` into NaN. Output is finite for all-zero, constant, negative and huge inputs: float32 up to half its maximum
(where ``max - min`` itself would overflow); in float16, values up to ``65504 * (1 - drop_prob)``, since a kept
unit is scaled by at most ``1 / (1 - drop_prob)`` (as in any inverted dropout).

Where the paper placed it: CIFAR ResNet-18; the official code applies one module to the outputs of ``layer1``
and ``layer2`` (32x32 and 16x16 maps), ``drop_prob`` ramped linearly from 0 to 0.1 ("we use a linear scheduler
to increase the value of alpha from 0 to 0.1"); the paper's example uses beta = 20 (``top_rate = 0.2``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from timm_drop.regularizers.base import (
    SPARSE_MAX_PROB,
    ParamError,
    Regularizer,
    _is_compiling,
    bernoulli_positions,
    check_probability,
    check_strength,
    ones,
    passes_through,
)
from timm_drop.regularizers.card import MethodCard
from timm_drop.regularizers.figure import FigureTraits, compare_values
from timm_drop.regularizers.registry import register_regularizer
from timm_drop.regularizers.selectscale import check_top_rate, num_selected

__all__ = ["ATTENTIONDROP_MODES", "AttentionDrop", "attention_drop", "attention_weights"]

#: ``am``: adaptive (hard) mask; ``sm``: soft mask; ``ad``: both (the paper's AttentionDrop).
ATTENTIONDROP_MODES: tuple[str, ...] = ("ad", "am", "sm")


def check_mode(mode: str) -> str:
    if mode not in ATTENTIONDROP_MODES:
        raise ParamError(f"mode must be one of {list(ATTENTIONDROP_MODES)}, got {mode!r}", "mode")
    return mode


def _min_max_normalise(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Eq. (6) in float32: ``(values - lo) / (hi - lo)``; 0 where the map is constant."""
    lo = lo.float()
    span = (hi.float() - lo).clamp_min_(torch.finfo(torch.float32).tiny)
    return torch.sub(values, lo).div_(span)


_INF = float("inf")


@torch.no_grad()
def _scores(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-safe float32 views of ``x`` as ``(N, C, n)`` maps: for ranking and maxima (NaN -> -inf, so a NaN unit
    is never "top") and for minima (NaN -> +inf). One NaN then stays in its own unit instead of making its whole
    map's ``max - min`` NaN."""
    xs = x.detach().reshape(x.shape[0], x.shape[1], -1).float()
    return (
        torch.nan_to_num(xs, nan=-_INF, posinf=_INF, neginf=-_INF),
        torch.nan_to_num(xs, nan=_INF, posinf=_INF, neginf=-_INF),
    )


@torch.no_grad()
def _top_units(xs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices, values and selection flags of the ``k + 1`` largest units of each row of ``xs`` ``(N, C, n)``,
    k < n, in no particular order.

    The smallest of them is the threshold ``tau`` (the (k+1)-th largest value); a unit is selected only if strictly
    greater than ``tau``, so at most k are and ties at the boundary (a constant map) select nothing. An unsorted
    ``topk`` is ~2x cheaper than a sorted one on large maps and selects the same set.
    """
    vals, idx = xs.topk(k + 1, dim=-1, sorted=False)
    return idx, vals, vals > vals.amin(dim=-1, keepdim=True)


@torch.no_grad()
def attention_weights(x: torch.Tensor, top_rate: float, mode: str = "ad") -> torch.Tensor:
    """Per-unit drop weight ``w`` in [0, 1], float32, shape ``(N, C, n)`` with ``n`` = number of spatial units.

    ``am``: 1 on the top units of each map, else 0; ``sm``: the min-max normalised activation ``F^``;
    ``ad``: ``F^`` on the top units, else 0. Computed from ``x.detach()``; this is the full-size reference form
    (:func:`attention_drop` touches only the top units in ``am``/``ad``).
    """
    mode = check_mode(mode)
    xs, xs_low = _scores(x)
    n = xs.shape[-1]
    k = num_selected(check_top_rate(top_rate), n)
    if mode == "am":
        w = torch.ones(xs.shape, device=x.device, dtype=torch.float32)
    else:
        lo, hi = xs_low.amin(dim=-1, keepdim=True), xs.amax(dim=-1, keepdim=True)
        w = _min_max_normalise(xs, lo, hi)
    if mode != "sm" and k < n:
        idx, _, sel = _top_units(xs, k)
        w = torch.zeros_like(w).scatter_(-1, idx, w.gather(-1, idx) * sel)
    return w


#: Integer type of the same width, and the sign shift, for the order keys of 16- and 32-bit floats.
_KEY_TYPES = {2: (torch.int16, 15, 0x7FFF), 4: (torch.int32, 31, 0x7FFFFFFF)}


def _on_eager_cpu(t: torch.Tensor) -> bool:
    """Host-side decisions (a NaN check, a probability as a Python number) are free on CPU, but a sync on
    accelerators and a graph break under ``torch.compile``."""
    return t.device.type == "cpu" and not _is_compiling()


@torch.no_grad()
def _ranking(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The scores as ``(N, C, n)`` maps, each map's NaN-safe minimum (float32, ``(N, C, 1)``), and whether the
    scores are known to be NaN-free and non-negative (a post-ReLU map: see :func:`_order_keys`).

    Scores are the float32 values of ``x``; 16-bit floats are kept in their own dtype, which holds the same
    values exactly (half the bytes to rank). NaN ranks below every number (-inf) and is left out of the minimum,
    as in :func:`_scores`; on CPU the NaN replacement only runs when a map has a NaN (``amin`` propagates it).
    """
    x3 = x.detach().reshape(x.shape[0], x.shape[1], -1)
    if x3.dtype not in (torch.bfloat16, torch.float16):
        x3 = x3.float()
    lo = x3.amin(dim=-1, keepdim=True)
    if _on_eager_cpu(x3) and not bool(lo.isnan().any()):
        return x3, lo.float(), bool((lo >= 0).all())
    lo = torch.nan_to_num(x3, nan=_INF, posinf=_INF, neginf=-_INF).amin(dim=-1, keepdim=True)
    return torch.nan_to_num(x3, nan=-_INF, posinf=_INF, neginf=-_INF), lo.float(), False


@torch.no_grad()
def _order_keys(scores: torch.Tensor, non_negative: bool = False) -> torch.Tensor:
    """Integers in the order of the (NaN-free) float ``scores``: their bits, with the magnitude bits of negative
    values flipped (the bits as they are when no score is negative, e.g. after a ReLU). Ranking these is ~20 %
    cheaper on CPU than ranking floats (no NaN-aware comparator). The one pair of equal floats with different
    keys, ``-0.0 < +0.0``, only breaks a tie, which any top-k may do: the selection compares the float values."""
    int_type, shift, magnitude = _KEY_TYPES[scores.element_size()]
    return _flip_negative(scores.view(int_type), shift, magnitude, non_negative)


def _flip_negative(bits: torch.Tensor, shift: int, magnitude: int, non_negative: bool) -> torch.Tensor:
    """Flip the magnitude bits where the sign bit is set: float bits -> order keys, and back (an involution)."""
    return bits if non_negative else bits ^ ((bits >> shift) & magnitude)


@torch.no_grad()
def _top_units_fast(
    scores: torch.Tensor, k: int, non_negative: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_top_units` on the order keys of ``scores``: indices, score values and selection flags of the
    ``k + 1`` largest units of each map, k < n. Same tie rule: strictly above the (k+1)-th value, as floats."""
    keys, idx = _order_keys(scores, non_negative).topk(k + 1, dim=-1, sorted=False)
    # the keys map back to the scores exactly: cheaper than gathering them
    _, shift, magnitude = _KEY_TYPES[scores.element_size()]
    vals = _flip_negative(keys, shift, magnitude, non_negative).view(scores.dtype)
    return idx, vals, vals > vals.amin(dim=-1, keepdim=True)


def _factor(w: torch.Tensor, drop_prob: float | torch.Tensor) -> torch.Tensor:
    """``(1 - g w) / (1 - drop_prob w)`` with ``g ~ Bernoulli(drop_prob)`` per element; overwrites ``w``.

    On CPU, at the usual small ``drop_prob``, only the gated elements are drawn (:func:`bernoulli_positions`) and
    patched into ``1 / (1 - drop_prob w)``: same distribution, a tenth of the random numbers.
    """
    if _on_eager_cpu(w) and (p := float(drop_prob)) <= SPARSE_MAX_PROB:
        gate = torch.zeros(w.numel(), dtype=torch.float32)
        gate.index_fill_(0, bernoulli_positions(w.numel(), p), 1.0)
        # 1 - g w, exact for g in {0, 1}
        kept = torch.addcmul(gate.new_ones(()), gate.view(w.shape), w, value=-1.0)
    else:
        # float32 uniforms: a bf16 rand thresholds ~6x off at small drop_prob.
        dropped = torch.rand(w.shape, device=w.device, dtype=torch.float32) < drop_prob
        kept = torch.where(dropped, 1.0 - w, 1.0)
    return kept.div_(w.mul_(-drop_prob).add_(1.0))


def attention_drop(
    x: torch.Tensor,
    drop_prob: float | torch.Tensor,
    top_rate: float,
    mode: str = "ad",
    training: bool = True,
) -> torch.Tensor:
    """AttentionDrop (Algorithm 1): ``x * (1 - g w) / (1 - drop_prob * w)``, ``g ~ Bernoulli(drop_prob)``.

    Args:
        x: channels-first tensor ``(N, C, *spatial)``.
        drop_prob: the gate probability alpha, in [0, 1); a float or a 0-dim tensor (a scheduled value).
        top_rate: fraction of the units of each map that form the adaptive mask, in (0, 1] (``am``/``ad``).
        mode: ``"ad"`` (default, the paper's method), ``"am"`` (hard mask on top units) or ``"sm"`` (soft mask).
        training: identity when False.

    ``w`` is :func:`attention_weights`; see the module docstring for the rescale and the other choices. In
    ``am``/``ad`` only the top ``k`` units of each map are touched: the gate, the normalisation and the scale
    are computed on ``(N, C, k)`` and scattered into a factor of ones, which keeps the work near one read and
    one write of ``x`` plus a ``topk``.
    """
    if x.dim() < 2:
        raise ValueError(
            f"attention_drop expects a channels-first tensor (N, C, *spatial), got {tuple(x.shape)}"
        )
    top_rate = check_top_rate(top_rate)
    mode = check_mode(mode)
    drop_prob = check_strength("drop_prob", drop_prob)
    if passes_through("attentiondrop", x, training, drop_prob):
        return x
    k = num_selected(top_rate, x[0, 0].numel())
    if x.device.type == "cpu" and _factor_op is not None and _is_compiling():
        # Inductor's CPU code for the top-k, the random gate and the scatter is slower than the eager fast path
        # (order keys, sparse gates); as an opaque op the factor costs what it costs in eager mode and the
        # multiply still fuses into the surrounding graph (no graph break).
        p = drop_prob if isinstance(drop_prob, torch.Tensor) else torch.tensor(drop_prob)
        factor = _factor_op(x.detach(), p.to(device=x.device, dtype=torch.float32), k, mode)
    else:
        factor = _attention_factor(x, drop_prob, k, mode)
    return x * factor.view(x.shape)


@torch.no_grad()
def _attention_factor(x: torch.Tensor, drop_prob: float | torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """The detached factor ``(1 - g w) / (1 - drop_prob w)`` as ``(N, C, n)`` maps in ``x.dtype``."""
    scores, lo, non_negative = _ranking(x)
    if mode == "sm" or k == scores.shape[-1]:  # every unit is a top unit: ad is sm, am is dropout
        if mode == "am":
            w = torch.ones(scores.shape, device=x.device, dtype=torch.float32)
        else:
            xs = scores.float()
            w = _min_max_normalise(xs, lo, xs.amax(dim=-1, keepdim=True))
        return _factor(w, drop_prob).to(x.dtype)
    idx, top_vals, sel = _top_units_fast(scores, k, non_negative)
    if mode == "am":
        w = sel.float()
    else:
        top_vals = top_vals.float()
        w = _min_max_normalise(top_vals, lo, top_vals.amax(dim=-1, keepdim=True)).mul_(sel)
    factor = ones(scores.shape, x.dtype, x.device)
    return factor.scatter_(-1, idx, _factor(w, drop_prob).to(x.dtype))


def _attention_factor_eager(x: torch.Tensor, drop_prob: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    return _attention_factor(x, drop_prob, k, mode)


def _attention_factor_fake(x: torch.Tensor, drop_prob: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1], x[0, 0].numel()))


# torch.library.custom_op is torch >= 2.4; older versions trace the eager code (slower compiled, same result).
_factor_op = None
if hasattr(torch.library, "custom_op"):
    _factor_op = torch.library.custom_op("timm_drop::attention_drop_factor", mutates_args=())(
        _attention_factor_eager
    )
    _factor_op.register_fake(_attention_factor_fake)


class AttentionDrop(Regularizer):
    """AttentionDrop (Ouyang et al., ICME 2019, Algorithm 1); see :func:`attention_drop` and the module doc."""

    # Its attention is a normalisation over each map's positions: pooled (N, C) features have one position per
    # map, where every mode would silently do nothing, so that layout is refused.
    layouts = ("NCHW", "NHWC", "NLC")
    strength_params = ("drop_prob",)
    compare_defaults = compare_values("drop_prob", "top_rate")
    figure = FigureTraits()
    card = MethodCard(
        title="AttentionDrop for Convolutional Neural Networks",
        authors="Ouyang et al.",
        year=2019,
        venue="ICME",
        url="https://doi.org/10.1109/ICME.2019.00233",
        summary="drops the most active units of each map with a soft mask weighted by their activation",
        reported="ResNet-18 on CIFAR-10: 95.28% -> 95.49% top-1 (+0.21, AD alone); on CIFAR-100: 77.54% -> 78.47% "
        "(Table 1)",
        draws=(
            "Only the gate `g ~ Bernoulli(drop_prob)` per unit is random (the drop weight is a "
            "function of the input). On CPU the gated units are drawn as float64 geometric gaps "
            "(`bernoulli_positions`); elsewhere one float32 uniform per unit (`torch.rand(...) < "
            "drop_prob`)."
        ),
    )

    def __init__(self, drop_prob: float, top_rate: float, mode: str = "ad") -> None:
        super().__init__()
        self.drop_prob = check_probability("drop_prob", drop_prob)
        self.top_rate = check_top_rate(top_rate)
        self.mode = check_mode(mode)

    def is_noop(self) -> bool:
        return self.drop_prob == 0.0

    def regularize(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.effective(self.drop_prob).to(x.device)
        return attention_drop(x, alpha, self.top_rate, self.mode, training=True)

    @classmethod
    def score_map(cls, x: torch.Tensor, params: Mapping[str, Any]) -> tuple[torch.Tensor, str] | None:
        """The drop weight ``w`` of every unit (:func:`attention_weights`), normalised over every position the op
        sees (prefix tokens included): ``x``'s shape."""
        mode = cls.param(params, "mode")
        w = attention_weights(x, cls.param(params, "top_rate"), mode)
        return w.view(x.shape), f"drop weight w ({mode})"

    def _settings(self) -> str:
        return f"drop_prob={self.drop_prob}, top_rate={self.top_rate}, mode={self.mode!r}"


register_regularizer("attentiondrop", AttentionDrop)
