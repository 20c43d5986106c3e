"""timm_drop: structured-dropout regularizers placed into any timm model by YAML rules."""

import timm_drop.models  # noqa: F401  (registers the CIFAR timm models)
from timm_drop.create import create_model
from timm_drop.drive import Driver, drive
from timm_drop.errors import TimmDropError
from timm_drop.layerout import LayerOut
from timm_drop.placements import list_placements, placement_spec
from timm_drop.plans import applied_plans
from timm_drop.regularizers import (
    ParamError,
    Regularizer,
    create_regularizer,
    list_regularizers,
    register_regularizer,
)
from timm_drop.rewrite import Plan, RewriteError, apply_regularizer, plan, strip_regularizers
from timm_drop.schedules import Schedule, set_progress
from timm_drop.sites import Site, SiteError, find_sites
from timm_drop.spec import Rule, Spec, SpecError, load_spec
from timm_drop.summary import summary, track_drops

__version__ = "0.1.0"

__all__ = [
    "Driver",
    "LayerOut",
    "ParamError",
    "Plan",
    "Regularizer",
    "RewriteError",
    "Rule",
    "Schedule",
    "Site",
    "SiteError",
    "Spec",
    "SpecError",
    "TimmDropError",
    "applied_plans",
    "apply_regularizer",
    "create_model",
    "create_regularizer",
    "drive",
    "find_sites",
    "list_placements",
    "list_regularizers",
    "load_spec",
    "placement_spec",
    "plan",
    "register_regularizer",
    "set_progress",
    "strip_regularizers",
    "summary",
    "track_drops",
]
