"""CIFAR architectures of the seed papers, registered in timm's model registry.

``timm.create_model("resnet110_cifar", num_classes=100)`` builds them like any timm model: ``forward_features``,
``forward_head(x, pre_logits=False)``, ``reset_classifier``, ``get_classifier``, ``feature_info``,
``pretrained_cfg`` (``input_size=(3, 32, 32)``), ``drop_rate`` and ``drop_path_rate``. No pretrained weights ship
with them: ``pretrained=True`` raises, unless the caller names weights of their own as timm's convention has it
(``pretrained_cfg_overlay=dict(file=PATH)``, a ``local-dir:`` folder written by ``save_for_hf``), which timm's
loader then reads, adapting the classifier to ``num_classes``.

* ``resnet{20,32,44,56,110}_cifar``: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition"
  (CVPR 2016) section 4.2: a 3x3 conv stem with 16 filters, three stages of ``n`` BasicBlocks on 32/16/8 maps
  with 16/32/64 filters (depth ``6n + 2``), global average pooling and a linear classifier. Shortcuts use
  **option A** by default, as the paper does on CIFAR ("we use identity shortcuts in all cases (option A)"),
  which gives the paper's parameter counts (ResNet-20 0.27M, ResNet-110 1.7M): the shortcut subsamples with
  stride 2 and appends zero channels (the paper does not say where the zeros go; they are appended after the
  identity channels). ``shortcut="B"`` uses 1x1 conv + BN projections instead. Post-activation blocks
  (conv-BN-ReLU-conv-BN, add, ReLU).
* ``resnet18_cifar``: the ResNet-18 used by the AttentionDrop/CorrDrop CIFAR experiments: ImageNet ResNet-18
  stages (2, 2, 2, 2 BasicBlocks, 64-512 filters, option-B projections) with a 3x3 stride-1 stem and no max-pool,
  so the stages run at 32/16/8/4.
* ``wrn{28_10,20_4,20_8}_cifar``: Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016): pre-activation
  blocks (BN-ReLU-conv3x3-[dropout]-BN-ReLU-conv3x3), widths 16k/32k/64k after a 16-filter stem, 1x1 conv
  shortcuts where the shape changes (applied to the pre-activated input, as the paper's code does), a final
  BN-ReLU before pooling. WRN-d-k has ``(d - 4) / 6`` blocks per stage (WRN-28-10: 4, 36.5M parameters).
  WRN-20-k is not a WRN-paper depth; it follows SelectScale (Chen et al., IJCAI 2020, section 3.1: "WRN-20-4
  represents the network with four times more filters in each layer than ResNet-20"): ResNet-20's 3 blocks per
  stage, widened by k. The paper's in-block dropout is ``block_drop_rate`` (0 by default; 0.3 in the WRN paper).
* ``vgg16_bn_cifar``: Simonyan & Zisserman configuration D (13 3x3 convs in groups 2-2-3-3-3, each followed by
  BN and ReLU; a 2x2 max-pool after each group) with the classifier adapted to 32x32 inputs as in the LayerOut
  paper (section 5.2: the first fully connected layer's 7x7 conv becomes 1x1): after the fifth pool the map is
  1x1, and fc1 (512 -> 4096) and fc2 (4096 -> 4096) are 1x1 convs with ReLU and dropout (``drop_rate``, 0.5 as in
  VGG), then a linear classifier: 33.6M parameters for 10 classes, the paper's "about 33.64 million".
  ``forward_features`` returns the fifth group's 2x2 map (the last ``feature_info`` entry); the fifth pool is the
  first op of the head.

Stages are ``layer1``..``layer3`` (``layer4`` for ResNet-18, ``layer5`` for VGG), blocks ``layerN.M``.
``feature_info`` lists the stem first (``act1`` for the post-activation ResNets, ``conv1`` for the pre-activation
WRNs) and then one entry per stage. VGG has no stem; like timm's own ``vgg16_bn`` its entries are the five groups.
``drop_path_rate`` scales linearly with the block index (timm convention); DropPath sits on the residual branch
before the add. Init: He (Kaiming) normal, fan-out, for convs; BN weight 1, bias 0; the last BN of a residual
branch is zero-initialised only with ``zero_init_last=True`` (timm's habit, not the papers').
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, create_classifier
from timm.models import (
    build_model_with_cfg,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
    resolve_pretrained_cfg,
)
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "PadShortcut", "PreActBlock", "VGGCifar", "WideResNet"]

#: CIFAR-10 training-set channel statistics (the recipe's data pipeline normalises with these too)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _init_weights(model: nn.Module, zero_init_last: bool = False) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    if zero_init_last:
        for m in model.modules():
            if hasattr(m, "zero_init_last"):
                m.zero_init_last()


def _dpr(drop_path_rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Per-block drop-path rates, linear in the global block index (timm's ``calculate_drop_path_rates``)."""
    total = sum(depths)
    rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(rates[start : start + d])
        start += d
    return out


