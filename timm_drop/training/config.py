"""Training-recipe configuration: one YAML file, ``key=value`` overrides, validation before any work starts.

A config is a tree of small dataclasses (:class:`TrainConfig` at the root). Loading goes

    YAML file -> dict -> dotted ``key=value`` overrides -> typed, validated dataclasses

and every error names the dotted key at fault (``train.precision: must be one of ['no', 'bf16', 'fp16']``).
The resolved config (with the regularizer spec inlined) is what :func:`save_config` writes next to the run's
outputs, so ``--config <run>/config.yaml`` reproduces the run.

Choices where timm's ``train.py`` differs:

* ``data.batch_size`` is per process (Accelerate's convention); the global batch is
  ``batch_size * num_processes * grad_accum_steps``. The learning rate is used as given (no implicit scaling).
* LR milestones are given either in epochs (``sched.milestones``) or as fractions of the run
  (``sched.milestone_fractions``: the CorrDrop/AttentionDrop papers' "0.4, 0.6, 0.8 of total epochs"), so a
  shortened run (``train.epochs=10``) keeps the paper's shape.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from timm_drop.yaml_io import YAMLInputError, load_yaml_bounded

__all__ = [
    "ConfigError",
    "TrainConfig",
    "apply_overrides",
    "config_to_dict",
    "load_config",
    "parse_overrides",
    "save_config",
]


class ConfigError(ValueError):
    """A config problem; the message starts with the dotted key at fault."""


# -- schema ------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    #: timm model name (``timm.list_models()``; the CIFAR models register on ``import timm_drop``)
    name: str = "resnet20_cifar"
    #: extra ``timm.create_model`` kwargs (``drop_rate``, ``drop_path_rate``...); ``num_classes`` defaults to the data's
    kwargs: dict = field(default_factory=dict)
    #: load timm's pretrained weights (a download, or ``checkpoint_path``); the data's mean/std/interpolation/crop
    #: then default to the model's ``pretrained_cfg``
    pretrained: bool = False
    #: local weights file for ``pretrained`` (timm's ``pretrained_cfg_overlay=dict(file=...)``); None = download
    checkpoint_path: str | None = None


@dataclass
class AugmentConfig:
    #: zero-padding for the random crop (CIFAR standard: 4); 0 disables the crop
    crop_padding: int = 4
    #: ImageNet-style RandomResizedCrop for folder datasets (replaces the padded crop there)
    random_resized_crop: bool = False
    hflip: bool = True
    #: Cutout (DeVries & Taylor 2017) square side in pixels; 0 = off (their CIFAR-10 value: 16)
    cutout: int = 0
    #: probability of Random Erasing (Zhong et al. 2020) per image; 0 = off (their value: 0.5)
    random_erasing: float = 0.0
    #: Mixup alpha (Zhang et al. 2018) through timm's batch ``Mixup`` on the device; 0 = off (timm's usual: 0.8)
    mixup: float = 0.0
    #: CutMix alpha (Yun et al. 2019), same ``Mixup`` object; 0 = off (timm's usual: 1.0)
    cutmix: float = 0.0
    #: probability of mixing a batch at all (Mixup or CutMix)
    mix_prob: float = 1.0
    #: with both on: probability of CutMix instead of Mixup for a batch
    mix_switch_prob: float = 0.5
    #: timm RandAugment config string (``rand-m9-mstd0.5-inc1``), image folders only (PIL ops in the workers)
    randaugment: str | None = None


@dataclass
class DataConfig:
    dataset: Literal["digits", "cifar10", "cifar100", "imagefolder", "npz"] = "digits"
    #: dataset folder (cifar: the folder holding ``cifar-10-batches-py``; imagefolder: holds train/ and val|test/)
    #: or the ``.npz`` file; relative paths resolve against the working directory
    root: str | None = None
    #: cifar only: let torchvision download + verify the archive (needs a network)
    download: bool = False
    image_size: int = 32
    #: None = from the dataset
    num_classes: int | None = None
    #: per process
    batch_size: int = 128
    eval_batch_size: int = 256
    #: keep the whole (small) dataset on the accelerator and augment there in batches; "auto" = tensor datasets
    device_resident: Literal["auto", True, False] = "auto"
    num_workers: int = 4
    #: use only the first N training / eval images (after a fixed-seed shuffle); None = all
    train_subset: int | None = None
    eval_subset: int | None = None
    #: per-channel normalisation in [0, 1] pixel units; None = the dataset's usual statistics
    mean: list[float] | None = None
    std: list[float] | None = None
    #: resize interpolation; None = the model's with ``model.pretrained``, else bilinear
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    #: imagefolder eval: resize to ``image_size / crop_pct`` then centre-crop; None = the model's with
    #: ``model.pretrained``, else 0.875 with ``random_resized_crop`` (no crop without)
    crop_pct: float | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    #: any ``timm.optim.list_optimizers()`` name (``sgd``, ``adamw``, ``lamb``, ``lion``...), optionally
    #: ``lookahead_<name>``; built by ``timm.optim.create_optimizer_v2``
    name: str = "sgd"
    lr: float = 0.1
    #: momentum-type optimizers only (timm ignores it for the others)
    momentum: float = 0.9
    #: ``sgd``/``momentum`` only; unlike timm's ``sgd`` (Nesterov by default) the recipe's default is plain momentum
    nesterov: bool = False
    weight_decay: float = 5e-4
    #: also exclude biases and norm weights (1-d params) from weight decay (timm's ``filter_bias_and_bn``); the
    #: model's ``no_weight_decay()`` names (``pos_embed``, ``cls_token``...) are always excluded
    no_decay_norm_bias: bool = False
    #: layer-wise LR decay (BEiT/timm ``layer_decay``): layer i of n gets ``lr * layer_decay ** (n - i)``; None = off
    layer_decay: float | None = None
    #: Adam-type optimizers only (ignored by the others); None = the optimizer's default ((0.9, 0.999) for AdamW)
    betas: list[float] | None = None
    #: None = the optimizer's default (1e-8 for AdamW)
    eps: float | None = None


@dataclass
class SchedConfig:
    name: Literal["multistep", "cosine", "constant"] = "multistep"
    #: epochs at which the LR is multiplied by ``gamma``
    milestones: list[int] | None = None
    #: same, as fractions of ``train.epochs`` (exclusive with ``milestones``)
    milestone_fractions: list[float] | None = None
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    #: LR at the start of warm-up
    warmup_lr: float = 0.0
    #: "linear": ramp warmup_lr -> lr; "constant": hold warmup_lr (He et al. 2016's ResNet-110 0.01 start)
    warmup_mode: Literal["linear", "constant"] = "linear"
    #: cosine floor
    min_lr: float = 0.0


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9998
    warmup: bool = False


@dataclass
class TrainSection:
    epochs: int = 200
    grad_accum_steps: int = 1
    label_smoothing: float = 0.0
    precision: Literal["no", "bf16", "fp16"] = "no"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = None
    #: convert BatchNorm to SyncBatchNorm when running on more than one process
    sync_bn: bool = False
    clip_grad_norm: float | None = None
    ema: EmaConfig = field(default_factory=EmaConfig)
    #: force CPU (also makes ``torchrun``/``accelerate launch --multi_gpu`` use gloo on a CPU-only box)
    cpu: bool = False
    #: DDP ``find_unused_parameters`` (needed only for regularizers that skip whole branches per rank)
    find_unused_parameters: bool = False
    eval_every: int = 1


@dataclass
class LogConfig:
    progress_bar: bool = True
    #: optimizer steps between progress-bar loss updates and NaN checks (each one syncs the device)
    log_interval: int = 20
    plot: bool = True
    #: every N epochs draw the regularizers' masks on a fixed eval batch into masks/epoch_NNN.png (0 = never)
    mask_every: int = 0
    #: Accelerate trackers (``tensorboard``, ``wandb``, ``mlflow``, ``comet_ml``, ``aim``, ``clearml``, ``dvclive``...)
    #: fed the same per-epoch scalars as metrics.jsonl; local ones write under ``<output_dir>/trackers/``
    trackers: list[str] = field(default_factory=list)


@dataclass
class CheckpointConfig:
    #: epoch checkpoints kept (oldest deleted first); the best model's weights are kept separately
    total_limit: int = 2
    every: int = 1
    save_best: bool = True


@dataclass
class TrainConfig:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    #: structured-dropout spec: inline mapping (``{rules: [...]}``), a path to a spec YAML, or None
    regularizer: Any = None
    #: LayerOut kwargs (``timm_drop.layerout.LayerOut``) or None
    layerout: dict | None = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    #: free text, kept in the saved config
    description: str = ""


# -- generic typed construction ----------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted for floats. Raises ConfigError naming key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if value == c and type(value) is type(c):
                return value
        raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a list, got {type(value).__name__} ({value!r})")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {type(value).__name__} ({value!r})")
        return copy.deepcopy(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {type(value).__name__} ({value!r})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {type(value).__name__} ({value!r})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {type(value).__name__} ({value!r})")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover - schema bug


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(raw).__name__} ({raw!r})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        import difflib

        k = unknown[0]
        near = difflib.get_close_matches(str(k), names, n=1)
        hint = f"; did you mean {prefix + '.' if prefix else ''}{near[0]}?" if near else ""
        raise ConfigError(f"{prefix + '.' if prefix else ''}{k}: unknown key{hint} (known: {names})")
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], f"{prefix + '.' if prefix else ''}{name}")
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict:
    """The config as plain YAML-able data (dataclasses -> dicts)."""
    return copy.deepcopy(dataclasses.asdict(cfg))


# -- semantic checks ---------------------------------------------------------------------------------------


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: TrainConfig, *, check_paths: bool = True) -> None:
    """Range and consistency checks; every failure names its key. ``check_paths=False`` skips file existence."""
    d, o, s, t = cfg.data, cfg.optim, cfg.sched, cfg.train
    _check(bool(cfg.output_dir), "output_dir", "must not be empty")
    _check(bool(cfg.model.name), "model.name", "must name a timm model")
    _check_model_name(cfg.model.name)
    # numpy's seed range: anything else fails deep inside set_seed, after the run directory exists
    _check(0 <= cfg.seed <= 2**32 - 1, "seed", f"must be in [0, 2**32 - 1], got {cfg.seed}")
    _check(
        "num_classes" not in cfg.model.kwargs or isinstance(cfg.model.kwargs["num_classes"], int),
        "model.kwargs.num_classes",
        "must be an integer",
    )
    _check(d.image_size >= 8, "data.image_size", f"must be >= 8, got {d.image_size}")
    _check(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    _check(d.eval_batch_size >= 1, "data.eval_batch_size", f"must be >= 1, got {d.eval_batch_size}")
    _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _check(
        d.num_classes is None or d.num_classes >= 2, "data.num_classes", f"must be >= 2, got {d.num_classes}"
    )
    for k in ("train_subset", "eval_subset"):
        v = getattr(d, k)
        _check(v is None or v >= 1, f"data.{k}", f"must be >= 1 or null, got {v}")
    for k in ("mean", "std"):
        v = getattr(d, k)
        _check(v is None or len(v) in (1, 3), f"data.{k}", f"must have 1 or 3 values, got {v}")
    _check(d.std is None or all(x > 0 for x in d.std), "data.std", f"must be positive, got {d.std}")
    _check(
        d.crop_pct is None or 0 < d.crop_pct <= 1, "data.crop_pct", f"must be in (0, 1] or null, got {d.crop_pct}"
    )
    m = cfg.model
    if m.checkpoint_path is not None:
        _check(m.pretrained, "model.checkpoint_path", "is the pretrained weights file: set model.pretrained: true")
        if check_paths:
            _check(
                os.path.isfile(m.checkpoint_path),
                "model.checkpoint_path",
                f"does not exist: {m.checkpoint_path!r}",
            )
    if d.dataset in ("imagefolder", "npz"):
        _check(d.root is not None, "data.root", f"is required for dataset {d.dataset!r}")
    if d.dataset == "npz" and d.root is not None:
        _check(
            str(d.root).endswith(".npz"),
            "data.root",
            f"must be an .npz file for dataset 'npz', got {d.root!r}",
        )
    if d.dataset in ("cifar10", "cifar100") and not d.download:
        _check(d.root is not None, "data.root", "is required for CIFAR unless data.download is true")
    if check_paths and d.root is not None and not (d.dataset.startswith("cifar") and d.download):
        _check(os.path.exists(d.root), "data.root", f"does not exist: {d.root!r}")
    a = d.augment
    _check(
        0 <= a.crop_padding <= d.image_size,
        "data.augment.crop_padding",
        f"must be in [0, image_size], got {a.crop_padding}",
    )
    _check(
        0 <= a.cutout <= d.image_size, "data.augment.cutout", f"must be in [0, image_size], got {a.cutout}"
    )
    _check(
        0.0 <= a.random_erasing <= 1.0,
        "data.augment.random_erasing",
        f"must be in [0, 1], got {a.random_erasing}",
    )
    for k in ("mixup", "cutmix"):
        _check(getattr(a, k) >= 0, f"data.augment.{k}", f"must be >= 0 (0 = off), got {getattr(a, k)}")
    for k in ("mix_prob", "mix_switch_prob"):
        v = getattr(a, k)
        _check(0.0 <= v <= 1.0, f"data.augment.{k}", f"must be in [0, 1], got {v}")
    if a.mixup > 0 or a.cutmix > 0:
        _check(
            d.batch_size % 2 == 0,
            "data.batch_size",
            f"must be even with data.augment.mixup/cutmix (timm pairs each image with the batch's mirror), got {d.batch_size}",
        )
    if a.randaugment is not None:
        _check(
            d.dataset == "imagefolder",
            "data.augment.randaugment",
            f"needs dataset imagefolder (PIL ops in the loader workers); tensor datasets ({d.dataset!r}) are "
            "augmented on the device: use mixup/cutmix, cutout or random_erasing there",
        )
        from timm.data.auto_augment import rand_augment_transform

        try:
            rand_augment_transform(a.randaugment, {"translate_const": 100})
        except (AssertionError, ValueError, KeyError, IndexError) as e:
            raise ConfigError(
                f"data.augment.randaugment: {a.randaugment!r} is not a timm RandAugment string "
                f"(e.g. 'rand-m9-mstd0.5-inc1'): {e}"
            ) from e

    _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _check(0.0 <= o.momentum < 1.0, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    info = _check_optimizer_name(o.name)
    _check(
        not o.nesterov or (o.name in ("sgd", "momentum") and o.momentum > 0),
        "optim.nesterov",
        "needs optim.name sgd (or momentum) and momentum > 0",
    )
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(
        o.layer_decay is None or 0 < o.layer_decay <= 1,
        "optim.layer_decay",
        f"must be in (0, 1] or null, got {o.layer_decay}",
    )
    if o.betas is not None and info.has_betas:  # others ignore betas (older saved configs carry them)
        _check(
            len(o.betas) == info.num_betas and all(0 <= b < 1 for b in o.betas),
            "optim.betas",
            f"must be {info.num_betas} values in [0, 1) for {o.name!r}, got {o.betas}",
        )
    _check(o.eps is None or o.eps > 0, "optim.eps", f"must be > 0 or null, got {o.eps}")

    _check(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be >= 1, got {t.grad_accum_steps}")
    _check(
        0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", f"must be in [0, 1), got {t.label_smoothing}"
    )
    _check(
        t.clip_grad_norm is None or t.clip_grad_norm > 0,
        "train.clip_grad_norm",
        f"must be > 0 or null, got {t.clip_grad_norm}",
    )
    _check(0.0 < t.ema.decay < 1.0, "train.ema.decay", f"must be in (0, 1), got {t.ema.decay}")
    _check(t.eval_every >= 1, "train.eval_every", f"must be >= 1, got {t.eval_every}")

    if s.milestones is not None and s.milestone_fractions is not None:
        raise ConfigError(
            "sched.milestones: give either milestones (epochs) or milestone_fractions, not both"
        )
    if s.milestones is not None:
        _check(
            s.milestones == sorted(s.milestones) and all(0 < m <= t.epochs for m in s.milestones),
            "sched.milestones",
            f"must be increasing epochs in (0, train.epochs={t.epochs}], got {s.milestones}",
        )
    if s.milestone_fractions is not None:
        _check(
            s.milestone_fractions == sorted(s.milestone_fractions)
            and all(0 < m < 1 for m in s.milestone_fractions),
            "sched.milestone_fractions",
            f"must be increasing fractions in (0, 1), got {s.milestone_fractions}",
        )
    _check(0.0 < s.gamma <= 1.0, "sched.gamma", f"must be in (0, 1], got {s.gamma}")
    _check(
        0.0 <= s.warmup_epochs < t.epochs,
        "sched.warmup_epochs",
        f"must be in [0, train.epochs), got {s.warmup_epochs}",
    )
    _check(s.warmup_lr >= 0, "sched.warmup_lr", f"must be >= 0, got {s.warmup_lr}")
    _check(0 <= s.min_lr <= o.lr, "sched.min_lr", f"must be in [0, optim.lr], got {s.min_lr}")

    _check(cfg.log.log_interval >= 1, "log.log_interval", f"must be >= 1, got {cfg.log.log_interval}")
    _check_trackers(cfg.log.trackers)
    _check(cfg.log.mask_every >= 0, "log.mask_every", f"must be >= 0 (0 = never), got {cfg.log.mask_every}")
    _check(
        cfg.checkpoint.total_limit >= 1,
        "checkpoint.total_limit",
        f"must be >= 1, got {cfg.checkpoint.total_limit}",
    )
    _check(cfg.checkpoint.every >= 1, "checkpoint.every", f"must be >= 1, got {cfg.checkpoint.every}")

    if cfg.regularizer is not None:
        _check(
            isinstance(cfg.regularizer, (str, dict)),
            "regularizer",
            f"must be a spec mapping, a path to a spec YAML, or null; got {type(cfg.regularizer).__name__}",
        )
    if cfg.layerout is not None:
        _validate_layerout(cfg.layerout)


def _check_model_name(name: str) -> None:
    """The name must be in timm's registry (the CIFAR models register on ``import timm_drop``)."""
    if ":" in name:  # ``hf-hub:...`` / ``local-dir:...``: timm resolves these itself when building
        return
    import timm

    import timm_drop  # noqa: F401

    try:
        import timm_drop.models  # noqa: F401
    except ImportError:  # pragma: no cover
        pass
    if timm.is_model(name):
        return
    import difflib

    near = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else " (see timm.list_models())"
    raise ConfigError(f"model.name: {name!r} is not a timm model{hint}")


