#!/usr/bin/env python
"""Reproduction tables: a short single-seed run of every method, or the multi-seed low-data CPU table.

    python recipes/reproduce.py --epochs 30 --out runs/reproduce            # CIFAR-10 via torchvision download
    python recipes/reproduce.py --data-root /data/cifar --no-download ...   # local cifar-10-batches-py
    python recipes/reproduce.py --launcher "accelerate launch --multi_gpu --num_processes 8" ...
    python recipes/reproduce.py --preset cpu-lowdata --data-root data/cifar10     # the evidence table (below)

**Short table** (default). Every row starts from ``recipes/configs/baseline_<model>_cifar10.yaml``-style training
(SGD 0.9, LR 0.1 with a cosine decay here so a short run ends annealed, pad-4 crop + flip, the given epochs) and
differs only in the regularizer or LayerOut section, with the paper placement of each method:

* baseline — nothing
* dropblock — DropBlock (drop 0.1, block 3, linear ramp) after the blocks of the last two stages
* corrdrop — CorrDrop after each stage, block sizes 9/7/5, drop 0.1, linear ramp (CorrDrop Table 1)
* selectscale — SelectScale after every convolution, top rate 0.2, q 1.0 (SelectScale Table 1, CIFAR-10)
* attentiondrop — AttentionDrop (ad) after stages 1-2, drop 0.1 ramped over half the run, top rate 0.2
* layerout — LayerOut with a random freeze vector after a warm-up of 10% of the epochs

Each run is a separate ``recipes/train.py`` process (so any launcher works); the table (Markdown) gets the final and
best eval top-1, the wall time and, for LayerOut, the mean frozen fraction. Short schedules rank methods only
roughly: the papers' gains are 0.2-1% after 200+ epochs.

**Preset cpu-lowdata** (``--preset cpu-lowdata``): "does it help?" where a model overfits, on a 2-core CPU.
Baseline, DropBlock, CorrDrop, SelectScale, Selectout, AttentionDrop (ad) and LayerOut train ResNet-20 on the same
2,000 CIFAR-10 training images, 60 epochs at batch 32 (LR 0.025), flips as the only augmentation, 3 seeds each,
and are tested once at the end on the full 10k test split. Each method is one file of ``recipes/configs/lowdata/``
(``base: baseline.yaml`` + the paper's placement and hyper-parameters; the headers say where each value comes from
and why the setting is 2,000 x 60 at batch 32 without the pad-4 crop: with the crop the baseline never memorised at
this budget, 69-76% train accuracy; without it, it passes 98% train accuracy soon after the first LR decay, the
regime in which a regularizer can show what it is for; ~2 hours of 2 cores for the 21 runs). Runs go seed by
seed, so a partial table already pairs every method with the baseline on the finished seeds. The table
(``benchmarks/results/cpu_lowdata.md``) gives mean +- std test top-1, the paired difference to the baseline with a
95% t-interval over seeds and a plain verdict, train accuracy, time, and LayerOut's frozen fraction and measured
backward-time saving.

The table resumes: a finished run (its ``metrics.jsonl`` reaches the last epoch) is kept and skipped, an
interrupted one continues with ``train.py --resume latest``, one killed before its first checkpoint restarts. Rerun
the same command to continue; ``--report-only`` rebuilds the table from whatever has finished. CIFAR-10 must be in
torchvision's python-pickle layout under ``--data-root`` (``DIR/cifar-10-batches-py``); with a network add
``--download``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

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


def short_table(a: argparse.Namespace) -> int:
    """The default mode: one seed, one short schedule, every VARIANTS row."""
    epochs = a.epochs or 30
    out = Path(a.out or "runs/reproduce")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    unknown = sorted(set(a.only or []) - set(VARIANTS))
    if unknown:
        print(
            f"error: --only: {unknown} are not rows of the short table (rows: {list(VARIANTS)})",
            file=sys.stderr,
        )
        return 2
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
            f"train.epochs={epochs}",
            f"train.precision={a.precision}",
            f"regularizer={json.dumps(variant.get('regularizer'))}",
        ]
        layerout = variant.get("layerout")
        if layerout is not None:
            layerout = dict(layerout, warmup_epochs=max(1, epochs // 10))
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
        f"# Short-schedule reproduction: {a.model}, CIFAR-10, {epochs} epochs, seed {a.seed}",
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


# -- preset tables: several seeds per method, resumable ---------------------------------------------------------


class Preset(NamedTuple):
    config_dir: Path
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    out: str
    table: str
    title: str


PRESETS: dict[str, Preset] = {
    "cpu-lowdata": Preset(
        config_dir=HERE / "configs" / "lowdata",
        methods=(
            "baseline",
            "dropblock",
            "corrdrop",
            "selectscale",
            "selectout",
            "attentiondrop",
            "layerout",
        ),
        seeds=(0, 1, 2),
        out="runs/cpu_lowdata",
        table=str(HERE.parent / "benchmarks" / "results" / "cpu_lowdata.md"),
        title="Low-data CIFAR-10 on a CPU: does it help?",
    )
}


class Run(NamedTuple):
    method: str
    seed: int
    config: Path
    out_dir: Path
    overrides: list[str]
    epochs: int
    cfg: Any = None  # the resolved TrainConfig

    @property
    def key(self) -> str:
        return f"{self.method}/seed{self.seed}"


def t_quantile(df: int, comparisons: int = 1) -> float:
    """Two-sided Student-t quantile for a 95% interval, Bonferroni-corrected over ``comparisons`` intervals."""
    from scipy import stats

    return float(stats.t.ppf(1.0 - 0.05 / (2 * comparisons), df))


def paired_ci(diffs: list[float], comparisons: int = 1) -> tuple[float, float, float] | None:
    """Mean of paired differences and its two-sided 95% t-interval (Bonferroni-corrected over ``comparisons``
    methods compared with one baseline); None with fewer than 2 pairs."""
    if len(diffs) < 2:
        return None
    mean = statistics.fmean(diffs)
    half = t_quantile(len(diffs) - 1, comparisons) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def verdict(
    ci: tuple[float, float, float] | None,
    uncorrected: tuple[float, float, float] | None = None,
    comparisons: int = 1,
) -> str:
    """What the interval ``ci`` (corrected for ``comparisons``) says; ``uncorrected`` adds whether the plain 95%
    interval alone would have excluded 0."""
    if ci is None:
        return "too few seeds to tell"
    _, lo, hi = ci
    if lo > 0:
        return "better than baseline"
    if hi < 0:
        return "worse than baseline"
    if comparisons > 1 and uncorrected is not None and (uncorrected[1] > 0 or uncorrected[2] < 0):
        return f"cannot tell after correcting for {comparisons} comparisons (the uncorrected 95% interval excludes 0)"
    return "cannot tell (interval spans 0)"


def plan_runs(preset: Preset, a: argparse.Namespace) -> list[Run]:
    """Every (seed, method) run with its train.py overrides, seed by seed (a partial table pairs whole seeds)."""
    from timm_drop.training import load_config

    out = Path(a.out or preset.out)
    methods = a.only or list(preset.methods)
    unknown = sorted(set(methods) - set(preset.methods))
    if unknown:
        raise SystemExit(f"error: --only: {unknown} are not methods of this preset ({list(preset.methods)})")
    runs = []
    for seed in a.seeds if a.seeds is not None else preset.seeds:
        for method in methods:
            path = preset.config_dir / f"{method}.yaml"
            base = load_config(path, check_paths=False, resolve_spec=False)
            epochs = a.epochs or base.train.epochs
            run_dir = out / method / f"seed{seed}"
            ov = [
                f"name={method}_seed{seed}",
                f"output_dir={run_dir}",
                f"seed={seed}",
                f"train.epochs={epochs}",
                f"train.eval_every={epochs}",  # test once, at the end: nothing is picked on the test split
                f"data.download={'true' if a.download else 'false'}",
            ]
            if a.data_root is not None:
                ov.append(f"data.root={a.data_root}")
            if a.train_subset is not None:
                ov.append(f"data.train_subset={a.train_subset}")
            if a.eval_subset is not None:
                ov.append(f"data.eval_subset={a.eval_subset}")
            if base.layerout is not None:
                # each seed draws its own freeze vector and frozen sets; the warm-up keeps its share of the run
                warm = base.layerout.get("warmup_epochs", 0)
                warm = max(1, round(warm * epochs / base.train.epochs)) if warm else 0
                ov += [f"layerout.seed={seed}", f"layerout.warmup_epochs={min(warm, epochs - 1)}"]
            ov += list(a.extra)
            cfg = load_config(path, ov, check_paths=False)
            runs.append(Run(method, seed, path, run_dir, ov, epochs, cfg))
    return runs


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def run_state(run: Run) -> str:
    """``done`` (kept), ``resume`` (has a checkpoint), ``restart`` (died before one) or ``new``."""
    from timm_drop.training.checkpoint import CheckpointManager

    rows = _metrics(run.out_dir)
    if rows and rows[-1].get("epoch") == run.epochs and "eval_top1" in rows[-1]:
        return "done"
    if CheckpointManager(run.out_dir).latest() is not None:
        return "resume"
    if (run.out_dir / "config.yaml").is_file():
        return "restart"  # train.py --overwrite only ever deletes a directory that holds a timm_drop run
    return "new"


def execute(run: Run, mode: str, a: argparse.Namespace, out: Path) -> dict:
    """One train.py process for ``run``; returns the attempt record (exit code, wall and CPU seconds)."""
    cmd = shlex.split(a.launcher) + [str(HERE / "train.py"), "--config", str(run.config)] + run.overrides
    cmd += {"resume": ["--resume", "latest"], "restart": ["--overwrite"]}.get(mode, [])
    import timm_drop

    env = dict(os.environ)
    # the child imports the timm_drop this driver imported (train.py alone would find whichever is installed)
    pkg_root = str(Path(timm_drop.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in [env.get("PYTHONPATH")] if p])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(a.threads)
    log = out / "logs" / f"{run.method}-seed{run.seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{run.key}] {mode}: " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    with log.open("a") as f:
        f.write(f"\n=== {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC {mode}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    record = {
        "run": run.key,
        "mode": mode,
        "rc": proc.returncode,
        "wall_s": round(time.time() - t0, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "threads": a.threads,
        "finished": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S}",
    }
    print(
        f"[{run.key}] exit {proc.returncode} after {record['wall_s'] / 60:.1f} min (log: {log})", flush=True
    )
    return record


def _attempts(out: Path) -> list[dict]:
    path = out / "attempts.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def collect(run: Run, attempts: list[dict]) -> dict | None:
    """A finished run's numbers, or None."""
    if run_state(run) != "done":
        return None
    rows = _metrics(run.out_dir)
    last = rows[-1]
    mine = [r for r in attempts if r["run"] == run.key]
    # a restart discards what came before it
    starts = [i for i, r in enumerate(mine) if r["mode"] in ("new", "restart")]
    mine = mine[starts[-1] :] if starts else mine
    res = {
        "test_top1": last["eval_top1"],
        "train_top1": last["train_top1"],
        "train_time_s": sum(r.get("epoch_time_s", 0.0) for r in rows),
        "cpu_s": sum(r["cpu_s"] for r in mine) if mine else None,
        "eval_images": last.get("eval_images"),
    }
    if run.cfg.layerout is not None:
        warm = run.cfg.layerout.get("warmup_epochs", 0)
        ff = [r["frozen_fraction"] for r in rows if "frozen_fraction" in r and r["epoch"] > warm]
        res["frozen"] = statistics.fmean(ff) if ff else None
    return res


