"""Create a regularized model by name, and let the spec travel with it.

``timm_drop.create_model("resnet50", spec="specs/dropblock_resnet50.yaml", pretrained=True)`` builds the timm
model (pretrained weights load *before* the rewrite, so the checkpoint's keys meet the original structure), then
applies the spec. It goes through a model registered with timm under :data:`REGISTERED_NAME`, so a script that
only calls ``timm.create_model`` can build the same thing from keyword arguments::

    timm.create_model("timm_drop_regularized", model="resnet50", spec="dropblock.yaml", schedule_steps=10000)

(timm's ``train.py``: ``--model timm_drop_regularized --model-kwargs model=resnet50 spec=dropblock.yaml
schedule_steps=10000``; the name exists once ``timm_drop`` is imported, see :mod:`timm_drop.run`.)

``schedule_steps=N`` turns every scheduled rule into a self-counting one (``schedule: {..., steps: N}``): each
regularizer advances with its own training forwards, for loops that never call :func:`timm_drop.set_progress`.

The model's ``pretrained_cfg`` names :data:`REGISTERED_NAME` as its architecture and carries the base model and
the full spec (as plain data) under :data:`CFG_KEY`; ``timm.models.push_to_hub.save_for_hf`` writes both to
``config.json``, so ``timm.create_model("local-dir:<folder>", pretrained=True)`` (or ``hf-hub:``) rebuilds the same
regularized model with its weights. A spec given as a path is stored by value: the folder does not need the YAML.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
from timm.models import register_model
from torch import nn

from timm_drop.placements import placement_request, placement_spec
from timm_drop.rewrite import apply_regularizer
from timm_drop.spec import Spec, load_spec

__all__ = ["CFG_KEY", "REGISTERED_NAME", "create_model", "with_schedule_steps"]

#: the timm model name whose keyword arguments are ``model`` (a timm name), ``spec`` and ``schedule_steps``
REGISTERED_NAME = "timm_drop_regularized"
#: key of ``pretrained_cfg`` holding ``{"model": <timm name>, "spec": <spec as plain data>}``
CFG_KEY = "timm_drop"


def with_schedule_steps(spec: Any, steps: int | None) -> Spec:
    """``spec`` with every scheduled rule counting its own training forwards over ``steps`` (None: unchanged)."""
    loaded = load_spec(spec)
    if steps is None:
        return loaded
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"schedule_steps must be an integer >= 1, got {steps!r}")
    data = loaded.to_dict()
    for rule in data["rules"]:
        if "schedule" in rule:
            rule["schedule"]["steps"] = steps
    out = load_spec(data)
    object.__setattr__(out, "source", loaded.source)
    return out


@register_model
def timm_drop_regularized(
    pretrained: bool = False,
    model: str | None = None,
    spec: Any = None,
    schedule_steps: int | None = None,
    pretrained_cfg: Any = None,
    pretrained_model_args: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """timm entrypoint: ``timm.create_model(model, pretrained, **kwargs)`` with ``spec`` applied afterwards."""
    stored = pretrained_cfg.get(CFG_KEY) if isinstance(pretrained_cfg, dict) else None
    source_args = dict(pretrained_model_args or {})
    saved = _saved_config_name(pretrained_cfg)
    if stored is not None:
        stored = _stored_spec(stored, saved)
        # Loaded from a saved folder / the Hub: the stored spec wins over the argument recorded beside it
        # (which may be a path that only existed where the model was saved); an explicit new spec still wins.
        if model is None or model == source_args.get("model"):
            model = stored["model"]
        if spec is None or spec == source_args.get("spec"):
            spec = stored["spec"]
    elif source_args and spec is not None and spec == source_args.get("spec") and not isinstance(spec, Mapping):
        # a spec taken from a saved config.json's model_args: data travels with a model, a path never does
        raise ValueError(
            f"{saved}: model_args.spec is {type(spec).__name__} {str(spec)[:80]!r}; a saved model carries its spec "
            f"as a mapping (pretrained_cfg['{CFG_KEY}']['spec']), never as a path or text to read"
        )
    if not isinstance(model, str) or not model:
        raise ValueError(
            f"{REGISTERED_NAME} needs model=<a timm model name>, e.g. "
            f"timm.create_model('{REGISTERED_NAME}', model='resnet50', spec='spec.yaml'); got model={model!r}"
        )
    if model == REGISTERED_NAME:
        raise ValueError(f"{REGISTERED_NAME}: model= must name the model to regularize, not {REGISTERED_NAME}")
    if spec is None:
        raise ValueError(f"{REGISTERED_NAME}(model={model!r}) needs spec=<path, YAML text or mapping>")
    placement = placement_request(spec)  # a placement by name becomes a spec once the model exists
    loaded = with_schedule_steps(spec, schedule_steps) if placement is None else None

    inner_cfg = None
    if isinstance(pretrained_cfg, dict):
        inner_cfg = {k: v for k, v in pretrained_cfg.items() if k != CFG_KEY}
        inner_cfg["architecture"] = model
    elif pretrained_cfg is not None:
        inner_cfg = pretrained_cfg  # a tag or PretrainedCfg of the base model
    inner_args = {k: v for k, v in source_args.items() if k not in ("model", "spec", "schedule_steps")}
    net = timm.create_model(
        model,
        pretrained=pretrained,
        pretrained_cfg=inner_cfg,
        pretrained_model_args=inner_args or None,
        **kwargs,
    )
    if loaded is None:
        loaded = with_schedule_steps(placement_spec(net, placement), schedule_steps)
    apply_regularizer(net, loaded)
    net.pretrained_cfg = dict(
        net.pretrained_cfg, architecture=REGISTERED_NAME, **{CFG_KEY: {"model": model, "spec": loaded.to_dict()}}
    )
    net.default_cfg = net.pretrained_cfg
    return net


def _saved_config_name(pretrained_cfg: Any) -> str:
    """Where a saved model's config came from, for messages: ``<folder>/config.json`` or the Hub id."""
    cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else {}
    where = cfg.get("file") if cfg.get("source") == "local-dir" else cfg.get("hf_hub_id")
    return f"{where}/config.json" if where else "the saved model's config.json"


