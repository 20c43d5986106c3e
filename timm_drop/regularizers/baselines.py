"""The unstructured and coarse baselines the structured methods are compared against.

* ``dropout`` — Srivastava et al., "Dropout: a simple way to prevent neural networks from overfitting",
  JMLR 2014: every unit is dropped independently with probability ``p``; kept units are scaled by
  ``1 / (1 - p)`` ("inverted dropout", so inference is the identity). The DropBlock paper's Table 1 baseline
  (``keep_prob = 0.7`` on ResNet-50's convolution branches).
* ``spatial_dropout`` — Tompson et al., "Efficient object localization using convolutional networks",
  CVPR 2015: one Bernoulli draw per (sample, channel), shared by all spatial positions, because neighbouring
  activations are strongly correlated and per-unit dropout barely removes information. Works on any spatial
  rank; token sites (``NLC``) are adapted by the base class to ``(N, C, L, 1)``, so a channel is dropped for
  all tokens of a sample. DropBlock Table 1: ``keep_prob = 0.9``.
* ``droppath`` — Stochastic depth (Huang et al., ECCV 2016) / DropPath (Larsson et al., FractalNet, ICLR
  2017): the whole residual branch of a sample is dropped with probability ``p`` and kept samples are scaled
  by ``1 / (1 - p)``; placed on ``residual`` sites (before the skip add). Any shape, any layout.

All three: masks from ``bernoulli_`` (float32 threshold, 0/1 result stored in the input dtype, so bf16/fp16
are unbiased), the ``1 / (1 - p)`` rescale is a float32 0-dim tensor applied in the multiply's float32
compute type, and ``drop_prob`` may be a 0-dim tensor (the schedule strength times the configured rate):
it is never turned into a Python number in ``forward``, so moving a schedule neither syncs nor recompiles.
A (scheduled) probability of exactly 1 drops everything and returns zeros, not NaN.
"""

from __future__ import annotations

import torch

from timm_drop.regularizers.base import (
    Regularizer,
    check_float_input,
    check_probability,
    check_strength,
    passes_through,
)
from timm_drop.regularizers.card import MethodCard
from timm_drop.regularizers.figure import compare_values
from timm_drop.regularizers.registry import register_regularizer

__all__ = ["DropPath", "Dropout", "SpatialDropout", "drop_path", "dropout", "spatial_dropout"]


