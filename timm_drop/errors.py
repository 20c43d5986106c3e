"""The one base class of every error timm_drop raises to its users.

``except timm_drop.TimmDropError`` catches a bad spec, a rewrite the model cannot take, a bad recipe config, a
checkpoint that does not match, and the rest. Each error also keeps the built-in base it had before (most are
``ValueError``, file and run errors ``RuntimeError``), so code written against those keeps working.
"""

from __future__ import annotations

__all__ = ["TimmDropError"]


class TimmDropError(Exception):
    """Base class of every error timm_drop raises to its users."""
