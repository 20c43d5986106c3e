"""The Accelerate training loop behind ``recipes/train.py``.

Build order: ``timm.create_model`` -> ``apply_regularizer`` -> channels_last -> SyncBN -> (``train.strategy: fsdp``:
each block its own ``fully_shard`` unit) -> optimizer ->
LayerOut ``bind``/``attach`` -> ``accelerator.prepare`` -> ``torch.compile`` -> EMA (a deepcopy of the unwrapped,
already-regularized model, so the EMA carries its own regularizer modules).

Clocks:

* the LR is a pure function of the optimizer-step counter (:class:`LRSchedule`), applied before every step;
* regularizer schedules (the model's and the EMA copy's) move through :func:`timm_drop.drive`, the optimizer step
  hook users call too: once per *optimizer* step that ran, never per micro-batch, never from eval, and not on a step
  the fp16 GradScaler skipped; the driver's step is saved in every checkpoint, so a resume continues the same curve;
* LayerOut's ``start_epoch(epoch)`` / ``end_epoch()`` bracket every epoch.

Mid-epoch checkpoints (``checkpoint.every_steps``) are taken right after an optimizer step (never inside a
gradient-accumulation window) and hold, besides an epoch checkpoint's state, each process's data position and
augmentation generators and the partial epoch's loss/accuracy sums; the global RNG streams are Accelerate's. A run
resumed from one continues the epoch at its next batch and reports the epoch's metrics as the uninterrupted run
does (``epoch_time_s`` adds the training time before and after the interruption).

Randomness: the model is initialised under ``set_seed(seed)`` (identical on every rank); after ``prepare`` the
global RNG is re-seeded with ``seed + process_index`` (``device_specific=True``), so regularizer masks differ across
ranks, while the data order (seeded by ``(seed, epoch)``) and LayerOut's frozen set (its own ``(seed, epoch)``
generator) agree. Accelerate's ``rng_types`` is left at its default so it never re-broadcasts rank 0's global RNG.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from timm_drop.errors import TimmDropError
from timm_drop.training.checkpoint import (
    CheckpointError,
    CheckpointManager,
    RunDir,
    check_output_dir,
    is_mid_epoch,
    save_weights,
    save_weights_safetensors,
)
from timm_drop.training.config import ConfigError, TrainConfig, config_to_dict, save_config
from timm_drop.training.files import WriteError, replace_file, writing
from timm_drop.training.metrics import MetricsLog, plot_curves

__all__ = ["LRSchedule", "NonFiniteLossError", "RunInterrupted", "TrainState", "Trainer", "train"]

#: Accelerate ``init_trackers`` project name: the W&B project, and TensorBoard's folder under ``trackers/``
TRACKER_PROJECT = "timm_drop"


class NonFiniteLossError(TimmDropError, RuntimeError):
    """The training loss became NaN/Inf; the run stopped without writing a checkpoint for that epoch."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run; the message says where it stands (its last checkpoint, ``--resume latest``)."""


@dataclass
class TrainState:
    epoch: int = 0  # finished epochs
    step: int = 0  # optimizer steps taken
    best_top1: float = -1.0
    best_epoch: int = -1
    #: micro-batches of the epoch in progress already trained (0 except in mid-epoch checkpoints)
    batch: int = 0


class LRSchedule:
    """LR as a pure function of the optimizer step: warm-up, then multistep / cosine / constant.

    Milestones and warm-up are in epochs (fractional epochs allowed); a multistep decay takes effect at the first
    step of its milestone epoch, as PyTorch's ``MultiStepLR`` stepped per epoch does.
    """

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int) -> None:
        s, self.epochs = cfg.sched, cfg.train.epochs
        self.kind, self.lr, self.gamma = s.name, cfg.optim.lr, s.gamma
        self.warmup, self.warmup_lr, self.warmup_mode, self.min_lr = (
            s.warmup_epochs,
            s.warmup_lr,
            s.warmup_mode,
            s.min_lr,
        )
        if s.milestones is not None:
            self.milestones = [float(m) for m in s.milestones]
        elif s.milestone_fractions is not None:
            self.milestones = [f * self.epochs for f in s.milestone_fractions]
        else:
            self.milestones = []
        self.steps_per_epoch = steps_per_epoch

    def __call__(self, step: int) -> float:
        e = step / self.steps_per_epoch
        if e < self.warmup:
            if self.warmup_mode == "constant":
                return self.warmup_lr
            return self.warmup_lr + (self.lr - self.warmup_lr) * e / self.warmup
        if self.kind == "multistep":
            return self.lr * self.gamma ** sum(e >= m - 1e-9 for m in self.milestones)
        if self.kind == "cosine":
            t = min(1.0, (e - self.warmup) / max(1e-12, self.epochs - self.warmup))
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * t))
        return self.lr

    def apply(self, optimizer, step: int) -> float:
        lr = self(step)
        for g in optimizer.param_groups:
            # layer-wise decay groups carry their multiplier (timm's schedulers apply it the same way)
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr


def _apply_regularizer(model: nn.Module, spec: Any, example_input: torch.Tensor) -> nn.Module:
    try:
        from timm_drop.rewrite import apply_regularizer
    except ImportError:  # pragma: no cover - older layouts export it at top level only
        from timm_drop import apply_regularizer
    return apply_regularizer(model, spec, example_input=example_input)