def _stored_spec(stored: Any, saved: str) -> dict[str, Any]:
    """``pretrained_cfg['timm_drop']`` of a saved model, checked: a registered timm name and a spec *mapping*.

    It comes from a file (config.json) that may not be the user's own, so it is data only: a string there is never
    read as a path (``/etc/passwd`` would be quoted in the error, a FIFO would block forever) nor parsed as YAML
    text, and the base model cannot be another ``local-dir:`` / ``hf-hub:`` source."""
    key = f"pretrained_cfg['{CFG_KEY}']"
    if not isinstance(stored, Mapping):
        raise ValueError(f"{saved}: {key} must be a mapping {{model, spec}}, got {type(stored).__name__}")
    model, spec = stored.get("model"), stored.get("spec")
    if not isinstance(model, str) or not timm.is_model(model) or model == REGISTERED_NAME:
        raise ValueError(f"{saved}: {key}['model'] must name a registered timm model, got {str(model)[:80]!r}")
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{saved}: {key}['spec'] must be the spec itself (a mapping with 'rules'), got {type(spec).__name__} "
            f"{str(spec)[:80]!r}: a spec that travels with a model is data, never a path or text to read"
        )
    return {"model": model, "spec": dict(spec)}


def create_model(model_name: str, spec: Any = None, *, schedule_steps: int | None = None, **timm_kwargs: Any) -> nn.Module:
    """A timm model with ``spec`` applied; ``timm_kwargs`` go to ``timm.create_model`` (``pretrained``,
    ``num_classes``, ...). Without ``spec``, ``model_name`` may be a saved regularized model (``local-dir:...``,
    ``hf-hub:...``), which rebuilds with its stored spec."""
    if spec is None:
        if schedule_steps is not None:
            timm_kwargs["schedule_steps"] = schedule_steps
        return timm.create_model(model_name, **timm_kwargs)
    # by value, so the recorded model args (and config.json) are plain data, not a path or a Spec object
    placement = placement_request(spec)  # a placement travels as {"preset": ...} until the model exists
    spec_data = load_spec(spec).to_dict() if placement is None else placement.to_dict()
    return timm.create_model(
        REGISTERED_NAME, model=model_name, spec=spec_data, schedule_steps=schedule_steps, **timm_kwargs
    )
