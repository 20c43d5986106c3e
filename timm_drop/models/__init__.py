"""Model definitions registered in timm's registry on import (``timm.create_model("resnet110_cifar")``)."""

from timm_drop.models.cifar import (
    BasicBlock,
    CifarResNet,
    PadShortcut,
    PreActBlock,
    VGGCifar,
    WideResNet,
)

__all__ = ["BasicBlock", "CifarResNet", "PadShortcut", "PreActBlock", "VGGCifar", "WideResNet"]
