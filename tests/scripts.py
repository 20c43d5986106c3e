"""Load the repository's scripts (recipes, benchmarks, examples) as modules, the way the tests exercise them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(path: str | Path, name: str | None = None) -> ModuleType:
    """Execute the script at ``path`` (relative paths: from the repository root) as a fresh module.

    The module is registered in ``sys.modules`` under ``name`` while it runs, so dataclasses and pickling can
    resolve it.
    """
    path = Path(path) if Path(path).is_absolute() else REPO / path
    name = name or f"timm_drop_script_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def child_env() -> dict[str, str]:
    """The environment for a child Python process that must compute bit-identically to this one: the same
    intra-op thread count (reductions split differently across threads) and this checkout's ``timm_drop``."""
    import os

    import torch

    return {
        **os.environ,
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
