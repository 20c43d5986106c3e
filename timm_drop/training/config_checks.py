"""Validation of a recipe config: typed construction from raw data, then range and consistency checks by section.

Every problem names the dotted key at fault (``train.precision: must be one of ['no', 'bf16', 'fp16']``) and, for
a value from a YAML file or an override, where it came from (:class:`ConfigSources`); they are collected in one
:class:`ConfigReport` (a :class:`timm_drop.problems.Report`, as a spec's are) and raised together as one
:class:`~timm_drop.training.config_schema.ConfigError`. :func:`build_section` checks names and types against the
schema's dataclasses (unknown keys get a did-you-mean from the same field list); :func:`validate` runs one check
per section (``_check_model``, ``_check_data``...).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from typing import Any, Literal

from timm_drop.problems import Problem, Report, YamlLocator
from timm_drop.suggest import did_you_mean, nearest
from timm_drop.training.config_schema import WORKER_DATASETS, ConfigError, DataConfig, TrainConfig

__all__ = ["ConfigReport", "ConfigSources", "build_section", "validate"]


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


class ConfigSources:
    """Where each value of a raw config came from: overrides first, then the file, then its ``base:`` files."""

    def __init__(self) -> None:
        self.files: list[tuple[str, YamlLocator]] = []  # the config file first, then its bases in order
        self.overrides: list[str] = []

    def add_file(self, name: str, locator: YamlLocator) -> None:
        self.files.append((name, locator))

    def duplicate_keys(self) -> list[Problem]:
        """A key a file's mapping repeats: PyYAML would silently keep the last value (a spec refuses it too)."""
        return [
            Problem(
                "given twice; YAML would silently keep only the last one",
                field=_dotted(path + (key,)),
                source=name,
                line=line,
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


class ConfigReport(Report):
    """Collects every problem of a config (each located through :class:`ConfigSources`); raises them together."""

    def __init__(self, sources: ConfigSources | None = None) -> None:
        super().__init__(ConfigError)
        self.sources = sources if sources is not None else ConfigSources()

    def add(self, key: str | None, message: str) -> None:
        source, line = self.sources.locate(key)
        self.record(Problem(message, field=key, source=source, line=line))

    def add_error(self, error: ConfigError) -> None:
        for p in error.problems:
            self.add(p.field, p.message)

    def check(self, cond: bool, key: str, message: str) -> bool:
        """Record ``key: message`` unless ``cond``; returns ``cond`` so a dependent check can be skipped."""
        if not cond:
            self.add(key, message)
        return cond


# -- generic typed construction ----------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(Problem(message, field=key))


def _coerce(value: Any, tp: Any, key: str, report: ConfigReport) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted for floats. Raises ConfigError naming key;
    a nested section is built field by field, its problems going to ``report``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors: list[Problem] = []
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
        return build_section(tp, value, key, report)
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


def build_section(cls: type, raw: Any, prefix: str, report: ConfigReport) -> Any:
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


# -- semantic checks: one step per section -----------------------------------------------------------------


def validate(cfg: TrainConfig, *, check_paths: bool = True, report: ConfigReport | None = None) -> None:
    """Range and consistency checks; every failure names its key, and all of them are raised together.

    ``check_paths=False`` skips file existence. With ``report`` the problems are added there and not raised.
    """
    own = report is None
    r = report if report is not None else ConfigReport()
    for step in _SECTION_CHECKS:
        step(cfg, r, check_paths)
    if own:
        r.raise_if_any()


def _check_run(cfg: TrainConfig, r: ConfigReport, check_paths: bool) -> None:
    r.check(bool(cfg.output_dir), "output_dir", "must not be empty")
    # numpy's seed range: anything else fails deep inside set_seed, after the run directory exists
    r.check(0 <= cfg.seed <= 2**32 - 1, "seed", f"must be in [0, 2**32 - 1], got {cfg.seed}")


def _check_model(cfg: TrainConfig, r: ConfigReport, check_paths: bool) -> None:
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


def _check_model_name(name: str, r: ConfigReport) -> None:
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


def _check_data(cfg: TrainConfig, r: ConfigReport, check_paths: bool) -> None:
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


def _check_streams(d: DataConfig, r: ConfigReport) -> None:
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


def _check_data_root(d: DataConfig, r: ConfigReport, check_paths: bool) -> None:
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


def _check_augment(d: DataConfig, r: ConfigReport) -> None:
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


def _check_randaugment(text: str, dataset: str, r: ConfigReport) -> None:
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


def _check_optim(cfg: TrainConfig, r: ConfigReport, check_paths: bool) -> None:
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


def _optimizer_info(name: str, r: ConfigReport) -> Any:
    """timm's ``OptimInfo`` for ``name`` (``lookahead_`` prefix allowed); None (and a problem) for an unknown one."""
    import timm.optim

    known = timm.optim.list_optimizers()
    base = name.lower().removeprefix("lookahead_")
    if base not in known:
        hint = did_you_mean(name, known) or " (see timm.optim.list_optimizers())"
        r.add("optim.name", f"{name!r} is not a timm optimizer{hint}")
        return None
    return timm.optim.get_optimizer_info(base)


def _check_train(cfg: TrainConfig, r: ConfigReport, check_paths: bool) -> None:
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


def _check_fsdp(cfg: TrainConfig, r: ConfigReport) -> None:
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


def _check_sched(cfg: TrainConfig, r: ConfigReport, check_paths: bool) -> None:
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


def _check_log(cfg: TrainConfig, r: ConfigReport, check_paths: bool) -> None:
    log = cfg.log
    r.check(log.log_interval >= 1, "log.log_interval", f"must be >= 1, got {log.log_interval}")
    _check_trackers(log.trackers, r)
    r.check(log.mask_every >= 0, "log.mask_every", f"must be >= 0 (0 = never), got {log.mask_every}")


def _check_trackers(names: list[str], r: ConfigReport) -> None:
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


def _check_checkpoint(cfg: TrainConfig, r: ConfigReport, check_paths: bool) -> None:
    c = cfg.checkpoint
    r.check(c.total_limit >= 1, "checkpoint.total_limit", f"must be >= 1, got {c.total_limit}")
    r.check(c.every >= 1, "checkpoint.every", f"must be >= 1, got {c.every}")
    r.check(
        c.every_steps is None or c.every_steps >= 1,
        "checkpoint.every_steps",
        f"must be a positive integer (optimizer steps) or null (epoch checkpoints only), got {c.every_steps}",
    )


def _check_regularizer(cfg: TrainConfig, r: ConfigReport, check_paths: bool) -> None:
    """Only the form here; the spec itself is loaded and checked by :func:`resolve_regularizer`."""
    r.check(
        cfg.regularizer is None or isinstance(cfg.regularizer, (str, dict)),
        "regularizer",
        f"must be a spec mapping, a path to a spec YAML, or null; got {type(cfg.regularizer).__name__}",
    )


def _check_layerout(cfg: TrainConfig, r: ConfigReport, check_paths: bool) -> None:
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


