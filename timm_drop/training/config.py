"""Training-recipe configuration: one YAML file, ``key=value`` overrides, validation before any work starts.

A config is a tree of small dataclasses (:class:`TrainConfig` at the root). Loading goes

    YAML file -> dict -> dotted ``key=value`` overrides -> typed, validated dataclasses

and every problem names the dotted key at fault (``train.precision: must be one of ['no', 'bf16', 'fp16']``)
and, for a value from a YAML file, the file and line. A config with several mistakes gets them all in one
:class:`ConfigError` (collected in a :class:`timm_drop.problems.Report`, as a spec's are).
The resolved config (with the regularizer spec inlined) is what :func:`save_config` writes next to the run's
outputs, so ``--config <run>/config.yaml`` reproduces the run.

The config lives in three modules that depend one way: :mod:`~timm_drop.training.config_schema` (the sections
as dataclasses, each field with its help: :data:`CONFIG_FIELDS`, :func:`config_field_table`),
:mod:`~timm_drop.training.config_checks` (types, ranges, consistency) and this one (files, ``base:``,
overrides, the spec, saving); every public name is importable from here.

Choices where timm's ``train.py`` differs:

* ``data.batch_size`` is per process (Accelerate's convention); the global batch is
  ``batch_size * num_processes * grad_accum_steps``. The learning rate is used as given (no implicit scaling).
* LR milestones are given either in epochs (``sched.milestones``) or as fractions of the run
  (``sched.milestone_fractions``: the CorrDrop/AttentionDrop papers' "0.4, 0.6, 0.8 of total epochs"), so a
  shortened run (``train.epochs=10``) keeps the paper's shape.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from timm_drop.problems import Problem, YamlLocator
from timm_drop.training.config_checks import ConfigReport, ConfigSources, build_section, validate
from timm_drop.training.config_schema import (
    CONFIG_FIELDS,
    WORKER_DATASETS,
    AugmentConfig,
    CheckpointConfig,
    ConfigError,
    ConfigProblem,
    DataConfig,
    EmaConfig,
    HfdsConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    SchedConfig,
    TrainConfig,
    TrainSection,
    WdsConfig,
    config_field_table,
    config_to_dict,
)
from timm_drop.yaml_io import YAMLInputError, load_yaml_bounded

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
    "apply_overrides",
    "config_field_table",
    "config_to_dict",
    "diff_configs",
    "load_config",
    "parse_overrides",
    "resolve_regularizer",
    "save_config",
    "validate",
]


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
            raise ConfigError(Problem(f"spec file not found: {src!r}", field="regularizer"))
        src = str(path)
    try:
        spec = load_spec(src)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(Problem(str(e), field="regularizer")) from e
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


def _resolve_base(raw: dict, path: Path, seen: tuple[Path, ...], sources: ConfigSources) -> dict:
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
    report = ConfigReport(sources)
    for problem in sources.duplicate_keys():
        report.record(problem)
    cfg = build_section(TrainConfig, raw, "", report)
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


def _read_raw(src: str | os.PathLike | dict | None) -> tuple[dict, Path | None, ConfigSources]:
    """The raw config (``base:`` files merged in), the folder relative spec paths resolve against, and where
    each value came from."""
    sources = ConfigSources()
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
