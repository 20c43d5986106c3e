"""The names timm_drop writes into a model, in one place: every module that reads or writes them imports them here.

A rewritten model carries its insertions under :data:`RECORD` and its applied plans under :data:`PLANS` (both in
the root's ``__dict__``, not submodules, so ``state_dict`` keys do not change); hook holders live in an
``nn.ModuleDict`` named :data:`SIDE`; a rewritten block's regularizer children are named ``CHILD_PREFIX + ...``.
"""

from __future__ import annotations

__all__ = ["CHILD_PREFIX", "LEGACY_PLAN", "PLANS", "RECORD", "SIDE"]

#: model.__dict__ key: the list of insertions the model received, oldest first
RECORD = "_timm_drop_record"
#: model.__dict__ key: the list of plans applied to the model, oldest first (timm_drop.applied_plans)
PLANS = "_timm_drop_plans"
#: model.__dict__ key of the single plan models pickled before the plans were a list
LEGACY_PLAN = "_timm_drop_plan"
#: name of the nn.ModuleDict that holds the regularizers of hooked sites
SIDE = "_timm_drop_regularizers"
#: prefix of the regularizer children a block-local rewrite adds to a module
CHILD_PREFIX = "timm_drop_"
