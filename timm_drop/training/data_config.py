"""The input pipeline a pretrained model expects: mean/std, interpolation and crop from its ``pretrained_cfg``.

Fine-tuning a pretrained timm backbone with the dataset's own statistics (or ImageNet's, for a model trained with
mean/std 0.5 and bicubic resizing like ``vit_base_patch16_224``) silently costs accuracy. With
``model.pretrained: true`` the recipe reads them from the model through ``timm.data.resolve_data_config`` and uses
them wherever the config leaves ``data.mean`` / ``data.std`` / ``data.interpolation`` / ``data.crop_pct`` null;
without it, the dataset's statistics stay (a model trained from scratch has no preference).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from timm_drop.training.config import DataConfig, ModelConfig, TrainConfig

__all__ = ["format_data_config", "is_pretrained", "model_create_kwargs", "model_data_config", "resolve_data"]

#: the keys taken from the model (``input_size`` is not: ``data.image_size`` decides)
MODEL_KEYS = ("mean", "std", "interpolation", "crop_pct")


def model_create_kwargs(model: ModelConfig) -> dict[str, Any]:
    """``timm.create_model`` kwargs for the config: ``pretrained`` and a local ``checkpoint_path`` go through timm's
    pretrained loader (``pretrained_cfg_overlay=dict(file=...)``), which adapts the classifier to ``num_classes``."""
    kwargs = dict(model.kwargs)
    kwargs["pretrained"] = is_pretrained(model)
    if model.checkpoint_path is not None:
        kwargs["pretrained_cfg_overlay"] = {
            **kwargs.get("pretrained_cfg_overlay", {}),
            "file": str(model.checkpoint_path),
        }
    return kwargs


def is_pretrained(model: ModelConfig) -> bool:
    """``model.pretrained``, or the older spelling ``model.kwargs.pretrained``."""
    return bool(model.pretrained or model.kwargs.get("pretrained", False))


def model_data_config(model: ModelConfig | torch.nn.Module) -> dict[str, Any]:
    """``timm.data.resolve_data_config`` of the configured model (or of a built one).

    A config is resolved on an empty model built on the ``meta`` device with ``pretrained=False``: its
    ``pretrained_cfg`` (with any overlay) is all that is read, so no weights are allocated or downloaded.
    """
    import timm
    from timm.data import resolve_data_config

    if not isinstance(model, torch.nn.Module):
        kwargs = model_create_kwargs(model)
        kwargs["pretrained"] = False
        try:
            with torch.device("meta"):
                model = timm.create_model(model.name, **kwargs)
        except (NotImplementedError, RuntimeError):  # a model whose init needs real storage
            model = timm.create_model(model.name, **kwargs)
    return dict(resolve_data_config(model=model))


def resolve_data(cfg: TrainConfig) -> tuple[DataConfig, dict[str, Any]]:
    """The data config the loaders use, and where each value came from (``data_config`` for the logs).

    Config values win; with ``model.pretrained`` the null ones come from the model; the rest stays null for the
    loaders' dataset defaults (the training split's statistics, bilinear resizing, crop 0.875).
    """
    data = copy.deepcopy(cfg.data)
    source = {k: "config" if getattr(data, k) is not None else "dataset" for k in MODEL_KEYS}
    if is_pretrained(cfg.model):
        resolved = model_data_config(cfg.model)
        for k in MODEL_KEYS:
            if getattr(data, k) is None and resolved.get(k) is not None:
                v = resolved[k]
                setattr(data, k, [float(x) for x in v] if k in ("mean", "std") else v)
                source[k] = "model"
    info = {k: (tuple(v) if isinstance(v, list) else v) for k in MODEL_KEYS for v in [getattr(data, k)]}
    info["source"] = source
    return data, info


def format_data_config(info: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, (tuple, list)):
            return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"
        return "dataset default" if v is None else str(v)

    parts = [f"{k}={fmt(info[k])}" for k in MODEL_KEYS]
    src = info["source"]
    origins = sorted(set(src.values()))
    return (
        "data config: "
        + ", ".join(parts)
        + " (from "
        + ", ".join(f"{o}: {'/'.join(k for k in MODEL_KEYS if src[k] == o)}" for o in origins)
        + ")"
    )