def _check_trackers(names: list[str]) -> None:
    """Accelerate's tracker names, each installed (Accelerate itself would only warn and drop a missing one)."""
    import accelerate.utils
    from accelerate.utils import LoggerType

    from timm_drop.suggest import did_you_mean

    known = [t.value for t in LoggerType if t.value != "all"]
    for i, name in enumerate(names):
        key = f"log.trackers[{i}]"
        if name not in known:
            raise ConfigError(f"{key}: {name!r} is not an Accelerate tracker{did_you_mean(name, known)} (known: {known})")
        available = getattr(accelerate.utils, f"is_{name}_available", None)
        _check(
            available is None or available(),
            key,
            f"{name!r} is not installed (pip install {name.replace('_', '-')})",
        )
    _check(len(set(names)) == len(names), "log.trackers", f"lists a tracker twice: {names}")


def _check_optimizer_name(name: str) -> Any:
    """timm's ``OptimInfo`` for ``name`` (``lookahead_`` prefix allowed); an unknown name names the field."""
    import timm.optim

    from timm_drop.suggest import did_you_mean

    known = timm.optim.list_optimizers()
    base = name.lower().removeprefix("lookahead_")
    if base not in known:
        hint = did_you_mean(name, known) or " (see timm.optim.list_optimizers())"
        raise ConfigError(f"optim.name: {name!r} is not a timm optimizer{hint}")
    return timm.optim.get_optimizer_info(base)


