"""DropBlock in a detection backbone: a ``features_only`` timm model under a minimal FPN-style head.

The DropBlock paper's detection placement (section 4.3: RetinaNet, ResNet-50 FPN backbone, DropBlock in groups 3
and 4 of the ResNet only, ``specs/dropblock_retinanet_backbone.yaml``) on a backbone built the way detectors and
segmenters build theirs: ``timm.create_model(name, features_only=True, out_indices=(2, 3, 4))`` returns C3, C4,
C5; a feature pyramid (lateral 1x1 convs, top-down upsampling and addition, 3x3 smoothing; Lin et al. 2017) and
a dense head shared across pyramid levels (RetinaNet's classification subnet, shortened) sit on top and get no
regularizer. No detection library: the embedded digits data has image-level labels, so the dense per-location
logits are averaged over locations and levels into one prediction per image.

    python recipes/examples/backbone_fpn.py --steps 200
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_drop
from timm_drop.training.config import DataConfig
from timm_drop.training.data import load_arrays

DEFAULT_SPEC = Path(__file__).resolve().parents[2] / "specs" / "dropblock_retinanet_backbone.yaml"


class TinyFPN(nn.Module):
    """Feature pyramid over the backbone's maps plus a dense class head shared by every level."""

    def __init__(self, in_channels: list[int], width: int, num_classes: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in in_channels)
        self.head = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),  # "batch normalization layers were applied after all convolution layers"
            nn.ReLU(inplace=True),
            nn.Conv2d(width, num_classes, 3, padding=1),
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        maps = [lateral(f) for lateral, f in zip(self.lateral, features)]
        for i in range(len(maps) - 2, -1, -1):  # top-down: coarse levels refine the finer ones
            maps[i] = maps[i] + F.interpolate(maps[i + 1], size=maps[i].shape[-2:], mode="nearest")
        pyramid = [smooth(m) for smooth, m in zip(self.smooth, maps)]
        return torch.stack([self.head(p).mean((2, 3)) for p in pyramid]).mean(0)


@dataclass
class Result:
    regularizers: int
    first_loss: float
    last_loss: float
    accuracy: float
    backbone: nn.Module


def _tensors(train: bool, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_arrays(DataConfig(dataset="digits", image_size=image_size), train=train)
    x = torch.from_numpy(data.x).permute(0, 3, 1, 2).float().div(255.0)
    return (x - 0.5) / 0.5, torch.from_numpy(data.y)


def run(
    model: str = "resnet18",
    spec: str | Path = DEFAULT_SPEC,
    steps: int = 200,
    batch_size: int = 64,
    image_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
) -> Result:
    torch.manual_seed(seed)
    backbone = timm.create_model(model, pretrained=False, features_only=True, out_indices=(2, 3, 4))
    timm_drop.apply_regularizer(backbone, spec)
    n_regs = sum(isinstance(m, timm_drop.Regularizer) for m in backbone.modules())
    neck = TinyFPN(backbone.feature_info.channels(), width=64, num_classes=10)
    params = list(backbone.parameters()) + list(neck.parameters())
    # RetinaNet's optimiser (section 4.3): SGD, momentum 0.9, weight decay 1e-4
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    x, y = _tensors(True, image_size)
    g = torch.Generator().manual_seed(seed)
    losses = []
    backbone.train(), neck.train()
    for step in range(steps):
        timm_drop.set_progress(backbone, step / max(1, steps - 1))  # the linear DropBlock schedule
        idx = torch.randint(len(x), (batch_size,), generator=g)
        loss = F.cross_entropy(neck(backbone(x[idx])), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    backbone.eval(), neck.eval()
    xt, yt = _tensors(False, image_size)
    with torch.no_grad():
        accuracy = float((neck(backbone(xt)).argmax(1) == yt).float().mean())
    return Result(n_regs, losses[0], losses[-1], accuracy, backbone)


def main(argv: list[str] | None = None) -> Result:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", help="timm architecture for the features_only backbone")
    p.add_argument("--spec", default=str(DEFAULT_SPEC))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    r = run(a.model, a.spec, a.steps, a.batch_size, a.image_size, a.lr, a.seed)
    print(
        f"{a.model} backbone, {r.regularizers} DropBlock(s); loss {r.first_loss:.3f} -> {r.last_loss:.3f}; "
        f"test accuracy {r.accuracy:.2%}"
    )
    return r


if __name__ == "__main__":
    main()
