"""``train.strategy: fsdp`` end to end, written up as Markdown: shard, train, checkpoint, resume, export.

Launches ``torchrun --nproc_per_node N`` on this file. Each process trains one epoch of a 2-epoch run through the
``Trainer`` (a time-sliced job), then resumes it with the user's command, ``recipes/train.py ... --resume latest``.
The model is ghostnet_050 with one dropout rule at every norm site, which takes all four insertion kinds (slot,
graph rewrite, forward hook, forward pre-hook), on the embedded digits data (no download). Checked: every block is
its own FSDP unit and every parameter a shard; the regularizers act (realised drop fraction); the resume restores
the gathered weights, the step and the optimizer state; the exported weights and the checkpoint's gathered model
load into an unsharded model with ``strict=True``. Reported: wall time, per-epoch loss/accuracy, peak memory.

    torchrun is started by the script itself:
    python benchmarks/fsdp_smoke.py --device cuda --nproc 1 --precision bf16     # one GPU (gpu_check.sh)
    python benchmarks/fsdp_smoke.py --device cpu --nproc 2                       # CPU twin, gloo

``--device cpu``: Accelerate enables its FSDP plugin only for GPU-type launches (``AcceleratorState`` sets
``DistributedType.FSDP`` in its MULTI_GPU/NPU/XPU branch, never for MULTI_CPU), and the recipe refuses a launch
where the plugin would be ignored. The CPU twin therefore does, for the gloo processes, the one thing Accelerate's
GPU branch does (:func:`lift_accelerates_gpu_gate`); everything below that gate (``prepare``'s FSDP2 path,
``fully_shard``, state dicts, ``save_state``/``load_state``, clipping) runs as it is.
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
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

#: ghostnet_050 + dropout at every norm site: slot (blocks.9.0.bn1, a BatchNormAct2d), graph rewrites
#: (blocks.N.0.bn_dw), forward hooks (bn1, shortcut norms), forward pre-hooks (norms inside nn.Sequential)
SPEC = {"rules": [{"regularizer": "dropout", "params": {"drop_prob": 0.1}, "sites": ["norm"]}]}
MODEL = "ghostnet_050"
IMAGE_SIZE = 16


def config(output_dir: str, batch_size: int, train_subset: int) -> dict[str, Any]:
    return {
        "name": "fsdp_smoke",
        "seed": 3,
        "output_dir": output_dir,
        "model": {"name": MODEL},
        "regularizer": SPEC,
        "data": {
            "dataset": "digits",
            "image_size": IMAGE_SIZE,
            "batch_size": batch_size,
            "eval_batch_size": batch_size,
            "train_subset": train_subset,
            "eval_subset": 45,
            "augment": {"crop_padding": 1, "hflip": False},
        },
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "sched": {"name": "constant"},
        "train": {"epochs": 2, "clip_grad_norm": 5.0, "strategy": "fsdp"},
        "log": {"progress_bar": False, "plot": False},
    }


def lift_accelerates_gpu_gate() -> None:
    """For gloo processes: what Accelerate's ``AcceleratorState`` does for a GPU launch with an FSDP plugin (the
    distributed type, the plugin, the type written back into ``PartialState``), in place of the recipe's launch
    check, which would refuse the CPU run."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    import timm_drop.training.fsdp as fsdp

    def lifted(accelerator: Any, plugin: Any, **_: Any) -> None:
        accelerator.state.distributed_type = DistributedType.FSDP
        if accelerator.state.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.state.mixed_precision)
        accelerator.state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    fsdp.require_fsdp_launch = lifted


