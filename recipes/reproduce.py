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
roughly. What each paper reports in its own full setting
(160-300 epochs) is on its method card: ``timm-drop list``, or the docs' method pages.

**Preset cpu-lowdata** (``--preset cpu-lowdata``): "does it help?" where a model overfits, on a 2-core CPU.
Baseline, DropBlock, CorrDrop, SelectScale, Selectout, AttentionDrop (ad) and LayerOut train ResNet-20 on the same
2,000 CIFAR-10 training images, 60 epochs at batch 32 (LR 0.025), flips as the only augmentation, and are tested
once at the end on the full 10k test split. Every method ran on seeds 0-2; the baseline and the three methods that
leaned positive there (DropBlock, Selectout, SelectScale) run on seeds 0-9, so their paired intervals narrow to about
+-1 point. Each method is one file of ``recipes/configs/lowdata/`` (``base: baseline.yaml`` + the paper's placement
and hyper-parameters; the headers say where each value comes from and why the setting is 2,000 x 60 at batch 32
without the pad-4 crop: the crop is itself a regularizer of the kind being tested, and without it the baseline
memorises its training set (the table's train top-1 column shows how far), the regime in which a regularizer can
show what it is for; ~10-15 CPU-minutes per run). Runs go seed by seed, so a partial table already pairs every method with the baseline on the
finished seeds. The table (``benchmarks/results/cpu_lowdata.md``) gives mean +- std test top-1, the paired
difference to the baseline with a 95% t-interval over seeds and a multiplicity-corrected verdict (also on the added
seeds alone), per-seed values with the CPU each ran on, train accuracy, cost, and LayerOut's frozen fraction and
measured backward-time saving.

Every finished run is one line of the records file (``benchmarks/results/cpu_lowdata_runs.jsonl``: its numbers,
CPU model, versions and date), and the table is made from that file alone, so runs from several machines and
sessions add up and ``--report-only`` rewrites the table exactly. The driver skips runs the records file holds; in
the runs folder, an interrupted run continues with ``train.py --resume latest`` and one killed before its first
checkpoint restarts. Rerun the same command to continue. CIFAR-10 must be in torchvision's python-pickle layout
under ``--data-root`` (``DIR/cifar-10-batches-py``); with a network add ``--download``.
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
    records: str  # one JSON line per finished run: the table is made from this file alone
    #: methods run on more seeds than ``seeds`` (those that leaned positive on the first ones)
    more_seeds: dict[str, tuple[int, ...]] = {}

    def seeds_of(self, method: str) -> tuple[int, ...]:
        return self.more_seeds.get(method, self.seeds)


_RESULTS = HERE.parent / "benchmarks" / "results"
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
        table=str(_RESULTS / "cpu_lowdata.md"),
        title="Low-data CIFAR-10 on a CPU: does it help?",
        records=str(_RESULTS / "cpu_lowdata_runs.jsonl"),
        # seeds 0-2 left DropBlock, Selectout and SelectScale ~1 point ahead with intervals ~5 points wide; 10
        # seeds narrow a paired interval to ~+-1.1 points (seed-to-seed spread ~1.5)
        more_seeds={m: tuple(range(10)) for m in ("baseline", "dropblock", "selectscale", "selectout")},
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
    seeds = a.seeds if a.seeds is not None else sorted({s for m in methods for s in preset.seeds_of(m)})
    for seed in seeds:
        for method in methods:
            if a.seeds is None and seed not in preset.seeds_of(method):
                continue
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
        "jobs": a.jobs,
        "cpu": cpu_model(),
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
    """A finished run's record (one line of the preset's records file), or None.

    The machine is the one the run's last attempt ran on (``attempts.jsonl``), else this one: a runs folder is
    local (ignored by git), so its runs ran here.
    """
    if run_state(run) != "done":
        return None
    import timm
    import torch

    import timm_drop

    rows = _metrics(run.out_dir)
    last = rows[-1]
    mine = [r for r in attempts if r["run"] == run.key]
    # a restart discards what came before it
    starts = [i for i, r in enumerate(mine) if r["mode"] in ("new", "restart")]
    mine = mine[starts[-1] :] if starts else mine
    rec: dict[str, Any] = {
        "method": run.method,
        "seed": run.seed,
        "test_top1": last["eval_top1"],
        "train_top1": last["train_top1"],
        "eval_images": last.get("eval_images"),
        "train_min": round(sum(r.get("epoch_time_s", 0.0) for r in rows) / 60, 2),
        "cpu_min": round(sum(r["cpu_s"] for r in mine) / 60, 2) if mine else None,
        "cpu": next((r["cpu"] for r in reversed(mine) if r.get("cpu")), cpu_model()),
        "threads": mine[-1]["threads"] if mine else None,
        "jobs": mine[-1].get("jobs", _jobs_of_command(run.out_dir.parent.parent)) if mine else None,
        "versions": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "timm_drop": timm_drop.__version__,
            "python": platform.python_version(),
        },
        "finished": (mine[-1]["finished"][:16] + " UTC") if mine else None,
    }
    if run.cfg.layerout is not None:
        warm = run.cfg.layerout.get("warmup_epochs", 0)
        ff = [r["frozen_fraction"] for r in rows if "frozen_fraction" in r and r["epoch"] > warm]
        rec["frozen"] = statistics.fmean(ff) if ff else None
    return rec


