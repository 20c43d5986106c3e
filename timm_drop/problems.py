"""One validation engine: every problem in a document collected before one error is raised, each located.

Validation that stops at the first problem makes a user fix a file one error per run. The spec loader and the
recipe config loader instead record each :class:`Problem` (what, at which field of which rule or section, in
which file and line) in a :class:`Report` and raise once, listing them all in reading order, as a
:class:`ProblemsError` (``SpecError`` and ``ConfigError`` are its two kinds; each words its document's problems
in that document's way). For documents that came from YAML text, a :class:`YamlLocator` maps a field path such
as ``("rules", 1, "params", "drop_prob")`` to the line of that field and finds keys that a mapping repeats,
which PyYAML would otherwise silently collapse to the last one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import yaml

from timm_drop.errors import TimmDropError

__all__ = ["Problem", "ProblemCollector", "ProblemsError", "Report", "YamlLocator"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a document: what, and where.

    ``field`` is the dotted path of the field at fault (``stage_params.3.drop_prob``, ``train.epochs``),
    ``section`` the part of the document that holds it when the field path alone does not say
    (``rule 2 (dropblock)``), ``source`` the file, text or override that gave the value and ``line``/``column``
    its 1-based place there (None for values given in a dict or left at their default).
    """

    message: str
    field: str | None = None
    section: str | None = None
    source: str | None = None
    line: int | None = None
    column: int | None = None

    @property
    def key(self) -> str | None:
        """The field's dotted key (the recipe config's word for :attr:`field`)."""
        return self.field

    @property
    def rule(self) -> str | None:
        """The rule holding the field (the spec's word for :attr:`section`)."""
        return self.section

    def place(self) -> str:
        """``line 7`` or ``line 7, column 3``; empty without a line."""
        if self.line is None:
            return ""
        return f"line {self.line}" + (f", column {self.column}" if self.column is not None else "")


class ProblemsError(TimmDropError, ValueError):
    """A document that cannot be used; ``problems`` lists every :class:`Problem` found, in reading order.

    Subclasses word the message for their document: :meth:`_one` for a single problem, :meth:`_heading` and
    :meth:`_item` for the bulleted list of several.
    """

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__(self._format())

    def _format(self) -> str:
        if len(self.problems) == 1:
            return self._one(self.problems[0])
        return "\n".join([self._heading(), *(f"  - {self._item(p)}" for p in self.problems)])

    def _one(self, problem: Problem) -> str:
        return self._item(problem)

    def _heading(self) -> str:
        return f"{len(self.problems)} problems:"

    def _item(self, problem: Problem) -> str:
        return f"{problem.field}: {problem.message}" if problem.field else problem.message

P = TypeVar("P", bound=Hashable)


class ProblemCollector(Generic[P]):
    """Problems in the order found, without repeats; :meth:`sorted` gives them back in reading order.

    ``order`` is any sortable key the caller derives from the problem's place (for YAML, its line); problems
    with equal keys keep the order in which they were added.
    """

    def __init__(self) -> None:
        self._items: list[tuple[Any, int, P]] = []
        self._seen: set[P] = set()

    def add(self, problem: P, order: Any = ()) -> None:
        if problem in self._seen:
            return
        self._seen.add(problem)
        self._items.append((order, len(self._items), problem))

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def sorted(self) -> list[P]:
        return [p for _, _, p in sorted(self._items, key=lambda item: (item[0], item[1]))]


class YamlLocator:
    """Field paths -> lines of a composed YAML node tree (``yaml.compose``); every method is safe on None."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.root = root

    def _walk(self, path: Sequence[Any]) -> tuple[yaml.Node | None, int | None, bool]:
        """The deepest node along ``path``, the 0-based line it was reached on, and whether all of it exists."""
        node = self.root
        if node is None:
            return None, None, False
        line = node.start_mark.line
        for step in path:
            child = None
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(step):
                        # the key's line: a block mapping's value starts on the line after its key
                        child, line = value_node, key_node.start_mark.line
            elif (
                isinstance(node, yaml.SequenceNode) and isinstance(step, int) and 0 <= step < len(node.value)
            ):
                child = node.value[step]
                line = child.start_mark.line
            if child is None:
                return node, line, False
            node = child
        return node, line, True

    def line(self, path: Sequence[Any] = ()) -> int | None:
        """1-based line of the field at ``path``, or of its deepest existing parent; None without YAML."""
        _, line, _ = self._walk(path)
        return None if line is None else line + 1

    def node(self, path: Sequence[Any]) -> yaml.Node | None:
        """The node at ``path``, or None when the path does not exist."""
        node, _, found = self._walk(path)
        return node if found else None

    def duplicate_keys(self) -> Iterator[tuple[tuple[Any, ...], str, int]]:
        """``(path of the mapping, key, 1-based line of the repeat)`` for each scalar key given twice.

        Each node is visited once, so a node shared through YAML aliases costs one visit however often it is
        referenced (its repeats are reported at the first path that reaches it).
        """
        if self.root is None:
            return
        seen: set[int] = set()
        stack: list[tuple[yaml.Node, tuple[Any, ...]]] = [(self.root, ())]
        while stack:
            node, path = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            children: list[tuple[yaml.Node, tuple[Any, ...]]] = []
            if isinstance(node, yaml.MappingNode):
                keys: set[str] = set()
                for key_node, value_node in node.value:
                    key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                    if key is not None and key in keys:
                        yield path, key, key_node.start_mark.line + 1
                    if key is not None:
                        keys.add(key)
                    children.append((value_node, path + (key,)))
            elif isinstance(node, yaml.SequenceNode):
                children = [(item, path + (i,)) for i, item in enumerate(node.value)]
            stack.extend(reversed(children))  # document order


class Report:
    """The problems one document's checks find, without repeats, raised together by :meth:`raise_if_any`.

    ``error`` builds the document's error from the problems in reading order; ``order`` given to :meth:`record`
    is any sortable key (for YAML, the line), problems with equal keys keeping the order they were found in.
    """

    def __init__(self, error: Callable[[list[Problem]], Exception]) -> None:
        self.problems: ProblemCollector[Problem] = ProblemCollector()
        self._error = error

    def record(self, problem: Problem, order: Any = ()) -> None:
        self.problems.add(problem, order)

    def has(self, field: str) -> bool:
        """Whether a problem was recorded on ``field`` or inside it."""
        return any(p.field == field or (p.field or "").startswith(field + ".") for p in self.problems.sorted())

    def raise_if_any(self) -> None:
        if self.problems:
            raise self._error(self.problems.sorted())
