"""The one base class of every error timm_drop raises to its users.

``except timm_drop.TimmDropError`` catches a bad spec, a rewrite the model cannot take, a bad recipe config, a
checkpoint that does not match, and the rest. Each error also keeps the built-in base it had before (most are
``ValueError``, file and run errors ``RuntimeError``), so code written against those keeps working.
"""

from __future__ import annotations

__all__ = ["RewriteError", "SiteError", "TimmDropError"]


class TimmDropError(Exception):
    """Base class of every error timm_drop raises to its users."""


class RewriteError(TimmDropError, ValueError):
    """A spec cannot be applied to a model; the message names the rule, site or module involved."""


class SiteError(TimmDropError, ValueError):
    """Site discovery failed for a model (e.g. no example input could be run)."""