def _validate_layerout(section: dict) -> None:
    import inspect

    try:
        from timm_drop.layerout import LayerOut
    except ImportError as e:  # pragma: no cover - LayerOut ships with the package
        raise ConfigError(f"layerout: timm_drop.layerout is not available ({e})") from e
    params = inspect.signature(LayerOut.__init__).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    known = [n for n in params if n != "self"]
    for k in section:
        _check(accepts_any or k in known, f"layerout.{k}", f"unknown LayerOut argument (known: {known})")
    probs = section.get("freeze_probs", "random")
    if not isinstance(probs, str):
        _check(
            isinstance(probs, list)
            and all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1 for p in probs),
            "layerout.freeze_probs",
            f"must be a preset name or a list of probabilities in [0, 1], got {probs!r}",
        )
    try:
        LayerOut(**section)
    except (TypeError, ValueError) as e:
        # LayerOut's messages start with the argument's name: make it the dotted key
        first, _, rest = str(e).partition(" ")
        raise ConfigError(f"layerout.{first}: {rest}" if first in known else f"layerout: {e}") from e


def resolve_regularizer(cfg: TrainConfig, base_dir: str | os.PathLike | None = None) -> None:
    """Load and validate the regularizer spec now (before any work), inlining a spec file's content.

    A relative spec path resolves against the working directory first, then against ``base_dir`` (the config
    file's folder). The resolved config then carries the spec itself, so the saved config is self-contained.
    """
    if cfg.regularizer is None:
        return
    from timm_drop.spec import load_spec

    src = cfg.regularizer
    if isinstance(src, str):
        path = Path(src)
        if not path.is_absolute() and not path.exists() and base_dir is not None:
            alt = Path(base_dir) / path
            if alt.exists():
                path = alt
        if not path.exists():
            raise ConfigError(f"regularizer: spec file not found: {src!r}")
        src = str(path)
    try:
        spec = load_spec(src)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"regularizer: {e}") from e
    cfg.regularizer = spec.to_dict()


