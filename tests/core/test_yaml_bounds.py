"""Bounded YAML reading: alias bombs, recursive aliases and oversized files are refused quickly, by name."""

from __future__ import annotations

import time

import pytest

from timm_drop.yaml_io import YAMLInputError, load_yaml_bounded


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_quickly_naming_source_and_limit():
    text = alias_bomb()
    assert len(text) < 600
    t0 = time.perf_counter()
    with pytest.raises(YAMLInputError) as ei:
        load_yaml_bounded(text, "bomb.yaml")
    assert time.perf_counter() - t0 < 2.0
    assert ei.value.limit == "max_nodes"
    assert "bomb.yaml" in str(ei.value) and "200000" in str(ei.value)


def test_shared_aliases_within_the_bound_load_like_safe_load():
    import yaml

    text = "base: &b {lr: 0.1, wd: 5.0e-4}\nother: *b\nlist: [1, 2, *b]\n"
    data, root = load_yaml_bounded(text, "ok.yaml")
    assert data == yaml.safe_load(text)
    assert root is not None and root.start_mark.line == 0


def test_recursive_alias_is_refused():
    with pytest.raises(YAMLInputError, match="recursive alias") as ei:
        load_yaml_bounded("a: &x [1, *x]\n", "rec.yaml")
    assert "rec.yaml" in str(ei.value)


def test_file_size_bound_is_checked_before_parsing():
    with pytest.raises(YAMLInputError, match="over the limit of 100 bytes") as ei:
        load_yaml_bounded("x: " + "1" * 200, "big.yaml", max_bytes=100)
    assert ei.value.limit == "max_bytes" and "big.yaml" in str(ei.value)


def test_syntax_error_keeps_line_and_column():
    with pytest.raises(YAMLInputError) as ei:
        load_yaml_bounded("a: 1\nb: [1, 2\n", "bad.yaml")
    assert ei.value.limit is None and ei.value.line is not None
    assert str(ei.value).startswith("bad.yaml:")


def test_empty_document_is_none():
    assert load_yaml_bounded("", "empty.yaml") == (None, None)


def test_deep_nesting_is_an_error_not_a_crash():
    with pytest.raises(YAMLInputError) as ei:
        load_yaml_bounded("[" * 800 + "]" * 800, "deep.yaml")
    assert "deep.yaml" in str(ei.value)


def test_nesting_bound_does_not_depend_on_the_interpreters_recursion_limit():
    # torch.compile lifts the limit to 2000 for the rest of the process; other libraries go higher, and a limit
    # above what the C stack holds turns a deep document into a segfault instead of an error
    import sys

    before = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        with pytest.raises(YAMLInputError) as ei:
            load_yaml_bounded("a:\n  - " + "[" * 800 + "]" * 800, "deep.yaml")
    finally:
        sys.setrecursionlimit(before)
    assert ei.value.limit == "max_depth" and ei.value.line == 2
    assert "deep.yaml:2" in str(ei.value) and "nested deeper than" in str(ei.value)
    assert load_yaml_bounded("[" * 50 + "]" * 50, "ok.yaml")[0] is not None  # real configs nest < 10 levels


def test_yaml12_floats_only_when_asked_and_never_for_quoted_text():
    import yaml

    text = "a: 1e-4\nb: '1e-4'\nc: 1.5e3\nd: e3\ne: 2.5e-3\n"
    assert (
        load_yaml_bounded(text, "f.yaml")[0]
        == yaml.safe_load(text)
        == {"a": "1e-4", "b": "1e-4", "c": "1.5e3", "d": "e3", "e": 0.0025}
    )
    assert load_yaml_bounded(text, "f.yaml", yaml12_floats=True)[0] == {
        "a": 1e-4,
        "b": "1e-4",
        "c": 1500.0,
        "d": "e3",
        "e": 0.0025,
    }
    assert yaml.safe_load("x: 1e-4") == {"x": "1e-4"}  # SafeLoader itself is left alone
