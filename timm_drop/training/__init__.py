"""Accelerate training recipes for timm models with timm_drop regularizers (``recipes/train.py`` is a thin CLI).

``load_config`` -> :class:`TrainConfig` (validated), ``Trainer(cfg).fit()`` / :func:`train` runs it.
"""

from timm_drop.training.config import ConfigError, TrainConfig, load_config, parse_overrides, save_config
from timm_drop.training.loop import LRSchedule, NonFiniteLossError, Trainer, train

__all__ = [
    "ConfigError",
    "LRSchedule",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "load_config",
    "parse_overrides",
    "save_config",
    "train",
]
