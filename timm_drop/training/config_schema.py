"""The recipe config's schema: its sections as dataclasses whose fields carry their help, and :class:`ConfigError`.

Each field is declared once, with its type (the annotation), default and one line of help
(:func:`timm_drop.fields.documented`, PEFT's ``field(metadata={"help": ...})``): validation reads the names and
types from here (:mod:`timm_drop.training.config_checks`), and :func:`config_field_table` renders the reference
table for the docs from the same definitions (:data:`CONFIG_FIELDS`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from timm_drop.fields import FieldDoc, documented, field_docs, markdown_table
from timm_drop.problems import Problem, ProblemsError

__all__ = [
    "CONFIG_FIELDS",
    "WORKER_DATASETS",
    "AugmentConfig",
    "CheckpointConfig",
    "ConfigError",
    "ConfigProblem",
    "DataConfig",
    "EmaConfig",
    "HfdsConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "SchedConfig",
    "TrainConfig",
    "TrainSection",
    "WdsConfig",
    "config_field_table",
    "config_to_dict",
]


class ConfigError(ProblemsError):
    """Config problems: a message (one problem) or :class:`~timm_drop.problems.Problem` s, each starting with
    the dotted key and ending with the file and line its value came from.

    ``problems`` lists everything found; a config with several mistakes reports them all in one error.
    """

    def __init__(self, problems: str | Problem | Sequence[Problem]) -> None:
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        super().__init__(problems)

    def _heading(self) -> str:
        return f"config has {len(self.problems)} problems:"

    def _item(self, problem: Problem) -> str:
        text = f"{problem.field}: {problem.message}" if problem.field else problem.message
        if problem.source is None:
            return text
        return f"{text} ({problem.source}{f', line {problem.line}' if problem.line is not None else ''})"


def ConfigProblem(  # noqa: N802 - the old class name, kept for callers that build problems by hand
    key: str | None, message: str, source: str | None = None, line: int | None = None
) -> Problem:
    """A config :class:`~timm_drop.problems.Problem` (the name and arguments of the old config-only class):
    the dotted ``key`` at fault, what, and the file (or ``"override <key>"``) and line that gave the value."""
    return Problem(message, field=key, source=source, line=line)


@dataclass
class ModelConfig:
    name: str = documented(
        "resnet20_cifar", help="timm model name (timm.list_models(); the CIFAR models register on import timm_drop); `num_classes` comes from the data"
    )
    kwargs: dict = documented(
        factory=dict,
        help="extra timm.create_model kwargs (drop_rate, drop_path_rate...); num_classes defaults to the data's",
    )
    pretrained: bool = documented(
        False,
        help="load timm's pretrained weights (a download, or checkpoint_path); mean/std/interpolation/crop then "
        "default to the model's pretrained_cfg",
    )
    checkpoint_path: str | None = documented(
        None, help="local weights file for pretrained (timm's pretrained_cfg_overlay=dict(file=...)); null = download"
    )


@dataclass
class AugmentConfig:
    crop_padding: int = documented(4, help="zero-padding for the random crop (CIFAR standard: 4); 0 disables the crop")
    random_resized_crop: bool = documented(
        False, help="ImageNet-style RandomResizedCrop for folder datasets (replaces the padded crop there)"
    )
    hflip: bool = documented(True, help="random horizontal flip")
    cutout: int = documented(
        0, help="Cutout (DeVries & Taylor 2017) square side in pixels; 0 = off (their CIFAR-10 value: 16)"
    )
    random_erasing: float = documented(
        0.0, help="probability of Random Erasing (Zhong et al. 2020) per image; 0 = off (their value: 0.5)"
    )
    mixup: float = documented(
        0.0, help="Mixup alpha (Zhang et al. 2018) through timm's batch Mixup on the device; 0 = off (timm's usual: 0.8); any dataset"
    )
    cutmix: float = documented(0.0, help="CutMix alpha (Yun et al. 2019), same Mixup object; 0 = off (timm's usual: 1.0); either Mixup or CutMix on: SoftTargetCrossEntropy, and `batch_size` must be even")
    mix_prob: float = documented(1.0, help="probability of mixing a batch at all (Mixup or CutMix)")
    mix_switch_prob: float = documented(0.5, help="with both on: probability of CutMix instead of Mixup for a batch")
    randaugment: str | None = documented(
        None, help="timm RandAugment config string (rand-m9-mstd0.5-inc1), image folders only (PIL ops in the workers); tensor datasets (augmented on the device): a config error"
    )


@dataclass
class HfdsConfig:
    """``data.dataset: hfds``: a Hugging Face ``datasets`` dataset, random access (an epoch is a permutation)."""

    name: str | None = documented(
        None,
        help="a dataset id for datasets.load_dataset (data.root is then its cache dir); null = data.root is a "
        "save_to_disk folder (read memory-mapped)",
    )
    train_split: str = documented("train", help="training split name (save_to_disk: a sub-folder of a DatasetDict)")
    eval_split: str = documented("test", help="evaluation split name")
    image_key: str = documented("image", help="column holding the images (an Image feature)")
    label_key: str = documented("label", help="column holding the integer labels (a ClassLabel names the classes)")


@dataclass
class WdsConfig:
    """``data.dataset: wds``: webdataset tar shards under ``data.root``, read as a stream (no random access)."""

    train_split: str = documented(
        "train",
        help="training shards relative to data.root (brace pattern: train-{000000..000099}.tar) or a split of "
        "data.root/_info.json",
    )
    eval_split: str = documented("validation", help="evaluation shards or split, as train_split")
    train_samples: int | None = documented(
        None, help="samples in the training split (shards have no length); null = from _info.json"
    )
    eval_samples: int | None = documented(None, help="samples in the evaluation split; null = from _info.json")
    image_key: str = documented("jpg;png;webp", help="tar member extension(s) of the image (';' = alternatives)")
    label_key: str | None = documented(None, help="label: null = the .cls member, else a field of the .json member")


#: datasets decoded by loader workers (PIL transforms), as opposed to the tensor datasets augmented on the device
WORKER_DATASETS = ("imagefolder", "hfds", "wds")


@dataclass
class DataConfig:
    dataset: Literal["digits", "cifar10", "cifar100", "imagefolder", "npz", "hfds", "wds"] = documented(
        "digits", help="which dataset: built-in digits, CIFAR, an image folder, an .npz file, HF datasets or shards"
    )
    root: str | None = documented(
        None,
        help="dataset folder (CIFAR batches, train/ + val|test/, save_to_disk or cache dir, shards) or the .npz "
        "file; relative to the working directory",
    )
    download: bool = documented(False, help="cifar only: let torchvision download and verify the archive (a network)")
    image_size: int = documented(32, help="side of the (square) training and evaluation images")
    num_classes: int | None = documented(None, help="classes; null = from the dataset")
    batch_size: int = documented(128, help="training batch per process (Accelerate's convention)")
    eval_batch_size: int = documented(256, help="evaluation batch per process")
    device_resident: Literal["auto", True, False] = documented(
        "auto",
        help="keep the whole (small) dataset on the accelerator and augment there in batches; auto = tensor datasets",
    )
    num_workers: int = documented(4, help="loader worker processes; image folders, hfds and wds only; workers persist across epochs, reseeded per epoch from (seed, epoch, rank)")
    train_subset: int | None = documented(
        None, help="use only the first N training images (after a fixed-seed shuffle); null = all; not for wds (a stream has no fixed subset)"
    )
    eval_subset: int | None = documented(None, help="use only the first N evaluation images; null = all")
    mean: list[float] | None = documented(
        None, help="per-channel mean in [0, 1] pixel units; null = the model's or the dataset's usual statistics"
    )
    std: list[float] | None = documented(None, help="per-channel std, as mean")
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = documented(
        None, help="resize interpolation; null = the model's with model.pretrained, else bilinear"
    )
    crop_pct: float | None = documented(
        None,
        help="imagefolder eval: resize to image_size / crop_pct, centre-crop; null = the model's with "
        "model.pretrained, else 0.875 with random_resized_crop",
    )
    augment: AugmentConfig = documented(factory=AugmentConfig, help="training augmentation")
    hfds: HfdsConfig = documented(factory=HfdsConfig, help="data.dataset: hfds settings; needs `pip install 'timm_drop[streaming]'`")
    wds: WdsConfig = documented(factory=WdsConfig, help="data.dataset: wds settings; needs `pip install 'timm_drop[streaming]'`")


@dataclass
class OptimConfig:
    name: str = documented(
        "sgd",
        help="any timm.optim.list_optimizers() name (sgd, adamw, lamb, lion...), optionally lookahead_<name>",
    )
    lr: float = documented(0.1, help="learning rate, used as given (no scaling with the batch)")
    momentum: float = documented(0.9, help="momentum-type optimizers only (timm ignores it for the others)")
    nesterov: bool = documented(
        False, help="sgd/momentum only; unlike timm's sgd (Nesterov by default) the recipe's default is plain momentum"
    )
    weight_decay: float = documented(5e-4, help="weight decay; the model's no_weight_decay() names are excluded; never on the model's `no_weight_decay()` names (ViT `pos_embed`, `cls_token`, ...)")
    no_decay_norm_bias: bool = documented(
        False, help="also exclude biases and norm weights (1-d params) from weight decay (timm's filter_bias_and_bn)"
    )
    layer_decay: float | None = documented(
        None, help="layer-wise LR decay (BEiT/timm): layer i of n gets lr * layer_decay ** (n - i); null = off"
    )
    betas: list[float] | None = documented(
        None, help="Adam-type optimizers only; null = the optimizer's default ((0.9, 0.999) for AdamW)"
    )
    eps: float | None = documented(None, help="null = the optimizer's default (1e-8 for AdamW)")


@dataclass
class SchedConfig:
    name: Literal["multistep", "cosine", "constant"] = documented("multistep", help="LR schedule")
    milestones: list[int] | None = documented(None, help="epochs at which the LR is multiplied by gamma")
    milestone_fractions: list[float] | None = documented(
        None, help="milestones as fractions of train.epochs (exclusive with milestones), so a short run keeps the shape"
    )
    gamma: float = documented(0.1, help="multistep factor")
    warmup_epochs: float = documented(0.0, help="warm-up length in epochs (fractions allowed)")
    warmup_lr: float = documented(0.0, help="LR at the start of warm-up")
    warmup_mode: Literal["linear", "constant"] = documented(
        "linear", help="linear: ramp warmup_lr -> lr; constant: hold warmup_lr (He et al. 2016's ResNet-110 start)"
    )
    min_lr: float = documented(0.0, help="cosine floor")


@dataclass
class EmaConfig:
    enabled: bool = documented(False, help="keep an exponential moving average of the weights (timm's ModelEmaV3)")
    decay: float = documented(0.9998, help="EMA decay per optimizer step")
    warmup: bool = documented(False, help="ramp the decay up at the start (timm's EMA warm-up)")


@dataclass
class TrainSection:
    epochs: int = documented(200, help="training epochs")
    grad_accum_steps: int = documented(1, help="micro-batches per optimizer step")
    label_smoothing: float = documented(0.0, help="cross-entropy label smoothing; also smooths Mixup/CutMix targets when mixing")
    precision: Literal["no", "bf16", "fp16"] = documented(
        "no", help="mixed precision through Accelerate (fp16 needs CUDA); fp16 needs CUDA (GradScaler through Accelerate)"
    )
    channels_last: bool = documented(False, help="NHWC memory format for the model and batches")
    compile: bool = documented(False, help="torch.compile the model; `torch.compile` after `accelerator.prepare`")
    compile_mode: str | None = documented(None, help="torch.compile mode; null = torch's default")
    sync_bn: bool = documented(False, help="convert BatchNorm to SyncBatchNorm when running on more than one process")
    clip_grad_norm: float | None = documented(None, help="clip the gradient norm to this value; null = off")
    ema: EmaConfig = documented(factory=EmaConfig, help="weight EMA; timm's `ModelEmaV3`, evaluated every epoch")
    cpu: bool = documented(
        False, help="force CPU (also makes torchrun / accelerate launch --multi_gpu use gloo on a CPU-only box)"
    )
    find_unused_parameters: bool = documented(
        False, help="DDP find_unused_parameters (only for regularizers that skip whole branches per rank)"
    )
    eval_every: int = documented(1, help="evaluate every N epochs (and after the last)")
    strategy: Literal["ddp", "fsdp"] = documented(
        "ddp",
        help="ddp: whole model per process; fsdp: FSDP2 sharding per block for models that do not fit one GPU "
        "(GPU launch; no EMA, LayerOut or log.mask_every)",
    )


@dataclass
class LogConfig:
    progress_bar: bool = documented(True, help="show a progress bar")
    log_interval: int = documented(
        20, help="optimizer steps between progress-bar loss updates and NaN checks (each one syncs the device)"
    )
    plot: bool = documented(True, help="draw the training curves into curves.png")
    mask_every: int = documented(
        0, help="every N epochs draw the regularizers' masks on a fixed eval batch into masks/ (0 = never)"
    )
    trackers: list[str] = documented(
        factory=list,
        help="Accelerate trackers (tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive...) fed the "
        "per-epoch scalars; `pip install \"timm_drop[tensorboard]\"` (or the tracker's package); metrics.jsonl stays. MLflow logs where `MLFLOW_TRACKING_URI` points (experiment `timm_drop`, run = `name`); unset, MLflow 3 opens `sqlite:///mlflow.db` in the working directory (needs full mlflow)",
    )


@dataclass
class CheckpointConfig:
    total_limit: int = documented(
        2, help="checkpoints kept, epoch and step ones together (oldest deleted first); the best weights apart"
    )
    every: int = documented(1, help="a full checkpoint every N finished epochs (and after the last one)")
    every_steps: int | None = documented(
        None, help="also a resumable mid-epoch checkpoint every N optimizer steps; null = epoch checkpoints only"
    )
    save_best: bool = documented(True, help="also keep the weights of the best evaluation (best_model.pth / .safetensors)")


@dataclass
class TrainConfig:
    name: str = documented("run", help="run name; label in logs and plots (and the MLflow run name)")
    seed: int = documented(0, help="seed of every random stream (in [0, 2**32 - 1])")
    output_dir: str = documented("runs/run", help="run folder: config, checkpoints, metrics, exports")
    model: ModelConfig = documented(factory=ModelConfig, help="the timm model")
    regularizer: Any = documented(
        None,
        help="structured-dropout spec: an inline mapping ({rules: [...]}), a path to a spec YAML, or null",
        type="mapping or str",
    )
    layerout: dict | None = documented(None, help="LayerOut kwargs (timm_drop.layerout.LayerOut) or null")
    data: DataConfig = documented(factory=DataConfig, help="dataset and loaders")
    optim: OptimConfig = documented(factory=OptimConfig, help="optimizer")
    sched: SchedConfig = documented(factory=SchedConfig, help="learning-rate schedule")
    train: TrainSection = documented(factory=TrainSection, help="the training loop")
    log: LogConfig = documented(factory=LogConfig, help="logging")
    checkpoint: CheckpointConfig = documented(factory=CheckpointConfig, help="checkpoints")
    description: str = documented("", help="free text, kept in the saved config")


#: every leaf field of the config by dotted key, with its type, default, allowed values and help
CONFIG_FIELDS: tuple[FieldDoc, ...] = field_docs(TrainConfig)


def config_field_table() -> str:
    """The recipe config's fields (:data:`CONFIG_FIELDS`) as a Markdown table: dotted key, type, default,
    allowed values, help."""
    return markdown_table(CONFIG_FIELDS)


def config_to_dict(cfg: Any) -> dict:
    """The config as plain YAML-able data (dataclasses -> dicts)."""
    return copy.deepcopy(dataclasses.asdict(cfg))
