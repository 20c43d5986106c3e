"""``train.strategy: fsdp``: FSDP2 through Accelerate's plugin, each block sharded, regularizers of every insertion
kind kept, full weights gathered for the exports and checkpoints.

Accelerate turns its FSDP plugin on only for GPU-type launches: ``AcceleratorState`` switches to
``DistributedType.FSDP`` in its MULTI_GPU/NPU/XPU/... branch, never for MULTI_CPU (gloo), so on a CPU box the plugin
would be ignored and the run would silently train unsharded with DDP. The recipe refuses that
(:func:`test_fsdp_outside_a_gpu_launch_is_refused_before_anything_is_written`). Everything below Accelerate's
gate (``prepare``'s FSDP2 path, ``fully_shard``, the full state dict, ``save_state``/``load_state``, clipping) is
device-agnostic, so the two-process test lifts exactly that gate (:func:`_lift_accelerates_gpu_gate`) and runs the
user's command, ``recipes/train.py ... train.cpu=true train.strategy=fsdp``, on 2 CPU processes over gloo;
``benchmarks/gpu_check.sh`` runs the same recipe on a GPU with the gate untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm_drop.training import ConfigError, Trainer, load_config

REPO = Path(__file__).resolve().parents[1]

# ghostnet_050 with one dropout rule at every norm site takes all four insertion kinds: a slot (blocks.9.0.bn1,
# a BatchNormAct2d), graph rewrites (blocks.N.0.bn_dw), forward hooks (bn1, shortcut norms) and forward
# pre-hooks (the norms inside the ghost modules' nn.Sequential)
SPEC = {"rules": [{"regularizer": "dropout", "params": {"drop_prob": 0.1}, "sites": ["norm"]}]}
CONFIG = {
    "name": "fsdp",
    "seed": 3,
    "model": {"name": "ghostnet_050"},
    "regularizer": SPEC,
    "data": {
        "dataset": "digits",
        "image_size": 16,
        "batch_size": 32,
        "eval_batch_size": 32,
        "train_subset": 128,
        "eval_subset": 45,
        "augment": {"crop_padding": 1, "hflip": False},
    },
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "sched": {"name": "constant"},
    "train": {"epochs": 2, "clip_grad_norm": 5.0},
    "log": {"progress_bar": False, "plot": False},
}


# -- config ------------------------------------------------------------------------------------------------
def test_strategy_defaults_to_ddp_and_accepts_fsdp():
    assert load_config({}).train.strategy == "ddp"
    assert load_config({}, ["train.strategy=fsdp"]).train.strategy == "fsdp"
    with pytest.raises(ConfigError) as ei:
        load_config({}, ["train.strategy=zero3"])
    assert "train.strategy" in str(ei.value) and "fsdp" in str(ei.value)


@pytest.mark.parametrize(
    "overrides, conflicting",
    [
        (["train.ema.enabled=true"], "train.ema.enabled"),
        (["layerout={freeze_probs: random}"], "layerout"),
        (["log.mask_every=1"], "log.mask_every"),
        (["train.find_unused_parameters=true"], "train.find_unused_parameters"),
    ],
)
def test_fsdp_refuses_what_it_cannot_shard_naming_both_keys(overrides, conflicting):
    with pytest.raises(ConfigError) as ei:
        load_config({}, ["train.strategy=fsdp", *overrides])
    problems = [p for p in ei.value.problems if p.key == "train.strategy"]
    assert len(problems) == 1, str(ei.value)
    assert conflicting in problems[0].message, str(ei.value)
    load_config({}, overrides)  # each is fine under DDP


def test_fsdp_outside_a_gpu_launch_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    cfg = load_config({**CONFIG, "output_dir": str(out)}, ["train.cpu=true", "train.strategy=fsdp"])
    before = os.environ.get("ACCELERATE_USE_FSDP")
    with pytest.raises(ConfigError) as ei:
        Trainer(cfg).setup()
    msg = str(ei.value)
    assert msg.startswith("train.strategy:") and "torchrun" in msg and "train.cpu" in msg, msg
    assert not out.exists()
    # Accelerate marks the process as FSDP through this variable; a later DDP run in it must not inherit that
    assert os.environ.get("ACCELERATE_USE_FSDP") == before


def test_ddp_refuses_a_launcher_that_asked_accelerate_for_fsdp(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = load_config({**CONFIG, "output_dir": str(tmp_path / "run")}, ["train.cpu=true"])
    with pytest.raises(ConfigError) as ei:
        Trainer(cfg, dry_run=True).setup()
    assert str(ei.value).startswith("train.strategy:") and "ACCELERATE_USE_FSDP" in str(ei.value)


# -- the wrap policy ---------------------------------------------------------------------------------------
def test_the_shard_units_are_the_specs_blocks():
    import timm

    from timm_drop.sites import find_blocks
    from timm_drop.training.fsdp import fsdp_units

    model = timm.create_model("test_resnet", num_classes=10)
    x = torch.zeros(2, 3, 32, 32)
    units = fsdp_units(model, x)
    assert sorted(units) == sorted(find_blocks(model, x)) and units
    vit = timm.create_model("test_vit", num_classes=10)
    assert fsdp_units(vit, torch.zeros(2, 3, 160, 160)) == [f"blocks.{i}" for i in range(len(vit.blocks))]


# -- two processes ---------------------------------------------------------------------------------------------
def _lift_accelerates_gpu_gate() -> None:
    """Make Accelerate treat this gloo run as FSDP: what its AcceleratorState does for a GPU launch (the
    distributed type and the plugin), the one step it skips for MULTI_CPU. Replaces the recipe's launch check."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    import timm_drop.training.fsdp as fsdp

    def lifted(accelerator, plugin, **_):
        # AcceleratorState's GPU branch: the type, the plugin, and the type written back into PartialState
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    fsdp.require_fsdp_launch = lifted


