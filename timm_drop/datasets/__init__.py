"""Image data that needs nothing from the rest of timm_drop: the arrays type and the embedded digits set.

Both the recipes (:mod:`timm_drop.training.datasets`) and the mask figures (:mod:`timm_drop.viz`) read from here.
"""

from timm_drop.datasets.arrays import ArrayData
from timm_drop.datasets.digits import digits_split

__all__ = ["ArrayData", "digits_split"]