class PadShortcut(nn.Module):
    """He et al. option A shortcut: identity with stride-``s`` subsampling and zero channels appended."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        if out_chs < in_chs:
            raise ValueError(f"PadShortcut cannot reduce channels ({in_chs} -> {out_chs})")
        self.in_chs, self.out_chs, self.stride = in_chs, out_chs, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_chs - self.in_chs))

    def extra_repr(self) -> str:
        return f"{self.in_chs}, {self.out_chs}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Post-activation residual block (He et al. 2016): conv3x3-BN-ReLU-conv3x3-BN (+ shortcut), ReLU."""

    def __init__(
        self, in_chs: int, out_chs: int, stride: int = 1, shortcut: str = "A", drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            if shortcut == "A":
                self.downsample = PadShortcut(in_chs, out_chs, stride)
            else:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs)
                )

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(self.drop_path(x) + shortcut)


class PreActBlock(nn.Module):
    """Wide-ResNet pre-activation block: BN-ReLU-conv3x3-[dropout]-BN-ReLU-conv3x3 (+ shortcut)."""

    def __init__(
        self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0.0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.downsample = (
            nn.Conv2d(in_chs, out_chs, 1, stride, bias=False) if stride != 1 or in_chs != out_chs else None
        )

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the projection reads the pre-activated input (WRN reference code); identity reads the raw input
        preact = self.act1(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(preact)
        x = self.conv1(preact)
        x = self.conv2(self.drop(self.act2(self.bn2(x))))
        return self.drop_path(x) + shortcut


class _CifarNet(nn.Module):
    """timm model API shared by the CIFAR classifiers (pool + ``fc`` head)."""

    num_features: int
    fc: nn.Module
    global_pool: nn.Module

    def _init_head(self, num_classes: int, global_pool: str, drop_rate: float) -> None:
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.head_hidden_size = self.num_features
        self.grad_checkpointing = False
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^conv1|^bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        pool = self.global_pool.pool_type if global_pool is None else global_pool
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def _stages(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages_list:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
        return x

    @property
    def stages_list(self) -> list[nn.Module]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class CifarResNet(_CifarNet):
    """He et al. (2016) post-activation ResNet for 32x32 inputs (3x3 stride-1 stem, no max-pool)."""

    def __init__(
        self,
        layers: Sequence[int] = (3, 3, 3),
        channels: Sequence[int] = (16, 32, 64),
        stem_chs: int = 16,
        shortcut: str = "A",
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = False,
    ) -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(
                f"shortcut must be 'A' (zero-padding identity) or 'B' (projection), got {shortcut!r}"
            )
        if len(layers) != len(channels):
            raise ValueError(
                f"layers {tuple(layers)} and channels {tuple(channels)} must have the same length"
            )
        self.num_stages = len(layers)
        self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=stem_chs, reduction=1, module="act1")]
        prev, reduction = stem_chs, 1
        for i, (depth, chs, rates) in enumerate(zip(layers, channels, _dpr(drop_path_rate, layers))):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [
                BasicBlock(prev if j == 0 else chs, chs, stride if j == 0 else 1, shortcut, rates[j])
                for j in range(depth)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=chs, reduction=reduction, module=f"layer{i + 1}"))
            prev = chs
        self.num_features = prev
        self._init_head(num_classes, global_pool, drop_rate)
        _init_weights(self, zero_init_last)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._stages(self.act1(self.bn1(self.conv1(x))))


def wrn_blocks_per_stage(depth: int) -> int:
    """Blocks per stage of WRN-``depth``: ``(depth - 4) / 6`` (WRN paper); depth 20 is ResNet-20's 3 (SelectScale)."""
    if (depth - 4) % 6 == 0 and depth > 4:
        return (depth - 4) // 6
    if (depth - 2) % 6 == 0 and depth > 2:
        return (depth - 2) // 6
    raise ValueError(f"WRN depth must be 6n + 4 (WRN paper) or 6n + 2 (ResNet template), got {depth}")