def _jobs_of_command(out: Path) -> int | None:
    """``--jobs`` of the command recorded in the runs folder (attempts written before attempts kept it)."""
    path = out / "command.txt"
    if not path.is_file():
        return None
    return build_parser().parse_args(shlex.split(path.read_text())[2:]).jobs


def read_records(path: Path) -> list[dict]:
    """The records file: finished runs (``method`` + ``seed``) and, for runs whose per-run figures were not kept,
    group lines (``method`` + ``seeds``) holding the group's means."""
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def record_finished(runs: list[Run], out: Path, records: Path, a: argparse.Namespace) -> list[dict]:
    """Append every finished run of the runs folder that the records file lacks (a LayerOut run with its
    replayed backward-time saving, measured now); returns all records."""
    have = {(r["method"], r["seed"]) for r in read_records(records) if "seed" in r}
    attempts = _attempts(out)
    new = []
    for run in runs:
        if (run.method, run.seed) in have or (rec := collect(run, attempts)) is None:
            continue
        if run.cfg.layerout is not None and a.timing_rounds:
            rec["layerout_timing"] = layerout_saving(run, a)
        new.append(rec)
    if new:
        records.parent.mkdir(parents=True, exist_ok=True)
        with records.open("a") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in new)
    return read_records(records)


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


