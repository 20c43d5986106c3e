"""Every name and number the documentation states exists where it says: README.md, recipes/README.md,
benchmarks/README.md and the site's pages (docs/, generated pages included).

Checked: the repository files they name (code spans, commands), `timm-drop` subcommands and their options, the
options of the repository's scripts (`python recipes/train.py --dry-run`), recipe config keys (`train.epochs=30`,
`data.augment.cutout`), and that a number with a decimal point written next to a results file
(`benchmarks/results/*.md`) in the same paragraph occurs in that file: the docs include results, they do not retype
them. Each check is a function of the text, so ``tests/tools/test_claims.py`` can be pointed at an old README too."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted(
    [ROOT / "README.md", ROOT / "recipes" / "README.md", ROOT / "benchmarks" / "README.md"]
    + [p for p in (ROOT / "docs").rglob("*.md")]
)
TOP_DIRS = ("timm_drop", "recipes", "specs", "benchmarks", "docs", "tests", ".ci")
#: a repository path inside prose or code: starts at a top-level folder, ends at whitespace or punctuation
PATH = re.compile(r"(?<![\w./-])((?:{})/[\w./*{{}}<>\-]*[\w*}}>])".format("|".join(re.escape(d) for d in TOP_DIRS)))
TOP_FILES = re.compile(r"(?<![\w/.-])((?:ARCHITECTURE|README)\.md|pyproject\.toml|mkdocs\.yml)(?![\w-])")
RESULTS = re.compile(r"(?:benchmarks/)?results/[\w.-]+\.md")
DECIMAL = re.compile(r"(?<![\w.])[-+−]?(\d+\.\d+)(?![\w.])")
SCRIPT = re.compile(r"python\s+((?:recipes|benchmarks|docs)/[\w/]+\.py)((?:[^\n]|\\\n)*)")
TIMM_DROP = re.compile(r"\btimm-drop\s+([a-z][\w-]*)((?:[^\n`]|\\\n)*)")
OPTION = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")
#: path forms that are patterns or placeholders, not one file: <name>, NNN, globs, brace patterns
PLACEHOLDER = re.compile(r"[<>*{}]|NNN|_SSS|/x\.|\.\.\.")


def _text(path: Path) -> str:
    return path.read_text()


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- the checks (pure functions of the text) ---------------------------------------------------------------------


def missing_paths(text: str) -> list[str]:
    """Repository paths named in ``text`` that do not exist (placeholders and run outputs are not paths)."""
    bad = []
    for match in PATH.finditer(text):
        path = match.group(1).rstrip(".")
        if PLACEHOLDER.search(path) or path.startswith(("runs/", "docs/generated/methods/")) and "*" in path:
            continue
        if not (ROOT / path).exists():
            bad.append(path)
    for match in TOP_FILES.finditer(text):
        if not (ROOT / match.group(1)).exists():
            bad.append(match.group(1))
    return sorted(set(bad))


@functools.cache
def _cli_options() -> dict[str, set[str]]:
    import argparse

    from timm_drop.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {o for a in p._actions for o in a.option_strings} for name, p in subs.choices.items()}


def bad_cli_uses(text: str) -> list[str]:
    """`timm-drop SUB --opt` uses whose subcommand or option does not exist."""
    options = _cli_options()
    bad = []
    for match in TIMM_DROP.finditer(text):
        sub, rest = match.group(1), match.group(2).split("#")[0]
        if sub not in options:
            bad.append(f"timm-drop {sub}")
            continue
        bad += [f"timm-drop {sub} {o}" for o in OPTION.findall(rest) if o not in options[sub]]
    return bad


def _script_options(script: Path) -> set[str] | None:
    """The ``--options`` a script's argparse parser declares (read from the source, nothing imported)."""
    tree = ast.parse(script.read_text())
    found = {"-h", "--help"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            found |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return found if len(found) > 2 else None


def bad_script_uses(text: str) -> list[str]:
    """`python SCRIPT --opt` uses of a repository script whose file or option does not exist."""
    bad = []
    for match in SCRIPT.finditer(text):
        script, rest = ROOT / match.group(1), match.group(2).split("#")[0]
        if not script.is_file():
            bad.append(match.group(1))
            continue
        options = _script_options(script)
        if options is not None:
            bad += [f"{match.group(1)} {o}" for o in OPTION.findall(rest) if o not in options]
    return bad


@functools.cache
def _config_keys() -> tuple[set[str], set[str]]:
    """(every dotted recipe config key, the keys whose value is free-form: a spec, kwargs, LayerOut's)."""
    from timm_drop.training.config import CONFIG_FIELDS

    keys = {f.name for f in CONFIG_FIELDS}
    free = {f.name for f in CONFIG_FIELDS if f.type.startswith("mapping")}
    return keys, free


@functools.cache
def _model_attributes() -> set[str]:
    import timm

    return set(dir(timm.create_model("resnet10t", pretrained=False)))


SECTIONS = ("model", "data", "optim", "sched", "train", "log", "checkpoint")
CONFIG_KEY = re.compile(r"(?<![\w./-])((?:{})\.[a-z_][\w.]*)(?=[=:`\s,)]|$)".format("|".join(SECTIONS)))
FILE_SUFFIX = re.compile(r"\.(py|ya?ml|md|json|jsonl|png|pt|pth|bin|csv|safetensors|txt|npz)$")


def unknown_config_keys(text: str) -> list[str]:
    """Dotted recipe config keys in ``text`` (``train.epochs=30``, ``data.augment.cutout``) the schema lacks."""
    keys, free = _config_keys()
    bad = []
    for match in CONFIG_KEY.finditer(text):
        key = match.group(1).rstrip(".")
        if text.startswith(": unknown key", match.end(1)):
            continue  # quoting the error a misspelt key gets
        if FILE_SUFFIX.search(key) or key in keys or key.split(".")[:2] == ["model", key.split(".")[1]] and (
            key.split(".")[1] in _model_attributes()
        ):  # `model.feature_info` is Python, not the config's model section
            continue
        if any(key.startswith(f + ".") for f in free):
            continue
        bad.append(key)
    return sorted(set(bad))


def numbers_not_in_cited_results(text: str) -> list[str]:
    """Numbers with a decimal point in a paragraph that names a results file (or in the prose paragraph right after
    one that does), which that file does not contain.

    A paragraph that includes the file (``--8<--``) quotes nothing; a list of several files is checked against
    all of them together."""
    bad = []
    previous: set[str] = set()
    prose_only = re.sub(r"```.*?```", "\n\n", text, flags=re.S)  # code blocks quote code, not results
    for para in re.split(r"\n\s*\n|\n(?=[*-] )", prose_only):  # paragraphs and list items
        own = {m.group(0) for m in RESULTS.finditer(para)}
        is_prose = not para.lstrip().startswith(("#", "*", "-", "|"))
        cited = own or (previous if is_prose else set())
        previous = own
        if not cited or "--8<--" in para:
            continue
        sources = []
        for c in cited:
            path = ROOT / (c if c.startswith("benchmarks/") else "benchmarks/" + c)
            if path.is_file():
                sources.append(path.read_text())
        body = "\n".join(sources)
        prose = RESULTS.sub("", para)
        for match in DECIMAL.finditer(prose):
            if not re.search(rf"(?<![\d.]){re.escape(match.group(1))}(?!\d)", body):
                bad.append(f"{match.group(1)} (cites {', '.join(sorted(cited))})")
    return bad


# -- the tests -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_file_a_doc_names_exists(doc):
    assert missing_paths(_text(doc)) == []


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_timm_drop_subcommand_and_option_a_doc_names_exists(doc):
    assert bad_cli_uses(_text(doc)) == []


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_script_and_option_a_doc_runs_exists(doc):
    assert bad_script_uses(_text(doc)) == []


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_recipe_config_key_a_doc_names_is_in_the_schema(doc):
    assert unknown_config_keys(_text(doc)) == []


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_numbers_next_to_a_results_file_are_that_files_numbers(doc):
    assert numbers_not_in_cited_results(_text(doc)) == []


def test_the_checks_catch_what_they_are_for():
    """Each check fails on the kind of claim it exists for (so a passing run above means something)."""
    assert missing_paths("see `specs/no_such_spec.yaml` and `benchmarks/results/gone.md`") == [
        "benchmarks/results/gone.md",
        "specs/no_such_spec.yaml",
    ]
    assert bad_cli_uses("timm-drop viz M S --no-such-flag\ntimm-drop frobnicate") == [
        "timm-drop viz --no-such-flag",
        "timm-drop frobnicate",
    ]
    assert bad_script_uses("python recipes/train.py --config C --no-such-flag") == ["recipes/train.py --no-such-flag"]
    assert unknown_config_keys("`train.epoch=3` and train.epochs=3") == ["train.epoch"]
    typed = "AttentionDrop +0.37 [-3.45, +4.19] (`benchmarks/results/cpu_lowdata.md`)"
    assert [b.split(" ")[0] for b in numbers_not_in_cited_results(typed)] == ["3.45", "4.19"]
