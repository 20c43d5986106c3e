"""Packaging: a lean core install (torch, timm, pyyaml), the recipe's dependencies in the ``train`` extra, ``dev``
installing both, and ``py.typed`` shipped."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "timm_drop"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CORE = {"torch", "timm", "pyyaml"}
#: import name -> distribution name, where they differ
DISTRIBUTION = {
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
    "PIL": "pillow",
    "pytorch_lightning": "lightning",  # the fallback spelling of lightning.pytorch
}
#: subpackages a user imports explicitly (``import timm_drop`` does not): their packages are extras
OPTIONAL_SUBPACKAGES = ("training", "integrations", "datasets")
#: packages ``import timm_drop`` must work without: the recipe's and the trainer integrations'
NOT_CORE = ("accelerate", "matplotlib", "sklearn", "transformers", "lightning", "pytorch_lightning")


def _names(requirements: list[str]) -> set[str]:
    out = set()
    for req in requirements:
        name = req.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        out.add(name.strip().lower().replace("_", "-"))
    return out


def _imported_modules(node: ast.AST, *, import_time_only: bool) -> list[str]:
    """Top-level module names imported in ``node``; ``import_time_only`` skips function bodies (lazy imports)."""
    found = []
    for child in ast.iter_child_nodes(node):
        if import_time_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(child, ast.Import):
            found += [a.name.split(".")[0] for a in child.names]
        elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
            found.append(child.module.split(".")[0])
        found += _imported_modules(child, import_time_only=import_time_only)
    return found


def _third_party_imports(paths: list[Path], *, import_time_only: bool = False) -> set[str]:
    """Distribution names of the non-stdlib, non-timm_drop modules these files import."""
    found = set()
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        for top in _imported_modules(tree, import_time_only=import_time_only):
            if top not in ("timm_drop", "__future__") and top not in sys.stdlib_module_names:
                found.add(DISTRIBUTION.get(top, top).lower().replace("_", "-"))
    return found


def _files(*parts: str) -> list[Path]:
    return sorted((PACKAGE.joinpath(*parts)).rglob("*.py"))


def test_the_core_install_is_torch_timm_and_pyyaml():
    assert _names(PYPROJECT["project"]["dependencies"]) == CORE


def test_the_core_modules_import_nothing_beyond_the_core_install_when_loaded():
    core_files = [p for p in _files() if p.relative_to(PACKAGE).parts[0] not in OPTIONAL_SUBPACKAGES]
    assert core_files and _third_party_imports(core_files, import_time_only=True) <= CORE


def test_every_import_of_the_package_and_recipes_is_in_the_core_install_or_an_extra():
    declared = CORE.union(*(_names(reqs) for reqs in PYPROJECT["project"]["optional-dependencies"].values()))
    used = _third_party_imports(_files() + sorted((ROOT / "recipes").glob("*.py")))
    assert used - declared == set()


def test_trainer_adapters_import_only_their_trainer_which_the_dev_extra_installs():
    # timm_drop.integrations.<lib> imports <lib>; `import timm_drop` never imports these modules
    dev = _names(PYPROJECT["project"]["optional-dependencies"]["dev"])
    needed = _third_party_imports(_files("integrations")) - CORE - {"pytorch_lightning"}  # lightning's old name
    assert needed == {"transformers", "lightning"} and needed <= dev
    code = "import sys, timm_drop; print([m for m in ('transformers', 'lightning') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


#: recipe modules whose packages are their own extra (read only when a config names them), and that extra
RECIPE_EXTRAS = {"streams.py": "streaming"}


def test_the_train_extra_covers_every_import_of_the_recipe_and_dev_installs_it():
    extras = PYPROJECT["project"]["optional-dependencies"]
    train = _names(extras["train"])
    recipe = [p for p in _files("training") if p.name not in RECIPE_EXTRAS]
    needed = _third_party_imports(recipe + sorted((ROOT / "recipes").glob("*.py")))
    assert needed - CORE - train == set()
    for name, extra in RECIPE_EXTRAS.items():
        own = _third_party_imports([PACKAGE / "training" / name])
        assert own and own - CORE - train <= _names(extras[extra]), name
        assert any(r.replace(" ", "").lower().startswith(f"timm_drop[{extra}") for r in extras["dev"])
    assert {"accelerate", "matplotlib", "scikit-learn", "tqdm"} <= train
    assert "timm-drop[train]" in _names(extras["dev"]) or any(
        r.replace(" ", "").lower().startswith("timm_drop[train") for r in extras["dev"]
    )
    assert {"pytest", "pytest-timeout", "ruff"} <= _names(extras["dev"])


def test_py_typed_is_shipped():
    assert (PACKAGE / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["timm_drop"]


_BLOCKED_IMPORT = """
import importlib.util, sys

# None in sys.modules is how Python spells "not installed" for both `import x` (ImportError) and
# importlib.util.find_spec (None), which torch and timm use to probe optional packages.
for name in {blocked!r}:
    sys.modules[name] = None
try:
    import accelerate
except ImportError:
    pass
else:
    raise SystemExit("the block does not work")
import timm, torch
import timm_drop

model = timm.create_model("resnet10t", pretrained=False)
spec = "rules: [{{regularizer: dropblock, params: {{drop_prob: 0.1, block_size: 3}}, sites: stage, stages: [3]}}]"
timm_drop.apply_regularizer(model, spec, example_input=torch.randn(1, 3, 32, 32))
assert sum(isinstance(m, timm_drop.Regularizer) for m in model.modules()) == 1
assert timm_drop.LayerOut(seed=1).bind(model).unit_names
loaded = sorted(m for m in sys.modules if m.startswith(("timm_drop.training", "timm_drop.tools", "timm_drop.integrations")))
print("loaded:", loaded)
"""


@pytest.mark.timeout(300)
def test_import_timm_drop_and_apply_work_without_the_recipe_dependencies():
    code = _BLOCKED_IMPORT.format(blocked=set(NOT_CORE))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded: []" in proc.stdout  # the recipe, the integrations and the coverage tool stay unloaded