def cpu_model() -> str:
    """This machine's CPU model name (seeded runs repeat exactly on one CPU model, not across models)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _seed_list(seeds: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts, run = [], [seeds[0]] if seeds else []
    for x in seeds[1:]:
        if x == run[-1] + 1:
            run.append(x)
        else:
            parts.append(run)
            run = [x]
    parts += [run] if run else []
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in parts)


def _group_mean(method_runs: list[dict], groups: list[dict], field: str) -> tuple[float | None, int]:
    """Mean of ``field`` over one method's runs: per-run values where kept, else the mean of that method's group
    line that covers the run on the same CPU (an earlier table kept only those). Returns (mean, runs counted)."""
    total, n = 0.0, 0
    for g in groups:
        covered = [
            r
            for r in method_runs
            if (r["method"], r["cpu"]) == (g["method"], g["cpu"])
            and r["seed"] in g["seeds"]
            and r.get(field) is None
        ]
        if g.get(field) is not None and len(covered) == len(g["seeds"]):
            total, n = total + g[field] * len(covered), n + len(covered)
    for r in method_runs:
        if r.get(field) is not None:
            total, n = total + r[field], n + 1
    return (total / n if n else None), n


def _paired(recs: dict[tuple[str, int], dict], method: str, seeds: list[int]) -> tuple[list[float], int]:
    """(method - baseline) per seed, over the given seeds where both ran on one CPU model; and how many seeds were
    left out because the two ran on different CPU models."""
    diffs, mixed = [], 0
    for s in seeds:
        m, b = recs.get((method, s)), recs.get(("baseline", s))
        if m is None or b is None:
            continue
        if m["cpu"] != b["cpu"]:
            mixed += 1
            continue
        diffs.append(m["test_top1"] - b["test_top1"])
    return diffs, mixed


def _ci_text(diffs: list[float], comparisons: int) -> tuple[str, str]:
    ci = paired_ci(diffs)
    verd = verdict(paired_ci(diffs, comparisons), ci, comparisons)
    if ci is not None:
        return f"{ci[0]:+.2f} [{ci[1]:+.2f}, {ci[2]:+.2f}] (n={len(diffs)})", verd
    return (f"{diffs[0]:+.2f} (n=1)" if diffs else ""), verd


def write_report(preset: Preset, runs: list[Run], records: list[dict]) -> str:
    """The preset's Markdown table, a pure function of the planned runs and the records (rerunning
    ``--report-only`` on the same records rewrites it byte for byte)."""
    recs = {(r["method"], r["seed"]): r for r in records if "seed" in r}
    groups = [r for r in records if "seeds" in r]
    planned = {(r.method, r.seed) for r in runs}
    methods = list(dict.fromkeys(r.method for r in runs))
    done = len(planned & set(recs))
    first = runs[0].cfg
    cpus = list(dict.fromkeys(recs[k]["cpu"] for k in sorted(recs, key=lambda k: k[1]) if k in planned))
    letters = {c: chr(ord("A") + i) for i, c in enumerate(cpus)}
    status = (
        f"**Complete**: all {len(planned)} planned runs are recorded."
        if done == len(planned)
        else f"**PARTIAL: {done} of {len(planned)} planned runs are recorded** (rerun the command below to "
        "continue). Rows with fewer seeds carry less evidence."
    )
    seeds_by: dict[tuple[int, ...], list[str]] = {}
    for m in methods:
        seeds_by.setdefault(tuple(sorted(r.seed for r in runs if r.method == m)), []).append(m)
    seed_words = "; ".join(f"seeds {_seed_list(list(k))} for {', '.join(v)}" for k, v in seeds_by.items())
    versions = list(
        dict.fromkeys(
            ", ".join(f"{k} {v}" for k, v in r["versions"].items()) for r in records if r.get("versions")
        )
    )
    finished = sorted(r["finished"] for r in records if r.get("finished"))
    settings = sorted({(r.get("threads"), r.get("jobs")) for k, r in recs.items() if k in planned}, key=str)
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
        f"{first.train.precision}; {seed_words} (a seed fixes the initialisation and data order, the same for "
        "every method, so differences are paired by seed)",
        f"- methods: `{preset.config_dir.relative_to(HERE.parent)}/<method>.yaml` (placement and hyper-parameters "
        "from each paper, scaled to 32x32 maps where needed; the file headers give the sources). No value was tuned "
        "on the test split.",
        "- CPUs: "
        + "; ".join(f"{letters[c]} = {c}" for c in cpus)
        + " (the per-seed table names each run's). Seeded runs repeat exactly on one CPU model, not across "
        "models, so a difference is paired only between runs on the same CPU model.",
        "- threads per run / runs at a time: "
        + ", ".join(f"{t or '?'} / {j or '?'}" for t, j in settings)
        + "; "
        + "; ".join(versions),
        f"- runs finished {finished[0][:10] if finished else '?'} to {finished[-1] if finished else '?'}; "
        f"command: `python recipes/reproduce.py --preset {_preset_name(preset)} --data-root data/cifar10 "
        "--jobs 1` (each run's record: "
        f"`{Path(preset.records).relative_to(HERE.parent)}`)",
        "",
    ]
    base_seeds = list(preset.seeds)
    more = [m for m in methods if m != "baseline" and len(preset.seeds_of(m)) > len(base_seeds)]
    comparisons = max(1, len(methods) - 1)  # every method against the one baseline
    header = "| method | seeds | test top-1 % (mean ± std) | Δ vs baseline, paired (95% CI) | verdict |"
    rule = "|---|---:|---:|---:|---|"
    if more:
        header += " Δ on the added seeds only (95% CI) | verdict there |"
        rule += "---:|---|"
    lines += [header + " train top-1 % |", rule + "---:|"]
    summary, confirm = [], []
    for m in methods:
        mine = [recs[(m, r.seed)] for r in runs if r.method == m and (m, r.seed) in recs]
        cells = [m, f"{len(mine)}/{sum(r.method == m for r in runs)}"]
        if not mine:
            lines.append(
                "| " + " | ".join(cells + ["", "", "not run yet"] + ["", ""] * bool(more) + [""]) + " |"
            )
            continue
        acc = [x["test_top1"] for x in mine]
        cells.append(
            f"{statistics.fmean(acc):.2f}" + (f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else "")
        )
        delta = verd = c_delta = c_verd = ""
        if m != "baseline":
            diffs, mixed = _paired(recs, m, [x["seed"] for x in mine])
            delta, verd = _ci_text(diffs, comparisons)
            if mixed:
                delta += f" ({mixed} seed(s) on different CPUs left out)"
            summary.append(f"{m}: {verd}")
            if m in more:
                added = [s for s in preset.seeds_of(m) if s not in base_seeds]
                c_delta, c_verd = _ci_text(_paired(recs, m, added)[0], len(more))
                confirm.append(f"{m}: {c_verd}")
        cells += [delta, verd] + [c_delta, c_verd] * bool(more)
        cells.append(_fmt(_group_mean(mine, groups, "train_top1")[0], ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Test top-1 % per seed (the letter under each seed is the CPU its runs ran on):", ""]
    all_seeds = sorted({r.seed for r in runs})
    lines += [
        "| method | " + " | ".join(str(s) for s in all_seeds) + " |",
        "|---|" + "---:|" * len(all_seeds),
    ]
    for m in methods:
        cells = [f"{recs[(m, s)]['test_top1']:.2f}" if (m, s) in recs else "" for s in all_seeds]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    cpu_cells = []
    for s in all_seeds:
        used = {recs[(m, s)]["cpu"] for m in methods if (m, s) in recs}
        cpu_cells.append("/".join(sorted(letters[c] for c in used)))
    lines += ["| CPU | " + " | ".join(cpu_cells) + " |", ""]
    time_parts = []
    for c in cpus:
        on = [r for k, r in recs.items() if k in planned and r["cpu"] == c]
        # per-run CPU minutes where kept, else each run of a group counts with the group's mean
        tm = [r["cpu_min"] for r in on if r.get("cpu_min") is not None]
        tm += [
            g["cpu_min"]
            for g in groups
            if g.get("cpu") == c and g.get("cpu_min") is not None
            for _ in g["seeds"]
        ]
        if tm:
            time_parts.append(f"{letters[c]}: {statistics.fmean(tm):.1f} CPU-min per run ({len(on)} runs)")
    if time_parts:
        lines += [
            "Cost: "
            + "; ".join(time_parts)
            + " (CPU time of the train.py processes; on CPUs shared with other jobs, so only roughly comparable).",
            "",
        ]
    lo = [r for r in runs if r.cfg.layerout is not None]
    if lo:
        lo_recs = [recs[(r.method, r.seed)] for r in lo if (r.method, r.seed) in recs]
        frozen, n_fr = _group_mean(lo_recs, groups, "frozen")
        timing = [r["layerout_timing"] for r in lo_recs if r.get("layerout_timing")]
        timing += [
            g["layerout_timing"] for g in groups if g.get("layerout_timing") and g["method"] == lo[0].method
        ]
        if frozen is not None:
            lines.append(
                f"LayerOut: {100 * frozen:.1f}% of the parameters frozen per epoch after warm-up (mean over "
                f"{n_fr} run(s); the paper's figure)."
                + (
                    f" Replaying the runs' own frozen sets on a fresh model ({timing[0]['settings']}, "
                    "round-robin against nothing frozen): backward time "
                    f"{100 * statistics.fmean(t['bwd_saving'] for t in timing):+.1f}%, whole train step "
                    f"{100 * statistics.fmean(t['step_saving'] for t in timing):+.1f}% saved (positive = faster; "
                    f"timed frozen share {100 * statistics.fmean(t['frozen'] for t in timing):.1f}%)."
                    if timing
                    else ""
                )
            )
            lines.append("")
    n_max = max((sum(r.method == m for r in runs) for m in methods), default=1)
    lines += [
        "How to read it: *train top-1* is the running accuracy of the last epoch with augmentation and the "
        "regularizer active (for runs whose per-run value an earlier table did not keep, the mean of their group "
        "enters). *Δ* is the mean over seeds of (method − baseline) on the same seed with a two-sided 95% "
        "Student-t interval (n − 1 degrees of freedom: t = "
        f"{t_quantile(2):.2f} with 3 seeds, {t_quantile(max(1, n_max - 1)):.2f} with {n_max}). The *verdict* reads a "
        f"Bonferroni-corrected interval instead: {comparisons} methods are compared to one baseline, so each "
        f"interval is a {100 - 5 / comparisons:.2f}% one, and the verdict says when only the uncorrected interval "
        "excludes 0. *Cannot tell* means the seed-to-seed spread is too large to tell an effect from noise at this "
        "number of seeds; it is not evidence of no effect.",
    ]
    if more:
        lines += [
            "",
            f"*The added seeds*: {', '.join(more)} were run on more seeds because they leaned positive on seeds "
            f"{_seed_list(base_seeds)}. Those first seeds chose them, so an estimate that includes them favours them; "
            f"the seeds added afterwards ({_seed_list([s for s in preset.seeds_of(more[0]) if s not in base_seeds])}) "
            f"are a fresh test of the same question, corrected for the {len(more)} methods re-tested.",
        ]
    lines += [
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
        "--format pickle --out data/cifar10`), then run the command above; it skips the runs the records file "
        "holds, resumes interrupted ones (`train.py --resume latest`) and appends each finished run to the records "
        "file; `--report-only` rewrites this table from the records. Per-run outputs and logs stay in the runs "
        "folder (`--out`).",
        "",
    ]
    if summary:
        verdicts = (
            f"Verdicts (paired over seeds, corrected for {comparisons} comparisons): "
            + "; ".join(summary)
            + "."
        )
        if confirm:
            verdicts += (
                f" On the added seeds alone (corrected for {len(confirm)} comparisons): "
                + "; ".join(confirm)
                + "."
            )
        lines.insert(4, verdicts + "\n")
    return "\n".join(lines)


def _preset_name(preset: Preset) -> str:
    return next(k for k, v in PRESETS.items() if v is preset)


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
    records = Path(a.records or preset.records)
    out.mkdir(parents=True, exist_ok=True)

    def report() -> None:
        text = write_report(preset, runs, record_finished(runs, out, records, a))
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(text)
        print(f"table: {table}", flush=True)

    if a.report_only:
        report()
        return 0
    import threading

    lock = threading.Lock()
    failed = []
    recorded = {(r["method"], r["seed"]) for r in read_records(records) if "seed" in r}

    def one(run: Run) -> None:
        if (run.method, run.seed) in recorded:
            print(f"[{run.key}] recorded earlier: kept", flush=True)
            return
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
    with lock:
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
    ap.add_argument(
        "--records",
        default=None,
        help="preset: the finished runs' records, JSON lines (default: the preset's)",
    )
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