def _worker(out_dir: str, config_path: str) -> None:
    import torch.distributed as dist
    from scripts import load_script
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from timm_drop.insertions import record_of
    from timm_drop.training.checkpoint import load_weights

    _lift_accelerates_gpu_gate()
    overrides = ["train.cpu=true", "train.strategy=fsdp"]
    # first slice: 1 of 2 epochs (a time-sliced job), through the public Trainer
    first = Trainer(load_config(config_path, overrides))
    first.setup()
    acc, model = first.accelerator, first.unwrapped
    assert acc.is_fsdp2 and acc.num_processes == 2, (acc.is_fsdp2, acc.num_processes, acc.distributed_type)
    units = [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    weights = [p for p in model.parameters()]
    sharded = all(
        isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in weights if p.numel() > 1
    )
    kinds = sorted({i.kind for i in record_of(model)})
    first.fit(max_epochs=1)
    del first
    # second slice: the user's command resumes it
    train = load_script(REPO / "recipes" / "train.py")
    resumed = {}
    restore = Trainer._restore

    def spy(self, path):
        restore(self, path)
        sd = self.accelerator.get_state_dict(self.unwrapped)
        saved = load_weights(Path(out_dir, "run", "last_model.pth")) if self.is_main else {}
        resumed["step"] = self.state.step
        resumed["weights_restored"] = all(torch.equal(sd[k], v) for k, v in saved.items())
        resumed["momentum"] = sum("momentum_buffer" in s for s in self.optimizer.optimizer.state.values())

    Trainer._restore = spy
    rc = train.main(["--config", config_path, *overrides, "--resume", "latest"])
    result = {
        "rc": rc,
        "units": units,
        "sharded": sharded,
        "kinds": kinds,
        "resumed": resumed,
    }
    Path(out_dir, f"result_{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _fresh_regularized_model():
    import timm

    import timm_drop

    torch.manual_seed(0)
    model = timm.create_model("ghostnet_050", num_classes=10)
    timm_drop.apply_regularizer(model, SPEC, example_input=torch.zeros(2, 3, 16, 16))
    return model


@pytest.mark.slow
def test_two_process_fsdp_run_shards_blocks_keeps_every_insertion_kind_and_resumes(tmp_path):
    import yaml
    from safetensors.torch import load_file

    from timm_drop.sites import find_blocks

    config_path = tmp_path / "fsdp.yaml"
    config_path.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(tmp_path / "run")}))
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [__file__, str(tmp_path), str(config_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in range(2)]
    blocks = find_blocks(_fresh_regularized_model(), torch.zeros(2, 3, 16, 16))
    for r in results:
        assert r["rc"] == 0
        assert set(blocks) <= set(r["units"]) and "" in r["units"]  # every block its own unit, the root too
        assert r["sharded"], "parameters were not sharded across the 2 processes"
        assert r["kinds"] == ["hook", "pre_hook", "rewrite", "slot"]
        assert r["resumed"]["step"] == 2 and r["resumed"]["momentum"] > 0
    assert results[0]["resumed"]["weights_restored"]

    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [2, 4]
    assert all(r["rule1_drop_fraction"] > 0 for r in rows)  # the regularizers ran under sharding
    assert rows[-1]["eval_images"] == 45
    # gathered weights and the checkpoint load into an unsharded model, strictly
    for weights in (
        load_file(str(run / "last_model.safetensors")),
        torch.load(run / "checkpoints" / "epoch_0002" / "pytorch_model_fsdp.bin", weights_only=True),
    ):
        model = _fresh_regularized_model()
        model.load_state_dict(weights, strict=True)
        with torch.no_grad():
            assert torch.isfinite(model.eval()(torch.zeros(2, 3, 16, 16))).all()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
