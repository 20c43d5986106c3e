#!/usr/bin/env python
"""Short-schedule reproduction table: one model, one seed, one schedule, six regularization settings.

    python recipes/reproduce.py --epochs 30 --out runs/reproduce            # CIFAR-10 via torchvision download
    python recipes/reproduce.py --data-root /data/cifar --no-download ...   # local cifar-10-batches-py
    python recipes/reproduce.py --launcher "accelerate launch --multi_gpu --num_processes 8" ...

Every row starts from ``recipes/configs/baseline_<model>_cifar10.yaml``-style training (SGD 0.9, LR 0.1 with a
cosine decay here so a short run ends annealed, pad-4 crop + flip, the given epochs) and differs only in the
regularizer or LayerOut section, with the paper placement of each method:

* baseline — nothing
* dropblock — DropBlock (drop 0.1, block 3, linear ramp) after the blocks of the last two stages
* corrdrop — CorrDrop after each stage, block sizes 9/7/5, drop 0.1, linear ramp (CorrDrop Table 1)
* selectscale — SelectScale after every convolution, top rate 0.2, q 1.0 (SelectScale Table 1, CIFAR-10)
* attentiondrop — AttentionDrop (ad) after stages 1-2, drop 0.1 ramped over half the run, top rate 0.2
* layerout — LayerOut with a random freeze vector after a warm-up of 10% of the epochs

Each run is a separate ``recipes/train.py`` process (so any launcher works); the table (Markdown) gets the final and
best eval top-1, the wall time and, for LayerOut, the mean frozen fraction. Short schedules rank methods only
roughly: the papers' gains are 0.2-1% after 200+ epochs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _linear(end: float = 1.0) -> dict:
    return {"kind": "linear", "start": 0.0, "end": end}


VARIANTS: dict[str, dict] = {
    "baseline": {"regularizer": None, "layerout": None},
    "dropblock": {
        "regularizer": {
            "rules": [
                {
                    "regularizer": "dropblock",
                    "params": {"drop_prob": 0.1, "block_size": 3},
                    "sites": ["block"],
                    "stages": [2, 3],
                    "schedule": _linear(),
                }
            ]
        }
    },
    "corrdrop": {
        "regularizer": {
            "rules": [
                {
                    "regularizer": "corrdrop",
                    "params": {"drop_prob": 0.1},
                    "sites": ["stage"],
                    "stages": [1, 2, 3],
                    "schedule": _linear(),
                    "stage_params": {1: {"block_size": 9}, 2: {"block_size": 7}, 3: {"block_size": 5}},
                }
            ]
        }
    },
    "selectscale": {
        "regularizer": {
            "rules": [
                {
                    "regularizer": "selectscale",
                    "params": {"top_rate": 0.2, "q": 1.0},
                    "sites": ["module"],
                    "type": "Conv2d",
                }
            ]
        }
    },
    "attentiondrop": {
        "regularizer": {
            "rules": [
                {
                    "regularizer": "attentiondrop",
                    "params": {"drop_prob": 0.1, "top_rate": 0.2, "mode": "ad"},
                    "sites": ["stage"],
                    "stages": [1, 2],
                    "schedule": _linear(0.5),
                }
            ]
        }
    },
    "layerout": {"layerout": {"freeze_probs": "random", "unit": "layer", "seed": 0}},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20_cifar")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--no-download", action="store_true")
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run a subset of the rows")
    ap.add_argument("--out", default="runs/reproduce")
    ap.add_argument("--launcher", default=f"{shlex.quote(sys.executable)}", help="command that runs train.py")
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every run")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in a.only or list(VARIANTS):
        variant = VARIANTS[name]
        run_dir = out / name
        overrides = [
            f"name={name}",
            f"output_dir={run_dir}",
            f"seed={a.seed}",
            f"model.name={a.model}",
            "data.dataset=cifar10",
            f"data.root={a.data_root}",
            f"data.download={'false' if a.no_download else 'true'}",
            f"data.batch_size={a.batch_size}",
            "sched.name=cosine",
            "sched.milestone_fractions=null",
            "sched.milestones=null",
            f"train.epochs={a.epochs}",
            f"train.precision={a.precision}",
            f"regularizer={json.dumps(variant.get('regularizer'))}",
        ]
        layerout = variant.get("layerout")
        if layerout is not None:
            layerout = dict(layerout, warmup_epochs=max(1, a.epochs // 10))
        overrides.append(f"layerout={json.dumps(layerout)}")
        cmd = shlex.split(a.launcher) + [
            str(HERE / "train.py"),
            "--config",
            str(HERE / "configs" / "baseline_resnet20_cifar10.yaml"),
        ]
        cmd += overrides + list(a.extra) + (["--overwrite"] if a.overwrite else [])
        print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd)
        wall = time.time() - t0
        row = {"name": name, "rc": rc, "wall_min": wall / 60}
        if rc == 0:
            metrics = [
                json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()
            ]
            row["final"] = metrics[-1].get("eval_top1")
            row["best"] = max(m.get("eval_top1", 0.0) for m in metrics)
            ff = [
                m["frozen_fraction"] for m in metrics if "frozen_fraction" in m and m["frozen_fraction"] > 0
            ]
            row["frozen"] = sum(ff) / len(ff) if ff else None
        rows.append(row)
    lines = [
        f"# Short-schedule reproduction: {a.model}, CIFAR-10, {a.epochs} epochs, seed {a.seed}",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; batch {a.batch_size} per process, "
        f"cosine LR from 0.1, precision {a.precision}. One seed: differences below ~0.3% are noise.",
        "",
        "| method | final top-1 (%) | best top-1 (%) | mean frozen (% params) | wall (min) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["rc"] != 0:
            lines.append(f"| {r['name']} | failed (exit {r['rc']}) | | | {r['wall_min']:.1f} |")
            continue
        frozen = f"{100 * r['frozen']:.1f}" if r.get("frozen") is not None else ""
        lines.append(f"| {r['name']} | {r['final']:.2f} | {r['best']:.2f} | {frozen} | {r['wall_min']:.1f} |")
    table = "\n".join(lines) + "\n"
    (out / "reproduce.md").write_text(table)
    print(table)
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