def worker(out_dir: str, config_path: str, overrides: list[str], lift: bool) -> None:
    """One process of the run: first slice through the Trainer, second through ``recipes/train.py --resume``."""
    import importlib.util

    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from timm_drop.insertions import record_of
    from timm_drop.training import Trainer, load_config
    from timm_drop.training.checkpoint import load_weights

    if lift:
        lift_accelerates_gpu_gate()
    first = Trainer(load_config(config_path, overrides)).setup()
    acc, model = first.accelerator, first.unwrapped
    params = list(model.parameters())
    report: dict[str, Any] = {
        "rank": acc.process_index,
        "world": acc.num_processes,
        "fsdp2": bool(acc.is_fsdp2),
        "units": [n for n, m in model.named_modules() if isinstance(m, FSDPModule)],
        "all_dtensor": all(isinstance(p, DTensor) for p in params),
        "local_fraction": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
        / sum(p.numel() for p in params),
        "kinds": sorted({i.kind for i in record_of(model)}),
    }
    t0 = time.perf_counter()
    first.fit(max_epochs=1)
    del first

    restore = Trainer._restore

    def checked_restore(self: Any, path: Path) -> None:
        restore(self, path)
        sd = self.accelerator.get_state_dict(self.unwrapped)  # every process: a collective
        saved = load_weights(Path(self.out) / "last_model.pth") if self.is_main else {}
        report["resumed_step"] = self.state.step
        report["weights_restored"] = bool(saved) and all(
            torch.equal(sd[k].cpu(), v) for k, v in saved.items()
        )
        report["momentum_buffers"] = sum(
            "momentum_buffer" in s for s in self.optimizer.optimizer.state.values()
        )

    Trainer._restore = checked_restore
    spec = importlib.util.spec_from_file_location("timm_drop_recipe_train", ROOT / "recipes" / "train.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    report["rc"] = recipe.main(["--config", config_path, *overrides, "--resume", "latest"])
    report["train_s"] = time.perf_counter() - t0
    if torch.cuda.is_available() and not lift:
        report["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(out_dir, f"rank_{report['rank']}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def _unsharded_model() -> torch.nn.Module:
    import timm

    import timm_drop
    import timm_drop.models  # noqa: F401

    model = timm.create_model(MODEL, num_classes=10)
    timm_drop.apply_regularizer(model, SPEC, example_input=torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    return model


def check(tmp: Path, world: int) -> dict[str, Any]:
    """The processes' reports and the run's outputs, checked; raises AssertionError naming what failed."""
    from safetensors.torch import load_file

    from timm_drop.sites import find_blocks

    ranks = [json.loads((tmp / f"rank_{r}.json").read_text()) for r in range(world)]
    model = _unsharded_model()
    blocks = find_blocks(model, torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    for r in ranks:
        assert r["rc"] == 0, f"rank {r['rank']}: the resumed recipe exited with {r['rc']}"
        assert r["fsdp2"] and r["world"] == world, r
        missing = sorted(set(blocks) - set(r["units"]))
        assert not missing and "" in r["units"], f"blocks that are not FSDP units: {missing}"
        assert r["all_dtensor"] and r["local_fraction"] <= 1.0 / world + 0.05, r
        assert r["kinds"] == ["hook", "pre_hook", "rewrite", "slot", "watch"], r["kinds"]
        assert r["resumed_step"] > 0 and r["momentum_buffers"] > 0, r
    assert ranks[0]["weights_restored"], "the resumed model is not the checkpoint's"
    run = tmp / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2], rows
    assert rows[1]["step"] == 2 * rows[0]["step"] == 2 * ranks[0]["resumed_step"], rows
    assert all(r["rule1_drop_fraction"] > 0 for r in rows), "the regularizers did not act under FSDP"
    assert rows[-1]["eval_images"] == 45
    exported = load_file(str(run / "last_model.safetensors"))
    # Accelerate saves the gathered state dict from the device it trained on: on CUDA the tensors are cuda tensors
    checkpointed = torch.load(
        run / "checkpoints" / "epoch_0002" / "pytorch_model_fsdp.bin", weights_only=True, map_location="cpu"
    )
    assert exported.keys() == checkpointed.keys() and all(
        torch.equal(exported[k], checkpointed[k]) for k in exported
    )
    loads = {}
    for name, weights in (
        ("last_model.safetensors", exported),
        ("checkpoints/epoch_0002/pytorch_model_fsdp.bin", checkpointed),
    ):
        model.load_state_dict(weights, strict=True)
        with torch.no_grad():
            assert torch.isfinite(model.eval()(torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE))).all(), name
        loads[name] = "strict load + finite eval forward (the two are equal)"
    return {"ranks": ranks, "rows": rows, "loads": loads, "blocks": blocks}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    ap.add_argument("--batch-size", type=int, default=32, help="per process")
    ap.add_argument("--train-subset", type=int, default=None, help="default: 2 steps per epoch")
    ap.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/fsdp_smoke_<device>.md"
    )
    ap.add_argument("--worker", nargs=2, metavar=("DIR", "CONFIG"), help=argparse.SUPPRESS)
    ap.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker, args.override, lift=args.device == "cpu")
        return {}
    import timm
    import yaml

    import timm_drop

    subset = args.train_subset or 2 * args.batch_size * args.nproc
    # quoted: a bare ``no`` is YAML's false
    overrides = [f"train.cpu={str(args.device == 'cpu').lower()}", f"train.precision='{args.precision}'"]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cfg_path = tmp / "fsdp_smoke.yaml"
        cfg_path.write_text(yaml.safe_dump(config(str(tmp / "run"), args.batch_size, subset)))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(args.nproc),
        ]
        cmd += [__file__, "--device", args.device, "--worker", str(tmp), str(cfg_path)]
        cmd += [f"--override={o}" for o in overrides]
        env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        )
        if args.device == "cpu":
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(
                f"FSDP run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
            )
        try:
            result = check(tmp, args.nproc)
        except AssertionError as e:  # a process that ended cleanly with an error: show what it printed
            raise AssertionError(f"{e}\n--- output ---\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}") from e
    if args.device == "cuda":
        device = f"{args.nproc} x {torch.cuda.get_device_name()}"
    else:
        device = (
            f"{args.nproc} CPU process(es) over gloo ({platform.machine()}, {os.cpu_count()} logical CPUs)"
        )
    rank0 = result["ranks"][0]
    rows = result["rows"]
    lines = [
        f"# FSDP smoke ({args.device})",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- device: {device}",
        f"- torch {torch.__version__}, timm {timm.__version__}, timm_drop {timm_drop.__version__}, "
        f"Python {platform.python_version()}",
        f"- command: `python benchmarks/fsdp_smoke.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- model: {MODEL} + dropout at every norm site; insertion kinds {', '.join(rank0['kinds'])}; "
        f"train.precision {args.precision}",
        f"- FSDP units: root + {len(rank0['units']) - 1} ({len(result['blocks'])} blocks); local share of the "
        f"parameters on rank 0: {100 * rank0['local_fraction']:.1f}%",
        f"- resume: step {rank0['resumed_step']}, gathered weights equal the checkpoint's: "
        f"{rank0['weights_restored']}, {rank0['momentum_buffers']} momentum buffers restored",
        *(f"- unsharded load of `{k}`: {v}" for k, v in result["loads"].items()),
        "",
        "| epoch | step | train loss | train top-1 | eval top-1 | drop fraction | epoch s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['epoch']} | {r['step']} | {r['train_loss']:.4f} | {r['train_top1']:.2f} | {r['eval_top1']:.2f} | "
            f"{r['rule1_drop_fraction']:.3f} | {r['epoch_time_s']:.1f} |"
            for r in rows
        ),
        "",
        f"Wall {wall:.1f} s for the whole launch (start-up, both slices, checks in the processes)"
        + (
            f"; peak GPU memory {rank0['peak_mem_mib']:.0f} MiB on rank 0."
            if "peak_mem_mib" in rank0
            else "."
        ),
        "",
    ]
    text = "\n".join(lines)
    out = args.out or ROOT / "benchmarks" / "results" / f"fsdp_smoke_{args.device}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
