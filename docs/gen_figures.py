"""Draw the documentation's figures with fixed seeds: rerunning this script redraws them exactly.

    python docs/gen_figures.py               # docs/viz_example.png (README's command) + docs/figures/<method>.png
    python docs/gen_figures.py --out DIR     # the same files under DIR (the docs test compares them)

Every figure comes from the public `timm-drop viz` command (``timm_drop.cli.main``), on an untrained CIFAR
ResNet-20 built with ``pretrained=False`` at ``--seed 0``: the masks fall where an untrained network's activations
put them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: README's figure command, argument for argument (tests/tools/test_claims.py checks README shows exactly this).
README_VIZ_ARGS: list[str] = [
    "viz", "resnet20_cifar", "specs/corrdrop_cifar_resnet.yaml", "--sites", "stage:layer1",
    "--compare", "dropblock,corrdrop,attentiondrop", "--strength", "0.2", "--out", "docs/viz_example.png",
]  # fmt: skip


def card_args(name: str, out: str) -> list[str]:
    """The `timm-drop viz` arguments of a method card's figure: the method alone at layer1, strength 0.2, seed 0."""
    return [
        "viz", "resnet20_cifar", "specs/corrdrop_cifar_resnet.yaml", "--sites", "stage:layer1",
        "--compare", name, "--strength", "0.2", "--seed", "0", "--out", out,
    ]  # fmt: skip


def figures() -> dict[str, list[str]]:
    """Repository-relative PNG path -> the `timm-drop viz` arguments that draw it."""
    from timm_drop.regularizers import list_regularizers

    out = {"docs/viz_example.png": README_VIZ_ARGS}
    for name in list_regularizers():
        path = f"docs/figures/{name}.png"
        out[path] = card_args(name, path)
    return out


def draw(out_root: Path = ROOT, only: list[str] | None = None) -> list[Path]:
    from timm_drop import cli

    written = []
    for rel, args in figures().items():
        if only is not None and rel not in only:
            continue
        target = out_root / rel
        argv = [*args[: args.index("--out")], "--out", str(target), "--overwrite"]
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # viz's own notes; the figure is what matters here
            rc = cli.main(argv)
        if rc not in (0, None):
            raise SystemExit(f"gen_figures: timm-drop {' '.join(args)} failed (exit {rc})")
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT, help="root to write under (default: this checkout)")
    args = ap.parse_args(argv)
    for path in draw(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
