"""SpatialScale, Selectout and SelectScale: perturb the most important feature maps.

Paper: Zhengsu Chen, Jianwei Niu, Xuefeng Liu, Shaojie Tang, "SelectScale: Mining More Patterns from Images
via Selective and Soft Dropout", IJCAI 2020 (arXiv 2012.15766). There is no public code; everything below is
read from the paper.

Implemented equations (``x`` is a channels-first tensor ``(N, C, *spatial)``, one "feature map" is
``x[n, c]``):

* **Selecting function S** (section 2.3): the score of feature map ``(n, c)`` is ``max |x[n, c]|`` over its
  spatial positions (the paper: "calculate the absolute values ... Then, the maximum value in each feature
  map ... [is] the score"), computed per sample, without gradient, in float32 (``max |x| = max(max x,
  -min x)`` from one fused ``aminmax`` pass, exact in every dtype). The ``k`` feature maps with the highest
  scores of each sample are the candidates.
* **SpatialScale**, Eq. (5): every feature map is multiplied by ``r ~ Uniform(1 - q, 1 + q)``, one draw per
  (sample, channel); no rescale, since ``E[r] = 1``.
* **SelectScale**, Eq. (6): ``r = (1 - v)(u - 1) + 1`` with ``u ~ Uniform(1 - q, 1 + q)`` and ``v = S(Y, t,
  1 - t)``: only the candidates are scaled by ``u``, every other feature map is returned unchanged (bit for
  bit). With ``top_rate = 1`` it is SpatialScale.
* **Selectout**, Eq. (4): ``y = r y / p`` with ``r = S(Y, t, p)``, i.e. SpatialDropout whose dropped maps are
  drawn from the candidates only.

Choices where the paper is silent or ambiguous (documented here because they change results):

* ``drop_prob`` of Selectout is the fraction of **all** feature maps that is dropped, ``1 - p`` in Eq. (4).
  The paper is explicit: "t = 0.2 and p = 0.9 indicates that 10% of the feature maps are dropped and these
  dropped feature maps are randomly selected from the top 20% feature maps". So ``drop_prob <= top_rate`` is
  required, and a candidate is dropped with probability ``drop_prob * C / k`` (about ``drop_prob /
  top_rate``), independently per (sample, candidate). Independent draws make the expected number of dropped
  maps exactly ``drop_prob * C`` whatever the rounding of ``k``; the paper's remark that very small rates
  cannot be told apart on narrow layers suggests it drew a fixed count instead, which rounds small rates to 0.
* Selectout rescale: Eq. (4) divides **every** feature map (candidate or not) by ``p = 1 - drop_prob``, a
  constant like SpatialDropout's ``1/p``. We do exactly that. It keeps the expected number of surviving maps,
  not the expected activation: the dropped maps are the strongest ones by construction, so the mean output
  is lower than the input's. That bias is the method (the paper calls Selectout "very strong"), not a bug.
* ``k = ceil(top_rate * C)`` (with a 1e-6 slack against float error, so ``0.1 * 30`` gives 3), clamped to
  ``[1, C]``: at least one map is always a candidate and at least the requested fraction is covered, so
  ``drop_prob <= top_rate`` guarantees a drop probability ``<= 1`` among the candidates.
* Ties in the score at the k-th place are broken by ``torch.topk`` (unspecified order); exactly ``k`` maps are
  candidates for every sample. Ties happen in practice only for dead (all-zero) maps, where scaling or
  dropping changes nothing.
* ``q`` is the half-width of the uniform range in Eq. (5)/(6), in ``[0, 1]`` (``q = 1`` samples from
  ``U(0, 2)``). Beware the paper's tables: they quote a "data retaining rate" for SpatialScale/SelectScale and
  Fig. 4 says "retaining rate = 0 ... indicates that the top-ranked features are scaled by factors sampled from
  Uniform(0, 2)", i.e. the tables' value is ``1 - q``. Table 1 SpatialScale "0.4" is ``q = 0.6``.
* Layouts: the method only needs "channel" and "everything else", so it works on any spatial rank. The
  regularizer base class hands tokens ``(B, L, C)`` in as ``(B, C, L, 1)``: a feature map is one embedding
  channel over all tokens (prefix tokens included) and its score is the max over tokens. NHWC arrives as a
  permuted view and comes back in the same memory format.

Cost: one fused ``aminmax`` read of ``x`` for the scores, a ``topk`` and a scatter on the small ``(N, C)``
score matrix, and one broadcast multiply; SpatialScale (or ``top_rate = 1``) skips the scores.

Where the paper placed it (section 3): CIFAR ResNets/WRNs, after every convolution; ResNeXt-29, before and
after the grouped 3x3 convolutions; ImageNet ResNet-50, after every BN of the bottlenecks of stages 3 and 4,
stage 3 at half the rate, with a curriculum (ramped) schedule. SelectScale hyper-parameters, tables' retaining
rate converted to ``q = 1 - retaining``: ImageNet ResNet-50 ``top_rate=0.1, q=0.8``; CIFAR-10 (Table 1)
ResNet-110 / WRN-20-4 / WRN-20-8 ``top_rate`` 0.4 / 0.2 / 0.2 with ``q`` 0.6 / 1.0 / 0.9; CIFAR-100 (Table 2
caption) ``top_rate`` 0.1 / 0.1 / 0.2 with ``q = 0.9`` (the text of section 3.3 says top rates 0.1 / 0.2 / 0.1).
SpatialScale baseline: ``q = 0.6`` (``0.8`` for CIFAR-100 WRN-20-8). Section 4: most tuned top rates are 0.1 or
0.2. Selectout has no table of its own; Fig. 3 shows that dropping 6% of the maps almost disables a trained net.
"""

