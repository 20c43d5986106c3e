"""The regularizer library: one file per method family, each a functional form plus an ``nn.Module``."""

from timm_drop.regularizers import attentiondrop, baselines, corrdrop, dropblock, selectscale  # noqa: F401,E402  (registers)
from timm_drop.regularizers.base import LAYOUTS, ParamError, ParamTypeError, Regularizer
from timm_drop.regularizers.card import MethodCard
from timm_drop.regularizers.figure import FigureTraits
from timm_drop.regularizers.registry import (
    create_regularizer,
    get_regularizer_class,
    list_regularizers,
    register_regularizer,
    regularizer_params,
    strength_params,
)

__all__ = [
    "LAYOUTS",
    "FigureTraits",
    "MethodCard",
    "ParamError",
    "ParamTypeError",
    "Regularizer",
    "create_regularizer",
    "get_regularizer_class",
    "list_regularizers",
    "register_regularizer",
    "regularizer_params",
    "strength_params",
]