class WideResNet(_CifarNet):
    """Zagoruyko & Komodakis (2016) pre-activation wide ResNet for 32x32 inputs."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        block_drop_rate: float = 0.0,
        zero_init_last: bool = False,
    ) -> None:
        super().__init__()
        n = wrn_blocks_per_stage(depth)
        self.depth, self.widen_factor, self.num_stages = depth, widen_factor, 3
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.feature_info = [dict(num_chs=16, reduction=1, module="conv1")]
        prev, reduction = 16, 1
        for i, (chs, rates) in enumerate(zip(widths, _dpr(drop_path_rate, [n] * 3))):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [
                PreActBlock(prev if j == 0 else chs, chs, stride if j == 0 else 1, block_drop_rate, rates[j])
                for j in range(n)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=chs, reduction=reduction, module=f"layer{i + 1}"))
            prev = chs
        self.bn = nn.BatchNorm2d(prev)
        self.act = nn.ReLU(inplace=True)
        self.num_features = prev
        self._init_head(num_classes, global_pool, drop_rate)
        _init_weights(self, zero_init_last)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^conv1",
            blocks=[(r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)", None), (r"^bn", (99999,))],
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self._stages(self.conv1(x))))


def _conv_bn_act(in_chs: int, out_chs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, 3, 1, 1, bias=False), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True)
    )


class VGGCifar(_CifarNet):
    """VGG with BatchNorm for 32x32 inputs; fc1/fc2 as 1x1 convs on the 1x1 map (LayerOut paper section 5.2)."""

    def __init__(
        self,
        groups: Sequence[Sequence[int]] = (
            (64, 64),
            (128, 128),
            (256, 256, 256),
            (512, 512, 512),
            (512, 512, 512),
        ),
        mlp_chs: int = 4096,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.5,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if drop_path_rate:
            raise ValueError(
                f"vgg16_bn_cifar has no residual branches; drop_path_rate must be 0, got {drop_path_rate}"
            )
        self.num_stages = len(groups)
        self.feature_info = []
        prev, reduction = in_chans, 1
        for i, group in enumerate(groups):
            mods: list[nn.Module] = [nn.MaxPool2d(2, 2)] if i > 0 else []
            reduction *= 2 if i > 0 else 1
            for chs in group:
                mods.append(_conv_bn_act(prev, chs))
                prev = chs
            self.add_module(f"layer{i + 1}", nn.Sequential(*mods))
            self.feature_info.append(dict(num_chs=prev, reduction=reduction, module=f"layer{i + 1}"))
        self.num_features = prev
        self.pool = nn.MaxPool2d(2, 2)
        # fc1/fc2 of VGG as 1x1 convs, so a 1x1 map (32x32 input) or a larger one both work
        self.pre_logits = nn.Sequential(
            nn.Conv2d(prev, mlp_chs, 1),
            nn.ReLU(inplace=True),
            nn.Dropout(drop_rate),
            nn.Conv2d(mlp_chs, mlp_chs, 1),
            nn.ReLU(inplace=True),
            nn.Dropout(drop_rate),
        )
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.head_hidden_size = mlp_chs
        self.global_pool, self.fc = create_classifier(mlp_chs, num_classes, pool_type=global_pool)
        _init_weights(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^layer1\.0",
            blocks=[(r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)", None), (r"^pre_logits", (99999,))],
        )

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        pool = self.global_pool.pool_type if global_pool is None else global_pool
        self.global_pool, self.fc = create_classifier(self.head_hidden_size, num_classes, pool_type=pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(self.pre_logits(self.pool(x)))
        return x if pre_logits else self.fc(x)


# --------------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------------
def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "resnet20_cifar": _cfg(paper_ids="arXiv:1512.03385"),
        "resnet32_cifar": _cfg(paper_ids="arXiv:1512.03385"),
        "resnet44_cifar": _cfg(paper_ids="arXiv:1512.03385"),
        "resnet56_cifar": _cfg(paper_ids="arXiv:1512.03385"),
        "resnet110_cifar": _cfg(paper_ids="arXiv:1512.03385"),
        "resnet18_cifar": _cfg(pool_size=(4, 4), paper_ids="arXiv:1512.03385"),
        "wrn28_10_cifar": _cfg(paper_ids="arXiv:1605.07146"),
        "wrn20_4_cifar": _cfg(paper_ids="arXiv:1605.07146"),
        "wrn20_8_cifar": _cfg(paper_ids="arXiv:1605.07146"),
        "vgg16_bn_cifar": _cfg(pool_size=(1, 1), first_conv="layer1.0.0", paper_ids="arXiv:1409.1556"),
    }
)


def _weights_given(variant: str, kwargs: dict[str, Any]) -> bool:
    """Whether the caller named weights of their own: a ``file`` (a checkpoint, or a ``local-dir:`` folder),
    a ``state_dict``, a Hub id or a URL in ``pretrained_cfg`` / ``pretrained_cfg_overlay``."""
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay")
    )
    return bool(cfg.file or cfg.state_dict is not None or cfg.hf_hub_id or cfg.url)


def _create(cls: type[nn.Module], variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    if pretrained and not _weights_given(variant, kwargs):
        raise ValueError(
            f"{variant}: timm_drop ships no pretrained weights for its CIFAR models; use pretrained=False, or name "
            "your own checkpoint as for any timm model: pretrained=True, pretrained_cfg_overlay=dict(file=PATH)"
        )
    # every feature_info entry (stem + stages) is a features_only output by default
    num_stages = len(kwargs.get("layers", kwargs.get("groups", (0, 0, 0))))
    num_feats = num_stages if cls is VGGCifar else num_stages + 1
    out_indices = kwargs.pop("out_indices", tuple(range(num_feats)))
    # with weights of the caller's own, timm's loader reads them (adapting the classifier and first conv as usual)
    return build_model_with_cfg(
        cls, variant, pretrained=pretrained, feature_cfg=dict(out_indices=out_indices), **kwargs
    )


def _resnet_cifar(variant: str, depth: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    n = (depth - 2) // 6
    return _create(CifarResNet, variant, pretrained, layers=(n, n, n), **kwargs)


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (He et al. 2016, section 4.2; 0.27M parameters)."""
    return _resnet_cifar("resnet20_cifar", 20, pretrained, **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (He et al. 2016, section 4.2; 0.46M parameters)."""
    return _resnet_cifar("resnet32_cifar", 32, pretrained, **kwargs)


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-44 for CIFAR (He et al. 2016, section 4.2; 0.66M parameters)."""
    return _resnet_cifar("resnet44_cifar", 44, pretrained, **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR (He et al. 2016, section 4.2; 0.85M parameters)."""
    return _resnet_cifar("resnet56_cifar", 56, pretrained, **kwargs)


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110 for CIFAR (He et al. 2016, section 4.2; 1.7M parameters)."""
    return _resnet_cifar("resnet110_cifar", 110, pretrained, **kwargs)


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool (11.2M parameters)."""
    args = dict(layers=(2, 2, 2, 2), channels=(64, 128, 256, 512), stem_chs=64, shortcut="B")
    return _create(CifarResNet, "resnet18_cifar", pretrained, **{**args, **kwargs})


@register_model
def wrn28_10_cifar(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-28-10 (Zagoruyko & Komodakis 2016; 36.5M parameters)."""
    return _create(WideResNet, "wrn28_10_cifar", pretrained, **{"depth": 28, "widen_factor": 10, **kwargs})


@register_model
def wrn20_4_cifar(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-20-4 as in SelectScale: ResNet-20 (3 blocks per stage) widened 4x, pre-activation blocks."""
    return _create(WideResNet, "wrn20_4_cifar", pretrained, **{"depth": 20, "widen_factor": 4, **kwargs})


@register_model
def wrn20_8_cifar(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-20-8 as in SelectScale: ResNet-20 (3 blocks per stage) widened 8x, pre-activation blocks."""
    return _create(WideResNet, "wrn20_8_cifar", pretrained, **{"depth": 20, "widen_factor": 8, **kwargs})


@register_model
def vgg16_bn_cifar(pretrained: bool = False, **kwargs: Any) -> VGGCifar:
    """VGG-16 with BN for 32x32 (configuration D; fc layers as in the LayerOut paper; 33.6M parameters)."""
    groups = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
    return _create(VGGCifar, "vgg16_bn_cifar", pretrained, **{"groups": groups, **kwargs})