def _regularizers(model: nn.Module) -> list[nn.Module]:
    from timm_drop.regularizers.base import Regularizer

    return [m for m in model.modules() if isinstance(m, Regularizer)]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``timm.optim.create_optimizer_v2`` from ``cfg.optim``: the model's ``no_weight_decay()`` names are never
    decayed, 1-d params only with ``no_decay_norm_bias``, ``layer_decay`` sets per-group ``lr_scale``."""
    from timm.optim import create_optimizer_v2

    o = cfg.optim
    kwargs: dict[str, Any] = {}
    if o.name.lower() in ("sgd", "momentum"):
        # timm's "sgd" means Nesterov; the recipe keeps its own (documented) switch
        kwargs["nesterov"] = o.nesterov
    if o.betas is not None:
        kwargs["betas"] = tuple(o.betas)
    if o.eps is not None:
        kwargs["eps"] = o.eps
    try:
        return create_optimizer_v2(
            model,
            opt=o.name,
            lr=o.lr,
            weight_decay=o.weight_decay,
            momentum=o.momentum,
            filter_bias_and_bn=o.no_decay_norm_bias,
            layer_decay=o.layer_decay,
            **kwargs,
        )
    except ImportError as e:  # bitsandbytes / apex optimizers need their package
        raise ConfigError(f"optim.name: {o.name!r} needs a package that is not installed: {e}") from e


def optimizer_groups(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[dict[str, Any]]:
    """One summary per param group (size, weight decay, LR scale, first names), for ``--dry-run``."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in optimizer.param_groups:
        params = g["params"]
        out.append(
            {
                "params": len(params),
                "numel": sum(p.numel() for p in params),
                "weight_decay": g.get("weight_decay", 0.0),
                "lr_scale": g.get("lr_scale", 1.0),
                "names": [names.get(id(p), "?") for p in params[:3]] + (["..."] if len(params) > 3 else []),
            }
        )
    return out


def build_mixup(cfg: TrainConfig, num_classes: int):
    """timm's ``Mixup`` (batch mode, on whatever device the batch is) for ``data.augment``, or None when off."""
    a = cfg.data.augment
    if a.mixup <= 0 and a.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=a.mixup,
        cutmix_alpha=a.cutmix,
        prob=a.mix_prob,
        switch_prob=a.mix_switch_prob,
        mode="batch",
        label_smoothing=cfg.train.label_smoothing,
        num_classes=num_classes,
    )


