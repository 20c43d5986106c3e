"""timm_drop: structured-dropout regularizers placed into any timm model by YAML rules."""

import timm_drop.layerout  # noqa: F401  (registers "layerout")
import timm_drop.models  # noqa: F401  (registers the CIFAR timm models)
from timm_drop.regularizers import (
    Regularizer,
    create_regularizer,
    list_regularizers,
    register_regularizer,
)
from timm_drop.schedules import Schedule, set_progress

__version__ = "0.1.0"

__all__ = [
    "Regularizer",
    "Schedule",
    "create_regularizer",
    "list_regularizers",
    "register_regularizer",
    "set_progress",
]