from __future__ import annotations

import math

import torch

from timm_drop.regularizers.base import (
    ParamError,
    Regularizer,
    check_probability,
    check_strength,
    passes_through,
)
from timm_drop.regularizers.card import MethodCard
from timm_drop.regularizers.figure import compare_values
from timm_drop.regularizers.registry import register_regularizer

__all__ = [
    "SelectScale",
    "Selectout",
    "SpatialScale",
    "channel_scores",
    "num_selected",
    "select_scale",
    "selectout",
    "spatial_scale",
    "top_channels",
]

Number = float | torch.Tensor


def check_top_rate(value: float) -> float:
    """``top_rate`` is the fraction of feature maps (or units) selected: it must lie in ``(0, 1]``."""
    value = check_probability("top_rate", value, allow_one=True)
    if value <= 0.0:
        raise ParamError(f"top_rate must be in (0, 1], got {value}", "top_rate")
    return value


def num_selected(top_rate: float, n: int) -> int:
    """How many of ``n`` items the top ``top_rate`` fraction holds: ``ceil(top_rate * n)`` clamped to [1, n]."""
    return min(n, max(1, math.ceil(top_rate * n - 1e-6)))


@torch.no_grad()
def channel_scores(x: torch.Tensor) -> torch.Tensor:
    """Score of each feature map, section 2.3: ``max |x[n, c]|`` over the spatial dims, float32 ``(N, C)``."""
    if x.dim() == 2:
        return x.detach().float().abs()
    lo, hi = torch.aminmax(x.detach().flatten(2), dim=-1)
    return torch.maximum(hi.float(), lo.float().neg())


@torch.no_grad()
def top_channels(x: torch.Tensor, top_rate: float) -> torch.Tensor:
    """Indices ``(N, k)`` of the ``k = num_selected(top_rate, C)`` highest-scoring feature maps of each sample."""
    k = num_selected(top_rate, x.shape[1])
    return channel_scores(x).topk(k, dim=1, sorted=False).indices


def _check_input(x: torch.Tensor, fn: str) -> None:
    if x.dim() < 2:
        raise ValueError(f"{fn} expects a channels-first tensor (N, C, *spatial), got shape {tuple(x.shape)}")