def _flat_scalars(d: dict[str, Any], prefix: str = "", *, as_text: bool = False) -> dict[str, Any]:
    """Nested dict -> ``{"a/b": number}`` for trackers; other values dropped (or, ``as_text``, kept as strings:
    TensorBoard's hparams take only scalars)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{'.' if as_text else '/'}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flat_scalars(v, key, as_text=as_text))
        elif isinstance(v, (bool, int, float)) and (as_text or not isinstance(v, bool)):
            out[key] = v
        elif as_text:
            out[key] = str(v)
    return out


def _build_layerout(section: dict, model: nn.Module, distributed: bool, compiled: bool):
    """``LayerOut(**section).bind(model)``; tells it whether the run is distributed/compiled so that its
    ``skip_backward="auto"`` never toggles ``requires_grad`` where that is unsafe (DDP) or recompiles (compile)."""
    from timm_drop.layerout import LayerOut

    section = dict(section)
    section.setdefault("distributed", distributed)
    section.setdefault("compiled", compiled)
    return LayerOut(**section).bind(model)


#: the distributed type of this process's launch, before any run's FSDP plugin changed it
_LAUNCH_TYPE: dict[str, Any] = {}


def _release_accelerator_state() -> None:
    """Let a second Trainer in the same process (tests, benchmarks, notebooks) choose its own precision.

    Accelerate keeps mixed precision in a process-wide singleton and refuses a different value later; the
    distributed part (``PartialState``: process group, device) is kept, only the per-run settings are dropped.
    """
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DistributedType

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    shared = PartialState._shared_state
    if shared:
        # Accelerate writes a run's FSDP type into the kept part too; the next run starts from the launch's own type
        if shared["distributed_type"] == DistributedType.FSDP and "type" in _LAUNCH_TYPE:
            shared["distributed_type"] = _LAUNCH_TYPE["type"]
        else:
            _LAUNCH_TYPE["type"] = shared["distributed_type"]


class Trainer:
    """One training run. ``Trainer(cfg).fit()``; pieces are attributes so tests can reach in."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        overwrite: bool = False,
        resume: str | None = None,
        dry_run: bool = False,
    ) -> None:
        self.cfg, self.overwrite, self.resume, self.dry_run = cfg, overwrite, resume, dry_run
        self.state = TrainState()
        self.out = Path(cfg.output_dir)
        self._setup_done = False
        self._dir_ready = False  # the run directory was prepared: something of this run may be on disk
        # this process's state from a mid-epoch checkpoint, until the resumed epoch starts from it
        self._resume_point: dict[str, Any] | None = None

    # -- setup -------------------------------------------------------------------------------------------------
    def setup(self) -> Trainer:
        """Everything before the first step, in order; a failed check anywhere leaves the output dir untouched."""
        from accelerate.utils import set_seed

        cfg = self.cfg
        acc = self._start_accelerator()
        # Read-only decision now; the directory is created (or a previous run in it replaced) only after every
        # other check below has passed, so a failed start loses nothing and leaves nothing behind.
        cfg_dict = config_to_dict(cfg)
        if not self.dry_run:
            self.dir_mode = check_output_dir(self.out, cfg_dict, overwrite=self.overwrite, resume=self.resume)
        self._build_data()
        model = self._build_model()
        self._apply_spec(model)
        model = self._build_optimizer(model)
        self._prepare(model)
        # Per-rank noise from here on (regularizer masks); data order and LayerOut use their own generators.
        set_seed(cfg.seed, device_specific=True)

        self._resume()
        self.run_dir = RunDir(self.out)
        try:
            if not self.dry_run:
                self._prepare_run_dir()
            self.metrics = (
                MetricsLog(self.out, claim=self.run_dir.claim)
                if (self.is_main and not self.dry_run)
                else None
            )
            if cfg.log.trackers and not self.dry_run:
                if self.is_main:
                    self.run_dir.claim("trackers")
                acc.init_trackers(
                    TRACKER_PROJECT,
                    config=_flat_scalars(config_to_dict(cfg), as_text=True),
                    init_kwargs={"wandb": {"name": cfg.name}, "mlflow": {"run_name": cfg.name}},
                )
            if self.metrics is not None and self.resume is not None:
                self.metrics.truncate(self.state.epoch)
        except BaseException:
            self.run_dir.release()
            raise
        self._setup_done = True
        return self

    def _start_accelerator(self) -> Any:
        """The Accelerator (precision, accumulation, trackers, DDP options) and this process's place in the run."""
        from accelerate import Accelerator, PartialState
        from accelerate.utils import DistributedDataParallelKwargs, parse_flag_from_env

        from timm_drop.training import fsdp

        cfg, t = self.cfg, self.cfg.train
        if t.precision == "fp16" and (t.cpu or not torch.cuda.is_available()):
            raise ConfigError("train.precision: fp16 needs a CUDA device; use bf16 or no on CPU")
        # the launch (process group, device) first, so its own distributed type is known before a plugin changes it;
        # ACCELERATE_USE_CPU as AcceleratorState would read it
        PartialState(cpu=t.cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
        _release_accelerator_state()

        plugin = fsdp.fsdp_plugin() if t.strategy == "fsdp" else None
        tracking: dict[str, Any] = {}
        if cfg.log.trackers and not self.dry_run:
            from accelerate.utils import ProjectConfiguration

            tracking = dict(
                log_with=list(cfg.log.trackers),
                project_config=ProjectConfiguration(
                    project_dir=str(self.out), logging_dir=str(self.out / "trackers")
                ),
            )
        ddp = DistributedDataParallelKwargs(find_unused_parameters=t.find_unused_parameters)
        with fsdp.use_fsdp_env(t.strategy):
            self.accelerator = acc = Accelerator(
                **tracking,
                cpu=t.cpu,
                mixed_precision=t.precision,
                gradient_accumulation_steps=t.grad_accum_steps,
                kwargs_handlers=[ddp],
                fsdp_plugin=plugin,
            )
        if plugin is not None:
            fsdp.require_fsdp_launch(acc, plugin, cpu=t.cpu)
        self.device = acc.device
        self.is_main = acc.is_main_process
        self.rank, self.world = acc.process_index, acc.num_processes
        return acc

    def _build_data(self) -> None:
        """Loaders (none in a dry run), the number of classes and the steps per epoch; seeds the run.

        Data comes before the model: the number of classes may come from it. A pretrained model's input pipeline
        fills the normalisation/interpolation/crop keys the config leaves null. A dry run counts the steps with the
        loaders' own :func:`~timm_drop.training.data.train_batches` from what the data says without decoding it
        (``steps_per_epoch_unknown`` gives the reason where that is nothing).
        """
        from accelerate.utils import set_seed

        from timm_drop.training.data import STREAM_DATASETS, build_loaders, peek_dataset, train_batches
        from timm_drop.training.data_config import resolve_data

        cfg, t = self.cfg, self.cfg.train
        if cfg.checkpoint.every_steps is not None and cfg.data.dataset in STREAM_DATASETS:
            raise ConfigError(
                f"checkpoint.every_steps: data.dataset {cfg.data.dataset!r} is read as a stream, which cannot "
                "resume mid-epoch; use null (epoch checkpoints only)"
            )
        data_cfg, self.data_config = resolve_data(cfg)
        set_seed(cfg.seed)
        self.steps_per_epoch_unknown = ""
        try:
            if self.dry_run:
                self.train_loader = self.eval_loader = None
                peek = peek_dataset(data_cfg)
                found = peek.num_classes
                if peek.train_size is None:
                    self.steps_per_epoch_unknown = peek.unknown
                    batches = t.grad_accum_steps  # the schedules are built per epoch; no step count is reported
                else:
                    batches = train_batches(peek.train_size, data_cfg, self.world, t.grad_accum_steps)
            else:
                self.train_loader, self.eval_loader, found = build_loaders(
                    data_cfg,
                    device=self.device,
                    seed=cfg.seed,
                    rank=self.rank,
                    world=self.world,
                    channels_last=t.channels_last,
                    batch_multiple=t.grad_accum_steps,
                )
                batches = len(self.train_loader)
                for loader in (self.train_loader, self.eval_loader):
                    for note in getattr(loader, "notes", ()):  # what the data has to say (a class without eval images)
                        self.accelerator.print(f"note: {note}")
                # what the loaders actually normalise with (the dataset's statistics where nothing else decided)
                self.data_config["mean"], self.data_config["std"] = self.train_loader.mean, self.train_loader.std
        except (ValueError, KeyError) as e:  # data.py names the key (batch larger than the data, ...)
            if isinstance(e, ConfigError):
                raise
            msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            raise ConfigError(msg if msg.startswith("data.") else f"data: {msg}") from e
        num_classes = cfg.data.num_classes or found or cfg.model.kwargs.get("num_classes")
        if num_classes is None:
            raise ConfigError(
                f"data.num_classes: needed for a dry run of dataset {cfg.data.dataset!r} "
                f"({self.steps_per_epoch_unknown})"
            )
        self.num_classes = num_classes
        self.steps_per_epoch = batches // t.grad_accum_steps
        self.total_steps = self.steps_per_epoch * t.epochs

    def _build_model(self) -> nn.Module:
        """The timm model: identical initialisation on every rank (seeded by :meth:`_build_data`, before any
        per-rank re-seed)."""
        import timm

        import timm_drop.models  # noqa: F401  (registers the CIFAR models)
        from timm_drop.training.data_config import model_create_kwargs

        cfg = self.cfg
        kwargs = model_create_kwargs(cfg.model)
        kwargs.setdefault("num_classes", self.num_classes)
        try:
            return timm.create_model(cfg.model.name, **kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ConfigError(f"model.name: {e}") from e
            raise
        except TypeError as e:
            raise ConfigError(f"model.kwargs: {cfg.model.name} rejected them: {e}") from e

    def _stub_shape(self) -> tuple[int, int, int, int]:
        """Two images as the loaders yield them: the example input of the shape pass, the sharding and the dry run."""
        from timm_drop.training.data import IMAGE_CHANNELS

        size = self.cfg.data.image_size
        return (2, IMAGE_CHANNELS, size, size)

    def _apply_spec(self, model: nn.Module) -> None:
        """Insert the config's regularizers (in place) and track their realised drop fractions."""
        cfg = self.cfg
        if cfg.regularizer is not None:
            model.train()
            _apply_regularizer(model, cfg.regularizer, torch.zeros(self._stub_shape()))
            from timm_drop.summary import track_drops

            # realised drop fraction per rule in metrics.jsonl (on device; read once an epoch)
            track_drops(model)
        self.n_regularizers = len(_regularizers(model))

    def _build_optimizer(self, model: nn.Module) -> nn.Module:
        """Model on the device (channels-last, SyncBatchNorm as configured), its optimizer, LayerOut attached to
        that optimizer, and the LR schedule. Returns the model (SyncBatchNorm conversion replaces it)."""
        from timm_drop.training.data_config import format_data_config

        cfg, t = self.cfg, self.cfg.train
        self.accelerator.print(format_data_config(self.data_config))
        model.to(self.device)
        if t.channels_last:
            model.to(memory_format=torch.channels_last)
        if t.sync_bn and self.world > 1:
            from timm.layers import convert_sync_batchnorm

            model = convert_sync_batchnorm(model)
        if t.strategy == "fsdp":
            self._shard_blocks(model)
        self.optimizer = build_optimizer(model, cfg)
        self.layerout = None
        if cfg.layerout is not None:
            self.layerout = _build_layerout(
                cfg.layerout, model, distributed=self.world > 1, compiled=t.compile
            )
            self.layerout.attach(self.optimizer)
        self.lr_schedule = LRSchedule(cfg, self.steps_per_epoch)
        return model

    def _shard_blocks(self, model: nn.Module) -> None:
        """FSDP: every block its own shard unit, before the optimizer sees the parameters (``prepare`` then shards
        the root around them and moves the optimizer to the sharded parameters)."""
        from timm_drop.training import fsdp

        example = torch.zeros(self._stub_shape(), device=self.device)
        self.fsdp_units = fsdp.fsdp_units(model, example)
        if not self.fsdp_units:
            self.accelerator.print(
                f"note: train.strategy=fsdp: {self.cfg.model.name} has no blocks; it is sharded as one unit, so each "
                "forward gathers all of its weights at once"
            )
        fsdp.shard_units(model, self.fsdp_units, self.accelerator)

    def _prepare(self, model: nn.Module) -> None:
        """Accelerate's wrapping (DDP, precision), ``torch.compile``, the EMA copy, the schedule driver (the optimizer
        step hook that moves the regularizers' schedules), Mixup and the loss."""
        cfg, t = self.cfg, self.cfg.train
        acc = self.accelerator
        self.model, self.optimizer = acc.prepare(model, self.optimizer)
        if t.strategy == "fsdp" and acc.native_amp:
            from timm_drop.training import fsdp

            fsdp.autocast_forward(self.model, acc)
        if t.compile:
            self.model = torch.compile(self.model, mode=t.compile_mode)
        self.unwrapped = acc.unwrap_model(self.model)
        self.ema = None
        if t.ema.enabled:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.unwrapped, decay=t.ema.decay, use_warmup=t.ema.warmup)
        from timm_drop.drive import drive

        also = [self.ema.module] if self.ema is not None else []
        self.driver = drive(self.unwrapped, self.optimizer, max(1, self.total_steps), also=also)
        self.mixup = build_mixup(cfg, self.num_classes)
        if self.mixup is not None:
            from timm.loss import SoftTargetCrossEntropy

            # Mixup's targets are already smoothed by train.label_smoothing
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)

    def _resume(self) -> None:
        """The checkpoint manager; with ``--resume``, the checkpoint verified (sizes + checksums) and loaded into
        memory before the run directory is touched: a damaged or mismatched one leaves nothing behind."""
        self.ckpt = CheckpointManager(self.out, self.cfg.checkpoint.total_limit)
        loader = getattr(self, "train_loader", None)
        if self.cfg.checkpoint.every_steps is not None and loader is not None and not hasattr(loader, "state_dict"):
            # _build_data refuses the known streams by name; this catches any other loader before the first step
            raise ConfigError(
                f"checkpoint.every_steps: the training loader of data.dataset {self.cfg.data.dataset!r} cannot "
                "resume mid-epoch (it has no state_dict/load_state_dict); use null (epoch checkpoints only)"
            )
        if self.resume is not None and not self.dry_run:
            self.ckpt.resolve(
                self.resume, num_processes=self.world, log=self.accelerator.print, restore=self._restore_agreed
            )

    def _prepare_run_dir(self) -> None:
        """Create the run directory, or replace what a previous run of ours listed in its marker (``--overwrite``,
        or a start that never finished an epoch); then write the resolved config."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.is_main:
            run = self.run_dir
            with writing(self.out):
                self.out.mkdir(parents=True, exist_ok=True)
            run.acquire()  # held until fit() ends (or this process does): no second run can touch the directory
            if self.dir_mode in ("overwrite", "restart"):
                marker = run.read_marker()
                assert marker is not None  # check_output_dir only returns these modes for a marked run
                if self.dir_mode == "restart":
                    acc.print(
                        f"note: {self.out} held a run that never finished an epoch; replacing the files it created"
                    )
                run.remove_run(marker)
            if self.dir_mode == "resume":
                run.adopt()
            else:
                run.start()
            self._dir_ready = True
            run.claim("config.yaml", "config.yaml.tmp")
            save_config(self.cfg, self.out / "config.yaml")
        acc.wait_for_everyone()
        self._dir_ready = True

    def _restore(self, path: Path) -> None:
        """Load the checkpoint at ``path`` into this run; :class:`CheckpointError` (before the run's counters, LayerOut,
        EMA or data position change) when it cannot continue it, so ``--resume latest`` can try an older one."""
        extra = CheckpointManager.load(self.accelerator, path)
        state = TrainState(**extra["train_state"])
        own = None
        if is_mid_epoch(path):
            own = extra.get("process_state")
            if own is None or own["loader"]["batch"] != state.batch:
                raise CheckpointError(
                    f"a mid-epoch checkpoint without this process's data position (process {self.rank})"
                )
            if own["loader"]["epoch"] != state.epoch:
                raise CheckpointError(
                    f"process {self.rank}'s data position is in epoch {own['loader']['epoch'] + 1}, the checkpoint is "
                    f"inside epoch {state.epoch + 1}"
                )
        # an epoch's end has no position inside an epoch (epoch checkpoints written after a mid-epoch resume by
        # earlier versions kept the position of the step checkpoint they were resumed from)
        state.batch = 0
        if self.layerout is not None and "layerout" not in extra:
            raise CheckpointError("the checkpoint has no LayerOut state but the config has layerout")
        if self.ema is not None and "ema" not in extra:
            raise CheckpointError("the checkpoint has no EMA state but train.ema.enabled is true")
        # only the step: the recipe's resume config check decides what may change (a longer train.epochs stretches
        # the schedule, as progress = step / total_steps always did); a checkpoint from before the recipe used
        # drive() has no "driver", and its schedules followed the step count
        step = extra["driver"]["step"] if "driver" in extra else state.step
        try:
            self.driver.load_state_dict({"step": step})
            if self.layerout is not None:
                self.layerout.load_state_dict(extra["layerout"])
            if self.ema is not None:
                self.ema.load_state_dict(extra["ema"])
            if own is not None:
                self.train_loader.load_state_dict(own["loader"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"its state does not fit this run ({type(e).__name__}: {e})") from e
        self.state, self._resume_point = state, own

    def _restore_agreed(self, path: Path) -> None:
        """:meth:`_restore` on every process; a checkpoint one process cannot continue from is refused by all (each
        holds its own data position), so ``--resume latest`` moves on to the same older checkpoint everywhere."""
        problem = None
        try:
            self._restore(path)
        except CheckpointError as e:
            problem = e
        if self.world > 1:
            failed = self.accelerator.gather(torch.tensor([int(problem is not None)], device=self.device))
            ranks = [r for r, f in enumerate(failed.tolist()) if f]
            if ranks and problem is None:
                problem = CheckpointError(f"process(es) {ranks} cannot continue from it")
        if problem is not None:
            raise problem
        self.accelerator.print(f"resumed from {path} at epoch {self.state.epoch}, step {self.state.step}")

    def _extra_state(self) -> dict[str, Any]:
        # "driver" is optional for readers (see _restore), so the format stays 1
        d: dict[str, Any] = {"train_state": asdict(self.state), "format": 1, "driver": self.driver.state_dict()}
        if self.layerout is not None:
            d["layerout"] = self.layerout.state_dict()
        if self.ema is not None:
            d["ema"] = self.ema.state_dict()
        return d

    # -- steps -------------------------------------------------------------------------------------------------
    def _check_finite(self, value: torch.Tensor, where: str) -> None:
        bad = (~torch.isfinite(value.detach().float())).any().float().reshape(1)
        if self.world > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            raise NonFiniteLossError(
                f"non-finite training loss ({where}, optimizer step {self.state.step}); stopping without saving this "
                "epoch. Lower optim.lr, set train.clip_grad_norm, or use train.precision=bf16; "
                + self._where_it_stands()
            )

    def _epoch_checkpoint_due(self, epoch: int) -> bool:
        return (epoch + 1) % self.cfg.checkpoint.every == 0 or epoch + 1 == self.cfg.train.epochs

    def _step_checkpoint_due(self, epoch: int, batch: int, n_batches: int) -> bool:
        """After an optimizer step: ``checkpoint.every_steps`` divides the step count, unless the epoch's own
        checkpoint follows at once."""
        n = self.cfg.checkpoint.every_steps
        if n is None or self.state.step % n:
            return False
        return not (batch == n_batches and self._epoch_checkpoint_due(epoch))

    def _save_step_checkpoint(self, epoch: int, batch: int, sums: tuple | None) -> None:
        """A mid-epoch checkpoint after ``batch`` micro-batches of ``epoch`` (an optimizer-step boundary):
        ``sums`` = this process's (loss sum, correct, images, seconds) of the epoch so far."""
        accum = self.cfg.train.grad_accum_steps
        if batch % accum:
            # the accumulated gradients of the open window are in no checkpoint: resuming there would lose them
            raise CheckpointError(
                f"a mid-epoch checkpoint after micro-batch {batch} would fall inside a gradient-accumulation window "
                f"(train.grad_accum_steps={accum}); checkpoints are taken only at optimizer-step boundaries"
            )
        loss_sum, correct, seen, elapsed = sums
        self._check_finite(loss_sum, f"epoch {epoch + 1}, before the checkpoint at step {self.state.step}")
        position = self.train_loader.state_dict()
        if (position["epoch"], position["batch"]) != (epoch, batch):  # a loader that loses its position
            raise CheckpointError(
                f"the training loader reports epoch {position['epoch']}, batch {position['batch']} where the loop is "
                f"at epoch {epoch}, batch {batch}: a mid-epoch checkpoint would not resume at the right batch"
            )
        own = {
            "loader": position,
            "sums": {"loss": loss_sum.item(), "correct": correct.item(), "seen": seen, "elapsed_s": elapsed},
        }
        if self.is_main:
            self.run_dir.claim("checkpoints")
        self.state.batch = batch
        try:
            self.ckpt.save(
                self.accelerator, epoch + 1, self._extra_state(), step=self.state.step, process_state=own
            )
        finally:
            self.state.batch = 0

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        from tqdm.auto import tqdm

        acc, cfg, t = self.accelerator, self.cfg, self.cfg.train
        self.model.train()
        self.train_loader.set_epoch(epoch)
        # a run resumed mid-epoch starts at its checkpoint's batch, with the sums of the batches before it
        start, own, self._resume_point = 0, self._resume_point, None
        sums = {"loss": 0.0, "correct": 0.0, "seen": 0, "elapsed_s": 0.0}
        if own is not None:
            start, sums = own["loader"]["batch"], own["sums"]
        loss_sum = torch.tensor(sums["loss"], device=self.device, dtype=torch.float64)
        correct = torch.tensor(sums["correct"], device=self.device, dtype=torch.float64)
        seen = sums["seen"]
        n_batches = len(self.train_loader)
        bar = tqdm(
            initial=start,
            total=n_batches,
            desc=f"epoch {epoch + 1}/{t.epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=not (self.is_main and cfg.log.progress_bar),
        )
        check_every = cfg.log.log_interval * t.grad_accum_steps
        # the LR reported is the last one applied: a resumed epoch has applied it for the step before its checkpoint
        lr = self.lr_schedule(self.state.step - 1 if start else self.state.step)
        t0 = time.perf_counter() - sums["elapsed_s"]
        for i, (x, y) in enumerate(self.train_loader, start):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # soft targets when mixing; accuracy below still counts the unmixed labels
            target = y
            if self.mixup is not None:
                x, target = self.mixup(x, y)
            with acc.accumulate(self.model):
                out = self.model(x)
                loss = self.criterion(out.float(), target)
                acc.backward(loss)
                if acc.sync_gradients:
                    if t.clip_grad_norm is not None:
                        if self.layerout is not None:
                            # frozen gradients (kept under DDP/compile) must not count in the clipping norm
                            self.layerout.discard_frozen_grads()
                        acc.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm)
                    lr = self.lr_schedule.apply(self.optimizer, self.state.step)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            stepped = acc.sync_gradients
            if stepped:
                self.state.step += 1  # the schedules already moved in the optimizer step hook (self.driver)
                if self.ema is not None:
                    self.ema.update(self.unwrapped, step=self.state.step)
            with torch.no_grad():
                loss_sum += loss.detach().double() * y.shape[0]
                correct += (out.detach().argmax(-1) == y).sum().double()
            seen += y.shape[0]
            bar.update(1)
            if (i + 1) % check_every == 0:
                self._check_finite(loss, f"epoch {epoch + 1}, batch {i + 1}")
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.4g}")
            if stepped and self._step_checkpoint_due(epoch, i + 1, n_batches):
                self._save_step_checkpoint(epoch, i + 1, (loss_sum, correct, seen, time.perf_counter() - t0))
        bar.close()
        dt = time.perf_counter() - t0
        totals = torch.stack(
            [loss_sum, correct, torch.tensor(float(seen), device=self.device, dtype=torch.float64)]
        )
        if self.world > 1:
            totals = acc.reduce(totals, reduction="sum")
        self._check_finite(totals[0], f"epoch {epoch + 1} mean")
        n = totals[2].item()
        return {
            "train_loss": totals[0].item() / n,
            "train_top1": 100.0 * totals[1].item() / n,
            "lr": lr,
            "epoch_time_s": dt,
            "train_images_per_s": n / dt,
        }

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Top-1/top-5/loss over the eval split, every image counted once across ranks (``gather_for_metrics``)."""
        acc = self.accelerator
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        stats = []
        k = min(5, self.num_classes)
        for x, y, valid in self.eval_loader:
            x, y, valid = x.to(self.device), y.to(self.device), valid.to(self.device)
            with acc.autocast():
                out = model(x)
            out = out.float()
            loss = F.cross_entropy(out, y, reduction="none")
            top1 = (out.argmax(-1) == y).float()
            topk = (out.topk(k, dim=-1).indices == y[:, None]).any(-1).float()
            stats.append(torch.stack([loss, top1, topk, valid.float()], dim=1))
        local = torch.cat(stats) if stats else torch.zeros(0, 4, device=self.device)
        allstats = acc.gather_for_metrics(local)
        allstats = allstats[allstats[:, 3] > 0]
        model.train(was_training)
        n = max(1, allstats.shape[0])
        s = allstats[:, :3].sum(0) / n
        return {
            "eval_loss": s[0].item(),
            "eval_top1": 100.0 * s[1].item(),
            "eval_top5": 100.0 * s[2].item(),
            "eval_images": int(allstats.shape[0]),
        }

    # -- the run -------------------------------------------------------------------------------------------------
    def fit(self, max_epochs: int | None = None) -> dict[str, Any]:
        """Train to ``train.epochs`` (or only ``max_epochs`` more epochs: a time-sliced job, resumable later).

        A run stopped by Ctrl-C (:class:`RunInterrupted`), a write that failed (:class:`WriteError`: no space left,
        ...) or an image that does not decode (:class:`DataError`) ends with a message that says where the run
        stands: its last complete checkpoint (intact: written atomically before) and ``--resume latest``."""
        try:
            if not self._setup_done:
                self.setup()
            if self.dry_run:
                return self.dry_run_check()
            try:
                return self._fit(max_epochs)
            finally:
                self.run_dir.release()
                self.close_loaders()
        except BaseException as e:
            stopped = self._stopped(e)
            if stopped is None:
                raise
            raise stopped from e

    def _stopped(self, e: BaseException) -> BaseException | None:
        """``e`` restated with where the run stands, for the ways a run stops that say nothing of it themselves."""
        from timm_drop.training.data import DataError
        from timm_drop.training.files import describe, disk_full

        if isinstance(e, KeyboardInterrupt) and not isinstance(e, RunInterrupted):
            return RunInterrupted(f"stopped by Ctrl-C (KeyboardInterrupt); {self._where_it_stands()}")
        if isinstance(e, WriteError) or (isinstance(e, Exception) and disk_full(e)):
            text = str(e) if isinstance(e, WriteError) else f"a write failed: {describe(e)}"
            return WriteError(f"{text}; {self._where_it_stands()}")
        if isinstance(e, DataError) and self._dir_ready:
            return DataError(f"{e}; {self._where_it_stands()}")
        return None

    def _where_it_stands(self) -> str:
        """The run's last complete checkpoint and how to continue from it (or that there is none yet)."""
        if not self._dir_ready:
            return "the run had not started: nothing was written"
        latest = CheckpointManager(self.out).latest()
        if latest is None:  # nothing to resume: advising --resume latest would only fail
            return "no checkpoint was written yet: start the run again (--overwrite replaces this one)"
        return f"its last complete checkpoint, {latest}, is intact: continue the run with --resume latest"

    def _agree_ema_buffers(self) -> None:
        """Give every process process 0's EMA buffers (BatchNorm statistics), so the processes evaluate one EMA.

        DDP keeps the model's buffers in step by broadcasting process 0's at each forward, but the EMA copy is not
        DDP-wrapped: its statistics follow each process's own batches. Checkpoints hold process 0's EMA, so
        agreeing on it also makes a resumed run's EMA evaluation exact.
        """
        if self.world > 1:
            from accelerate.utils import broadcast

            for buf in self.ema.module.buffers():
                broadcast(buf, from_process=0)

    def close_loaders(self) -> None:
        """Stop the data loaders' worker processes; a later :meth:`fit` (``max_epochs`` slices) starts new ones."""
        for loader in (getattr(self, "train_loader", None), getattr(self, "eval_loader", None)):
            if hasattr(loader, "close"):
                loader.close()

    def _fit(self, max_epochs: int | None) -> dict[str, Any]:
        acc, cfg = self.accelerator, self.cfg
        acc.print(
            f"{cfg.name}: {cfg.model.name} on {cfg.data.dataset} ({self.num_classes} classes), {self.world} process(es) "
            f"on {self.device}, {self.steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs, "
            f"{self.n_regularizers} regularizer module(s)"
            + (", LayerOut" if self.layerout is not None else "")
        )
        last = {}
        end = cfg.train.epochs if max_epochs is None else min(cfg.train.epochs, self.state.epoch + max_epochs)
        for epoch in range(self.state.epoch, end):
            frozen_fraction = None
            if self.layerout is not None:
                if self._resume_point is None:
                    self.layerout.start_epoch(epoch)
                # else a mid-epoch checkpoint restored this epoch's frozen set (and its start's norm counters)
                frozen_fraction = float(self.layerout.frozen_fraction_of_model)
                frozen_layers = float(self.layerout.frozen_fraction)
            try:
                row = {"epoch": epoch + 1, "step": 0}
                row.update(self.train_one_epoch(epoch))
            finally:
                if self.layerout is not None:
                    self.layerout.end_epoch()
            row["step"] = self.state.step
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
                row.update(self.evaluate())
                if self.ema is not None:
                    self._agree_ema_buffers()
                    row.update({f"ema_{k}": v for k, v in self.evaluate(self.ema.module).items()})
            if frozen_fraction is not None:
                # the paper's figure: share of all trainable parameters frozen this epoch
                row["frozen_fraction"] = frozen_fraction
                row["frozen_fraction_units"] = frozen_layers
            regs = _regularizers(self.unwrapped)
            if regs:
                row["reg_strength"] = sum(float(r.strength) for r in regs) / len(regs)
                from timm_drop.summary import summary

                for n, rule in enumerate(summary(self.unwrapped).rules, 1):
                    row[f"rule{n}_strength"] = rule.multiplier
                    row[f"rule{n}_drop_fraction"] = rule.drop_fraction
            self.state.epoch = epoch + 1
            top1 = row.get("eval_top1")
            improved = top1 is not None and top1 > self.state.best_top1
            if improved:
                self.state.best_top1, self.state.best_epoch = top1, epoch + 1
            if self.is_main:
                self.metrics.append(row)
            if cfg.log.trackers:
                acc.log(_flat_scalars(row), step=row["epoch"])
            # the full weights: a collective under FSDP (gathered to the main process), the model's own otherwise
            sd = acc.get_state_dict(self.unwrapped)
            if self.is_main:
                for name in ("last_model.pth", "last_model.safetensors"):
                    self.run_dir.claim(name, name + ".tmp")
                save_weights(sd, self.out / "last_model.pth")
                save_weights_safetensors(sd, self.out / "last_model.safetensors")
                if improved and cfg.checkpoint.save_best:
                    for name in ("best_model.pth", "best_model.safetensors"):
                        self.run_dir.claim(name, name + ".tmp")
                    save_weights(sd, self.out / "best_model.pth")
                    save_weights_safetensors(sd, self.out / "best_model.safetensors")
            if self._epoch_checkpoint_due(epoch):
                if self.is_main:
                    self.run_dir.claim("checkpoints")
                self.ckpt.save(acc, epoch + 1, self._extra_state())
            acc.print(self._log_line(row))
            if cfg.log.mask_every:
                from timm_drop.viz import log_epoch_masks

                if self.is_main:
                    self.run_dir.claim("masks")

                log_epoch_masks(self, epoch)
            last = row
        if not last and self.metrics is not None and self.metrics.rows:
            # nothing left to train (a finished run resumed): report its last epoch, not an empty one
            last = dict(self.metrics.rows[-1])
        summary = {
            "best_top1": self.state.best_top1,
            "best_epoch": self.state.best_epoch,
            "last": last,
            "output_dir": str(self.out),
        }
        if self.is_main:
            rows = self.metrics.rows
            if cfg.log.plot and rows:
                self.run_dir.claim("curves.png", "curves.png.tmp.png")
                plot_curves(
                    rows, self.out / "curves.png", title=f"{cfg.name}: {cfg.model.name} on {cfg.data.dataset}"
                )
            self.run_dir.claim("result.json", "result.json.tmp")
            text = json.dumps(summary, indent=2)
            replace_file(self.out / "result.json", lambda f: f.write(text.encode()))
            if last:
                acc.print(
                    f"done: final eval top-1 {last.get('eval_top1', float('nan')):.2f}%, best "
                    f"{self.state.best_top1:.2f}% (epoch {self.state.best_epoch}); outputs in {self.out}"
                )
        # flush and close the trackers; not acc.end_training(), which also destroys the process group that the
        # caller (and the barrier below) may still use
        for tracker in acc.trackers:
            tracker.finish()
        acc.wait_for_everyone()
        return summary

    def _log_line(self, r: dict[str, Any]) -> str:
        parts = [
            f"epoch {r['epoch']:>3}/{self.cfg.train.epochs}",
            f"train_loss {r['train_loss']:.4f}",
            f"train_top1 {r['train_top1']:6.2f}",
        ]
        if "eval_top1" in r:
            parts += [f"eval_loss {r['eval_loss']:.4f}", f"eval_top1 {r['eval_top1']:6.2f}"]
        if "ema_eval_top1" in r:
            parts.append(f"ema_top1 {r['ema_eval_top1']:6.2f}")
        parts.append(f"lr {r['lr']:.4g}")
        if "frozen_fraction" in r:
            parts.append(f"frozen {100 * r['frozen_fraction']:.1f}%")
        if "reg_strength" in r:
            parts.append(f"reg {r['reg_strength']:.3f}")
        parts.append(f"{r['epoch_time_s']:.1f}s ({r['train_images_per_s']:.0f} img/s)")
        return "  ".join(parts)

    def _checkpoint_cadence(self) -> str:
        c = self.cfg.checkpoint
        text = f"checkpoints: every {c.every} epoch(s)"
        if c.every_steps is None:
            text += " (no mid-epoch checkpoints)"
        else:
            text += (
                f" and every {c.every_steps} optimizer steps ({c.every_steps / self.steps_per_epoch:.3g} epochs of "
                f"{self.steps_per_epoch} steps)"
            )
        return text + f"; keeps the newest {c.total_limit} (epoch and step checkpoints together)"

    def dry_run_check(self) -> dict[str, Any]:
        """Build-only check: one train-mode forward of a stub batch, no optimizer step, nothing written."""
        x = torch.randn(self._stub_shape(), device=self.device)
        y = torch.zeros(len(x), dtype=torch.long, device=self.device)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.model.train()
        with torch.no_grad():  # a build check: train-mode forward through every regularizer, no backward
            out = self.model(x)
        if out.shape != (2, self.num_classes):
            raise ConfigError(
                f"model.name: {self.cfg.model.name} gave logits {tuple(out.shape)}, expected (2, {self.num_classes})"
            )
        if self.mixup is not None:
            y = F.one_hot(y, self.num_classes).float()
        if not torch.isfinite(self.criterion(out.float(), y)):
            raise ConfigError(f"model.name: {self.cfg.model.name} gave a non-finite loss on a stub batch")
        n_params = sum(p.numel() for p in self.unwrapped.parameters())
        groups = optimizer_groups(self.optimizer, self.unwrapped)
        for i, g in enumerate(groups):
            self.accelerator.print(
                f"optimizer group {i}: {g['params']} tensors ({g['numel']} values), weight_decay={g['weight_decay']:g}, "
                f"lr_scale={g['lr_scale']:.4g}: {', '.join(g['names'])}"
            )
        info = {
            "model": self.cfg.model.name,
            "params": n_params,
            "regularizers": self.n_regularizers,
            "layerout": self.layerout is not None,
            "num_classes": self.num_classes,
            "steps_per_epoch": None if self.steps_per_epoch_unknown else self.steps_per_epoch,
            "lr_first": self.lr_schedule(0),
            "lr_last": None if self.steps_per_epoch_unknown else self.lr_schedule(max(0, self.total_steps - 1)),
        }
        printed = dict(info)
        if self.steps_per_epoch_unknown:
            printed["steps_per_epoch"] = f"unknown ({self.steps_per_epoch_unknown})"
        info["data_config"], info["optimizer_groups"] = self.data_config, groups
        info["checkpoint_every_steps"] = self.cfg.checkpoint.every_steps
        self.accelerator.print(self._checkpoint_cadence())
        self.accelerator.print("dry run ok: " + ", ".join(f"{k}={v}" for k, v in printed.items()))
        return info


def train(
    cfg: TrainConfig, *, overwrite: bool = False, resume: str | None = None, dry_run: bool = False
) -> dict:
    """Run (or dry-run) one config; returns a summary dict."""
    return Trainer(cfg, overwrite=overwrite, resume=resume, dry_run=dry_run).fit()


def _env_world_size() -> int:  # pragma: no cover - informational
    return int(os.environ.get("WORLD_SIZE", "1"))
