"""Training-recipe configuration: one YAML file, ``key=value`` overrides, validation before any work starts.

A config is a tree of small dataclasses (:class:`TrainConfig` at the root). Loading goes

    YAML file -> dict -> dotted ``key=value`` overrides -> typed, validated dataclasses

and every problem names the dotted key at fault (``train.precision: must be one of ['no', 'bf16', 'fp16']``)
and, for a value from a YAML file, the file and line. A config with several mistakes gets them all in one
:class:`ConfigError` (collected with :class:`timm_drop.problems.ProblemCollector`, as a spec's are); the range
checks run one step per section (``_check_model``, ``_check_data``...).
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
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from timm_drop.errors import TimmDropError
from timm_drop.problems import ProblemCollector, YamlLocator
from timm_drop.suggest import did_you_mean, nearest
from timm_drop.yaml_io import YAMLInputError, load_yaml_bounded

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "TrainConfig",
    "apply_overrides",
    "config_to_dict",
    "load_config",
    "parse_overrides",
    "save_config",
]


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config: the dotted key at fault, what, and where the value came from.

    ``source`` is the YAML file that gave the value (or ``"override <key>"``), ``line`` its 1-based line there;
    both are None for values given in a dict or left at their default.
    """

    key: str | None
    message: str
    source: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        text = f"{self.key}: {self.message}" if self.key else self.message
        if self.source is None:
            return text
        return f"{text} ({self.source}{f', line {self.line}' if self.line is not None else ''})"


class ConfigError(TimmDropError, ValueError):
    """Config problems: a message (one problem) or :class:`ConfigProblem` s, each starting with the dotted key.

    ``problems`` lists everything found; a config with several mistakes reports them all in one error.
    """

    def __init__(self, problems: str | ConfigProblem | Sequence[ConfigProblem]) -> None:
        if isinstance(problems, str):
            problems = [ConfigProblem(None, problems)]
        elif isinstance(problems, ConfigProblem):
            problems = [problems]
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        if len(self.problems) == 1:
            text = str(self.problems[0])
        else:
            text = "\n".join(
                [f"config has {len(self.problems)} problems:"] + [f"  - {p}" for p in self.problems]
            )
        super().__init__(text)


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
class HfdsConfig:
    """``data.dataset: hfds``: a Hugging Face ``datasets`` dataset, random access (an epoch is a permutation)."""

    #: a dataset id for ``datasets.load_dataset`` (``data.root`` is then its cache dir; null = HF's default cache);
    #: null = ``data.root`` is a folder written by ``save_to_disk`` (read memory-mapped, no copy)
    name: str | None = None
    #: split names (``save_to_disk`` folder: the sub-folders of a saved ``DatasetDict``)
    train_split: str = "train"
    eval_split: str = "test"
    #: column holding the images (an ``Image`` feature) and the integer labels (``ClassLabel`` names the classes)
    image_key: str = "image"
    label_key: str = "label"


@dataclass
class WdsConfig:
    """``data.dataset: wds``: webdataset tar shards under ``data.root``, read as a stream (no random access)."""

    #: shards of a split relative to ``data.root`` (brace pattern: ``train-{000000..000099}.tar``), or a split name
    #: of ``data.root/_info.json`` (timm's webdataset info file, which also gives the sample count)
    train_split: str = "train"
    eval_split: str = "validation"
    #: samples in the split: shards have no length, so the epoch's length comes from here (or from _info.json)
    train_samples: int | None = None
    eval_samples: int | None = None
    #: tar member extension(s) of the image (``;`` = alternatives); label: null = the ``.cls`` member, else a field
    #: of the ``.json`` member
    image_key: str = "jpg;png;webp"
    label_key: str | None = None


#: datasets decoded by loader workers (PIL transforms), as opposed to the tensor datasets augmented on the device
WORKER_DATASETS = ("imagefolder", "hfds", "wds")


