"""Everything a run does before its first step: the :class:`TrainerSetup` half of :class:`~timm_drop.training.loop.Trainer`.

Build order: ``timm.create_model`` -> ``apply_regularizer`` -> channels_last -> SyncBN -> (``train.strategy: fsdp``:
each block its own ``fully_shard`` unit) -> optimizer ->
LayerOut ``bind``/``attach`` -> ``accelerator.prepare`` -> ``torch.compile`` -> EMA (a deepcopy of the unwrapped,
already-regularized model, so the EMA carries its own regularizer modules). Then the checkpoint to resume from
(verified and loaded before the run directory is touched), the run directory, the metrics log and the trackers.

Randomness: the model is initialised under ``set_seed(seed)`` (identical on every rank); after ``prepare`` the
global RNG is re-seeded with ``seed + process_index`` (``device_specific=True``), so regularizer masks differ across
ranks, while the data order (seeded by ``(seed, epoch)``) and LayerOut's frozen set (its own ``(seed, epoch)``
generator) agree. Accelerate's ``rng_types`` is left at its default so it never re-broadcasts rank 0's global RNG.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from timm_drop.training.checkpoint import CheckpointError, CheckpointManager, agreed_problem, is_mid_epoch
from timm_drop.training.config import ConfigError, TrainConfig, config_to_dict, save_config
from timm_drop.training.files import writing
from timm_drop.training.metrics import MetricsLog, flat_scalars
from timm_drop.training.optim import LRSchedule, build_mixup, build_optimizer
from timm_drop.training.run_dir import RunDir, check_output_dir

__all__ = ["TRACKER_PROJECT", "TrainState", "TrainerSetup", "regularizer_modules"]

#: Accelerate ``init_trackers`` project name: the W&B project, and TensorBoard's folder under ``trackers/``
TRACKER_PROJECT = "timm_drop"


@dataclass
class TrainState:
    epoch: int = 0  # finished epochs
    step: int = 0  # optimizer steps taken
    best_top1: float = -1.0
    best_epoch: int = -1
    #: micro-batches of the epoch in progress already trained (0 except in mid-epoch checkpoints)
    batch: int = 0


def _apply_regularizer(model: nn.Module, spec: Any, example_input: torch.Tensor) -> nn.Module:
    try:
        from timm_drop.rewrite import apply_regularizer
    except ImportError:  # pragma: no cover - older layouts export it at top level only
        from timm_drop import apply_regularizer
    return apply_regularizer(model, spec, example_input=example_input)


def regularizer_modules(model: nn.Module) -> list[nn.Module]:
    from timm_drop.regularizers.base import Regularizer

    return [m for m in model.modules() if isinstance(m, Regularizer)]



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


class TrainerSetup:
    """The build steps of a run, in :meth:`setup`'s order; :class:`~timm_drop.training.loop.Trainer` adds the loop.

    Every step stores what it built as an attribute (``accelerator``, ``train_loader``, ``model``, ``optimizer``,
    ``layerout``, ``ema``, ``driver``, ``ckpt``, ``run_dir``, ``metrics``, ...) so tests and hooks can reach in.
    """

    cfg: TrainConfig
    state: TrainState

    # -- setup -------------------------------------------------------------------------------------------------
    def setup(self) -> TrainerSetup:
        """Everything before the first step, in order; a failed check anywhere leaves the output dir untouched."""
        from accelerate.utils import set_seed

        cfg = self.cfg
        acc = self._start_accelerator()
        # Read-only decision now; the directory is created (or a previous run in it replaced) only after every
        # other check below has passed, so a failed start loses nothing and leaves nothing behind.
        cfg_dict = config_to_dict(cfg)
        if not self.dry_run:
            self.dir_mode = self._check_output_dir(cfg_dict)
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
                    config=flat_scalars(config_to_dict(cfg), as_text=True),
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

    def _gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in process order (a collective: every process calls it alike)."""
        if self.world == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def _check_output_dir(self, cfg_dict: dict) -> str:
        """:func:`check_output_dir`, agreed: when any process refuses the directory, every process raises that
        refusal (naming the process), instead of the others going on alone into the collectives of the build.
        (A process sees the directory as it is now: the run's lock still held by process 0 of a previous slice,
        say.)"""
        mode, error = "", None
        try:
            mode = check_output_dir(self.out, cfg_dict, overwrite=self.overwrite, resume=self.resume)
        except (ConfigError, FileNotFoundError) as e:
            error = e
        refusals = self._gather(None if error is None else (isinstance(error, FileNotFoundError), str(error)))
        problem = agreed_problem([r and r[1] for r in refusals])
        if problem is not None:
            missing = next(r for r in refusals if r is not None)[0]
            raise (FileNotFoundError if missing else ConfigError)(problem) from error
        return mode

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
        self.n_regularizers = len(regularizer_modules(model))

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
            path = self.ckpt.resolve(
                self.resume,
                num_processes=self.world,
                log=self.accelerator.print,
                restore=self._restore,
                agree=self._gather,
            )
            self.accelerator.print(f"resumed from {path} at epoch {self.state.epoch}, step {self.state.step}")

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

    def _extra_state(self) -> dict[str, Any]:
        # "driver" is optional for readers (see _restore), so the format stays 1
        d: dict[str, Any] = {"train_state": asdict(self.state), "format": 1, "driver": self.driver.state_dict()}
        if self.layerout is not None:
            d["layerout"] = self.layerout.state_dict()
        if self.ema is not None:
            d["ema"] = self.ema.state_dict()
        return d