# -- loading ------------------------------------------------------------------------------------------------


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["train.epochs=3", "data.augment.cutout=16"]`` -> ``[(key, value)]``; values are parsed as YAML."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (dotted keys, e.g. train.epochs=3)")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r}: empty key part")
        try:
            # ``lr=1e-4`` is a number (YAML 1.2), anywhere in the value; quoted (``name='1e3'``) it stays a string
            value = load_yaml_bounded(text, f"override {key}", yaml12_floats=True)[0] if text.strip() else ""
        except YAMLInputError as e:
            raise ConfigError(f"{key}: cannot parse override value {text!r}: {e}") from e
        out.append((key, value))
    return out


def apply_overrides(raw: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Set dotted keys in a raw config dict (integers index lists: ``regularizer.rules.0.params.drop_prob``)."""
    raw = copy.deepcopy(raw)
    for key, value in overrides:
        parts = key.split(".")
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            here = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{key}: {here} is not a valid list index")
                node = node[int(part)]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                raise ConfigError(f"{key}: {here} is not a mapping (it is {node!r})")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"{key}: {last!r} is not a valid list index")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"{key}: parent is not a mapping")
    return raw


def _merge(base: dict, child: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else (lists, scalars, specs given as paths) is replaced."""
    out = copy.deepcopy(base)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "regularizer":
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path, what: str) -> Any:
    """A config file's data, bounded in size and alias expansion (an alias bomb would otherwise grow memory
    without limit in ``dataclasses.asdict``/``deepcopy``); errors start with ``what`` and name the file."""
    from timm_drop.yaml_io import DEFAULT_MAX_BYTES

    try:
        size = path.stat().st_size
        if size > DEFAULT_MAX_BYTES:  # refuse before reading a huge file into memory
            raise ConfigError(
                f"{what}: {path}: file is {size} bytes, over the limit of {DEFAULT_MAX_BYTES} bytes"
            )
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: cannot read {path}: {e}") from e
    try:
        return load_yaml_bounded(text, str(path), yaml12_floats=True)[0]
    except YAMLInputError as e:
        raise ConfigError(f"{what}: invalid YAML: {e}") from e


