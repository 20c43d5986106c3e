"""Backward-time saving of LayerOut versus the fraction of parameters frozen.

LayerOut's claimed speed-up (paper section 4.2: "the amount of computation time during back propagation
significantly falls down") comes only from the ``requires_grad_(False)`` path: autograd then skips a frozen
layer's weight-gradient computation, and a layer's input gradient too when every layer before it is frozen.
The grad-nulling path (DDP / torch.compile) computes every gradient and discards the frozen ones, so it saves
nothing; it is measured as a control.

For each freeze probability p (every layer frozen with probability p, the paper's Eq. 1 with v_k = p), several
epochs' frozen sets are drawn with :class:`timm_drop.layerout.LayerOut` and forward, backward and optimizer-step
times are measured (median over iterations, averaged over draws). Two structured strategies bracket the random
one: ``prefix`` freezes the first layers (input gradients stop early too) and ``suffix`` the last ones.

    python benchmarks/layerout_backward.py --model resnet56_cifar --batch-size 64 \
        --out benchmarks/results/layerout_backward_cpu.md
    python benchmarks/layerout_backward.py --device cuda --model resnet110_cifar --batch-size 128 --channels-last
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
from torch import nn

import timm_drop  # noqa: F401  (registers the CIFAR models)
from timm_drop.layerout import LayerOut


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    iters: int,
    warmup: int,
    amp: bool,
) -> tuple[float, float, float]:
    """Median forward, backward and optimizer-step milliseconds over ``iters`` iterations."""
    device = x.device
    fwd, bwd, opt = [], [], []
    for i in range(warmup + iters):
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        optimizer.step()
        _sync(device)
        t3 = time.perf_counter()
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            opt.append(t3 - t2)
    return tuple(1e3 * statistics.median(v) for v in (fwd, bwd, opt))  # type: ignore[return-value]


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=args.num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    n_layers = len(LayerOut().bind(model).unit_names)

    # every configuration is a bound LayerOut plus the epochs whose draws it is timed on; configurations are
    # timed round-robin so that drifting machine load (shared CI runners) hits all of them alike
    configs: list[tuple[str, str, LayerOut, list[int]]] = []

    def add(name: str, how: str, lo: LayerOut, epochs: list[int]) -> None:
        configs.append((name, how, lo.bind(model).attach(optimizer), epochs))

    add("none", "-", LayerOut(freeze_probs=[0.0] * n_layers), [0])
    for p in args.probs:
        add(
            f"random p={p:g}", "requires_grad", LayerOut(freeze_probs=[p] * n_layers), list(range(args.draws))
        )
    for frac in args.structured:
        k = max(1, min(n_layers - 1, round(frac * n_layers)))
        prefix = [1.0] * k + [0.0] * (n_layers - k)
        add(f"prefix {k}/{n_layers} layers", "requires_grad", LayerOut(freeze_probs=prefix), [0])
        add(f"suffix {k}/{n_layers} layers", "requires_grad", LayerOut(freeze_probs=prefix[::-1]), [0])
    for p in args.probs[-1:]:
        lo = LayerOut(freeze_probs=[p] * n_layers, skip_backward=False)
        add(f"random p={p:g}", "grad-nulling (DDP/compile)", lo, list(range(args.draws)))

    samples: dict[str, list[tuple[float, ...]]] = {f"{c[0]}|{c[1]}": [] for c in configs}
    for _ in range(args.rounds):
        for name, how, lo, epochs in configs:
            for epoch in epochs:
                lo.start_epoch(epoch)
                timing = time_step(model, optimizer, x, y, args.iters, args.warmup, args.amp)
                samples[f"{name}|{how}"].append((lo.frozen_fraction,) + timing)
                lo.end_epoch()
    results: list[tuple[str, str, dict[str, float]]] = []
    for name, how, _, _ in configs:
        rows = samples[f"{name}|{how}"]
        frozen = sum(r[0] for r in rows) / len(rows)
        fwd, bwd, opt = (statistics.median(r[i] for r in rows) for i in (1, 2, 3))
        results.append((name, how, dict(frozen=frozen, fwd=fwd, bwd=bwd, opt=opt)))
    baseline = results[0][2]

    fwds = [r["fwd"] for _, _, r in results]
    base_bwd, base_total = baseline["bwd"], baseline["fwd"] + baseline["bwd"] + baseline["opt"]
    lines = [
        f"# LayerOut backward-time saving vs fraction frozen ({device.type})",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {_device_name(device)}; torch {torch.__version__}, timm {timm.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} intra-op threads",
        f"- model: `{args.model}` ({n_layers} Conv/Linear layers, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), batch {args.batch_size}, 32x32 input"
        f"{', bf16 autocast' if args.amp else ''}{', channels_last' if args.channels_last else ''}",
        f"- timing: {args.rounds} round-robin rounds over all rows; per round and frozen set the median of "
        f"{args.iters} iterations after {args.warmup} warm-up; the table shows the median over rounds and "
        f"{args.draws} frozen-set draws (random rows); SGD momentum 0.9, wd 5e-4",
        f"- command: `python benchmarks/layerout_backward.py {' '.join(args.argv)}`",
        f"- noise: the forward pass does (nearly) identical work in every row; its spread across rows "
        f"({min(fwds):.1f}-{max(fwds):.1f} ms, {100 * (max(fwds) / min(fwds) - 1):.0f}%) bounds the timing noise"
        + (
            f"; 1-min load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
            if device.type == "cpu"
            else ""
        ),
        "",
        "| strategy | frozen by | params frozen | fwd ms | bwd ms | step ms | bwd saving | train-step saving |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, how, r in results:
        total = r["fwd"] + r["bwd"] + r["opt"]
        lines.append(
            f"| {name} | {how} | {100 * r['frozen']:.1f}% | {r['fwd']:.1f} | {r['bwd']:.1f} | {r['opt']:.2f} | "
            f"{100 * (1 - r['bwd'] / base_bwd):+.1f}% | {100 * (1 - total / base_total):+.1f}% |"
        )
    lines += [
        "",
        "Expected mechanics: with `requires_grad` toggling autograd drops the frozen layers' weight-gradient "
        "kernels; input gradients are still needed behind the first trainable layer, so prefix freezing "
        "(early layers) saves more backward time per frozen parameter than suffix freezing. The grad-nulling "
        "path (DDP without `find_unused_parameters`, `torch.compile`) computes every gradient and should save "
        "nothing; it is the control row.",
    ]
    return "\n".join(lines) + "\n"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}"


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--model", default="resnet56_cifar")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--draws", type=int, default=2, help="frozen-set draws (epochs) per random row")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin repetitions over all rows")
    ap.add_argument("--probs", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument(
        "--structured", type=float, nargs="*", default=[0.5], help="prefix/suffix layer fractions"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda requested but CUDA is not available")
    report = run(args)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


if __name__ == "__main__":
    main()
