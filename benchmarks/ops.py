"""Forward + backward time of every registered regularizer next to the reference ops, in one run.

Rows: every name in ``timm_drop.list_regularizers()``, built with ``create_regularizer`` and representative
paper settings; then the references ``timm.layers.DropBlock2d`` (its default channel-coupled mask, and per
channel like Algorithm 1),
``torchvision.ops.drop_block2d``, ``F.dropout2d``, ``F.dropout`` and a plain multiply by a 0-dim tensor.
A last table gives the realised DropBlock drop fraction of timm_drop, timm and torchvision at p = 0.1.

Every row is timed as ``y = op(x); y.backward(g)`` on the same input, median over repeats interleaved across
rows, eager and (optionally) ``torch.compile``d. Ratios are reported against timm's DropBlock2d (eager vs
eager, compiled vs compiled) and against the memory-bound floor: a forward+backward of an elementwise op
must at least read and write the activation once each way, 4 x numel x itemsize bytes, at the bandwidth
measured by ``copy_`` on the same tensor in this run (floor = 2 x copy time).

    python benchmarks/ops.py --device cuda                     # (256,1024,14,14) and (256,256,56,56), bf16
    python benchmarks/ops.py --device cpu --small --no-compile # small shapes, < 60 s on a 2-core box
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import timm_drop
from timm_drop.regularizers import regularizer_params

SHAPES = [(256, 1024, 14, 14), (256, 256, 56, 56)]
SMALL_SHAPES = [(4, 256, 14, 14), (4, 64, 56, 56)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: Values for parameters, by parameter name (DropBlock paper: p 0.1, bs 7; SelectScale: t 0.2, q 0.4).
PARAM_VALUES: dict[str, object] = {"drop_prob": 0.1, "block_size": 7, "q": 0.4, "top_rate": 0.2}
#: Extra settings benchmarked as separate rows.
VARIANTS: dict[str, list[dict[str, object]]] = {
    "dropblock": [{}, {"per_channel": False}],
    "attentiondrop": [{"mode": "ad"}, {"mode": "am"}, {"mode": "sm"}],
}
REFERENCE = "timm DropBlock2d"
#: The row whose compiled - eager time is the compiled runtime's fixed cost per call (guards, autograd wrapper).
CALL_COST_REFERENCE = "plain multiply"


class _Fn(nn.Module):
    """Wraps a functional reference so it can be compiled and called like the regularizers."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("s", torch.tensor(1.0 / 0.9), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


def registered_rows() -> list[tuple[str, str, Callable[[], nn.Module]]]:
    rows = []
    for name in timm_drop.list_regularizers():
        params = regularizer_params(name)
        required = [k for k, v in params.items() if v is inspect.Parameter.empty]
        missing = [k for k in required if k not in PARAM_VALUES]
        if missing:
            print(
                f"skipping {name!r}: no benchmark value for required parameter(s) {missing}", file=sys.stderr
            )
            continue
        # Shared vocabulary: every parameter we have a value for is set, so rows are comparable.
        base = {k: PARAM_VALUES[k] for k in params if k in PARAM_VALUES}
        for extra in VARIANTS.get(name, [{}]):
            kwargs = {**base, **{k: v for k, v in extra.items() if k in params}}
            label = ", ".join(f"{k}={v}" for k, v in kwargs.items())
            rows.append((name, label, lambda n=name, kw=kwargs: timm_drop.create_regularizer(n, **kw)))
    return rows


def reference_rows() -> list[tuple[str, str, Callable[[], nn.Module]]]:
    from timm.layers import DropBlock2d as TimmDropBlock2d
    from torchvision.ops import drop_block2d as tv_drop_block2d

    return [
        (
            REFERENCE,
            "drop_prob=0.1, block_size=7 (default: channels coupled)",
            lambda: TimmDropBlock2d(0.1, 7),
        ),
        (
            "timm DropBlock2d",
            "drop_prob=0.1, block_size=7, couple_channels=False",
            lambda: TimmDropBlock2d(0.1, 7, couple_channels=False),
        ),
        (
            "torchvision drop_block2d",
            "p=0.1, block_size=7",
            lambda: _Fn(lambda x: tv_drop_block2d(x, 0.1, 7)),
        ),
        ("F.dropout2d", "p=0.1", lambda: _Fn(lambda x: F.dropout2d(x, 0.1, training=True))),
        ("F.dropout", "p=0.1", lambda: _Fn(lambda x: F.dropout(x, 0.1, training=True))),
        ("plain multiply", "x * s (0-dim)", _Scale),
    ]


#: (H, W, block_size) for the realised-drop-fraction table; drop_prob 0.1 throughout.
FRACTION_CASES = [
    (7, 7, 3),
    (7, 7, 5),
    (8, 8, 7),
    (14, 14, 5),
    (14, 14, 7),
    (28, 28, 7),
    (56, 56, 7),
    (7, 11, 5),
]