def _resolve_base(raw: dict, path: Path, seen: tuple[Path, ...]) -> dict:
    """``base: other.yaml`` (relative to this file) makes this config a set of changes on top of another one."""
    if "base" not in raw:
        return raw
    base_ref = raw.pop("base")
    if not isinstance(base_ref, str):
        raise ConfigError(f"base: must be a path to another config, got {base_ref!r} (in {path})")
    base_path = (path.parent / base_ref).resolve()
    if base_path in seen:
        raise ConfigError(f"base: circular reference to {base_path} (in {path})")
    if not base_path.is_file():
        raise ConfigError(f"base: file not found: {base_ref!r} (relative to {path.parent})")
    base_raw = _read_yaml(base_path, "base") or {}
    if not isinstance(base_raw, dict):
        raise ConfigError(f"base: {base_path}: top level must be a mapping")
    base_raw = _resolve_base(base_raw, base_path, seen + (base_path,))
    return _merge(base_raw, raw)


def load_config(
    src: str | os.PathLike | dict | None = None,
    overrides: list[str] | list[tuple[str, Any]] | None = None,
    *,
    resolve_spec: bool = True,
    check_paths: bool = True,
) -> TrainConfig:
    """Build a validated :class:`TrainConfig` from a YAML path or dict plus ``key=value`` overrides."""
    base_dir = None
    if src is None:
        raw: dict = {}
    elif isinstance(src, dict):
        raw = copy.deepcopy(src)
    else:
        path = Path(src)
        if not path.is_file():
            raise ConfigError(f"--config: file not found: {str(src)!r}")
        raw = _read_yaml(path, "--config") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {str(src)!r}: top level must be a mapping")
        base_dir = path.parent
        raw = _resolve_base(raw, path, seen=(path.resolve(),))
    if overrides:
        pairs = overrides if isinstance(overrides[0], tuple) else parse_overrides(overrides)  # type: ignore[arg-type]
        raw = apply_overrides(raw, pairs)  # type: ignore[arg-type]
    cfg = _build(TrainConfig, raw, "")
    validate(cfg, check_paths=check_paths)
    if resolve_spec:
        resolve_regularizer(cfg, base_dir)
    return cfg


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def diff_configs(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = sorted(set(a) | set(b), key=str)
    out = []
    for k in keys:
        key = f"{prefix}.{k}" if prefix else str(k)
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, key)
        elif va != vb:
            out.append(key)
    return out
