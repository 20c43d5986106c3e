"""Did-you-mean suggestions: the one place that decides which known names are "near" a mistyped one.

Every error about an unknown name (regularizer, rule field, parameter, site kind, model, module pattern) offers
the nearest known names, so that a typo costs one glance. All of them use :func:`nearest`, so they agree on
what counts as near; :func:`did_you_mean` is the phrase the messages append.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["CUTOFF", "did_you_mean", "nearest"]

#: similarity (``difflib.SequenceMatcher.ratio``) a candidate needs to be suggested: ``blok`` -> ``block``,
#: ``freez_probs`` -> ``freeze_probs``, ``resnet5`` -> ``resnet50``; unrelated names stay out.
CUTOFF = 0.5


def nearest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``candidates`` closest to ``name``, closest first; empty when none is near."""
    return difflib.get_close_matches(str(name), list(candidates), n=n, cutoff=CUTOFF)


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """``"; did you mean 'a' or 'b'?"`` for the nearest candidates, or ``""`` when none is near."""
    near = nearest(name, candidates, n)
    return f"; did you mean {' or '.join(repr(c) for c in near)}?" if near else ""
