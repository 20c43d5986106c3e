"""One bounded YAML reader for every file timm_drop parses (specs, recipe configs).

``yaml.safe_load`` never runs code, but it happily builds a small document whose *expanded* size is huge: each
alias (``*a``) shares one node, so nine nine-fold aliases make a 422-byte file describe ~10^8 values. The
loader itself stays cheap (the values are shared), the blow-up comes later, in whatever walks the data as a tree
(``copy.deepcopy``, ``dataclasses.asdict``, a duplicate-key check, ``yaml.safe_dump``). So the bound is taken on
the composed node tree, counting every node as often as aliases make it appear, before anything is constructed:
linear in the file's size, whatever the file says. Recursive aliases (``&a [*a]``) are refused too.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from timm_drop.errors import TimmDropError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_NODES",
    "YAMLInputError",
    "load_yaml_bounded",
]

#: far above any real spec or config (the largest shipped ones are a few KiB)
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
#: nodes after alias expansion (every key, value and item counts); shipped configs use well under a thousand
DEFAULT_MAX_NODES = 200_000
#: nested collections; shipped configs nest under 10 levels. Checked on the parser's events, before PyYAML's
#: recursive composer runs, so the bound is this number and not whatever recursion limit the process has
DEFAULT_MAX_DEPTH = 100


class YAMLInputError(TimmDropError, ValueError):
    """A YAML document that is malformed or over a limit. ``str()`` names the source and the problem.

    ``limit`` is ``"max_bytes"``, ``"max_nodes"``, ``"recursive alias"`` or ``"max_depth"`` when a bound was hit
    (None for a syntax error); ``line``/``column`` are 1-based where the parser knows them.
    """

    def __init__(
        self,
        source: str,
        problem: str,
        *,
        line: int | None = None,
        column: int | None = None,
        limit: str | None = None,
    ) -> None:
        self.source, self.problem, self.line, self.column, self.limit = source, problem, line, column, limit
        where = source if line is None else f"{source}:{line}" + (f":{column}" if column is not None else "")
        super().__init__(f"{where}: {problem}")


def _expanded_size(root: yaml.Node, source: str, max_nodes: int) -> int:
    """Node count with aliases expanded, memoised per shared node; raises past ``max_nodes`` or on a cycle."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    # iterative post-order walk: deep nesting must not hit Python's recursion limit here
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            total = 1 + sum(size[id(c)] for c in _children(node))
            if total > max_nodes:
                raise YAMLInputError(
                    source,
                    f"document expands to more than {max_nodes} YAML nodes (aliases included; from line "
                    f"{node.start_mark.line + 1}); refusing to load it",
                    line=node.start_mark.line + 1,
                    limit="max_nodes",
                )
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise YAMLInputError(
                source,
                "recursive alias (a node that contains itself); refusing to load it",
                line=node.start_mark.line + 1,
                limit="recursive alias",
            )
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            cid = id(child)
            if cid in on_path:
                raise YAMLInputError(
                    source,
                    "recursive alias (a node that contains itself); refusing to load it",
                    line=child.start_mark.line + 1,
                    limit="recursive alias",
                )
            if cid not in size:
                stack.append((child, False))
    return size[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_depth(loader_type: type, text: str | bytes, source: str, max_depth: int) -> None:
    """Raise where the document's collections nest deeper than ``max_depth`` (an event scan: no recursion)."""
    depth = 0
    for event in yaml.parse(text, Loader=loader_type):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > max_depth:
                mark = event.start_mark
                raise YAMLInputError(
                    source,
                    f"YAML nested deeper than {max_depth} levels",
                    line=mark.line + 1,
                    column=mark.column + 1,
                    limit="max_depth",
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


class _Yaml12FloatLoader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats without a dot (``1e-4``, ``5E3``) as floats, not strings."""


_Yaml12FloatLoader.add_implicit_resolver(  # copies SafeLoader's resolvers first: SafeLoader is unchanged
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml_bounded(
    text: str | bytes,
    source: str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_nodes: int = DEFAULT_MAX_NODES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    yaml12_floats: bool = False,
) -> tuple[Any, yaml.Node | None]:
    """``yaml.safe_load(text)`` within bounds; returns ``(data, root_node)`` (``(None, None)`` for an empty doc).

    The node tree is returned for callers that map data back to line numbers or check duplicate keys. Raises
    :class:`YAMLInputError` naming ``source`` for a syntax error, more than one document, a text over
    ``max_bytes``, collections nested deeper than ``max_depth``, a document expanding to over ``max_nodes`` nodes,
    or a recursive alias.
    ``yaml12_floats=True`` reads unquoted ``1e-4`` as a float, as YAML 1.2 does (YAML 1.1 needs ``1.0e-4``).
    """
    n_bytes = len(text.encode("utf-8")) if isinstance(text, str) else len(text)
    if n_bytes > max_bytes:
        raise YAMLInputError(
            source, f"file is {n_bytes} bytes, over the limit of {max_bytes} bytes", limit="max_bytes"
        )
    loader_type = _Yaml12FloatLoader if yaml12_floats else yaml.SafeLoader
    loader = loader_type(text)
    try:
        _check_depth(loader_type, text, source, max_depth)
        root = loader.get_single_node()
        if root is None:
            return None, None
        _expanded_size(root, source, max_nodes)
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or "invalid YAML"
        if exc.context:
            what += f" ({exc.context})"
        line = mark.line + 1 if mark is not None else None
        column = mark.column + 1 if mark is not None else None
        raise YAMLInputError(source, f"YAML syntax error: {what}", line=line, column=column) from None
    except yaml.YAMLError as exc:
        raise YAMLInputError(source, f"YAML syntax error: {exc}") from None
    except RecursionError:
        raise YAMLInputError(source, "YAML nested too deeply to parse", limit="max_depth") from None
    finally:
        loader.dispose()
    return data, root