@dataclass
class DataConfig:
    dataset: Literal["digits", "cifar10", "cifar100", "imagefolder", "npz", "hfds", "wds"] = "digits"
    #: dataset folder (cifar: the folder holding ``cifar-10-batches-py``; imagefolder: holds train/ and val|test/;
    #: hfds: the ``save_to_disk`` folder or the cache dir; wds: the shard folder) or the ``.npz`` file; relative
    #: paths resolve against the working directory
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
    hfds: HfdsConfig = field(default_factory=HfdsConfig)
    wds: WdsConfig = field(default_factory=WdsConfig)


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
    #: ``ddp``: every process holds the whole model (DistributedDataParallel). ``fsdp``: FSDP2 through Accelerate's
    #: plugin, for models that do not fit one GPU: each block (the spec's ``block`` sites) and the rest of the model
    #: sharded across the processes, full weights gathered for the exports and checkpoints. Needs a GPU launch by
    #: ``torchrun`` / ``accelerate launch`` (1 process too); no EMA, LayerOut or ``log.mask_every`` with it
    strategy: Literal["ddp", "fsdp"] = "ddp"


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
    #: checkpoints kept, epoch and step ones counted together in training order (oldest deleted first); the best
    #: model's weights are kept separately
    total_limit: int = 2
    #: a full checkpoint every N finished epochs (and after the last one)
    every: int = 1
    #: also a mid-epoch checkpoint every N optimizer steps (counted over the whole run, so after N * grad_accum_steps
    #: micro-batches), resumable exactly where it was taken; None = epoch checkpoints only
    every_steps: int | None = None
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


# -- where values came from, and the problems found in them ------------------------------------------------

_INDEX = re.compile(r"\[(\d+)\]")


def _key_path(key: str) -> tuple[Any, ...]:
    """``"log.trackers[0]"`` -> ``("log", "trackers", 0)``: the field path a :class:`YamlLocator` walks."""
    path: list[Any] = []
    for part in key.split("."):
        name, *indices = _INDEX.split(part)
        if name:
            path.append(name)
        path.extend(int(i) for i in indices if i)
    return tuple(path)


def _dotted(path: tuple[Any, ...]) -> str:
    """``("log", "trackers", 0)`` -> ``"log.trackers[0]"``: the inverse of :func:`_key_path`."""
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


class _Sources:
    """Where each value of a raw config came from: overrides first, then the file, then its ``base:`` files."""

    def __init__(self) -> None:
        self.files: list[tuple[str, YamlLocator]] = []  # the config file first, then its bases in order
        self.overrides: list[str] = []

    def add_file(self, name: str, locator: YamlLocator) -> None:
        self.files.append((name, locator))

    def duplicate_keys(self) -> list[ConfigProblem]:
        """A key a file's mapping repeats: PyYAML would silently keep the last value (a spec refuses it too)."""
        return [
            ConfigProblem(
                _dotted(path + (key,)), "given twice; YAML would silently keep only the last one", name, line
            )
            for name, locator in self.files
            for path, key, line in locator.duplicate_keys()
        ]

    def locate(self, key: str | None) -> tuple[str | None, int | None]:
        """``(source, line)`` of the value at dotted ``key``: the override that set it or the file that gave it.

        A key no file gives (a required field left out) points at its deepest parent section that a file
        gives, so "data.root: is required" names the ``data:`` line.
        """
        if not key:
            return None, None
        for item in self.overrides:
            if key == item or key.startswith((item + ".", item + "[")):
                return f"override {item}", None
        path = _key_path(key)
        best: tuple[int, str | None, int | None] = (0, None, None)
        for name, locator in self.files:
            for depth in range(len(path), best[0], -1):
                if locator.node(path[:depth]) is not None:
                    best = (depth, name, locator.line(path[:depth]))
                    break
        return best[1], best[2]


class _Report:
    """Collects every problem of a config (each located through :class:`_Sources`); raises them together."""

    def __init__(self, sources: _Sources | None = None) -> None:
        self.sources = sources or _Sources()
        self.problems: ProblemCollector[ConfigProblem] = ProblemCollector()

    def add(self, key: str | None, message: str) -> None:
        source, line = self.sources.locate(key)
        self.problems.add(ConfigProblem(key, message, source, line))

    def add_error(self, error: ConfigError) -> None:
        for p in error.problems:
            self.add(p.key, p.message)

    def check(self, cond: bool, key: str, message: str) -> bool:
        """Record ``key: message`` unless ``cond``; returns ``cond`` so a dependent check can be skipped."""
        if not cond:
            self.add(key, message)
        return cond

    def has(self, key: str) -> bool:
        return any(p.key == key or (p.key or "").startswith(key + ".") for p in self.problems.sorted())

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(self.problems.sorted())


