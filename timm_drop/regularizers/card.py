"""A method's paper card: where it comes from and what its paper reports, declared on the regularizer class.

``timm-drop list`` prints each method's card line and the docs' method cards are generated from it, so the facts
live in one place: the method's own file. ``reported`` quotes the paper's headline number with its setting
(checked against the paper text); for a baseline it says where its number comes from.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodCard:
    """Paper metadata of a regularizer.

    Attributes:
        title: the paper's title.
        authors: short author list (``"Ghiasi et al."``).
        year: publication year.
        venue: short venue name (``"NeurIPS"``, ``"ICASSP"``).
        url: a stable link to the paper (arXiv abstract or DOI).
        summary: one line: what the method does.
        reported: what the paper reports, with model, data set and the baseline it improves on.
        draws: what the method draws at random per training forward (and in which dtype), for its card; a
            controller that draws nothing per forward (LayerOut) leaves it empty.
    """

    title: str
    authors: str
    year: int
    venue: str
    url: str
    summary: str
    reported: str
    draws: str = ""

    def __post_init__(self) -> None:
        for name in ("title", "authors", "venue", "url", "summary", "reported"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"MethodCard.{name} must be a non-empty string, got {value!r}")
        if "\n" in self.summary:
            raise ValueError(f"MethodCard.summary must be one line, got {self.summary!r}")
        if not self.url.startswith(("https://", "http://")):
            raise ValueError(f"MethodCard.url must be an http(s) link, got {self.url!r}")
        if isinstance(self.year, bool) or not isinstance(self.year, int) or not 1900 <= self.year <= 2100:
            raise ValueError(f"MethodCard.year must be a year as an integer, got {self.year!r}")

    @property
    def cite(self) -> str:
        """``"Ghiasi et al., NeurIPS 2018"``."""
        return f"{self.authors}, {self.venue} {self.year}"

    def line(self) -> str:
        """The one-line summary with its citation, as ``timm-drop list`` prints it."""
        return f"{self.summary} ({self.cite})"
