"""The documentation site builds offline with warnings as errors, its generated pages and figures are what their
scripts make today, every registered regularizer has a card and every public name a reference entry, and
README's Python code compiles and names only what timm_drop exports."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import timm_drop

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_{name}", ROOT / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_are_what_the_generator_writes_today(tmp_path):
    gen = _load("gen_pages")
    gen.write(tmp_path)
    fresh = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    committed = {p.relative_to(gen.OUT) for p in gen.OUT.rglob("*") if p.is_file()}
    assert committed == fresh, "docs/generated/ holds files the generator no longer writes, or lacks some"
    stale = [str(r) for r in sorted(fresh) if (tmp_path / r).read_bytes() != (gen.OUT / r).read_bytes()]
    assert stale == [], f"stale generated pages (run python docs/gen_pages.py): {stale}"


def test_every_registered_regularizer_has_a_card_in_the_site_nav():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    methods = next(item["Methods"] for item in nav if "Methods" in item)
    pages = {next(iter(entry.values())) for entry in methods}
    assert {f"generated/methods/{n}.md" for n in timm_drop.list_regularizers()} <= pages


def test_every_public_name_is_in_the_api_reference():
    api = (ROOT / "docs" / "generated" / "api.md").read_text()
    assert [n for n in timm_drop.__all__ if f"## `{n}`" not in api] == []


def _mkdocs_available() -> bool:
    return all(importlib.util.find_spec(m) for m in ("mkdocs", "material", "mkdocstrings_handlers.python"))


@pytest.mark.timeout(600)
@pytest.mark.skipif(not _mkdocs_available(), reason="mkdocs / mkdocs-material / mkdocstrings-python not installed")
def test_the_site_builds_offline_with_warnings_as_errors(tmp_path):
    # Any network use fails: proxies point at a closed port.
    env = dict(os.environ, HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")
    env["NO_MKDOCS_2_WARNING"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=580,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "site" / "generated" / "methods" / "dropblock.html").is_file()
    assert not (ROOT / "site").exists() or (ROOT / "site").resolve() != (tmp_path / "site").resolve()


@pytest.mark.timeout(600)
def test_readme_figure_is_what_readmes_command_draws_today(tmp_path):
    from PIL import Image

    figures = _load("gen_figures")
    (drawn,) = figures.draw(tmp_path, only=["docs/viz_example.png"])
    new = np.asarray(Image.open(drawn).convert("RGB"))
    old = np.asarray(Image.open(ROOT / "docs" / "viz_example.png").convert("RGB"))
    assert new.shape == old.shape
    # Equal pixels (reruns on one machine are byte-identical); a font rasterised differently elsewhere may move a
    # few text pixels, a different mask moves thousands.
    assert (new != old).any(-1).mean() < 0.001


def _readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_compiles_and_uses_only_timm_drops_public_names():
    blocks = _readme_python_blocks()
    assert blocks
    for block in blocks:
        tree = ast.parse(block)  # a SyntaxError fails the test
        used = {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "timm_drop"
        }
        assert used and used <= set(timm_drop.__all__), used - set(timm_drop.__all__)


def test_readme_setup_commands_are_the_ones_ci_runs():
    text = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    first = re.search(r"```bash\n(pip install .*?)\n```", text).group(1)
    assert [c.strip() for c in first.split("&&")[:2]] == [
        ln for ln in ci.splitlines() if ln.startswith("pip install")
    ]
    assert "```bash\npython -m pytest -q\n```" in text and "python -m pytest -q" in ci


def test_readme_viz_command_is_the_figure_scripts():
    text = (ROOT / "README.md").read_text()
    command = re.search(r"(timm-drop viz [^`]*?)\n```", text, flags=re.S).group(1).replace("\\\n", " ")
    args = command.split()[1:]
    assert args[:-1] == _load("gen_figures").README_VIZ_ARGS and args[-1] == "--overwrite"


def test_readme_spec_is_a_valid_spec():
    text = (ROOT / "README.md").read_text()
    specs = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if b.startswith("rules:")]
    assert specs
    for block in specs:
        assert len(timm_drop.load_spec(block).rules) >= 1  # a SpecError names the rule and field at fault
