"""Run a training script nobody can edit with timm_drop's model names registered.

::

    python -m timm_drop.run train.py --model timm_drop_regularized \\
        --model-kwargs model=resnet18 spec=my_spec.yaml schedule_steps=10000 ...
    torchrun --nproc_per_node 2 -m timm_drop.run train.py ...

timm finds models by name in its registry; ``timm_drop_regularized`` (see :mod:`timm_drop.create`) is in it
once ``timm_drop`` is imported, which this module does before running the script as ``__main__`` with its own
arguments (``sys.argv[0]`` is the script, its directory leads ``sys.path``, as ``python SCRIPT`` would).
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    script = argv[0]
    if not os.path.isfile(script):
        print(f"python -m timm_drop.run: error: script {script!r} not found", file=sys.stderr)
        return 2
    import timm_drop  # noqa: F401  (registers timm_drop_regularized with timm)

    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