def _keep_prob(drop_prob: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(drop_prob, torch.Tensor):
        p = drop_prob.to(device=device, dtype=torch.float32)
    else:
        p = torch.full((), drop_prob, dtype=torch.float32, device=device)
    # The floor keeps 1/keep finite when a tensor probability reaches 1 (then every unit is dropped anyway).
    return (1.0 - p).clamp(1e-6, 1.0)


def _masked(x: torch.Tensor, drop_prob: float | torch.Tensor, mask_shape: tuple[int, ...]) -> torch.Tensor:
    keep = _keep_prob(drop_prob, x.device)
    # Drawn in the logical (contiguous) shape, not x's memory order, so a channels-last or NHWC-layout input
    # gets the same mask as its NCHW twin under the same seed.
    mask = x.new_empty(mask_shape)
    mask.bernoulli_(keep)
    return torch.mul(x, mask).mul_(1.0 / keep)


def dropout(x: torch.Tensor, drop_prob: float | torch.Tensor, training: bool = True) -> torch.Tensor:
    """Elementwise inverted dropout: drop each unit with ``drop_prob``, scale kept units by ``1/(1-p)``."""
    drop_prob = check_strength("drop_prob", drop_prob)
    if passes_through("dropout", x, training, drop_prob):
        return x
    return _masked(x, drop_prob, tuple(x.shape))


def spatial_dropout(x: torch.Tensor, drop_prob: float | torch.Tensor, training: bool = True) -> torch.Tensor:
    """SpatialDropout on ``(N, C, *spatial)``: one draw per (sample, channel), kept channels ``x 1/(1-p)``."""
    drop_prob = check_strength("drop_prob", drop_prob)
    if passes_through("spatial_dropout", x, training, drop_prob):
        return x
    if x.dim() < 2:
        raise ValueError(f"spatial_dropout expects (N, C, *spatial) input, got shape {tuple(x.shape)}")
    return _masked(x, drop_prob, tuple(x.shape[:2]) + (1,) * (x.dim() - 2))


def drop_path(x: torch.Tensor, drop_prob: float | torch.Tensor, training: bool = True) -> torch.Tensor:
    """DropPath / stochastic depth: drop the whole tensor of a sample (dim 0), kept samples ``x 1/(1-p)``."""
    drop_prob = check_strength("drop_prob", drop_prob)
    if passes_through("droppath", x, training, drop_prob):
        return x
    if x.dim() < 1:
        raise ValueError("drop_path expects a batched input with the sample on dim 0, got a 0-dim tensor")
    return _masked(x, drop_prob, (x.shape[0],) + (1,) * (x.dim() - 1))


class _ProbRegularizer(Regularizer):
    """A regularizer configured by one ``drop_prob``; subclasses name the functional form."""

    strength_params = ("drop_prob",)
    compare_defaults = compare_values("drop_prob")

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = check_probability("drop_prob", drop_prob)

    def is_noop(self) -> bool:
        return self.drop_prob == 0.0

    def _settings(self) -> str:
        return f"drop_prob={self.drop_prob}"


@register_regularizer("dropout")
class Dropout(_ProbRegularizer):
    """Elementwise dropout (Srivastava et al. 2014) with the schedule-aware ``drop_prob``; any layout."""

    card = MethodCard(
        title="Dropout: A Simple Way to Prevent Neural Networks from Overfitting",
        authors="Srivastava et al.",
        year=2014,
        venue="JMLR",
        url="https://jmlr.org/papers/v15/srivastava14a.html",
        summary="zeroes single units with probability drop_prob",
        reported="a baseline here; in CorrDrop's Table 1, ResNet-20 on CIFAR-10: 91.79% -> 92.20% (p = 0.15)",
        draws=(
            "`bernoulli_` per unit (float32 uniform and threshold; the 0/1 result stored in the input "
            "dtype)."
        ),
    )

    def regularize(self, x: torch.Tensor) -> torch.Tensor:
        return _masked(x, self.effective(self.drop_prob), tuple(x.shape))


@register_regularizer("spatial_dropout")
class SpatialDropout(_ProbRegularizer):
    """SpatialDropout (Tompson et al. 2015): whole channels per sample; maps and tokens."""

    card = MethodCard(
        title="Efficient Object Localization Using Convolutional Networks",
        authors="Tompson et al.",
        year=2015,
        venue="CVPR",
        url="https://arxiv.org/abs/1411.4280",
        summary="zeroes whole feature maps (channels) of a sample with probability drop_prob",
        reported="a baseline here; in SelectScale's Table 2, WRN-20-4 on CIFAR-100: 22.90% -> 21.24% error",
        draws=(
            "`bernoulli_` per (sample, channel), shared by every position of the map."
        ),
    )

    def regularize(self, x: torch.Tensor) -> torch.Tensor:
        return spatial_dropout(x, self.effective(self.drop_prob))


@register_regularizer("droppath")
class DropPath(_ProbRegularizer):
    """DropPath / stochastic depth: whole samples of a residual branch; any shape and layout."""

    card = MethodCard(
        title="Deep Networks with Stochastic Depth",
        authors="Huang et al.",
        year=2016,
        venue="ECCV",
        url="https://arxiv.org/abs/1603.09382",
        summary="drops a residual branch for whole samples, as stochastic depth does",
        reported="a baseline here; as LayerOut's Table 6 quotes it, ResNet-110 on CIFAR-10: 93.20% -> 94.75%",
        draws=(
            "`bernoulli_` per sample: the whole branch is kept or dropped."
        ),
    )

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Per-sample masks do not care about the layout, so skip the base class's permutes.
        check_float_input(self.display_name, x)
        if self.is_noop() or x.numel() == 0:
            return x
        return drop_path(x, self.effective(self.drop_prob))

    def regularize(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.effective(self.drop_prob))
