"""What the recipe builds to move the weights: the optimizer (timm's ``create_optimizer_v2``), the LR as a pure
function of the optimizer step, and timm's Mixup/CutMix."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from timm_drop.training.config import ConfigError, TrainConfig

__all__ = ["LRSchedule", "build_mixup", "build_optimizer", "optimizer_groups"]


class LRSchedule:
    """LR as a pure function of the optimizer step: warm-up, then multistep / cosine / constant.

    Milestones and warm-up are in epochs (fractional epochs allowed); a multistep decay takes effect at the first
    step of its milestone epoch, as PyTorch's ``MultiStepLR`` stepped per epoch does.
    """

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int) -> None:
        s, self.epochs = cfg.sched, cfg.train.epochs
        self.kind, self.lr, self.gamma = s.name, cfg.optim.lr, s.gamma
        self.warmup, self.warmup_lr, self.warmup_mode, self.min_lr = (
            s.warmup_epochs,
            s.warmup_lr,
            s.warmup_mode,
            s.min_lr,
        )
        if s.milestones is not None:
            self.milestones = [float(m) for m in s.milestones]
        elif s.milestone_fractions is not None:
            self.milestones = [f * self.epochs for f in s.milestone_fractions]
        else:
            self.milestones = []
        self.steps_per_epoch = steps_per_epoch

    def __call__(self, step: int) -> float:
        e = step / self.steps_per_epoch
        if e < self.warmup:
            if self.warmup_mode == "constant":
                return self.warmup_lr
            return self.warmup_lr + (self.lr - self.warmup_lr) * e / self.warmup
        if self.kind == "multistep":
            return self.lr * self.gamma ** sum(e >= m - 1e-9 for m in self.milestones)
        if self.kind == "cosine":
            t = min(1.0, (e - self.warmup) / max(1e-12, self.epochs - self.warmup))
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * t))
        return self.lr

    def apply(self, optimizer, step: int) -> float:
        lr = self(step)
        for g in optimizer.param_groups:
            # layer-wise decay groups carry their multiplier (timm's schedulers apply it the same way)
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr



def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``timm.optim.create_optimizer_v2`` from ``cfg.optim``: the model's ``no_weight_decay()`` names are never
    decayed, 1-d params only with ``no_decay_norm_bias``, ``layer_decay`` sets per-group ``lr_scale``."""
    from timm.optim import create_optimizer_v2

    o = cfg.optim
    kwargs: dict[str, Any] = {}
    if o.name.lower() in ("sgd", "momentum"):
        # timm's "sgd" means Nesterov; the recipe keeps its own (documented) switch
        kwargs["nesterov"] = o.nesterov
    if o.betas is not None:
        kwargs["betas"] = tuple(o.betas)
    if o.eps is not None:
        kwargs["eps"] = o.eps
    try:
        return create_optimizer_v2(
            model,
            opt=o.name,
            lr=o.lr,
            weight_decay=o.weight_decay,
            momentum=o.momentum,
            filter_bias_and_bn=o.no_decay_norm_bias,
            layer_decay=o.layer_decay,
            **kwargs,
        )
    except ImportError as e:  # bitsandbytes / apex optimizers need their package
        raise ConfigError(f"optim.name: {o.name!r} needs a package that is not installed: {e}") from e


def optimizer_groups(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[dict[str, Any]]:
    """One summary per param group (size, weight decay, LR scale, first names), for ``--dry-run``."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in optimizer.param_groups:
        params = g["params"]
        out.append(
            {
                "params": len(params),
                "numel": sum(p.numel() for p in params),
                "weight_decay": g.get("weight_decay", 0.0),
                "lr_scale": g.get("lr_scale", 1.0),
                "names": [names.get(id(p), "?") for p in params[:3]] + (["..."] if len(params) > 3 else []),
            }
        )
    return out


def build_mixup(cfg: TrainConfig, num_classes: int):
    """timm's ``Mixup`` (batch mode, on whatever device the batch is) for ``data.augment``, or None when off."""
    a = cfg.data.augment
    if a.mixup <= 0 and a.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=a.mixup,
        cutmix_alpha=a.cutmix,
        prob=a.mix_prob,
        switch_prob=a.mix_switch_prob,
        mode="batch",
        label_smoothing=cfg.train.label_smoothing,
        num_classes=num_classes,
    )