def _apply_channel_factor(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # r is (N, C) float32 and carries no gradient, so d(out)/dx = r, as in dropout.
    return x * r.to(x.dtype).view(r.shape + (1,) * (x.dim() - 2))


def _uniform_factors(shape: tuple[int, ...], q: Number, device: torch.device) -> torch.Tensor:
    # float32 noise: low-precision rand is visibly quantised.
    u = torch.rand(shape, device=device, dtype=torch.float32)
    return 1.0 + q * (2.0 * u - 1.0)


def spatial_scale(x: torch.Tensor, q: Number, training: bool = True) -> torch.Tensor:
    """SpatialScale, Eq. (5): multiply every feature map by its own ``r ~ U(1 - q, 1 + q)``.

    Args:
        x: channels-first tensor ``(N, C, *spatial)``, any spatial rank (0 included).
        q: half-width of the uniform range, in [0, 1]; a float or a 0-dim tensor (a scheduled value).
        training: identity when False.
    """
    _check_input(x, "spatial_scale")
    q = check_strength("q", q, allow_one=True)
    if passes_through("spatial_scale", x, training, q):
        return x
    r = _uniform_factors(tuple(x.shape[:2]), q, x.device)
    return _apply_channel_factor(x, r)


def select_scale(x: torch.Tensor, top_rate: float, q: Number, training: bool = True) -> torch.Tensor:
    """SelectScale, Eq. (6): scale only the top ``top_rate`` feature maps of each sample by ``U(1 - q, 1 + q)``.

    The candidates are the ``ceil(top_rate * C)`` maps with the highest ``max |x|`` (section 2.3); the other
    maps are returned bit for bit. ``top_rate = 1`` is SpatialScale.

    Args:
        x: channels-first tensor ``(N, C, *spatial)``, any spatial rank.
        top_rate: fraction of feature maps selected per sample, in (0, 1].
        q: half-width of the uniform range, in [0, 1]; a float or a 0-dim tensor.
        training: identity when False.
    """
    _check_input(x, "select_scale")
    top_rate = check_top_rate(top_rate)
    q = check_strength("q", q, allow_one=True)
    if passes_through("selectscale", x, training, q):
        return x
    n, c = x.shape[:2]
    k = num_selected(top_rate, c)
    if k == c:
        return spatial_scale(x, q, training=True)
    idx = top_channels(x, top_rate)
    r = torch.ones((n, c), device=x.device, dtype=torch.float32)
    r.scatter_(1, idx, _uniform_factors((n, k), q, x.device))
    return _apply_channel_factor(x, r)


def selectout(x: torch.Tensor, drop_prob: Number, top_rate: float, training: bool = True) -> torch.Tensor:
    """Selectout, Eq. (4): drop ``drop_prob`` of all feature maps, drawn only from the top ``top_rate``.

    Each of the ``k = ceil(top_rate * C)`` candidates of a sample is zeroed independently with probability
    ``drop_prob * C / k`` (so ``drop_prob * C`` maps are dropped on average), and every map of the output is
    divided by ``1 - drop_prob`` as Eq. (4) prescribes. ``top_rate = 1`` is SpatialDropout.

    Args:
        x: channels-first tensor ``(N, C, *spatial)``, any spatial rank.
        drop_prob: fraction of all feature maps dropped, in [0, 1) and ``<= top_rate``; a float or a 0-dim
            tensor (a scheduled value, assumed already validated).
        top_rate: fraction of feature maps that are candidates, in (0, 1].
        training: identity when False.
    """
    _check_input(x, "selectout")
    top_rate = check_top_rate(top_rate)
    drop_prob = check_strength("drop_prob", drop_prob)
    if not isinstance(drop_prob, torch.Tensor):
        _check_drop_le_top(drop_prob, top_rate)
    if passes_through("selectout", x, training, drop_prob):
        return x
    n, c = x.shape[:2]
    k = num_selected(top_rate, c)
    p_candidate = torch.clamp(torch.as_tensor(drop_prob * (c / k), dtype=torch.float32), max=1.0)
    keep = (torch.rand((n, k), device=x.device, dtype=torch.float32) >= p_candidate).float()
    if k == c:
        r = keep
    else:
        r = torch.ones((n, c), device=x.device, dtype=torch.float32)
        r.scatter_(1, top_channels(x, top_rate), keep)
    return _apply_channel_factor(x, r / (1.0 - drop_prob))


def _check_drop_le_top(drop_prob: float, top_rate: float) -> None:
    if drop_prob > top_rate + 1e-9:
        raise ValueError(
            f"selectout: drop_prob ({drop_prob}) must be <= top_rate ({top_rate}); drop_prob is the fraction of "
            f"ALL feature maps dropped (1 - p in Eq. (4)) and they are drawn from the top top_rate fraction"
        )


def _card(summary: str, reported: str, draws: str) -> MethodCard:
    """The SelectScale paper's card for one of its three methods."""
    return MethodCard(
        title="SelectScale: Mining More Patterns from Images via Selective and Soft Dropout",
        authors="Chen et al.",
        year=2020,
        venue="IJCAI",
        url="https://doi.org/10.24963/ijcai.2020/73",
        summary=summary,
        reported=reported,
        draws=draws,
    )


class SpatialScale(Regularizer):
    """SpatialScale (Eq. (5)): each feature map times ``U(1 - q, 1 + q)``; see :func:`spatial_scale`."""

    strength_params = ("q",)
    compare_defaults = compare_values("q")
    card = _card(
        "scales every feature map by a factor drawn from U(1 - q, 1 + q)",
        "WRN-20-4 on CIFAR-100: 22.90% -> 21.40% top-1 error (-1.50 points) (Table 2)",
        draws=(
            "One float32 `Uniform(1 - q, 1 + q)` factor per (sample, channel); no 0/1 mask."
        ),
    )

    def __init__(self, q: float) -> None:
        super().__init__()
        self.q = check_probability("q", q, allow_one=True)

    def is_noop(self) -> bool:
        return self.q == 0.0

    def regularize(self, x: torch.Tensor) -> torch.Tensor:
        return spatial_scale(x, self.effective(self.q).to(x.device), training=True)

    def _settings(self) -> str:
        return f"q={self.q}"


class SelectScale(Regularizer):
    """SelectScale (Eq. (6)): the top ``top_rate`` maps times ``U(1 - q, 1 + q)``; see :func:`select_scale`."""

    strength_params = ("q",)
    compare_defaults = compare_values("top_rate", "q")
    card = _card(
        "scales the top top_rate feature maps (by peak activation) by factors from U(1 - q, 1 + q)",
        "WRN-20-4 on CIFAR-100: 22.90% -> 20.20% top-1 error (-2.70 points) (Table 2)",
        draws=(
            "One float32 `Uniform(1 - q, 1 + q)` factor per (sample, top-scored channel); no 0/1 "
            "mask."
        ),
    )

    def __init__(self, top_rate: float, q: float) -> None:
        super().__init__()
        self.top_rate = check_top_rate(top_rate)
        self.q = check_probability("q", q, allow_one=True)

    def is_noop(self) -> bool:
        return self.q == 0.0

    def regularize(self, x: torch.Tensor) -> torch.Tensor:
        return select_scale(x, self.top_rate, self.effective(self.q).to(x.device), training=True)

    def _settings(self) -> str:
        return f"top_rate={self.top_rate}, q={self.q}"


class Selectout(Regularizer):
    """Selectout (Eq. (4)): drop ``drop_prob`` of all maps from the top ``top_rate``; see :func:`selectout`."""

    strength_params = ("drop_prob",)
    compare_defaults = compare_values("drop_prob", "top_rate")
    card = _card(
        "zeroes drop_prob of all feature maps, drawn from the top top_rate (by peak activation)",
        "no accuracy table; Fig. 3: dropping 6% of a trained network's maps at test time almost disables it, "
        "which is why the paper moves on to SelectScale",
        draws=(
            "One float32 uniform per (sample, top-scored channel) (`torch.rand`), compared with the "
            "drop probability."
        ),
    )

    def __init__(self, drop_prob: float, top_rate: float) -> None:
        super().__init__()
        self.drop_prob = check_probability("drop_prob", drop_prob)
        self.top_rate = check_top_rate(top_rate)
        _check_drop_le_top(self.drop_prob, self.top_rate)

    def is_noop(self) -> bool:
        return self.drop_prob == 0.0

    def regularize(self, x: torch.Tensor) -> torch.Tensor:
        return selectout(x, self.effective(self.drop_prob).to(x.device), self.top_rate, training=True)

    def _settings(self) -> str:
        return f"drop_prob={self.drop_prob}, top_rate={self.top_rate}"


register_regularizer("spatial_scale", SpatialScale)
register_regularizer("selectscale", SelectScale)
register_regularizer("selectout", Selectout)
