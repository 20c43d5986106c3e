"""A short end-to-end training run of the recipe, written up as Markdown: does the whole stack train?

Runs ``recipes/train.py`` on the quickstart config (CorrDrop on a CIFAR ResNet-20, the embedded digits data: no
download) for a few epochs with the precision / memory format / compile settings given, in a temporary output
directory, and reports wall time, final loss and accuracy, next to the device, versions and date.

    python benchmarks/train_smoke.py --device cuda --epochs 2 --precision bf16 --channels-last --compile
    python benchmarks/train_smoke.py --device cpu --epochs 2 --train-subset 32 --batch-size 16   # CPU twin
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

import timm_drop

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "quickstart.yaml"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--precision", default="bf16", choices=["no", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--train-subset", type=int, default=None, help="first N training images (default: all)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    ap.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/train_smoke_<device>.md"
    )
    args = ap.parse_args(argv)
    overrides = [
        f"train.epochs={args.epochs}",
        f"train.precision='{args.precision}'",  # quoted: YAML reads a bare no as false
        f"train.channels_last={str(args.channels_last).lower()}",
        f"train.compile={str(args.compile).lower()}",
        f"train.cpu={str(args.device == 'cpu').lower()}",
        "log.plot=false",
    ]
    if args.batch_size:
        overrides.append(f"data.batch_size={args.batch_size}")
    if args.train_subset:
        overrides += [f"data.train_subset={args.train_subset}", f"data.eval_subset={args.train_subset}"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "recipes" / "train.py"), "--config", str(CONFIG)]
        cmd += overrides + [f"output_dir={Path(tmp) / 'run'}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(
                f"training failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        result = json.loads((Path(tmp) / "run" / "result.json").read_text())
    last = result.get("last") or {}
    if args.device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs)"
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, (int, float)))
    text = "\n".join(
        [
            f"# Training smoke ({args.device})",
            "",
            f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- device: {device}",
            f"- torch {torch.__version__}, timm {timm.__version__}, timm_drop {timm_drop.__version__}, "
            f"Python {platform.python_version()}",
            f"- command: `python recipes/train.py --config recipes/configs/quickstart.yaml {' '.join(overrides)}`",
            "",
            "| epochs | precision | channels_last | compile | wall s (process, incl. start-up) | best top-1 | last epoch |",
            "|---:|---|---|---|---:|---:|---|",
            f"| {args.epochs} | {args.precision} | {args.channels_last} | {args.compile} | {wall:.1f} | "
            f"{result.get('best_top1', float('nan')):.2f} | {metrics} |",
            "",
        ]
    )
    out = args.out or ROOT / "benchmarks" / "results" / f"train_smoke_{args.device}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
