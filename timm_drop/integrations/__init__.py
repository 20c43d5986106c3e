"""Adapters for training stacks we do not own. Each submodule imports its library, so ``import timm_drop``
never needs them: ``from timm_drop.integrations.hf import TimmDropCallback`` (transformers) and
``from timm_drop.integrations.lightning import TimmDropCallback`` (Lightning)."""