def _bench_module():
    path = HERE.parent / "benchmarks" / "layerout_backward.py"
    spec = importlib.util.spec_from_file_location("timm_drop_bench_layerout_backward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layerout_saving(run: Run, a: argparse.Namespace) -> dict:
    """Backward- and train-step-time saving of ``run``'s own frozen sets, replayed on a fresh model.

    The long runs' epoch times are useless for this on a shared CPU (their load drifts over hours), so a few of the
    run's post-warm-up epochs are replayed (LayerOut's frozen set is a pure function of seed and epoch) and timed
    round-robin against the same model with nothing frozen, with ``benchmarks/layerout_backward.py``'s timer.
    """
    import timm
    import torch

    import timm_drop  # noqa: F401  (registers the CIFAR models)
    from timm_drop.layerout import LayerOut

    bench = _bench_module()
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        torch.manual_seed(0)
        cfg = run.cfg
        model = timm.create_model(cfg.model.name, num_classes=cfg.data.num_classes or 10).train()
        bs = a.timing_batch
        x, y = torch.randn(bs, 3, cfg.data.image_size, cfg.data.image_size), torch.randint(0, 10, (bs,))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=cfg.optim.weight_decay)
        n_units = len(LayerOut().bind(model).unit_names)
        plain = LayerOut(freeze_probs=[0.0] * n_units).bind(model).attach(opt)
        replay = LayerOut(**cfg.layerout).bind(model).attach(opt)
        warm = replay.warmup_epochs
        k = max(1, min(a.timing_epochs, run.epochs - warm))
        epochs = sorted({warm + round(i * (run.epochs - 1 - warm) / max(1, k - 1)) for i in range(k)})
        samples: dict[str, list[tuple[float, ...]]] = {"plain": [], "replay": []}
        for _ in range(a.timing_rounds):
            for name, lo, eps in (("plain", plain, [0]), ("replay", replay, epochs)):
                for e in eps:
                    lo.start_epoch(e)
                    t = bench.time_step(model, opt, x, y, a.timing_iters, 1, False)
                    samples[name].append((lo.frozen_fraction_of_model,) + tuple(t))
                    lo.end_epoch()
        med = {n: [statistics.median(r[i] for r in rows) for i in range(4)] for n, rows in samples.items()}
        p, r = med["plain"], med["replay"]
        return {
            "epochs": epochs,
            "frozen": statistics.fmean(s[0] for s in samples["replay"]),
            "bwd_saving": 1 - r[2] / p[2],
            "step_saving": 1 - sum(r[1:]) / sum(p[1:]),
            "settings": f"batch {bs}, {a.threads} thread(s), {a.timing_rounds} round(s) x {a.timing_iters} iters",
        }
    finally:
        torch.set_num_threads(threads)


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "" if x is None else format(x, spec)