# -- generic typed construction ----------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(ConfigProblem(key, message))


def _coerce(value: Any, tp: Any, key: str, report: _Report) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted for floats. Raises ConfigError naming key;
    a nested section is built field by field, its problems going to ``report``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors: list[ConfigProblem] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, report)
            except ConfigError as e:
                errors.extend(e.problems)
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise _fail(key, f"{value!r} matches none of {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if value == c and type(value) is type(c):
                return value
        raise _fail(key, f"must be one of {list(choices)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise _fail(key, f"must be a list, got {type(value).__name__} ({value!r})")
        return [_coerce(v, item_tp, f"{key}[{i}]", report) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise _fail(key, f"must be a mapping, got {type(value).__name__} ({value!r})")
        return copy.deepcopy(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, report)
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(key, f"must be an integer, got {type(value).__name__} ({value!r})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(key, f"must be a number, got {type(value).__name__} ({value!r})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(key, f"must be a string, got {type(value).__name__} ({value!r})")
        return value
    raise _fail(key, f"unsupported type {_type_name(tp)}")  # pragma: no cover - schema bug


def _build(cls: type, raw: Any, prefix: str, report: _Report) -> Any:
    """``cls`` from a raw mapping; every unknown key and ill-typed field goes to ``report`` (that field then keeps
    its default, so the rest of the section is still checked)."""
    dot = prefix + "." if prefix else ""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        report.add(prefix or "config", f"must be a mapping, got {type(raw).__name__} ({raw!r})")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in names:
            near = nearest(str(k), names, n=1)
            hint = f"; did you mean {dot}{near[0]}?" if near else ""
            report.add(f"{dot}{k}", f"unknown key{hint} (known: {names})")
    kwargs = {}
    for name in names:
        if name in raw:
            try:
                kwargs[name] = _coerce(raw[name], hints[name], f"{dot}{name}", report)
            except ConfigError as e:
                report.add_error(e)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict:
    """The config as plain YAML-able data (dataclasses -> dicts)."""
    return copy.deepcopy(dataclasses.asdict(cfg))


# -- semantic checks: one step per section -----------------------------------------------------------------


def validate(cfg: TrainConfig, *, check_paths: bool = True, report: _Report | None = None) -> None:
    """Range and consistency checks; every failure names its key, and all of them are raised together.

    ``check_paths=False`` skips file existence. With ``report`` the problems are added there and not raised.
    """
    own = report is None
    r = report if report is not None else _Report()
    for step in _SECTION_CHECKS:
        step(cfg, r, check_paths)
    if own:
        r.raise_if_any()


def _check_run(cfg: TrainConfig, r: _Report, check_paths: bool) -> None:
    r.check(bool(cfg.output_dir), "output_dir", "must not be empty")
    # numpy's seed range: anything else fails deep inside set_seed, after the run directory exists
    r.check(0 <= cfg.seed <= 2**32 - 1, "seed", f"must be in [0, 2**32 - 1], got {cfg.seed}")


def _check_model(cfg: TrainConfig, r: _Report, check_paths: bool) -> None:
    m = cfg.model
    if r.check(bool(m.name), "model.name", "must name a timm model"):
        _check_model_name(m.name, r)
    r.check(
        "num_classes" not in m.kwargs or isinstance(m.kwargs["num_classes"], int),
        "model.kwargs.num_classes",
        "must be an integer",
    )
    if m.checkpoint_path is not None:
        r.check(
            m.pretrained,
            "model.checkpoint_path",
            "is the pretrained weights file: set model.pretrained: true",
        )
        if check_paths:
            r.check(
                os.path.isfile(m.checkpoint_path),
                "model.checkpoint_path",
                f"does not exist: {m.checkpoint_path!r}",
            )


def _check_model_name(name: str, r: _Report) -> None:
    """The name must be in timm's registry (the CIFAR models register on ``import timm_drop``)."""
    if ":" in name:  # ``hf-hub:...`` / ``local-dir:...``: timm resolves these itself when building
        return
    import timm

    import timm_drop  # noqa: F401
    import timm_drop.models  # noqa: F401

    if timm.is_model(name):
        return
    near = nearest(name, timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else " (see timm.list_models())"
    r.add("model.name", f"{name!r} is not a timm model{hint}")


def _check_data(cfg: TrainConfig, r: _Report, check_paths: bool) -> None:
    d = cfg.data
    r.check(d.image_size >= 8, "data.image_size", f"must be >= 8, got {d.image_size}")
    r.check(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    r.check(d.eval_batch_size >= 1, "data.eval_batch_size", f"must be >= 1, got {d.eval_batch_size}")
    r.check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    r.check(
        d.num_classes is None or d.num_classes >= 2, "data.num_classes", f"must be >= 2, got {d.num_classes}"
    )
    for k in ("train_subset", "eval_subset"):
        v = getattr(d, k)
        r.check(v is None or v >= 1, f"data.{k}", f"must be >= 1 or null, got {v}")
    for k in ("mean", "std"):
        v = getattr(d, k)
        r.check(v is None or len(v) in (1, 3), f"data.{k}", f"must have 1 or 3 values, got {v}")
    r.check(d.std is None or all(x > 0 for x in d.std), "data.std", f"must be positive, got {d.std}")
    r.check(
        d.crop_pct is None or 0 < d.crop_pct <= 1,
        "data.crop_pct",
        f"must be in (0, 1] or null, got {d.crop_pct}",
    )
    _check_data_root(d, r, check_paths)
    _check_streams(d, r)
    _check_augment(d, r)


def _check_streams(d: DataConfig, r: _Report) -> None:
    """What a worker-decoded or streamed dataset cannot do."""
    if d.dataset in WORKER_DATASETS:
        r.check(
            d.device_resident is not True,
            "data.device_resident",
            f"dataset {d.dataset!r} is decoded by loader workers, it cannot live on the device; use false or auto",
        )
    if d.dataset != "wds":
        return
    # shards have no class list and no random access: the classes are declared, a subset would differ every epoch
    r.check(d.num_classes is not None, "data.num_classes", "is required for dataset 'wds' (shards list no classes)")
    for k in ("train_subset", "eval_subset"):
        r.check(
            getattr(d, k) is None,
            f"data.{k}",
            "a webdataset stream has no fixed subset; shorten the epoch with data.wds.train_samples instead",
        )
    for k in ("train_samples", "eval_samples"):
        v = getattr(d.wds, k)
        r.check(v is None or v >= 1, f"data.wds.{k}", f"must be >= 1 or null, got {v}")


def _check_data_root(d: DataConfig, r: _Report, check_paths: bool) -> None:
    if d.dataset in ("imagefolder", "npz", "wds") or (d.dataset == "hfds" and d.hfds.name is None):
        r.check(d.root is not None, "data.root", f"is required for dataset {d.dataset!r}")
    if d.dataset == "npz" and d.root is not None:
        r.check(
            str(d.root).endswith(".npz"),
            "data.root",
            f"must be an .npz file for dataset 'npz', got {d.root!r}",
        )
    if d.dataset in ("cifar10", "cifar100") and not d.download:
        r.check(d.root is not None, "data.root", "is required for CIFAR unless data.download is true")
    # a download target (cifar with download, an hfds dataset id's cache dir) need not exist yet
    fetched = (d.dataset.startswith("cifar") and d.download) or (d.dataset == "hfds" and d.hfds.name is not None)
    if check_paths and d.root is not None and not fetched:
        r.check(os.path.exists(d.root), "data.root", f"does not exist: {d.root!r}")


def _check_augment(d: DataConfig, r: _Report) -> None:
    a = d.augment
    if d.image_size >= 8:  # a bad image_size is reported once, not again through every bound it sets
        r.check(
            0 <= a.crop_padding <= d.image_size,
            "data.augment.crop_padding",
            f"must be in [0, image_size], got {a.crop_padding}",
        )
        r.check(
            0 <= a.cutout <= d.image_size,
            "data.augment.cutout",
            f"must be in [0, image_size], got {a.cutout}",
        )
    r.check(
        0.0 <= a.random_erasing <= 1.0,
        "data.augment.random_erasing",
        f"must be in [0, 1], got {a.random_erasing}",
    )
    for k in ("mixup", "cutmix"):
        r.check(getattr(a, k) >= 0, f"data.augment.{k}", f"must be >= 0 (0 = off), got {getattr(a, k)}")
    for k in ("mix_prob", "mix_switch_prob"):
        v = getattr(a, k)
        r.check(0.0 <= v <= 1.0, f"data.augment.{k}", f"must be in [0, 1], got {v}")
    if (a.mixup > 0 or a.cutmix > 0) and d.batch_size >= 1:
        r.check(
            d.batch_size % 2 == 0,
            "data.batch_size",
            f"must be even with data.augment.mixup/cutmix (timm pairs each image with the batch's mirror), got {d.batch_size}",
        )
    if a.randaugment is not None:
        _check_randaugment(a.randaugment, d.dataset, r)


def _check_randaugment(text: str, dataset: str, r: _Report) -> None:
    if not r.check(
        dataset in WORKER_DATASETS,
        "data.augment.randaugment",
        f"needs a worker-decoded dataset {list(WORKER_DATASETS)} (PIL ops in the loader workers); tensor datasets "
        f"({dataset!r}) are "
        "augmented on the device: use mixup/cutmix, cutout or random_erasing there",
    ):
        return
    from timm.data.auto_augment import rand_augment_transform

    try:
        rand_augment_transform(text, {"translate_const": 100})
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        r.add(
            "data.augment.randaugment",
            f"{text!r} is not a timm RandAugment string (e.g. 'rand-m9-mstd0.5-inc1'): {e}",
        )


def _check_optim(cfg: TrainConfig, r: _Report, check_paths: bool) -> None:
    o = cfg.optim
    r.check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    momentum_ok = r.check(0.0 <= o.momentum < 1.0, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    info = _optimizer_info(o.name, r)
    if momentum_ok:
        r.check(
            not o.nesterov or (o.name in ("sgd", "momentum") and o.momentum > 0),
            "optim.nesterov",
            "needs optim.name sgd (or momentum) and momentum > 0",
        )
    r.check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    r.check(
        o.layer_decay is None or 0 < o.layer_decay <= 1,
        "optim.layer_decay",
        f"must be in (0, 1] or null, got {o.layer_decay}",
    )
    # optimizers without betas ignore them (older saved configs carry them)
    if o.betas is not None and info is not None and info.has_betas:
        r.check(
            len(o.betas) == info.num_betas and all(0 <= b < 1 for b in o.betas),
            "optim.betas",
            f"must be {info.num_betas} values in [0, 1) for {o.name!r}, got {o.betas}",
        )
    r.check(o.eps is None or o.eps > 0, "optim.eps", f"must be > 0 or null, got {o.eps}")


def _optimizer_info(name: str, r: _Report) -> Any:
    """timm's ``OptimInfo`` for ``name`` (``lookahead_`` prefix allowed); None (and a problem) for an unknown one."""
    import timm.optim

    known = timm.optim.list_optimizers()
    base = name.lower().removeprefix("lookahead_")
    if base not in known:
        hint = did_you_mean(name, known) or " (see timm.optim.list_optimizers())"
        r.add("optim.name", f"{name!r} is not a timm optimizer{hint}")
        return None
    return timm.optim.get_optimizer_info(base)


def _check_train(cfg: TrainConfig, r: _Report, check_paths: bool) -> None:
    t = cfg.train
    r.check(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    r.check(t.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be >= 1, got {t.grad_accum_steps}")
    r.check(
        0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", f"must be in [0, 1), got {t.label_smoothing}"
    )
    r.check(
        t.clip_grad_norm is None or t.clip_grad_norm > 0,
        "train.clip_grad_norm",
        f"must be > 0 or null, got {t.clip_grad_norm}",
    )
    r.check(0.0 < t.ema.decay < 1.0, "train.ema.decay", f"must be in (0, 1), got {t.ema.decay}")
    r.check(t.eval_every >= 1, "train.eval_every", f"must be >= 1, got {t.eval_every}")
    if t.strategy == "fsdp":
        _check_fsdp(cfg, r)


def _check_fsdp(cfg: TrainConfig, r: _Report) -> None:
    """What FSDP cannot shard or drive, each refused under ``train.strategy`` naming the conflicting key."""
    conflicts = {
        "train.ema.enabled": (
            cfg.train.ema.enabled,
            "timm's EMA keeps a whole unsharded copy of the model on every process (the memory FSDP is there to "
            "save) and updates it from parameters that are only shards",
        ),
        "layerout": (
            cfg.layerout is not None,
            "LayerOut freezes parameters it bound before sharding; FSDP replaces every parameter with a shard",
        ),
        "log.mask_every": (
            cfg.log.mask_every > 0,
            "the mask figure runs a copy of the model on the main process alone; a sharded model runs only on "
            "all processes together",
        ),
        "train.find_unused_parameters": (
            cfg.train.find_unused_parameters,
            "it is a DistributedDataParallel option; FSDP has no use for it",
        ),
    }
    for key, (on, why) in conflicts.items():
        if on:
            r.add("train.strategy", f"fsdp cannot be combined with {key} ({why}); turn {key} off or use ddp")


def _check_sched(cfg: TrainConfig, r: _Report, check_paths: bool) -> None:
    s, epochs, lr = cfg.sched, cfg.train.epochs, cfg.optim.lr
    if s.milestones is not None and s.milestone_fractions is not None:
        r.add("sched.milestones", "give either milestones (epochs) or milestone_fractions, not both")
    elif s.milestones is not None and epochs >= 1:
        r.check(
            s.milestones == sorted(s.milestones) and all(0 < m <= epochs for m in s.milestones),
            "sched.milestones",
            f"must be increasing epochs in (0, train.epochs={epochs}], got {s.milestones}",
        )
    elif s.milestone_fractions is not None:
        r.check(
            s.milestone_fractions == sorted(s.milestone_fractions)
            and all(0 < m < 1 for m in s.milestone_fractions),
            "sched.milestone_fractions",
            f"must be increasing fractions in (0, 1), got {s.milestone_fractions}",
        )
    r.check(0.0 < s.gamma <= 1.0, "sched.gamma", f"must be in (0, 1], got {s.gamma}")
    if epochs >= 1:  # the bounds below come from train.epochs and optim.lr: a bad one is reported once, there
        r.check(
            0.0 <= s.warmup_epochs < epochs,
            "sched.warmup_epochs",
            f"must be in [0, train.epochs), got {s.warmup_epochs}",
        )
    r.check(s.warmup_lr >= 0, "sched.warmup_lr", f"must be >= 0, got {s.warmup_lr}")
    if lr > 0:
        r.check(0 <= s.min_lr <= lr, "sched.min_lr", f"must be in [0, optim.lr], got {s.min_lr}")


def _check_log(cfg: TrainConfig, r: _Report, check_paths: bool) -> None:
    log = cfg.log
    r.check(log.log_interval >= 1, "log.log_interval", f"must be >= 1, got {log.log_interval}")
    _check_trackers(log.trackers, r)
    r.check(log.mask_every >= 0, "log.mask_every", f"must be >= 0 (0 = never), got {log.mask_every}")


def _check_trackers(names: list[str], r: _Report) -> None:
    """Accelerate's tracker names, each installed (Accelerate itself would only warn and drop a missing one)."""
    import accelerate.utils
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType if t.value != "all"]
    for i, name in enumerate(names):
        key = f"log.trackers[{i}]"
        if not r.check(
            name in known,
            key,
            f"{name!r} is not an Accelerate tracker{did_you_mean(name, known)} (known: {known})",
        ):
            continue
        available = getattr(accelerate.utils, f"is_{name}_available", None)
        r.check(
            available is None or available(),
            key,
            f"{name!r} is not installed (pip install {name.replace('_', '-')})",
        )
    r.check(len(set(names)) == len(names), "log.trackers", f"lists a tracker twice: {names}")


def _check_checkpoint(cfg: TrainConfig, r: _Report, check_paths: bool) -> None:
    c = cfg.checkpoint
    r.check(c.total_limit >= 1, "checkpoint.total_limit", f"must be >= 1, got {c.total_limit}")
    r.check(c.every >= 1, "checkpoint.every", f"must be >= 1, got {c.every}")
    r.check(
        c.every_steps is None or c.every_steps >= 1,
        "checkpoint.every_steps",
        f"must be a positive integer (optimizer steps) or null (epoch checkpoints only), got {c.every_steps}",
    )


def _check_regularizer(cfg: TrainConfig, r: _Report, check_paths: bool) -> None:
    """Only the form here; the spec itself is loaded and checked by :func:`resolve_regularizer`."""
    r.check(
        cfg.regularizer is None or isinstance(cfg.regularizer, (str, dict)),
        "regularizer",
        f"must be a spec mapping, a path to a spec YAML, or null; got {type(cfg.regularizer).__name__}",
    )


def _check_layerout(cfg: TrainConfig, r: _Report, check_paths: bool) -> None:
    section = cfg.layerout
    if section is None:
        return
    import inspect

    from timm_drop.layerout import LayerOut

    params = inspect.signature(LayerOut.__init__).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    known = [n for n in params if n != "self"]
    ok = True
    for k in section:
        ok &= r.check(
            accepts_any or k in known, f"layerout.{k}", f"unknown LayerOut argument (known: {known})"
        )
    probs = section.get("freeze_probs", "random")
    if not isinstance(probs, str):
        ok &= r.check(
            isinstance(probs, list)
            and all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1 for p in probs),
            "layerout.freeze_probs",
            f"must be a preset name or a list of probabilities in [0, 1], got {probs!r}",
        )
    if not ok:  # building LayerOut would only restate the problems above
        return
    try:
        LayerOut(**section)
    except (TypeError, ValueError) as e:
        # LayerOut's messages start with the argument's name: make it the dotted key
        first, _, rest = str(e).partition(" ")
        if first in known:
            r.add(f"layerout.{first}", rest)
        else:
            r.add("layerout", str(e))


#: the config's sections in the order their problems are listed
_SECTION_CHECKS = (
    _check_run,
    _check_model,
    _check_data,
    _check_optim,
    _check_train,
    _check_sched,
    _check_log,
    _check_checkpoint,
    _check_regularizer,
    _check_layerout,
)


def resolve_regularizer(cfg: TrainConfig, base_dir: str | os.PathLike | None = None) -> None:
    """Load and validate the regularizer spec now (before any work), inlining a spec file's content.

    A relative spec path resolves against the working directory first, then against ``base_dir`` (the config
    file's folder). The resolved config then carries the spec itself, so the saved config is self-contained.
    """
    if cfg.regularizer is None:
        return
    from timm_drop.spec import load_spec

    src = cfg.regularizer
    from timm_drop.placements import placement_request

    try:  # a placement by name ("dropblock", {preset: dropblock, ...}) stays data until it meets the model
        placement = placement_request(src)
    except (ValueError, TypeError) as e:
        raise ConfigError(ConfigProblem("regularizer", str(e))) from e
    if placement is not None:
        cfg.regularizer = placement.to_dict()
        return
    if isinstance(src, str):
        path = Path(src)
        if not path.is_absolute() and not path.exists() and base_dir is not None:
            alt = Path(base_dir) / path
            if alt.exists():
                path = alt
        if not path.exists():
            raise ConfigError(ConfigProblem("regularizer", f"spec file not found: {src!r}"))
        src = str(path)
    try:
        spec = load_spec(src)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(ConfigProblem("regularizer", str(e))) from e
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


def _read_yaml(path: Path, what: str) -> tuple[Any, YamlLocator]:
    """A config file's data and the lines of its fields, bounded in size and alias expansion (an alias bomb
    would otherwise grow memory without limit in ``dataclasses.asdict``/``deepcopy``); errors start with
    ``what`` and name the file."""
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
        data, root = load_yaml_bounded(text, str(path), yaml12_floats=True)
    except YAMLInputError as e:
        raise ConfigError(f"{what}: invalid YAML: {e}") from e
    return data, YamlLocator(root)


def _resolve_base(raw: dict, path: Path, seen: tuple[Path, ...], sources: _Sources) -> dict:
    """``base: other.yaml`` (relative to this file) makes this config a set of changes on top of another one.

    Each base file read is appended to ``sources``, after the files that override it."""
    if "base" not in raw:
        return raw
    base_ref = raw.pop("base")
    if not isinstance(base_ref, str):
        raise ConfigError(f"base: must be a path to another config, got {base_ref!r} (in {path})")
    base_path = (path.parent / os.path.expanduser(base_ref)).resolve()
    if base_path in seen:
        raise ConfigError(f"base: circular reference to {base_path} (in {path})")
    if not base_path.is_file():
        raise ConfigError(f"base: file not found: {base_ref!r} (relative to {path.parent})")
    base_raw, locator = _read_yaml(base_path, "base")
    base_raw = base_raw or {}
    if not isinstance(base_raw, dict):
        raise ConfigError(f"base: {base_path}: top level must be a mapping")
    sources.add_file(str(base_path), locator)
    base_raw = _resolve_base(base_raw, base_path, seen + (base_path,), sources)
    return _merge(base_raw, raw)


def load_config(
    src: str | os.PathLike | dict | None = None,
    overrides: list[str] | list[tuple[str, Any]] | None = None,
    *,
    resolve_spec: bool = True,
    check_paths: bool = True,
) -> TrainConfig:
    """Build a validated :class:`TrainConfig` from a YAML path or dict plus ``key=value`` overrides.

    Every problem is reported in one :class:`ConfigError`: first all unknown keys and ill-typed values, then (when
    the types are right) all range and consistency problems, each with the file and line its value came from.
    """
    raw, base_dir, sources = _read_raw(src)
    if overrides:
        pairs = overrides if isinstance(overrides[0], tuple) else parse_overrides(overrides)  # type: ignore[arg-type]
        raw = apply_overrides(raw, pairs)  # type: ignore[arg-type]
        sources.overrides = [key for key, _ in pairs]
    report = _Report(sources)
    for problem in sources.duplicate_keys():
        report.problems.add(problem)
    cfg = _build(TrainConfig, raw, "", report)
    # range checks on a field that failed its type check would run on its default: wrong, so stop here
    report.raise_if_any()
    _expand_home(cfg)
    validate(cfg, check_paths=check_paths, report=report)
    if resolve_spec and not report.has("regularizer"):
        try:
            resolve_regularizer(cfg, base_dir)
        except ConfigError as e:
            report.add_error(e)
    report.raise_if_any()
    return cfg


def _expand_home(cfg: TrainConfig) -> None:
    """``~`` and ``~user`` in the config's paths mean the home folder, as in a shell (a folder literally named ``~``
    in the working directory is never what was meant)."""
    cfg.output_dir = os.path.expanduser(cfg.output_dir)
    if cfg.data.root is not None:
        cfg.data.root = os.path.expanduser(cfg.data.root)
    if cfg.model.checkpoint_path is not None:
        cfg.model.checkpoint_path = os.path.expanduser(cfg.model.checkpoint_path)
    if isinstance(cfg.regularizer, str):
        cfg.regularizer = os.path.expanduser(cfg.regularizer)


def _read_raw(src: str | os.PathLike | dict | None) -> tuple[dict, Path | None, _Sources]:
    """The raw config (``base:`` files merged in), the folder relative spec paths resolve against, and where
    each value came from."""
    sources = _Sources()
    if src is None:
        return {}, None, sources
    if isinstance(src, dict):
        return copy.deepcopy(src), None, sources
    path = Path(src)
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {str(src)!r}")
    raw, locator = _read_yaml(path, "--config")
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {str(src)!r}: top level must be a mapping")
    sources.add_file(str(path), locator)
    raw = _resolve_base(raw, path, (path.resolve(),), sources)
    return raw, path.parent, sources


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (:func:`~timm_drop.training.files.replace_file`)."""
    from timm_drop.training.files import replace_file

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    replace_file(path, lambda f: f.write(text.encode()))


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