def fraction_table(device: torch.device, maps: int = 2048) -> str:
    """Realised fraction of zeroed units at drop_prob 0.1; one input shared by all implementations."""
    from timm.layers import drop_block_2d as timm_drop_block
    from torchvision.ops import drop_block2d as tv_drop_block2d

    from timm_drop.regularizers.dropblock import drop_block2d

    impls = {
        "timm_drop dropblock": lambda x, bs: drop_block2d(x, 0.1, bs),
        "timm DropBlock2d (default)": lambda x, bs: timm_drop_block(x, 0.1, bs),
        "timm DropBlock2d (couple_channels=False)": lambda x, bs: timm_drop_block(
            x, 0.1, bs, couple_channels=False
        ),
        "torchvision drop_block2d": lambda x, bs: tv_drop_block2d(x, 0.1, bs),
    }
    lines = [
        "## Realised drop fraction (requested 0.1)",
        "",
        f"Fraction of zeroed units of a ones tensor ({maps} maps of H x W), float32, one draw per cell.",
        "",
        "| H x W, block | " + " | ".join(impls) + " |",
        "|---|" + "---:|" * len(impls),
    ]
    torch.manual_seed(0)
    for h, w, bs in FRACTION_CASES:
        x = torch.ones(maps // 16, 16, h, w, device=device)
        cells = []
        for fn in impls.values():
            try:
                cells.append(f"{(fn(x, bs) == 0).float().mean().item():.3f}")
            except Exception as exc:
                cells.append(_short_error(exc)[:40])
        lines.append(f"| {h}x{w}, {bs} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: ``wall``: elapsed time; ``cpu``: CPU time of the calling thread, which with one intra-op thread is the op's own
#: compute and ignores the time other processes hold the cores (shared machines).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = time.perf_counter


def _timed(step: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = _clock()
    step()
    _sync(device)
    return (_clock() - t0) * 1e3


def round_robin_ms(
    steps: dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """Median time per step, interleaving the steps so that load changes hit every row alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            times[key].append(_timed(step, device))
    return {key: statistics.median(v) for key, v in times.items()}


def fwd_bwd_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        module(x).backward(grad)

    return step


def _short_error(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg[:80]}".replace("|", "/")


def run(args: argparse.Namespace) -> str:
    global _clock
    _clock = CLOCKS[args.clock]
    args.load_before = _load()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    shapes = args.shapes or (SMALL_SHAPES if args.small else SHAPES)
    compile_on = args.compile if args.compile is not None else device.type == "cuda"
    rows = registered_rows() + reference_rows()
    if compile_on:
        # All regularizers share Regularizer.forward (and the references _Fn.forward): one code object with
        # dozens of guard sets. Past dynamo's default limit of 8 it silently runs eager, so raise it.
        name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 4 * len(rows)))
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 16 * len(rows)
        )
    torch.manual_seed(0)

    sections = []
    for shape in shapes:
        x = torch.randn(shape, device=device, dtype=dtype).requires_grad_(True)
        grad = torch.randn_like(x)
        copy_dst = torch.empty_like(x)
        results = [
            {"name": n, "label": lab, "eager": None, "compiled": None, "error": ""} for n, lab, _ in rows
        ]
        for mode in ("eager", "compiled") if compile_on else ("eager",):
            steps: dict[str, Callable[[], None]] = {"copy": partial(copy_dst.copy_, x.detach())}
            for i, (_, _, make) in enumerate(rows):
                if results[i]["error"]:
                    continue
                try:
                    module = make().train().to(device)
                    if mode == "compiled":
                        module = torch.compile(module, dynamic=False, backend=args.compile_backend)
                    step = fwd_bwd_step(module, x, grad)
                    step()  # first call: compiles, and surfaces a method that cannot serve this shape
                    steps[str(i)] = step
                except Exception as exc:  # reported in the table, not fatal
                    results[i]["error"] = ("compile: " if mode == "compiled" else "") + _short_error(exc)
            medians = round_robin_ms(steps, device, args.repeats, args.warmup)
            if mode == "eager":
                t_copy = medians["copy"]
            for i in range(len(rows)):
                results[i][mode] = medians.get(str(i))
            if args.verbose:
                print(
                    f"{shape} {mode}: "
                    + ", ".join(f"{rows[int(k)][0]}={v:.3g}" for k, v in medians.items() if k != "copy")
                )
        floor = 2.0 * t_copy
        gbps = 2 * x.numel() * x.element_size() / (t_copy * 1e-3) / 1e9
        sections.append(_table(shape, results, floor, t_copy, gbps, compile_on))
    args.load_after = _load()
    return (
        _header(args, device, dtype, compile_on)
        + "\n".join(sections)
        + ("\n" + fraction_table(device, args.fraction_maps) if args.fraction_maps else "")
    )


def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}g}" if v < 100 else f"{v:.0f}"


def _ratio(v: float | None, ref: float | None) -> str:
    return "—" if v is None or not ref else f"{v / ref:.2f}x"


def _table(shape, results, floor, t_copy, gbps, compile_on) -> str:
    ref = next(r for r in results if r["name"] == REFERENCE)
    lines = [
        f"## Input {tuple(shape)}",
        "",
        f"copy_: {t_copy:.3f} ms ({gbps:.0f} GB/s); memory-bound floor for forward+backward "
        f"(4 x bytes at that bandwidth): **{floor:.3f} ms**",
        "",
    ]
    head = "| op | settings | eager ms | eager / timm | eager / floor |"
    sep = "|---|---|---:|---:|---:|"
    call_cost = None
    if compile_on:
        head += (
            " compiled ms | compiled / timm compiled | compiled / floor | compiled / eager |"
            " (compiled - call cost) / eager |"
        )
        sep += "---:|---:|---:|---:|---:|"
        plain = next((r for r in results if r["name"] == CALL_COST_REFERENCE), None)
        if plain and plain["compiled"] is not None and plain["eager"] is not None:
            call_cost = max(plain["compiled"] - plain["eager"], 0.0)
            lines[-1:-1] = [
                "",
                f"compiled call cost (plain multiply, compiled - eager): {call_cost:.3f} ms; the last column takes "
                "it off each compiled time: above 1.00x the compiled op itself is slower than eager",
            ]
    lines += [head + " note |", sep + "---|"]
    for r in results:
        cells = [
            r["name"],
            r["label"],
            _fmt(r["eager"]),
            _ratio(r["eager"], ref["eager"]),
            _ratio(r["eager"], floor),
        ]
        if compile_on:
            cells += [
                _fmt(r["compiled"]),
                _ratio(r["compiled"], ref["compiled"]),
                _ratio(r["compiled"], floor),
                _ratio(r["compiled"], r["eager"]),
                "—"
                if call_cost is None or r["compiled"] is None
                else _ratio(r["compiled"] - call_cost, r["eager"]),
            ]
        cells.append(r["error"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _load() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # not available on this platform
        return "n/a"


def _header(args, device, dtype, compile_on) -> str:
    if device.type == "cuda":
        dev = torch.cuda.get_device_name(device)
    else:
        dev = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            "# Regularizer ops: forward + backward time",
            "",
            f"- date: {now}",
            f"- device: {dev}",
            f"- torch {torch.__version__}, timm {timm.__version__}, torchvision {torchvision.__version__}, "
            f"timm_drop {timm_drop.__version__}, Python {platform.python_version()}",
            f"- dtype: {args.dtype}; median of {args.repeats} round-robin repeats after {args.warmup} "
            "warm-up; "
            f"torch.compile: {f'yes (dynamic=False, backend {args.compile_backend})' if compile_on else 'no'}",
            f"- command: `python benchmarks/ops.py {' '.join(args.argv)}`",
            f"- clock: {args.clock} ({'thread CPU time' if args.clock == 'cpu' else 'elapsed time'}); "
            f"load average (1/5/15 min) before: {args.load_before}, after: {args.load_after} "
            f"on {os.cpu_count()} logical CPUs; nice {os.nice(0)}",
            "- time = `y = op(x); y.backward(g)` including mask generation; ratios: vs timm's default "
            "DropBlock2d (same mode) and vs the memory-bound floor",
            "",
            "",
        ]
    )


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes entries are N,C,H,W integers, got {text!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shapes entries need 4 positive integers N,C,H,W, got {text!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--small", action="store_true", help=f"small shapes {SMALL_SHAPES} (CPU smoke/benchmark)")
    ap.add_argument(
        "--shapes", type=parse_shape, nargs="+", default=None, help="N,C,H,W ... (overrides --small)"
    )
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on for cuda, off for cpu",
    )
    ap.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (aot_eager: the compile path without code generation, for a quick check)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    ap.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="wall: elapsed time; cpu: thread CPU time (CPU with --threads 1 on a shared machine)",
    )
    ap.add_argument(
        "--fraction-maps",
        type=int,
        default=2048,
        help="maps per cell of the drop-fraction table (0 = skip it)",
    )
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/ops_<device>.md")
    ap.add_argument("--verbose", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.repeats < 1 or args.warmup < 0 or args.fraction_maps < 0:
        raise SystemExit("--repeats must be >= 1, --warmup and --fraction-maps >= 0")
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        raise SystemExit("--clock cpu measures the calling thread only: use it with --device cpu --threads 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(__file__).resolve().parent / "results" / f"ops_{args.device}.md"
    report = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