def _augment_words(aug: Any) -> str:
    """The run's augmentation in words, e.g. "pad-4 crop + flip" or "flip only"."""
    parts = ([f"pad-{aug.crop_padding} crop"] if aug.crop_padding else []) + (["flip"] if aug.hflip else [])
    if not parts:
        return "no augmentation"
    return " + ".join(parts) + (" only" if len(parts) == 1 else "")


def _device() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical CPUs"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


def write_report(preset: Preset, runs: list[Run], a: argparse.Namespace, out: Path) -> str:
    import timm
    import torch

    import timm_drop

    attempts = _attempts(out)
    results = {r.key: collect(r, attempts) for r in runs}
    timing_path = out / "layerout_timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    for r in runs:
        if (
            r.cfg.layerout is not None
            and results[r.key] is not None
            and r.key not in timing
            and a.timing_rounds
        ):
            timing[r.key] = layerout_saving(r, a)
            timing_path.write_text(json.dumps(timing, indent=1))
    methods = list(dict.fromkeys(r.method for r in runs))
    seeds = list(dict.fromkeys(r.seed for r in runs))
    done = sum(v is not None for v in results.values())
    first = runs[0].cfg
    command_file = out / "command.txt"
    run_cmd = command_file.read_text().strip() if command_file.is_file() else "(not recorded)"
    # the runs' parallelism is that of the command that ran them, not of this (maybe --report-only) call
    ran = build_parser().parse_args(shlex.split(run_cmd)[2:]) if command_file.is_file() else a
    now = datetime.datetime.now(datetime.timezone.utc)
    status = (
        f"**Complete**: all {len(runs)} runs finished."
        if done == len(runs)
        else f"**PARTIAL: {done} of {len(runs)} runs finished** (the background job may still be running; rerun the "
        "command below to continue). Rows with fewer seeds carry less evidence."
    )
    lines = [
        f"# {preset.title}",
        "",
        status,
        "",
        f"- model `{first.model.name}`, CIFAR-10: the first {first.data.train_subset or 'all'} training images of a "
        f"fixed shuffle (the same images in every run), test on "
        f"{first.data.eval_subset or 'all 10,000'} test images once after the last epoch",
        f"- {first.train.epochs} epochs, batch {first.data.batch_size}, SGD momentum {first.optim.momentum} LR "
        f"{first.optim.lr} x{first.sched.gamma} at {first.sched.milestone_fractions} of the run, weight decay "
        f"{first.optim.weight_decay}, {_augment_words(first.data.augment)}, precision "
        f"{first.train.precision}; seeds {seeds} (a seed fixes the initialisation and data order, the same for every "
        "method, so differences are paired by seed)",
        f"- methods: `{preset.config_dir.relative_to(HERE.parent)}/<method>.yaml` (placement and hyper-parameters "
        "from each paper, scaled to 32x32 maps where needed; the file headers give the sources). No value was tuned "
        "on the test split.",
        f"- device: {_device()}, {ran.threads} torch thread(s) per run, {ran.jobs} run(s) at a time; torch "
        f"{torch.__version__}, timm {timm.__version__}, timm_drop {timm_drop.__version__}, python "
        f"{platform.python_version()}",
        f"- date: {now:%Y-%m-%d %H:%M} UTC (table written); runs: `{run_cmd}`",
        "",
        "| method | seeds done | test top-1 % (mean ± std) | per seed | Δ vs baseline, paired (95% CI) | verdict | "
        "train top-1 % | train min/run | CPU min/run |",
        "|---|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    base = {r.seed: results[r.key] for r in runs if r.method == "baseline"}
    comparisons = max(1, len(methods) - 1)  # every method against the one baseline
    summary = []
    for m in methods:
        rs = [(r, results[r.key]) for r in runs if r.method == m and results[r.key] is not None]
        if not rs:
            lines.append(f"| {m} | 0/{len(seeds)} | | | | not run yet | | | |")
            continue
        acc = [x["test_top1"] for _, x in rs]
        sd = f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""
        per = " / ".join(f"{v:.2f}" for v in acc)
        delta, verd = "", ""
        if m != "baseline":
            diffs = [x["test_top1"] - base[r.seed]["test_top1"] for r, x in rs if base.get(r.seed)]
            ci = paired_ci(diffs)
            verd = verdict(paired_ci(diffs, comparisons), ci, comparisons)
            if ci is not None:
                delta = f"{ci[0]:+.2f} [{ci[1]:+.2f}, {ci[2]:+.2f}] (n={len(diffs)})"
            elif diffs:
                delta = f"{diffs[0]:+.2f} (n=1)"
            summary.append(f"{m}: {verd}")
        cpu = [x["cpu_s"] for _, x in rs if x["cpu_s"] is not None]
        lines.append(
            f"| {m} | {len(rs)}/{len(seeds)} | {statistics.fmean(acc):.2f}{sd} | {per} | {delta} | {verd} | "
            f"{statistics.fmean(x['train_top1'] for _, x in rs):.1f} | "
            f"{statistics.fmean(x['train_time_s'] for _, x in rs) / 60:.1f} | "
            f"{_fmt(statistics.fmean(cpu) / 60 if cpu else None, '.1f')} |"
        )
    lo_runs = [(r, results[r.key]) for r in runs if r.cfg.layerout is not None and results[r.key] is not None]
    lines += [""]
    if lo_runs:
        fr = [x["frozen"] for _, x in lo_runs if x.get("frozen") is not None]
        tm = [timing[r.key] for r, _ in lo_runs if r.key in timing]
        lines.append(
            f"LayerOut: {100 * statistics.fmean(fr):.1f}% of the parameters frozen per epoch after warm-up (mean over "
            f"{len(fr)} run(s); the paper's figure)."
            + (
                f" Replaying {len(tm)} run(s)' own frozen sets on a fresh model ({tm[0]['settings']}, round-robin "
                f"against nothing frozen): backward time "
                f"{100 * statistics.fmean(t['bwd_saving'] for t in tm):+.1f}%, whole train step "
                f"{100 * statistics.fmean(t['step_saving'] for t in tm):+.1f}% saved (positive = faster; timed "
                "frozen share "
                f"{100 * statistics.fmean(t['frozen'] for t in tm):.1f}%)."
                if tm
                else ""
            )
        )
        lines.append("")
    t_cmp = t_quantile(max(1, len(seeds) - 1), comparisons)
    lines += [
        "How to read it: *train top-1* is the running accuracy of the last epoch with augmentation and the "
        "regularizer active. *Δ* is the mean over seeds of (method − baseline) on the same seed with a two-sided 95% "
        f"Student-t interval (n − 1 degrees of freedom; with {len(seeds)} seeds t = {t_quantile(max(1, len(seeds) - 1)):.2f}, "
        f"so the interval is wide). The *verdict* reads a Bonferroni-corrected interval instead: {comparisons} methods are "
        f"compared to one baseline, so each interval is a {100 - 5 / comparisons:.2f}% one (t = {t_cmp:.2f}), and the "
        "verdict says when only the uncorrected interval excludes 0. *Cannot tell* means the seed-to-seed spread is "
        "too large to tell an effect from noise at this number of seeds; it is not evidence of no effect. *Train min* sums the epochs' "
        "training wall time (resumes included, evaluation excluded); *CPU min* is the CPU time of the train.py "
        "processes the driver saw exit (an attempt killed together with the driver is not counted). Both were "
        "measured on a CPU shared with other jobs: they compare runs only roughly.",
        "",
        f"Not the papers' setting: {first.data.train_subset or 'all'} training images instead of 50,000, "
        f"{first.train.epochs} epochs at batch {first.data.batch_size} instead of 160-300 at 128, "
        f"{_augment_words(first.data.augment)} instead of pad-4 crop + flip, one small network, no hyper-parameter "
        "search. It tests one "
        "claim only: whether each method, placed and set as its paper says, regularizes where a plain model "
        "memorises its training set.",
        "",
        "Reproduce: CIFAR-10 in torchvision's python-pickle layout under `--data-root` (`DIR/cifar-10-batches-py`; "
        "add `--download` to fetch it, or export a local copy, e.g. `python ../shared/data/export_cifar10.py "
        "--format pickle --out data/cifar10`), then run the command above; rerunning it skips finished runs and "
        "resumes interrupted ones (`train.py --resume latest`); `--report-only` rewrites this table. Per-run "
        "outputs and logs stay in the runs folder (`--out`).",
        "",
    ]
    if summary:
        lines.insert(
            4,
            f"Verdicts (paired over seeds, corrected for {comparisons} comparisons): "
            + "; ".join(summary)
            + ".\n",
        )
    report = "\n".join(lines)
    return report


def preset_main(a: argparse.Namespace) -> int:
    preset = PRESETS[a.preset]
    out = Path(a.out or preset.out)
    from timm_drop.training import ConfigError

    try:
        runs = plan_runs(preset, a)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = Path(a.table or preset.table)
    out.mkdir(parents=True, exist_ok=True)

    def report() -> None:
        text = write_report(preset, runs, a, out)
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(text)
        print(f"table: {table}", flush=True)

    if a.report_only:
        report()
        return 0
    (out / "command.txt").write_text(
        "python recipes/reproduce.py " + " ".join(shlex.quote(x) for x in a.argv) + "\n"
    )
    import threading

    lock = threading.Lock()
    failed = []

    def one(run: Run) -> None:
        mode = run_state(run)
        if mode == "done":
            print(f"[{run.key}] finished earlier: kept", flush=True)
            return
        rec = execute(run, mode, a, out)
        with lock:
            with (out / "attempts.jsonl").open("a") as f:
                f.write(json.dumps(rec) + "\n")
            if rec["rc"] != 0:
                failed.append(run.key)
            report()

    with ThreadPoolExecutor(max_workers=a.jobs) as ex:
        list(ex.map(one, runs))
    report()
    if failed:
        print(f"failed runs: {failed} (logs under {out / 'logs'})", file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), help="a multi-seed, resumable table (see above)")
    ap.add_argument("--model", default="resnet20_cifar", help="short table only")
    ap.add_argument(
        "--epochs", type=int, default=None, help="default: 30 (short table), the configs' (preset)"
    )
    ap.add_argument("--batch-size", type=int, default=128, help="short table only")
    ap.add_argument("--seed", type=int, default=0, help="short table only")
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="preset: seeds to run (default: the preset's)"
    )
    ap.add_argument("--precision", default="bf16", help="short table only")
    ap.add_argument(
        "--data-root", default=None, help="folder holding cifar-10-batches-py (default: the configs')"
    )
    ap.add_argument("--no-download", action="store_true", help="short table: do not let torchvision download")
    ap.add_argument("--download", action="store_true", help="preset: let torchvision download CIFAR-10")
    ap.add_argument(
        "--train-subset", type=int, default=None, help="preset: training images (default: config's)"
    )
    ap.add_argument("--eval-subset", type=int, default=None, help="preset: test images (default: all 10,000)")
    ap.add_argument("--only", nargs="*", help="run a subset of the rows / methods")
    ap.add_argument("--out", default=None, help="runs folder (default: runs/reproduce or the preset's)")
    ap.add_argument("--table", default=None, help="preset: Markdown table path (default: the preset's)")
    ap.add_argument("--report-only", action="store_true", help="preset: rebuild the table from finished runs")
    ap.add_argument("--jobs", type=int, default=1, help="preset: runs at a time")
    ap.add_argument("--threads", type=int, default=1, help="preset: torch threads per run")
    ap.add_argument(
        "--timing-rounds", type=int, default=3, help="preset: LayerOut replay timing rounds (0: off)"
    )
    ap.add_argument("--timing-iters", type=int, default=3)
    ap.add_argument(
        "--timing-epochs", type=int, default=4, help="post-warm-up epochs replayed per LayerOut run"
    )
    ap.add_argument("--timing-batch", type=int, default=64)
    ap.add_argument("--launcher", default=f"{shlex.quote(sys.executable)}", help="command that runs train.py")
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every run")
    ap.add_argument("--overwrite", action="store_true", help="short table only")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = build_parser().parse_args(argv)
    a.argv = argv
    if a.preset:
        return preset_main(a)
    if a.data_root is None:
        a.data_root = "data"
    return short_table(a)


if __name__ == "__main__":
    sys.exit(main())
