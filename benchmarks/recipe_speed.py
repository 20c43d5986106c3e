#!/usr/bin/env python
"""Training throughput of the recipe vs a bare loop, in the same process, on CIFAR-10-shaped data.

    python benchmarks/recipe_speed.py                              # CUDA: resnet18_cifar, batch 512, bf16, channels_last
    python benchmarks/recipe_speed.py --compile                    # + torch.compile on both sides
    python benchmarks/recipe_speed.py --device cpu --small         # a CPU smoke version (resnet20_cifar, batch 64)

* **recipe**: ``timm_drop.training.Trainer`` on a 32x32x3 uint8 dataset held on the device (the recipe's
  ``DeviceLoader``: per-epoch permutation, pad-4 crop + flip on the device), Accelerate's mixed precision,
  channels_last, the LR schedule, ``set_progress`` every step, the NaN check every ``log_interval`` steps.
  One warm-up epoch, then a timed epoch (the recipe's own ``train_images_per_s``).
* **bare**: the same timm model, optimizer and precision in a plain loop over pre-normalised tensors already on
  the device (random batch indices, no augmentation, no Accelerate), timed over the same number of steps after
  the same warm-up.

The images are random (speed does not depend on pixel values). Writes a Markdown table (``--out``) with the
device, date and versions. The ratio recipe/bare is the overhead of everything the recipe adds.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(
    model_name: str,
    batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
    precision: str,
    channels_last: bool,
    compile_: bool,
) -> float:
    import timm

    import timm_drop  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if compile_:
        model = torch.compile(model)
    n = max(batch * 4, 4096)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x_all = torch.randn(n, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y_all = torch.randint(0, 10, (n,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    model.train()

    def step():
        idx = torch.randint(0, n, (batch,), device=device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x_all[idx]).float(), y_all[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def recipe(
    model_name: str,
    batch: int,
    steps: int,
    device: torch.device,
    precision: str,
    channels_last: bool,
    compile_: bool,
    regularizer: str,
    tmp: Path,
) -> float:
    from timm_drop.training import Trainer, load_config

    n = batch * steps
    rng = np.random.default_rng(0)
    npz = tmp / "cifar_shaped.npz"
    np.savez(
        npz,
        x_train=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, n),
        x_test=rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, batch),
    )
    raw = {
        "output_dir": str(tmp / "run"),
        "model": {"name": model_name},
        "data": {
            "dataset": "npz",
            "root": str(npz),
            "batch_size": batch,
            "eval_batch_size": batch,
            "num_classes": 10,
            "augment": {"crop_padding": 4, "hflip": True},
        },
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "sched": {"name": "cosine"},
        "train": {
            "epochs": 2,
            "precision": precision,
            "channels_last": channels_last,
            "compile": compile_,
            "cpu": device.type == "cpu",
        },
        "log": {"progress_bar": False, "log_interval": 50},
    }
    if regularizer != "none":
        raw["regularizer"] = {
            "rules": [
                {
                    "regularizer": regularizer,
                    "params": {"drop_prob": 0.1, "block_size": 5},
                    "sites": ["stage"],
                    "stages": [1, 2, 3],
                }
            ]
        }
    trainer = Trainer(load_config(raw)).setup()
    trainer.train_one_epoch(0)  # warm-up (cudnn autotune / compile)
    return trainer.train_one_epoch(1)["train_images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="CPU-sized run: resnet20_cifar, batch 64, 6 steps")
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--precision", choices=["no", "bf16", "fp16"], default=None)
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--regularizer", default="none", help="none | dropblock | corrdrop (at the 3 stage outputs)"
    )
    ap.add_argument("--out", default=None, help="Markdown file to write (default: print only)")
    a = ap.parse_args()
    device = torch.device(a.device)
    model = a.model or ("resnet20_cifar" if a.small else "resnet18_cifar")
    batch = a.batch_size or (64 if a.small else 512)
    steps = a.steps or (6 if a.small else 50)
    precision = a.precision or ("no" if device.type == "cpu" else "bf16")
    channels_last = not a.no_channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with tempfile.TemporaryDirectory() as tmp:
        r = recipe(model, batch, steps, device, precision, channels_last, a.compile, a.regularizer, Path(tmp))
    b = bare_loop(model, batch, steps, steps, device, precision, channels_last, a.compile)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    threads = torch.get_num_threads()
    lines = [
        f"# Recipe throughput vs a bare loop ({device.type})",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {name}, torch {torch.__version__}, "
        f"{threads} CPU threads; {model}, batch {batch}, {steps} timed steps after a same-length warm-up, "
        f"precision {precision}, channels_last {channels_last}, compile {a.compile}, regularizer {a.regularizer}. "
        f"Load average during the run: {os.getloadavg()[0]:.1f} (on a shared machine, CPU numbers are noisy).",
        "",
        "| loop | images/s | relative |",
        "|---|---:|---:|",
        f"| bare (tensors on device, no augmentation) | {b:,.1f} | 1.00 |",
        f"| recipe (DeviceLoader crop+flip, Accelerate, schedules) | {r:,.1f} | {r / b:.2f} |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
