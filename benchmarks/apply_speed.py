"""Wall time of ``apply_regularizer`` (site analysis + rewrite) on timm models, next to one eval forward.

Targets (issue 3): resnet50 <= 1 s on a 2-core CPU machine, the largest ViT tested <= 5 s.

    python benchmarks/apply_speed.py                      # writes benchmarks/results/apply_speed_cpu.md
    python benchmarks/apply_speed.py --models resnet50 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import timm
import torch

import timm_drop

SPECS = {
    "dropblock_resnet50 (36 sites: norm + shortcut, groups 3-4)": "specs/dropblock_resnet50.yaml",
    "droppath on every residual + dropout after every norm": {
        "rules": [
            {
                "regularizer": "droppath",
                "params": {"drop_prob": 0.1},
                "sites": ["residual"],
                "depth_scaling": "linear",
            },
            {"regularizer": "dropout", "params": {"drop_prob": 0.1}, "sites": ["norm"]},
        ]
    },
}
DEFAULT_MODELS = {
    "resnet50": "dropblock_resnet50 (36 sites: norm + shortcut, groups 3-4)",
    "convnext_tiny": "droppath on every residual + dropout after every norm",
    "vit_base_patch16_224": "droppath on every residual + dropout after every norm",
    "vit_large_patch16_224": "droppath on every residual + dropout after every norm",
}


def measure(name: str, spec_label: str, repeats: int) -> dict:
    spec = SPECS[spec_label]
    times = []
    for _ in range(repeats):
        model = timm.create_model(name, pretrained=False)
        start = time.perf_counter()
        timm_drop.apply_regularizer(model, spec)
        times.append(time.perf_counter() - start)
    model.eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        start = time.perf_counter()
        model(x)
        forward = time.perf_counter() - start
    return {
        "model": name,
        "spec": spec_label,
        "median": statistics.median(times),
        "max": max(times),
        "forward": forward,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/apply_speed_cpu.md")
    args = parser.parse_args()
    # Warm the lazy imports (torch.fx, timm layers) once, as any real run has by the time it applies a spec.
    timm_drop.plan(
        timm.create_model("resnet18"),
        {"rules": [{"regularizer": "dropout", "params": {"drop_prob": 0.1}, "sites": ["stage"]}]},
    )
    rows = [measure(m, DEFAULT_MODELS.get(m, next(iter(SPECS))), args.repeats) for m in args.models]
    lines = [
        "# `apply_regularizer` wall time",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- device: CPU ({platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
        f"- torch {torch.__version__}, timm {timm.__version__}, timm_drop {timm_drop.__version__}, "
        f"Python {platform.python_version()}",
        f"- command: `python benchmarks/apply_speed.py --repeats {args.repeats}`; median and max over repeats, "
        "each on a freshly built model; imports warmed first",
        "- targets: resnet50 <= 1 s, the largest ViT <= 5 s",
        "",
        "| model | spec | apply median s | apply max s | one eval forward at the default input, s |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['spec']} | {r['median']:.2f} | {r['max']:.2f} | {r['forward']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
